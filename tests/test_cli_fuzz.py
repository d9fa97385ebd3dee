"""Bad command lines, table-driven: every one exits 2 with exactly one line on stderr, no traceback,
and writes nothing (no file under --out, nothing left beside it). Also: `--help` and argument errors
do not import torch, and a run that fails while writing its outputs leaves none behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_conditional_model, save_pipeline_folder, tiny_unet
from d2dpm.cli import main

ROOT = Path(__file__).resolve().parent.parent

FAST = ["--steps", "6", "--calib-samples", "8", "--num-images", "2", "--backbone", "rtn"]
OUT = "<out>"  # replaced by a fresh path in the case's folder
M = "<model>"  # the tiny class-conditional model
U = "<unconditional>"  # a tiny unconditional pipeline folder


def _json(folder: Path, relative: str, value) -> None:
    (folder / relative).write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, conditional_model_dir, pipeline_model_dir):
    """Broken model folders, damaged statistics files and awkward output paths, made once."""
    root = tmp_path_factory.mktemp("fuzz_fixtures")
    made = {M: str(conditional_model_dir), U: str(pipeline_model_dir)}

    def model(name, build):
        folder = root / name
        build(folder)
        made[f"<{name}>"] = str(folder)

    def ours(**changes):
        def build(folder):
            save_conditional_model(folder)
            meta = json.loads((folder / "d2dpm_model.json").read_text())
            for key, value in changes.items():
                if value is None:
                    meta.pop(key, None)
                else:
                    meta[key] = value
            _json(folder, "d2dpm_model.json", meta)
        return build

    def bare_unet(config):
        def build(folder):
            tiny_unet().save_pretrained(folder)
            _json(folder, "config.json", config)
        return build

    def pipeline_then(edit):
        def build(folder):
            save_pipeline_folder(folder)
            edit(folder)
        return build

    model("config-list", bare_unet([]))
    model("config-not-json", bare_unet("{not json"))
    def sample_size_text(folder):
        tiny_unet().save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        _json(folder, "config.json", dict(config, sample_size="big"))

    model("config-sample-size", sample_size_text)
    model("config-conditional-class", bare_unet({"_class_name": "UNet2DConditionModel"}))
    model("meta-empty", lambda f: (save_conditional_model(f), _json(f, "d2dpm_model.json", {})))
    model("meta-list", lambda f: (save_conditional_model(f), _json(f, "d2dpm_model.json", [1, 2])))
    model("meta-escape", ours(network_subfolder="../unet"))
    model("meta-kind", ours(kind="video"))
    model("meta-shape", ours(sample_shape=[-3, 8, 8]))
    model("meta-classes", ours(num_classes="three"))
    model("meta-network", ours(network_class="os.system"))
    model("scheduler-list", lambda f: (save_conditional_model(f), _json(f, "scheduler/scheduler_config.json", [])))
    model("garbage-weights", pipeline_then(lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00garbage" * 10)))
    model("truncated-weights", pipeline_then(lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (f / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])))

    def pickle_only(folder):
        save_pipeline_folder(folder)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        torch.save(tiny_unet().state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()

    model("pickle-only", pickle_only)
    (root / "empty-folder").mkdir()
    made["<empty-folder>"] = str(root / "empty-folder")
    (root / "a-file").write_text("not a model")
    made["<a-file>"] = str(root / "a-file")

    # statistics: a good file for the fast configuration, then damaged copies of it
    stats = root / "good.safetensors"
    assert main(["stats", "--model", str(conditional_model_dir), *[a for a in FAST if a not in ("--num-images", "2")],
                 "--out", str(stats)]) == 0
    tensors = load_file(str(stats))
    from safetensors import safe_open

    with safe_open(str(stats), "pt") as handle:
        metadata = handle.metadata()
    missing = {k: v for k, v in tensors.items() if k != "ptqd.sigma"}
    save_file(missing, str(root / "missing-tensor.safetensors"), metadata=metadata)
    short = dict(tensors, timesteps=tensors["timesteps"][:2])
    save_file(short, str(root / "short-table.safetensors"), metadata=metadata)
    save_file(tensors, str(root / "bad-metadata.safetensors"), metadata={"config": "{\"model\": 1}"})
    save_file(tensors, str(root / "no-metadata.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"garbage" * 100)
    (root / "empty.safetensors").write_bytes(b"")
    for name in ("missing-tensor", "short-table", "bad-metadata", "no-metadata", "garbage", "empty"):
        made[f"<stats:{name}>"] = str(root / f"{name}.safetensors")
    made["<stats:other-steps>"] = str(root / "other.safetensors")
    assert main(["stats", "--model", str(conditional_model_dir), "--steps", "5", "--calib-samples", "8", "--backbone", "rtn",
                 "--out", made["<stats:other-steps>"]]) == 0
    return made


def compare(*arguments: str) -> list[str]:
    return ["compare", "--model", M, *FAST, *arguments, "--out", OUT]


def stats(*arguments: str) -> list[str]:
    return ["stats", "--model", M, "--steps", "6", "--calib-samples", "8", "--backbone", "rtn", *arguments, "--out", OUT + ".safetensors"]


CASES = {
    # integer flags: non-integers and values out of range
    "w-bits 3.5": compare("--w-bits", "3.5"),
    "w-bits four": compare("--w-bits", "four"),
    "w-bits empty": compare("--w-bits", ""),
    "w-bits 9": compare("--w-bits", "9"),
    "w-bits 1": compare("--w-bits", "1"),
    "w-bits 12": compare("--w-bits", "12"),
    "a-bits 3": compare("--a-bits", "3"),
    "a-bits 2.0": compare("--a-bits", "2.0"),
    "steps 0": compare("--steps", "0"),
    "steps 1001": compare("--steps", "1001"),
    "steps -1": compare("--steps", "-1"),
    "steps x": compare("--steps", "x"),
    "steps 10^5000": compare("--steps", "1" + "0" * 5000),
    "num-images 0": compare("--num-images", "0"),
    "num-images 65": compare("--num-images", "65"),
    "num-images 1e3": compare("--num-images", "1e3"),
    "calib-samples 1": compare("--calib-samples", "1"),
    "calib-samples 5000": compare("--calib-samples", "5000"),
    "calib-samples 8.5": compare("--calib-samples", "8.5"),
    "calib-seed 2^64": compare("--calib-seed", str(2**64)),
    "calib-seed 2^32": compare("--calib-seed", str(2**32)),
    "calib-seed -1": compare("--calib-seed", "-1"),
    "seed -1": compare("--seed", "-1"),
    "seed 2^63": compare("--seed", str(2**63)),
    "seed 1.5": compare("--seed", "1.5"),
    "class 7": compare("--class", "7"),
    "class -1": compare("--class", "-1"),
    "class x": compare("--class", "x"),
    "class on an unconditional model": ["compare", "--model", U, *FAST, "--class", "1", "--out", OUT],
    # numbers
    "eta 1.5": compare("--eta", "1.5"),
    "eta nan": compare("--eta", "nan"),
    "eta inf": compare("--eta", "inf"),
    "eta x": compare("--eta", "x"),
    "guidance 25": compare("--guidance", "25"),
    "guidance nan": compare("--guidance", "nan"),
    "guidance -1": compare("--guidance", "-1"),
    "guidance on an unconditional model": ["compare", "--model", U, *FAST, "--guidance", "3", "--out", OUT],
    # choices and lists
    "methods empty": compare("--methods", ""),
    "methods comma": compare("--methods", ","),
    "methods spaces": compare("--methods", " , "),
    "methods unknown": compare("--methods", "fp,magic"),
    "range foo": compare("--range", "foo"),
    "granularity pixel": compare("--granularity", "pixel"),
    "backbone gptq": compare("--backbone", "gptq"),
    # argparse itself
    "unknown flag": compare("--foo", "1"),
    "missing --out": ["compare", "--model", M],
    "missing value": ["compare", "--out", OUT, "--steps"],
    "no command": [],
    "unknown command": ["sample", "--out", OUT],
    "stats has no --methods": stats("--methods", "q"),
    # models
    "model empty": ["compare", "--model", "", *FAST, "--out", OUT],
    "model missing folder": ["compare", "--model", "<a-file>-nowhere", *FAST, "--out", OUT],
    "model is a file": ["compare", "--model", "<a-file>", *FAST, "--out", OUT],
    "model empty folder": ["compare", "--model", "<empty-folder>", *FAST, "--out", OUT],
    "model hub id offline": ["compare", "--model", "nobody/no-such-model", *FAST, "--out", OUT],
    "model NUL byte": ["compare", "--model", "emo\x00ji", *FAST, "--out", OUT],
    **{f"model {name}": ["compare", "--model", f"<{name}>", *FAST, "--out", OUT]
       for name in ("config-list", "config-not-json", "config-sample-size", "config-conditional-class", "meta-empty", "meta-list",
                    "meta-escape", "meta-kind", "meta-shape", "meta-classes", "meta-network", "scheduler-list", "garbage-weights",
                    "truncated-weights", "pickle-only")},
    "stats command on a broken model": ["stats", "--model", "<meta-empty>", "--out", OUT + ".safetensors"],
    # statistics files
    **{f"stats {name}": compare("--stats", f"<stats:{name}>")
       for name in ("missing-tensor", "short-table", "bad-metadata", "no-metadata", "garbage", "empty", "other-steps")},
    "stats missing file": compare("--stats", "<a-file>-nowhere.safetensors"),
    "stats is a folder": compare("--stats", "<empty-folder>"),
    # output locations (checked before any work)
    "out is a file": ["compare", "--model", M, *FAST, "--out", "<a-file>"],
    "out under a file": ["compare", "--model", M, *FAST, "--out", "<a-file>/sub"],
    "out empty": ["compare", "--model", M, *FAST, "--out", ""],
    "out name too long": ["compare", "--model", M, *FAST, "--out", OUT + "/" + "n" * 300],
    "out NUL byte": ["compare", "--model", M, *FAST, "--out", OUT + "\x00x"],
    "stats out suffix": ["stats", "--model", M, "--out", OUT + ".bin"],
    "stats out no stem": ["stats", "--model", M, "--out", OUT + "/.safetensors"],
    "stats out is a folder": ["stats", "--model", M, "--out", "<empty-folder>"],
    "stats out under a file": ["stats", "--model", M, "--out", "<a-file>/x.safetensors"],
    "stats out empty": ["stats", "--model", M, "--out", ""],
}


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, fixtures, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = []
    for argument in CASES[name]:
        for placeholder, value in fixtures.items():
            argument = argument.replace(placeholder, value)
        arguments.append(argument.replace(OUT, str(out)))
    fixture_root = Path(fixtures["<a-file>"]).parent
    before = _files(fixture_root), _files(tmp_path)
    status = main(arguments)
    captured = capsys.readouterr()
    lines = captured.err.strip("\n").split("\n")
    assert status == 2, (status, captured.err)
    assert len(lines) == 1 and lines[0].startswith("d2dpm"), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert (_files(fixture_root), _files(tmp_path)) == before  # nothing half-written anywhere near --out


@pytest.mark.parametrize("flag, value, allowed", [("--w-bits", "3.5", "an integer from 2 to 8, or 16, 32"),
                                                  ("--calib-seed", "x", "an integer from 0 to 4294967295"),
                                                  ("--num-images", "1e3", "an integer from 1 to 64")])
def test_integer_flags_say_the_allowed_range(flag, value, allowed, tmp_path, capsys):
    assert main(["compare", flag, value, "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"d2dpm compare: error: {flag}: got {value!r}; allowed: {allowed}" + \
        (" (4096 for point models)" if flag == "--num-images" else "")


@pytest.mark.parametrize("arguments, message", [
    (["train", "--dataset", "emoji", "--steps", "-5"], "--steps: got '-5'; allowed: an integer ≥ 1"),
    (["train", "--dataset", "emoji", "--lr", "0"], "--lr: got '0'; allowed: a number above 0"),
    (["train", "--dataset", "emoji", "--label-dropout", "nan"], "--label-dropout: got 'nan'; allowed: a number from 0 to 1"),
    (["train", "--dataset", "emoji", "--checkpoint-every", "1.5"], "--checkpoint-every: got '1.5'; allowed: an integer ≥ 1"),
    (["evaluate", "--num-samples", "abc"], "--num-samples: got 'abc'; allowed: an integer ≥ 1"),
    (["evaluate", "--calib-samples", "1"], "--calib-samples: got '1'; allowed: an integer ≥ 2"),
    (["bench", "--repeats", "0"], "--repeats: got '0'; allowed: an integer ≥ 1"),
    (["bench", "--w-bits", "3.5"], "--w-bits: got '3.5'; allowed: an integer from 2 to 8, or 16, 32"),
])
def test_workshop_flags_say_what_is_allowed_before_any_work(arguments, message, tmp_path, capsys):
    """train, evaluate and bench refuse a bad number in one line, before loading data or writing anything."""
    assert main([*arguments, "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"d2dpm {arguments[0]}: error: {message}"
    assert not (tmp_path / "x").exists()


HEAVY = ("torch", "diffusers", "pandas", "numpy", "d2dpm.experiment", "d2dpm.corrections", "d2dpm.models", "d2dpm.tools.train",
         "d2dpm.tools.evaluate", "d2dpm.tools.bench", "d2dpm.tools.distances", "d2dpm.tools.datasets")
PROBE = """
import contextlib, io, runpy, sys
sys.argv = ["d2dpm", *sys.argv[1:]]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("d2dpm", run_name="__main__", alter_sys=True)  # python -m d2dpm ARGS
    except SystemExit as exit:
        status = exit.code
