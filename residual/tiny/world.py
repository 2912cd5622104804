"""A procedural image world for the embedded ``residual-tiny`` CLIP.

Every image is described by a :class:`Scene` (attributes a user can name in words) and rendered with numpy
(shapes, textures; 2x supersampled) and Pillow (digit glyphs from the DejaVu fonts shipped next to this
module, so rendering does not depend on the fonts of the host). Everything is deterministic given a
``numpy.random.Generator``: the same seed gives the same pixels and the same captions.

Scene kinds:

- ``object``: one shape with a colour, a size and a position, optionally with a digit written on it;
- ``digit``: a digit glyph alone (font, stroke width, size, colour and position vary);
- ``multi``: 2-4 identical small shapes (the compositional attribute is the count).

Every scene has a background colour and a background texture. Objects and glyphs carry a thin outline that
contrasts with the background (dark on bright backgrounds, bright on dark ones): it gives every shape the same
edge polarity whatever its colour, which is what lets a small ViT learn shape from a CPU-sized budget
(``bench/tiny_supervised_shape.py --outline 0`` measures the difference).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COUNTS",
    "DIGITS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "Scene",
    "caption",
    "focused_caption",
    "render",
    "render_batch",
    "sample_scene",
]

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "pink": (250, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (110, 70, 35),
    "teal": (0, 105, 105),
}
TEXTURES = ("plain", "striped", "dotted", "checkered", "noisy")
SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
DIGITS = tuple(str(i) for i in range(10))
COUNTS = ("one", "two", "three", "four")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_SIZE_RADIUS = {"small": 0.13, "medium": 0.18, "large": 0.25}  # radius as a fraction of the image side
_POSITION_CENTRE = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_FONT_DIR = Path(__file__).with_name("fonts")
_FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf")
_STROKES = (0, 2, 4)  # stroke widths at the 64 px glyph master size
_SUPERSAMPLE = 2
_OUTLINE = 0.25  # outline ring width as a fraction of the object radius (0: no outline)


@dataclass(frozen=True)
class Scene:
    """What an image shows; every field is a word a caption or a label set can use."""

    kind: str  # "object" | "digit" | "multi"
    background: str
    texture: str
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    digit: str | None = None  # digit written alone (kind "digit") or on the object (kind "object")
    count: str | None = None  # number of objects in words ("one" for a single object)
    font: int = 0
    stroke: int = 0
    # continuous nuisance parameters (fractions of the image side), fixed at sampling time
    jitter: tuple[float, ...] = ()


def sample_scene(rng: np.random.Generator, kind: str | None = None, **fixed: str) -> Scene:
    """Draw a random scene; ``kind`` and any attribute in ``fixed`` can be pinned."""
    if kind is None:
        kind = str(rng.choice(["object", "digit", "multi"], p=[0.6, 0.2, 0.2]))
    bg = fixed.get("background") or str(rng.choice(list(BACKGROUNDS)))
    texture = fixed.get("texture") or str(rng.choice(TEXTURES))
    colour = fixed.get("colour") or str(rng.choice(list(COLOURS)))
    jitter = tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=16))
    font = int(rng.integers(len(_FONT_FILES)))
    stroke = int(rng.integers(len(_STROKES)))
    if kind == "object":
        digit = fixed.get("digit")
        if digit is None and rng.random() < 0.25:
            digit = str(rng.choice(DIGITS))
        return Scene(
            kind=kind,
            background=bg,
            texture=texture,
            shape=fixed.get("shape") or str(rng.choice(SHAPES)),
            colour=colour,
            size=fixed.get("size") or str(rng.choice(SIZES)),
            position=fixed.get("position") or str(rng.choice(POSITIONS)),
            digit=digit,
            count="one",
            font=font,
            stroke=stroke,
            jitter=jitter,
        )
    if kind == "digit":
        return Scene(
            kind=kind,
            background=bg,
            texture=texture,
            colour=colour,
            size=fixed.get("size") or str(rng.choice(SIZES[1:])),
            position=fixed.get("position") or str(rng.choice(POSITIONS)),
            digit=fixed.get("digit") or str(rng.choice(DIGITS)),
            font=font,
            stroke=stroke,
            jitter=jitter,
        )
    if kind == "multi":
        count = fixed.get("count") or str(rng.choice(COUNTS[1:]))
        return Scene(
            kind=kind,
            background=bg,
            texture=texture,
            shape=fixed.get("shape") or str(rng.choice(SHAPES)),
            colour=colour,
            count=count,
            font=font,
            stroke=stroke,
            jitter=jitter,
        )
    raise ValueError(f"unknown scene kind {kind!r}; expected 'object', 'digit' or 'multi'")


# ----------------------------------------------------------------------------------------------------------------
# rendering


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side  # pixel centres in [0, 1]
    return np.meshgrid(coords, coords, indexing="xy")  # x (side, side), y (side, side)


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with radius ``r`` (fractions of the side)."""
    dx = (xs - cx) / r
    dy = (ys - cy) / r
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) * 0.55)
    if shape == "cross":
        arm = 0.34
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= 1.0))
    if shape == "star":  # five-pointed star as a polar profile
        rho = np.sqrt(dx * dx + dy * dy)
        theta = np.arctan2(dy, dx) + math.pi / 2
        frac = (theta * 5 / (2 * math.pi)) % 1.0  # position inside one of the 5 sectors
        tri = np.abs(frac - 0.5) * 2  # 1 at a point, 0 between points
        return rho <= 0.45 + 0.6 * tri
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, side: int, base: np.ndarray, rng: np.random.Generator, phase: float) -> np.ndarray:
    """Background (side, side, 3) float32 in [0, 255]: ``base`` colour modulated by the texture."""
    xs, ys = _grid(side)
    dark = 0.55 if base.mean() > 60 else 2.6  # darken bright colours, brighten dark ones
    accent = np.clip(base * dark + (0 if base.mean() > 60 else 25), 0, 255)
    if texture == "plain":
        t = np.zeros((side, side), np.float32)
    elif texture == "striped":
        t = (((xs + ys) * 6 + phase) % 1.0 < 0.5).astype(np.float32)
    elif texture == "dotted":
        gx = (xs * 7 + phase) % 1.0 - 0.5
        gy = (ys * 7 + phase) % 1.0 - 0.5
        t = (gx * gx + gy * gy < 0.06).astype(np.float32)
    elif texture == "checkered":
        t = ((np.floor(xs * 6 + phase) + np.floor(ys * 6 + phase)) % 2).astype(np.float32)
    elif texture == "noisy":
        t = rng.random((side, side), dtype=np.float32) * 0.9
    else:
        raise ValueError(f"unknown texture {texture!r}")
    t = t[..., None]  # (side, side, 1)
    return base[None, None, :] * (1 - t) + accent[None, None, :] * t


