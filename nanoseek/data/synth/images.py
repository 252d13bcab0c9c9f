"""Built-in image tasks with checkable answers: rendered numbers (OCR), coloured shapes (colour, counting, position,
captions), matplotlib bar and line charts (largest bar, value read-out, highest point) and small arrow diagrams.

Every image is drawn from a seeded scene, so a seed gives the same images, questions and answers every time. The
answer is computed from the scene, never read back from pixels. Train and eval are disjoint by scene: a scene's
split is `split_of` (tasks.py) of its content key ("ocr 4821", "bars 3 7 2 5", the sorted shapes), so an eval
number, chart or shape arrangement is never drawn for training, only its parts (digits, colours, bar heights).

OCR varies the font (the TrueType fonts matplotlib ships, plus a handwriting-like stroke font drawn as jittered
polylines), size, colours, rotation and pixel noise. Records (`write_image_set`) are VL conversations:
    {"image": "images/ocr-00012.png", "task", "question", "answer", "split",
     "messages": [{"role": "user", "content": "<image>\\nWhat number is written?"}, {"role": "assistant", ...}]}
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nanoseek.common import write_jsonl
from nanoseek.data.synth.tasks import split_of

SIZE = 64  # pixels per side: what the vl-tiny tower sees
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
LABELS = "ABCD"
_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "cmr10.ttf",
          "STIXGeneral.ttf")
# a seven-segment layout for the stroke font: segment -> ((x0, y0), (x1, y1)) on a 1 × 2 box
_SEGMENTS = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 1)), "c": ((1, 1), (1, 2)), "d": ((0, 2), (1, 2)),
             "e": ((0, 1), (0, 2)), "f": ((0, 0), (0, 1)), "g": ((0, 1), (1, 1))}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd"]


@dataclass
class ImageProblem:
    image: Image.Image
    task: str
    question: str
    answer: str
    key: str  # the scene's content: its split is split_of(key)


def _font_path(name: str) -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


def _stroke_digits(text: str, rng: random.Random, size: int, colour: int) -> Image.Image:
    """Digits as jittered, slanted seven-segment strokes of varying width: handwriting-like, drawn with PIL."""
    w, h = size // 2, size
    img = Image.new("L", (len(text) * (w + 4) + 8, h + 8), 0)
    d = ImageDraw.Draw(img)
    slant = rng.uniform(-0.15, 0.15)
    for i, ch in enumerate(text):
        x0 = 4 + i * (w + 4)
        for seg in _DIGIT_SEGMENTS[int(ch)]:
            (ax, ay), (bx, by) = _SEGMENTS[seg]
            pts = [(x0 + (x + slant * (2 - y)) * w + rng.uniform(-1, 1), 4 + y * h / 2 + rng.uniform(-1, 1))
                   for x, y in ((ax, ay), (bx, by))]
            d.line(pts, fill=colour, width=rng.choice((2, 3)))
    return img


def ocr_scene(rng: random.Random) -> ImageProblem:
    number = str(rng.randint(1000, 9999))
    fg, bg = (rng.randint(0, 90), rng.randint(170, 255)) if rng.random() < 0.7 else \
        (rng.randint(170, 255), rng.randint(0, 90))
    size = rng.randint(15, 21)
    font = rng.choice(_FONTS + ("strokes",))
    if font == "strokes":
        text = _stroke_digits(number, rng, size, 255)
    else:
        f = ImageFont.truetype(_font_path(font), size)
        left, top, right, bottom = f.getbbox(number)
        text = Image.new("L", (right - left + 6, bottom - top + 6), 0)
        ImageDraw.Draw(text).text((3 - left, 3 - top), number, font=f, fill=255)
    text = text.rotate(rng.uniform(-12, 12), expand=True, resample=Image.Resampling.BILINEAR)
    if text.width > SIZE - 2:  # keep every digit inside the frame
        text = text.resize((SIZE - 2, max(1, text.height * (SIZE - 2) // text.width)), Image.Resampling.BILINEAR)
    canvas = np.full((SIZE, SIZE), bg, np.float32)
    x, y = rng.randint(0, SIZE - text.width), rng.randint(0, SIZE - text.height)
    alpha = np.asarray(text, np.float32) / 255
    canvas[y:y + text.height, x:x + text.width] = canvas[y:y + text.height, x:x + text.width] * (1 - alpha) + fg * alpha
    canvas += np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 18), canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).convert("RGB")
    return ImageProblem(image, "ocr", "What number is written in the image?", number, f"ocr {number}")


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def shapes_scene(rng: random.Random) -> ImageProblem:
    """1-4 shapes of distinct colours on a 3 × 3 grid of cells; one question about colour, count, position or a
    caption (shapes left to right)."""
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    colours = rng.sample(list(COLOURS), n)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(image)
    cell = SIZE / 3
    placed = []
    for c, colour, kind in zip(cells, colours, kinds, strict=True):
        cx = (c % 3 + 0.5) * cell + rng.uniform(-2, 2)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-2, 2)
        _draw_shape(d, kind, cx, cy, rng.uniform(6, 8.5), COLOURS[colour])
        placed.append((c % 3, c // 3, colour, kind))
    key = "shapes " + " ".join(f"{k} {col} {x} {y}" for x, y, col, k in sorted(placed))
    unique = [k for k in SHAPES if kinds.count(k) == 1]
    kind_q = rng.choice(["count", "colour", "left", "caption"] if unique else ["count", "caption"])
    if kind_q == "count":
        q, a = "How many shapes are there?", str(n)
    elif kind_q == "colour":
        k = rng.choice(unique)
        q, a = f"What colour is the {k}?", colours[kinds.index(k)]
    elif kind_q == "left":
        x, y, col, k = min(placed)
        q, a = "What colour is the leftmost shape?", col  # ties broken by the top one
    else:
        q = "Describe the image."
        a = ", ".join(f"a {col} {k}" for _, _, col, k in sorted(placed)) + "."
    return ImageProblem(image, f"shapes_{kind_q}", q, a, key)


_FIGURE: list = []  # one Agg figure reused for every chart: creating a figure costs more than drawing one


def _figure_image(draw: Callable) -> Image.Image:
    """What `draw(ax)` plots on SIZE × SIZE pixels with a fixed 0-10 y axis (grid lines every 2)."""
    if not _FIGURE:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(SIZE / 100, SIZE / 100), dpi=100)
        FigureCanvasAgg(fig)
        _FIGURE.append((fig, fig.add_axes((0.12, 0.08, 0.86, 0.9))))
    fig, ax = _FIGURE[0]
    ax.cla()
    draw(ax)
    ax.set_ylim(0, 10)
    ax.set_yticks(range(0, 11, 2))
    ax.tick_params(labelsize=3, length=1, pad=0.5)
    ax.grid(axis="y", linewidth=0.3)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def chart_scene(rng: random.Random) -> ImageProblem:
    """A bar chart (bars A-D left to right) or a line chart (points A-D) with integer values 1-9."""
    values = [rng.randint(1, 9) for _ in LABELS]
    while values.count(max(values)) > 1:  # one largest value, so "which is largest" has one answer
        values[values.index(max(values))] -= 1
    colour = rng.choice(list(COLOURS.values()))
    colour = tuple(v / 255 for v in colour)
    if rng.random() < 0.7:
        image = _figure_image(lambda ax: ax.bar(list(LABELS), values, color=colour, width=0.7))
        kind = rng.choice(["largest", "value"])
        if kind == "largest":
            q, a = "Which bar is the largest?", LABELS[values.index(max(values))]
        else:
            i = rng.randrange(len(LABELS))
            q, a = f"What is the value of bar {LABELS[i]}?", str(values[i])
        return ImageProblem(image, f"chart_{kind}", q, a, "bars " + " ".join(map(str, values)))
    image = _figure_image(lambda ax: ax.plot(list(LABELS), values, color=colour, marker="o", markersize=2,
                                             linewidth=1))
    return ImageProblem(image, "chart_highest", "At which point is the line highest?",
                        LABELS[values.index(max(values))], "line " + " ".join(map(str, values)))


def diagram_scene(rng: random.Random) -> ImageProblem:
    """Two to three labelled boxes and one arrow between two of them: which box does the arrow point to?"""
    n = rng.randint(2, 3)
    labels = rng.sample(LABELS, n)
    cells = rng.sample(range(4), n)  # 2 × 2 layout
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(image)
    font = ImageFont.truetype(_font_path("DejaVuSans-Bold.ttf"), 11)
    centres = []
    for lab, c in zip(labels, cells, strict=True):
        cx, cy = (c % 2 + 0.5) * SIZE / 2, (c // 2 + 0.5) * SIZE / 2
        d.rectangle((cx - 9, cy - 9, cx + 9, cy + 9), outline=(0, 0, 0), width=1)
        d.text((cx, cy), lab, font=font, fill=(0, 0, 0), anchor="mm")
        centres.append((cx, cy))
    src, dst = rng.sample(range(n), 2)
    (x0, y0), (x1, y1) = centres[src], centres[dst]
    v = np.array([x1 - x0, y1 - y0], float)
    v /= np.linalg.norm(v)
    a, b = np.array([x0, y0]) + 11 * v, np.array([x1, y1]) - 11 * v
    d.line([tuple(a), tuple(b)], fill=(200, 0, 0), width=2)
    side = np.array([-v[1], v[0]])
    d.polygon([tuple(b), tuple(b - 6 * v + 3 * side), tuple(b - 6 * v - 3 * side)], fill=(200, 0, 0))
    boxes = " ".join(f"{lab}{c}" for lab, c in sorted(zip(labels, cells, strict=True)))
    key = f"diagram {boxes} {labels[src]}>{labels[dst]}"
    return ImageProblem(image, "diagram", "Which box does the arrow point to?", labels[dst], key)


SCENES: dict[str, Callable[[random.Random], ImageProblem]] = {
    "ocr": ocr_scene, "shapes": shapes_scene, "chart": chart_scene, "diagram": diagram_scene}


def make_image_problems(scene: str, n: int, seed: int, split: str = "train") -> list[ImageProblem]:
    """n problems of one scene family from `split`, drawn in order from the seeded stream (same seed, same list)."""
    if scene not in SCENES:
        raise ValueError(f"unknown image task {scene!r}; known: {', '.join(SCENES)}")
    rng = random.Random(f"{scene}/{seed}")
    out: list[ImageProblem] = []
    for _ in range(200 * n + 1000):
        p = SCENES[scene](rng)
        if split_of(p.key) == split:
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"{scene}: could not draw {n} {split} problems (the scene has too few distinct contents)")


def write_image_set(out_dir: str | Path, counts: dict[str, int], seed: int, split: str = "train") -> Path:
    """PNG files under out_dir/images/ and out_dir/records.jsonl (module docstring); returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for scene, n in counts.items():
        for i, p in enumerate(make_image_problems(scene, n, seed, split)):
            rel = f"images/{split}-{scene}-{i:05d}.png"
            p.image.save(out / rel)
            records.append({"image": rel, "task": p.task, "question": p.question, "answer": p.answer,
                            "split": split, "messages": [{"role": "user", "content": f"<image>\n{p.question}"},
                                                         {"role": "assistant", "content": p.answer}]})
    write_jsonl(out / "records.jsonl", records)
    return out / "records.jsonl"
