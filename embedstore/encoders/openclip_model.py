"""Resolving an ``open_clip:<arch>[@tag | @file | @random]`` spec to a model and its eval
transform, from local files and caches only (nothing is downloaded). The towers are
:mod:`embedstore.encoders.openclip`."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import EncoderSpecError
from .common import seeded
from .specs import EncoderOptions, EncoderSpec

__all__ = ["build_model"]


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns on the root logger when no weights are loaded; @random asks for that."""

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _cached_pretrained(arch: str, tag: str, where: str) -> Path:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise EncoderSpecError(
            f"{where}: open_clip has no pretrained tag {tag!r} for {arch!r} (known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}); pass a local weights file "
            "(@/path/to/open_clip_model.safetensors) or @random"
        )
    tried = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # "org/repo/" names a repo (default file names), "org/repo/file" one file in it
        repo, _, fname = cfg["hf_hub"].rpartition("/")
        for name in (
            [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        ):
            tried.append(f"hf cache {repo}/{name}")
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if cfg.get("url"):
        p = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        tried.append(str(p))
        if p.is_file():
            return p
    raise EncoderSpecError(
        f"{where}: pretrained weights {arch}@{tag} are not in the local caches (tried: "
        f"{'; '.join(tried)}) and nothing is downloaded; pass a local weights file "
        "(open_clip:ARCH@/path/to/weights) or @random"
    )


def build_model(spec: EncoderSpec, opts: EncoderOptions) -> dict[str, Any]:
    """Resolve the spec, create the model (+ eval transform), return it with its provenance."""
    import open_clip

    arch, weights = spec.split_first()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.5)
        raise EncoderSpecError(
            f"{spec.raw}: open_clip has no model config {arch!r}; "
            f"{'did you mean ' + str(close) + '? ' if close else ''}"
            "see open_clip.list_models() for names"
        )
    path: Path | None = None
    if weights == "random":
        source = "random"
    elif weights is None:
        raise EncoderSpecError(
            f"{spec.raw}: name the weights: a pretrained tag (one of "
            f"{open_clip.list_pretrained_tags_by_model(arch)}, from the local cache), a local "
            f"file (open_clip:{arch}@/path/to/weights) or @random"
        )
    elif Path(weights).expanduser().is_file():
        path, source = Path(weights).expanduser(), "file"
    elif "/" in weights or os.sep in weights or Path(weights).suffix:
        raise EncoderSpecError(
            f"{spec.raw}: weights file {weights!r} does not exist; pass an existing file, a "
            "pretrained tag found in the local cache, or @random"
        )
    else:
        path, source = _cached_pretrained(arch, weights, spec.raw), "pretrained"

    kwargs: dict[str, Any] = dict(
        pretrained=str(path) if path else None,
        device="cpu",
        precision="fp32",
        pretrained_image=False,
        pretrained_text=False,
    )
    if opts.image_size is not None and opts.modality == "image":
        kwargs["force_image_size"] = opts.image_size
    try:
        with seeded(opts.seed), _quiet_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EncoderSpecError(
            f"{spec.raw}: open_clip could not build {arch!r} with weights "
            f"{str(path) if path else 'random'!r} ({first}); pass weights saved from this "
            "architecture"
        ) from None
    return {
        "model": model.eval(),
        "preprocess": preprocess,
        "arch": arch,
        "path": path,
        "source": source,
        "tag": weights if source == "pretrained" else None,
        "model_cfg": model_cfg,
    }
