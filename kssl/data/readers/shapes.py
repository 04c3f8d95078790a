"""Shapes: a procedurally generated scene-segmentation dataset that ships with kssl.

No download: every image is drawn in numpy from a seed, so the quickstart (and tests) run
anywhere in seconds. Each image (default 96x128) shows 2-6 objects on a noisy textured
background; an object's class is given by its SHAPE or TEXTURE, never by its colour,
which is random per object:

  0 background  smooth low-frequency colour waves, thin distractor lines, pixel noise
  1 disc        filled circle
  2 ring        annulus (hole about 55% of the radius); what lies beneath shows through
  3 square      filled square, rotated
  4 triangle    filled equilateral triangle, rotated
  5 cross       plus sign with arms 0.6 radius wide, rotated
  6 stripes     ellipse filled with two-colour stripes (period 4-8 px, any direction);
                the only class told apart by texture rather than outline

Objects have random positions (partly outside the frame too), sizes (radius 10-26 px at
96 px height, scaled with the image), rotations and a linear shading gradient; later
objects occlude earlier ones. A one-pixel band along every label change (the pixel below
or right of it) is IGNORE_LABEL (255), as in VOC-style annotations. Gaussian pixel noise
(sigma 8) is added last.

Image i of a split is drawn from its own generator seeded by (seed, split, i), so it does
not depend on how many images the split has: Shapes(num_train=64) has the first 64 train
images of Shapes(num_train=512).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kssl.constants import IGNORE_LABEL
from kssl.data.examples import DatasetInfo, Examples
from kssl.data.readers.base import DataError, Reader

CLASS_NAMES = ("background", "disc", "ring", "square", "triangle", "cross", "stripes")
PALETTE = np.array([
    [0, 0, 0],        # background
    [230, 25, 75],    # disc
    [60, 180, 75],    # ring
    [255, 225, 25],   # square
    [0, 130, 200],    # triangle
    [245, 130, 48],   # cross
    [145, 30, 180],   # stripes
], np.uint8)

SPLITS = {"train": 0, "val": 1}
MAX_OBJECTS = 6
NUM_WAVES = 3          # background colour waves
MAX_LINES = 2          # background distractor lines
NOISE_SIGMA = 8.0
CHUNK = 64             # images rasterised together: bounds memory, keeps arrays in cache


class Shapes(Reader):
    """The embedded procedural dataset (see the module docstring for the classes).

    Args:
      num_train, num_val: images in the "train" and "val" splits.
      height, width: image size in pixels (at least 32 each).
      seed: the dataset's seed; the same arguments always give the same pixels.
    """

    def __init__(self, num_train: int = 512, num_val: int = 128, height: int = 96,
                 width: int = 128, seed: int = 0):
        for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0),
                                 ("height", height, 32), ("width", width, 32)):
            # A string ('20') or a bool would pass int(); the error names the value.
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                    or value < low:
                raise ValueError(f"Shapes: {name} must be an integer >= {low}, got {value!r}")
        self.sizes = {"train": int(num_train), "val": int(num_val)}
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        self.info = DatasetInfo(name="shapes", class_names=CLASS_NAMES, palette=PALETTE)
        self._cache = {}

    def examples(self, split: str) -> Examples:
        """The examples of "train" or "val": ids "train/00012", images = index strings."""
        n = self._size(split)
        ids = tuple(f"{split}/{i:05d}" for i in range(n))
        index = tuple(str(i) for i in range(n))
        return Examples(ids, index, index, source=f"shapes:{split}")

    def arrays(self, split: str):
        """(images uint8 [N, H, W, 3], masks uint8 [N, H, W]) of a split, generated once."""
        if split not in self._cache:
            self._cache[split] = generate(self._size(split), self.height, self.width,
                                          self.seed, SPLITS[split])
        return self._cache[split]

    def load(self, examples: Examples, with_masks: bool = True) -> tf.data.Dataset:
        """The selected examples as {"id", "image", "mask"} dicts, in list order."""
        if with_masks and not examples.has_masks:
            raise DataError(f"{examples.source}: asked for masks but some examples have none")
        n = len(examples)
        images = np.zeros([n, self.height, self.width, 3], np.uint8)
        masks = np.zeros([n, self.height, self.width], np.uint8)
        splits = [example_id.split("/", 1)[0] for example_id in examples.ids]
        for split in sorted(set(splits)):
            if split not in SPLITS:
                raise DataError(f"{examples.source}: example id prefix {split!r} is not a "
                                f"Shapes split; expected one of {sorted(SPLITS)}")
            rows = np.array([k for k, s in enumerate(splits) if s == split])
            try:
                index = np.array([int(examples.images[k]) for k in rows])
            except ValueError as error:
                raise DataError(f"{examples.source}: Shapes images must be index strings "
                                f"({error})") from None
            if index.min() < 0 or index.max() >= self.sizes[split]:
                raise DataError(f"{examples.source}: index {index.max()} out of range for "
                                f"the {self.sizes[split]} {split} images")
            split_images, split_masks = self.arrays(split)
            images[rows], masks[rows] = split_images[index], split_masks[index]
        columns = {"id": list(examples.ids), "image": images}
        if with_masks:
            columns["mask"] = masks
        return tf.data.Dataset.from_tensor_slices(columns)

    def _size(self, split: str) -> int:
        if split not in SPLITS:
            raise DataError(f"Shapes: no split {split!r}; splits: {sorted(SPLITS)}")
        return self.sizes[split]


# -- generation -----------------------------------------------------------------------
def _contrasting_colour(rng, reference, min_distance=70.0):
    """A random RGB colour at least `min_distance` away from `reference` (a few tries)."""
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - reference) >= min_distance:
            break
    return colour


def _draw_parameters(rng, height, width):
    """One image's random parameters (a dict of small arrays)."""
    scale = min(height, width) / 96.0
    background = rng.uniform(50, 200, 3)
    count = rng.integers(2, MAX_OBJECTS + 1)
    classes = np.zeros(MAX_OBJECTS, np.int64)
    classes[:count] = rng.integers(1, len(CLASS_NAMES), count)
    colours = np.stack([_contrasting_colour(rng, background) for _ in range(MAX_OBJECTS)])
    second = np.stack([_contrasting_colour(rng, c, 90.0) for c in colours])
    wavelength = rng.uniform(30, 120, NUM_WAVES) * scale
    wave_angle = rng.uniform(0, 2 * np.pi, NUM_WAVES)
    num_lines = rng.integers(0, MAX_LINES + 1)
    return {
        "background": background,
        "wave_k": np.stack([np.cos(wave_angle), np.sin(wave_angle)], -1)
        * (2 * np.pi / wavelength)[:, None],
        "wave_phase": rng.uniform(0, 2 * np.pi, NUM_WAVES),
        "wave_amplitude": rng.uniform(-25, 25, (NUM_WAVES, 3)),
        "line_normal_angle": rng.uniform(0, 2 * np.pi, MAX_LINES),
        "line_offset": rng.uniform(-0.3, 0.3, MAX_LINES) * min(height, width),
        "line_width": np.where(np.arange(MAX_LINES) < num_lines,
                               rng.uniform(0.6, 1.5, MAX_LINES) * scale, 0.0),
        "line_colour": rng.uniform(0, 255, (MAX_LINES, 3)),
        "classes": classes,
        "centre": rng.uniform([-0.05 * height, -0.05 * width],
                              [1.05 * height, 1.05 * width], (MAX_OBJECTS, 2)),
        "radius": rng.uniform(10, 26, MAX_OBJECTS) * scale,
        "angle": rng.uniform(0, 2 * np.pi, MAX_OBJECTS),
        "colour": colours,
        "colour2": second,
        "shading": rng.uniform(-40, 40, (MAX_OBJECTS, 2)),
        "stripe_period": rng.uniform(4, 8, MAX_OBJECTS) * scale,
        "stripe_angle": rng.uniform(0, np.pi, MAX_OBJECTS),
        "noise": rng.standard_normal((height, width, 3), dtype=np.float32),
    }


