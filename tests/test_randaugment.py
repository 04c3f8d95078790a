"""RandAugment + Cutout with coordinate maps (`kssl.augment.randaugment`).

The references are independent numpy versions of each op (written from PIL's definitions,
with the parameters computed as the released code's `int_parameter` / `float_parameter`),
and, where Pillow is installed, PIL itself on integer images.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from kssl.augment import randaugment as ra
from kssl.augment import seeds

H, W = 32, 40
FILL = 127.5
GEOMETRIC = ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]


def random_images(batch, seed=0, integer=False):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, H, W, 3)).astype(np.float32)
    # A smooth gradient in part of the image so that histograms are uneven.
    images[:, :, : W // 2] = (np.arange(H)[None, :, None, None] * 4.0 + 20.0)
    return np.floor(images) if integer else images


def hand_policy(ops, levels, signs=None, applied=None, cutout=None):
    """A Policy with the given per-image, per-slot op names and levels."""
    ops = np.array([[ra.OPS.index(name) for name in row] for row in ops], np.int32)
    levels = np.asarray(levels, np.int32).reshape(ops.shape)
    signs = np.ones(ops.shape, np.float32) if signs is None else np.asarray(
        signs, np.float32).reshape(ops.shape)
    applied = np.ones(ops.shape, bool) if applied is None else np.asarray(
        applied, bool).reshape(ops.shape)
    cutout = np.zeros((ops.shape[0], 0, 2), np.float32) if cutout is None else cutout
    return ra.Policy(*(tf.constant(v) for v in (ops, levels, applied, signs, cutout)))


def run_policy(images, ops, levels, **kwargs):
    augment = ra.RandAugmentCutout(num_ops=len(ops[0]), cutout_count=0)
    out, coords = augment.apply(tf.constant(images), hand_policy(ops, levels, **kwargs))
    return out.numpy(), coords.numpy()


# --- numpy references -------------------------------------------------------------------

def int_parameter(level, maxval):
    return int(level * maxval / 10)


def float_parameter(level, maxval):
    return float(level) * maxval / 10


def enhance_factor(level):
    return float_parameter(level, 1.8) + 0.1


def np_grey(x):
    return x @ np.array([0.299, 0.587, 0.114])


def np_autocontrast(x):
    out = x.copy()
    for c in range(3):
        lo, hi = x[..., c].min(), x[..., c].max()
        if hi > lo:
            out[..., c] = (x[..., c] - lo) * 255.0 / (hi - lo)
    return out


def np_equalize(x):
    """PIL's ImageOps.equalize, channel by channel, on the floor of the pixels."""
    levels = np.floor(x).astype(int)
    out = x.copy()
    for c in range(3):
        h = np.bincount(levels[..., c].ravel(), minlength=256)
        histo = [count for count in h if count]
        step = (sum(histo) - histo[-1]) // 255 if len(histo) > 1 else 0
        if not step:
            continue
        lut, n = [], step // 2
        for i in range(256):
            lut.append(min(n // step, 255))
            n += h[i]
        out[..., c] = np.array(lut)[levels[..., c]]
    return out


def np_solarize(x, level):
    threshold = 256 - int_parameter(level, 256)
    return np.where(x >= threshold, 255.0 - x, x)


def np_posterize(x, level):
    bits = 4 - int_parameter(level, 4)
    mask = (0xFF << (8 - bits)) & 0xFF
    return (np.floor(x).astype(np.uint8) & mask).astype(np.float64)


def np_color(x, level):
    grey = np_grey(x)[..., None]
    return np.clip(grey + enhance_factor(level) * (x - grey), 0, 255)


def np_contrast(x, level):
    mean = np_grey(x).mean()
    return np.clip(mean + enhance_factor(level) * (x - mean), 0, 255)


def np_brightness(x, level):
    return np.clip(enhance_factor(level) * x, 0, 255)


def np_sharpness(x, level):
    smooth = x.copy()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    for i in range(1, x.shape[0] - 1):
        for j in range(1, x.shape[1] - 1):
            smooth[i, j] = np.einsum("ijc,ij->c", x[i - 1:i + 2, j - 1:j + 2], kernel)
    return np.clip(smooth + enhance_factor(level) * (x - smooth), 0, 255)


NP_PHOTOMETRIC = {
    "AutoContrast": lambda x, level: np_autocontrast(x),
    "Equalize": lambda x, level: np_equalize(x),
    "Solarize": np_solarize, "Posterize": np_posterize, "Color": np_color,
    "Contrast": np_contrast, "Brightness": np_brightness, "Sharpness": np_sharpness,
}


def pil_rotate_data(degrees, height, width):
    """The affine data PIL's Image.rotate(degrees) uses (Pillow's own arithmetic)."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def np_source(data, height, width):
    """(row, col) [H, W, 2] that PIL affine data samples (nearest), -1 outside."""
    a, b, c, d, e, f = data
    y, x = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    col = np.floor(a * x + b * y + c)
    row = np.floor(d * x + e * y + f)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    return np.where(inside[..., None], np.stack([row, col], -1), -1).astype(int)


def np_gather(image, source, fill):
    """image [H, W, ...] at source [H, W, 2], `fill` where the source is -1."""
    valid = source[..., 0] >= 0
    out = image[np.maximum(source[..., 0], 0), np.maximum(source[..., 1], 0)]
    return np.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, fill)


def coordinate_image(batch, height, width):
    """Channels: row, col, 1 (values within 0..255 and never the fill grey)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows, cols, np.ones_like(rows)], -1).astype(np.float32)
    return np.repeat(image[None], batch, 0)


