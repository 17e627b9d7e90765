"""Fusion heads: the property suite over the registry, per-head maths, registry and user heads."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.batch import Batch
from fusion.checks import check_head, random_batch
from fusion.errors import HeadError
from fusion.heads import (
    FusionHead,
    MaskedBiLSTM,
    ScalarMix,
    TextHead,
    create_head,
    head_options,
    list_heads,
    masked_softmax,
    present_mask,
    register_head,
    resolve_head,
)

DIMS = {"text_dim": 16, "image_dim": 12, "num_classes": 5, "text_layers": 2}
BUILTIN = ["add", "coattention", "concat", "film", "gated-xattn", "hanet", "image", "late", "lmf",
           "mlb", "mult", "tensor", "text"]


def failed(results):
    return {r.name: r for r in results if not r.passed}


def build(name, **options):
    torch.manual_seed(0)
    return create_head(name, **DIMS, **options).double().eval()


# --------------------------------------------------------------------------- property suite


def test_registry_lists_every_builtin_head():
    assert set(BUILTIN) <= set(list_heads())


@pytest.mark.parametrize("image_prefix", [1, 0])
@pytest.mark.parametrize("name", list_heads())
def test_head_passes_property_suite(name, image_prefix):
    results = check_head(name, image_prefix=image_prefix)
    assert [r.name for r in results] == [
        "contract",
        "output",
        "needs",
        "gradients",
        "batch_independence",
        "padding",
        "region_permutation",
        "image_order",
        "attention",
        "absent_values",
        "missing_text",
        "missing_image",
    ]
    assert failed(results) == {}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("text", {"pool": "mean"}),
        ("text", {"pool": "attention", "layer": 0}),
        ("image", {"pool": "attention"}),
        ("concat", {"pool": "attention"}),
        ("add", {"pool": "mean"}),
        ("late", {"pool": "attention"}),
        ("coattention", {"mix": False}),
        ("coattention", {"lstm": False}),
        ("hanet", {"mode": "keyless"}),
        ("hanet", {"mode": "keybased", "pool": "pooled"}),
        ("gated-xattn", {"heads": 2, "reduce": "mean", "dim": 8}),
    ],
)
def test_head_variants_pass_property_suite(name, options):
    assert failed(check_head(name, options=options)) == {}


def test_property_suite_passes_in_float32_with_float32_tolerance():
    results = check_head("gated-xattn", dtype=torch.float32)
    assert failed(results) == {}
    # missing_text / missing_image report how much the logits *do* change
    assert all(r.value <= 1e-4 for r in results if not r.name.startswith("missing_"))


def _toy_batch(n=48, k=3, seed=0):
    """Labels readable from both modalities (text tokens, pooled text, patches, pooled image)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    lengths = torch.randint(1, 7, (n,), generator=g)
    mask = torch.arange(6)[None] < lengths[:, None]
    t_code = torch.randn(k, DIMS["text_dim"], generator=g)
    i_code = torch.randn(k, DIMS["image_dim"], generator=g)
    tokens = t_code[y][:, None, None, :] + 0.5 * torch.randn(n, 6, 2, DIMS["text_dim"], generator=g)
    regions = i_code[y][:, None, :] + 0.5 * torch.randn(n, 5, DIMS["image_dim"], generator=g)
    return Batch(
        text_tokens=tokens,
        text_mask=mask,
        text_pooled=t_code[y] + 0.5 * torch.randn(n, DIMS["text_dim"], generator=g),
        image_regions=regions,
        image_prefix=1,
        image_pooled=i_code[y] + 0.5 * torch.randn(n, DIMS["image_dim"], generator=g),
        labels=y,
    )


