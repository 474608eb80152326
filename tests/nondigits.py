"""Images that are not digits, the kinds people draw or drop on a digit recognizer: noise, blank-ish scans,
shapes, checkerboards, letters rendered from a font, and photo-like textures. Seeded; any size, light paper or
dark, like a user's files (digits predict prepares them as it prepares a digit).

Letters that look like digits in a plain font are left out (O o D Q → 0, I i l j → 1, Z z → 2, S s → 5, G b → 6,
T → 7, B → 8, g q → 9): on those a digit recognizer is right to be unsure, not to say "not a digit"."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CATEGORIES = ("noise", "blank-ish", "shapes", "checkerboard", "letters", "textures")
LETTERS = "ACEFHKMNPRUVWXYacefhkmnruvwxy"


def images(per_category: int, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """(category, grayscale image) for per_category images of every category."""
    rng = np.random.default_rng(seed)
    drawn = []
    for category in CATEGORIES:
        for i in range(per_category):
            side = int(rng.integers(28, 161))
            image = _DRAW[category](rng, side, i)
            if rng.random() < 0.5:  # light paper or dark, as digits come
                image = Image.fromarray(255 - np.asarray(image))
            drawn.append((category, image))
    return drawn


def _noise(rng, side, _):
    scale = int(rng.integers(1, 5))  # pixel noise, or blotchier noise scaled up
    small = rng.integers(0, 256, (max(2, side // scale),) * 2, dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.NEAREST)


def _blank_ish(rng, side, _):
    paper = rng.normal(235, rng.uniform(2, 10), (side, side))
    for _ in range(int(rng.integers(1, 6))):  # specks of dust, a smudge
        y, x = rng.integers(0, side, 2)
        r = int(rng.integers(1, max(2, side // 20)))
        paper[max(0, y - r):y + r, max(0, x - r):x + r] -= rng.uniform(60, 200)
    return Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))


def _shapes(rng, side, i):
    image = Image.new("L", (side, side), 255)
    pen = ImageDraw.Draw(image)
    width = max(1, side // 20)
    m = side // 8
    kind = i % 5
    if kind == 0:  # a filled square or rectangle
        pen.rectangle((m, m + int(rng.integers(0, side // 4)), side - m, side - m), fill=0)
    elif kind == 1:  # a triangle
        pen.polygon([(side // 2, m), (m, side - m), (side - m, side - m)], outline=0, width=width)
    elif kind == 2:  # a five-pointed star
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, side / 2 - m, side / 5)
        pen.polygon([(side / 2 + r * np.cos(a), side / 2 + r * np.sin(a)) for a, r in zip(angles, radii)], fill=0)
    elif kind == 3:  # a grid of dots
        step = max(4, side // int(rng.integers(3, 7)))
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                pen.ellipse((x - width, y - width, x + width, y + width), fill=0)
    else:  # a cross of two thick diagonals
        pen.line((m, m, side - m, side - m), fill=0, width=width * 2)
        pen.line((m, side - m, side - m, m), fill=0, width=width * 2)
    return image


def _checkerboard(rng, side, _):
    cells = int(rng.integers(2, 9))
    board = (np.indices((cells, cells)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(board).resize((side, side), Image.Resampling.NEAREST)


def _letters(rng, side, i):
    image = Image.new("L", (side, side), 255)
    font = ImageFont.load_default(size=max(12, int(side * rng.uniform(0.5, 0.8))))
    ImageDraw.Draw(image).text((side / 2, side / 2), LETTERS[i % len(LETTERS)], fill=0, font=font, anchor="mm",
                               stroke_width=int(rng.integers(0, max(1, side // 40) + 1)), stroke_fill=0)
    return image


def _textures(rng, side, i):
    kind = i % 3
    if kind == 0:  # a smooth random field: clouds, a blurred photo
        field = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))
        return field.filter(ImageFilter.GaussianBlur(side / rng.uniform(6, 20)))
    ys, xs = np.indices((side, side)) / side
    if kind == 1:  # wood grain or fabric: stripes with noise
        angle = rng.uniform(0, np.pi)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * rng.uniform(8, 30))
        return Image.fromarray(np.clip(128 + 90 * wave + rng.normal(0, 25, (side, side)), 0, 255).astype(np.uint8))
    gradient = 255 * (xs * rng.uniform(-1, 1) + ys * rng.uniform(-1, 1))  # a lit wall: a gradient with grain
    gradient = gradient - gradient.min()
    return Image.fromarray(np.clip(gradient + rng.normal(0, 12, (side, side)), 0, 255).astype(np.uint8))


_DRAW = {"noise": _noise, "blank-ish": _blank_ish, "shapes": _shapes, "checkerboard": _checkerboard,
         "letters": _letters, "textures": _textures}
