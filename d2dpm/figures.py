"""Pictures of a comparison, shared by the CLI and both UIs (pillow for images)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .corrections import METHODS

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
LABEL_WIDTH = 150
PADDING = 4


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → [N, H, W, 3] uint8 (grey images repeated to RGB)."""
    images = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


_FONT_CANDIDATES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_ASCII_FALLBACK = str.maketrans({"η": "eta", "²": "2", "σ": "sigma", "Δ": "Delta", "ε": "eps", "→": "->"})


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (it has the Greek letters of the labels) where installed, else Pillow's own."""
    for candidate in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _text(label: str, font: ImageFont.ImageFont) -> str:
    """The label as the font can draw it: Pillow's fallback font has no Greek letters."""
    return label if isinstance(font, ImageFont.FreeTypeFont) and "DejaVu" in font.getname()[0] else label.translate(_ASCII_FALLBACK)


def _draw_text(draw: ImageDraw.ImageDraw, xy, label: str, size: int, anchor: str = "la", max_width: int | None = None) -> None:
    font = _font(size)
    text = _text(label, font)
    while max_width is not None and len(text) > 1 and font.getlength(text) > max_width:
        text = text[:-2] + "…"
    draw.text(xy, text, fill=INK, font=font, anchor=anchor)


def points_panel(points: torch.Tensor, size: int, extent: float = 3.0, reference: torch.Tensor | None = None) -> Image.Image:
    """A scatter plot of 2-D samples on a square panel (reference points in light grey)."""
    panel = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(panel)

    def to_pixels(xy: torch.Tensor) -> np.ndarray:
        return ((xy.detach().float().cpu().numpy() / extent + 1) * 0.5 * (size - 1)).clip(0, size - 1)

    if reference is not None:
        for x, y in to_pixels(reference):
            draw.point((x, size - 1 - y), fill=(200, 200, 200))
    for x, y in to_pixels(points):
        draw.ellipse((x - 1.5, size - 2.5 - y, x + 1.5, size + 0.5 - y), fill=(31, 119, 180))
    draw.rectangle((0, 0, size - 1, size - 1), outline=(180, 180, 180))
    return panel


def comparison_grid(samples: dict[str, torch.Tensor], kind: str, scale: int = 3, column_titles: list[str] | None = None,
                    title: str | None = None) -> Image.Image:
    """One labelled row per method: its samples side by side (images upscaled `scale`× with
    nearest-neighbour so pixels stay visible), or one scatter panel for point models."""
    rows = []
    for method, batch in samples.items():
        if kind == "image":
            images = to_uint8_images(batch)
            tiles = [Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST) for image in images]
        else:
            tiles = [points_panel(batch, 96 * scale, reference=samples.get("fp"))]
        rows.append((METHODS[method].label if method in METHODS else method, tiles))
    tile_w, tile_h = rows[0][1][0].size
    columns = max(len(tiles) for _, tiles in rows)
    header = 0
    if title:
        header += 26
    if column_titles:
        header += 18
    width = LABEL_WIDTH + columns * (tile_w + PADDING) + PADDING
    if title:
        width = max(width, int(_font(16).getlength(_text(title, _font(16)))) + 2 * PADDING)
    height = header + len(rows) * (tile_h + PADDING) + PADDING
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    y = PADDING
    if title:
        _draw_text(draw, (PADDING, y), title, 16)
        y += 26
    if column_titles:
        for index, text in enumerate(column_titles[:columns]):
            _draw_text(draw, (LABEL_WIDTH + index * (tile_w + PADDING) + tile_w // 2, y), text, 11, anchor="mt", max_width=tile_w)
        y += 18
    for label, tiles in rows:
        _draw_text(draw, (PADDING, y + tile_h // 2), label, 15, anchor="lm")
        for index, tile in enumerate(tiles):
            grid.paste(tile, (LABEL_WIDTH + index * (tile_w + PADDING), y))
        y += tile_h + PADDING
    return grid
