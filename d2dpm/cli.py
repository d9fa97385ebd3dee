"""`d2dpm` command line: stats, compare, train, evaluate, bench.

Bad input prints one line naming the argument and the allowed values, and exits 2: argument
errors, configuration errors, unusable models, statistics files and output locations alike.
`--out` is checked before any work, and outputs are written to a temporary name and moved into
place, so a failed run leaves nothing half-written.

Only this module, `config`, `methods`, `errors`, `tools.arguments` and the standard library load
before a command runs: `d2dpm --help`, a command's `--help` and argument errors never import torch,
diffusers or the modules that run the commands (each handler imports its own). The defaults and the
allowed values come from `d2dpm.config`, the method names from `d2dpm.methods`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from .config import (ACTIVATION_BITS, BACKBONES, CALIB_SAMPLES_RANGE, DEFAULT_CALIB_SAMPLES, DEFAULT_NUM_IMAGES, ETA_RANGE, GRANULARITIES,
                     MAX_CALIB_SEED, MAX_GUIDANCE, MAX_IMAGES, MAX_POINTS, MAX_SEED, NOT_QUANTIZED_BITS, RANGE_METHODS, WEIGHT_BITS,
                     CompareConfig)
from .errors import ConfigError, int_range_text, integer, number
from .methods import METHODS
from .tools.arguments import add_bench_arguments, add_evaluate_arguments, add_train_arguments

EXIT_BAD_INPUT = 2
COMMANDS = {
    "stats": "calibrate the quantizer and fit the per-step noise statistics",
    "compare": "sample with several methods from the same noise and compare them to FP",
    "train": "train an ε-model (emoji, fashion, toy2d) with the DDPM objective",
    "evaluate": "a paper-style results table: methods × bits × η, distances to the data",
    "bench": "speed and memory figures as one JSON object",
}
# What each integer flag allows, for the one-line message when it gets something else
# (the core checks the ranges themselves, with the same words).
ALLOWED = {
    "w_bits": int_range_text(*WEIGHT_BITS, NOT_QUANTIZED_BITS),
    "a_bits": int_range_text(*ACTIVATION_BITS, NOT_QUANTIZED_BITS),
    "steps": "an integer from 1 to the model's training steps (1000 for the embedded models)",
    "calib_samples": int_range_text(*CALIB_SAMPLES_RANGE),
    "calib_seed": int_range_text(0, MAX_CALIB_SEED),
    "class_label": "an integer from 0 to the number of classes − 1",
    "seed": int_range_text(0, MAX_SEED),
    "num_images": f"{int_range_text(1, MAX_IMAGES)} ({MAX_POINTS} for point models)",
}
DEFAULT = CompareConfig()  # every default of stats and compare


class BadArguments(Exception):
    """An argument error, already formatted as the one line to print."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that `main` turns into exit status 2."""

    def error(self, message: str):
        message = " ".join(message.split())
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)  # "argument --w-bits: …" → "--w-bits: …"
        choice = re.match(r"^(\S+): invalid choice: (.*) \(choose from (.*)\)$", message)
        if choice:
            message = f"{choice[1]}: got {choice[2]}; allowed: {choice[3].replace(chr(39), '')}"
        raise BadArguments(f"{self.prog}: error: {message}")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that define a configuration (shared by stats and compare)."""
    parser.add_argument("--model", default=DEFAULT.model,
                        help=f"emoji, fashion, toy2d, a local diffusers folder or a hub id (default: {DEFAULT.model})")
    parser.add_argument("--w-bits", type=integer(ALLOWED["w_bits"]), default=DEFAULT.w_bits,
                        help=f"weight bits: {WEIGHT_BITS[0]}-{WEIGHT_BITS[1]}, or 16/32 for not quantized (default {DEFAULT.w_bits})")
    parser.add_argument("--a-bits", type=integer(ALLOWED["a_bits"]), default=DEFAULT.a_bits,
                        help=f"activation bits: {ACTIVATION_BITS[0]}-{ACTIVATION_BITS[1]}, or 16/32 for not quantized (default {DEFAULT.a_bits})")
    parser.add_argument("--steps", type=integer(ALLOWED["steps"]), default=DEFAULT.steps,
                        help=f"DDIM steps, 1 to the training steps (default {DEFAULT.steps})")
    parser.add_argument("--eta", type=number(f"a number from {ETA_RANGE[0]:g} to {ETA_RANGE[1]:g}"), default=DEFAULT.eta,
                        help=f"DDIM η in [0, 1]: 0 deterministic DDIM, 1 DDPM-like (default {DEFAULT.eta:g})")
    parser.add_argument("--guidance", type=number(f"a number from 0 to {MAX_GUIDANCE:g}"), default=DEFAULT.guidance,
                        help=f"classifier-free guidance scale (default {CompareConfig.default_guidance(True):g} for class-conditional models)")
    parser.add_argument("--calib-samples", type=integer(ALLOWED["calib_samples"]), default=DEFAULT.calib_samples,
                        help=f"calibration trajectories (default {DEFAULT_CALIB_SAMPLES})")
    parser.add_argument("--calib-seed", type=integer(ALLOWED["calib_seed"]), default=DEFAULT.calib_seed,
                        help=f"seed of the calibration trajectories (default {DEFAULT.calib_seed})")
    parser.add_argument("--range", dest="range_method", choices=RANGE_METHODS, default=DEFAULT.range_method,
                        help=f"clipping range search (default {DEFAULT.range_method})")
    parser.add_argument("--all-layers-low-bit", action="store_true", help="quantize the first and last layer at the low bit-width too")
    parser.add_argument("--backbone", choices=BACKBONES, default=DEFAULT.backbone,
                        help="how the quantized network is made: adaround (learned rounding, split skip inputs, bias correction; "
                             "the paper's kind of backbone), bias-correction (round to nearest + per-layer bias correction), "
                             f"rtn (round to nearest) (default {DEFAULT.backbone}; adaround is slow on a CPU without shipped statistics)")


def _config(args: argparse.Namespace, **extra) -> CompareConfig:
    """The configuration the flags describe, checked as far as it can be without the model (so a value
    out of range is refused before anything heavy loads)."""
    return CompareConfig(
        model=args.model,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        calib_samples=args.calib_samples,
        calib_seed=args.calib_seed,
        range_method=args.range_method,
        keep_edge_layers_8bit=not args.all_layers_low_bit,
        backbone=args.backbone,
        **extra,
    ).checked()


def _progress_printer(prefix: str):
    last = {"percent": -10}

    def report(fraction: float, message: str) -> None:
        percent = int(fraction * 100)
        if percent >= last["percent"] + 10 or fraction >= 1:
            last["percent"] = percent
            print(f"{prefix} {percent:3d}%  {message}", file=sys.stderr, flush=True)

    return report


# -- output locations, checked before any work

def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (a broken link counts as existing)."""
    for candidate in [path, *path.parents]:
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove an empty folder in `folder`: the only sure test that we may write there."""
    try:
        probe = tempfile.mkdtemp(prefix=".d2dpm-probe-", dir=folder)
        os.rmdir(probe)
    except OSError as error:
        raise ConfigError("out", what, f"a location this user can write to ({error.strerror or type(error).__name__})") from None


def check_output_folder(out: str) -> Path:
    """`--out` of compare: a folder that exists or can be created, and that we can write into."""
    if not out.strip() or "\x00" in out:
        raise ConfigError("out", out[:200], "a folder path (not empty, no NUL character)")
    try:
        folder = Path(out)
        existing = _nearest_existing(folder.absolute())
        if existing == folder.absolute() and not existing.is_dir():
            raise ConfigError("out", out, "a folder (this path is an existing file)")
        if not existing.is_dir():
            raise ConfigError("out", out, f"a folder path whose parents are folders ({existing.name!r} is a file)")
        for part in folder.absolute().parts:  # names the filesystem would refuse, before any work
            if len(part.encode()) > 255:
                raise ConfigError("out", out[:80] + "…", "a path whose names are at most 255 bytes long")
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError("out", out[:200], f"a usable folder path ({type(error).__name__})") from None
    _probe_writable(existing, out)
    return folder


def check_output_file(out: str, suffix: str) -> Path:
    """`--out` of stats: a file path ending in `suffix` whose folder exists or can be created."""
    if "\x00" in out:
        raise ConfigError("out", out[:200], f"a file name ending in {suffix} (no NUL character)")
    path = Path(out)
    if path.suffix != suffix or not path.stem:
        raise ConfigError("out", out[:200], f"a file name ending in {suffix}")
    try:
        if path.is_dir():
            raise ConfigError("out", out, f"a file name ending in {suffix} (this path is a folder)")
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError("out", out[:200], f"a usable file path ({type(error).__name__})") from None
    check_output_folder(str(path.parent) if str(path.parent) else ".")
    return path


def _replace_atomically(path: Path, write) -> None:
    """Write through `write(temporary_path)`, then move the file into place."""
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# -- the commands

def run_stats(args: argparse.Namespace) -> int:
    out = check_output_file(args.out, ".safetensors")
    config = _config(args)
    from .experiment import compute_statistics
    from .schedule import DDIMSchedule

    model, stats = compute_statistics(config, progress=_progress_printer("calibrating"))
    table = stats.table(DDIMSchedule(model.scheduler_config, stats.config.steps, stats.config.eta))
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.with_suffix(".csv")
    _replace_atomically(csv, lambda path: table.to_csv(path, index=False))
    _replace_atomically(out, stats.save)
    print(f"wrote {out} and {csv}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out)
    config = _config(args, class_label=args.class_label, methods=args.methods, seed=args.seed, num_images=args.num_images,
                     stats_path=args.stats, granularity=args.granularity)
    from .experiment import default_workbench
    from .figures import write_outputs

    result = default_workbench().compare(config, progress=_progress_printer("calibrating"))
    written = write_outputs(result, out)
    columns = ["method", "bits", "mse_to_fp", "psnr_to_fp", "size_mb", "gbops"]
    if result.model.kind == "points":  # PSNR is defined for images in [0, 1]
        columns.remove("psnr_to_fp")
    print(result.metrics[columns].to_string(index=False))
    print(f"wrote {', '.join(path.name for path in written)} to {out}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .tools.train import run_train

    print(f"wrote {run_train(args)}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .tools.evaluate import run_evaluate

    return run_evaluate(args)


def _run_bench(args: argparse.Namespace) -> int:
    from .tools.bench import run_bench_command

    return run_bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (nothing heavy is imported to build it)."""
    parser = Parser(prog="d2dpm", description="D²-DPM: quantization noise in diffusion sampling, and its dual denoising")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    stats = commands.add_parser("stats", help=COMMANDS["stats"], description=COMMANDS["stats"])
    _add_run_arguments(stats)
    stats.add_argument("--out", required=True, help="statistics file to write (.safetensors; a .csv table is written beside it)")
    stats.set_defaults(handler=run_stats)

    compare = commands.add_parser("compare", help=COMMANDS["compare"], description=COMMANDS["compare"])
    _add_run_arguments(compare)
    compare.add_argument("--class", dest="class_label", type=integer(ALLOWED["class_label"]), default=DEFAULT.class_label,
                         help="class index (default: images cycle through the classes)")
    compare.add_argument("--methods", default=",".join(DEFAULT.methods),
                         help=f"comma-separated: {','.join(METHODS)} (default {','.join(DEFAULT.methods)})")
    compare.add_argument("--seed", type=integer(ALLOWED["seed"]), default=DEFAULT.seed)
    compare.add_argument("--num-images", type=integer(ALLOWED["num_images"]), default=DEFAULT.num_images,
                         help=f"samples to draw (default: one per class for a class-conditional model, else {DEFAULT_NUM_IMAGES})")
    compare.add_argument("--granularity", choices=GRANULARITIES, default=DEFAULT.granularity,
                         help=f"noise model per channel or per tensor (default {DEFAULT.granularity})")
    compare.add_argument("--stats", default=None, help="a statistics file from `d2dpm stats` (default: shipped, cached or calibrated now)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.set_defaults(handler=run_compare)

    for name, add, run in (("train", add_train_arguments, _run_train), ("evaluate", add_evaluate_arguments, _run_evaluate),
                           ("bench", add_bench_arguments, _run_bench)):
        command = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        add(command)
        command.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except BadArguments as error:
        print(error, file=sys.stderr)
        return EXIT_BAD_INPUT
    args.argv = argv  # the command as typed, for the records that evaluate and bench write
    try:
        return args.handler(args)
    except ConfigError as error:  # name the command-line flag, not the Python field
        print(f"d2dpm {args.command}: error: {flag_of(error.argument)}: got {_short(error.given)}; allowed: {_one_line(error.allowed)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the disk filled up, a folder vanished while writing: one line, nothing half-written
        print(f"d2dpm {args.command}: error: could not write the outputs: {error.strerror or type(error).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"d2dpm {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


FLAGS = {"class_label": "--class", "range_method": "--range", "keep_edge_layers_8bit": "--all-layers-low-bit",
         "stats_path": "--stats", "channels": "--channels"}


def flag_of(argument: str) -> str:
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _short(value) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= 200 else text[:200] + "…'"


if __name__ == "__main__":
    sys.exit(main())
