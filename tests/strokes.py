"""Handwriting-like digits drawn with PIL strokes, as a person's photo or scan would give them:
dark ink on light paper, any size, not centred."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# Each digit as pen strokes in a 60 (wide) x 80 (tall) box: ("line", points) or ("arc", bbox, start, end).
STROKES: dict[int, list[tuple]] = {
    0: [("arc", (8, 4, 52, 76), 0, 360)],
    1: [("line", [(24, 16), (36, 4), (34, 76)])],
    2: [("arc", (8, 4, 52, 40), 190, 380), ("line", [(51, 26), (8, 76), (54, 76)])],
    3: [("arc", (10, 4, 50, 40), 200, 450), ("arc", (6, 40, 52, 78), 270, 520)],
    4: [("line", [(38, 4), (6, 54), (56, 54)]), ("line", [(42, 26), (42, 78)])],
    5: [("line", [(50, 4), (14, 4), (12, 36)]), ("arc", (8, 30, 52, 78), 220, 500)],
    6: [("line", [(44, 4), (14, 38), (9, 56)]), ("arc", (8, 36, 52, 78), 0, 360)],
    7: [("line", [(6, 6), (54, 6), (22, 78)])],
    8: [("arc", (12, 4, 48, 38), 0, 360), ("arc", (8, 38, 52, 78), 0, 360)],
    9: [("arc", (8, 4, 50, 42), 0, 360), ("line", [(49, 22), (44, 78)])],
}


def draw_digit(digit: int, path: Path, *, size: int = 100, offset: tuple[int, int] = (8, 6), width: int = 7) -> Path:
    """Digit `digit` in black strokes on white, size x size pixels, its box's top-left corner at offset."""
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    dx, dy = offset
    for stroke in STROKES[digit]:
        if stroke[0] == "line":
            pen.line([(x + dx, y + dy) for x, y in stroke[1]], fill="black", width=width, joint="curve")
        else:
            x0, y0, x1, y1 = stroke[1]
            pen.arc((x0 + dx, y0 + dy, x1 + dx, y1 + dy), stroke[2], stroke[3], fill="black", width=width)
    image.save(path)
    return path
