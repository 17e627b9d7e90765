"""Issue 16: the new heads (tensor, lmf, film, mult, mlb) and the seeds' methods as written
(HANet eq. 7, co-attention's layer mix, gated cross-attention's sum, mean and empty text)."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fusion
from cli.fusion_app import app
from fusion.batch import Batch
from fusion.checks import check_head, random_batch
from fusion.heads import create_head, list_heads

from .conftest import make_complementary_store

ROOT = Path(__file__).resolve().parent.parent

DIMS = {"text_dim": 16, "image_dim": 12, "num_classes": 5, "text_layers": 2}
NEW = ["film", "lmf", "mlb", "mult", "tensor"]
TINY = {"film": {"dim": 8, "hidden": 8}, "lmf": {"dim": 8, "hidden": 8},
        "mlb": {"dim": 8, "attn_dim": 8}, "mult": {"dim": 8, "heads": 2, "hidden": 8},
        "tensor": {"dim": 4, "hidden": 8}}


def build(name, **options):
    torch.manual_seed(0)
    return create_head(name, **DIMS, **options).double().eval()


def failed(results):
    return {r.name: r.detail for r in results if not r.passed}


# --------------------------------------------------------------------------- new heads


def test_fusion_heads_lists_the_new_heads():
    assert set(NEW) <= set(list_heads())
    out = CliRunner().invoke(app, ["heads", "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    for name in NEW:
        assert listed[name]["modalities"] == ["text", "image"]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tensor", {"pool": "attention"}),
        ("lmf", {"pool": "mean", "rank": 1}),
        ("film", {"reduce": "max", "blocks": 1, "pool": "attention"}),
        ("mult", {"heads": 1, "layers": 1}),
        ("mlb", {"glimpses": 1, "hidden": 16, "pool": "mean"}),
        ("hanet", {"hybrid": "paper"}),
        ("hanet", {"hybrid": "paper", "mode": "keyless"}),
        ("hanet", {"hybrid": "paper", "mode": "keybased"}),
    ],
)
def test_new_variants_pass_the_property_suite(name, options):
    for prefix in (1, 0):
        assert failed(check_head(name, options=options, image_prefix=prefix)) == {}


@pytest.mark.parametrize("name", NEW)
def test_new_head_trains_on_the_cached_store(small_store, tmp_path, name):
    run = fusion.train(small_store, name, out=tmp_path / name, epochs=2, folds=2,
                       batch_size=16, patience=2, **TINY[name])
    assert run.head == name
    assert np.isfinite(run.oof).all() and np.allclose(run.oof.sum(1), 1, atol=1e-4)
    assert 0.0 <= run.metrics["macro_f1"] <= 1.0


def test_tensor_fusion_is_the_outer_product_of_the_streams_with_ones():
    head = build("tensor", dim=3)
    batch = random_batch(**DIMS)
    with torch.no_grad():
        z = head.forward_features(batch).view(4, 4, 4)  # (B, d+1, d+1)
        v_t = head.text_proj(batch.text_pooled)
        v_i = head.image_proj(batch.image_pooled)
    torch.testing.assert_close(z[:, :3, :3], v_t[:, :, None] * v_i[:, None, :])
    torch.testing.assert_close(z[:, :3, 3], v_t)  # [v_t; 1] x 1: the unimodal terms are kept
    torch.testing.assert_close(z[:, 3, :3], v_i)
    assert (z[:, 3, 3] == 1).all()


def test_lmf_equals_a_rank_r_linear_map_of_the_tensor_product():
    head = build("lmf", rank=3, dim=5)
    batch = random_batch(**DIMS)
    with torch.no_grad():
        h = head.forward_features(batch)
        one = torch.ones(4, 1, dtype=torch.float64)
        t1 = torch.cat([batch.text_pooled, one], -1)
        i1 = torch.cat([batch.image_pooled, one], -1)
        # the full weight tensor sum_r w_r W_t^(r) (x) W_i^(r): (Dt+1, Di+1, d), rank 3
        w = torch.einsum("r,rxd,ryd->xyd", head.rank_weights, head.text_factor, head.image_factor)
        full = torch.einsum("bx,by,xyd->bd", t1, i1, w)
    torch.testing.assert_close(h, full)


def test_film_with_identity_modulation_ignores_the_text_and_otherwise_uses_it():
    head = build("film", dim=8)
    batch = random_batch(**DIMS)
    other = replace(batch, text_pooled=random_batch(**DIMS, seed=5).text_pooled)
    with torch.no_grad():
        assert (head(other) - head(batch)).abs().max() > 1e-6
        head.film.weight.zero_()
        head.film.bias.zero_()  # gamma = 1, beta = 0 for every text
        torch.testing.assert_close(head(other), head(batch))
        assert torch.equal(head.internals["gamma"], torch.ones_like(head.internals["gamma"]))
        x = head.stem(batch.image_regions[:, 1:])  # unmodulated residual blocks, by hand
        for block in head.blocks:
            x = x + torch.relu(block.norm(block.linear(x)))
        torch.testing.assert_close(head.forward_features(batch), x.mean(dim=1))


def test_mult_empty_text_keeps_the_image_half_and_zeroes_the_text_half():
    head = build("mult", dim=8, heads=2)
    batch = random_batch(**DIMS)  # row 2 is an empty text
    other = replace(batch, image_regions=random_batch(**DIMS, seed=3).image_regions)
    with torch.no_grad():
        f = head.forward_features(batch)
        assert (f[2, :8] == 0).all()
        assert (head(other)[2] - head(batch)[2]).abs().max() > 1e-6


def test_mult_text_stream_attends_to_regions_and_regions_to_text():
    head = build("mult", dim=8, heads=2, layers=2)
    with torch.no_grad():
        head(random_batch(**DIMS))
    assert set(head.attention) == {"text_to_image0", "image_to_text0", "text_to_image1",
                                   "image_to_text1"}
    w, valid = head.attention["image_to_text0"]
    assert w.shape == (4, 2, 6, 7)  # (B, H, N regions, T tokens)
    assert (w[~valid] == 0).all() and (w[2] == 0).all()  # pads and the empty text: no weight


def test_mlb_glimpse_of_identical_regions_is_that_region():
    head = build("mlb", glimpses=3)
    batch = random_batch(**DIMS)
    region = batch.image_regions[:, 1:2]
    same = replace(batch, image_regions=torch.cat([batch.image_regions[:, :1],
                                                   region.expand(4, 6, 12)], 1))
    with torch.no_grad():
        f = head.forward_features(same)
        want = torch.tanh(head.fuse_image(region.expand(4, 3, 12).flatten(1))) * torch.tanh(
            head.fuse_text(batch.text_pooled))
    torch.testing.assert_close(f, want)
    a, _ = head.attention["image"]
    assert a.shape == (4, 3, 6)


# --------------------------------------------------------------------------- HANet eq. 7


def test_hanet_paper_keyless_applies_no_hybrid_network():
    head = build("hanet", hybrid="paper", mode="keyless", dim=8)
    assert not [n for n, _ in head.named_modules() if n.startswith("hybrid")]
    batch = random_batch(**DIMS)
    with torch.no_grad():
        f = head.forward_features(batch)
        v_t, v_i = head.text_proj(batch.text_pooled), head.image_proj(batch.image_pooled)
        s_l = torch.softmax(torch.cat([head.text_keyless(v_t), head.image_keyless(v_i)], -1), -1)
    torch.testing.assert_close(f, torch.cat([s_l[:, :1] * v_t, s_l[:, 1:] * v_i], -1))
    torch.testing.assert_close(head.internals["streams"], s_l)


def test_hanet_paper_hybrid_is_one_d_per_stream_on_the_softmax_weights():
    head = build("hanet", hybrid="paper", dim=8, key_dim=4)
    batch = random_batch(**DIMS)
    with torch.no_grad():
        head(batch)
        v_t, v_i = head.internals["v_text"], head.internals["v_image"]
        raw = head.scores(v_t, v_i)  # [s_l,t, s_l,i, s_b,t, s_b,i] before any softmax
        s_l, s_b = torch.softmax(raw[:, :2], -1), torch.softmax(raw[:, 2:], -1)
        want = torch.cat([head.hybrid_text(torch.stack([s_l[:, 0], s_b[:, 0]], -1)),
                          head.hybrid_image(torch.stack([s_l[:, 1], s_b[:, 1]], -1))], -1)
    torch.testing.assert_close(head.internals["streams"], want)
    torch.testing.assert_close(head.attention["keyless"][0], s_l)
    torch.testing.assert_close(head.attention["keybased"][0], s_b)


def test_hanet_joint_form_is_unchanged_and_still_the_default():
    head = build("hanet", dim=8)
    assert head.config["options"]["hybrid"] == "joint"
    batch = random_batch(**DIMS)
    with torch.no_grad():
        head(batch)
        alpha = torch.softmax(head.hybrid(head.scores(head.internals["v_text"],
                                                      head.internals["v_image"])), -1)
    torch.testing.assert_close(head.attention["streams"][0], alpha)


# --------------------------------------------------------------------------- co-attention


def test_coattention_warns_once_per_build_when_it_sees_one_layer():
    with pytest.warns(UserWarning, match="caches 1 layer.*without weighted layers.*--layers"):
        create_head("coattention", **{**DIMS, "text_layers": 1}, lstm_dim=8, attn_dim=4,
                    hidden=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning with layers to mix, or with mix=False
        create_head("coattention", **DIMS, lstm_dim=8, attn_dim=4, hidden=4)
        create_head("coattention", **{**DIMS, "text_layers": 1}, mix=False, lstm_dim=8,
                    attn_dim=4, hidden=4)


# --------------------------------------------------------------------------- gated-xattn


def _texts_of_lengths(lengths, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    regions = torch.randn(1, 7, 12, generator=g, dtype=torch.float64).expand(len(lengths), 7, 12)
    return Batch(text_tokens=torch.randn(len(lengths), t, 2, dim, generator=g,
                                         dtype=torch.float64),
                 text_mask=mask, image_regions=regions, image_prefix=1,
                 image_pooled=regions[:, 1:].mean(1))


def test_gated_xattn_mean_norm_does_not_grow_with_text_length():
    batch = _texts_of_lengths([5, 50, 200])
    norms = {}
    for reduce in ("sum", "mean"):
        with torch.no_grad():
            norms[reduce] = build("gated-xattn", reduce=reduce).forward_features(batch).norm(dim=1)
    assert norms["sum"][2] > 10 * norms["sum"][0]  # the paper's sum grows with the length
    assert norms["mean"].max() < 2 * norms["mean"].min()  # the mean does not


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gated_xattn_empty_text_still_lets_the_image_reach_the_output(reduce):
    head = build("gated-xattn", reduce=reduce)
    batch = random_batch(**DIMS)
    empty = replace(batch, text_mask=torch.zeros_like(batch.text_mask))  # every text empty
    other = replace(empty, image_regions=random_batch(**DIMS, seed=3).image_regions,
                    image_pooled=random_batch(**DIMS, seed=3).image_pooled)
    with torch.no_grad():
        diff = (head(other) - head(empty)).abs().amax(dim=1)
    assert (diff > 1e-6).all()


def test_gated_xattn_empty_text_token_only_touches_empty_rows():
    head = build("gated-xattn")
    batch = random_batch(**DIMS)
    with torch.no_grad():
        before = head(batch)
        head.empty.normal_()
        after = head(batch)
    assert (after[2] - before[2]).abs().max() > 1e-6  # row 2 is the empty text
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]])


def test_gated_xattn_weights_saved_without_the_empty_token_still_load():
    head = build("gated-xattn")
    old = {k: v for k, v in head.state_dict().items() if k != "empty"}
    fresh = build("gated-xattn")
    fresh.empty.data.fill_(1.0)
    fresh.load_state_dict(old)  # strict: the pre-hook supplies `empty` at its initial zeros
    assert (fresh.empty == 0).all()


# --------------------------------------------------------------------------- the measurement script


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_heads_script",
                                                  ROOT / "examples" / "bench_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_heads_trains_compares_and_resumes(tmp_path, capsys):
    make_complementary_store(tmp_path / "c.zarr", n=120)
    out = tmp_path / "bench"
    argv = [str(tmp_path / "c.zarr"), "--out", str(out), "--epochs", "1", "--folds", "2",
            "--batch-size", "32", "--resamples", "50", "--run", "tensor=tensor:dim=4,hidden=8",
            "--run", "lmf-r2=lmf:rank=2,dim=8", "--baseline", "tensor"]
    bench = _bench_script()
    bench.main(argv)
    printed = capsys.readouterr().out
    trained = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [t["run"] for t in trained] == ["tensor", "lmf-r2"]
    assert trained[1]["options"] == {"rank": 2, "dim": 8}
    table = (out / "leaderboard.md").read_text()
    lmf_row = next(line for line in table.splitlines() if "| lmf-r2 |" in line)
    assert re.search(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", lmf_row)  # vs tensor
    bench.main(argv)  # the second call finds both runs finished and only compares
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