# --- 1. coordinate maps -----------------------------------------------------------------

def test_coords_say_where_every_pixel_came_from():
    height, width, batch = 40, 48, 6
    images = coordinate_image(batch, height, width)
    augment = ra.RandAugmentCutout(ops=GEOMETRIC, probability=1.0, cutout_count=0)
    invalid_seen = 0
    for step in range(4):
        out, coords = augment(tf.constant(images), seeds.step_seed(1, step, 0))
        out, coords = out.numpy(), coords.numpy()
        assert coords.dtype == np.int32 and coords.shape == (batch, height, width, 2)
        invalid = coords[..., 0] < 0
        np.testing.assert_array_equal(invalid, coords[..., 1] < 0)
        for i in range(batch):
            np.testing.assert_array_equal(out[i], np_gather(images[i], coords[i], FILL))
        # Out-of-image pixels are exactly the grey ones (inside, channel 2 is 1).
        np.testing.assert_array_equal(invalid, out[..., 2] == FILL)
        invalid_seen += invalid.sum()
        # Labels that are each pixel's own index, warped, give back the coordinates.
        index = (np.arange(height)[:, None] * width + np.arange(width)[None, :])
        warped = ra.warp_labels(np.repeat(index[None], batch, 0), coords, ignore_label=-1)
        np.testing.assert_array_equal(
            warped.numpy(), np.where(invalid, -1, coords[..., 0] * width + coords[..., 1]))
    assert invalid_seen > 0  # rotations and shifts did move pixels in from outside


def test_geometric_ops_compose_by_sequential_nearest_resampling():
    """Rotate then ShearX then TranslateY: each resamples the previous result."""
    images = random_images(2, seed=3)
    all_levels, all_signs = [(7, 9, 4), (4, 4, 9)], [(1, -1, 1), (-1, 1, -1)]
    out, coords = run_policy(images, [["Rotate", "ShearX", "TranslateY"]] * 2, all_levels,
                             signs=all_signs)
    for i, (levels, signs) in enumerate(zip(all_levels, all_signs)):
        steps = [pil_rotate_data(signs[0] * int_parameter(levels[0], 30), H, W),
                 (1, signs[1] * float_parameter(levels[1], 0.3), 0, 0, 1, 0),
                 (1, 0, 0, 0, 1, signs[2] * int_parameter(levels[2], 10))]
        source = np.stack(np.meshgrid(np.arange(H), np.arange(W), indexing="ij"), -1)
        for data in steps:
            source = np_gather(source, np_source(data, H, W), -1)
        np.testing.assert_array_equal(coords[i], source)
        np.testing.assert_array_equal(out[i], np_gather(images[i], source, FILL))


