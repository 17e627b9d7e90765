"""Run configurations: every default of `fusion train` and `fusion train --finetune`, stated once.

The CLI passes only the options given on the command line and falls back to these dataclasses
for the rest; a run's ``config.json["train"]`` loads back with :meth:`TrainConfig.from_dict`, so
``fusion train --config RUN_DIR`` re-runs a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

from .errors import TrainError

__all__ = ["DEFAULT_HEAD", "TrainConfig", "FinetuneConfig", "config_for"]

DEFAULT_HEAD = "concat"  # the head `fusion train` and `fusion.train` use when none is named
PRECISIONS = ("fp32", "fp16", "bf16")


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
    device: str = "auto"
    layers: str | None = None  # cached text layers to feed (None = all cached)
    folds: int | None = None  # train the first N store folds (None = all)
    fold: int | None = None  # train only this fold
    max_ram_gb: float | None = 8.0
    class_weight: bool = False
    grad_clip: float = 1.0
    threads: int | None = None  # torch intra-op threads on CPU (None = torch's default)
    options: dict[str, Any] = field(default_factory=dict)  # head options (--set key=value)

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
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")


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


def config_for(kind: str) -> type[TrainConfig]:
    """The config class of a run kind (``"train"`` or ``"finetune"``)."""
    return FinetuneConfig if kind == "finetune" else TrainConfig
