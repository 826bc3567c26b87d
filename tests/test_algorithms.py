"""E5 end to end on a tiny preset: files, exact columns, ranges, provenance, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icl_heads import estimators as E
from icl_heads.cli import main
from icl_heads.config import ConfigError, get_preset
from icl_heads.experiments.algorithms import RISK_COLUMNS, analysis_ns, run_e5
from icl_heads.io import read_csv, read_json

TINY = {"eval.n_val": 60, "eval.n_test": 80, "eval.pto_steps": [1, 4, 16], "sigmas": [0.0]}


@pytest.fixture(scope="module")
def e5(tmp_path_factory):
    out = tmp_path_factory.mktemp("e5")
    preset = get_preset("smoke", **TINY)
    run_e5(preset, out)
    return preset, out


def test_e5_risk_csv(e5):
    preset, out = e5
    rows = read_csv(out / "e5_risk.csv")
    assert tuple(rows[0].keys()) == RISK_COLUMNS
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    assert names == list(E.ESTIMATOR_NAMES)
    for name in names:
        ns = [int(r["n"]) for r in rows if r["estimator"] == name]
        assert ns == list(range(1, preset.task.n_max + 1))
    for r in rows:
        hp = json.loads(r["hparams"])
        if r["estimator"] in ("ridge", "lasso", "gd", "pto"):
            assert hp, r
        if r["estimator"] == "zero":
            assert float(r["risk_norm"]) == pytest.approx(float(r["risk"]) / (preset.task.s * preset.task.tau**2))
        if np.isfinite(float(r["risk"])):
            assert float(r["ci_low"]) <= float(r["risk_norm"]) <= float(r["ci_high"])


def test_e5_matches_estimator_table(e5):
    """The CSV is exactly what estimator_table (reused by E1) returns for the same preset."""
    preset, out = e5
    rows = read_csv(out / "e5_risk.csv")
    table = E.estimator_table(preset, ["ridge", "pto", "bayes"])
    csv_rows = {(r["estimator"], int(r["n"])): r for r in rows}
    for t in table:
        r = csv_rows[(t["estimator"], t["n"])]
        assert float(r["risk"]) == pytest.approx(t["risk"], rel=1e-12)
        assert json.loads(r["hparams"]) == json.loads(t["hparams"])


def test_e5_vs_T_groups_sigmas_and_provenance(e5):
    preset, out = e5
    ns = analysis_ns(preset)
    assert ns == [2, 5, 10]
    vt = read_csv(out / "e5_vs_T.csv")
    assert {r["estimator"] for r in vt} == {"gd", "pto", "pto_normalized", "pto_fixed"}
    assert sorted({int(r["T"]) for r in vt}) == [1, 4, 16]
    assert all(json.loads(r["hparams"])["T"] == int(r["T"]) for r in vt)
    assert sorted({int(r["n"]) for r in vt}) == ns
    gr = read_csv(out / "e5_groups.csv")
    assert sorted({int(r["h"]) for r in gr}) == list(range(1, preset.task.d + 1))
    assert all(json.loads(r["hparams"])["a"] == 0 for r in gr if r["estimator"] == "pto_groups_a0")
    extra = read_csv(out / "e5_risk_sigma0.csv")
    assert tuple(extra[0].keys()) == RISK_COLUMNS and len(extra) == len(read_csv(out / "e5_risk.csv"))
    for f in ("e5_risk.png", "e5_vs_T.png", "e5_groups.png", "e5_risk_sigma0.png"):
        assert (out / f).stat().st_size > 1000
    cfg = read_json(out / "config.json")
    assert cfg["config"]["task"]["d"] == preset.task.d and cfg["seed"] == preset.seed
    assert set(cfg["hparams"]) == set(E.ESTIMATOR_NAMES)
    assert cfg["hparams"]["ridge"]["1"]["lambda"] in E.RIDGE_LAMBDAS
    assert "0" in cfg["hparams_extra_sigmas"] and "environment" in cfg


def test_e5_subset_and_unknown(tmp_path):
    preset = get_preset("smoke", **{**TINY, "sigmas": []})
    run_e5(preset, tmp_path, names=["ridge", "bayes"])
    assert {r["estimator"] for r in read_csv(tmp_path / "e5_risk.csv")} == {"ridge", "bayes"}
    assert not (tmp_path / "e5_vs_T.csv").exists() and not (tmp_path / "e5_groups.csv").exists()
    with pytest.raises(ConfigError, match="^estimator: unknown 'foo'"):
        run_e5(preset, tmp_path, names=["foo"])


def test_cli_unknown_estimator_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["estimators", "--preset", "smoke", "--out", str(tmp_path), "--only", "ridge,foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: estimator: unknown 'foo'") and "\n" not in err
