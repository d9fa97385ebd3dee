"""The command line end to end on tiny models: outputs, determinism, and bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from d2dpm.cli import main

FAST = ["--steps", "6", "--calib-samples", "8", "--num-images", "3", "--backbone", "bias-correction"]  # AdaRound: test_backbones


def run_compare(model_dir, out, *extra):
    return main(["compare", "--model", str(model_dir), *FAST, "--seed", "7", "--out", str(out), *extra])


def test_compare_writes_every_output(conditional_model_dir, tmp_path):
    methods = "fp,q,ptqd,s-d2,d-d2,mean-only,var-only,oracle"
    assert run_compare(conditional_model_dir, tmp_path / "out", "--eta", "1", "--methods", methods) == 0
    out = tmp_path / "out"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["method"]) == methods.split(",")
    assert metrics.loc[metrics.method == "oracle", "psnr_to_fp"].item() > 60
    trajectory = pd.read_csv(out / "trajectory.csv")
    assert len(trajectory) == 8 * 6 and set(trajectory["step"]) == set(range(6))
    assert (trajectory.loc[trajectory.method == "fp", "rmse_xt"] == 0).all()
    stats = pd.read_csv(out / "stats.csv")
    assert len(stats) == 6 and {"mu_delta", "sigma_delta", "rho", "sigma_cond", "k_t", "ptqd_slope"} <= set(stats.columns)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["w_bits"] == 4 and run["efficiency"]["compression"] > 1
    grid = Image.open(out / "grid.png")
    assert grid.height > 8 * 3 * 8  # eight labelled rows of 3×-scaled 8-pixel images


def test_same_seed_same_configuration_gives_bit_identical_outputs(conditional_model_dir, tmp_path):
    for name in ("a", "b"):
        assert run_compare(conditional_model_dir, tmp_path / name, "--eta", "1", "--methods", "q,s-d2,d-d2") == 0
    for file in ("grid.png", "metrics.csv", "trajectory.csv", "per_image.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert run_compare(conditional_model_dir, tmp_path / "c", "--eta", "1", "--methods", "q,s-d2,d-d2", "--seed", "8") == 0
    assert (tmp_path / "a" / "grid.png").read_bytes() != (tmp_path / "c" / "grid.png").read_bytes()


def test_stats_file_round_trip_through_compare(conditional_model_dir, tmp_path):
    stats = tmp_path / "stats.safetensors"
    common = ["--model", str(conditional_model_dir), "--steps", "6", "--calib-samples", "8", "--backbone", "bias-correction"]
    assert main(["stats", *common, "--out", str(stats)]) == 0
    assert len(pd.read_csv(stats.with_suffix(".csv"))) == 6
    assert run_compare(conditional_model_dir, tmp_path / "out", "--stats", str(stats)) == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["stats_source"] == str(stats)


@pytest.mark.parametrize(
    "arguments, flag",
    [
        (["--w-bits", "9"], "--w-bits"),
        (["--w-bits", "1"], "--w-bits"),
        (["--a-bits", "3"], "--a-bits"),
        (["--steps", "0"], "--steps"),
        (["--steps", "1001"], "--steps"),
        (["--eta", "1.5"], "--eta"),
        (["--eta", "-0.1"], "--eta"),
        (["--num-images", "0"], "--num-images"),
        (["--class", "7"], "--class"),
        (["--methods", "fp,magic"], "--methods"),
    ],
)
def test_bad_input_exits_2_naming_the_argument(conditional_model_dir, tmp_path, capsys, arguments, flag):
    assert main(["compare", "--model", str(conditional_model_dir), "--out", str(tmp_path / "x"), *arguments]) == 2
    error = capsys.readouterr().err
    assert flag in error and "allowed" in error and "Traceback" not in error


def test_missing_model_and_foreign_or_broken_statistics(conditional_model_dir, tmp_path, capsys):
    assert main(["compare", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "--model" in capsys.readouterr().err

    other = tmp_path / "other.safetensors"
    assert main(["stats", "--model", str(conditional_model_dir), "--steps", "5", "--calib-samples", "8", "--backbone", "bias-correction",
                 "--out", str(other)]) == 0
    capsys.readouterr()
    assert run_compare(conditional_model_dir, tmp_path / "x", "--stats", str(other)) == 2  # made for 5 steps, asked for 6
    error = capsys.readouterr().err
    assert "--stats" in error and "steps" in error

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    assert run_compare(conditional_model_dir, tmp_path / "x", "--stats", str(broken)) == 2
    assert "unreadable" in capsys.readouterr().err


def test_python_dash_m_and_argparse_errors_exit_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "d2dpm", "compare", "--model", str(tmp_path / "none"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--model" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "d2dpm", "compare", "--w-bits", "four", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--w-bits" in done.stderr and "Traceback" not in done.stderr
