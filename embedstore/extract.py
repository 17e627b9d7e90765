"""`embedstore extract`: run encoders once over a catalog and cache their full outputs.

The loop, in order of importance for speed: DataLoader workers tokenise texts and decode/resize
images; text batches are bucketed by length inside each write block (less padding);
``torch.inference_mode``; AMP + ``channels_last`` on GPU (inside the encoders); device->host
copies and Zarr writes on a background thread, so the encoder never waits for storage; every
write is a whole block of chunks.

Rows are written in blocks (see :mod:`embedstore.features`); under ``torchrun`` each rank
takes every ``world``-th block, rank 0 creates the store and the feature sets and finalises.
"""

from __future__ import annotations

import os
import platform
import time
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

__all__ = ["ExtractConfig", "FeatureResult", "extract", "Progress"]


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
    name: str
    modality: str
    spec: str
    n_items: int
    n_encoded: int
    n_errors: int
    errors: dict[int, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    encode_seconds: float = 0.0
    bytes_written: int = 0
    skipped: bool = False

    @property
    def items_per_second(self) -> float:
        return self.n_encoded / self.wall_seconds if self.wall_seconds else 0.0


class Progress:
    """Callbacks the CLI implements (rich progress bar); the library never prints."""

    def start(self, name: str, total: int) -> None: ...
    def advance(self, name: str, n: int) -> None: ...
    def finish(self, name: str) -> None: ...


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA device is available; use --device "
                                "cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidInputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _dist() -> tuple[int, int]:
    """(rank, world) under torchrun, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


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
# datasets run in DataLoader workers


class _TextBatches(torch.utils.data.Dataset):
    """Item = one length-bucketed batch of rows -> tokenised tensors (in a worker)."""

    def __init__(self, batches: list[np.ndarray], texts: Sequence[str], tokenize: Callable):
        self.batches, self.texts, self.tokenize = batches, texts, tokenize

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        rows = self.batches[i]
        return rows, self.tokenize([self.texts[r] for r in rows])


class _ImageBatches(torch.utils.data.Dataset):
    """Item = one batch of rows -> (rows, stacked pixels of the good rows, errors by row)."""

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
        stacked = torch.stack(pix) if pix else torch.zeros((0,) + self.shape)
        return rows, np.array(ok, dtype=np.int64), stacked, errs


def _loader(ds, num_workers: int):
    return torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if num_workers else None)


# ---------------------------------------------------------------------------------------------


def extract(catalog: str | os.PathLike, store_url: str | os.PathLike,
            config: ExtractConfig = ExtractConfig(), *,
            progress: Progress | None = None) -> list[FeatureResult]:
    """Extract the configured encoders into ``store_url``. Everything that can be checked is
    checked before any encoding: catalog columns and ids, encoder specs, existing feature sets.
    """
    from .encoders import create_encoder

    progress = progress or Progress()
    if not config.text and not config.image:
        raise InvalidInputError("nothing to extract: pass --text SPEC and/or --image SPEC")
    if not 0 <= config.max_error_rate <= 1:
        raise InvalidInputError(f"--max-error-rate must be in [0, 1], got {config.max_error_rate}")
    rank, world = _dist()
    store_url = os.fspath(store_url)
    cat = read_catalog(catalog, id_col=config.id_col, text_cols=config.text_cols,
                       image_col=config.image_col, label_col=config.label_col,
                       need_text=bool(config.text), need_image=bool(config.image))
    device = _resolve_device(config.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    encoders = []
    for modality, spec in (("text", config.text), ("image", config.image)):
        if spec:
            enc = create_encoder(spec, modality=modality, layers=config.layers,
                                 max_length=config.max_length, image_size=config.image_size,
                                 device=device, precision=config.precision, seed=config.seed)
            name = (config.text_name if modality == "text" else config.image_name) or enc.name
            encoders.append((modality, name, enc))
    store = _open_or_create(store_url, cat, config, rank, world)
    for _, name, _ in encoders:
        _check_feature_slot(store, name, config)
    results = []
    for modality, name, enc in encoders:
        fn = _extract_text if modality == "text" else _extract_image
        results.append(fn(store, cat, name, enc, config, rank, world, progress))
    for r in results:
        if r.n_items and r.n_errors / r.n_items > config.max_error_rate:
            raise ExtractionError(
                f"feature set {r.name!r}: {r.n_errors}/{r.n_items} rows failed "
                f"({r.n_errors / r.n_items:.1%} > --max-error-rate {config.max_error_rate:.1%}); "
                f"first: {next(iter(r.errors.items()), None)}. Finished rows are kept; fix the "
                "inputs and re-extract the failed rows, or raise --max-error-rate")
    return results


def _open_or_create(url: str, cat: Catalog, config: ExtractConfig, rank: int,
                    world: int) -> Store:
    so = config.storage_options
    if rank == 0:
        try:
            store = open_store(url, mode="r+", storage_options=so)
        except StoreNotFoundError:
            store = create_store(url, cat.ids, cat.labels, folds=config.folds, seed=config.seed,
                                 holdout=config.holdout, source=cat.path, storage_options=so)
        _barrier(world)
    else:
        _barrier(world)
        store = open_store(url, mode="r+", storage_options=so)
    if store.n_items != len(cat) or store.ids.tolist() != cat.ids:
        theirs = set(store.ids.tolist())
        extra = [i for i in cat.ids if i not in theirs][:3]
        raise InvalidInputError(
            f"catalog {cat.path!r} does not match store {url!r}: {len(cat)} ids vs "
            f"{store.n_items} in the store (e.g. not in the store: {extra}); a store holds one "
            "dataset in one id order: use a new --store for this catalog")
    return store


def _check_feature_slot(store: Store, name: str, config: ExtractConfig) -> None:
    if name not in store.features or config.overwrite:
        return
    fs = store.features[name]
    if fs.status == "complete" and not config.resume:
        raise FeatureExistsError(f"feature set {name!r} is already complete in {store.url!r}; "
                                 "pass --overwrite to replace it or --text-name/--image-name "
                                 "to store it under another name")
    if fs.status == "writing" and not config.resume:
        raise FeatureExistsError(f"feature set {name!r} in {store.url!r} is incomplete "
                                 f"({fs.n_done}/{fs.n_items} rows); pass --resume to finish it "
                                 "or --overwrite to start again")


def _open_writer(store, name, enc, config, rank, world, create_kwargs):
    """Create (rank 0) or reopen the writer; returns (writer, skipped)."""
    exists = name in store.features
    if rank == 0:
        if exists and config.resume and not config.overwrite:
            writer = store.feature_writer(name)
            stored_spec = writer.meta.get("encoder", {}).get("spec")
            if stored_spec != enc.spec:
                raise InvalidInputError(
                    f"--resume: feature set {name!r} was started with {stored_spec!r}, not "
                    f"{enc.spec!r}; resume with the same spec or use --overwrite")
        else:
            writer = store.create_feature(name, overwrite=config.overwrite, **create_kwargs)
        _barrier(world)
    else:
        _barrier(world)
        store.refresh()
        writer = store.feature_writer(name)
    return writer


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


class _AsyncWriter:
    """One background thread doing host conversion + Zarr writes; at most 2 blocks in flight."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedstore-writer")
        self.pending: list[Future] = []
        self.seconds = 0.0

    def submit(self, fn: Callable, *args: Any) -> None:
        while len(self.pending) >= 2:
            self.pending.pop(0).result()

        def timed() -> None:
            t = time.perf_counter()
            fn(*args)
            self.seconds += time.perf_counter() - t

        self.pending.append(self.pool.submit(timed))

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def _blocks_for_rank(writer, rank: int, world: int) -> list[int]:
    mine = [b for b in range(writer.n_blocks) if b % world == rank]
    return writer.pending_blocks(mine)


