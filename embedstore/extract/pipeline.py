"""The extraction run: checks, store and writers, then one loop per feature set.

The loop, in order of importance for speed: DataLoader workers tokenise texts and decode/resize
images; text batches are bucketed by length inside each write block (less padding);
``torch.inference_mode`` (inside the encoders); AMP + ``channels_last`` on GPU (inside the
encoders); the device->host copy is started non-blocking into pinned memory and waited for on a
background thread, which also scatters rows into block buffers and writes them to Zarr, so the
encoder never waits for storage; every write is a whole block of chunks.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from importlib import metadata
from typing import Any

from ..catalog import Catalog, read_catalog
from ..create import create_store
from ..encoders import create_encoder
from ..errors import ExtractionError, InvalidInputError, StoreNotFoundError
from ..format import FAILED
from ..store import Store, open_store
from .batches import Background, make_loader
from .checks import check_feature_slot, check_ids, check_resumable
from .config import ExtractConfig
from .distributed import Ranks, resolve_device
from .jobs import make_job
from .progress import FeatureResult, Progress

__all__ = ["extract", "extract_catalog"]

_VERSIONED = ("embedstore-fusion", "torch", "transformers", "timm", "open_clip_torch", "zarr")


def extract(catalog: str | os.PathLike, store_url: str | os.PathLike,
            config: ExtractConfig | None = None, *,
            progress: Progress | None = None) -> list[FeatureResult]:
    """Extract the configured encoders into ``store_url`` (created when missing) and return
    one :class:`FeatureResult` per feature set.

    Raises an :class:`EmbedStoreError` before anything is written for bad options, catalogs,
    specs, mismatched stores or existing feature sets; :class:`ExtractionError` (with
    ``.results``) after a finished run whose failed-row share exceeds ``max_error_rate``.
    """
    config = config or ExtractConfig()
    progress = progress or Progress()
    config.check()
    store_url = os.fspath(store_url)
    cat = read_catalog(catalog, id_col=config.id_col, text_cols=config.text_cols,
                       image_col=config.image_col, label_col=config.label_col,
                       need_text=bool(config.text), need_image=bool(config.image),
                       group_col=config.group_col or None)
    return extract_catalog(cat, store_url, config, progress=progress)


def extract_catalog(cat: Catalog, store_url: str | os.PathLike, config: ExtractConfig, *,
                    progress: Progress | None = None) -> list[FeatureResult]:
    """:func:`extract` on a catalog already read (e.g. the rows of one segment)."""
    config.check()
    with Ranks(resolve_device(config.device)) as ranks:
        return _run(cat, os.fspath(store_url), config, ranks, progress or Progress())


def _run(cat: Catalog, url: str, config: ExtractConfig, ranks: Ranks,
         progress: Progress) -> list[FeatureResult]:
    so = config.storage_options
    try:  # read-only until everything is checked: bad input never changes a store
        existing: Store | None = open_store(url, mode="r", storage_options=so)
    except StoreNotFoundError:
        existing = None
    if existing is not None:
        check_ids(existing, cat, url)
        _check_grouping(existing, cat, config, url)
    if config.num_workers and config.text:
        # workers are forked after the token-count pass: keep the Rust tokenizer from
        # starting its thread pool (it would warn on stderr and disable itself in every worker)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoders = []
    for modality, spec in (("text", config.text), ("image", config.image)):
        if spec:
            enc = create_encoder(spec, modality=modality, layers=config.layers,
                                 max_length=config.max_length, image_size=config.image_size,
                                 device=ranks.device, precision=config.precision,
                                 seed=config.seed)
            name = (config.text_name if modality == "text" else config.image_name) or enc.name
            encoders.append((modality, name, enc))
    if len(encoders) == 2 and encoders[0][1] == encoders[1][1]:
        raise InvalidInputError(f"text and image would both be stored as {encoders[0][1]!r}; "
                                "give them different --text-name/--image-name")
    if existing is not None:
        for _, name, enc in encoders:
            check_feature_slot(existing, name, enc, config)

    def create() -> None:
        if existing is None:
            create_store(url, cat.ids, cat.labels, folds=config.folds, seed=config.seed,
                         holdout=config.holdout, source=cat.path, storage_options=so,
                         groups=cat.groups, group_col=config.group_col or None)

    ranks.barrier()  # every rank has looked at the store before rank 0 creates it
    ranks.on_rank0(create)
    store = open_store(url, mode="r+", storage_options=so)
    results = [_extract_one(store, cat, modality, name, enc, config, ranks, progress)
               for modality, name, enc in encoders]
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


def _check_grouping(store: Store, cat: Catalog, config: ExtractConfig, url: str) -> None:
    """``--group-col`` into an existing store: its folds were fixed at creation, so the
    catalog's groups must be the ones they were made with (never silently ignored)."""
    if not config.group_col:
        return
    theirs = store.fold_info.get("group_col") if store.fold_info.get("grouped") else None
    if theirs != config.group_col:
        made = f"by groups from {theirs!r}" if theirs else "without groups"
        raise InvalidInputError(f"store {url!r} was created {made}, not --group-col "
                                f"{config.group_col!r}; folds are fixed when a store is created: "
                                "drop --group-col or create a new store")
    same = store.groups is not None and store.groups.tolist() == list(cat.groups or [])
    if not same:
        raise InvalidInputError(f"catalog column {config.group_col!r} differs from the groups "
                                f"store {url!r} was created with; drop --group-col or create a "
                                "new store")


