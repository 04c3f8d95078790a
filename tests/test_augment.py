"""Mixing masks, mixing, strong augmentation and the replica-independent random draws."""

import numpy as np
import pytest
import tensorflow as tf

from kssl.augment import mixing, seeds, strong

NUM_CLASSES = 6


def label_maps():
    """Three 4x6 label maps: 4 classes, 5 classes, and a single class."""
    a = np.array([[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 3, 0, 0, 0]] * 2)
    b = np.array([[0, 1, 2, 3, 4, 4]] * 4)
    c = np.full((4, 6), 5)
    return np.stack([a, b, c]).astype(np.int32)


def test_class_mask_keeps_exactly_the_chosen_classes():
    labels = label_maps()
    scores = np.full((3, NUM_CLASSES), 0.5, np.float32)
    scores[0] = [0.9, 0.1, 0.5, 0.3, 0.0, 0.0]  # present 0-3: the two lowest are 1 and 3
    scores[1] = [0.2, 0.8, 0.1, 0.7, 0.6, 0.0]  # present 0-4 (5 -> 2 chosen): 2 and 0
    mask = mixing.class_mix_masks(labels, NUM_CLASSES, scores).numpy()
    np.testing.assert_array_equal(mask[0], np.isin(labels[0], [1, 3]))
    np.testing.assert_array_equal(mask[1], np.isin(labels[1], [0, 2]))
    np.testing.assert_array_equal(mask[2], 0)  # one class: nothing is pasted
    assert mask.dtype == np.float32


def test_class_mask_is_half_of_the_present_classes_for_random_draws():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, (16, 5, 5)).astype(np.int32)
    labels[3] = 2  # a single-class image among them
    labels[4, :, :3] = 1
    labels[4, :, 3:] = 4  # two classes: exactly one is kept
    for step in range(3):
        scores = seeds.per_example_uniform(seeds.step_seed(0, step, 1), 16, (NUM_CLASSES,))
        mask = mixing.class_mix_masks(labels, NUM_CLASSES, scores).numpy()
        for image, keep in zip(labels, mask):
            chosen = np.unique(image[keep == 1])
            assert len(chosen) == len(np.unique(image)) // 2
            np.testing.assert_array_equal(keep, np.isin(image, chosen))
        np.testing.assert_array_equal(mask[3], 0)


def test_images_and_probabilities_are_mixed_with_the_same_mask():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (3, 4, 6, 3)).astype(np.float32)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), (3, 4, 6)).astype(np.float32)
    mask = mixing.class_mix_masks(label_maps(), NUM_CLASSES,
                                  rng.uniform(size=(3, NUM_CLASSES))).numpy()
    mixed_images = mixing.mix(mask, images).numpy()
    mixed_probs = mixing.mix(mask, probs).numpy()
    for i in range(3):
        partner = (i + 1) % 3  # image i is pasted over image i+1, cyclically
        keep = mask[i][..., None] == 1
        np.testing.assert_array_equal(mixed_images[i],
                                      np.where(keep, images[i], images[partner]))
        np.testing.assert_array_equal(mixed_probs[i], np.where(keep, probs[i], probs[partner]))
    # A label map and a lower-resolution feature map follow the same mask.
    labels = label_maps()
    np.testing.assert_array_equal(mixing.mix(mask, labels).numpy(),
                                  np.where(mask == 1, labels, np.roll(labels, -1, 0)))
    features = rng.normal(size=(3, 2, 3, 5)).astype(np.float32)
    small = mask[:, 1::2, 1::2]  # nearest resizing samples each 2x2 cell's centre pixel
    np.testing.assert_array_equal(
        mixing.mix(mask, features).numpy(),
        np.where(small[..., None] == 1, features, np.roll(features, -1, 0)))


def test_box_masks_cover_the_drawn_area():
    mask = mixing.box_masks(8, 40, 60, seeds.step_seed(0, 0, 3)).numpy()
    assert mask.shape == (8, 40, 60) and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_allclose(mask.mean(axis=(1, 2)), 0.5, atol=0.05)
    for m in mask:  # one rectangle: rows and columns with ones are contiguous
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    three = mixing.box_masks(8, 40, 60, seeds.step_seed(0, 0, 3), num_boxes=3,
                             proportion_range=(0.25, 0.5)).numpy()
    assert np.all(three.mean(axis=(1, 2)) <= 0.5 + 0.05)