@pytest.mark.parametrize("name", BUILTIN)
def test_head_learns_a_toy_problem(name):
    torch.manual_seed(0)
    batch = _toy_batch()
    head = create_head(name, **{**DIMS, "num_classes": 3})
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(batch, head(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- the suite can fail


class _TokenHead(FusionHead):
    """Attention over the last text layer + pooled image; subclasses break one property."""

    needs = frozenset({"text_tokens", "text_mask", "image_pooled"})

    def __init__(self, *, text_dim, image_dim, num_classes, text_layers=1):
        super().__init__(
            text_dim=text_dim, image_dim=image_dim, num_classes=num_classes, text_layers=text_layers
        )
        self.score = nn.Linear(text_dim, 1, bias=False)
        self.fc = nn.Linear(text_dim + image_dim, num_classes)

    def weights(self, scores, mask):
        return masked_softmax(scores, mask)

    def forward_features(self, batch):
        h, mask = batch.text_tokens[:, :, -1], present_mask(batch, "text", batch.text_mask)
        w = self.weights(self.score(h).squeeze(-1), mask)  # (B, T)
        self.expose("text", w, mask)
        image = batch.image_pooled
        if batch.image_present is not None:  # an absent image: zeros, never its stored values
            image = image * batch.image_present[:, None].to(image.dtype)
        return torch.cat([torch.einsum("bt,btd->bd", w, h), image], dim=-1)


class UnmaskedSoftmaxHead(_TokenHead):
    def weights(self, scores, mask):
        return torch.softmax(scores, dim=-1)  # the Chordia & Kumar defect: pads get weight


class BatchSoftmaxHead(_TokenHead):
    def weights(self, scores, mask):
        return masked_softmax(scores, mask, dim=0)  # implicit-dim nn.Softmax() style bug


class NaNOnEmptyTextHead(_TokenHead):
    def weights(self, scores, mask):
        return torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)  # NaN rows


class DeadBiasHead(_TokenHead):
    def __init__(self, **dims):
        super().__init__(**dims)
        self.score = nn.Linear(dims["text_dim"], 1, bias=True)  # bias cancels in the softmax


class UndeclaredNeedsHead(_TokenHead):
    needs = frozenset({"text_tokens", "text_mask"})  # reads image_pooled too


class RegionOrderHead(_TokenHead):
    needs = frozenset({"text_tokens", "text_mask", "image_regions"})

    def forward_features(self, batch):
        regions = batch.image_regions[:, batch.image_prefix :]
        weights = torch.linspace(0, 1, regions.shape[1], dtype=regions.dtype)
        image = torch.einsum("r,brd->bd", weights, regions)  # position-dependent pooling
        h, mask = batch.text_tokens[:, :, -1], batch.text_mask
        w = masked_softmax(self.score(h).squeeze(-1), mask)
        return torch.cat([torch.einsum("bt,btd->bd", w, h), image], dim=-1)


@pytest.mark.parametrize(
    ("head", "must_fail"),
    [
        (UnmaskedSoftmaxHead, {"padding", "attention"}),
        (BatchSoftmaxHead, {"batch_independence", "attention"}),
        (NaNOnEmptyTextHead, {"output", "gradients"}),
        (DeadBiasHead, {"gradients"}),
        (UndeclaredNeedsHead, {"needs"}),
        (RegionOrderHead, {"region_permutation"}),
    ],
)
def test_property_suite_fails_a_broken_head(head, must_fail):
    results = failed(check_head(head))
    assert must_fail <= set(results)
    for name in must_fail:
        assert results[name].detail


def test_property_suite_passes_the_correct_version_of_the_broken_heads():
    assert failed(check_head(_TokenHead)) == {}


def test_suite_reports_deviation_of_unmasked_softmax():
    by_name = {r.name: r for r in check_head(UnmaskedSoftmaxHead)}
    assert by_name["padding"].value > 1e-3
    assert "CHANGED" in by_name["padding"].detail


def test_check_head_reports_bad_options_instead_of_raising():
    (result,) = check_head("hanet", options={"mode": "bogus"})
    assert result.name == "construct" and not result.passed
    assert "mode='bogus'" in result.detail


def test_check_head_uses_the_dims_of_a_built_head():
    head = create_head("text", text_dim=7, image_dim=3, num_classes=4, pool="mean")
    assert failed(check_head(head)) == {}
    assert head.fc.weight.dtype == torch.float32  # the caller's head is not converted


# --------------------------------------------------------------------------- shared layers


def test_masked_softmax_gives_zero_weights_and_finite_grads_on_empty_rows():
    scores = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    w = masked_softmax(scores, mask)
    assert torch.allclose(w.sum(-1), torch.tensor([1.0, 0.0]))
    assert (w[0, 2:] == 0).all() and (w[1] == 0).all()
    (w * torch.randn(2, 4)).sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_scalar_mix_at_init_is_the_layer_mean():
    mix = ScalarMix(3).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(mix(x), x.mean(dim=2))


def test_scalar_mix_with_large_one_hot_scalar_selects_that_layer():
    mix = ScalarMix(3).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([0.0, 100.0, 0.0]))
        mix.gamma.fill_(2.0)
    torch.testing.assert_close(mix(x), 2.0 * x[:, :, 1])


