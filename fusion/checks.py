"""Property suite every fusion head must pass (``fusion check-head``, tests, user heads).

The checks run on a small random batch with variable text lengths (one text is empty, and so
absent, and one item has no image: ``text_present`` / ``image_present``), in float64 by default
so that "unchanged" can be tested to 1e-8 rather than to float32 noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fusion.batch import Batch
from fusion.checkbatch import (
    gallery_of,
    keep_only,
    pad_more,
    permute_patches,
    random_batch,
    redraw,
)
from fusion.heads.base import BATCH_FIELDS, MODALITIES, FusionHead
from fusion.heads.registry import create_head

__all__ = ["CheckResult", "check_head", "random_batch"]

@dataclass(frozen=True)
class CheckResult:
    """One property: its name, whether it held, a one-line explanation, and ``value``: the
    largest deviation measured (max abs difference of logits or weights), or for the
    ``contract``/``gradients`` checks the number of offending items."""

    name: str
    passed: bool
    detail: str
    value: float


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


def _build(
    head: str | type | Callable[..., FusionHead] | FusionHead,
    dims: dict[str, int],
    options: Mapping[str, Any],
) -> FusionHead:
    if isinstance(head, FusionHead):
        return copy.deepcopy(head)
    return create_head(head, **dims, **options)


def check_head(
    head: str | type | Callable[..., FusionHead] | FusionHead,
    *,
    text_dim: int = 16,
    image_dim: int = 12,
    num_classes: int = 5,
    text_layers: int = 2,
    image_prefix: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    atol: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[CheckResult]:
    """Run the property suite on ``head`` (a name/spec, class, factory, or built head; a built
    head is copied and its own dims are used) and return one :class:`CheckResult` per property:
    contract, output, needs, gradients, batch_independence, padding, region_permutation,
    image_order (galleries), attention, absent_values, missing_text, missing_image (the last
    two only for heads of both modalities). ``options`` go to :func:`~fusion.heads.create_head` (ignored for a built head).
    Nothing raises: a check that crashes fails with the exception as its detail."""
    tol = atol if atol is not None else (1e-8 if dtype == torch.float64 else 1e-4)
    dims = {
        "text_dim": text_dim,
        "image_dim": image_dim,
        "num_classes": num_classes,
        "text_layers": text_layers,
    }
    if isinstance(head, FusionHead):
        dims = {k: getattr(head, k, v) for k, v in dims.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = _build(head, dims, options or {}).to(dtype)
        except Exception as exc:
            return [CheckResult("construct", False, f"{type(exc).__name__}: {exc}", math.nan)]
        batch = random_batch(**dims, image_prefix=image_prefix, seed=seed, dtype=dtype,
                             absent=True)
        g = torch.Generator().manual_seed(seed + 1)
        suite = _Suite(model, batch, g, tol, dtype)
        return [suite.run(name, fn) for name, fn in suite.checks()]


class _Suite:
    def __init__(
        self, head: FusionHead, batch: Batch, g: torch.Generator, tol: float, dtype: torch.dtype
    ) -> None:
        self.head, self.batch, self.g, self.tol = head, batch, g, tol
        self.grad_floor = 1e-10 if dtype == torch.float64 else 1e-6  # relative round-off level
        self.k = int(getattr(head, "num_classes", 0))

    def checks(self) -> list[tuple[str, Callable[[], tuple[bool, str, float]]]]:
        return [
            ("contract", self.contract),
            ("output", self.output),
            ("needs", self.needs),
            ("gradients", self.gradients),
            ("batch_independence", self.batch_independence),
            ("padding", self.padding),
            ("region_permutation", self.region_permutation),
            ("image_order", self.image_order),
            ("attention", self.attention),
            ("absent_values", self.absent_values),
            ("missing_text", lambda: self.one_modality_left("text")),
            ("missing_image", lambda: self.one_modality_left("image")),
        ]

    def run(self, name: str, fn: Callable[[], tuple[bool, str, float]]) -> CheckResult:
        try:
            passed, detail, value = fn()
        except Exception as exc:
            return CheckResult(name, False, f"raised {type(exc).__name__}: {exc}", math.nan)
        return CheckResult(name, passed, detail, value)

    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        self.head.eval()
        return self.head(batch)

    def _within(self, what: str, dev: float) -> tuple[bool, str, float]:
        ok = dev <= self.tol
        verdict = "unchanged" if ok else "CHANGED"
        return ok, f"{what}: logits {verdict} (max abs diff {dev:.3g}, tol {self.tol:g})", dev

    def contract(self) -> tuple[bool, str, float]:
        problems = []
        mods = tuple(getattr(self.head, "modalities", ()))
        if not mods or not set(mods) <= set(MODALITIES):
            problems.append(f"modalities={mods!r} must be a non-empty subset of {MODALITIES}")
        needs = frozenset(getattr(self.head, "needs", ()))
        if not needs or not needs <= BATCH_FIELDS:
            problems.append(
                f"needs={sorted(needs)} must be a non-empty subset of {sorted(BATCH_FIELDS)}"
            )
        if not problems:
            return True, f"modalities={mods}, needs={sorted(needs)}", 0.0
        return False, "; ".join(problems), float(len(problems))

    def output(self) -> tuple[bool, str, float]:
        b = self.batch.size
        for mode in ("eval", "train"):
            self.head.train(mode == "train")
            with torch.no_grad():
                out = self.head(self.batch)
            if tuple(out.shape) != (b, self.k):
                return (
                    False,
                    f"{mode} logits have shape {tuple(out.shape)}, want {(b, self.k)}",
                    math.nan,
                )
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                return (
                    False,
                    f"{bad} non-finite logit(s) in {mode} mode (empty text in batch?)",
                    float(bad),
                )
        return True, f"shape {(b, self.k)}, finite in train and eval mode (one text is empty)", 0.0

    def needs(self) -> tuple[bool, str, float]:
        needs = frozenset(self.head.needs)
        try:
            reduced = self.logits(keep_only(self.batch, needs))
        except Exception as exc:
            return (
                False,
                f"with only needs={sorted(needs)} set: {type(exc).__name__}: {exc}",
                math.inf,
            )
        return self._within(
            f"other fields set to None (needs={sorted(needs)})",
            _max_diff(reduced, self.logits(self.batch)),
        )

    def gradients(self) -> tuple[bool, str, float]:
        # Eval mode: dropout could zero a unit for every sample of this tiny batch and fake a
        # dead parameter.
        self.head.eval()
        self.head.zero_grad(set_to_none=True)
        logits = self.head(self.batch)
        self.head.loss(self.batch, logits).backward()
        params = [(n, p) for n, p in self.head.named_parameters() if p.requires_grad]
        grads = {n: p.grad for n, p in params if p.grad is not None}
        # "Reaches" = above round-off: a parameter whose true gradient is 0 (a key bias under
        # softmax, a bias before a shift-invariant op) still shows ~1e-17 relative noise.
        scale = max((float(g.abs().max()) for g in grads.values() if g.numel()), default=0.0)
        floor = scale * self.grad_floor
        bad = []
        for name, _ in params:
            g = grads.get(name)
            if g is None:
                bad.append(f"{name} (no grad)")
            elif not bool(torch.isfinite(g).all()):
                bad.append(f"{name} (non-finite)")
            elif not float(g.abs().max()) > floor:
                bad.append(f"{name} (zero)")
        self.head.zero_grad(set_to_none=True)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            return (
                False,
                f"{len(bad)} of {len(params)} parameters get no usable gradient: {shown}",
                float(len(bad)),
            )
        return True, f"all {len(params)} trainable parameters get finite non-zero gradients", 0.0

    def batch_independence(self) -> tuple[bool, str, float]:
        full = self.logits(self.batch)
        b = self.batch.size
        dev = max(_max_diff(self.logits(self.batch.select([i])), full[i : i + 1]) for i in range(b))
        rev = list(range(b))[::-1]
        dev = max(dev, _max_diff(self.logits(self.batch.select(rev)), full[rev]))
        return self._within("each item alone and the batch reversed (eval)", dev)

    def padding(self) -> tuple[bool, str, float]:
        if "text_tokens" not in self.head.needs:
            return True, "not applicable: the head does not read text tokens", 0.0
        padded = pad_more(self.batch, 3, self.g)
        return self._within(
            "3 pad positions appended, all pad content redrawn",
            _max_diff(self.logits(padded), self.logits(self.batch)),
        )

    def region_permutation(self) -> tuple[bool, str, float]:
        if "image_regions" not in self.head.needs:
            return True, "not applicable: the head does not read image regions", 0.0
        permuted = permute_patches(self.batch, self.g)
        return self._within(
            f"regions after the {self.batch.image_prefix} prefix token(s) shuffled",
            _max_diff(self.logits(permuted), self.logits(self.batch)),
        )

    def image_order(self) -> tuple[bool, str, float]:
        """Galleries: an item's images are a set (their order and padding do not count)."""
        if "image_regions" not in self.head.needs:
            return True, "not applicable: the head does not read image regions", 0.0
        seed = int(torch.randint(0, 2**31, (1,), generator=self.g))
        base = self.logits(gallery_of(self.batch, seed))
        dev = max(_max_diff(self.logits(gallery_of(self.batch, seed, reverse=True)), base),
                  _max_diff(self.logits(gallery_of(self.batch, seed, noise=True)), base))
        return self._within("gallery of 4/0/2/3 images: each item's images reversed, padding "
                            "and failed images redrawn", dev)

    def absent_values(self) -> tuple[bool, str, float]:
        """An absent modality's stored values do not change the output."""
        noisy = self.batch
        for mod in MODALITIES:
            ok = self.batch.present(mod)
            if ok is not None:
                noisy = redraw(noisy, ~ok, mod, self.g)
        return self._within(
            "stored values of the absent text (item 2) and image (item 1) redrawn",
            _max_diff(self.logits(noisy), self.logits(self.batch)),
        )

    def one_modality_left(self, missing: str) -> tuple[bool, str, float]:
        """With every ``missing`` absent, the other modality still changes the logits."""
        if set(getattr(self.head, "modalities", ())) != set(MODALITIES):
            return True, "not applicable: the head reads one modality", 0.0
        other = "image" if missing == "text" else "text"
        b = self.batch.size
        base = replace(self.batch, **{f"{missing}_present": torch.zeros(b, dtype=torch.bool),
                                      f"{other}_present": torch.ones(b, dtype=torch.bool)})
        if other == "text":  # every item gets a non-empty text
            base = replace(base, text_mask=torch.ones_like(base.text_mask)
                           if base.text_mask is not None else None)
        moved = redraw(base, torch.ones(b, dtype=torch.bool), other, self.g)
        if other == "text" and base.text_mask is not None:
            moved = replace(moved, text_mask=base.text_mask)
        dev = min(
            _max_diff(self.logits(moved).select(0, i), self.logits(base).select(0, i))
            for i in range(b)
        )
        ok = dev > self.tol
        return (
            ok,
            f"every {missing} absent, the {other} redrawn: the logits of every item "
            f"{'change' if ok else 'do NOT all change'} (smallest max abs diff {dev:.3g})",
            dev,
        )

    def attention(self) -> tuple[bool, str, float]:
        self.logits(self.batch)
        maps: dict[str, Any] = getattr(self.head, "attention", {}) or {}
        if not maps:
            return True, "no attention weights exposed", 0.0
        worst, problems = 0.0, []
        for key, (weights, valid) in maps.items():
            if weights.shape != valid.shape:
                problems.append(
                    f"{key}: weights {tuple(weights.shape)} vs mask {tuple(valid.shape)}"
                )
                worst = math.inf
                continue
            w = weights.double()
            want = valid.any(dim=-1).double()  # rows with a valid position sum to 1, others 0
            dev = max(
                _max_diff(w.sum(dim=-1), want),
                float(w.masked_select(~valid).abs().max()) if (~valid).any() else 0.0,
                float((-w).clamp(min=0).max()) if w.numel() else 0.0,
            )
            if dev > self.tol:
                problems.append(f"{key} off by {dev:.3g}")
            worst = max(worst, dev)
        names = ", ".join(maps)
        if problems:
            return (
                False,
                "weights must be >= 0, sum to 1 over valid positions, be 0 on padding: "
                + "; ".join(problems),
                worst,
            )
        return (
            True,
            f"{names}: sum to 1 over valid positions, 0 on padding (max dev {worst:.3g})",
            worst,
        )
