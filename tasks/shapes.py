"""The coloured-shapes world: vocabulary, scenes and captions, rendering, and the scorer.

Shared by the synth stage (which writes the dataset) and evaluation (which scores generated
images), so neither imports the other: tasks never import a sibling stage. Because the shapes are
known, a generated image can be scored exactly (colour and shape accuracy), which makes the demo
an end-to-end quality check without any downloaded data.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.11, "large": 0.19}  # half-extent as a fraction of the image side
BACKGROUND = (235, 235, 235)
# Every colour and every shape stays in training; only these pairings are held out.
HELDOUT_PAIRS = frozenset((colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(list(COLOURS)[: len(SHAPES)]))

SINGLE_POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
# relation -> (centre of the first object, centre of the second), and the inverse wording
RELATIONS = {
    "left of": ((0.27, 0.5), (0.73, 0.5), "right of"),
    "right of": ((0.73, 0.5), (0.27, 0.5), "left of"),
    "above": ((0.5, 0.27), (0.5, 0.73), "below"),
    "below": ((0.5, 0.73), (0.5, 0.27), "above"),
}



@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    cx: float  # centre, fraction of the image side
    cy: float

    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


def sample_scene(rng: random.Random, two_object_fraction: float = 0.4, name_sizes: bool = True) -> tuple[list[ShapeObject], str]:
    """Draw one scene and a caption for it, in one of several wordings. Without `name_sizes` the
    sizes are drawn all the same but no caption names one: a detail of the image the caption leaves
    out, as real captions do, which z_i carries and z_t cannot (the paper's case for the prior, 5.1)."""

    def obj(centre):
        jx, jy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
        return ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), centre[0] + jx, centre[1] + jy)

    caption, objects = _scene_and_caption(rng, obj, two_object_fraction)
    if not name_sizes:
        caption = " ".join(w for w in caption.split(" ") if w not in SIZES)
    return objects, re.sub(r"\ba (?=[aeiou])", "an ", caption)


def _scene_and_caption(rng, obj, two_object_fraction):
    if rng.random() >= two_object_fraction:
        where = rng.choice(list(SINGLE_POSITIONS))
        a = obj(SINGLE_POSITIONS[where])
        template = rng.choice(["a {s} {c} {h} {w}", "{s} {c} {h} {w}", "there is a {s} {c} {h} {w}", "a {c} {h} {w}", "{w}, a {s} {c} {h}"])
        return template.format(s=a.size, c=a.colour, h=a.shape, w=where), [a]
    relation = rng.choice(list(RELATIONS))
    first_at, second_at, inverse = RELATIONS[relation]
    a, b = obj(first_at), obj(second_at)
    wording = rng.randrange(3)
    if wording == 0:
        caption = f"a {a.colour} {a.shape} {relation} a {b.colour} {b.shape}"
    elif wording == 1:
        caption = f"a {b.size} {b.colour} {b.shape} {inverse} a {a.size} {a.colour} {a.shape}"
    else:
        caption = f"a {a.size} {a.colour} {a.shape} and a {b.colour} {b.shape}, the {a.shape} {relation} the {b.shape}"
    return caption, [a, b]