def test_scalar_mix_uses_the_last_layer():
    mix = ScalarMix(3).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y = x.clone()
    y[:, :, -1] += 1.0  # the reference code's zip() dropped exactly this layer
    assert (mix(y) - mix(x)).abs().min() > 0.3


def test_coattention_output_depends_on_the_last_cached_layer():
    head = build("coattention")
    batch = random_batch(**DIMS)
    tokens = batch.text_tokens.clone()
    tokens[:, :, -1] += 1.0
    changed = replace(batch, text_tokens=tokens)
    with torch.no_grad():
        diff = (head(changed) - head(batch))[:2].abs().max()  # rows 0-1 have text
    assert diff > 1e-4


def test_scalar_mix_refuses_a_different_layer_count():
    with pytest.raises(HeadError, match="text_layers=3 but the batch has 2"):
        ScalarMix(3)(torch.randn(1, 2, 2, 4))


def test_bilstm_outputs_zero_at_pads_and_ignores_pad_content_and_count():
    torch.manual_seed(0)
    lstm = MaskedBiLSTM(6, 8).double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 0])[:, None]
    out = lstm(x, mask)
    assert out.shape == (3, 5, 8)
    assert (out[~mask] == 0).all()
    assert (out[mask].abs() > 0).any()
    longer = torch.cat(
        [torch.where(mask[..., None], x, torch.randn_like(x)), torch.randn(3, 4, 6)], 1
    )
    out2 = lstm(longer, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1))
    torch.testing.assert_close(out2[:, :5], out)
    assert (out2[:, 5:] == 0).all()


def test_bilstm_refuses_a_mask_with_gaps():
    lstm = MaskedBiLSTM(4, 4)
    with pytest.raises(HeadError, match="right-padded"):
        lstm(torch.randn(1, 3, 4), torch.tensor([[True, False, True]]))


# --------------------------------------------------------------------------- coattention


def test_coattention_affinity_is_bounded_and_zero_on_pad_rows():
    head = build("coattention")
    batch = random_batch(**DIMS)
    with torch.no_grad():
        head(batch)
    c = head.internals["affinity"]
    assert c.shape == (4, 7, 6)  # (B, T, patches): the CLS prefix is not a region
    assert c.abs().max() < 1
    assert (c[~batch.text_mask] == 0).all()


def test_coattention_region_permutation_permutes_the_image_attention():
    head = build("coattention")
    batch = random_batch(**DIMS)
    perm = torch.tensor([0, 3, 1, 6, 2, 5, 4])  # prefix stays first
    with torch.no_grad():
        out = head(batch)
        a_i = head.attention["image"][0]
        out_p = head(replace(batch, image_regions=batch.image_regions[:, perm]))
        a_i_p = head.attention["image"][0]
    torch.testing.assert_close(a_i_p, a_i[:, perm[1:] - 1])
    torch.testing.assert_close(out_p, out)


def test_coattention_with_zero_bilinear_map_decouples_the_modalities():
    head = build("coattention")
    with torch.no_grad():
        head.w_b.zero_()
    batch = random_batch(**DIMS)
    other = random_batch(**DIMS, seed=5)
    with torch.no_grad():
        head(batch)
        a_t, a_i = head.attention["text"][0], head.attention["image"][0]
        head(replace(batch, image_regions=other.image_regions))  # new image, same text
        torch.testing.assert_close(head.attention["text"][0], a_t)
        head(replace(batch, text_tokens=other.text_tokens))  # new text, same image
        torch.testing.assert_close(head.attention["image"][0], a_i)
    # ...and with the learned W_b the text attention does depend on the image
    coupled = build("coattention")
    with torch.no_grad():
        coupled(batch)
        a_t = coupled.attention["text"][0]
        coupled(replace(batch, image_regions=other.image_regions))
    assert (coupled.attention["text"][0] - a_t).abs().max() > 1e-6