def _extract_text(store, cat, name, enc, config, rank, world, progress) -> FeatureResult:
    t_start = time.perf_counter()
    texts = cat.texts
    empty = np.array([not t for t in texts])
    lengths = np.zeros(len(texts), dtype=np.int64)
    nonempty = np.flatnonzero(~empty)
    for i in range(0, len(nonempty), 4096):  # the cheap pre-pass that fixes the ragged layout
        rows = nonempty[i : i + 4096]
        lengths[rows] = enc.count_tokens([texts[r] for r in rows])
    create_kwargs = dict(modality="text", dim=enc.dim, pooled_dim=enc.pooled_dim, lengths=lengths, layers=enc.layers,
                         block_rows=config.block_rows,
                         attrs={**_provenance(enc, config, cat, str(enc.device)),
                                "pooling": enc.pooling})
    writer = _open_writer(store, name, enc, config, rank, world, create_kwargs)
    if not np.array_equal(writer._lengths, lengths):
        raise InvalidInputError(f"--resume: token counts of {name!r} differ from the stored "
                                "layout (tokenizer or texts changed); use --overwrite")
    blocks = _blocks_for_rank(writer, rank, world)
    n_rows = sum(writer.block_range(b)[1] - writer.block_range(b)[0] for b in blocks)
    progress.start(name, n_rows)
    # length-bucketed batches inside each block (sorted by length, cut every batch_size rows)
    plan: list[tuple[int, np.ndarray]] = []
    for b in blocks:
        s, e = writer.block_range(b)
        rows = np.arange(s, e)
        rows = rows[~empty[s:e]]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        for j in range(0, len(rows), config.batch_size):
            plan.append((b, rows[j : j + config.batch_size]))
    ds = _TextBatches([r for _, r in plan], texts, enc.tokenize)
    out_w = _AsyncWriter()
    encode_s = 0.0
    block_buf: dict[int, dict[int, Any]] = {b: {} for b in blocks}
    remaining = {b: int((~empty[slice(*writer.block_range(b))]).sum()) for b in blocks}

    def flush(b: int) -> None:
        s, e = writer.block_range(b)
        buf = block_buf.pop(b)
        n_l, d = len(writer.meta["layers"]), writer.meta["dim"]
        pd = writer.meta.get("pooled_dim", d)

        def write() -> None:
            toks, pooled, errs = [], np.zeros((e - s, pd), np.float32), []
            for r in range(s, e):
                if r in buf:
                    t, p = buf[r]
                    toks.append(t)
                    pooled[r - s] = p
                    errs.append("")
                else:
                    toks.append(np.zeros((0, n_l, d), np.float16))
                    errs.append("empty text (no characters after stripping HTML)")
            writer.write_block(b, tokens=toks, pooled=pooled, errors=errs)

        out_w.submit(write)
        progress.advance(name, e - s)

    try:
        for b in [b for b in blocks if remaining[b] == 0]:
            flush(b)
        for (b, rows), (_, batch) in zip(plan, _loader(ds, config.num_workers), strict=True):
            t = time.perf_counter()
            out = enc.encode(batch)
            tokens = out["tokens"].to("cpu", torch.float16)  # (B, T, L, D)
            mask = out["mask"].to("cpu")
            pooled = out["pooled"].to("cpu", torch.float32)
            encode_s += time.perf_counter() - t
            for j, r in enumerate(rows.tolist()):
                m = mask[j]
                block_buf[b][r] = (tokens[j][m].numpy(), pooled[j].numpy())
            remaining[b] -= len(rows)
            if remaining[b] == 0:
                flush(b)
    finally:
        out_w.close()
    return _finish(store, writer, name, "text", enc.spec, rank, world, t_start, encode_s,
                   n_rows, out_w.seconds, progress)