def _inside(shape_class, u, v, r):
    """Boolean mask of the pixels (local coordinates u, v) inside an object of radius r."""
    name = CLASS_NAMES[shape_class]
    if name == "disc":
        return u * u + v * v <= r * r
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    if name == "triangle":
        inradius = 0.6 * r  # equilateral: circumradius 1.2 r, inradius half of it
        return ((v <= inradius) & (-0.866 * u - 0.5 * v <= inradius)
                & (0.866 * u - 0.5 * v <= inradius))
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        arm = 0.3 * r
        return ((au <= r) & (av <= arm)) | ((av <= r) & (au <= arm))
    if name == "stripes":
        return u * u + (v / 0.65) ** 2 <= r * r
    raise ValueError(f"no shape for class {shape_class}")


def _render(params, height, width):
    """Rasterises a chunk of images from stacked parameters, vectorised over images."""
    n = len(params["classes"])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    yy, xx = yy[None], xx[None]

    # Background: base colour + a few smooth colour waves + thin distractor lines.
    phases = (params["wave_k"][:, None, None, :, 0] * yy[..., None]
              + params["wave_k"][:, None, None, :, 1] * xx[..., None]
              + params["wave_phase"][:, None, None, :])                # [n, H, W, waves]
    # One batched matmul mixes the waves into RGB (cheaper than per-wave broadcasts).
    canvas = np.matmul(np.sin(phases).reshape(n, height * width, NUM_WAVES),
                       params["wave_amplitude"]).reshape(n, height, width, 3)
    canvas += params["background"][:, None, None, :]
    for j in range(MAX_LINES):
        angle = params["line_normal_angle"][:, j, None, None]
        distance = np.abs((yy - height / 2) * np.cos(angle) + (xx - width / 2) * np.sin(angle)
                          - params["line_offset"][:, j, None, None])
        image, y, x = np.nonzero(distance <= params["line_width"][:, j, None, None])
        canvas[image, y, x] = params["line_colour"][image, j]

    # Objects in slot order, so later ones occlude earlier ones; within a slot, group the
    # images by class so each shape test runs only on the images that draw it. Colours
    # are computed only at the pixels inside the objects (a few percent of the image).
    labels = np.zeros((n, height, width), np.uint8)
    for slot in range(MAX_OBJECTS):
        slot_classes = params["classes"][:, slot]
        for shape_class in range(1, len(CLASS_NAMES)):
            rows = np.nonzero(slot_classes == shape_class)[0]
            if rows.size == 0:
                continue
            p = {key: params[key][rows, slot] for key in
                 ("centre", "angle", "radius", "colour", "colour2", "shading",
                  "stripe_period", "stripe_angle")}
            dy = yy - p["centre"][:, 0, None, None]
            dx = xx - p["centre"][:, 1, None, None]
            cos, sin = np.cos(p["angle"])[:, None, None], np.sin(p["angle"])[:, None, None]
            u = dx * cos + dy * sin
            v = -dx * sin + dy * cos
            obj, y, x = np.nonzero(_inside(shape_class, u, v, p["radius"][:, None, None]))
            u, v = u[obj, y, x], v[obj, y, x]
            colour = p["colour"][obj]
            if CLASS_NAMES[shape_class] == "stripes":
                along = u * np.cos(p["stripe_angle"][obj]) + v * np.sin(p["stripe_angle"][obj])
                light = np.sin(2 * np.pi * along / p["stripe_period"][obj]) > 0
                colour = np.where(light[:, None], colour, p["colour2"][obj])
            shading = p["shading"][obj]
            gradient = (shading[:, 0] * u + shading[:, 1] * v) / p["radius"][obj]
            canvas[rows[obj], y, x] = colour + gradient[:, None]
            labels[rows[obj], y, x] = shape_class

    # Ignore a one-pixel band where the label changes (the pixel below / right of it).
    edge = np.zeros_like(labels, bool)
    edge[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    labels[edge] = IGNORE_LABEL

    canvas += NOISE_SIGMA * params["noise"]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), labels


def generate(num_images: int, height: int = 96, width: int = 128, seed: int = 0,
             split_code: int = 0):
    """(images uint8 [N, H, W, 3], masks uint8 [N, H, W]) of one split.

    Image i depends only on (seed, split_code, i, height, width).
    """
    images = np.zeros((num_images, height, width, 3), np.uint8)
    masks = np.zeros((num_images, height, width), np.uint8)
    for start in range(0, num_images, CHUNK):
        stop = min(start + CHUNK, num_images)
        drawn = [_draw_parameters(np.random.default_rng([seed, split_code, i]), height, width)
                 for i in range(start, stop)]
        # float32 throughout: float64 parameters would silently promote the whole canvas.
        params = {key: np.stack([d[key] for d in drawn]) for key in drawn[0]}
        params = {key: value.astype(np.float32) if value.dtype == np.float64 else value
                  for key, value in params.items()}
        images[start:stop], masks[start:stop] = _render(params, height, width)
    return images, masks
