"""`fusion export`: a head or stack run packaged for serving, as a self-contained directory.

::

    model/                 a head run ("kind": "head")
      bundle.json          format, head config, classes, the text-layer selection, and for each
                           modality the feature set's full metadata (encoder provenance with the
                           weights' sha256, layers, preprocessing, the catalog's text columns)
      weights/fold*.safetensors   the run's fold models (seed{s}/fold{i} with several seeds)
      code/<file>.py       the head's source when it is a user file (loading it needs trust)

    model/                 a stack run ("kind": "stack")
      bundle.json          format, classes, and "stack": the stack config that applying it needs
                           (stacker, params, holdout scheme, sources' names, pooled sets)
      weights/fold*.{json,lgb.txt,xgb.json,npz,safetensors,...}   the stack's saved stackers
      sources/<i>/         source run i as a bundle of its own (head or stack), in stack order

The encoders' weights are not copied: the bundle names them (spec + sha256) and
:class:`fusion.predictor.Predictor` checks the digest of what it loads. Nothing in a bundle is
pickled. Written into ``<out>.part`` and renamed, so a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from embedstore import Store, open_store

from .predict import PredictError, is_builtin_head, run_head_config, weight_files
from .rundir import Run, load_run
from .stack.apply import load_stack_models, source_path

__all__ = ["BUNDLE_FORMAT", "BUNDLE_FILE", "export_bundle", "read_bundle"]

BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
#: feature-set attributes that describe one store's rows, not the features' identity
_ROW_FIELDS = ("n_items", "n_tokens", "status", "generation", "created", "block_rows",
               "token_chunk", "timings", "throughput", "errors", "n_errors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _code_file(spec: str) -> Path | None:
    """The file of a ``path/to/file.py:Class`` spec, else None (a module or entry point)."""
    path = spec.rsplit(":", 1)[0]
    return Path(path) if path.endswith(".py") else None


def export_bundle(run: Run | str | os.PathLike, out: str | os.PathLike, *,
                  store: Store | str | os.PathLike | None = None,
                  overwrite: bool = False) -> Path:
    """Package head or stack run ``run`` into directory ``out``; ``store`` (default: the run's
    recorded store URL) supplies the feature sets' full metadata."""
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out)
    if out.exists() and not overwrite:
        raise PredictError(f"{out} exists; pass --overwrite or choose another --out")
    kind = run.config.get("kind")
    if kind not in ("train", "stack"):
        raise PredictError(f"run {run.path.name!r} is a {kind!r} run; `fusion export` packages "
                           "head runs (`fusion train`) and stacks of them (`fusion stack`)")
    store = store if isinstance(store, Store) else open_store(
        store if store is not None else run.config["store"]["url"])
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    doc = (_write_stack(run, tmp, store) if kind == "stack" else _write_head(run, tmp, store))
    (tmp / BUNDLE_FILE).write_text(json.dumps(doc, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


#: what applying a stack needs of its run config (fusion.stack.apply)
_STACK_KEYS = ("kind", "name", "stacker", "features", "params", "seed", "pooled_dims",
               "pooled_sets", "source_k", "holdout_scheme", "classes")


def _write_stack(run: Run, tmp: Path, store: Store) -> dict[str, Any]:
    """A stack bundle: the stackers' files, and each source run as a bundle under sources/."""
    load_stack_models(run)  # refuses a stack whose models cannot be reloaded, before copying
    for f in (run.path / "weights").iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / "weights" / f.name)
    for i, src in enumerate(run.config["sources"]):
        export_bundle(source_path(run, src), tmp / "sources" / str(i), store=store)
    cfg = {k: run.config.get(k) for k in _STACK_KEYS}
    cfg["sources"] = [{"name": s["name"], "path": f"sources/{i}"}
                      for i, s in enumerate(run.config["sources"])]
    return {"format": BUNDLE_FORMAT, "kind": "stack", "run": run.config.get("name"),
            "classes": list(run.config["classes"]), "stack": cfg,
            "store": run.config.get("store")}


def _write_head(run: Run, tmp: Path, store: Store) -> dict[str, Any]:
    """A head bundle: fold models, head config, feature metadata, user code."""
    features: dict[str, Any] = {}
    for mod, rec in (run.config.get("features") or {}).items():
        if rec is None:
            features[mod] = None
            continue
        if rec["name"] not in store.features:
            raise PredictError(f"store {store.url!r} lacks feature set {rec['name']!r} of run "
                               f"{run.path.name!r}; pass --store with the run's store")
        meta = dict(store.features[rec["name"]].meta)
        features[mod] = {"name": rec["name"],
                         "meta": {k: v for k, v in meta.items() if k not in _ROW_FIELDS}}
    hc = run_head_config(run)
    spec = hc["head"]
    code: dict[str, Any] = {"head": spec, "builtin": is_builtin_head(spec), "source": None,
                            "sha256": None}
    files = weight_files(run.path / "weights")
    if not files:
        raise PredictError(f"run {run.path.name!r} has no weights/fold*.safetensors to export")
    for f in files:
        dst = tmp / "weights" / f.relative_to(run.path / "weights")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    src = None if code["builtin"] else _code_file(spec)
    if src is not None and src.is_file():
        (tmp / "code").mkdir()
        shutil.copy2(src, tmp / "code" / src.name)
        code.update(source=f"code/{src.name}", sha256=_sha256(src),
                    head=f"code/{src.name}:{spec.rsplit(':', 1)[1]}")
    return {"format": BUNDLE_FORMAT, "kind": "head", "run": run.config.get("name"),
            "head_config": {**hc, "head": spec}, "code": code,
            "classes": list(run.config["classes"]),
            "layers": (run.config.get("train") or {}).get("layers"),
            "features": features,
            "store": run.config.get("store")}


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """bundle.json of the bundle at ``path`` (one clear line when it is not one)."""
    f = Path(path) / BUNDLE_FILE
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError:
        raise PredictError(f"{path} is not a bundle (no {BUNDLE_FILE}); make one with "
                           "`fusion export RUN --out DIR`") from None
    except json.JSONDecodeError as e:
        raise PredictError(f"{f} is not valid JSON ({e}); re-export the bundle") from None
    if doc.get("format") != BUNDLE_FORMAT:
        raise PredictError(f"{f}: bundle format {doc.get('format')!r}, this version reads "
                           f"{BUNDLE_FORMAT}; re-export it or upgrade embedstore-fusion")
    return doc
