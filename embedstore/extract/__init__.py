"""`embedstore extract`: run encoders once over a catalog and cache their full outputs.

Modules, from the bottom: :mod:`.config` (the options, each default stated once),
:mod:`.progress` (callbacks and results), :mod:`.distributed` (devices, torchrun),
:mod:`.checks` (pre-run checks), :mod:`.batches` (worker datasets, host copies, the background
writer thread), :mod:`.jobs` (what differs between text and images), :mod:`.pipeline` (the run).

Rows are written in blocks (see :mod:`embedstore.features`). Under ``torchrun`` rank 0 creates
the store and the feature sets (the other ranks wait for it, and get its error if it fails),
the blocks still to do are dealt round-robin to the ranks, and rank 0 finalises after a barrier.

Everything that can be checked is checked before any encoding and before anything is written:
options, catalog (columns, ids, rows), the existing store's ids, encoder specs, existing
feature sets. Per-row problems (unreadable image, empty text) do not stop a run: the row is
recorded in the feature set's ``errors`` array with the reason and written as zeros; above
``max_error_rate`` :func:`extract` raises :class:`ExtractionError` *after* finishing (the data
are kept), carrying the per-feature results in ``.results``.
"""

from .config import ExtractConfig
from .pipeline import extract
from .progress import FeatureResult, Progress

__all__ = ["ExtractConfig", "FeatureResult", "Progress", "extract"]