def test_random_draws_and_pairing_do_not_depend_on_the_replica_split(two_replicas):
    seed = seeds.step_seed(7, 3, 1)
    single = seeds.per_example_uniform(seed, 4, (5,)).numpy()
    x = tf.reshape(tf.range(4 * 3, dtype=tf.float32), (4, 3))

    @tf.function
    def per_replica(x):
        def step(x):
            return seeds.per_example_uniform(seed, tf.shape(x)[0], (5,)), mixing.next_in_batch(x)
        return two_replicas.run(step, (x,))

    ds = two_replicas.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    draws, rolled = per_replica(next(iter(ds)))
    draws = np.concatenate([d.numpy() for d in two_replicas.experimental_local_results(draws)])
    rolled = np.concatenate([r.numpy() for r in two_replicas.experimental_local_results(rolled)])
    np.testing.assert_array_equal(draws, single)
    np.testing.assert_array_equal(rolled, np.roll(x.numpy(), -1, axis=0))


def test_strong_augment_changes_only_colours_and_is_reproducible():
    rng = np.random.default_rng(2)
    images = tf.constant(rng.uniform(0, 255, (4, 24, 32, 3)).astype(np.float32))
    seed = seeds.step_seed(0, 5, 2)
    always = strong.StrongAugment(jitter_probability=1.0, blur_probability=1.0)
    out = always(images, seed).numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images.numpy())
    np.testing.assert_array_equal(out, always(images, seed).numpy())
    never = strong.StrongAugment(jitter_probability=0.0, blur_probability=0.0)
    np.testing.assert_allclose(never(images, seed).numpy(), images.numpy(), rtol=1e-6)
    # Blur alone keeps a constant image constant (normalised kernel, reflect padding).
    grey = tf.fill((1, 24, 32, 3), 100.0)
    blurred = strong.StrongAugment(jitter_probability=0.0, blur_probability=1.0)(grey, seed)
    np.testing.assert_allclose(blurred.numpy(), 100.0, rtol=1e-5)


@pytest.mark.parametrize("side, size", [(321, 33), (512, 51), (1024, 103), (96, 9)])
def test_blur_kernel_is_a_tenth_of_the_side_and_odd(side, size):
    assert int(strong.blur_kernel_size(side)) == size


def test_hue_shift_is_a_fraction_of_the_colour_circle():
    """kornia 0.3 (the released code) shifts hue by factor * 2*pi radians: a factor of
    0.25 turns pure red a quarter of the way round the circle."""
    import colorsys

    from kssl.augment import strong

    red = tf.constant([[[[1.0, 0.0, 0.0]]]])
    for shift in (0.25, -0.1):
        got = strong._adjust_hue(red, shift).numpy()[0, 0, 0]
        want = colorsys.hsv_to_rgb(shift % 1.0, 1.0, 1.0)
        np.testing.assert_allclose(got, want, atol=1e-5)


# -- CutMix boxes centred on a class ---------------------------------------------------------
def numpy_centred_box(height, width, box_h, box_w, row, col):
    """A box_h x box_w box with (row, col) on its row box_h // 2 and column box_w // 2,
    the part outside the image dropped."""
    mask = np.zeros((height, width), np.float32)
    top, left = row - box_h // 2, col - box_w // 2
    mask[max(top, 0):max(top + box_h, 0), max(left, 0):max(left + box_w, 0)] = 1
    return mask


def test_centred_boxes_are_cut_off_at_the_borders():
    # (box_h, box_w, row, col) on a 6x8 image: inside; past the top-left corner; past the
    # bottom-right corner with an odd and an even size; an empty box.
    cases = [(3, 3, 2, 3), (4, 2, 0, 0), (5, 6, 5, 7), (2, 8, 3, 4), (0, 3, 2, 2)]
    box_h, box_w, rows, cols = (np.array(c) for c in zip(*cases))
    got = mixing.centred_boxes(box_h.astype(np.float32), box_w.astype(np.float32), rows,
                               cols, 6, 8).numpy()
    want = np.stack([numpy_centred_box(6, 8, *c) for c in cases])
    np.testing.assert_array_equal(got, want)
    # By hand: rows 1-3 x columns 2-4; rows 0-1 x column 0; rows 3-5 x columns 4-7.
    assert got[0, 1:4, 2:5].all() and got[0].sum() == 9
    assert got[1, 0:2, 0].all() and got[1].sum() == 2
    assert got[2, 3:, 4:].all() and got[2].sum() == 12
    assert got[3, 2:4].all() and got[3].sum() == 16 and got[4].sum() == 0


def class_map():
    """A 4x5 label map: class 2 on seven scattered pixels, class 1 on three, 0 elsewhere."""
    labels = np.zeros((4, 5), np.int32)
    for r, c in [(0, 0), (0, 4), (1, 2), (2, 1), (3, 0), (3, 3), (3, 4)]:
        labels[r, c] = 2
    labels[1, 3] = labels[2, 3] = labels[2, 4] = 1
    return labels


