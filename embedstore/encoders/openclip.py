"""``open_clip:<arch>[@<pretrained tag> | @<weights file> | @random]``: both CLIP towers.

The caller picks the tower with ``modality`` (one feature set per tower; the default name is
``<arch>-text`` / ``<arch>-image``). Weights: a local file, a pretrained tag found in the local
Hugging Face / CLIP caches only (nothing is downloaded), or ``@random`` (seeded init).

Text tower (CLIP byte-pair tokenizer, truncated to ``min(max_length, context_length)`` with
<eot> kept last):

- hidden states follow the Hugging Face GPT-2 convention: index 0 is the token + position
  embedding, ``i`` the residual stream after block ``i``, and the last index is
  ``ln_final(block N)`` -- the states the projection reads. ``layers`` selects among them.
- ``mask`` is True from <sot> through the first <eot>; those tokens are stored (special tokens
  included). The causal attention mask means no stored token ever sees the padding.
- ``pooled`` is ``model.encode_text`` un-normalised: the <eot> state after ``ln_final``
  projected by ``text_projection``, so its width is ``embed_dim`` (``pooled_dim``), which may
  differ from the token width (``dim``).

Image tower: ``regions`` is the output of ``visual.ln_post`` over the whole sequence, [CLS]
first (``prefix_tokens=1``) then the patch grid; this is what ``visual.output_tokens = True``
returns plus the [CLS] it drops. ``pooled`` is ``model.encode_image`` (projected, un-normalised).
ModifiedResNet towers (RN50...) store the ``layer4`` map (B, H*W, C) and pool with ``encode_image``
(attention pool + projection). timm-trunk towers are refused: use the timm backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EncoderSpecError
from .base import (
    ImageEncoder,
    TextEncoder,
)
from .common import (
    ImageLoader,
    autocast,
    check_device_precision,
    effective_precision,
    feature_name,
    library_versions,
    sha256_file,
)
from .openclip_model import build_model
from .specs import (
    EncoderOptions,
    EncoderSpec,
    parse_layers,
    register_backend,
)

__all__ = ["OpenClipTextEncoder", "OpenClipImageEncoder", "OpenClipTokenize"]


class OpenClipTokenize:
    """Picklable ``texts -> {input_ids, attention_mask}``, trimmed to the batch's longest text."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eot = int(tokenizer.eot_token_id)

    def _ids_and_lengths(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.max_length)  # (B, max_length)
        is_eot = ids == self.eot
        # valid = <sot> .. first <eot>; token id 0 is a real token ('!'), so never use ids != 0
        lengths = is_eot.int().argmax(1) + 1  # (B,)
        return ids, lengths

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, lengths = self._ids_and_lengths(texts)
        t = int(lengths.max()) if len(lengths) else 1
        mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
        return {"input_ids": ids[:, :t] * mask, "attention_mask": mask}

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        return self._ids_and_lengths(texts)[1].numpy().astype(np.int64)


class _OpenClipBase:
    library = "open_clip"

    def _setup(self, spec: EncoderSpec, opts: EncoderOptions) -> dict[str, Any]:
        self.spec = spec.raw
        self.device = check_device_precision(opts.device, opts.precision, spec.raw)
        self.precision_requested = opts.precision
        self.precision = effective_precision(self.device, opts.precision)
        self.seed = opts.seed
        self.force_image_size = opts.image_size if opts.modality == "image" else None
        built = build_model(spec, opts)
        self.arch, self.weights_path = built["arch"], built["path"]
        self.weights_source, self.tag = built["source"], built["tag"]
        self.model_cfg = built["model_cfg"]
        self.model = built["model"].requires_grad_(False).to(self.device)
        return built

    def _encoder_prov(self) -> dict[str, Any]:
        return {
            "revision": None,
            "weights": (
                "random"
                if self.weights_source == "random"
                else self.tag
                if self.weights_source == "pretrained"
                else str(self.weights_path)
            ),
            "weights_source": self.weights_source,
            "weights_sha256": sha256_file(self.weights_path) if self.weights_path else None,
            "seed": self.seed if self.weights_source == "random" else None,
            "config": {
                "architecture": self.arch,
                **self.model_cfg,
                "force_image_size": self.force_image_size,
            },
        }


