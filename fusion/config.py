"""Run configurations: every default of `fusion train` and `fusion train --finetune`, stated once.

The CLI passes only the options given on the command line and falls back to these dataclasses
for the rest; a run's ``config.json["train"]`` loads back with :meth:`TrainConfig.from_dict`, so
``fusion train --config RUN_DIR`` re-runs a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

from .errors import TrainError

__all__ = ["DEFAULT_HEAD", "DENSE_MAX_CLASSES", "TOP_K_STORE", "BLOCK_BYTES", "TrainConfig",
           "FinetuneConfig", "config_for", "check_seeds", "parse_seeds"]

DEFAULT_HEAD = "concat"  # the head `fusion train` and `fusion.train` use when none is named
PRECISIONS = ("fp32", "fp16", "bf16")
# run probabilities (docs/runs.md section 2.3): dense (N, K) float32 up to this many classes,
DENSE_MAX_CLASSES = 256
# else the TOP_K_STORE largest per row (float16) + their class indices + the remaining mass
TOP_K_STORE = 20
# bytes of one (rows, K) float32 block of probabilities predicted or ranked at a time
# (fusion.probs.block_rows): 8 MiB = 374 rows at K = 5,600, so what predicting adds to a run's
# memory does not grow with K (ranking a block briefly needs about 3 more of its size)
BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class TrainConfig:
    """Everything a `fusion train` run depends on (written to config.json)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: float = 0.1  # share of the steps with a linear warm-up
    patience: int = 6  # epochs without a better validation macro-F1 before stopping
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # repeats: train every fold once per seed (None: seed)
    inner_val: float = 0.1  # share of each fold's training rows held out for model selection
    label_smoothing: float = 0.0  # passed to the head's loss (cross-entropy)
    modality_dropout: float = 0.0  # chance a training item with both modalities loses one
    device: str = "auto"
    layers: str | None = None  # cached text layers to feed (None = all cached)
    folds: int | None = None  # train the first N store folds (None = all)
    fold: int | None = None  # train only this fold
    max_ram_gb: float | None = 8.0
    class_weight: bool = False
    grad_clip: float = 1.0
    threads: int | None = None  # torch intra-op threads on CPU (None = torch's default)
    top_k_store: int = TOP_K_STORE  # probabilities kept per row once K > DENSE_MAX_CLASSES
    options: dict[str, Any] = field(default_factory=dict)  # head options (--set key=value)

    def __post_init__(self) -> None:
        if self.seeds is not None and not isinstance(self.seeds, tuple):  # JSON gives a list
            object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds a run trains: ``seeds``, or ``(seed,)`` without repeats."""
        return self.seeds if self.seeds is not None else (self.seed,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The config of a run's ``config.json["train"]``; keys of other versions are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def override(self, **overrides: Any) -> Self:
        """A copy with ``overrides`` applied: config fields replace, other keys are head
        options merged into ``options``."""
        fields_ = {k: v for k, v in overrides.items() if k in self.__dataclass_fields__}
        opts = {k: v for k, v in overrides.items() if k not in self.__dataclass_fields__}
        options = {**self.options, **fields_.pop("options", {}), **opts}
        return replace(self, **fields_, options=options)

    def check(self) -> None:
        """Raise :class:`TrainError` naming the flag for a value no run can use."""
        for key in ("epochs", "batch_size", "patience"):
            if getattr(self, key) < 1:
                raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, key)}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.top_k_store < 1:
            raise TrainError(f"--top-k-store must be >= 1, got {self.top_k_store}; e.g. 20")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        if not 0 < self.inner_val < 1:
            raise TrainError(f"--inner-val must be in (0, 1), got {self.inner_val}; it is the "
                             "share of each fold's training rows used to pick the epoch, e.g. 0.1")
        if not 0 <= self.label_smoothing < 1:
            raise TrainError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}; "
                             "e.g. 0.1")
        if not 0 <= self.modality_dropout < 1:
            raise TrainError(f"--modality-dropout must be in [0, 1), got "
                             f"{self.modality_dropout}; e.g. 0.1")
        if self.seeds is not None:
            check_seeds(self.seeds)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """`fusion train --finetune`: encoders live and trainable, so fewer, smaller steps."""

    epochs: int = 3
    batch_size: int = 16
    encoder_lr: float = 2e-5
    head_lr: float | None = None  # default: lr
    freeze_layers: int = 0
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    catalog: str | None = None
    init: str | None = None
    max_items: int | None = None  # cap training rows per fold (smoke runs, benchmarks)
    text_spec: str | None = None  # encoder moved: new spec; the weights digest is still checked
    image_spec: str | None = None
    save_encoders: bool = False
    num_workers: int = 0

    def check(self) -> None:
        super().check()
        if self.grad_accum < 1:
            raise TrainError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.modality_dropout:
            raise TrainError(f"--modality-dropout {self.modality_dropout}: not available with "
                             "--finetune yet; train the head on the cache with it, then "
                             "--finetune --init that run")


def check_seeds(seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a tuple of distinct ints, or :class:`TrainError` naming the value."""
    seeds = tuple(seeds)
    if not seeds:
        raise TrainError("--seeds is empty; pass distinct integers such as --seeds 0,1,2")
    if any(isinstance(x, bool) or not isinstance(x, int) for x in seeds):
        raise TrainError(f"--seeds {list(seeds)} must be integers, e.g. --seeds 0,1,2")
    dup = sorted({x for x in seeds if seeds.count(x) > 1})
    if dup:
        raise TrainError(f"--seeds {','.join(map(str, seeds))} repeats seed {dup[0]}; each repeat "
                         "needs its own seed, e.g. --seeds 0,1,2")
    return seeds


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; one line naming the value when it is not that."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        return check_seeds(())
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise TrainError(f"--seeds {text!r} is not a comma-separated list of integers; pass "
                         "e.g. --seeds 0,1,2") from None
    return check_seeds(seeds)


def config_for(kind: str) -> type[TrainConfig]:
    """The config class of a run kind (``"train"`` or ``"finetune"``)."""
    return FinetuneConfig if kind == "finetune" else TrainConfig