def test_class_centres_are_uniform_over_the_class_pixels():
    labels = np.broadcast_to(class_map(), (64, 4, 5))
    picks = np.zeros((4, 5), int)
    for step in range(10):
        rows, cols, found = (t.numpy() for t in mixing.class_centres(
            labels, np.full(64, 2), seeds.step_seed(0, step, 4)))
        assert found.all()
        np.add.at(picks, (rows, cols), 1)
    on_class = class_map() == 2
    assert picks[~on_class].sum() == 0  # every pick is a pixel of class 2
    # 640 picks over 7 pixels, about 91 each (standard deviation about 9).
    assert picks[on_class].min() > 55 and picks[on_class].max() < 130
    # A class the image lacks, or a negative one, is not found.
    rows, cols, found = (t.numpy() for t in mixing.class_centres(
        labels[:3], np.array([3, -1, 1]), seeds.step_seed(0, 0, 4)))
    np.testing.assert_array_equal(found, [False, False, True])
    assert class_map()[rows[2], cols[2]] == 1


def test_class_cutmix_boxes_centre_the_drawn_box_on_the_class():
    """Each box is the `cutmix_boxes` box of the same seed, moved to be centred on a pixel
    of its image's class; an image without that class keeps the uniform box."""
    big = np.kron(class_map(), np.ones((3, 3), np.int32))  # 12x15, 3x3 blocks
    labels = np.stack([big] * 8 + [np.zeros_like(big)] * 2)
    classes = np.array([2, 1] * 4 + [2, 2])  # the last two images have no class 2
    seed = seeds.step_seed(3, 1, 2)
    got = mixing.class_cutmix_boxes(labels, classes, seed, probability=1.0).numpy()
    drawn, _, _, box_h, box_w = (t.numpy() for t in mixing.cutmix_box_draws(
        10, 12, 15, seed, probability=1.0))
    assert drawn.all() and (box_h * box_w > 0).all()
    for i in range(8):
        h, w = int(box_h[i]), int(box_w[i])
        at = [numpy_centred_box(12, 15, h, w, r, c) for r, c in zip(*np.nonzero(
            labels[i] == classes[i]))]
        assert any(np.array_equal(got[i], box) for box in at), i
    uniform = mixing.cutmix_boxes(10, 12, 15, seed, probability=1.0).numpy()
    np.testing.assert_array_equal(got[8:], uniform[8:])
    assert not np.array_equal(got[:8], uniform[:8])
    # Without a draw there is no box.
    none = mixing.class_cutmix_boxes(labels, classes, seed, probability=0.0).numpy()
    assert not none.any()


def test_class_box_masks_centre_the_first_box_on_the_class():
    """The first of an image's three boxes is the `box_masks` box of the same seed moved
    onto a pixel of the image's class, the centre drawn as `class_centres` with the seed
    folded with 1; the other two stay where `box_masks` put them; the mask is the XOR. An
    image without that class (or class -1) gets the `box_masks` mask itself."""
    big = np.kron(class_map(), np.ones((3, 3), np.int32))  # 12x15, 3x3 blocks
    labels = np.stack([big] * 6 + [np.zeros_like(big)] * 2)
    classes = np.array([2, 1, 2, 1, 2, 1, 2, -1])
    seed = seeds.step_seed(4, 2, 1)
    got = mixing.class_box_masks(labels, classes, seed, num_boxes=3,
                                 proportion_range=(0.25, 0.5)).numpy()
    top, left, box_h, box_w = (t.numpy().astype(int) for t in mixing.box_mask_draws(
        8, 12, 15, seed, 3, (0.25, 0.5)))
    rows, cols, found = (t.numpy() for t in mixing.class_centres(
        labels, classes, tf.random.experimental.stateless_fold_in(seed, 1)))
    np.testing.assert_array_equal(found, [True] * 6 + [False] * 2)
    for i in range(6):
        assert labels[i, rows[i], cols[i]] == classes[i]
        want = numpy_centred_box(12, 15, box_h[i, 0], box_w[i, 0], rows[i], cols[i])
        for j in (1, 2):
            box = np.zeros((12, 15), np.float32)
            box[top[i, j]:top[i, j] + box_h[i, j], left[i, j]:left[i, j] + box_w[i, j]] = 1
            want = (want + box) % 2
        np.testing.assert_array_equal(got[i], want, err_msg=str(i))
    uniform = mixing.box_masks(8, 12, 15, seed, num_boxes=3,
                               proportion_range=(0.25, 0.5)).numpy()
    np.testing.assert_array_equal(got[6:], uniform[6:])
    assert not np.array_equal(got[:6], uniform[:6])
