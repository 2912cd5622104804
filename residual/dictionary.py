"""The text dictionary for head descriptions (docs/method.md §5.4): short descriptions of visual concepts.

Shipped as ``residual/data/text_dictionary.txt`` (one description per line). It covers the embedded world's
attributes (colours, shapes, sizes, positions, background colours and textures, digits, counts) and general
visual concepts (more colours and shapes, patterns, places, materials, animals, objects, lighting, styles), so
the same dictionary serves the embedded model and real OpenCLIP checkpoints.

    python -m residual.dictionary          # regenerate the shipped file from the word lists below
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

__all__ = ["DICTIONARY_PATH", "build_dictionary", "load_dictionary"]

DICTIONARY_PATH = Path(__file__).with_name("data") / "text_dictionary.txt"

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white", "black", "gray", "brown", "teal",
           "cyan", "magenta", "beige", "gold", "silver", "navy blue", "maroon", "olive green", "violet", "turquoise",
           "lime green", "crimson", "dark", "bright", "pastel", "colourful")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "oval", "rectangle", "heart",
          "arrow", "ring", "crescent", "pentagon", "spiral", "line")
SIZES = ("small", "tiny", "medium-sized", "large", "huge")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center", "in the top left corner",
             "in the top right corner", "in the bottom left corner", "in the bottom right corner")
TEXTURES = ("plain", "striped", "dotted", "checkered", "noisy", "wavy", "grainy", "zigzag", "gradient", "marbled",
            "speckled", "grid", "diagonal stripes", "polka dot", "blurry", "sharp")
COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLACES = ("beach", "forest", "city street", "kitchen", "bedroom", "office", "mountain", "desert", "river", "lake",
          "farm", "garden", "park", "parking lot", "stadium", "classroom", "restaurant", "supermarket", "airport",
          "train station", "highway", "bridge", "castle", "church", "museum", "library", "hospital", "factory",
          "snowy field", "jungle", "underwater scene", "night sky", "sunset", "cave", "harbour", "village")
MATERIALS = ("wood", "metal", "glass", "plastic", "stone", "paper", "fabric", "leather", "concrete", "ceramic",
             "rubber", "gold", "marble", "ice", "sand", "brick")
ANIMALS = ("dog", "cat", "bird", "horse", "cow", "sheep", "fish", "elephant", "lion", "tiger", "bear", "zebra",
           "giraffe", "monkey", "rabbit", "mouse", "snake", "frog", "butterfly", "bee", "spider", "owl", "duck",
           "penguin", "dolphin", "shark", "whale", "turtle", "fox", "wolf", "deer", "camel", "pig", "chicken")
OBJECTS = ("car", "bicycle", "airplane", "boat", "train", "truck", "bus", "motorcycle", "chair", "table", "sofa",
           "bed", "lamp", "clock", "phone", "laptop", "keyboard", "television", "cup", "bottle", "plate", "bowl",
           "knife", "spoon", "book", "pen", "bag", "shoe", "hat", "shirt", "umbrella", "ball", "guitar", "piano",
           "flower", "tree", "house", "door", "window", "key", "coin", "flag", "sign", "toy", "apple", "banana",
           "pizza", "cake", "bread", "sandwich")
STYLES = ("a photo", "a drawing", "a painting", "a sketch", "a cartoon", "a diagram", "a screenshot", "a close-up",
          "an aerial view", "a blurry photo", "a black and white photo", "a low resolution image", "a pixelated image",
          "a 3d rendering", "an icon", "a logo", "a pattern", "a texture", "handwriting", "printed text")
LIGHTING = ("bright lighting", "dim lighting", "shadows", "high contrast", "low contrast", "a dark scene",
            "an overexposed image", "a glowing light", "reflections", "fog")


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def build_dictionary() -> list[str]:
    """All descriptions, deterministic, without duplicates, in a stable order."""
    out: list[str] = []
    out += [f"{c}" for c in COLOURS]
    out += [f"something {c}" for c in COLOURS]
    out += [f"the colour {c}" for c in COLOURS]
    out += [_an(f"{c} {s}") for c, s in itertools.product(COLOURS, SHAPES)]
    out += [_an(s) for s in SHAPES] + [f"a {s} shape" for s in SHAPES]
    out += [_an(f"{z} {s}") for z, s in itertools.product(SIZES, SHAPES)]
    out += [_an(f"{z} object") for z in SIZES]
    out += [f"a {s} {p}" for s, p in itertools.product(SHAPES, POSITIONS)]
    out += [f"an object {p}" for p in POSITIONS] + [f"something {p} of the image" for p in POSITIONS]
    out += [_an(f"{t} background") for t in TEXTURES]
    out += [_an(f"{t} {c} background") for t, c in itertools.product(TEXTURES, COLOURS)]
    out += [_an(f"{c} background") for c in COLOURS]
    out += [_an(f"{t} pattern") for t in TEXTURES]
    out += [f"the number {d}" for d in range(10)] + [f"the digit {w}" for w in DIGIT_WORDS]
    out += [f"a {c} number {d}" for c, d in itertools.product(COLOURS[:12], range(10))]
    out += ["written text", "a letter", "a symbol", "a numeral", "handwritten digits", "a printed number"]
    out += [f"{n} objects" for n in COUNTS] + [f"{n} shapes" for n in COUNTS]
    out += [f"{n} {c} things" for n, c in itertools.product(COUNTS[:6], COLOURS[:12])]
    out += [f"a photo of a {p}" for p in PLACES] + [f"a picture taken at a {p}" for p in PLACES]
    out += [f"something made of {m}" for m in MATERIALS]
    out += [_an(f"{m} {o}") for m, o in itertools.product(MATERIALS, OBJECTS[:20])]
    out += [f"a photo of a {a}" for a in ANIMALS] + [_an(f"{c} {a}") for c, a in itertools.product(COLOURS[:12],
                                                                                                      ANIMALS)]
    out += [f"a photo of a {o}" for o in OBJECTS] + [_an(f"{c} {o}") for c, o in itertools.product(COLOURS[:12],
                                                                                                      OBJECTS)]
    out += [f"{a} {z} {o}" for a, z, o in itertools.product(("a",), SIZES, OBJECTS)]
    out += list(STYLES) + [f"{s} of a {o}" for s, o in itertools.product(STYLES, OBJECTS[:10])]
    out += list(LIGHTING)
    return list(dict.fromkeys(out))


def load_dictionary(path: str | Path | None = None) -> list[str]:
    """The shipped dictionary (or another file, one description per line; blank lines and '#' lines skipped)."""
    text = Path(path or DICTIONARY_PATH).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def main() -> int:
    DICTIONARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    lines = build_dictionary()
    DICTIONARY_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {len(lines)} descriptions to {DICTIONARY_PATH}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
