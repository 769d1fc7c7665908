"""Synthetic high-resolution VQA: coloured shapes carrying tiny letters.

Each image is HR_SIZE x HR_SIZE RGB with a textured background, small distractor marks and 3-8
non-overlapping coloured shapes, every (colour, shape) pair at most once. Every shape carries one
letter drawn as a 5x7 one-pixel bitmap glyph: readable at HR (336 px), a 2x2-pixel smudge after the
3x downscale to the LR view (112 px). Colours and shapes stay visible at LR, so the LR view can find
*where* to look, but only the HR view can tell *which letter* is there.

Question families (each answer token needs one region that LR cues find and only HR can read):
  attribute  "what letter is on the red circle ?" -> "k"
             "what colour is the shape marked k ?" -> "red"
  spatial    "is the shape marked k left or right of the blue square ?" -> "left" / "right"
             (the target is named by what only HR shows, the reference by what LR shows, as in
             V* Bench's relative_position)
  multi      "what letters are on the red circle , the blue square and the green triangle ?"
             -> "k p e": each answer token reads a different shape (2-3 targets; 4-6 in the long set)
Control kinds, answerable from the LR view alone, share the vocabulary (training uses them):
  ctl_colour "what colour is the circle ?"   ctl_shape "what shape is the red shape ?"
  ctl_side "is the red circle on the left or right ?"  ctl_spatial "is the red circle left or right of the blue square ?"

Every question carries, per answer token, the shapes that token is about (`Question.targets`; a
spatial answer is about both named shapes) and which shapes it names by their letter (`by_letter`),
which the LR view cannot find. Everything is a pure function of (seed, family, ...): a numpy
Generator is seeded per sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HR_SIZE = 336
LR_SIZE = 112
PATCH = 14  # vision-tower patch size in HR pixels
HR_GRID = HR_SIZE // PATCH  # 24

# Letters whose lowercase forms are not also prompt/question words ("a", "i"), drawn with
# distinct 5x7 glyphs.
LETTERS = ("e", "f", "h", "k", "l", "n", "p", "r", "t", "u", "x", "z")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "diamond")
FAMILIES = ("attribute", "spatial", "multi")
# Targets of a multi question: the benchmark set and the long-answer set.
MULTI_TARGETS = {"synthetic": (2, 3), "synthetic-long": (4, 6)}
BENCHES = {"synthetic": FAMILIES, "synthetic-long": ("multi",)}

COLOUR_RGB = {
    "red": (215, 35, 35),
    "orange": (250, 140, 10),
    "yellow": (240, 220, 30),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (140, 50, 185),
}
# Ink colour of the letter on each shape colour (dark ink on light shapes, white on dark ones).
INK_RGB = {
    "red": (255, 255, 255),
    "orange": (0, 0, 0),
    "yellow": (0, 0, 0),
    "green": (255, 255, 255),
    "blue": (255, 255, 255),
    "purple": (255, 255, 255),
}

_GLYPH_ROWS = {
    "e": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "f": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "h": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "k": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "l": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "n": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "p": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "r": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "t": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "u": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "x": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}
GLYPHS = {k: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for k, rows in _GLYPH_ROWS.items()}
GLYPH_H, GLYPH_W = 7, 5

# Shape size: "radius" in HR px. A 36-52 px shape is 12-17 px in the LR view.
MIN_RADIUS, MAX_RADIUS = 18, 26
MIN_SHAPES, MAX_SHAPES = 3, 8
SPATIAL_MIN_DX = 48  # left/right: centres this far apart and boxes not overlapping in x

QUESTION_TEMPLATES = {
    "letter_of": "what letter is on the {colour} {shape} ?",
    "colour_of": "what colour is the shape marked {letter} ?",
    "spatial": "is the shape marked {letter} left or right of the {colour} {shape} ?",
    "multi": "what letters are on {shapes} ?",  # "the red circle , the blue square and the green triangle"
    "ctl_colour": "what colour is the {shape} ?",
    "ctl_shape": "what shape is the {colour} shape ?",
    "ctl_spatial": "is the {colour} {shape} left or right of the {colour2} {shape2} ?",
    "ctl_side": "is the {colour} {shape} on the left or right ?",
}
FAMILY_KINDS = {"attribute": ("letter_of", "colour_of"), "spatial": ("spatial",), "multi": ("multi",)}
CONTROL_KINDS = ("ctl_colour", "ctl_shape", "ctl_side", "ctl_spatial")
SPATIAL_ANSWERS = ("left", "right")

# LLaVA v1 conversation prompt words (lowercased by the tokenizer's normalizer).
PROMPT_TEXT = (
    "a chat between a curious human and an artificial intelligence assistant . "
    "the assistant gives helpful , detailed , and polite answers to the human's questions . "
    "user : assistant :"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    letter: str  # one of LETTERS
    centre: tuple[int, int]  # (x, y) HR px; also the centre of the letter glyph
    radius: int
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) HR px, inclusive-exclusive
    letter_box: tuple[int, int, int, int]  # glyph pixels (x0, y0, x1, y1)

    @property
    def name(self) -> str:
        """How the LR view can name it: "red circle" (unique in its image)."""
        return f"{self.colour} {self.kind}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "letter": self.letter, "centre": list(self.centre),
                "radius": self.radius, "box": list(self.box), "letter_box": list(self.letter_box)}

    @classmethod
    def from_dict(cls, data: dict) -> "Shape":
        return cls(data["kind"], data["colour"], data["letter"], tuple(data["centre"]), int(data["radius"]),
                   tuple(data["box"]), tuple(data["letter_box"]))


@dataclass(frozen=True)
class Question:
    """A question about a scene's shapes.

    targets: per answer token, the indices of the shapes that token is about (the region selection should find
    for it); by_letter: the shapes the question names by their letter, which only the HR view shows (to find one,
    selection has to bring in every shape's glyph first)."""

    kind: str
    text: str
    answer: str
    targets: tuple[tuple[int, ...], ...]
    by_letter: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.targets) != len(self.answer.split()):
            raise ValueError(f"{len(self.targets)} targets for the answer {self.answer!r}")


