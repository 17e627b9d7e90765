"""`embedstore extract`: run encoders once over a catalog and cache their full outputs.

The loop, in order of importance for speed: DataLoader workers tokenise texts and decode/resize
images; text batches are bucketed by length inside each write block (less padding);
``torch.inference_mode`` (inside the encoders); AMP + ``channels_last`` on GPU (inside the
encoders); the device->host copy is started non-blocking into pinned memory and waited for on a
background thread, which also scatters rows into block buffers and writes them to Zarr, so the
encoder never waits for storage; every write is a whole block of chunks.

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

from __future__ import annotations

import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .catalog import Catalog, read_catalog
from .errors import (
    EmbedStoreError,
    ExtractionError,
    FeatureExistsError,
    InvalidInputError,
    StoreNotFoundError,
)
from .store import Store, create_store, open_store

__all__ = ["ExtractConfig", "FeatureResult", "Progress", "extract"]

_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ExtractConfig:
    """Every option of one extraction; written into the provenance of each feature set."""

    text: str | None = None
    image: str | None = None
    id_col: str = "id"
    text_cols: tuple[str, ...] = ("title", "description")
    image_col: str = "image"
    label_col: str | None = "label"
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
    block_rows: int = 1024
    storage_options: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_cols"] = list(self.text_cols)
        d.pop("storage_options")  # may hold credentials: never written to a store
        return d


@dataclass
class FeatureResult:
    """What one feature set's extraction did (this process's share under torchrun)."""

    name: str
    modality: str
    spec: str
    n_items: int
    n_encoded: int  # rows encoded by this run, all ranks (resume: only the missing ones)
    n_errors: int  # rows of the whole feature set recorded as failed
    errors: dict[int, str] = field(default_factory=dict)
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


# ---------------------------------------------------------------------------------------------
# devices and torch.distributed


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA device is available; use --device "
                                "cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidInputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


_OWN_PROCESS_GROUP = False  # True when extract() initialised torch.distributed itself


def _dist(device: str) -> tuple[int, int, int]:
    """(rank, world, local_rank) under torchrun, initialising the process group once (gloo on
    CPU, NCCL with one GPU per local rank)."""
    global _OWN_PROCESS_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)  # before NCCL starts: one GPU per rank
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        _OWN_PROCESS_GROUP = True
    return dist.get_rank(), dist.get_world_size(), local


def _end_dist() -> None:
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _OWN_PROCESS_GROUP = False


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _on_rank0(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """Run ``fn`` on rank 0 only and hand every rank its (picklable) result -- or the library
    error it raised, so no rank is left waiting at a barrier. Also a barrier: ranks > 0 return
    only after rank 0 is done."""
    value, err = None, None
    if rank == 0:
        try:
            value = fn()
        except EmbedStoreError as e:
            err = e
    if world > 1:
        import torch.distributed as dist

        box = [(value, None if err is None else (type(err), str(err)))]
        dist.broadcast_object_list(box, src=0)
        value, sent = box[0]
        if err is None and sent is not None:
            err = sent[0](sent[1])
    if err is not None:
        raise err
    return value


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("embedstore-fusion", "torch", "transformers", "timm", "open_clip_torch", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# datasets run in DataLoader workers (picklable: they hold the encoder's tokenizer/transform,
# never the model)


class _TextBatches(torch.utils.data.Dataset):
    """Item = one length-bucketed batch of rows -> tokenised tensors (in a worker)."""

    def __init__(self, batches: list[np.ndarray], texts: Sequence[str], tokenize: Callable):
        self.batches, self.texts, self.tokenize = batches, texts, tokenize

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        rows = self.batches[i]
        return rows, self.tokenize([self.texts[r] for r in rows])


class _ImageBatches(torch.utils.data.Dataset):
    """Item = one batch of rows -> (rows, rows that decoded, their stacked pixels, errors by
    row). A bad image is a per-row error, never a failed batch."""

    def __init__(self, batches: list[np.ndarray], sources: Sequence[str | None],
                 load: Callable, shape: tuple[int, ...]):
        self.batches, self.sources, self.load, self.shape = batches, sources, load, shape

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        rows = self.batches[i]
        pix, ok, errs = [], [], {}
        for r in rows:
            src = self.sources[r]
            if src is None:
                errs[int(r)] = "missing image (empty value in the image column)"
                continue
            try:
                pix.append(self.load(src))
                ok.append(int(r))
            except Exception as e:  # noqa: BLE001 - any decode failure is a per-row error
                errs[int(r)] = f"{type(e).__name__}: {e}"[:300]
        stacked = torch.stack(pix) if pix else torch.zeros((0, *self.shape))  # (B_ok, 3, H, W)
        return rows, np.array(ok, dtype=np.int64), stacked, errs


def _no_collate(item: Any) -> Any:
    """Keep items as they are (the default would turn the numpy row arrays into tensors)."""
    return item


def _loader(ds: torch.utils.data.Dataset, num_workers: int, device: str):
    return torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_no_collate,
        pin_memory=device.startswith("cuda"), persistent_workers=False,
        prefetch_factor=4 if num_workers else None)


# ---------------------------------------------------------------------------------------------
# background thread: device->host completion, scatter into block buffers, Zarr writes


def _to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """Start copying ``tensors`` to the host. On CUDA the copy is non-blocking into pinned
    memory; the returned event must be synchronised before the host tensors are read."""
    host, event = {}, None
    for k, t in tensors.items():
        if t.device.type == "cuda":
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host[k] = h
            if event is None:
                event = torch.cuda.Event()
        else:
            host[k] = t
    if event is not None:
        event.record()
    return host, event


def _f16(t: torch.Tensor) -> torch.Tensor:
    """fp16 for storage, clipped first (on the device) so large activations do not become inf."""
    return t.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)


class _Background:
    """One thread that runs tasks in submission order. Back-pressure: at most ``max_writes``
    block writes and ``max_batches`` batch copies in flight; the first failure stops later
    tasks and is raised in the main thread at the next submit or at close."""

    def __init__(self, max_writes: int = 2, max_batches: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedstore-writer")
        self.limits = {"write": max_writes, "batch": max_batches}
        self.pending: dict[str, deque[Future]] = {"write": deque(), "batch": deque()}
        self.seconds = 0.0
        self._failed = threading.Event()

    def submit(self, kind: str, fn: Callable[[], None]) -> None:
        q = self.pending[kind]
        while q and q[0].done():
            q.popleft().result()
        while len(q) >= self.limits[kind]:
            q.popleft().result()

        def run() -> None:
            if self._failed.is_set():
                return
            t = time.perf_counter()
            try:
                fn()
            except BaseException:
                self._failed.set()
                raise
            self.seconds += time.perf_counter() - t

        q.append(self.pool.submit(run))

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every task (blocks in flight are finished, also on Ctrl-C)."""
        try:
            for q in self.pending.values():
                while q:
                    f = q.popleft()
                    if raise_errors:
                        f.result()
                    else:
                        f.exception()
        finally:
            self.pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------


