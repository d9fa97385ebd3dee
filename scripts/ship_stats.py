"""Calibrate the statistics (and quantizers) that ship in assets/stats/ for the embedded models.

    python scripts/ship_stats.py                          # every embedded model, every backbone
    python scripts/ship_stats.py --models emoji --backbones adaround
    python scripts/ship_stats.py --shard 3/14 --device cuda   # one of 14 processes side by side
    python scripts/ship_stats.py --index                  # rebuild assets/stats/index.json only

Files are named by the configuration's key, which is how the workbench finds them; the index
(assets/stats/index.json) says which configuration each file holds and is rebuilt from the files'
own metadata, so shards can run as separate processes. AdaRound fits ~80 layers one after the
other and is slow on a CPU: run it where there is a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from d2dpm.calibration import calibrate
from d2dpm.config import STATS_FORMAT_VERSION
from d2dpm.experiment import SHIPPED_STATS_DIR, CompareConfig
from d2dpm.models import ASSETS_DIR, EMBEDDED_MODELS, load_model
from d2dpm.quant import BACKBONES

# The paper's bit-widths at 20 DDIM steps, deterministic and DDPM-like, guidance 3 (1 for toy2d).
IMAGE_SETTINGS = [(w, a, eta) for eta in (0.0, 1.0) for (w, a) in [(4, 8), (8, 8), (4, 6)]]
TOY_SETTINGS = [(4, 8, 0.0), (4, 8, 1.0)]


def jobs(models: list[str], backbones: list[str]) -> list[tuple[str, int, int, float, str]]:
    """Every configuration, cheapest backbone first: with --shard i/N, each process then does its
    quick round-to-nearest and bias-correction files before its AdaRound ones."""
    backbones = sorted(backbones, key=lambda name: name == "adaround")
    return [(name, w, a, eta, backbone) for backbone in backbones for name in models
            if (ASSETS_DIR / "models" / name).is_dir()
            for w, a, eta in (TOY_SETTINGS if name == "toy2d" else IMAGE_SETTINGS)]


def rebuild_index(folder: Path) -> None:
    """index.json from the configuration each statistics file carries; files of no embedded
    model's current weights, or of an older statistics format, are deleted (they can never match again)."""
    current = {load_model(name).identity for name in EMBEDDED_MODELS if (ASSETS_DIR / "models" / name).is_dir()}
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            config = json.loads(handle.metadata()["config"])
        if config["model"] in current and config.get("format_version") == STATS_FORMAT_VERSION:
            index[path.stem] = config
        else:
            path.unlink()
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    print(f"index: {len(index)} statistics files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(EMBEDDED_MODELS))
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--shard", default="0/1", help="i/N: calibrate every N-th configuration from the i-th")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=SHIPPED_STATS_DIR)
    parser.add_argument("--index", action="store_true", help="only rebuild index.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.index:
        rebuild_index(args.out)
        return
    torch.set_num_threads(1)  # shards run side by side
    shard, shards = (int(part) for part in args.shard.split("/"))
    for name, w_bits, a_bits, eta, backbone in jobs(args.models.split(","), args.backbones.split(","))[shard::shards]:
        model = load_model(name)
        config = CompareConfig(model=name, w_bits=w_bits, a_bits=a_bits, eta=eta, backbone=backbone).validated(model).stats_config(model)
        started = time.perf_counter()
        stats = calibrate(model, config, args.device).stats
        stats.save(args.out / f"{config.key()}.safetensors")
        print(f"{name} W{w_bits}A{a_bits} eta={eta:g} {backbone}: {config.key()} in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