@dataclass
class Sample:
    image: Image.Image  # HR_SIZE x HR_SIZE RGB
    question: str
    answer: str
    family: str
    shapes: list[Shape]
    seed: int
    kind: str  # question template key (letter_of / colour_of / spatial / multi)
    token_targets: list[list[int]]  # per answer token, indices into shapes (see Question.targets)
    by_letter: list[int] = field(default_factory=list)
    shape_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) uint8: shape index + 1, 0 = none

    @property
    def targets(self) -> list[int]:
        """Every shape the answer is about, once, in answer order."""
        return list(dict.fromkeys(i for token in self.token_targets for i in token))

    @property
    def target_boxes(self) -> list[tuple[int, int, int, int]]:
        return [self.shapes[i].box for i in self.targets]

    @property
    def token_boxes(self) -> list[list[tuple[int, int, int, int]]]:
        """Per answer token, the boxes of the shapes it is about (what its selection should cover)."""
        return [[self.shapes[i].box for i in token] for token in self.token_targets]

    def to_dict(self) -> dict:
        """JSON-able metadata (everything but the pixels)."""
        return {"seed": self.seed, "family": self.family, "kind": self.kind, "question": self.question,
                "answer": self.answer, "token_targets": [list(t) for t in self.token_targets],
                "by_letter": list(self.by_letter), "target_boxes": [list(b) for b in self.target_boxes],
                "token_boxes": [[list(b) for b in boxes] for boxes in self.token_boxes],
                "shapes": [s.to_dict() for s in self.shapes]}


# --------------------------------------------------------------------------------------------
# Scene rendering