# --- 2. warp_labels ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_warp_labels_by_one_column(dtype):
    labels = np.arange(2 * 4 * 4).reshape(2, 4, 4).astype(dtype)
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    coords = np.stack([rows, cols + 1], -1)
    coords[cols + 1 >= 4] = -1  # the last column came from outside
    coords = np.repeat(coords[None], 2, 0).astype(np.int32)
    warped = ra.warp_labels(labels, coords).numpy()
    assert warped.dtype == dtype
    expected = np.concatenate([labels[:, :, 1:], np.full((2, 4, 1), 255, dtype)], axis=2)
    np.testing.assert_array_equal(warped, expected)
    # Maps with a channel axis (probabilities) are warped alike.
    probs = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    warped = ra.warp_labels(probs, coords, ignore_label=0.0).numpy()
    np.testing.assert_array_equal(warped[:, :, :3], probs[:, :, 1:])
    np.testing.assert_array_equal(warped[:, :, 3], 0.0)


# --- 3. photometric ops -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(NP_PHOTOMETRIC))
def test_photometric_op_matches_numpy(name):
    images = random_images(4, seed=5)
    images[3] = images[2]
    levels = [1, 5, 9, 9]
    # The last image draws the op but skips it.
    out, coords = run_policy(images, [[name]] * 4, levels, applied=[1, 1, 1, 0])
    for i in range(3):
        want = NP_PHOTOMETRIC[name](images[i].astype(np.float64), levels[i])
        np.testing.assert_allclose(out[i], want, atol=2e-3, err_msg=f"{name} image {i}")
    np.testing.assert_array_equal(out[3], images[3])
    np.testing.assert_array_equal(coords, ra.identity_coords(4, H, W).numpy())


def test_photometric_parameters():
    """The level -> parameter tables of the released code."""
    assert [256 - int_parameter(m, 256) for m in range(1, 10)] == [
        231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert [4 - int_parameter(m, 4) for m in range(1, 10)] == [4, 4, 3, 3, 2, 2, 2, 1, 1]
    ramp = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1).repeat(3, -1)
    got = ra.solarize(ramp, tf.constant([128])).numpy()[0, ..., 0].ravel()
    np.testing.assert_array_equal(got, [i if i < 128 else 255 - i for i in range(256)])
    got = ra.posterize(ramp, tf.constant([2])).numpy()[0, ..., 0].ravel()
    np.testing.assert_array_equal(got, [i & 0xC0 for i in range(256)])


def test_equalize_leaves_flat_channels_alone():
    images = np.full((1, 32, 32, 3), 50.0, np.float32)
    images[0, :, :, 1] = np.floor((np.arange(1024) / 1024) ** 2 * 255).reshape(32, 32)
    images[0, :3, :, 2] = 200.0  # two levels, but (1024 - 96) // 255 > 0
    images[0, :1, :4, 0] = 10.0  # few pixels off the main level: step 0
    out = ra.equalize(tf.constant(images)).numpy()[0]
    np.testing.assert_array_equal(out[..., 0], images[0, ..., 0])
    np.testing.assert_array_equal(out, np_equalize(images[0]))
    assert not np.array_equal(out[..., 1], images[0, ..., 1])
    # step = 928 // 255 = 3; lut[200] = (1 + 928) // 3 = 309, clipped to 255 as PIL does.
    assert set(np.unique(out[..., 2])) == {0.0, 255.0}