@functools.cache
def _glyph(digit: str, font: int, stroke: int) -> np.ndarray:
    """Tight float32 mask of a digit glyph at the 64 px master size, in [0, 1]."""
    face = ImageFont.truetype(str(_FONT_DIR / _FONT_FILES[font]), 64)
    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((16, 4), digit, fill=255, font=face, stroke_width=_STROKES[stroke], stroke_fill=255)
    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    rows = np.flatnonzero(arr.max(axis=1) > 0)
    cols = np.flatnonzero(arr.max(axis=0) > 0)
    return arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _blend(canvas: np.ndarray, alpha: np.ndarray, y0: int, x0: int, rgb: np.ndarray) -> None:
    """Alpha-blend ``rgb`` through ``alpha`` (h, w) placed with its top-left at (y0, x0), clipped to the canvas."""
    side = canvas.shape[0]
    h, w = alpha.shape
    ya, yb = max(0, y0), min(side, y0 + h)
    xa, xb = max(0, x0), min(side, x0 + w)
    if ya >= yb or xa >= xb:
        return
    a = alpha[ya - y0 : yb - y0, xa - x0 : xb - x0, None]  # (h', w', 1)
    canvas[ya:yb, xa:xb] = canvas[ya:yb, xa:xb] * (1 - a) + rgb[None, None, :] * a


