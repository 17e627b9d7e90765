"""``hf:<local dir | hub id>[@revision]``: Hugging Face transformers text encoders.

``AutoTokenizer`` + ``AutoModel`` (the encoder half of an encoder-decoder model), run with
``output_hidden_states=True``. ``layers`` indexes ``hidden_states``: 0 is the embedding output,
``n`` the last block, negatives count from the end, ``"all"`` takes every one.

Tokens: every position the tokenizer marks valid in ``attention_mask`` is stored, special
tokens ([CLS], [SEP], ...) included, truncated to ``max_length``.

Pooling (recorded as ``pooling``): a sentence-transformers directory's ``1_Pooling/config.json``
decides (``mean``, ``cls`` or ``max``; its ``2_Normalize`` step is *not* applied, so the stored
vector is the un-normalised pooled one); otherwise ``mean``. All three read the *last* hidden
state whatever ``layers`` selects; ``mean``/``max`` are masked, ``cls`` takes position 0.

Resolution never touches the network: a local directory is used as is; anything else must be
a hub id already in the local Hugging Face cache (``local_files_only=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EncoderSpecError
from .base import (
    TextEncoder,
)
from .common import (
    autocast,
    check_device_precision,
    effective_precision,
    feature_name,
    library_versions,
    name_from_path,
    sha256_file,
)
from .specs import (
    EncoderOptions,
    EncoderSpec,
    parse_layers,
    register_backend,
)

__all__ = ["HFTextEncoder", "HFTokenize"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_UNBOUNDED = 1_000_000  # tokenizers report a huge model_max_length when they have no limit


class HFTokenize:
    """Picklable ``texts -> {input_ids, attention_mask, ...}`` (padded to the batch's longest)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding="longest",
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if k in self.tokenizer.model_input_names}

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=True,
        )
        return np.asarray([int(sum(m)) for m in enc["attention_mask"]], dtype=np.int64)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a progress bar while loading weights; a library must not print."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _resolve(spec: EncoderSpec) -> tuple[Path, str | None, bool]:
    """(local directory, hub commit or None, whether it came from the hub cache)."""
    whole = Path(f"{spec.model}@{spec.weights}" if spec.weights else spec.model).expanduser()
    if whole.is_dir():
        resolved = whole.resolve()
        revision = resolved.name if resolved.parent.name == "snapshots" else None
        return whole, revision, False
    local = Path(spec.model).expanduser()
    if local.is_dir():
        raise EncoderSpecError(
            f"{spec.raw}: @{spec.weights} (a hub revision) cannot apply to the local "
            f"directory {str(local)!r}; drop the '@{spec.weights}'"
        )
    if spec.model.startswith(("/", ".", "~")) or spec.model.count("/") > 1:
        raise EncoderSpecError(
            f"{spec.raw}: no directory {str(local)!r}; pass a local directory holding "
            "config.json, the weights and the tokenizer files (hf:/path/to/model)"
        )
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(spec.model, revision=spec.weights, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, bad id, bad revision: same fix for the user
        at = f"@{spec.weights}" if spec.weights else ""
        raise EncoderSpecError(
            f"{spec.raw}: {spec.model + at!r} is not a local directory and not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded: pass a "
            f"local directory (hf:/path/to/model) or fill the cache first "
            f"(huggingface-cli download {spec.model})"
        ) from None
    return Path(path), Path(path).name, True


def _weights_digest(path: Path) -> tuple[str | None, dict[str, str]]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    # prefer safetensors when a directory carries both formats (transformers loads those)
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix == ".safetensors"]
    shas = {p.name: sha256_file(p) for p in files}
    if not shas:
        return None, {}
    if len(shas) == 1:
        return next(iter(shas.values())), shas
    h = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in shas.items()).encode())
    return h.hexdigest(), shas


def _pooling_mode(path: Path) -> str:
    cfg = path / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return "mean"
    try:
        st = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return "mean"
    if st.get("pooling_mode_cls_token"):
        return "cls"
    if st.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


class HFTextEncoder(TextEncoder):
    library = "transformers"

    def __init__(self, spec: EncoderSpec, opts: EncoderOptions):
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec.raw
        self.device = check_device_precision(opts.device, opts.precision, spec.raw)
        self.precision_requested = opts.precision
        self.precision = effective_precision(self.device, opts.precision)
        path, self.revision, from_hub = _resolve(spec)
        self.path = path
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderSpecError(
                f"{spec.raw}: could not load a tokenizer and model from {str(path)!r} ({first}); "
                "the directory must hold config.json, the weights and the tokenizer files "
                "(the output of save_pretrained)"
            ) from None
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. T5: the decoder is not a text encoder
        if tokenizer.pad_token is None:  # GPT-style tokenizers; pads are masked out anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        limits = [opts.max_length]
        if 0 < (tokenizer.model_max_length or 0) < _UNBOUNDED:
            limits.append(int(tokenizer.model_max_length))
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_pos > 0:
            limits.append(max_pos)
        self.max_length = min(limits)
        self.tokenize = HFTokenize(tokenizer, self.max_length)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        self.pooling = _pooling_mode(path)
        self.name = feature_name(spec.model.split("/")[-1]) if from_hub else name_from_path(path)
        # one tiny forward pass gives the exact number of hidden states and their width
        probe = self._hidden_states(self.tokenize(["a"]))
        self.n_hidden = len(probe)
        self.dim = int(probe[-1].shape[-1])
        self.pooled_dim = self.dim
        self.layers = parse_layers(opts.layers, self.n_hidden, spec.raw)

    def _hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs = {
            k: v.to(self.device, non_blocking=True)
            for k, v in batch.items()
            if k in self.tokenize.tokenizer.model_input_names
        }
        with self.grad_mode(), autocast(self.device, self.precision):
            out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        return out.hidden_states

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenize.lengths(texts)

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"tokens": (B, T, L, D), "mask": (B, T) bool, "pooled": (B, D) float32}, on device."""
        hs = self._hidden_states(batch)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, T)
        tokens = torch.stack([hs[i] for i in self.layers], dim=2)  # (B, T, L, D)
        last = hs[-1].float()  # (B, T, D)
        if self.pooling == "cls":
            pooled = last[:, 0]
        elif self.pooling == "max":
            pooled = last.masked_fill(~mask[..., None], float("-inf")).amax(1)
        else:
            m = mask[..., None].float()
            pooled = (last * m).sum(1) / m.sum(1).clamp(min=1.0)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}

    def provenance(self) -> dict[str, Any]:
        sha, files = _weights_digest(self.path)
        encoder = {
            "revision": self.revision,
            "weights_sha256": sha,
            "weights_files": files,
            "config": json.loads(self.config.to_json_string(use_diff=True)),
        }
        tok = self.tokenize.tokenizer
        preprocess = {
            "max_length": self.max_length,
            "tokenizer": type(tok).__name__,
            "truncation": True,
            "special_tokens": "kept: every attention_mask position is stored",
        }
        out = self._provenance(encoder, preprocess, library_versions("transformers", "tokenizers"))
        out.update(
            modality=self.modality,
            kind=self.kind,
            layers=list(self.layers),
            n_hidden=self.n_hidden,
            pooling=self.pooling,
        )
        return out


@register_backend("hf")
def create_hf(spec: EncoderSpec, opts: EncoderOptions) -> HFTextEncoder:
    if opts.modality not in (None, "text"):
        raise EncoderSpecError(
            f"{spec.raw}: the hf backend builds text encoders only (modality={opts.modality!r}); "
            "use timm:<model> or open_clip:<arch> for images"
        )
    return HFTextEncoder(spec, opts)