def _extract_one(store: Store, cat: Catalog, modality: str, name: str, enc,
                 config: ExtractConfig, ranks: Ranks, progress: Progress) -> FeatureResult:
    """Encode this rank's share of the blocks still to do of one feature set."""
    t_start = time.perf_counter()
    gallery = modality == "image" and (config.gallery or cat.gallery or _is_gallery(
        store, name, config))
    job = make_job(modality, cat, enc, config.batch_size, gallery=gallery)
    create_kwargs = {**job.create_kwargs(_provenance(enc, config, cat, str(enc.device))),
                     "block_rows": config.block_rows, "codec": config.codec}
    writer, blocks = _open_writer(store, name, enc, config, ranks, create_kwargs)
    if blocks is None:
        fs = store.features[name]
        return FeatureResult(name=name, modality=modality, spec=enc.spec, n_items=fs.n_items,
                             n_encoded=0, **_outcome(fs),
                             bytes_written=store.location.nbytes(f"features/{name}"),
                             skipped=True)
    job.bind(writer, name)
    plan = job.plan(blocks)
    todo = Counter(b for b, _ in plan)  # block -> batches not yet encoded
    planned: Counter[int] = Counter()  # block -> rows in its batches
    for b, rows in plan:
        planned[b] += len(rows)
    sizes = {b: writer.block_range(b)[1] - writer.block_range(b)[0] for b in blocks}
    n_rows = sum(sizes.values())
    progress.start(name, n_rows)
    bg = Background()
    loader = make_loader(job.dataset(plan), config.num_workers, str(enc.device))
    encode_s = 0.0
    try:
        for b in blocks:
            if todo[b] == 0:  # nothing to encode (every text empty): write it now
                bg.submit("write", lambda b=b: job.write(b))
                progress.advance(name, sizes[b])
        for (b, rows), item in zip(plan, loader, strict=True):
            t = time.perf_counter()
            task = job.encode(b, rows, item)
            encode_s += time.perf_counter() - t
            bg.submit("batch", task)
            todo[b] -= 1
            progress.advance(name, len(rows))
            if todo[b] == 0:
                bg.submit("write", lambda b=b: job.write(b))
                if sizes[b] > planned[b]:  # rows with nothing to encode (empty texts)
                    progress.advance(name, sizes[b] - planned[b])
    except BaseException:
        bg.close(raise_errors=False)  # the loop's error is the one to report
        raise
    bg.close()
    # every rank's blocks are written before rank 0 flips the status
    shares = ranks.gather((n_rows, encode_s, bg.seconds))
    n_rows = sum(x[0] for x in shares)  # the run's total; times: the slowest rank
    encode_s, write_s = max(x[1] for x in shares), max(x[2] for x in shares)
    wall = time.perf_counter() - t_start
    timings = {"wall_seconds": round(wall, 3), "encode_seconds": round(encode_s, 3),
               "write_seconds": round(write_s, 3), "items": n_rows,
               "items_per_second": round(n_rows / wall, 2) if wall else None,
               "world_size": ranks.world}
    ranks.on_rank0(lambda: writer.finalize(timings=timings))
    progress.finish(name)
    store.refresh()
    fs = store.features[name]
    return FeatureResult(name=name, modality=modality, spec=enc.spec, n_items=fs.n_items,
                         n_encoded=n_rows, **_outcome(fs),
                         wall_seconds=wall, encode_seconds=encode_s,
                         bytes_written=store.location.nbytes(f"features/{name}"))


def _is_gallery(store: Store, name: str, config: ExtractConfig) -> bool:
    """A --resume of a gallery set stays a gallery (whatever this catalog's items hold)."""
    return bool(config.resume and not config.overwrite and name in store.features
                and store.features[name].meta.get("gallery"))


def _outcome(fs) -> dict[str, Any]:
    """Failed rows (with their reasons) and absent rows of a finished set."""
    failed = fs.presence() == FAILED
    errors = {r: why for r, why in fs.errors().items() if failed[r]}
    return {"n_errors": int(failed.sum()), "errors": errors,
            "n_absent": fs.presence_counts()["absent"]}


def _open_writer(store: Store, name: str, enc, config: ExtractConfig, ranks: Ranks,
                 create_kwargs: dict) -> tuple[Any, list[int] | None]:
    """Create or reopen the writer on rank 0, then on every rank. Returns ``(writer, blocks)``:
    this rank's share of the blocks still to do, or None when an already complete set was
    resumed (nothing to do)."""
    holder: dict[str, Any] = {}

    def open_on_rank0() -> list[int] | None:
        exists = name in store.features
        if exists and config.resume and not config.overwrite:
            writer = store.feature_writer(name)
            check_resumable(writer.meta, name, enc)
            if writer.meta["status"] == "complete":
                holder["writer"] = writer
                return None
        else:
            writer = store.create_feature(name, overwrite=config.overwrite, **create_kwargs)
        holder["writer"] = writer
        return writer.pending_blocks()  # read once, here: ranks must agree on the split

    pending = ranks.on_rank0(open_on_rank0)
    if ranks.rank == 0:
        writer = holder["writer"]
    else:
        store.refresh()
        writer = store.feature_writer(name)
    if pending is None:
        return writer, None
    return writer, ranks.share(pending)


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


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
