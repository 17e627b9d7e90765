"""embedstore: cache token-level text and spatial image encoder outputs in a Zarr store."""

from .create import create_store, make_folds
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .features import FeatureSet, FeatureWriter
from .format import FORMAT_VERSION
from .store import Store, open_store
from .version import __version__

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
