"""Render Emoji-32: every fully-qualified emoji of emoji-test.txt that Noto Color Emoji draws as
one glyph, at 32×32 RGB on white, labelled by its Unicode emoji group.

Needs Debian's fonts-noto-color-emoji and unicode-data (or --font / --emoji-test) and Pillow
built with raqm, which shapes ZWJ sequences, skin tones, keycaps and flags through the font's
ligatures. Writes assets/data/emoji32.npz and docs/img/emoji32_contact.png:

    python scripts/render_emoji32.py
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
NATIVE_SIZE = 109  # the only size of the font's colour bitmaps (CBDT strikes)
IMAGE_SIZE = 32


def read_emoji_test(path: Path) -> list[dict]:
    """The fully-qualified entries of emoji-test.txt, in file (CLDR) order, with group and subgroup."""
    entries, group, subgroup = [], None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            fields, comment = line.split("#", 1)
            code_points, status = (part.strip() for part in fields.split(";"))
            if status != "fully-qualified":
                continue
            # comment: "😀 E1.0 grinning face"
            name = comment.strip().split(" ", 2)[2]
            entries.append({"code_points": code_points, "group": group, "subgroup": subgroup, "name": name,
                            "text": "".join(chr(int(cp, 16)) for cp in code_points.split())})
    return entries


def kind_of(code_points: str) -> str:
    """single, skin-tone, flag, keycap or ZWJ sequence (in that order of precedence for ZWJ+tone)."""
    cps = [int(cp, 16) for cp in code_points.split()]
    if 0x200D in cps:
        return "zwj"
    if any(0x1F3FB <= cp <= 0x1F3FF for cp in cps):
        return "skin-tone"
    if 0x20E3 in cps:
        return "keycap"
    if all(0x1F1E6 <= cp <= 0x1F1FF for cp in cps) or cps[0] == 0x1F3F4 and len(cps) > 1:
        return "flag"  # regional-indicator pairs and the tag sequences of England, Scotland, Wales
    return "single"  # one code point, possibly with the emoji presentation selector FE0F


def render(font: ImageFont.FreeTypeFont, text: str, glyph_width: float) -> Image.Image | None:
    """The emoji on white, IMAGE_SIZE² RGB, or None if the font does not draw it as one glyph.

    A sequence the font has no ligature for is laid out as several glyphs (wider than one); a
    code point it lacks becomes .notdef, which in this bitmap font has no pixels.
    """
    if abs(font.getlength(text) - glyph_width) > 0.5:
        return None
    _, _, right, bottom = font.getbbox(text)  # drawn at (0, 0), so the box starts there
    glyph = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return None
    side = max(glyph.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # LANCZOS on a 4x reduction averages over its support: no aliasing of the thin outlines.
    return canvas.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def contact_sheet(images: np.ndarray, labels: np.ndarray, class_names: list[str], per_row: int = 12,
                  scale: int = 3, seed: int = 0) -> Image.Image:
    """One labelled row per group: `per_row` emoji drawn at random from it, upscaled without blur."""
    rng = np.random.default_rng(seed)
    cell, label_width = IMAGE_SIZE * scale + 4, 190
    sheet = Image.new("RGB", (label_width + per_row * cell, len(class_names) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=16)
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        count = len(members)
        draw.text((6, row * cell + cell // 2), f"{name} ({count})", fill="black", font=font, anchor="lm")
        for column, index in enumerate(rng.choice(members, size=min(per_row, count), replace=False)):
            tile = Image.fromarray(images[index]).resize((IMAGE_SIZE * scale,) * 2, Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + column * cell + 2, row * cell + 2))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", type=Path, default=Path(DEFAULT_FONT))
    parser.add_argument("--emoji-test", type=Path, default=Path(DEFAULT_EMOJI_TEST))
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "data" / "emoji32.npz")
    parser.add_argument("--contact-sheet", type=Path, default=REPO / "docs" / "img" / "emoji32_contact.png")
    args = parser.parse_args()
    if not features.check("raqm"):
        raise SystemExit("Pillow has no raqm layout: sequences would not be shaped into single glyphs")

    font = ImageFont.truetype(str(args.font), NATIVE_SIZE)
    glyph_width = font.getlength("\U0001F600")
    # The "Component" group (skin-tone swatches, hair styles) has status `component`, never
    # fully-qualified, so it drops out here and the classes are the other 9 groups.
    entries = read_emoji_test(args.emoji_test)
    class_names = list(dict.fromkeys(e["group"] for e in entries))

    kept, images = [], []
    for entry in entries:
        image = render(font, entry["text"], glyph_width)
        if image is not None:
            kept.append(entry)
            images.append(np.asarray(image))

    def table(rows: list[dict], key) -> collections.Counter:
        return collections.Counter(key(row) for row in rows)

    print(f"{len(kept)} of {len(entries)} fully-qualified emoji drawn as one glyph")
    by_kind_all, by_kind = table(entries, lambda e: kind_of(e["code_points"])), table(kept, lambda e: kind_of(e["code_points"]))
    for kind in by_kind_all:
        print(f"  {kind:10s} {by_kind[kind]:5d} of {by_kind_all[kind]}")
    by_group = table(kept, lambda e: e["group"])
    for name in class_names:
        print(f"  {name:20s} {by_group[name]:5d}")

    labels = np.array([class_names.index(e["group"]) for e in kept], dtype=np.int64)
    images = np.stack(images).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        images=images,
        labels=labels,
        class_names=np.array(class_names),
        emoji=np.array([e["text"] for e in kept]),
        code_points=np.array([e["code_points"] for e in kept]),
        names=np.array([e["name"] for e in kept]),
        subgroups=np.array([e["subgroup"] for e in kept]),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    args.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(images, labels, class_names).save(args.contact_sheet, optimize=True)
    print(f"wrote {args.contact_sheet}")


if __name__ == "__main__":
    main()