def _paste_glyph(
    canvas: np.ndarray, digit: str, font: int, stroke: int, cx: float, cy: float, height: float, rgb: np.ndarray,
    outline: np.ndarray | None = None,
) -> None:
    """Alpha-blend a digit of ``height`` (fraction of the side) centred at (cx, cy) into ``canvas`` in place.

    With ``outline`` (an RGB colour) the glyph is first drawn dilated in that colour, so its edges contrast with
    any background the same way whatever the glyph's own colour.
    """
    side = canvas.shape[0]
    mask = _glyph(digit, font, stroke)
    h = max(3, round(height * side))
    w = max(2, round(mask.shape[1] * h / mask.shape[0]))
    small = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
    small /= 255.0
    y0 = round(cy * side - h / 2)
    x0 = round(cx * side - w / 2)
    if outline is not None:
        d = max(1, round(_OUTLINE * 0.25 * h))  # ring width in canvas pixels
        padded = np.pad(small, 2 * d)  # (h + 4d, w + 4d)
        # max over a (2d+1) x (2d+1) window: (h + 2d, w + 2d, 2d+1, 2d+1) -> (h + 2d, w + 2d)
        dilated = np.lib.stride_tricks.sliding_window_view(padded, (2 * d + 1, 2 * d + 1)).max(axis=(-2, -1))
        _blend(canvas, dilated, y0 - d, x0 - d, outline)
    _blend(canvas, small, y0, x0, rgb)


def _ink(bg: np.ndarray) -> np.ndarray:
    """Outline colour: near-black on bright backgrounds, near-white on dark ones."""
    return np.asarray((10, 10, 10) if bg.mean() > 90 else (245, 245, 245), np.float32)


def _paint(canvas: np.ndarray, shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float,
           colour: np.ndarray, bg: np.ndarray) -> None:
    """Paint ``shape`` in ``colour`` into ``canvas`` in place, with an outline that contrasts with ``bg``."""
    if _OUTLINE > 0:
        canvas[_shape_mask(shape, xs, ys, cx, cy, r * (1 + _OUTLINE))] = _ink(bg)
    canvas[_shape_mask(shape, xs, ys, cx, cy, r)] = colour


NATIVE_SIDE = 48
"""The side the world is drawn at; other input sizes resize these images (rendering at 224 px costs ~20x)."""


