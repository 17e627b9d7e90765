"""`--append --only NAME` then `--fill NAME` (issue 13 part 1): an append may fill only some
feature sets; the others are "partial" (refused by readers with the fill command) until
`--fill` writes the segment's part. The filled rows equal the same items extracted into a
fresh store, segment 0 is never rewritten, and refusals are one line."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.embedstore_app import app
from embedstore import open_store
from embedstore.errors import FeatureIncompleteError
from embedstore.verify import verify_store

from .test_append import catalogs, fresh_store, rows_of, snapshot, write_rows  # noqa: F401

runner = CliRunner()


def test_only_then_fill_equals_a_full_append(catalogs, tmp_path):  # noqa: F811
    store = fresh_store(tmp_path / "s.zarr", catalogs["old"])
    res = runner.invoke(app, ["extract", str(catalogs["new"]), "--store", str(store),
                              "--append", "--only", "t", "-q"])
    assert res.exit_code == 0, res.output
    s = open_store(store)
    assert s.features["t"].status == "complete" and s.features["i"].status == "partial"
    with pytest.raises(FeatureIncompleteError, match=r"--fill i"):
        s.features["i"].pooled_rows(np.arange(3))
    with pytest.raises(FeatureIncompleteError, match=r"--fill i"):
        s.loader(np.arange(4), text="t", image="i", batch_size=4)
    assert verify_store(s).ok, verify_store(s).problems  # partial is a state, not damage
    info = runner.invoke(app, ["info", str(store)])
    assert info.exit_code == 0 and "partial" in info.output, info.output
    before = {k: v for k, v in snapshot(store).items() if not k.endswith("zarr.json")}

    # a catalog without the segment's items is refused before anything is written
    res = runner.invoke(app, ["extract", str(catalogs["old"]), "--store", str(store),
                              "--fill", "i"])
    assert res.exit_code == 2 and "lacks 10 item(s) of segment 1" in res.output, res.output
    res = runner.invoke(app, ["extract", str(catalogs["all"]), "--store", str(store),
                              "--fill", "nope"])
    assert res.exit_code == 2 and "no such feature set" in res.output

    # the full catalog fills it (any file holding the segment's items does)
    res = runner.invoke(app, ["extract", str(catalogs["all"]), "--store", str(store),
                              "--fill", "i", "-q"])
    assert res.exit_code == 0, res.output
    after = snapshot(store)
    assert all(after[k] == v for k, v in before.items()), "a fill rewrote existing data"
    s = open_store(store)
    assert s.features["i"].status == "complete"
    ref = open_store(fresh_store(tmp_path / "ref.zarr", catalogs["new"]))
    np.testing.assert_array_equal(s.features["i"].regions_rows(np.arange(20, 30)),
                                  ref.features["i"].regions_rows(np.arange(10)))
    assert verify_store(s).ok, verify_store(s).problems
    # filling again is a no-op; --only with an unknown set is one line
    res = runner.invoke(app, ["extract", str(catalogs["all"]), "--store", str(store),
                              "--fill", "i", "-q"])
    assert res.exit_code == 0
    res = runner.invoke(app, ["extract", str(catalogs["new"]), "--store", str(store),
                              "--append", "--only", "x"])
    assert res.exit_code == 2 and "--only x" in res.output