# --------------------------------------------------------------------------- hanet


def test_hanet_concat_fuse_keeps_both_weighted_streams():
    head = build("hanet")
    with torch.no_grad():
        fused = head.forward_features(random_batch(**DIMS))
    alpha = head.attention["streams"][0]
    v_t, v_i = head.internals["v_text"], head.internals["v_image"]
    torch.testing.assert_close(fused, torch.cat([alpha[:, :1] * v_t, alpha[:, 1:] * v_i], -1))


def test_hanet_fused_vector_lies_between_the_two_streams():
    head = build("hanet", fuse="sum")
    batch = random_batch(**DIMS)
    with torch.no_grad():
        fused = head.forward_features(batch)
    alpha = head.attention["streams"][0]
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, dtype=torch.float64))
    v_t, v_i = head.internals["v_text"], head.internals["v_image"]
    eps = 1e-12
    assert (fused >= torch.minimum(v_t, v_i) - eps).all()
    assert (fused <= torch.maximum(v_t, v_i) + eps).all()


def test_hanet_with_a_dominant_text_score_returns_the_text_stream():
    head = build("hanet", fuse="sum")
    with torch.no_grad():
        head.hybrid[-1].weight.zero_()
        head.hybrid[-1].bias.copy_(torch.tensor([60.0, -60.0]))
        fused = head.forward_features(random_batch(**DIMS))
    torch.testing.assert_close(fused, head.internals["v_text"])


@pytest.mark.parametrize("mode", ["hybrid", "keyless", "keybased"])
def test_hanet_modes_feed_d_exactly_the_matching_scores(mode):
    head = build("hanet", mode=mode, key_dim=4)
    v_t, v_i = torch.randn(3, 256, dtype=torch.float64), torch.randn(3, 256, dtype=torch.float64)
    s = head.scores(v_t, v_i)
    expected = []
    if mode != "keybased":
        expected += [
            v_t @ head.text_keyless.weight[0] + head.text_keyless.bias,
            v_i @ head.image_keyless.weight[0] + head.image_keyless.bias,
        ]
    if mode != "keyless":
        k_t, q_t = v_t @ head.text_key.weight.T, v_t @ head.text_query.weight.T
        k_i, q_i = v_i @ head.image_key.weight.T, v_i @ head.image_query.weight.T
        expected += [(k_t * q_i).sum(-1) / 2.0, (k_i * q_t).sum(-1) / 2.0]
    torch.testing.assert_close(s, torch.stack(expected, dim=-1))
    assert head.hybrid[0].in_features == s.shape[1]


# --------------------------------------------------------------------------- gated-xattn


def test_gated_xattn_gate_is_a_scalar_per_valid_token_in_unit_interval():
    head = build("gated-xattn")
    batch = random_batch(**DIMS)
    with torch.no_grad():
        head(batch)
    gate = head.internals["gate"]
    assert gate.shape == (4, 7)
    valid = batch.text_mask.clone()
    valid[2, 0] = True  # the empty text (row 2) is read as the one learned `empty` token
    assert ((gate[valid] > 0) & (gate[valid] < 1)).all()
    assert (gate[~valid] == 0).all()


def test_gated_xattn_closed_gate_ignores_the_image():
    head = build("gated-xattn")
    batch = random_batch(**DIMS)
    other = replace(
        batch,
        image_regions=random_batch(**DIMS, seed=3).image_regions,
        image_pooled=random_batch(**DIMS, seed=3).image_pooled,
    )
    with torch.no_grad():
        open_diff = (head(other) - head(batch)).abs().max()
        head.gate_text.bias.fill_(-1e4)
        closed_diff = (head(other) - head(batch)).abs().max()
    assert open_diff > 1e-6
    assert closed_diff == 0


