"""The arguments of the workshop's commands, `d2dpm train`, `d2dpm evaluate` and `d2dpm bench`.

Standard library and `d2dpm.config` only: the CLI builds every parser from here, so `d2dpm --help`,
`d2dpm train --help` and argument errors never import torch or the modules that run the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import BACKBONES, DEFAULT_BACKBONE, DEFAULT_CALIB_SAMPLES, CompareConfig
from ..errors import integer, number

DEFAULT = CompareConfig()  # the defaults a comparison starts from

# -- d2dpm train

DATASETS = ("emoji", "fashion", "toy2d")
# Defaults per data set for the flags left out: small image nets tolerate a high learning rate;
# the toy MLP sees fresh points every step and needs far fewer steps.
# The defaults rebuild the shipped models' architecture and settings (their exact commands are in
# assets/models/*/d2dpm_model.json). Emoji needs wide coarse levels and class balance to draw every
# group (16,32,96,128: 3.1 M parameters, 1.38× the CPU time of 16,32,64,64 on 2 threads; 59 % of
# Emoji-32 is People & Body, 2 % Activities) and ~19 k steps with an 8 k-step cool-down. Fashion
# plateaus by ~13 k steps with a 6 k-step cool-down: 7 k more steps changed neither its class
# accuracy nor its FD (docs/results/fashion-model-2026-12-03).
TRAIN_DEFAULTS = {
    "emoji": {"steps": 19000, "batch_size": 1024, "lr": 1e-3, "ema_decay": 0.9995, "cooldown_steps": 8000,
              "channels": "16,32,96,128", "balance_classes": True},
    "fashion": {"steps": 13000, "batch_size": 1024, "lr": 1e-3, "ema_decay": 0.9995, "cooldown_steps": 6000,
                "channels": "16,32,64,64", "balance_classes": False},
    "toy2d": {"steps": 8000, "batch_size": 256, "lr": 2e-3, "ema_decay": 0.998, "cooldown_steps": 3000},
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (created)")
    parser.add_argument("--steps", type=integer(low=1), help="total optimizer steps, counting those of a resumed run "
                        "(default: emoji 19000, fashion 20000, toy2d 8000)")
    parser.add_argument("--batch-size", type=integer(low=1), help="default: 1024 for images, 256 for toy2d")
    parser.add_argument("--lr", type=number("a number above 0", low=0, above_low=True), help="AdamW learning rate after a 500-step warm-up (default: 1e-3 for images, 2e-3 for toy2d)")
    parser.add_argument("--cooldown-steps", type=integer(low=0), help="anneal the learning rate to 0 (cosine) over the last N "
                        "of --steps (default: emoji 8000, fashion 5000, toy2d 3000)")
    parser.add_argument("--seed", type=integer(low=0, high=2**63 - 1), default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--ema-decay", type=number("a number from 0 to 1", low=0, high=1), help="decay of the weight average that is saved "
                        "(default: 0.9995 for images, 0.998 for toy2d)")
    parser.add_argument("--channels", help="image UNet: output channels of its 4 levels, 32×32 to 4×4 (default: emoji 16,32,96,128, fashion 16,32,64,64)")
    parser.add_argument("--balance-classes", action=argparse.BooleanOptionalAction, default=None,
                        help="draw every class equally often rather than every image (default: on for emoji, off for fashion)")
    parser.add_argument("--label-dropout", type=number("a number from 0 to 1", low=0, high=1), default=0.1,
                        help="probability of training on the null class, for classifier-free guidance")
    parser.add_argument("--resume", type=Path, help="a model folder written by this command: continue from its checkpoint")
    parser.add_argument("--init-from", type=Path, help="a model folder (a shipped one in assets/models/, say): start a new run "
                        "from its weights with a fresh optimizer, to see whether one more training cycle still improves it")
    parser.add_argument("--max-minutes", type=number("a number of minutes above 0", low=0, above_low=True), help="stop and save after this much training time "
                        "(for machines that limit a command's run time); --resume continues. The cool-down "
                        "then ends at the time limit if that comes before --steps")
    parser.add_argument("--checkpoint-every", type=integer(low=1), default=2000, help="save the folder every N steps")
    parser.add_argument("--log", type=Path, help="also append the progress lines to this text file")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, capture the training step as a CUDA graph and replay it (default: on)")


# -- d2dpm evaluate

EVALUATE_METHODS = "fp,q,ptqd,s-d2,d-d2,mean-only,var-only,oracle"  # the rows of docs/results.md
DISTANCE_NAMES = ("swd", "fd_fashioncnn", "fd_effnetlite0", "fid_inception", "class_accuracy", "toy")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT.model,
                        help=f"comma-separated: emoji, fashion, toy2d or model folders (default {DEFAULT.model})")
    parser.add_argument("--bits", default="W8A8,W4A8,W4A6", help="comma-separated W/A settings (default W8A8,W4A8,W4A6)")
    parser.add_argument("--methods", default=EVALUATE_METHODS, help=f"comma-separated (default {EVALUATE_METHODS})")
    parser.add_argument("--eta", default="0,1", help="comma-separated DDIM η values in [0, 1] (default 0,1)")
    parser.add_argument("--guidance", default=None, help="comma-separated guidance scales (default: 3 for class-conditional models, 1 otherwise)")
    parser.add_argument("--steps", type=integer(low=1), default=DEFAULT.steps, help=f"DDIM steps (default {DEFAULT.steps})")
    parser.add_argument("--num-samples", type=integer(low=1), default=64, help="samples per cell and seed (in chunks of 64 images or 4096 points; default 64)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the spread is over these (default 0,1,2)")
    parser.add_argument("--calib-samples", type=integer(low=2), default=None, help=f"calibration trajectories (default {DEFAULT_CALIB_SAMPLES})")
    parser.add_argument("--distances", default="swd,fd_fashioncnn,fd_effnetlite0,fid_inception,toy",
                        help="which distances to try (those that do not apply or lack weights are skipped with a note)")
    parser.add_argument("--reference", default=None, help="an .npz of reference images ('images', optional 'labels') for a model "
                        "with no known training data (default: Emoji-32 for emoji, the shipped Fashion-MNIST subset for fashion)")
    parser.add_argument("--backbones", default=DEFAULT_BACKBONE, help=f"comma-separated PTQ backbones: {', '.join(BACKBONES)} "
                        f"(default {DEFAULT_BACKBONE})")
    parser.add_argument("--diagnostics", action="store_true", help="also check the noise model per step on fresh trajectories")
    parser.add_argument("--diagnostic-samples", type=integer(low=1), default=32, help="trajectories for --diagnostics (default 32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=integer(low=1), default=None, help="CPU threads for torch")
    parser.add_argument("--out", required=True, help="output folder for results.csv, per_seed.csv, results.md")
    parser.add_argument("--merge", nargs="+", metavar="FOLDER", default=None,
                        help="instead of sampling, combine earlier evaluate folders (a grid run in pieces, one backbone "
                        "per process, say) into one table in --out; the other flags are not used")


# -- d2dpm bench

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT.model, help=f"model to time (default {DEFAULT.model})")
    parser.add_argument("--w-bits", type=integer("an integer from 2 to 8, or 16, 32"), default=DEFAULT.w_bits)
    parser.add_argument("--a-bits", type=integer("an integer from 4 to 8, or 16, 32"), default=DEFAULT.a_bits)
    parser.add_argument("--steps", type=integer(low=1), default=DEFAULT.steps)
    parser.add_argument("--images", type=integer(low=1), default=None,
                        help="images of the timed comparison (default: a comparison's, one per class for a class-conditional model)")
    parser.add_argument("--against", default=None, help="also time the FP forward of this model (the shipped network a new one "
                        "replaces, say) in alternation with --model's, and report their ratio")
    parser.add_argument("--threads", type=integer(low=1), default=None, help="pin torch's CPU threads (2 as on a free Space)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=integer(low=1), default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--warmup", type=integer(low=0), default=None, help="unmeasured warm-up runs (default 2, quick 1)")
    parser.add_argument("--calib-samples", type=integer(low=2), default=None,
                        help=f"calibration trajectories (default {DEFAULT_CALIB_SAMPLES}, quick 4)")
    parser.add_argument("--calib-repeats", type=integer(low=1), default=None, help="timed calibrations (default 1)")
    parser.add_argument("--gpu-batch", type=integer(low=1), default=256)
    parser.add_argument("--skip-app", action="store_true", help="do not time the app's cold start")
    parser.add_argument("--app-timeout", type=number("a number of seconds above 0", low=0, above_low=True), default=120.0)
    parser.add_argument("--skip-gpu-throughput", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few repeats and a tiny calibration (for tests)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", default=None, help="also write a Markdown table of the figures to this file")
