"""embedstore: cache token-level text and spatial image encoder outputs in a Zarr store."""

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .features import FeatureSet, FeatureWriter  # noqa: E402
from .format import FORMAT_VERSION  # noqa: E402
from .store import Store, create_store, make_folds, open_store  # noqa: E402

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "Store",
    "FeatureSet",
    "FeatureWriter",
    "create_store",
    "open_store",
    "make_folds",
    *_errors_all,
]