class OpenClipTextEncoder(_OpenClipBase, TextEncoder):
    def __init__(self, spec: EncoderSpec, opts: EncoderOptions):
        text_cfg = _model_cfg_or_none(spec) or {}
        if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
            raise EncoderSpecError(
                f"{spec.raw}: this open_clip text tower uses a Hugging Face model/tokenizer "
                f"({text_cfg.get('hf_model_name') or text_cfg.get('hf_tokenizer_name')}); "
                "encode its text with hf:/path/to/that/model instead"
            )
        import open_clip

        self._setup(spec, opts)
        m = self.model
        # CLIP keeps the text tower on the model itself; CustomTextCLIP under model.text
        tower = m.text if hasattr(m, "text") else m
        if getattr(tower, "cls_emb", None) is not None:
            raise EncoderSpecError(
                f"{spec.raw}: text towers with an appended CLS (CoCa) are "
                "not supported; pick a CLIP architecture"
            )
        self._blocks = tower.transformer.resblocks
        self._tower = tower if tower is not m else _ClipTextTower(m)
        self._batch_first = getattr(tower.transformer, "batch_first", True)
        self._ln_final = tower.ln_final
        context_length = int(getattr(tower, "context_length", None) or m.context_length)
        self.max_length = min(opts.max_length, context_length)
        self._context_length = context_length
        self.tokenize = OpenClipTokenize(open_clip.get_tokenizer(self.arch), self.max_length)
        self.n_hidden = len(self._blocks) + 1
        self.layers = parse_layers(opts.layers, self.n_hidden, spec.raw)
        self.pooling = "encode_text (eot token, ln_final, text_projection)"
        self.name = feature_name(f"{self.arch}-text")
        probe = self.encode(self.tokenize(["a"]))
        self.dim = int(probe["tokens"].shape[-1])
        self.pooled_dim = int(probe["pooled"].shape[-1])

    @property
    def torch_module(self) -> torch.nn.Module:
        """The text tower only (what fine-tuning trains and ``--freeze-layers`` counts: the
        token + position embeddings, then the text blocks); the visual tower stays frozen."""
        return self._tower

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenize.lengths(texts)

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"tokens": (B, T, L, D), "mask": (B, T) bool, "pooled": (B, E) float32}, on device."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, T)
        b, t = ids.shape
        full = torch.zeros(b, self._context_length, dtype=ids.dtype, device=self.device)
        full[:, :t] = ids * mask  # (B, context_length): the model adds every position embedding
        states: dict[int, torch.Tensor] = {}
        want = set(self.layers)
        n = self.n_hidden - 1

        def keep(i: int, x: torch.Tensor) -> None:
            if i in want:
                x = x if self._batch_first else x.transpose(0, 1)
                states[i] = x[:, :t]  # (B, T, D)

        hooks = [self._blocks[0].register_forward_pre_hook(lambda _m, args: keep(0, args[0]))]
        for i, blk in enumerate(self._blocks[:-1], start=1):
            hooks.append(blk.register_forward_hook(lambda _m, _a, out, i=i: keep(i, out)))
        hooks.append(self._ln_final.register_forward_hook(lambda _m, _a, out: keep(n, out)))
        try:
            with self.grad_mode(), autocast(self.device, self.precision):
                pooled = self.model.encode_text(full)
        finally:
            for h in hooks:
                h.remove()
        tokens = torch.stack([states[i] for i in self.layers], dim=2)  # (B, T, L, D)
        return {"tokens": tokens, "mask": mask, "pooled": pooled.float()}

    def provenance(self) -> dict[str, Any]:
        preprocess = {
            "max_length": self.max_length,
            "context_length": self._context_length,
            "tokenizer": type(self.tokenize.tokenizer).__name__,
            "truncation": True,
            "special_tokens": "kept: <sot> .. first <eot> are stored",
        }
        out = self._provenance(
            self._encoder_prov(), preprocess, library_versions("open_clip_torch")
        )
        out.update(
            modality=self.modality,
            kind=self.kind,
            layers=list(self.layers),
            n_hidden=self.n_hidden,
            pooling=self.pooling,
        )
        return out