def extract(catalog: str | os.PathLike, store_url: str | os.PathLike,
            config: ExtractConfig = ExtractConfig(), *,
            progress: Progress | None = None) -> list[FeatureResult]:
    """Extract the configured encoders into ``store_url`` (created when missing) and return
    one :class:`FeatureResult` per feature set.

    Raises an :class:`EmbedStoreError` before anything is written for bad options, catalogs,
    specs, mismatched stores or existing feature sets; :class:`ExtractionError` (with
    ``.results``) after a finished run whose failed-row share exceeds ``max_error_rate``.
    """
    progress = progress or Progress()
    _check_config(config)
    store_url = os.fspath(store_url)
    cat = read_catalog(catalog, id_col=config.id_col, text_cols=config.text_cols,
                       image_col=config.image_col, label_col=config.label_col,
                       need_text=bool(config.text), need_image=bool(config.image))
    device = _resolve_device(config.device)
    rank, world, local = _dist(device)
    try:
        if world > 1 and device == "cuda":
            device = f"cuda:{local}"
        return _run(cat, store_url, config, device, rank, world, progress)
    finally:
        _end_dist()


def _check_config(config: ExtractConfig) -> None:
    if not config.text and not config.image:
        raise InvalidInputError("nothing to extract: pass --text SPEC and/or --image SPEC")
    if config.text and not config.text_cols:
        raise InvalidInputError("--text-cols is empty; name the catalog's text column(s), e.g. "
                                "--text-cols title,description")
    if not 0 <= config.max_error_rate <= 1:
        raise InvalidInputError(f"--max-error-rate must be in [0, 1], got {config.max_error_rate}")
    if config.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.num_workers < 0:
        raise InvalidInputError(f"--num-workers must be >= 0, got {config.num_workers}")
    b = config.block_rows
    if b < 1 or b & (b - 1):
        raise InvalidInputError(f"--block-rows must be a power of two, got {b}; e.g. 1024")