def _shape_polygon(kind: str, cx: int, cy: int, r: int) -> list[tuple[float, float]] | None:
    if kind == "square":
        h = round(r * 0.88)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "diamond":
        h = round(r * 1.2)
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if kind == "triangle":
        # Equilateral, pointing up, centroid at (cx, cy); inradius 0.65 r >= 11 px holds the glyph.
        R = 1.3 * r
        return [
            (cx, cy - R),
            (cx + R * np.sqrt(3) / 2, cy + R / 2),
            (cx - R * np.sqrt(3) / 2, cy + R / 2),
        ]
    return None  # circle


def _bounding_radius(kind: str, r: int) -> float:
    return {"circle": r, "square": r * 0.88 * 1.415, "diamond": r * 1.2, "triangle": r * 1.3}[kind]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill) -> None:
    poly = _shape_polygon(kind, cx, cy, r)
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Light, slightly tinted, low-frequency texture (float32, H x W x 3)."""
    base = rng.uniform(185, 235) + rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 1, size=(6, 6, 3)).astype(np.float32)
    tex = np.asarray(
        Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8)).resize(
            (size, size), Image.BILINEAR
        ),
        dtype=np.float32,
    )
    tex = (tex / 255.0 - 0.5) * rng.uniform(15, 35)
    ys = np.arange(size, dtype=np.float32)[:, None]
    xs = np.arange(size, dtype=np.float32)[None, :]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.08)
    stripes = np.sin((np.cos(angle) * xs + np.sin(angle) * ys) * freq * 2 * np.pi) * rng.uniform(0, 6)
    return np.clip(base[None, None, :] + tex + stripes[:, :, None], 0, 255).astype(np.float32)


def _draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Small dots and short strokes, muted colours. Never letter-like (no crossings)."""
    for _ in range(int(rng.integers(8, 25))):
        grey = int(rng.integers(60, 170))
        tint = rng.integers(-25, 26, size=3)
        col = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
        x, y = (int(v) for v in rng.integers(4, size - 4, size=2))
        if rng.random() < 0.5:
            rad = int(rng.integers(1, 4))
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col)
        else:
            length = rng.uniform(5, 14)
            ang = rng.uniform(0, np.pi)
            dx, dy = length * np.cos(ang) / 2, length * np.sin(ang) / 2
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=col, width=int(rng.integers(1, 3)))


def _place_shapes(
    rng: np.random.Generator, n: int, grid_aligned: bool, max_tries: int = 400
) -> list[tuple[int, int, int, str]] | None:
    """n non-overlapping (cx, cy, r, kind) placements fully inside the image, or None."""
    placed: list[tuple[int, int, int, str]] = []
    for _ in range(max_tries):
        if len(placed) == n:
            break
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        r = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
        br = _bounding_radius(kind, r)
        lo, hi = int(np.ceil(br)) + 3, HR_SIZE - int(np.ceil(br)) - 3
        if grid_aligned:
            # Shape (and so glyph) centred on an HR patch centre: 14 k + 7.
            kmin, kmax = int(np.ceil((lo - 7) / PATCH)), int(np.floor((hi - 7) / PATCH))
            cx, cy = (int(v) * PATCH + 7 for v in rng.integers(kmin, kmax + 1, size=2))
        else:
            cx, cy = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        ok = True
        for px, py, pr, pk in placed:
            if np.hypot(cx - px, cy - py) < br + _bounding_radius(pk, pr) + 6:
                ok = False
                break
        if ok:
            placed.append((cx, cy, r, kind))
    return placed if len(placed) == n else None


