"""Make the precomputed example the landing page of both apps shows before any click.

Runs the apps' default comparison (the default model and preset, 20 steps, η = 0, guidance 3,
seed 0, one image per class, every default correction row, the default PTQ backbone) through the
core, and writes assets/example/: grid.png (the same grid a run shows), metrics.csv and story.json (the
numbers the interpretation is made of, the title and the full configuration). Re-run it whenever
the shipped model or statistics change:

    python scripts/make_example.py                      # the defaults, into assets/example
    python scripts/make_example.py --backbone rtn       # a quicker backbone (the landing says which)
    python scripts/make_example.py --model path/to/model --out some/folder
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2dpm.config import CompareConfig  # noqa: E402
from d2dpm.errors import ConfigError  # noqa: E402
from d2dpm.experiment import default_workbench  # noqa: E402
from d2dpm.figures import run_title  # noqa: E402
from d2dpm_app import common, story  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.DEFAULT_MODEL, help="default: the apps' default model")
    parser.add_argument("--backbone", default=common.DEFAULT_BACKBONE, choices=common.BACKBONE_CHOICES)
    parser.add_argument("--steps", type=int, default=CompareConfig().steps)
    parser.add_argument("--num-images", type=int, default=None, help="default: the apps' default (one image per class, 1000 points)")
    parser.add_argument("--calib-samples", type=int, default=CompareConfig().calib_samples)
    parser.add_argument("--out", type=Path, default=None, help="default: assets/example (or $D2DPM_EXAMPLE_DIR)")
    args = parser.parse_args(argv)
    # The core's configuration, not the apps' plan: an operator's script is not held to a visitor's
    # budget, and it may calibrate AdaRound for as long as that takes.
    try:
        summary = common.describe_model(args.model)
        if not summary.ok:
            raise ConfigError("model", args.model, summary.message)
        count = args.num_images or common.sample_count(summary).default
        w_bits, a_bits = common.PRESETS[common.DEFAULT_PRESET]
        # η, guidance, seed and methods: the defaults of a comparison
        config = CompareConfig(model=summary.spec, w_bits=w_bits, a_bits=a_bits, steps=args.steps, num_images=count,
                               calib_samples=args.calib_samples, backbone=args.backbone)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = default_workbench().compare(config, progress=lambda f, m: print(f"\r{f:5.0%} {m}", end="", file=sys.stderr))
    print(f"\ncompared in {time.perf_counter() - start:.1f} s ({result.stats_source} statistics)", file=sys.stderr)
    files = story.write_example(result, common.final_grid(result), run_title(result) + f"  backbone {config.backbone}", args.out)
    for path in files:
        print(path)
    print(story.interpretation(story.story_numbers(result)).replace("  \n", "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
