"""``timm:<model>[@<pretrained tag> | @<weights file> | @random]``: timm image backbones.

The model is built with ``timm.create_model(name, pretrained=False, num_classes=0)`` and then
given its weights: a local ``.safetensors``/``.pth`` file (run through the model module's own
``checkpoint_filter_fn`` when it has one, so e.g. ViT position embeddings are resampled to
``image_size``; classifier weights are dropped; every other key must match), a pretrained tag
(``@in1k`` or ``timm:name.in1k``; no tag = timm's default) found in the local Hugging Face /
torch hub cache only, or ``@random`` (timm's init under ``torch.manual_seed(seed)``).

What is stored:

- ``regions`` = ``forward_features(x)``, the backbone's last feature map after its final norm /
  head conv. CNN (B, C, H, W) -> (B, H*W, C) row-major, ``grid=[H, W]``, ``prefix_tokens=0``
  (EfficientNet-Lite0 at 224: (B, 49, 1280), i.e. after ``conv_head`` + ``bn2``, not the
  320-channel last block); NHWC models likewise; token models (ViT) as is, (B, prefix + H*W, C)
  with ``prefix_tokens = model.num_prefix_tokens`` and the grid of the patch embedding.
- ``pooled`` = ``forward_head(features, pre_logits=True)``: timm's own global pool of the same
  features (average for CNNs, the CLS token for ``global_pool='token'`` ViTs), before any
  classifier, so a linear probe on ``pooled`` is the model's own head.

Preprocessing is ``timm.data.resolve_data_config`` + ``create_transform`` (eval mode), with
``image_size`` overriding the input size (crop_pct kept).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import EncoderSpecError
from .base import (
    ImageEncoder,
)
from .common import (
    ImageLoader,
    autocast,
    check_device_precision,
    effective_precision,
    feature_name,
    library_versions,
    load_state_dict_file,
    seeded,
    sha256_file,
)
from .specs import (
    EncoderOptions,
    EncoderSpec,
    register_backend,
)

__all__ = ["TimmImageEncoder", "load_timm_weights"]

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = (model.pretrained_cfg or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def load_timm_weights(model: torch.nn.Module, path: Path, where: str) -> None:
    """Load a state-dict file into a timm model built with ``num_classes=0``; strict except for
    classifier weights, with one clear error when the file does not fit the architecture."""
    sd = load_state_dict_file(path, where)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception:  # noqa: BLE001 - a foreign file; the key check below says why
            pass
    own = model.state_dict()
    drop = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(drop)}
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad_shapes or missing or unexpected:
        parts = []
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches ({', '.join(bad_shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        raise EncoderSpecError(
            f"{where}: weights file {str(path)!r} does not fit timm model "
            f"{model.pretrained_cfg.get('architecture')!r}: {'; '.join(parts)}; pass weights "
            "saved from this architecture (timm state_dict or safetensors)"
        )
    model.load_state_dict(sd, strict=True)


def _cached_pretrained(arch: str, tag: str | None, where: str) -> Path:
    """A pretrained tag's weights from the local HF / torch hub caches, or a clear error."""
    from timm.models import get_pretrained_cfg, list_pretrained

    full = f"{arch}.{tag}" if tag else arch
    try:
        cfg = get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in list_pretrained(f"{arch}.*")]
        raise EncoderSpecError(
            f"{where}: timm has no pretrained tag {tag!r} for {arch!r} (known tags: {tags}); "
            "pass a local weights file (@/path/to/weights.safetensors) or @random"
        )
    tried = []
    if cfg.file:
        tried.append(str(cfg.file))
        if Path(cfg.file).is_file():
            return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (
            [cfg.hf_hub_filename]
            if cfg.hf_hub_filename
            else ["model.safetensors", "pytorch_model.bin"]
        )
        for name in names:
            hit = try_to_load_from_cache(cfg.hf_hub_id, name)
            tried.append(f"hf cache {cfg.hf_hub_id}/{name}")
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if cfg.url and not cfg.url.endswith(".npz"):
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        tried.append(str(p))
        if p.is_file():
            return p
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else full
    raise EncoderSpecError(
        f"{where}: pretrained weights {full!r} are not in the local caches (tried: "
        f"{'; '.join(tried) or 'no source known'}) and nothing is downloaded; pass a local "
        "weights file (timm:NAME@/path/to/weights.safetensors) or @random"
    )


def _pool_name(model: torch.nn.Module) -> str:
    gp = getattr(model, "global_pool", None)
    if isinstance(gp, str):
        return gp
    return str(getattr(gp, "pool_type", type(gp).__name__ if gp is not None else ""))