def render(scene: Scene, side: int = 48, seed: int = 0) -> np.ndarray:
    """Render ``scene`` to an (side, side, 3) uint8 array. ``seed`` drives only the pixel noise."""
    rng = np.random.default_rng(seed)
    big = side * _SUPERSAMPLE
    j = scene.jitter or (0.0,) * 16
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32) + 12 * np.asarray(j[0:3], np.float32)
    canvas = _texture(scene.texture, big, np.clip(bg, 0, 255), rng, phase=abs(j[3]))
    xs, ys = _grid(big)
    colour = np.asarray(COLOURS.get(scene.colour or "red", (200, 0, 0)), np.float32)
    colour = np.clip(colour + 15 * np.asarray(j[4:7], np.float32), 0, 255)

    if scene.kind == "object":
        assert scene.shape
        assert scene.size
        assert scene.position
        r = _SIZE_RADIUS[scene.size] * (1 + 0.08 * j[7])
        px, py = _POSITION_CENTRE[scene.position]
        cx, cy = px + 0.05 * j[8], py + 0.05 * j[9]
        _paint(canvas, scene.shape, xs, ys, cx, cy, r, colour, bg)
        if scene.digit is not None:
            ink = np.asarray((0, 0, 0) if colour.mean() > 110 else (255, 255, 255), np.float32)
            _paste_glyph(canvas, scene.digit, scene.font, scene.stroke, cx, cy + 0.1 * r, 1.1 * r, ink)
    elif scene.kind == "digit":
        assert scene.digit is not None
        assert scene.size
        assert scene.position
        height = {"small": 0.3, "medium": 0.45, "large": 0.62}[scene.size] * (1 + 0.08 * j[7])
        px, py = _POSITION_CENTRE[scene.position]
        shift = 0.5 - height / 2 - 0.02  # keep the glyph inside the frame
        cx = 0.5 + np.clip(px - 0.5, -shift, shift) + 0.03 * j[8]
        cy = 0.5 + np.clip(py - 0.5, -shift, shift) + 0.03 * j[9]
        _paste_glyph(canvas, scene.digit, scene.font, scene.stroke, float(cx), float(cy), height, colour,
                     outline=_ink(bg) if _OUTLINE > 0 else None)
    elif scene.kind == "multi":
        assert scene.shape
        assert scene.count
        n = COUNTS.index(scene.count) + 1
        cells = [(0.22 + 0.28 * (i % 3), 0.22 + 0.28 * (i // 3)) for i in range(9)]
        order = np.argsort(np.asarray(j[7:16]))[:n]  # which cells hold an object, fixed by the jitter
        r = 0.095
        for k, cell in enumerate(order):
            cx = cells[cell][0] + 0.03 * j[(k + 10) % 16]
            cy = cells[cell][1] + 0.03 * j[(k + 3) % 16]
            _paint(canvas, scene.shape, xs, ys, cx, cy, r, colour, bg)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")

    canvas += rng.normal(0.0, 4.0, size=canvas.shape).astype(np.float32)  # mild sensor noise
    # (big, big, 3) -> (side, 2, side, 2, 3) -> mean over the supersampling axes -> (side, side, 3)
    small = canvas.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene], side: int = 48, seed: int = 0) -> np.ndarray:
    """Render scenes to a (n, side, side, 3) uint8 array; image i uses noise seed ``seed + i``."""
    return np.stack([render(s, side, seed + i) for i, s in enumerate(scenes)])


# ----------------------------------------------------------------------------------------------------------------
# captions: random subsets of the attributes in varied phrasings

_POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "to the left", "in the left half"),
    "right": ("on the right", "at the right side", "to the right", "in the right half"),
    "top": ("at the top", "near the top edge", "in the upper part", "up high"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower part", "down low"),
    "center": ("in the middle", "in the center", "centered", "in the centre of the frame"),
}
_TEXTURE_WORDS = {
    "plain": ("plain", "solid", "flat"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered", "checkerboard", "chequered"),
    "noisy": ("noisy", "grainy", "speckled"),
}
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
               "large": ("large", "big", "huge")}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars", "cross": "crosses"}