def _run(cat: Catalog, url: str, config: ExtractConfig, device: str, rank: int, world: int,
         progress: Progress) -> list[FeatureResult]:
    from .encoders import create_encoder

    so = config.storage_options
    try:  # read-only until everything is checked: bad input never changes a store
        existing: Store | None = open_store(url, mode="r", storage_options=so)
    except StoreNotFoundError:
        existing = None
    if existing is not None:
        _check_ids(existing, cat, url)
    if config.num_workers and config.text:
        # workers are forked after the token-count pass: keep the Rust tokenizer from
        # starting its thread pool (it would warn on stderr and disable itself in every worker)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoders = []
    for modality, spec in (("text", config.text), ("image", config.image)):
        if spec:
            enc = create_encoder(spec, modality=modality, layers=config.layers,
                                 max_length=config.max_length, image_size=config.image_size,
                                 device=device, precision=config.precision, seed=config.seed)
            name = (config.text_name if modality == "text" else config.image_name) or enc.name
            encoders.append((modality, name, enc))
    if len(encoders) == 2 and encoders[0][1] == encoders[1][1]:
        raise InvalidInputError(f"text and image would both be stored as {encoders[0][1]!r}; "
                                "give them different --text-name/--image-name")
    if existing is not None:
        for _, name, enc in encoders:
            _check_feature_slot(existing, name, enc, config)

    def create() -> None:
        if existing is None:
            create_store(url, cat.ids, cat.labels, folds=config.folds, seed=config.seed,
                         holdout=config.holdout, source=cat.path, storage_options=so)

    _barrier(world)  # every rank has looked at the store before rank 0 creates it
    _on_rank0(create, rank, world)
    store = open_store(url, mode="r+", storage_options=so)
    results = []
    for modality, name, enc in encoders:
        fn = _extract_text if modality == "text" else _extract_image
        results.append(fn(store, cat, name, enc, config, rank, world, progress))
    bad = [r for r in results if r.error_rate > config.max_error_rate]
    if bad:
        r = bad[0]
        row, why = next(iter(r.errors.items()))
        more = f" (and {', '.join(repr(x.name) for x in bad[1:])})" if len(bad) > 1 else ""
        err = ExtractionError(
            f"feature set {r.name!r}{more}: {r.n_errors}/{r.n_items} rows failed "
            f"({r.error_rate:.1%} > --max-error-rate {config.max_error_rate:.1%}; first: row "
            f"{row} {cat.ids[row]!r}: {why}); the finished rows are kept: fix the inputs and "
            "re-extract with --overwrite, or raise --max-error-rate")
        err.results = results  # type: ignore[attr-defined]
        raise err
    return results


def _check_ids(store: Store, cat: Catalog, url: str) -> None:
    if store.n_items == len(cat) and store.ids.tolist() == cat.ids:
        return
    theirs = set(store.ids.tolist())
    extra = [i for i in cat.ids if i not in theirs][:3]
    if extra:
        why = f" (e.g. not in the store: {extra})"
    elif len(cat) == store.n_items:
        why = " (same ids, another order)"
    else:
        why = " (the catalog lacks some of the store's ids)"
    raise InvalidInputError(
        f"catalog {cat.path!r} does not match store {url!r}: {len(cat)} ids vs "
        f"{store.n_items} in the store{why}; a store holds one dataset in one id order: use a "
        "new --store for this catalog")


def _check_feature_slot(store: Store, name: str, enc, config: ExtractConfig) -> None:
    if name not in store.features or config.overwrite:
        return
    fs = store.features[name]
    if not config.resume:
        if fs.status == "complete":
            raise FeatureExistsError(f"feature set {name!r} is already complete in "
                                     f"{store.url!r}; pass --overwrite to replace it or "
                                     "--text-name/--image-name to store it under another name")
        raise FeatureExistsError(f"feature set {name!r} in {store.url!r} is incomplete "
                                 f"({fs.n_done}/{fs.n_items} rows); pass --resume to finish it "
                                 "or --overwrite to start again")
    _check_resumable(fs.meta, name, enc)