def test_photometric_ops_match_pil_on_integer_images():
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    images = random_images(1, seed=8, integer=True)
    pil = Image.fromarray(images[0].astype(np.uint8))
    level = 6
    factor = enhance_factor(level)
    references = {
        "AutoContrast": (ImageOps.autocontrast(pil), 1.0),
        "Equalize": (ImageOps.equalize(pil), 0.0),
        "Solarize": (ImageOps.solarize(pil, 256 - int_parameter(level, 256)), 0.0),
        "Posterize": (ImageOps.posterize(pil, 4 - int_parameter(level, 4)), 0.0),
        # PIL rounds the degenerate image and truncates the blend.
        "Color": (ImageEnhance.Color(pil).enhance(factor), 2.0),
        "Contrast": (ImageEnhance.Contrast(pil).enhance(factor), 2.0),
        "Brightness": (ImageEnhance.Brightness(pil).enhance(factor), 1.0),
        "Sharpness": (ImageEnhance.Sharpness(pil).enhance(factor), 2.0),
    }
    for name, (want, tolerance) in references.items():
        out, _ = run_policy(images, [[name]], [level])
        np.testing.assert_allclose(out[0], np.asarray(want, np.float32), atol=tolerance,
                                   err_msg=name)


def test_photometric_ops_after_a_shift_see_black_outside():
    """Equalize after TranslateX counts the out-of-image pixels as black; they end grey."""
    images = random_images(1, seed=9)
    out, coords = run_policy(images, [["TranslateX", "Equalize"]], [[9, 5]])
    shifted = np.roll(images[0], -9, axis=1).astype(np.float64)
    shifted[:, -9:] = 0.0
    want = np_equalize(shifted)
    want[:, -9:] = FILL
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(coords[0, :, -9:], -1)


# --- 4. geometric ops against numpy -----------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_translate_is_a_roll_with_fill(sign):
    images = random_images(1, seed=4)
    for name, axis in (("TranslateX", 1), ("TranslateY", 0)):
        out, coords = run_policy(images, [[name]], [[6]], signs=[[sign]])
        shift = 6 * sign  # output pixel p shows source pixel p + shift
        want = np.roll(images[0], -shift, axis=axis)
        edge = slice(-shift, None) if shift > 0 else slice(None, -shift)
        (want[:, edge] if axis == 1 else want[edge])[...] = FILL
        np.testing.assert_array_equal(out[0], want, err_msg=name)
        valid = (coords[0, ..., 0] >= 0)
        assert valid.sum() == (H * (W - 6) if axis == 1 else (H - 6) * W)


@pytest.mark.parametrize("name, level, sign", [("Rotate", 9, 1), ("Rotate", 4, -1),
                                               ("ShearX", 9, -1), ("ShearY", 6, 1)])
def test_rotate_and_shear_match_numpy(name, level, sign):
    images = random_images(1, seed=6)
    out, coords = run_policy(images, [[name]], [[level]], signs=[[sign]])
    if name == "Rotate":
        data = pil_rotate_data(sign * int_parameter(level, 30), H, W)
    elif name == "ShearX":
        data = (1, sign * float_parameter(level, 0.3), 0, 0, 1, 0)
    else:
        data = (1, 0, 0, sign * float_parameter(level, 0.3), 1, 0)
    source = np_source(data, H, W)
    np.testing.assert_array_equal(coords[0], source)
    np.testing.assert_array_equal(out[0], np_gather(images[0], source, FILL))
    assert (source[..., 0] < 0).any()


