"""FP samples of a class-conditional embedded model, one row per class, at two guidance scales side by side.

    python scripts/sample_grids.py --model emoji --out docs/img/emoji_samples.png
    python scripts/sample_grids.py --model fashion --out docs/img/fashion_samples.png

Full-precision network, 20 DDIM steps, η = 0; the same initial noise at both guidance scales.
For the embedded models it also prints, per class and guidance, how many of the drawn samples the
shipped classifier (assets/eval/) assigns to the class they were drawn for.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from d2dpm.config import CompareConfig
from d2dpm.figures import BACKGROUND, labelled_image_rows
from d2dpm.models import NoisePredictor, load_model
from d2dpm.schedule import DDIMSchedule
from d2dpm.tools.distances import CLASSIFIER_FILES, ClassAccuracy


@torch.inference_mode()
def class_rows(model, guidance: float, per_class: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    schedule = DDIMSchedule(model.scheduler_config, num_steps=steps, eta=0.0)
    predictor = NoisePredictor(model.network, model.num_classes)
    # All classes in one batch: row c is class c. Independent noise per image; the same noise at
    # every guidance scale, so the two panels differ only by guidance.
    x = torch.randn((model.num_classes * per_class, *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    for coeff in schedule:
        eps = predictor(x, coeff.t, labels, guidance)
        x, _ = schedule.step(x, eps, coeff, coeff.sigma, None)
    return {name: x[c * per_class:(c + 1) * per_class] for c, name in enumerate(model.class_names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--guidance", default="1,3", help="two comma-separated guidance scales")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=CompareConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = load_model(args.model)
    if not model.conditional:
        parser.error(f"--model {args.model} is not class-conditional")
    classifier = ClassAccuracy(args.model) if args.model in CLASSIFIER_FILES else None
    panels = []
    for guidance in (float(g) for g in args.guidance.split(",")):
        rows = class_rows(model, guidance, args.per_class, args.steps, args.seed)
        panels.append(labelled_image_rows(rows, title=f"{args.model}, FP, {args.steps} DDIM steps, guidance {guidance:g}"))
        if classifier:
            hits = [round(classifier(images, torch.full((len(images),), c)) * len(images)) for c, images in enumerate(rows.values())]
            print(f"guidance {guidance:g}: classified as their class {sum(hits)}/{args.per_class * len(rows)}; "
                  + ", ".join(f"{name} {hit}/{args.per_class}" for name, hit in zip(rows, hits)))
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), BACKGROUND)
    for i, panel in enumerate(panels):
        sheet.paste(panel, (sum(p.width for p in panels[:i]), 0))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
