"""`d2dpm` command line: stats, compare, train, evaluate, bench.

Bad input prints one line naming the argument and the allowed values, and exits 2: argument
errors, configuration errors, unusable models, statistics files and output locations alike.
`--out` is checked before any work, and outputs are written to a temporary name and moved into
place, so a failed run leaves nothing half-written.

Only this module, `errors` and the standard library load before the command runs: `d2dpm --help`
and argument errors never import torch, diffusers or the command modules (train, evaluate and
bench are imported only when their own command is chosen, since they define its arguments).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError

EXIT_BAD_INPUT = 2
COMMANDS = {
    "stats": "calibrate the quantizer and fit the per-step noise statistics",
    "compare": "sample with several methods from the same noise and compare them to FP",
    "train": "train an ε-model (emoji, fashion, toy2d) with the DDPM objective",
    "evaluate": "a paper-style results table: methods × bits × η, distances to the data",
    "bench": "speed and memory figures as one JSON object",
}
# What each integer flag allows, for the one-line message when it gets something else
# (the core checks the ranges themselves; these texts match its messages).
SEED_RANGE = "an integer from 0 to 9223372036854775807"
ALLOWED = {
    "w_bits": "an integer from 2 to 8, or 16, 32",
    "a_bits": "an integer from 4 to 8, or 16, 32",
    "steps": "an integer from 1 to the model's training steps (1000 for the embedded models)",
    "calib_samples": "an integer from 2 to 4096",
    "calib_seed": "an integer from 0 to 4294967295",
    "class_label": "an integer from 0 to the number of classes − 1",
    "seed": SEED_RANGE,
    "num_images": "an integer from 1 to 64 (4096 for point models)",
}
METHOD_NAMES = "fp, q, ptqd, s-d2, d-d2, mean-only, var-only, s-var-only, oracle"


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


def integer(allowed: str):
    """An argparse type: an integer (written as one), else an error that says what is allowed."""

    def parse(text: str) -> int:
        try:
            return int(text.strip())
        except ValueError:  # "3.5", "four", "", a number of more than 4300 digits
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}") from None

    return parse


def number(allowed: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}") from None

    return parse


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that define a configuration (shared by stats and compare)."""
    parser.add_argument("--model", default="emoji", help="emoji, fashion, toy2d, a local diffusers folder or a hub id (default: emoji)")
    parser.add_argument("--w-bits", type=integer(ALLOWED["w_bits"]), default=4, help="weight bits: 2-8, or 16/32 for not quantized (default 4)")
    parser.add_argument("--a-bits", type=integer(ALLOWED["a_bits"]), default=8, help="activation bits: 4-8, or 16/32 for not quantized (default 8)")
    parser.add_argument("--steps", type=integer(ALLOWED["steps"]), default=20, help="DDIM steps, 1 to the training steps (default 20)")
    parser.add_argument("--eta", type=number("a number from 0 to 1"), default=0.0, help="DDIM η in [0, 1]: 0 deterministic DDIM, 1 DDPM-like (default 0)")
    parser.add_argument("--guidance", type=number("a number from 0 to 20"), default=None, help="classifier-free guidance scale (default 3 for class-conditional models)")
    parser.add_argument("--calib-samples", type=integer(ALLOWED["calib_samples"]), default=None, help="calibration trajectories (default 128)")
    parser.add_argument("--calib-seed", type=integer(ALLOWED["calib_seed"]), default=0, help="seed of the calibration trajectories (default 0)")
    parser.add_argument("--range", dest="range_method", choices=("mse", "minmax"), default="mse", help="clipping range search (default mse)")
    parser.add_argument("--all-layers-low-bit", action="store_true", help="quantize the first and last layer at the low bit-width too")
    parser.add_argument("--backbone", choices=("adaround", "bias-correction", "rtn"), default="bias-correction",
                        help="how the quantized network is made: adaround (learned rounding, split skip inputs, bias correction; "
                             "the paper's kind of backbone), bias-correction (round to nearest + per-layer bias correction), "
                             "rtn (round to nearest) (default bias-correction; adaround is slow on a CPU without shipped statistics)")


def _config(args: argparse.Namespace, **extra):
    from .experiment import DEFAULT_CALIB_SAMPLES, CompareConfig

    return CompareConfig(
        model=args.model,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        calib_samples=args.calib_samples if args.calib_samples is not None else DEFAULT_CALIB_SAMPLES,
        calib_seed=args.calib_seed,
        range_method=args.range_method,
        keep_edge_layers_8bit=not args.all_layers_low_bit,
        backbone=args.backbone,
        **extra,
    )


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
    from .experiment import compute_statistics
    from .schedule import DDIMSchedule

    config = _config(args)
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
    from .experiment import default_workbench
    from .figures import write_outputs

    config = _config(args, class_label=args.class_label, methods=args.methods, seed=args.seed, num_images=args.num_images,
                     stats_path=args.stats, granularity=args.granularity)
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


def _lazy_handler(module: str, function: str):
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), function)(args)

    return handler


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; train, evaluate and bench get their arguments (and their module is imported)
    only when `command` names them."""
    parser = Parser(prog="d2dpm", description="D²-DPM: quantization noise in diffusion sampling, and its dual denoising")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    stats = commands.add_parser("stats", help=COMMANDS["stats"], description=COMMANDS["stats"])
    _add_run_arguments(stats)
    stats.add_argument("--out", required=True, help="statistics file to write (.safetensors; a .csv table is written beside it)")
    stats.set_defaults(handler=run_stats)

    compare = commands.add_parser("compare", help=COMMANDS["compare"], description=COMMANDS["compare"])
    _add_run_arguments(compare)
    compare.add_argument("--class", dest="class_label", type=integer(ALLOWED["class_label"]), default=None,
                         help="class index (default: images cycle through the classes)")
    compare.add_argument("--methods", default="fp,q,ptqd,s-d2,d-d2", help="comma-separated: " + METHOD_NAMES.replace(" ", ""))
    compare.add_argument("--seed", type=integer(ALLOWED["seed"]), default=0)
    compare.add_argument("--num-images", type=integer(ALLOWED["num_images"]), default=8)
    compare.add_argument("--granularity", choices=("channel", "tensor"), default="channel", help="noise model per channel or per tensor (default channel)")
    compare.add_argument("--stats", default=None, help="a statistics file from `d2dpm stats` (default: shipped, cached or calibrated now)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.set_defaults(handler=run_compare)

    for name, (module, add, run) in {"train": ("tools.train", "add_train_arguments", None),
                                     "evaluate": ("tools.evaluate", "add_evaluate_arguments", "run_evaluate"),
                                     "bench": ("tools.bench", "add_bench_arguments", "run_bench_command")}.items():
        sub = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        if command == name:
            import importlib

            getattr(importlib.import_module(f".{module}", __package__), add)(sub)
            sub.set_defaults(handler=_run_train if name == "train" else _lazy_handler(module, run))
    return parser


def _command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
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