@pytest.mark.parametrize("name", GEOMETRIC)
def test_coords_match_pil_on_index_maps_as_the_released_code(name):
    """The released code warps uint16 row / col maps (PIL mode I;16, which PIL resamples
    in double precision) with the same PIL calls: the coordinates agree exactly, at every
    level and sign (ShearX / ShearY at level 4 hit exact ties between two pixels)."""
    Image = pytest.importorskip("PIL.Image")
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    maps = [Image.fromarray((m + 1).astype(np.uint16)) for m in (rows, cols)]  # 0: outside
    assert maps[0].mode == "I;16"
    levels = np.arange(1, 10).repeat(2)
    signs = np.tile([1, -1], 9)
    _, coords = run_policy(coordinate_image(18, H, W), [[name]] * 18, levels[:, None],
                           signs=signs[:, None])
    for i, (level, sign) in enumerate(zip(levels, signs)):
        if name == "Rotate":
            warped = [m.rotate(sign * int_parameter(level, 30)) for m in maps]
        else:
            value = sign * (float_parameter(level, 0.3) if name.startswith("Shear")
                            else int_parameter(level, 10))
            data = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
                    "TranslateX": (1, 0, value, 0, 1, 0),
                    "TranslateY": (1, 0, 0, 0, 1, value)}[name]
            warped = [m.transform(m.size, Image.AFFINE, data) for m in maps]
        want = np.stack([np.asarray(m).astype(int) - 1 for m in warped], -1)
        np.testing.assert_array_equal(coords[i], want, err_msg=f"{name} {level} {sign}")


# --- 5. Cutout --------------------------------------------------------------------------