class OpenClipImageEncoder(_OpenClipBase, ImageEncoder):
    def __init__(self, spec: EncoderSpec, opts: EncoderOptions):
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        built = self._setup(spec, opts)
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None or visual.final_ln_after_pool:
                raise EncoderSpecError(
                    f"{spec.raw}: this vision tower pools before its final norm (attention "
                    "pool / final_ln_after_pool); its token states are not supported"
                )
            self._tap, self.prefix_tokens = visual.ln_post, 1
            self.grid = [int(g) for g in visual.grid_size]
        elif isinstance(visual, ModifiedResNet):
            self._tap, self.prefix_tokens, self.grid = visual.layer4, 0, None
        else:
            raise EncoderSpecError(
                f"{spec.raw}: open_clip vision tower {type(visual).__name__} is not supported; "
                "for timm trunks use timm:<model> instead"
            )
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = built["preprocess"]
        self.load_image = ImageLoader(self.preprocess)
        self.preprocess_cfg = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in visual.preprocess_cfg.items()
        }
        size = self.preprocess_cfg.get("size", 224)
        h, w = (size[0], size[1]) if isinstance(size, list) else (size, size)
        self.image_size, self.input_shape = int(w), (3, int(h), int(w))
        self.name = feature_name(f"{self.arch}-image")
        probe = self.encode(torch.zeros(1, *self.input_shape))
        if self.grid is None:  # ResNet: the layer4 map's spatial size
            side = int(round(probe["regions"].shape[1] ** 0.5))
            self.grid = [side, side] if side * side == probe["regions"].shape[1] else None
        self.n_regions = int(probe["regions"].shape[1])
        self.dim = int(probe["regions"].shape[-1])
        self.pooled_dim = int(probe["pooled"].shape[-1])

    @property
    def torch_module(self) -> torch.nn.Module:
        """The visual tower only (the text tower stays frozen)."""
        return self.model.visual

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"regions": (B, R, D), "pooled": (B, E) float32}, on the encoder's device."""
        x = self._to_device(images)
        seen: list[torch.Tensor] = []
        hook = self._tap.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            with self.grad_mode(), autocast(self.device, self.precision):
                pooled = self.model.encode_image(x)
        finally:
            hook.remove()
        r = seen[-1]
        regions = r.flatten(2).transpose(1, 2) if r.ndim == 4 else r  # (B, R, D)
        return {"regions": regions, "pooled": pooled.float()}

    def provenance(self) -> dict[str, Any]:
        preprocess = {"image_size": self.image_size, **self.preprocess_cfg}
        out = self._provenance(
            self._encoder_prov(), preprocess, library_versions("open_clip_torch", "torchvision")
        )
        out.update(
            modality=self.modality,
            kind=self.kind,
            grid=self.grid,
            prefix_tokens=self.prefix_tokens,
            n_regions=self.n_regions,
            pooling="encode_image (projected)",
        )
        return out


class _ClipTextTower(torch.nn.Module):
    """The parts of a ``CLIP`` model that ``encode_text`` uses (CLIP keeps them on the model,
    next to ``visual``), shared, in forward order: embeddings, blocks, final norm, projection."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.embeddings = torch.nn.Module()  # a submodule, so its parameters come first
        self.embeddings.token_embedding = clip.token_embedding
        self.embeddings.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.projection = torch.nn.Module()  # a Parameter, an nn.Linear or None
        self.projection.text_projection = clip.text_projection


def _model_cfg_or_none(spec: EncoderSpec) -> dict[str, Any] | None:
    import open_clip

    cfg = open_clip.get_model_config(spec.split_first()[0])
    return cfg.get("text_cfg") if cfg else None


@register_backend("open_clip")
def create_open_clip(spec: EncoderSpec, opts: EncoderOptions) -> TextEncoder | ImageEncoder:
    if opts.modality == "text":
        return OpenClipTextEncoder(spec, opts)
    if opts.modality == "image":
        return OpenClipImageEncoder(spec, opts)
    raise EncoderSpecError(
        f"{spec.raw}: open_clip models have two towers; choose one with modality='text' or "
        "modality='image' (CLI: --modality text|image)"
    )
