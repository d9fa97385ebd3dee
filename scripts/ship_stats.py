"""Calibrate the statistics that ship in assets/stats/ for the embedded models' default settings.

    python scripts/ship_stats.py                 # every embedded model present in assets/models
    python scripts/ship_stats.py --models emoji  # one

Files are named by the configuration's key, which is how the workbench finds them; an index
(assets/stats/index.json) says which configuration each file holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from d2dpm.calibration import calibrate
from d2dpm.experiment import SHIPPED_STATS_DIR, CompareConfig
from d2dpm.models import ASSETS_DIR, EMBEDDED_MODELS, load_model

# The paper's bit-widths at 20 DDIM steps, deterministic and DDPM-like, guidance 3 (1 for toy2d).
# The app's default view (W4A8, η = 0) comes first.
IMAGE_SETTINGS = [(w, a, eta) for eta in (0.0, 1.0) for (w, a) in [(4, 8), (8, 8), (4, 6)]]
TOY_SETTINGS = [(4, 8, 0.0), (4, 8, 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(EMBEDDED_MODELS))
    args = parser.parse_args()
    SHIPPED_STATS_DIR.mkdir(parents=True, exist_ok=True)
    index_path = SHIPPED_STATS_DIR / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for name in args.models.split(","):
        if not (ASSETS_DIR / "models" / name).is_dir():
            print(f"skip {name}: not in assets/models")
            continue
        model = load_model(name)
        # Drop entries for this model's older weights: they can never match again.
        index = {key: entry for key, entry in index.items() if not entry["model"].startswith(f"{name}@") or entry["model"] == model.identity}
        for w_bits, a_bits, eta in TOY_SETTINGS if model.kind == "points" else IMAGE_SETTINGS:
            config = CompareConfig(model=name, w_bits=w_bits, a_bits=a_bits, eta=eta).validated(model).stats_config(model)
            path = SHIPPED_STATS_DIR / f"{config.key()}.safetensors"
            started = time.perf_counter()
            calibrate(model, config).stats.save(path)
            index[config.key()] = dataclasses.asdict(config)
            print(f"{name} W{w_bits}A{a_bits} eta={eta:g}: {path.name} in {time.perf_counter() - started:.1f} s")
    for stale in SHIPPED_STATS_DIR.glob("*.safetensors"):
        if stale.stem not in index:
            stale.unlink()
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