print(status, [name for name in {heavy!r} if name in sys.modules], err.getvalue().count("\\n"))
"""


@pytest.mark.parametrize("arguments, status", [(["--help"], 0), (["compare", "--help"], 0), (["compare", "--w-bits", "3.5", "--out", "x"], 2),
                                               (["compare", "--w-bits", "99", "--out", "x"], 2), (["compare", "--eta", "2", "--out", "x"], 2),
                                               (["compare", "--methods", "fp,nope", "--out", "x"], 2), (["stats"], 2),
                                               (["compare", "--out", "/dev/null"], 2), (["nonsense"], 2), (["train", "--help"], 0),
                                               (["train", "--dataset", "mnist", "--out", "x"], 2), (["evaluate", "--help"], 0),
                                               (["bench", "--help"], 0)])
def test_help_and_argument_errors_do_not_import_the_heavy_modules(arguments, status, tmp_path):
    """`python -m d2dpm ARGS`: the help of every command and every error the flags alone show load none of HEAVY."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *arguments], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{status} [] "), done.stdout  # the status, and none of HEAVY imported
    if status == 2:
        assert done.stdout.strip().endswith(" 1")  # one line on stderr


def test_a_run_that_fails_while_writing_leaves_nothing(conditional_model_dir, tmp_path, monkeypatch, capsys):
    import pandas as pd

    calls = {"n": 0}
    original = pd.DataFrame.to_csv

    def failing(self, path=None, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third table: grid.png and two CSVs are already written
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing)
    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
            (out / "notes.txt").write_text("kept")
        calls["n"] = 0
        assert main(["compare", "--model", str(conditional_model_dir), *FAST, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == "d2dpm compare: error: could not write the outputs: No space left on device"
        assert "Traceback" not in err
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
        if out.name == "existing":
            assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        else:
            assert not out.exists()