def _check_resumable(meta: dict, name: str, enc) -> None:
    """--resume must continue with the same encoder and the same layout."""
    stored = meta.get("encoder", {}).get("spec")
    if stored != enc.spec:
        raise InvalidInputError(f"--resume: feature set {name!r} was started with {stored!r}, "
                                f"not {enc.spec!r}; resume with the same spec or use --overwrite")
    want = {"modality": enc.modality, "dim": enc.dim, "pooled_dim": enc.pooled_dim}
    if enc.modality == "text":
        want["layers"] = list(enc.layers)
    else:
        want["n_regions"] = enc.n_regions
    got = {k: meta.get(k, meta.get("dim") if k == "pooled_dim" else None) for k in want}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise InvalidInputError(f"--resume: feature set {name!r} was started with another "
                                f"layout (stored, now): {diff}; pass the same --layers/"
                                "--image-size as before, or use --overwrite")


def _open_writer(store: Store, name: str, enc, config: ExtractConfig, rank: int, world: int,
                 create_kwargs: dict) -> tuple[Any, list[int] | None]:
    """Create or reopen the writer on rank 0, then on every rank. Returns ``(writer, blocks)``:
    this rank's share of the blocks still to do, or None when an already complete set was
    resumed (nothing to do)."""
    holder: dict[str, Any] = {}

    def open_on_rank0() -> list[int] | None:
        exists = name in store.features
        if exists and config.resume and not config.overwrite:
            writer = store.feature_writer(name)
            _check_resumable(writer.meta, name, enc)
            if writer.meta["status"] == "complete":
                holder["writer"] = writer
                return None
        else:
            writer = store.create_feature(name, overwrite=config.overwrite, **create_kwargs)
        holder["writer"] = writer
        return writer.pending_blocks()  # read once, here: ranks must agree on the split

    pending = _on_rank0(open_on_rank0, rank, world)
    if rank == 0:
        writer = holder["writer"]
    else:
        store.refresh()
        writer = store.feature_writer(name)
    if pending is None:
        return writer, None
    return writer, pending[rank::world]


def _provenance(enc, config: ExtractConfig, cat: Catalog, device: str) -> dict[str, Any]:
    prov = enc.provenance()
    prov["encoder"] = {**prov.get("encoder", {}), "spec": enc.spec}
    prov["extract"] = config.to_dict()
    prov["catalog"] = {"path": os.path.abspath(cat.path) if "://" not in cat.path else cat.path,
                       "fingerprint": cat.fingerprint, "id_col": config.id_col,
                       "text_cols": list(config.text_cols), "image_col": config.image_col}
    prov["device"] = device
    prov.setdefault("precision", config.precision)
    prov["versions"] = {**_versions(), **prov.get("versions", {})}
    return prov


def _block_len(writer, b: int) -> int:
    s, e = writer.block_range(b)
    return e - s