def test_cutout_greys_the_drawn_squares_only():
    size, count, batch = 10, 3, 8
    images = random_images(batch, seed=7) * (100.0 / 255.0)  # never the fill grey
    augment = ra.RandAugmentCutout(probability=0.0, cutout_size=size, cutout_count=count)
    seed = seeds.step_seed(2, 0, 0)
    out, coords = (t.numpy() for t in augment(tf.constant(images), seed))
    centres = augment.sample_policy(seed, batch).cutout.numpy()
    assert centres.shape == (batch, count, 2)
    for i in range(batch):
        want = np.zeros((H, W), bool)
        for u, v in centres[i]:
            top = int(np.floor(u * np.float32(H))) - size // 2
            left = int(np.floor(v * np.float32(W))) - size // 2
            want[max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = True
        np.testing.assert_array_equal(np.all(out[i] == FILL, axis=-1), want)
        np.testing.assert_array_equal(out[i][~want], images[i][~want])
    np.testing.assert_array_equal(coords, ra.identity_coords(batch, H, W).numpy())


def test_cutout_squares_have_the_given_side():
    images = np.zeros((64, H, W, 3), np.float32)
    out, _ = ra.RandAugmentCutout(probability=0.0, cutout_size=7, cutout_count=1)(
        tf.constant(images), seeds.step_seed(3, 0, 0))
    grey = np.all(out.numpy() == FILL, axis=-1)
    sides = [(rows.sum(), cols.sum()) for rows, cols in
             ((g.any(axis=1), g.any(axis=0)) for g in grey)]
    assert all(grey[i].sum() == r * c for i, (r, c) in enumerate(sides))  # rectangles
    assert max(r for r, _ in sides) == 7 and max(c for _, c in sides) == 7
    assert min(min(side) for side in sides) >= 4  # centre inside: at least half shows


# --- 6. determinism and independence of examples ----------------------------------------

def test_same_seed_same_result_and_examples_are_independent():
    augment = ra.RandAugmentCutout()
    images = random_images(4, seed=10)
    seed = seeds.step_seed(4, 7, 1)
    first = [t.numpy() for t in augment(tf.constant(images), seed)]
    again = [t.numpy() for t in augment(tf.constant(images), seed)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other = [t.numpy() for t in augment(tf.constant(images), seeds.step_seed(4, 8, 1))]
    assert not np.array_equal(first[0], other[0])
    # Example 0 keeps its augmentation when the other examples change.
    changed = images.copy()
    changed[1:] = random_images(3, seed=11)
    out, coords = augment(tf.constant(changed), seed)
    np.testing.assert_array_equal(out.numpy()[0], first[0][0])
    np.testing.assert_array_equal(coords.numpy()[0], first[1][0])


def test_draws_do_not_depend_on_the_replica_split(two_replicas):
    augment = ra.RandAugmentCutout(cutout_size=8)
    images = tf.constant(random_images(4, seed=12))
    seed = seeds.step_seed(5, 2, 1)
    single = [t.numpy() for t in augment(images, seed)]

    @tf.function
    def per_replica(x):
        return two_replicas.run(lambda x: augment(x, seed), (x,))

    ds = two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(images).unbatch().batch(4))
    split = per_replica(next(iter(ds)))
    for want, got in zip(single, split):
        got = np.concatenate(
            [t.numpy() for t in two_replicas.experimental_local_results(got)])
        np.testing.assert_array_equal(got, want)


# --- 7. tf.function with a dynamic batch ------------------------------------------------

def test_runs_in_tf_function_with_dynamic_batch():
    augment = ra.RandAugmentCutout(cutout_size=8, skip_unused=False)
    traced = tf.function(augment, input_signature=[
        tf.TensorSpec([None, H, W, 3], tf.float32), tf.TensorSpec([2], tf.int32)])
    seed = seeds.step_seed(6, 0, 1)
    for batch in (2, 3):
        images = tf.constant(random_images(batch, seed=batch))
        out, coords = traced(images, seed)
        assert out.shape == (batch, H, W, 3) and coords.shape == (batch, H, W, 2)
        eager = augment(images, seed)
        np.testing.assert_array_equal(out.numpy(), eager[0].numpy())
        np.testing.assert_array_equal(coords.numpy(), eager[1].numpy())
    assert traced.experimental_get_tracing_count() == 1


# --- 8. policy statistics ---------------------------------------------------------------

def test_policy_draws_ops_with_replacement_levels_and_coins():
    batch = 14000
    policy = ra.RandAugmentCutout().sample_policy(seeds.step_seed(7, 0, 0), batch)
    ops, levels = policy.ops.numpy(), policy.levels.numpy()
    applied, signs = policy.applied.numpy(), policy.signs.numpy()
    assert ops.shape == levels.shape == applied.shape == signs.shape == (batch, 3)
    assert ops.min() == 0 and ops.max() == 13
    np.testing.assert_allclose(np.bincount(ops.ravel(), minlength=14) / ops.size, 1 / 14,
                               atol=0.01)
    assert levels.min() == 1 and levels.max() == 9
    np.testing.assert_allclose(np.bincount(levels.ravel(), minlength=10)[1:] / levels.size,
                               1 / 9, atol=0.01)
    assert abs(applied.mean() - 0.5) < 0.02
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < 0.02
    # With replacement: some images draw an op twice (1 - 13 * 12 / 14 ** 2 = 0.204).
    repeated = np.mean([len(set(row)) < 3 for row in ops])
    assert abs(repeated - (1 - 13 * 12 / 14 ** 2)) < 0.02
    # Each (op, applied) pair per slot: about 0.5 / 14.
    share = np.mean((ops == ra.OPS.index("Equalize")) & applied)
    assert abs(share - 0.5 / 14) < 0.006
    subset = ra.RandAugmentCutout(ops=["Rotate", "Solarize"], max_level=3, num_ops=2)
    policy = subset.sample_policy(seeds.step_seed(7, 1, 0), 2000)
    assert set(np.unique(policy.ops.numpy())) == {ra.OPS.index("Rotate"),
                                                  ra.OPS.index("Solarize")}
    assert set(np.unique(policy.levels.numpy())) == {1, 2, 3}
    assert policy.ops.shape == (2000, 2)


def test_nothing_applied_only_clips():
    images = random_images(2, seed=13)
    images[0, 0, :2] = [[-20.0, 300.0, 5.0], [255.5, -0.5, 0.0]]
    out, coords = ra.RandAugmentCutout(probability=0.0, cutout_count=0)(
        tf.constant(images), seeds.step_seed(8, 0, 0))
    np.testing.assert_array_equal(out.numpy(), np.clip(images, 0, 255))
    np.testing.assert_array_equal(coords.numpy(), ra.identity_coords(2, H, W).numpy())


def test_unknown_op_names_are_refused():
    with pytest.raises(ValueError):
        ra.RandAugmentCutout(ops=["Rotate", "Invert"])