def _extract_image(store, cat, name, enc, config, rank, world, progress) -> FeatureResult:
    t_start = time.perf_counter()
    create_kwargs = dict(modality="image", dim=enc.dim, pooled_dim=enc.pooled_dim, n_regions=enc.n_regions, grid=enc.grid,
                         prefix_tokens=enc.prefix_tokens, block_rows=config.block_rows,
                         attrs=_provenance(enc, config, cat, str(enc.device)))
    writer = _open_writer(store, name, enc, config, rank, world, create_kwargs)
    blocks = _blocks_for_rank(writer, rank, world)
    plan: list[tuple[int, np.ndarray]] = []
    for b in blocks:
        s, e = writer.block_range(b)
        for j in range(s, e, config.batch_size):
            plan.append((b, np.arange(j, min(j + config.batch_size, e))))
    n_rows = sum(len(r) for _, r in plan)
    progress.start(name, n_rows)
    shape = tuple(enc.input_shape) if hasattr(enc, "input_shape") else (3, 224, 224)
    ds = _ImageBatches([r for _, r in plan], cat.images, enc.load_image, shape)
    out_w = _AsyncWriter()
    encode_s = 0.0
    r_, d = writer.meta["n_regions"], writer.meta["dim"]
    pd = writer.meta.get("pooled_dim", d)
    bufs: dict[int, dict[str, Any]] = {}
    remaining = {b: writer.block_range(b)[1] - writer.block_range(b)[0] for b in blocks}

    def flush(b: int) -> None:
        buf = bufs.pop(b)

        def write() -> None:
            writer.write_block(b, regions=buf["regions"], pooled=buf["pooled"],
                               errors=buf["errors"])

        out_w.submit(write)

    try:
        for (b, rows), (_, ok, pix, errs) in zip(plan, _loader(ds, config.num_workers),
                                                 strict=True):
            s, e = writer.block_range(b)
            if b not in bufs:
                bufs[b] = {"regions": np.zeros((e - s, r_, d), np.float16),
                           "pooled": np.zeros((e - s, pd), np.float32),
                           "errors": [""] * (e - s)}
            buf = bufs[b]
            if len(ok):
                t = time.perf_counter()
                out = enc.encode(pix)
                regions = out["regions"].to("cpu", torch.float16).numpy()
                pooled = out["pooled"].to("cpu", torch.float32).numpy()
                encode_s += time.perf_counter() - t
                buf["regions"][ok - s] = regions
                buf["pooled"][ok - s] = pooled
            for r, msg in errs.items():
                buf["errors"][r - s] = msg
            progress.advance(name, len(rows))
            remaining[b] -= len(rows)
            if remaining[b] == 0:
                flush(b)
    finally:
        out_w.close()
    return _finish(store, writer, name, "image", enc.spec, rank, world, t_start, encode_s,
                   n_rows, out_w.seconds, progress)


def _finish(store, writer, name, modality, spec, rank, world, t_start, encode_s, n_rows,
            write_s, progress) -> FeatureResult:
    wall = time.perf_counter() - t_start
    _barrier(world)
    if rank == 0:
        timings = {"wall_seconds": round(wall, 3), "encode_seconds": round(encode_s, 3),
                   "write_seconds": round(write_s, 3), "items": n_rows,
                   "items_per_second": round(n_rows / wall, 2) if wall else None,
                   "world_size": world}
        writer.finalize(timings=timings)
    _barrier(world)
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
