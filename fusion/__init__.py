"""fusion: train multimodal fusion heads and GBDT stackers on cached encoder outputs."""

__version__ = "0.1.0"

from .batch import Batch  # noqa: E402
from .checks import CheckResult, check_head  # noqa: E402
from .errors import FusionError, HeadError, RunDirError, StackError, TrainError  # noqa: E402
from .heads import (  # noqa: E402
    FusionHead,
    create_head,
    head_options,
    list_heads,
    register_head,
    resolve_head,
)
from .rundir import Run, RunWriter, load_run  # noqa: E402
from .train import TrainConfig, train  # noqa: E402


def __getattr__(name: str):
    # stacking pulls in lightgbm/xgboost: import it on first use
    if name in ("stack", "list_stackers"):
        from . import stack as _stack

        return getattr(_stack, name)
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Batch",
    "CheckResult",
    "FusionError",
    "FusionHead",
    "HeadError",
    "Run",
    "RunDirError",
    "RunWriter",
    "StackError",
    "TrainConfig",
    "TrainError",
    "check_head",
    "create_head",
    "head_options",
    "list_heads",
    "list_stackers",
    "load_run",
    "register_head",
    "resolve_head",
    "stack",
    "train",
]
