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
from .predict import Predictions, predict  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .rundir import Run, RunWriter, load_run  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

# Stacking (lightgbm/xgboost imports) lives in `fusion.stack`: `from fusion.stack import stack`.


__all__ = [
    "__version__",
    "Batch",
    "CheckResult",
    "FusionError",
    "FusionHead",
    "HeadError",
    "Predictions",
    "Predictor",
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
    "load_run",
    "predict",
    "register_head",
    "resolve_head",
    "train",
]