def _length_buckets(rows: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of ``rows`` (one block's) sorted by token count, so each batch pads to a length
    close to its texts' own; the sort is stable, so the plan is deterministic."""
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    return [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]


def _skipped(store: Store, name: str, modality: str, spec: str) -> FeatureResult:
    fs = store.features[name]
    return FeatureResult(name=name, modality=modality, spec=spec, n_items=fs.n_items,
                         n_encoded=0, n_errors=fs.n_errors, errors=fs.errors(),
                         bytes_written=_store_bytes(store, name), skipped=True)


# ---------------------------------------------------------------------------------------------
# text


def _extract_text(store, cat, name, enc, config, rank, world, progress) -> FeatureResult:
    t_start = time.perf_counter()
    texts = cat.texts
    empty = np.array([not t for t in texts], dtype=bool)
    lengths = np.zeros(len(texts), dtype=np.int64)
    nonempty = np.flatnonzero(~empty)
    for i in range(0, len(nonempty), 4096):  # the cheap pre-pass that fixes the ragged layout
        rows = nonempty[i : i + 4096]
        lengths[rows] = enc.count_tokens([texts[r] for r in rows])
    create_kwargs = dict(modality="text", dim=enc.dim, pooled_dim=enc.pooled_dim, lengths=lengths,
                         layers=enc.layers, block_rows=config.block_rows,
                         attrs={**_provenance(enc, config, cat, str(enc.device)),
                                "pooling": enc.pooling})
    writer, blocks = _open_writer(store, name, enc, config, rank, world, create_kwargs)
    if blocks is None:
        return _skipped(store, name, "text", enc.spec)
    if not np.array_equal(writer.lengths(0, writer.n_items), lengths):
        raise InvalidInputError(f"--resume: token counts of {name!r} differ from the stored "
                                "layout (tokenizer or texts changed); use --overwrite")
    n_layers, dim = len(writer.meta["layers"]), int(writer.meta["dim"])
    pdim = int(writer.meta.get("pooled_dim", dim))
    # length-bucketed batches inside each block: sorted by token count, cut every batch_size
    plan: list[tuple[int, np.ndarray]] = []
    todo: dict[int, int] = {}  # block -> non-empty rows not yet encoded
    for b in blocks:
        s, e = writer.block_range(b)
        rows = np.arange(s, e)[~empty[s:e]]
        todo[b] = len(rows)
        plan += [(b, batch) for batch in _length_buckets(rows, lengths, config.batch_size)]
    n_rows = sum(_block_len(writer, b) for b in blocks)
    progress.start(name, n_rows)

    bg = _Background()
    bufs: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # writer thread only

    def scatter(b: int, rows: np.ndarray, host: dict[str, torch.Tensor], event) -> None:
        if event is not None:
            event.synchronize()
        tok, mask = host["tokens"].numpy(), host["mask"].numpy()  # (B, T, L, D), (B, T)
        pooled = host["pooled"].numpy()  # (B, Dp)
        buf = bufs.setdefault(b, {})
        for j, r in enumerate(rows.tolist()):
            buf[r] = (tok[j][mask[j]], pooled[j])

    def write(b: int) -> None:
        s, e = writer.block_range(b)
        buf = bufs.pop(b, {})
        toks, pooled, errs = [], np.zeros((e - s, pdim), np.float32), []
        for r in range(s, e):
            if empty[r]:
                toks.append(np.zeros((0, n_layers, dim), np.float16))
                errs.append("empty text (no characters after stripping HTML)")
            else:
                t, p = buf[r]  # a KeyError here would be a bug: every non-empty row is encoded
                toks.append(t)
                pooled[r - s] = p
                errs.append("")
        writer.write_block(b, tokens=toks, pooled=pooled, errors=errs)

    ds = _TextBatches([r for _, r in plan], texts, enc.tokenize)
    loader = _loader(ds, config.num_workers, str(enc.device))
    encode_s = 0.0
    try:
        for b in blocks:
            if todo[b] == 0:  # nothing to encode (every text empty): write it now
                bg.submit("write", lambda b=b: write(b))
                progress.advance(name, _block_len(writer, b))
        for (b, rows), (_, batch) in zip(plan, loader, strict=True):
            t = time.perf_counter()
            out = enc.encode(batch)
            host, event = _to_host({"tokens": _f16(out["tokens"]), "mask": out["mask"],
                                    "pooled": out["pooled"].float()})
            encode_s += time.perf_counter() - t
            bg.submit("batch", lambda b=b, rows=rows, host=host, ev=event:
                      scatter(b, rows, host, ev))
            todo[b] -= len(rows)
            progress.advance(name, len(rows))
            if todo[b] == 0:
                bg.submit("write", lambda b=b: write(b))
                s, e = writer.block_range(b)
                progress.advance(name, int(empty[s:e].sum()))
    except BaseException:
        bg.close(raise_errors=False)  # the loop's error is the one to report
        raise
    bg.close()
    return _finish(store, writer, name, "text", enc.spec, rank, world, t_start, encode_s,
                   n_rows, bg.seconds, progress)


# ---------------------------------------------------------------------------------------------
# images


def _extract_image(store, cat, name, enc, config, rank, world, progress) -> FeatureResult:
    t_start = time.perf_counter()
    create_kwargs = dict(modality="image", dim=enc.dim, pooled_dim=enc.pooled_dim,
                         n_regions=enc.n_regions, grid=enc.grid, prefix_tokens=enc.prefix_tokens,
                         block_rows=config.block_rows,
                         attrs=_provenance(enc, config, cat, str(enc.device)))
    writer, blocks = _open_writer(store, name, enc, config, rank, world, create_kwargs)
    if blocks is None:
        return _skipped(store, name, "image", enc.spec)
    plan: list[tuple[int, np.ndarray]] = []
    for b in blocks:
        s, e = writer.block_range(b)
        for j in range(s, e, config.batch_size):
            plan.append((b, np.arange(j, min(j + config.batch_size, e))))
    n_rows = sum(len(r) for _, r in plan)
    progress.start(name, n_rows)
    n_reg, dim = int(writer.meta["n_regions"]), int(writer.meta["dim"])
    pdim = int(writer.meta.get("pooled_dim", dim))
    todo = {b: _block_len(writer, b) for b in blocks}
    bufs: dict[int, dict[str, Any]] = {}  # writer thread only

    def scatter(b: int, ok: np.ndarray, errs: dict[int, str],
                host: dict[str, torch.Tensor] | None, event) -> None:
        s, e = writer.block_range(b)
        if b not in bufs:
            bufs[b] = {"regions": np.zeros((e - s, n_reg, dim), np.float16),
                       "pooled": np.zeros((e - s, pdim), np.float32), "errors": [""] * (e - s)}
        buf = bufs[b]
        if host is not None:
            if event is not None:
                event.synchronize()
            buf["regions"][ok - s] = host["regions"].numpy()  # (B_ok, R, D)
            buf["pooled"][ok - s] = host["pooled"].numpy()  # (B_ok, Dp)
        for r, msg in errs.items():
            buf["errors"][r - s] = msg

    def write(b: int) -> None:
        buf = bufs.pop(b)
        writer.write_block(b, regions=buf["regions"], pooled=buf["pooled"], errors=buf["errors"])

    ds = _ImageBatches([r for _, r in plan], cat.images, enc.load_image, tuple(enc.input_shape))
    loader = _loader(ds, config.num_workers, str(enc.device))
    bg = _Background()
    encode_s = 0.0
    try:
        for (b, rows), (_, ok, pix, errs) in zip(plan, loader, strict=True):
            host = event = None
            if len(ok):
                t = time.perf_counter()
                out = enc.encode(pix)
                host, event = _to_host({"regions": _f16(out["regions"]),
                                        "pooled": out["pooled"].float()})
                encode_s += time.perf_counter() - t
            bg.submit("batch", lambda b=b, ok=ok, errs=errs, host=host, ev=event:
                      scatter(b, ok, errs, host, ev))
            progress.advance(name, len(rows))
            todo[b] -= len(rows)
            if todo[b] == 0:
                bg.submit("write", lambda b=b: write(b))
    except BaseException:
        bg.close(raise_errors=False)  # the loop's error is the one to report
        raise
    bg.close()
    return _finish(store, writer, name, "image", enc.spec, rank, world, t_start, encode_s,
                   n_rows, bg.seconds, progress)


# ---------------------------------------------------------------------------------------------


def _finish(store, writer, name, modality, spec, rank, world, t_start, encode_s, n_rows,
            write_s, progress) -> FeatureResult:
    if world > 1:  # every rank's blocks are written before rank 0 flips the status
        import torch.distributed as dist

        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, (n_rows, encode_s, write_s))
        n_rows = sum(x[0] for x in shares)  # the run's total; times: the slowest rank
        encode_s, write_s = max(x[1] for x in shares), max(x[2] for x in shares)
    wall = time.perf_counter() - t_start
    timings = {"wall_seconds": round(wall, 3), "encode_seconds": round(encode_s, 3),
               "write_seconds": round(write_s, 3), "items": n_rows,
               "items_per_second": round(n_rows / wall, 2) if wall else None,
               "world_size": world}
    _on_rank0(lambda: writer.finalize(timings=timings), rank, world)
    progress.finish(name)
    store.refresh()
    fs = store.features[name]
    return FeatureResult(name=name, modality=modality, spec=spec, n_items=fs.n_items,
                         n_encoded=n_rows, n_errors=fs.n_errors, errors=fs.errors(),
                         wall_seconds=wall, encode_seconds=encode_s,
                         bytes_written=_store_bytes(store, name))


def _store_bytes(store, name: str) -> int:
    from .features import _fs_and_path

    fs, p = _fs_and_path(store, f"features/{name}")
    try:
        if fs is None:
            return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fns in os.walk(p)
                       for f in fns)
        return int(fs.du(p))
    except (OSError, EmbedStoreError):
        return 0