def test_gated_xattn_identical_patches_give_the_value_of_the_patch():
    head = build("gated-xattn")
    h = torch.randn(2, 3, 16, dtype=torch.float64)
    patch = torch.randn(2, 1, 12, dtype=torch.float64)
    out, w = head.cross_attn(h, patch.expand(2, 5, 12), key_mask=None, query_mask=None)
    torch.testing.assert_close(out, head.cross_attn.v(patch).expand(2, 3, -1))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1, 3, dtype=torch.float64))


def test_gated_xattn_global_image_is_cls_with_a_prefix_else_pooled():
    head = build("gated-xattn")
    for prefix, changes in ((1, False), (0, True)):
        batch = random_batch(**DIMS, image_prefix=prefix)
        new_pooled = replace(batch, image_pooled=batch.image_pooled + 1.0)
        with torch.no_grad():
            diff = (head(new_pooled) - head(batch)).abs().max()
        assert (diff > 1e-6) == changes


def test_gated_xattn_mean_reduce_divides_the_sum_by_the_length():
    torch.manual_seed(0)
    summed = build("gated-xattn")
    meaned = build("gated-xattn", reduce="mean")
    meaned.load_state_dict(summed.state_dict())
    batch = random_batch(**DIMS)
    with torch.no_grad():
        s, m = summed.forward_features(batch), meaned.forward_features(batch)
    lengths = batch.text_mask.sum(1, keepdim=True).clamp(min=1).double()
    torch.testing.assert_close(m, s / lengths)  # the empty text counts as its one token


# --------------------------------------------------------------------------- late


def _late_val_batches(useful: str, n=60, k=5):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, k, (n,), generator=g)
    signal = F.one_hot(y, k).double() * 4 + 0.1 * torch.randn(
        n, k, generator=g, dtype=torch.float64
    )
    noise = torch.randn(n, k, generator=g, dtype=torch.float64) * 4
    text, image = (signal, noise) if useful == "text" else (noise, signal)
    batch = Batch(text_pooled=text, image_pooled=image, labels=y)
    return lambda: [batch.select(range(0, 30)), batch.select(range(30, n))]


@pytest.mark.parametrize(("useful", "alpha"), [("text", 1.0), ("image", 0.0)])
def test_late_tunes_alpha_to_the_useful_half(useful, alpha):
    head = create_head("late", text_dim=5, image_dim=5, num_classes=5, hidden=0, dropout=0.0)
    head.double()
    with torch.no_grad():  # both halves are the identity map: logits = features
        for half in (head.text, head.image):
            half.fc.weight.copy_(torch.eye(5))
            half.fc.bias.zero_()
    head.train()
    out = head.on_fit_end(_late_val_batches(useful))
    assert out["alpha"] == alpha and float(head.alpha) == alpha
    assert out["val_macro_f1"] == 1.0
    assert head.training  # mode restored
    batch = _late_val_batches(useful)()[0]
    with torch.no_grad():
        useful_half = head.text if useful == "text" else head.image
        torch.testing.assert_close(head(batch), F.log_softmax(useful_half(batch), -1))


def test_late_output_is_the_log_of_the_interpolated_probabilities_and_loss_sums_halves():
    head = build("late")
    with torch.no_grad():
        head.alpha.fill_(0.3)
    batch = random_batch(**DIMS)
    logits = head(batch)
    with torch.no_grad():
        p = 0.3 * F.softmax(head.text(batch), -1) + 0.7 * F.softmax(head.image(batch), -1)
        torch.testing.assert_close(logits, p.log())
    expected = F.cross_entropy(head.text(batch), batch.labels) + F.cross_entropy(
        head.image(batch), batch.labels
    )
    torch.testing.assert_close(head.loss(batch, logits), expected)
    torch.testing.assert_close(head.loss(batch, logits.clone()), expected)  # recomputed path


def test_late_alpha_is_saved_with_the_weights():
    head = build("late")
    head.alpha.fill_(0.85)
    fresh = build("late")
    fresh.load_state_dict(head.state_dict())
    assert float(fresh.alpha) == 0.85


# --------------------------------------------------------------------------- contract details


