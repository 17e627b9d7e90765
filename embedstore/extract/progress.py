"""What an extraction reports: progress callbacks while it runs, one :class:`FeatureResult`
per feature set when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FeatureResult", "Progress"]


@dataclass
class FeatureResult:
    """What one feature set's extraction did (this process's share under torchrun)."""

    name: str
    modality: str
    spec: str
    n_items: int
    n_encoded: int  # rows encoded by this run, all ranks (resume: only the missing ones)
    n_errors: int  # rows of the whole feature set that failed (presence 2; absent rows are not)
    errors: dict[int, str] = field(default_factory=dict)  # those rows' reasons
    n_absent: int = 0  # rows with nothing to encode in the catalog (no image path, empty text)
    wall_seconds: float = 0.0
    encode_seconds: float = 0.0
    bytes_written: int = 0  # bytes of the feature set on disk
    skipped: bool = False  # --resume of a set that was already complete

    @property
    def items_per_second(self) -> float:
        return self.n_encoded / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n_items if self.n_items else 0.0


class Progress:
    """Callbacks the CLI implements (rich progress bar); the library never prints."""

    def start(self, name: str, total: int) -> None: ...
    def advance(self, name: str, n: int) -> None: ...
    def finish(self, name: str) -> None: ...
