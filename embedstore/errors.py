"""The embedstore error hierarchy. Every message says what was wrong, the value, and the fix;
the CLI turns any of these into one line and exit code 2."""

from __future__ import annotations

__all__ = [
    "EmbedStoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreCorruptError",
    "StoreIOError",
    "FeatureNotFoundError",
    "FeatureExistsError",
    "FeatureIncompleteError",
    "FeatureChangedError",
    "InvalidInputError",
    "EncoderSpecError",
    "CatalogError",
    "ImageLoadError",
    "ExtractionError",
]


class EmbedStoreError(Exception):
    """Base class of every error this library raises on purpose."""


class StoreNotFoundError(EmbedStoreError, FileNotFoundError):
    """No store at the given URL."""


class StoreExistsError(EmbedStoreError, FileExistsError):
    """A store already exists where one was to be created."""


class StoreFormatError(EmbedStoreError, ValueError):
    """Metadata that does not follow the store format (wrong version, wrong field type...)."""


class StoreCorruptError(EmbedStoreError):
    """Array data that cannot be read back (checksum mismatch, truncated chunk, missing data)."""


class StoreIOError(EmbedStoreError, OSError):
    """Storage that cannot be written or reached (disk full, permission denied, server down).
    Rows finished before the failure stay finished; ``--resume`` goes on once it is fixed."""


class FeatureNotFoundError(EmbedStoreError, KeyError):
    """A feature set name that the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0]) if self.args else ""


class FeatureExistsError(EmbedStoreError, FileExistsError):
    """A complete feature set exists and --overwrite was not given."""


class FeatureIncompleteError(EmbedStoreError):
    """A feature set whose status is still `writing`."""


class FeatureChangedError(EmbedStoreError):
    """A feature set was replaced (``--overwrite``) or removed while it was being read or
    written; re-open the store to see the current version."""


class InvalidInputError(EmbedStoreError, ValueError):
    """Bad ids, labels, options or arguments given by the caller."""


class EncoderSpecError(EmbedStoreError, ValueError):
    """An encoder spec that cannot be resolved to a model."""


class CatalogError(EmbedStoreError, ValueError):
    """A catalog file that cannot be used (missing columns, duplicate ids, empty...)."""


class ImageLoadError(EmbedStoreError):
    """One image could not be read; recorded per row, does not stop an extraction."""


class ExtractionError(EmbedStoreError):
    """An extraction that cannot go on (error rate above --max-error-rate, ...)."""