def test_forward_is_forward_head_of_forward_features_and_pre_logits_is_the_neck():
    head = build("concat", hidden=32)
    batch = random_batch(**DIMS)
    with torch.no_grad():
        x = head.forward_features(batch)
        assert x.shape == (4, 256)
        torch.testing.assert_close(head(batch), head.forward_head(x))
        assert head.forward_head(x, pre_logits=True).shape == (4, 32)


def test_pooled_heads_declare_pooled_fields_only():
    assert create_head("text", **DIMS).needs == {"text_pooled"}
    assert create_head("late", **DIMS).needs == {"text_pooled", "image_pooled"}
    assert create_head("concat", **DIMS, pool="mean").needs == {
        "text_tokens",
        "text_mask",
        "image_regions",
    }


def test_missing_batch_field_names_the_field():
    head = create_head("text", **DIMS, pool="mean")
    with pytest.raises(HeadError, match=r"head 'text' needs batch.text_tokens but it is None"):
        head(Batch(text_pooled=torch.randn(2, 16)))


def test_loss_without_labels_says_so():
    head = create_head("text", **DIMS)
    batch = Batch(text_pooled=torch.randn(2, 16))
    with pytest.raises(HeadError, match="needs batch.labels"):
        head.loss(batch, head(batch))


# --------------------------------------------------------------------------- registry


def test_unknown_head_lists_the_available_ones():
    with pytest.raises(HeadError, match=r"unknown head 'nope'; available: add, coattention"):
        create_head("nope", **DIMS)


def test_unknown_option_names_it_and_the_accepted_ones():
    with pytest.raises(
        HeadError,
        match=r"unknown option 'hiden' for head 'text'; accepted options: pool, layer, hidden",
    ):
        create_head("text", **DIMS, hiden=3)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("text", {"pool": "max"}, r"pool='max' is not one of \('pooled', 'mean', 'attention'\)"),
        ("hanet", {"mode": "both"}, r"mode='both' for head 'hanet' must be one of"),
        ("concat", {"dropout": 1.5}, r"dropout=1.5 for head 'concat' must be a number in \[0, 1\)"),
        ("gated-xattn", {"layer": 2}, r"layer=2 for head 'gated-xattn' is outside the 2 cached"),
        ("gated-xattn", {"dim": 10, "heads": 3}, r"dim=10 is not divisible by heads=3"),
        ("coattention", {"lstm_dim": 7}, r"lstm_dim=7 must be even"),
        ("late", {"alpha_grid": 1}, r"alpha_grid=1 for head 'late' must be an integer >= 2"),
    ],
)
def test_bad_option_values_raise_head_error(name, options, message):
    with pytest.raises(HeadError, match=message):
        create_head(name, **DIMS, **options)


def test_bad_dims_raise_head_error():
    with pytest.raises(HeadError, match="num_classes=1 for head 'text' must be an integer >= 2"):
        create_head("text", text_dim=4, image_dim=4, num_classes=1)
    with pytest.raises(HeadError, match="text_dim=0 for head 'text' must be an integer >= 1"):
        create_head("text", text_dim=0, image_dim=4, num_classes=3)


def test_head_names_accept_underscores_and_case():
    assert resolve_head("Gated_XAttn") is resolve_head("gated-xattn")


def test_head_options_are_the_signature_defaults():
    assert head_options("hanet") == {
        "pool": "pooled",
        "layer": -1,
        "dim": 256,
        "key_dim": 64,
        "hidden": 32,
        "dropout": 0.1,
        "mode": "hybrid",
        "fuse": "concat",
        "fc_hidden": 256,
        "hybrid": "joint",
    }


def test_config_rebuilds_the_same_head():
    head = create_head("hanet", **DIMS, mode="keyless", dim=32)
    c = head.config
    assert c["head"] == "hanet" and c["options"]["mode"] == "keyless"
    assert c["options"]["key_dim"] == 64  # defaults recorded too
    again = create_head(c["head"], **c["dims"], **c["options"])
    again.load_state_dict(head.state_dict())  # same parameter names and shapes