def _shape_box(kind: str, cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    poly = _shape_polygon(kind, cx, cy, r)
    if poly is None:
        return (cx - r, cy - r, cx + r + 1, cy + r + 1)
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return (int(np.floor(min(xs))), int(np.floor(min(ys))), int(np.ceil(max(xs))) + 1, int(np.ceil(max(ys))) + 1)


def glyph_box(cx: int, cy: int) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1) of the letter glyph drawn on a shape centred at (cx, cy).

    [x0, x0+5) x [y0, y0+7); for a patch centre 14k+7 that is 14k+5..14k+9 horizontally and 14k+4..14k+10
    vertically: 4-5 px of margin inside the patch."""
    x0, y0 = cx - GLYPH_W // 2, cy - GLYPH_H // 2 - 1
    return x0, y0, x0 + GLYPH_W, y0 + GLYPH_H


def _make_shape(placement: tuple[int, int, int, str], colour: str, letter: str) -> Shape:
    cx, cy, r, kind = placement
    return Shape(kind=kind, colour=colour, letter=letter, centre=(cx, cy), radius=r, box=_shape_box(kind, cx, cy, r),
                 letter_box=glyph_box(cx, cy))


def render_scene(rng: np.random.Generator, shapes: list[Shape]) -> tuple[Image.Image, np.ndarray]:
    """The image of these shapes on a fresh background, and its shape map (shape index + 1 per pixel, 0 = none)."""
    size = HR_SIZE
    bg = _background(rng, size)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _draw_distractors(rng, draw, size)
    shape_map = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(shape_map)
    for i, s in enumerate(shapes):
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOUR_RGB[s.colour], jitter))
        _draw_shape(draw, s.kind, *s.centre, s.radius, fill)
        _draw_shape(mdraw, s.kind, *s.centre, s.radius, i + 1)
    arr = np.asarray(img, dtype=np.float32).copy()
    for s in shapes:
        gx, gy, _, _ = s.letter_box
        ys, xs = np.nonzero(GLYPHS[s.letter])
        arr[gy + ys, gx + xs] = INK_RGB[s.colour]
    arr += rng.normal(0, 4.0, size=arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image, np.asarray(shape_map, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------
# Questions


def clearly_left(a: Shape, b: Shape) -> bool:
    """a is clearly left of b: centres SPATIAL_MIN_DX apart and no horizontal overlap of the boxes."""
    return b.centre[0] - a.centre[0] >= SPATIAL_MIN_DX and a.box[2] <= b.box[0]


def _shape_list(names: list[str]) -> str:
    phrases = [f"the {n}" for n in names]
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def ask(shapes: list[Shape], kind: str, rng: np.random.Generator, *, target: int | None = None,
        answer: str | None = None, multi_targets: tuple[int, int] = MULTI_TARGETS["synthetic"]) -> Question | None:
    """A question of `kind` about these shapes, or None when they allow none.

    Without `target` / `answer` they are drawn from `rng`; a sample fixes them first so its answers are balanced:
    `target` is the shape the question is about (letter_of, colour_of), `answer` the side (spatial). multi asks for
    `multi_targets` (inclusive range) shapes, at most all but one of them.
    """
    n = len(shapes)
    if kind in ("letter_of", "colour_of"):
        t = int(rng.integers(n)) if target is None else target
        s = shapes[t]
        if kind == "letter_of":
            return Question(kind, QUESTION_TEMPLATES[kind].format(colour=s.colour, shape=s.kind), s.letter, ((t,),))
        return Question(kind, QUESTION_TEMPLATES[kind].format(letter=s.letter), s.colour, ((t,),), (t,))
    if kind in ("spatial", "ctl_spatial"):
        side = SPATIAL_ANSWERS[int(rng.integers(2))] if answer is None else answer
        if kind == "spatial":  # a reference with shapes on both sides: its position says nothing of the answer
            refs = [r for r in range(n) if any(clearly_left(shapes[i], shapes[r]) for i in range(n))
                    and any(clearly_left(shapes[r], shapes[i]) for i in range(n))]
        else:
            refs = list(range(n))
        rng.shuffle(refs)
        for r in refs:
            ref = shapes[r]
            on_side = [i for i in range(n)
                       if (clearly_left(shapes[i], ref) if side == "left" else clearly_left(ref, shapes[i]))]
            if not on_side:
                continue
            t = on_side[int(rng.integers(len(on_side)))]
            s = shapes[t]
            if kind == "spatial":
                text = QUESTION_TEMPLATES[kind].format(letter=s.letter, colour=ref.colour, shape=ref.kind)
                return Question(kind, text, side, ((t, r),), (t,))
            text = QUESTION_TEMPLATES[kind].format(colour=s.colour, shape=s.kind, colour2=ref.colour, shape2=ref.kind)
            return Question(kind, text, side, ((t, r),))
        return None
    if kind == "multi":
        lo, hi = multi_targets
        hi = min(hi, n - 1)
        if hi < lo:
            return None
        k = int(rng.integers(lo, hi + 1))
        chosen = [int(i) for i in rng.permutation(n)[:k]]
        text = QUESTION_TEMPLATES[kind].format(shapes=_shape_list([shapes[i].name for i in chosen]))
        return Question(kind, text, " ".join(shapes[i].letter for i in chosen), tuple((i,) for i in chosen))
    if kind == "ctl_side":  # which half of the image a shape is in, for shapes clearly in one
        sides = [i for i in range(n) if abs(shapes[i].centre[0] - HR_SIZE / 2) >= SPATIAL_MIN_DX / 2]
        if not sides:
            return None
        s = shapes[sides[int(rng.integers(len(sides)))]]
        text = QUESTION_TEMPLATES[kind].format(colour=s.colour, shape=s.kind)
        return Question(kind, text, "left" if s.centre[0] < HR_SIZE / 2 else "right", ((shapes.index(s),),))
    if kind in ("ctl_colour", "ctl_shape"):  # the only shape of its kind (colour): ask its colour (kind)
        key = (lambda s: s.kind) if kind == "ctl_colour" else (lambda s: s.colour)
        values = [key(s) for s in shapes]
        unique = [i for i in range(n) if values.count(values[i]) == 1]
        if not unique:
            return None
        t = unique[int(rng.integers(len(unique)))]
        s = shapes[t]
        if kind == "ctl_colour":
            return Question(kind, QUESTION_TEMPLATES[kind].format(shape=s.kind), s.colour, ((t,),))
        return Question(kind, QUESTION_TEMPLATES[kind].format(colour=s.colour), s.kind, ((t,),))
    raise ValueError(f"unknown question kind {kind!r}")


def _family_index(family: str) -> int:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return FAMILIES.index(family)


def _combos(rng: np.random.Generator, kinds: list[str], first_colour: str | None, first_index: int) -> list[str] | None:
    """Colours for the given kinds, with every (colour, kind) pair unique in the image."""
    colours: list[str | None] = [None] * len(kinds)
    used: set[tuple[str, str]] = set()
    if first_colour is not None:
        colours[first_index] = first_colour
        used.add((first_colour, kinds[first_index]))
    for i, k in enumerate(kinds):
        if colours[i] is not None:
            continue
        options = [c for c in COLOURS if (c, k) not in used]
        if not options:
            return None
        c = options[int(rng.integers(len(options)))]
        colours[i] = c
        used.add((c, k))
    return colours  # type: ignore[return-value]


def make_sample(seed: int, family: str, grid_aligned: bool = True,
                multi_targets: tuple[int, int] = MULTI_TARGETS["synthetic"]) -> Sample:
    """One sample, a pure function of (seed, family, grid_aligned, multi_targets).

    grid_aligned: shape centres (and the letter glyphs on them) sit on HR patch centres (14 k + 7), so each glyph
    lies inside one 14-px HR patch. False places shapes anywhere (harder to learn). multi_targets: how many shapes
    (inclusive range) a multi question names; the image then holds at least one more.
    """
    fam = _family_index(family)
    key = [int(seed), fam, int(grid_aligned)] + (list(multi_targets) if family == "multi" else [])
    rng = np.random.default_rng(key)
    kind = FAMILY_KINDS[family][int(rng.integers(len(FAMILY_KINDS[family])))]
    if family == "multi":  # how many shapes it names first (balanced), then at least one more in the image
        named = int(rng.integers(multi_targets[0], multi_targets[1] + 1))
        multi_targets = (named, named)
    n = int(rng.integers(max(MIN_SHAPES, multi_targets[0] + 1) if family == "multi" else MIN_SHAPES,
                         MAX_SHAPES + 1))

    # Answers drawn first so they are uniform over their choices.
    answer_letter = LETTERS[int(rng.integers(len(LETTERS)))]
    answer_colour = COLOURS[int(rng.integers(len(COLOURS)))]
    answer_side = SPATIAL_ANSWERS[int(rng.integers(2))]

    while True:
        placements = _place_shapes(rng, n, grid_aligned)
        if placements is None:
            continue
        kinds = [p[3] for p in placements]
        target = int(rng.integers(n))
        colours = _combos(rng, kinds, answer_colour if kind == "colour_of" else None, target)
        if colours is None:
            continue
        others = [l for l in LETTERS if l != answer_letter]
        letters = [others[int(j)] for j in rng.permutation(len(others))[: n - 1]]
        letters.insert(target, answer_letter)
        shapes = [_make_shape(p, c, l) for p, c, l in zip(placements, colours, letters)]
        question = ask(shapes, kind, rng, target=target, answer=answer_side, multi_targets=multi_targets)
        if question is not None:
            break

    image, shape_map = render_scene(rng, shapes)
    return Sample(image=image, question=question.text, answer=question.answer, family=family, shapes=shapes,
                  seed=int(seed), kind=kind, token_targets=[list(t) for t in question.targets],
                  by_letter=list(question.by_letter), shape_map=shape_map)


def make_split(n: int, seed: int, families: tuple[str, ...] | list[str] = FAMILIES, grid_aligned: bool = True,
               multi_targets: tuple[int, int] = MULTI_TARGETS["synthetic"]) -> list[Sample]:
    """n samples with seeds seed, seed+1, ...; families taken round-robin (balanced)."""
    families = tuple(families)
    return [make_sample(seed + i, families[i % len(families)], grid_aligned, multi_targets) for i in range(n)]


def bench_split(bench: str, n: int, seed: int) -> list[Sample]:
    """The samples of a named benchmark ("synthetic": every family, 2-3 multi targets; "synthetic-long": multi
    questions with 4-6 targets, the long-answer set)."""
    if bench not in BENCHES:
        raise ValueError(f"unknown synthetic benchmark {bench!r}; choose one of {', '.join(BENCHES)}")
    return make_split(n, seed, BENCHES[bench], multi_targets=MULTI_TARGETS[bench])


# --------------------------------------------------------------------------------------------
# Vocabulary and tokenizer

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word-level split used by the tokenizer: lowercase, words and single punctuation marks."""
    return _WORD_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word the generator or the LLaVA v1 prompt can produce (no special tokens), sorted."""
    vocab: set[str] = set(words(PROMPT_TEXT))
    for template in QUESTION_TEMPLATES.values():
        vocab.update(w for w in words(re.sub(r"\{\w+\}", " ", template)))
    vocab.update(LETTERS, COLOURS, SHAPES, SPATIAL_ANSWERS)
    return sorted(vocab)


def build_tokenizer(out_dir: str | Path | None = None):
    """Word-level `PreTrainedTokenizerFast` over `vocabulary()`; saved to out_dir if given.

    ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, 4 <image>, then the words in sorted order.
    Encoding lowercases, splits on whitespace and punctuation ("ASSISTANT:" -> "assistant", ":")
    and prepends <s>. Decoding joins words with single spaces.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="right",
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