_OPENERS = ("", "a picture of ", "an image of ", "there is ", "this shows ", "a drawing of ", "a rendering of ")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: np.random.Generator, must: frozenset[str] = frozenset()) -> str:
    """A caption mentioning a random subset of the scene's attributes in a random phrasing.

    Attributes in ``must`` ("shape", "size", "position", "digit", "count", "texture") are always mentioned.
    """
    parts: list[str] = []
    if scene.kind == "object":
        assert scene.shape
        assert scene.size
        assert scene.position
        assert scene.colour
        words = []
        if rng.random() < 0.45 or "size" in must:
            words.append(_pick(rng, _SIZE_WORDS[scene.size]))
        if rng.random() < 0.6:
            words.append(scene.colour)
        words.append(scene.shape if rng.random() < 0.92 or "shape" in must else "shape")
        phrase = ("one " + " ".join(words)) if "count" in must else _article(" ".join(words))
        if scene.digit is not None and (rng.random() < 0.8 or "digit" in must):
            d = scene.digit if rng.random() < 0.6 else DIGIT_WORDS[int(scene.digit)]
            phrase += " " + _pick(rng, ("with the number ", "marked ", "labelled ", "with a ")) + d
        parts.append(phrase)
        if rng.random() < 0.55 or "position" in must:
            parts.append(_pick(rng, _POSITION_PHRASES[scene.position]))
    elif scene.kind == "digit":
        assert scene.digit is not None
        assert scene.colour
        assert scene.position
        d = scene.digit if rng.random() < 0.5 else DIGIT_WORDS[int(scene.digit)]
        colour = scene.colour + " " if rng.random() < 0.5 else ""
        parts.append(_pick(rng, (f"the {colour}digit {d}", f"a {colour}number {d}",
                                 f"{_article(colour + 'written')} {d}", f"the {colour}numeral {d}")))
        if rng.random() < 0.4 or "position" in must:
            parts.append(_pick(rng, _POSITION_PHRASES[scene.position]))
    else:
        assert scene.shape
        assert scene.count
        assert scene.colour
        n = scene.count if rng.random() < 0.7 else str(COUNTS.index(scene.count) + 1)
        colour = scene.colour + " " if rng.random() < 0.6 else ""
        named = rng.random() < 0.9 or "shape" in must
        parts.append(f"{n} {colour}{_PLURAL[scene.shape]}" if named else f"{n} {colour}objects")
    if rng.random() < 0.5 or "texture" in must:
        tex = _pick(rng, _TEXTURE_WORDS[scene.texture]) + " " if rng.random() < 0.6 or "texture" in must else ""
        bgw = scene.background + " " if rng.random() < 0.8 else ""
        parts.append(_pick(rng, ("on a ", "against a ", "over a ")) + f"{tex}{bgw}background")
    text = _pick(rng, _OPENERS) + " ".join(parts)
    return text.strip()


_THINGS = ("an object", "something", "a shape")


def focused_caption(scene: Scene, attribute: str, rng: np.random.Generator) -> str:
    """A short caption that names only ``attribute`` ("shape", "size", "position", "digit", "count" or "texture").

    Used for minimal-pair groups early in training: inside such a group only this attribute tells the
    images apart, and a caption that names nothing else gives the text tower a clean target for it.
    """
    opener = _pick(rng, _OPENERS)
    if attribute == "texture":
        return f"{opener}{_article(_pick(rng, _TEXTURE_WORDS[scene.texture]))} background".strip()
    if attribute == "shape":
        assert scene.shape
        return (opener + _article(scene.shape)).strip()
    if attribute == "digit":
        assert scene.digit is not None
        d = scene.digit if rng.random() < 0.5 else DIGIT_WORDS[int(scene.digit)]
        return (opener + _pick(rng, ("the digit ", "the number ", "a written ", "the numeral "))).strip() + " " + d
    if attribute == "position":
        assert scene.position
        thing = _pick(rng, (*_THINGS, _article(scene.shape or "digit")))
        return f"{opener}{thing} {_pick(rng, _POSITION_PHRASES[scene.position])}".strip()
    if attribute == "size":
        assert scene.size
        return (opener + _article(f"{_pick(rng, _SIZE_WORDS[scene.size])} {scene.shape or 'object'}")).strip()
    if attribute == "count":
        assert scene.count
        assert scene.shape
        n = scene.count if rng.random() < 0.7 else str(COUNTS.index(scene.count) + 1)
        one = scene.count == "one"
        named = rng.random() < 0.7
        noun = (scene.shape if one else _PLURAL[scene.shape]) if named else ("object" if one else "objects")
        return f"{opener}{n} {noun}".strip()
    raise ValueError(f"no focused caption for attribute {attribute!r}")