def test_register_head_refuses_a_taken_name_and_non_heads():
    with pytest.raises(HeadError, match="head name 'text' is already registered by"):

        @register_head("text")
        class Other(TextHead):
            pass

    with pytest.raises(HeadError, match="not a FusionHead subclass"):
        register_head("thing")(dict)
    with pytest.raises(HeadError, match="is not valid"):
        register_head("9 lives")


def test_factory_heads_are_built_and_checked():
    factory = functools.partial(TextHead, hidden=8)
    head = create_head(factory, **DIMS)
    assert isinstance(head, TextHead) and head.fc.in_features == 8
    with pytest.raises(HeadError, match="returned int, not a FusionHead"):
        create_head(lambda **kw: 3, **DIMS)


USER_HEAD = """
import torch
from torch import nn
import fusion.heads as fh
from fusion.heads import FusionHead, masked_mean

class MeanHead(FusionHead):
    needs = frozenset({"text_tokens", "text_mask", "image_pooled"})

    def __init__(self, *, text_dim, image_dim, num_classes, text_layers=1, width: int = 8):
        super().__init__(text_dim=text_dim, image_dim=image_dim, num_classes=num_classes,
                         text_layers=text_layers)
        self.fc = nn.Linear(text_dim + image_dim, num_classes)
        self.width = width
        self.text_missing, self.image_missing = fh.Missing(text_dim), fh.Missing(image_dim)

    def forward_features(self, batch):
        mask = fh.present_mask(batch, "text", batch.text_mask)  # absent texts: no valid token
        text = masked_mean(batch.text_tokens[:, :, -1], mask)
        text = self.text_missing(text, batch.text_present)
        image = self.image_missing(batch.image_pooled, batch.image_present)
        return torch.cat([text, image], dim=-1)

NOT_A_HEAD = 3
"""


def test_user_head_from_a_file(tmp_path):
    path = tmp_path / "my_heads.py"
    path.write_text(USER_HEAD)
    head = create_head(f"{path}:MeanHead", **DIMS, width=3)
    assert head.width == 3 and head.config["head"] == f"{path}:MeanHead"
    assert head_options(f"{path}:MeanHead") == {"width": 8}
    assert failed(check_head(f"{path}:MeanHead")) == {}
    assert resolve_head(f"{path}:MeanHead") is type(head)  # loaded once


def test_user_head_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "user_mod_heads.py").write_text(USER_HEAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert failed(check_head("user_mod_heads:MeanHead")) == {}


def test_user_head_spec_errors_are_explained(tmp_path):
    path = tmp_path / "my_heads2.py"
    path.write_text(USER_HEAD)
    with pytest.raises(
        HeadError,
        match=r"has no attribute 'Missing'; FusionHead classes found there: \['FusionHead', 'MeanHead'\]",
    ):
        resolve_head(f"{path}:Missing")
    with pytest.raises(HeadError, match="neither a FusionHead class nor a factory"):
        resolve_head(f"{path}:NOT_A_HEAD")
    with pytest.raises(HeadError, match="does not exist"):
        resolve_head(f"{tmp_path / 'nope.py'}:MeanHead")
    with pytest.raises(HeadError, match="cannot import module 'no_such_pkg_xyz.heads'"):
        resolve_head("no_such_pkg_xyz.heads:MeanHead")
    broken = tmp_path / "broken_heads.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(HeadError, match="importing head file .* failed: RuntimeError: boom"):
        resolve_head(f"{broken}:X")


def test_heads_from_installed_entry_points(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "ep_user_heads.py").write_text(USER_HEAD)
    dist = site / "ep_user_heads-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-user-heads\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fusion.heads]\nmean-pool = ep_user_heads:MeanHead\n")
    monkeypatch.syspath_prepend(str(site))
    assert "mean-pool" in list_heads()
    head = create_head("mean-pool", **DIMS)
    assert type(head).__name__ == "MeanHead"
    assert failed(check_head("mean-pool")) == {}


def test_the_custom_head_example_passes_the_suite():
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_head.py"
    results = check_head(f"{example}:GMUHead", options={"dim": 8})
    assert failed(results) == {}
    assert {r.name for r in results if "not applicable" in r.detail} == {"region_permutation",
                                                                          "image_order"}