class TimmImageEncoder(ImageEncoder):
    library = "timm"

    def __init__(self, spec: EncoderSpec, opts: EncoderOptions):
        import timm
        from timm.data import create_transform, resolve_data_config
        from timm.models import split_model_name_tag

        self.spec = spec.raw
        self.device = check_device_precision(opts.device, opts.precision, spec.raw)
        self.precision_requested = opts.precision
        self.precision = effective_precision(self.device, opts.precision)
        self.seed = opts.seed
        model_name, weights = spec.split_first()
        arch, name_tag = split_model_name_tag(model_name)
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {close}? " if close else ""
            raise EncoderSpecError(
                f"{spec.raw}: timm has no model {arch!r}; {hint}see timm.list_models() for names"
            )
        self.weights_path: Path | None = None
        self.tag: str | None = None
        if weights == "random":
            source = "random"
        elif weights and (
            Path(weights).expanduser().is_file()
            or weights.endswith(_WEIGHT_SUFFIXES)
            or "/" in weights
            or os.sep in weights
            or weights.startswith((".", "~"))
        ):
            path = Path(weights).expanduser()
            if not path.is_file():
                raise EncoderSpecError(
                    f"{spec.raw}: weights file {str(path)!r} does not exist; pass an existing "
                    ".safetensors/.pth file, a pretrained tag found in the local cache, or "
                    "@random"
                )
            self.weights_path, source = path, "file"
        else:
            self.tag = weights or name_tag or None
            self.weights_path, source = _cached_pretrained(arch, self.tag, spec.raw), "pretrained"
        self.arch = arch
        self.weights_source = source

        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
        with seeded(opts.seed):
            model = None
            if opts.image_size is not None:
                try:  # token models need the size at build time (position embeddings)
                    model = timm.create_model(arch, img_size=opts.image_size, **kwargs)
                except TypeError:
                    model = None  # CNNs take any size: only the transform changes
            if model is None:
                model = timm.create_model(arch, **kwargs)
        if self.weights_path is not None:
            load_timm_weights(model, self.weights_path, spec.raw)
        self.model = model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

        data_cfg = resolve_data_config({}, model=model)
        if opts.image_size is not None:
            data_cfg["input_size"] = (3, opts.image_size, opts.image_size)
        self.data_config = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()
        }
        self.preprocess = create_transform(**data_cfg, is_training=False)
        self.load_image = ImageLoader(self.preprocess)
        self.image_size = int(data_cfg["input_size"][-1])
        self.input_shape = tuple(int(v) for v in data_cfg["input_size"])
        self.name = feature_name(arch)

        # one forward pass on a blank image fixes the layout the store needs up front
        h, w = data_cfg["input_size"][1:]
        probe = torch.zeros(1, 3, h, w)
        with torch.inference_mode():
            feats = self.model.forward_features(probe.to(self.device))
            pooled = self.model.forward_head(feats, pre_logits=True)
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        if feats.ndim == 4:
            hh, ww = feats.shape[1:3] if self._nhwc else feats.shape[2:4]
            self.grid, self.prefix_tokens = [int(hh), int(ww)], 0
            self.dim = int(feats.shape[-1] if self._nhwc else feats.shape[1])
        elif feats.ndim == 3:
            self.prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
            pe_grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            n_patch = feats.shape[1] - self.prefix_tokens
            self.grid = (
                [int(g) for g in pe_grid]
                if pe_grid is not None and int(pe_grid[0]) * int(pe_grid[1]) == n_patch
                else None
            )
            self.dim = int(feats.shape[-1])
        else:
            raise EncoderSpecError(
                f"{spec.raw}: forward_features of {arch!r} returns shape {tuple(feats.shape)}, "
                "neither a feature map nor a token sequence; pick another timm model"
            )
        self.n_regions = int(self._regions(feats).shape[1])
        self.pooled_dim = int(pooled.shape[-1])

    def _regions(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:
            if self._nhwc:  # (B, H, W, C)
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return feats  # (B, prefix + P, C)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"regions": (B, R, D), "pooled": (B, D') float32}, on the encoder's device."""
        x = self._to_device(images)
        with self.grad_mode(), autocast(self.device, self.precision):
            feats = self.model.forward_features(x)
            pooled = self.model.forward_head(feats, pre_logits=True)
        return {"regions": self._regions(feats), "pooled": pooled.float()}

    def provenance(self) -> dict[str, Any]:
        cfg = self.model.pretrained_cfg or {}
        encoder = {
            "revision": None,
            "weights": (
                "random"
                if self.weights_source == "random"
                else self.tag
                if self.weights_source == "pretrained" and self.tag
                else str(self.weights_path)
            ),
            "weights_source": self.weights_source,
            "weights_sha256": sha256_file(self.weights_path) if self.weights_path else None,
            "seed": self.seed if self.weights_source == "random" else None,
            "config": {
                "architecture": self.arch,
                "pretrained_tag": cfg.get("tag"),
                "num_features": int(getattr(self.model, "num_features", self.dim)),
                "global_pool": _pool_name(self.model),
                "regions": "forward_features",
                "pooled": "forward_head(pre_logits=True)",
            },
        }
        preprocess = {"image_size": self.image_size, **self.data_config}
        out = self._provenance(encoder, preprocess, library_versions("timm", "torchvision"))
        out.update(
            modality=self.modality,
            kind=self.kind,
            grid=self.grid,
            prefix_tokens=self.prefix_tokens,
            n_regions=self.n_regions,
            pooling="forward_head(pre_logits=True)",
        )
        return out


@register_backend("timm")
def create_timm(spec: EncoderSpec, opts: EncoderOptions) -> TimmImageEncoder:
    if opts.modality not in (None, "image"):
        raise EncoderSpecError(
            f"{spec.raw}: the timm backend builds image encoders only "
            f"(modality={opts.modality!r}); use hf:<model> or open_clip:<arch> for text"
        )
    return TimmImageEncoder(spec, opts)