def render(objects: list[ShapeObject], image_size: int) -> Image.Image:
    """Draw at 2x and downsample so edges are anti-aliased like a real photo's."""
    scale = 2 * image_size
    image = Image.new("RGB", (scale, scale), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o.cx * scale, o.cy * scale, SIZES[o.size] * scale
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.9  # same visual weight as the circle
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o.shape == "cross":
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def split_of(objects: list[ShapeObject]) -> str:
    return "heldout" if any(o.pair() in HELDOUT_PAIRS for o in objects) else "train"


# ---------------------------------------------------------------------------------------------
# Scorer


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cx: float
    cy: float
    area: float  # fraction of the image


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in [0, 1). Blending a colour with the grey background keeps its hue, which is what
    makes hue robust to anti-aliased edges and to tinted, noisy backgrounds."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b) / (2 * np.pi)) % 1.0


_PALETTE_NAMES = list(COLOURS)
_PALETTE_HUES = _hue(np.array(list(COLOURS.values()), dtype=np.float32))
_SMOOTH_PX = 0.5  # Gaussian smoothing of the copy that finds regions: noise amplitude x0.64, thin arms kept
_SPLIT_SHARE = 0.2  # share of a region's core in a second colour that makes it two shapes


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """Per-channel median of the outermost ring of pixels: scenes never reach the border, so this
    is the background colour, tint included."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(ring, axis=0)


def _alpha(difference: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How much of each pixel a shape of `colour` (as a difference from the background) covers:
    the projection onto that colour, so a blended edge gets its blend weight and noise across the
    colour direction does not count."""
    return np.clip(difference @ colour / max(float(colour @ colour), 1e-6), 0.0, 1.0)


def score_image(image: Image.Image | np.ndarray, min_area: float = 0.004, min_chroma: float = 50.0) -> list[Detection]:
    """The coloured shapes in an image, largest first.

    Pixels are measured as differences from the background (estimated from the border), so a
    colour cast over the whole image cancels. Regions are found on a lightly smoothed copy (noise
    such as a half-trained decoder leaves would otherwise speckle them): a pixel is coloured when
    its difference has chroma above `min_chroma`; connected coloured regions smaller than
    `min_area` of the image are noise. Shapes are classified on the unsmoothed pixels.
    A region takes the palette colour whose hue most of its core pixels are nearest to, so noisy
    edge pixels whose hue drifted to a neighbouring colour stay part of their shape; a region
    where a second colour holds a good share of the core is two touching shapes, split by colour.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w, _ = rgb.shape
    difference = rgb - estimate_background(rgb)
    smooth = ndimage.gaussian_filter(difference, (_SMOOTH_PX, _SMOOTH_PX, 0))
    chroma = smooth.max(axis=2) - smooth.min(axis=2)
    hue_distance = np.abs(_hue(smooth)[..., None] - _PALETTE_HUES)
    labels = np.minimum(hue_distance, 1.0 - hue_distance).argmin(axis=2)
    regions, count = ndimage.label(chroma > min_chroma)
    min_pixels = min_area * h * w
    detections = []
    for region in range(1, count + 1):
        pixels = regions == region
        if pixels.sum() < min_pixels:
            continue
        core = pixels & (chroma >= 0.5 * np.percentile(chroma[pixels], 90))
        votes = np.bincount(labels[core], minlength=len(_PALETTE_NAMES))
        colours = np.flatnonzero(votes >= max(_SPLIT_SHARE * votes.sum(), min_pixels / 2))
        if len(colours) <= 1:  # one shape: the whole region, in its majority colour
            parts = [(int(votes.argmax()), pixels)]
        else:
            parts = []
            for index in colours:
                pieces, n = ndimage.label(pixels & (labels == index))
                parts += [(int(index), pieces == piece) for piece in range(1, n + 1)]
        for index, mask in parts:
            ys, xs = np.nonzero(mask)
            if len(xs) < min_pixels:
                continue
            own_core = mask & core & (labels == index)
            colour = difference[own_core if own_core.any() else mask].mean(axis=0)
            coverage = _alpha(difference, colour) * ndimage.binary_dilation(mask)
            detections.append(Detection(_PALETTE_NAMES[index], classify_shape(coverage), xs.mean() / w, ys.mean() / h, len(xs) / (h * w)))
    return sorted(detections, key=lambda d: -d.area)


_TEMPLATE_SIZE = 16


def _normalised_coverage(coverage: np.ndarray) -> np.ndarray:
    """Resample a coverage map around its centroid at a scale set by its area.

    Moments rather than the bounding box, so that a stray edge pixel barely moves the result.
    """
    total = coverage.sum()
    ys, xs = np.indices(coverage.shape)
    cy, cx = (coverage * ys).sum() / total, (coverage * xs).sum() / total
    half_extent = 0.9 * np.sqrt(total)
    grid = np.linspace(-half_extent, half_extent, _TEMPLATE_SIZE)
    gy, gx = np.meshgrid(cy + grid, cx + grid, indexing="ij")
    return ndimage.map_coordinates(coverage.astype(np.float32), [gy, gx], order=1, mode="constant")


@functools.lru_cache(maxsize=8)
def _templates(resolution: int) -> dict[tuple[str, str], np.ndarray]:
    """Each shape and size rendered the way the generator does at this resolution, so the
    templates carry the same blur as the image being scored."""
    templates = {}
    for shape in SHAPES:
        for size in SIZES:
            image = render([ShapeObject("red", shape, size, 0.5, 0.5)], 128)
            image = np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC), dtype=np.float32)
            colour = np.subtract(COLOURS["red"], BACKGROUND, dtype=np.float32)
            templates[(shape, size)] = _normalised_coverage(_alpha(image - np.float32(BACKGROUND), colour))
    return templates


def classify_shape(coverage: np.ndarray) -> str:
    """The shape whose template is closest to the component's normalised coverage map."""
    normalised = _normalised_coverage(coverage)
    templates = _templates(max(16, min(256, int(round(max(coverage.shape))))))
    best = min(templates, key=lambda key: np.abs(templates[key] - normalised).mean())
    return best[0]


def expected_objects(objects_json: str) -> list[tuple[str, str]]:
    return sorted((o["colour"], o["shape"]) for o in json.loads(objects_json))


def score_matches(image: Image.Image, objects_json: str) -> bool:
    """True when the scorer sees exactly the scene's colour-shape pairs."""
    expected = expected_objects(objects_json)
    found = sorted((d.colour, d.shape) for d in score_image(image)[: len(expected) + 1])
    return found == expected
