"""The options of one extraction (:class:`ExtractConfig`): every default is stated here once;
the CLI passes only what the user gave. Checked before anything is read or written."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidInputError
from ..format import DEFAULT_BLOCK_ROWS, DEFAULT_FLOAT_CODEC, check_codec

__all__ = ["ExtractConfig"]


@dataclass(frozen=True)
class ExtractConfig:
    """Every option of one extraction; written into the provenance of each feature set."""

    text: str | None = None
    image: str | None = None
    id_col: str = "id"
    text_cols: tuple[str, ...] = ("title", "description")
    image_col: str = "image"
    label_col: str | None = "label"
    group_col: str | None = None  # new store only: equal values share a fold (docs/extract.md)
    layers: str = "-1"
    max_length: int = 256
    image_size: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    device: str = "auto"
    precision: str = "fp32"
    text_name: str | None = None
    image_name: str | None = None
    folds: int = 5
    seed: int = 0
    holdout: float = 0.2
    resume: bool = False
    overwrite: bool = False
    max_error_rate: float = 0.01
    block_rows: int = DEFAULT_BLOCK_ROWS
    gallery: bool = False  # write an image set as a gallery (§2.6) even if no item has 2+ images
    # compressor of the float arrays: "lz4" decodes at memory speed (streaming epochs), "zstd"
    # is smaller on sparse CNN maps (stores shipped over a network); docs/format.md §6
    codec: str = DEFAULT_FLOAT_CODEC
    storage_options: dict | None = None

    @classmethod
    def from_options(cls, **options: Any) -> ExtractConfig:
        """A config from the options a caller gave; ``None`` means "the default"."""
        return cls(**{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_cols"] = list(self.text_cols)
        d.pop("storage_options")  # may hold credentials: never written to a store
        return d

    def check(self) -> None:
        """Refuse options that cannot work, with the flag and the fix."""
        if not self.text and not self.image:
            raise InvalidInputError("nothing to extract: pass --text SPEC and/or --image SPEC")
        if self.text and not self.text_cols:
            raise InvalidInputError("--text-cols is empty; name the catalog's text column(s), "
                                    "e.g. --text-cols title,description")
        if not 0 <= self.max_error_rate <= 1:
            raise InvalidInputError(f"--max-error-rate must be in [0, 1], got "
                                    f"{self.max_error_rate}")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise InvalidInputError(f"--num-workers must be >= 0, got {self.num_workers}")
        check_codec(self.codec)
        b = self.block_rows
        if b < 1 or b & (b - 1):
            raise InvalidInputError(f"--block-rows must be a power of two, got {b}; e.g. 1024")
