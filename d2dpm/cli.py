"""`d2dpm` command line: stats, compare, train, evaluate, bench.

Bad input prints one line naming the argument and the allowed values, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError

EXIT_BAD_INPUT = 2


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that define a configuration (shared by stats and compare)."""
    parser.add_argument("--model", default="emoji", help="emoji, fashion, toy2d, a local diffusers folder or a hub id (default: emoji)")
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits: 2-8, or 16/32 for not quantized (default 4)")
    parser.add_argument("--a-bits", type=int, default=8, help="activation bits: 4-8, or 16/32 for not quantized (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps, 1 to the training steps (default 20)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]: 0 deterministic DDIM, 1 DDPM-like (default 0)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 3 for class-conditional models)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration trajectories (default 128)")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration trajectories (default 0)")
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


def run_stats(args: argparse.Namespace) -> int:
    from .experiment import compute_statistics
    from .schedule import DDIMSchedule

    config = _config(args)
    model, stats = compute_statistics(config, progress=_progress_printer("calibrating"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    table = stats.table(DDIMSchedule(model.scheduler_config, stats.config.steps, stats.config.eta))
    table.to_csv(out.with_suffix(".csv"), index=False)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .experiment import default_workbench
    from .figures import write_outputs

    config = _config(args, class_label=args.class_label, methods=args.methods, seed=args.seed, num_images=args.num_images,
                     stats_path=args.stats, granularity=args.granularity)
    result = default_workbench().compare(config, progress=_progress_printer("calibrating"))
    out = Path(args.out)
    written = write_outputs(result, out)
    columns = ["method", "bits", "mse_to_fp", "psnr_to_fp", "size_mb", "gbops"]
    if result.model.kind == "points":  # PSNR is defined for images in [0, 1]
        columns.remove("psnr_to_fp")
    print(result.metrics[columns].to_string(index=False))
    print(f"wrote {', '.join(path.name for path in written)} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2dpm", description="D²-DPM: quantization noise in diffusion sampling, and its dual denoising")
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", help="calibrate the quantizer and fit the per-step noise statistics")
    _add_run_arguments(stats)
    stats.add_argument("--out", required=True, help="statistics file to write (.safetensors; a .csv table is written beside it)")
    stats.set_defaults(handler=run_stats)

    compare = commands.add_parser("compare", help="sample with several methods from the same noise and compare them to FP")
    _add_run_arguments(compare)
    compare.add_argument("--class", dest="class_label", type=int, default=None, help="class index (default: images cycle through the classes)")
    compare.add_argument("--methods", default="fp,q,ptqd,s-d2,d-d2", help="comma-separated: fp,q,ptqd,s-d2,d-d2,mean-only,var-only,s-var-only,oracle")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--num-images", type=int, default=8)
    compare.add_argument("--granularity", choices=("channel", "tensor"), default="channel", help="noise model per channel or per tensor (default channel)")
    compare.add_argument("--stats", default=None, help="a statistics file from `d2dpm stats` (default: shipped, cached or calibrated now)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.set_defaults(handler=run_compare)

    from .bench import add_bench_arguments, run_bench_command
    from .evaluate import add_evaluate_arguments, run_evaluate
    from .train import add_train_arguments, run_train

    train = commands.add_parser("train", help="train an ε-model (emoji, fashion, toy2d) with the DDPM objective")
    add_train_arguments(train)
    train.set_defaults(handler=lambda args: (print(f"wrote {run_train(args)}"), 0)[1])

    evaluate = commands.add_parser("evaluate", help="a paper-style results table: methods × bits × η, distances to the data")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    bench = commands.add_parser("bench", help="speed and memory figures as one JSON object")
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for the records that evaluate and bench write
    try:
        return args.handler(args)
    except ConfigError as error:  # name the command-line flag, not the Python field
        flag = "--" + error.argument.replace("_", "-")
        print(f"d2dpm {args.command}: error: {flag}: got {error.given!r}; allowed: {error.allowed}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
