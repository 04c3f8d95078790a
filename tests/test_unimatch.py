"""UniMatch and FixMatch: CutMix boxes (also class-aware) and mixing, loss terms, the
pseudo-label controls, the feature perturbation, the unlabelled pipeline's views and
padding, distribution, and a resumed driver run."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, losses, models
from kssl.augment import features as feature_ops
from kssl.augment import mixing, seeds
from kssl.augment.strong import ColorJitterGrayscaleBlur
from kssl.data import pipeline
from kssl.data.examples import IGNORE_LABEL
from kssl.data.readers.shapes import Shapes
from kssl.methods import FixMatch, UniMatch
from kssl.models.segmenter import Block, Segmenter
from tiny import (NUM_CLASSES, crash_and_resume, eager_steps, log_softmax,
                  pixel_cross_entropy, random_batches, run_method_test, softmax,
                  tiny_run_config, tiny_segmenter)


# -- a network whose logits numpy can compute -----------------------------------------------
class LinearHead(keras.layers.Layer):
    """logits = features["stem"] @ kernel + bias, per pixel (no batch norm, no dropout)."""

    input_blocks = ("stem",)

    def __init__(self, kernel, bias, **kwargs):
        super().__init__(**kwargs)
        self.kernel = self.add_weight(shape=kernel.shape, initializer="zeros", name="kernel")
        self.bias = self.add_weight(shape=bias.shape, initializer="zeros", name="bias")
        self.kernel.assign(kernel)
        self.bias.assign(bias)
        self.num_classes = kernel.shape[1]

    def call(self, features, training=None):
        return tf.einsum("bhwc,ck->bhwk", features["stem"], self.kernel) + self.bias


def linear_segmenter(seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0, 0.02, (3, NUM_CLASSES)).astype(np.float32)
    bias = rng.normal(0, 0.5, NUM_CLASSES).astype(np.float32)
    net = Segmenter(keras.layers.Identity(), [Block("stem", keras.layers.Identity(), 1, 3)],
                    LinearHead(kernel, bias))
    return net, kernel, bias


# -- CutMix boxes and mixing ---------------------------------------------------------------
def numpy_boxes(draws, height, width, probability, area_range, ratio_range):
    """The released `obtain_cutmix_box` loop on given uniforms (one row per image)."""
    boxes = np.zeros((len(draws), height, width), np.float32)
    for i, row in enumerate(draws):
        if not row[0] < probability:
            continue
        area = (area_range[0] + (area_range[1] - area_range[0]) * row[1]) * height * width
        for ratio_u, x_u, y_u in row[2:].reshape(-1, 3):
            ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * ratio_u
            w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
            x, y = int(x_u * width), int(y_u * height)
            if x + w <= width and y + h <= height:
                break
        boxes[i, y:y + h, x:x + w] = 1
    return boxes


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_cutmix_boxes_follow_the_released_loop(height, width):
    seed = seeds.step_seed(3, 5, 7)
    got = mixing.cutmix_boxes(64, height, width, seed, probability=0.5).numpy()
    draws = seeds.per_example_uniform(seed, 64, (2 + 3 * 256,)).numpy().astype(np.float64)
    want = numpy_boxes(draws, height, width, 0.5, (0.02, 0.4), (0.3, 1 / 0.3))
    np.testing.assert_array_equal(got, want)
    with_box = got.reshape(64, -1).max(1) > 0
    assert 16 < with_box.sum() < 48  # probability 0.5
    for box in got[with_box]:  # one rectangle each
        rows, cols = np.nonzero(box)
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert 0.02 * height * width * 0.5 < box.sum() <= 0.4 * height * width


def unlabelled_pairs(rng, rows=4, size=(8, 10)):
    """Unlabelled rows (image, partner, image, partner): image value = 10 * row, and a
    padding map with a padded band at a different place in every row."""
    images = np.broadcast_to(10.0 * np.arange(rows, dtype=np.float32)[:, None, None, None],
                             (rows,) + size + (3,)).copy()
    padding = np.zeros((rows,) + size, np.int32)
    for r in range(rows):
        padding[r, :, size[1] - 1 - r:] = IGNORE_LABEL
    return images, padding


def test_one_box_mixes_images_labels_confidences_and_padding():
    model = UniMatch(tiny_segmenter(0), NUM_CLASSES, strong_augment=False, variant="fixmatch",
                     cutmix_probability=1.0, seed=4)
    rng = np.random.default_rng(0)
    images, padding = unlabelled_pairs(rng)
    weak, counted, partner, partner_counted = (
        t.numpy() for t in model.split_unlabelled({"image": images, "padding": padding}))
    np.testing.assert_array_equal(weak, images[0::2])
    np.testing.assert_array_equal(partner, images[1::2])
    np.testing.assert_array_equal(counted, padding[0::2] != IGNORE_LABEL)

    (box,), (view,) = model.mixed_views(tf.constant(weak), tf.constant(partner), 0)
    box = box.numpy()
    for b in box:  # a single rectangle
        rows, cols = np.nonzero(b)
        assert len(rows) and b[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    inside = box[..., None] > 0
    np.testing.assert_array_equal(view.numpy(), np.where(inside, partner, weak))

    labels = rng.integers(0, NUM_CLASSES, weak.shape[:3]).astype(np.int32)
    partner_labels = rng.integers(0, NUM_CLASSES, weak.shape[:3]).astype(np.int32)
    confidence = rng.uniform(size=weak.shape[:3]).astype(np.float32)
    partner_confidence = rng.uniform(size=weak.shape[:3]).astype(np.float32)
    mixed = model.mix_targets(tf.constant(box), (labels, confidence, counted),
                              (partner_labels, partner_confidence, partner_counted))
    for got, mine, theirs in zip(mixed, (labels, confidence, counted),
                                 (partner_labels, partner_confidence, partner_counted)):
        np.testing.assert_array_equal(got.numpy(), np.where(box > 0, theirs, mine))


def test_two_views_draw_their_own_boxes_and_jitter():
    model = FixMatch(tiny_segmenter(0), NUM_CLASSES, strong_views=2, cutmix_probability=1.0,
                     seed=4)
    rng = np.random.default_rng(1)
    weak = rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    boxes, views = model.mixed_views(tf.constant(weak), tf.constant(weak[::-1].copy()), 0)
    assert len(boxes) == 2 and not np.array_equal(boxes[0], boxes[1])
    outside = (boxes[0].numpy() == 0) & (boxes[1].numpy() == 0)
    assert not np.allclose(views[0].numpy()[outside], views[1].numpy()[outside])


def test_class_aware_boxes_favour_the_least_confident_class_of_the_partner():
    """Every partner holds class 0 (most pixels), class 1 (a block) and class 2 (one
    pixel); with class confidences (1, 1, 0) the mixing weights are 0.05, 0.05, 1.05, so
    a box is centred on the class-2 pixel with probability 1.05 / 1.15 = 0.91, and covers
    it then. Uniform boxes cover it about as often as their area share, below 0.4."""
    model = FixMatch(tiny_segmenter(0), NUM_CLASSES, strong_views=2, strong_augment=False,
                     cutmix_probability=1.0, seed=3, **CLASS_AWARE)
    model.class_confidence.confidence.assign([1.0, 1.0, 0.0])
    labels = np.zeros((16, 12, 12), np.int32)
    labels[:, 6:, :4] = 1
    spots = [(i % 12, (5 * i + 4) % 12) for i in range(16)]
    for i, spot in enumerate(spots):
        labels[(i,) + spot] = 2
    weak = np.zeros((16, 12, 12, 3), np.float32)
    boxes, _ = model.mixed_views(tf.constant(weak), tf.constant(weak + 1.0), 0,
                                 tf.constant(labels))
    covered = [box.numpy()[(i,) + spot] for box in boxes for i, spot in enumerate(spots)]
    assert sum(covered) >= 24  # of 32; about 29 expected
    off = FixMatch(tiny_segmenter(0), NUM_CLASSES, strong_views=2, strong_augment=False,
                   cutmix_probability=1.0, seed=3)
    uniform, _ = off.mixed_views(tf.constant(weak), tf.constant(weak + 1.0), 0)
    assert sum(box.numpy()[(i,) + spot] for box in uniform
               for i, spot in enumerate(spots)) < 16
    with pytest.raises(ValueError, match="partner_labels"):
        model.mixed_views(tf.constant(weak), tf.constant(weak), 0)


def test_class_aware_boxes_do_not_depend_on_the_replica_split(two_replicas):
    model = FixMatch(tiny_segmenter(0), NUM_CLASSES, cutmix_probability=1.0, seed=0,
                     **CLASS_AWARE)
    model.class_confidence.confidence.assign([0.9, 0.3, 0.6])
    labels = np.random.default_rng(3).integers(-1, NUM_CLASSES, (8, 12, 12)).astype(np.int32)
    view_seed = seeds.step_seed(5, 2, 10)
    single = model.class_aware_boxes(tf.constant(labels), view_seed).numpy()

    @tf.function
    def per_replica(labels):
        return two_replicas.run(lambda x: model.class_aware_boxes(x, view_seed), (labels,))

    ds = two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(labels))
    split = per_replica(next(iter(ds)))
    split = np.concatenate([b.numpy() for b in two_replicas.experimental_local_results(split)])
    np.testing.assert_array_equal(split, single)
    assert single.any(axis=(1, 2)).all()


def test_strong_view_ops_per_image():
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (64, 6, 6, 3)).astype(np.float32)
    seed = seeds.step_seed(0, 0, 1)
    grey_only = ColorJitterGrayscaleBlur(jitter_probability=0.0, grayscale_probability=0.5,
                                         blur_probability=0.0)(images, seed).numpy()
    luma = images @ np.array([0.299, 0.587, 0.114], np.float32)
    is_grey = np.array([np.allclose(g, luma[i][..., None], atol=1e-3)
                        for i, g in enumerate(grey_only)])
    unchanged = np.array([np.array_equal(g, x) for g, x in zip(grey_only, images)])
    np.testing.assert_array_equal(is_grey, ~unchanged)  # each image one or the other
    assert 16 < is_grey.sum() < 48
    # Blur keeps a constant image (edge pixels repeat) and the mean of a smooth one.
    flat = np.full((4, 9, 9, 3), 77.0, np.float32)
    blurred = ColorJitterGrayscaleBlur(0.0, grayscale_probability=0.0,
                                       blur_probability=1.0)(flat, seed)
    np.testing.assert_allclose(blurred.numpy(), flat, rtol=1e-6)


# -- loss terms -----------------------------------------------------------------------------
@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 4.0]])
def test_unlabelled_loss_counts_admitted_pixels_over_counted_ones(class_weights):
    """Unweighted, and with `unsup_class_weights` a mean weighted by the class weights."""
    model = FixMatch(tiny_segmenter(0), NUM_CLASSES, class_weights=class_weights,
                     unsup_class_weights=class_weights is not None, seed=0)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 2, 3, NUM_CLASSES)).astype(np.float32)
    labels = np.array([[[0, 1, 2], [2, 1, 0]]], np.int32)
    admitted = np.array([[[True, False, True], [True, True, False]]])
    counted = np.array([[[True, True, True], [False, True, True]]])
    got = model.unlabelled_loss(logits, labels, admitted, counted).numpy()
    ce = pixel_cross_entropy(logits, labels)
    w = np.ones(NUM_CLASSES) if class_weights is None else np.array(class_weights)
    # Admitted and counted: pixels (0,0) of class 0, (0,2) of class 2, (1,1) of class 1;
    # the padded (1,0) is neither in the sum nor in the count, which holds the 5 counted
    # pixels (classes 0, 1, 2, 1, 0), admitted or not, each counting its class's weight.
    want = (w[0] * ce[0, 0, 0] + w[2] * ce[0, 0, 2] + w[1] * ce[0, 1, 1]) / (
        w[0] + w[1] + w[2] + w[1] + w[0])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("thresholds", ["fixed", "class_adaptive"])
def test_a_pixel_is_admitted_at_its_own_class_threshold(thresholds):
    """For each class c, one pixel whose probability of c is exactly c's threshold
    (admitted: >=) and one just below it (not), the other classes far below."""
    model = FixMatch(tiny_segmenter(0), NUM_CLASSES, confidence_threshold=0.95,
                     thresholds=thresholds, seed=0)
    per_class = np.full(NUM_CLASSES, np.float32(0.95))
    if thresholds == "class_adaptive":
        bank = np.array([0.9, 0.45, 0.6], np.float32)
        model.class_confidence.confidence.assign(bank)
        per_class = np.float32(0.95) * bank / bank.max()  # 0.95, 0.475, 0.633
    probs = np.full((1, 2, NUM_CLASSES, NUM_CLASSES), 0.01, np.float32)
    for c in range(NUM_CLASSES):
        probs[0, 0, c, c] = per_class[c]
        probs[0, 1, c, c] = np.nextafter(per_class[c], np.float32(0))
    labels, admitted = (t.numpy() for t in model.targets(tf.constant(probs)))
    np.testing.assert_array_equal(labels, np.broadcast_to(np.arange(NUM_CLASSES), (1, 2, 3)))
    np.testing.assert_array_equal(admitted, [[[True] * 3, [False] * 3]])


# -- pseudo-label controls: numpy references ------------------------------------------------
PRIOR = np.array([0.6, 0.3, 0.1])
# Both controls on, with fast-moving running state.
CONTROLS = dict(thresholds="class_adaptive", distribution_alignment=True, control_decay=0.5,
                class_prior=PRIOR)
# Class-aware CutMix boxes alone: the class confidence is kept, the thresholds stay fixed.
CLASS_AWARE = dict(class_aware_mixing=True, control_decay=0.5)


def numpy_align(probs, running):
    """probs * prior / running, renormalised (float64)."""
    aligned = np.asarray(probs, np.float64) * PRIOR / running
    return aligned / aligned.sum(-1, keepdims=True)


def numpy_update(state, probs, counted, decay=0.5):
    """The controls' state after a batch, as written: the counted pixels' mean
    probabilities fold into the running distribution, then their aligned confidences, per
    aligned argmax class, into the class confidence. Returns (running, confidence)."""
    running, bank = (np.array(s, np.float64) for s in state)
    pixels = np.asarray(probs, np.float64)[counted]
    running = decay * running + (1 - decay) * pixels.mean(0)
    aligned = numpy_align(pixels, running)
    labels, confidence = aligned.argmax(-1), aligned.max(-1)
    for c in range(NUM_CLASSES):
        if (labels == c).any():
            bank[c] = decay * bank[c] + (1 - decay) * confidence[labels == c].mean()
    return running, bank


def numpy_targets(probs, state, base):
    """(labels, admitted, margin to the own class's threshold) under `state`."""
    running, bank = state
    aligned = numpy_align(probs, running)
    labels, confidence = aligned.argmax(-1), aligned.max(-1)
    margin = confidence - (base * bank / bank.max())[labels]
    return labels, margin >= 0, margin


@pytest.mark.parametrize("variant", ["unimatch", "fixmatch"])
@pytest.mark.parametrize("controls", [False, True, "class_aware"],
                         ids=["fixed", "controls", "class_aware"])
def test_step_losses_match_a_hand_computation(variant, controls):
    """One step at learning rate 0 of a per-pixel linear network: every term and the total
    from numpy logits, with padding in both batches, a box in every view, and a threshold
    between the confidences. With the controls: their state folds in the weak view's
    counted pixels once, and the weak and the partners' targets are aligned and admitted
    with the state just updated. With class-aware boxes: the boxes are placed on the
    partners' argmax (padding left out), the class confidence follows the weak view and
    the thresholds stay fixed."""
    net, kernel, bias = linear_segmenter()
    rng = np.random.default_rng(4)
    size = (6, 7)
    labelled = {"image": rng.uniform(0, 255, (2,) + size + (3,)).astype(np.float32),
                "mask": rng.integers(0, NUM_CLASSES, (2,) + size).astype(np.int32)}
    labelled["mask"][0, 0, :3] = IGNORE_LABEL
    images = rng.uniform(0, 255, (4,) + size + (3,)).astype(np.float32)
    padding = np.zeros((4,) + size, np.int32)
    padding[0, 4:] = padding[1, :, 5:] = padding[3, 5:] = IGNORE_LABEL
    unlabelled = {"image": images, "padding": padding}

    def logits_of(x):
        return x @ kernel + bias

    weak, partner = images[0::2], images[1::2]
    counted, partner_counted = padding[0::2] != IGNORE_LABEL, padding[1::2] != IGNORE_LABEL
    probs = np.exp(log_softmax(logits_of(weak)))
    labels, confidence = probs.argmax(-1), probs.max(-1)
    partner_probs = np.exp(log_softmax(logits_of(partner)))
    partner_labels, partner_confidence = partner_probs.argmax(-1), partner_probs.max(-1)
    tau = float(np.median(np.concatenate([confidence.ravel(), partner_confidence.ravel()])))
    admitted = confidence >= np.float32(tau)
    partner_admitted = partner_confidence >= np.float32(tau)

    options = {False: {}, True: CONTROLS, "class_aware": CLASS_AWARE}[controls]
    # One case keeps the labelled term at a supervised run's weight (not the code's halving).
    scale = 1.0 if controls == "class_aware" else 0.5
    if scale != 0.5:
        options = dict(options, total_weight=scale)
    model = UniMatch(net, NUM_CLASSES, variant=variant, confidence_threshold=tau,
                     strong_augment=False, cutmix_probability=1.0, fp_rate=0.5, seed=2,
                     **options)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    placement = None
    if controls == "class_aware":
        placement = tf.constant(np.where(partner_counted, partner_labels, -1), tf.int32)
    boxes = [b.numpy() > 0 for b in model.mixed_views(
        tf.constant(weak), tf.constant(partner), 0, placement)[0]]
    logs = eager_steps(tf.distribute.get_strategy(), model, [(labelled, unlabelled)])[0]
    if controls == "class_aware":
        uniform = UniMatch(linear_segmenter()[0], NUM_CLASSES, variant=variant,
                           strong_augment=False, cutmix_probability=1.0, seed=2)
        uniform_boxes = uniform.mixed_views(tf.constant(weak), tf.constant(partner), 0)[0]
        assert any(not np.array_equal(b, u.numpy() > 0) for b, u in zip(boxes, uniform_boxes))
        bank = np.ones(NUM_CLASSES)
        for c in range(NUM_CLASSES):
            on = (labels == c) & counted
            if on.any():
                bank[c] = 0.5 + 0.5 * confidence[on].mean()
        np.testing.assert_allclose(model.class_confidence.confidence.numpy(), bank, rtol=1e-5)
        assert model.alignment is None and not np.allclose(bank, 1.0)
    elif controls:
        start = (PRIOR, np.ones(NUM_CLASSES))
        state = numpy_update(start, probs, counted)
        np.testing.assert_allclose(model.alignment.running.numpy(), state[0], rtol=1e-5)
        np.testing.assert_allclose(model.class_confidence.confidence.numpy(), state[1],
                                   rtol=1e-5)
        # The padded pixels are left out of the state.
        assert not np.allclose(numpy_update(start, probs, np.ones_like(counted))[1], state[1])
        plain = (labels, admitted, partner_labels, partner_admitted)
        labels, admitted, margin = numpy_targets(probs, state, tau)
        partner_labels, partner_admitted, partner_margin = numpy_targets(partner_probs,
                                                                         state, tau)
        assert min(np.abs(margin).min(), np.abs(partner_margin).min()) > 1e-5  # no near-ties
        # The controls changed the pseudo-labels and the admission, the partners' too ...
        for before, after in zip(plain, (labels, admitted, partner_labels, partner_admitted)):
            assert (before != after).any()
        # ... and the partners' targets under the state before the step differ from those
        # under the state just updated inside a box (the step takes the latter).
        stale = numpy_targets(partner_probs, start, tau)[1]
        assert any((stale != partner_admitted)[box].any() for box in boxes)

    def term(logits, lab, admit, count):
        kept = admit * count
        return (pixel_cross_entropy(logits, lab) * kept).sum() / count.sum()

    valid = labelled["mask"] != IGNORE_LABEL
    supervised = pixel_cross_entropy(logits_of(labelled["image"]), labelled["mask"])[valid].mean()
    strong = [term(logits_of(np.where(box[..., None], partner, weak)),
                   np.where(box, partner_labels, labels),
                   np.where(box, partner_admitted, admitted),
                   np.where(box, partner_counted, counted)) for box in boxes]
    assert len(strong) == (1 if variant == "fixmatch" else 2)
    assert all(s > 0 for s in strong) and boxes[0].any()
    np.testing.assert_allclose(logs["supervised_loss"], supervised, rtol=1e-5)
    np.testing.assert_allclose(logs["strong_loss"], np.mean(strong), rtol=1e-5)
    share = (admitted & counted).sum() / counted.sum()
    np.testing.assert_allclose(logs["confident_share"], share, rtol=1e-6)
    if variant == "fixmatch":
        assert "fp_loss" not in logs
        np.testing.assert_allclose(logs["loss"], scale * (supervised + strong[0]), rtol=1e-5)
        return
    # The perturbed pass: the linear head on the channel-dropped weak features.
    both = np.concatenate([labelled["image"], weak])
    dropped = model.perturbed_features({"stem": tf.constant(both)}, 2, 0)["stem"].numpy()
    fp = term(logits_of(dropped[-2:]), labels, admitted, counted)
    np.testing.assert_allclose(logs["fp_loss"], fp, rtol=1e-5)
    want = scale * (supervised + 0.25 * strong[0] + 0.25 * strong[1] + 0.5 * fp)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)


def test_pseudo_label_targets_for_the_monitor():
    net, kernel, bias = linear_segmenter()
    rng = np.random.default_rng(8)
    images = rng.uniform(0, 255, (2, 3, 4, 3)).astype(np.float32)
    probs = np.exp(log_softmax(images @ kernel + bias))
    tau = float(np.median(probs.max(-1)))  # half the pixels admitted
    model = UniMatch(net, NUM_CLASSES, confidence_threshold=tau, seed=0)
    (labels, admitted), = model.pseudo_label_targets(tf.constant(images)).values()
    np.testing.assert_array_equal(labels.numpy(), probs.argmax(-1))
    np.testing.assert_array_equal(admitted.numpy(), probs.max(-1) >= np.float32(tau))


class ModeRecorder(keras.layers.Layer):
    """An identity block that records (training, batch size) of every call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def call(self, x, training=None):
        self.calls.append((bool(training), int(x.shape[0])))
        return x


@pytest.mark.parametrize("variant, mix_source, joint", [("unimatch", "second_batch", True),
                                                        ("fixmatch", "second_batch", True),
                                                        ("unimatch", "batch", True),
                                                        ("unimatch", "second_batch", False),
                                                        ("fixmatch", "batch", False)])
def test_each_pass_runs_in_the_released_codes_network_mode(variant, mix_source, joint):
    """The released code predicts the mix partners in eval mode (moving batch-norm
    statistics, dropout off), then [labelled; weak] in one training-mode pass and the
    strong views together in another: the encoder sees exactly these three calls.
    Without `joint_batch_norm`, labelled and weak images have a training-mode pass each."""
    _, kernel, bias = linear_segmenter()
    recorder = ModeRecorder()
    net = Segmenter(keras.layers.Identity(), [Block("stem", recorder, 1, 3)],
                    LinearHead(kernel, bias))
    rng = np.random.default_rng(5)
    labelled = {"image": rng.uniform(0, 255, (3, 6, 7, 3)).astype(np.float32),
                "mask": rng.integers(0, NUM_CLASSES, (3, 6, 7)).astype(np.int32)}
    views = 2 if mix_source == "second_batch" else 1
    unlabelled = {"image": rng.uniform(0, 255, (2 * views, 6, 7, 3)).astype(np.float32),
                  "padding": np.zeros((2 * views, 6, 7), np.int32)}
    model = UniMatch(net, NUM_CLASSES, variant=variant, mix_source=mix_source,
                     joint_batch_norm=joint, strong_augment=False, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    recorder.calls.clear()
    eager_steps(tf.distribute.get_strategy(), model, [(labelled, unlabelled)])
    strong = 2 if variant == "unimatch" else 1
    want = [(False, 2)] if mix_source == "second_batch" else []
    want += [(True, 3 + 2)] if joint else [(True, 3), (True, 2)]
    want += [(True, strong * 2)]
    assert recorder.calls == want


@pytest.mark.parametrize("variant, perturb_labelled", [("fixmatch", True),
                                                       ("unimatch", True),
                                                       ("unimatch", False)])
def test_separate_batch_norm_keeps_labelled_and_weak_logits_apart(variant, perturb_labelled):
    """With batch norm (training mode) in encoder and decoder, the joint pass makes the
    labelled logits depend on the weak images; with `joint_batch_norm=False` neither
    group's logits (clean or perturbed) move when the other group's images change, and
    the labelled ones are the network's own training-mode pass over them (FixMatch)."""
    keras.utils.set_random_seed(0)
    net = models.build_segmenter("deeplabv3plus", "small", num_classes=NUM_CLASSES,
                                 aspp_channels=8, low_level_channels=4, decoder_channels=8,
                                 dropout=0.0)
    rng = np.random.default_rng(8)
    labelled, other_labelled = rng.uniform(0, 255, (2, 3, 32, 32, 3)).astype(np.float32)
    weak, other_weak = rng.uniform(0, 255, (2, 4, 32, 32, 3)).astype(np.float32)

    def passes(joint, x, u):
        model = UniMatch(net, NUM_CLASSES, variant=variant, perturb_labelled=perturb_labelled,
                         joint_batch_norm=joint, seed=0)
        return [None if t is None else t.numpy() for t in model.weak_pass(x, u, 0)]

    x, w, fp = passes(False, labelled, weak)
    x_other_weak, w_same, fp_same = passes(False, labelled, other_weak)
    _, w_other_labelled, fp_other_labelled = passes(False, other_labelled, weak)
    np.testing.assert_allclose(x_other_weak, x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w_other_labelled, w, rtol=1e-4, atol=1e-5)
    assert not np.allclose(w_same, w, atol=1e-3)
    joint_x, _, _ = passes(True, labelled, weak)
    joint_x_other_weak, _, _ = passes(True, labelled, other_weak)
    assert not np.allclose(joint_x_other_weak, joint_x, atol=1e-3)
    if variant == "fixmatch":
        assert fp is None
        np.testing.assert_allclose(x, net(labelled, training=True).numpy(), rtol=1e-4,
                                   atol=1e-5)
    else:
        np.testing.assert_allclose(fp_other_labelled, fp, rtol=1e-4, atol=1e-5)
        assert fp.shape == w.shape and not np.allclose(fp, w, atol=1e-3)


def test_pseudo_label_targets_read_the_stored_controls_without_updating_them():
    net, kernel, bias = linear_segmenter()
    model = FixMatch(net, NUM_CLASSES, confidence_threshold=0.8, seed=0, **CONTROLS)
    running, bank = np.array([0.2, 0.3, 0.5]), np.array([0.9, 0.5, 0.7])
    model.alignment.running.assign(running)
    model.class_confidence.confidence.assign(bank)
    images = np.random.default_rng(9).uniform(0, 255, (2, 6, 5, 3)).astype(np.float32)
    probs = softmax((images @ kernel + bias).astype(np.float64))
    labels, admitted, margin = numpy_targets(probs, (running, bank), 0.8)
    assert np.abs(margin).min() > 1e-5 and 0 < admitted.sum() < admitted.size
    assert (labels != probs.argmax(-1)).any()  # the alignment mattered
    (got_labels, got_admitted), = model.pseudo_label_targets(tf.constant(images)).values()
    np.testing.assert_array_equal(got_labels.numpy(), labels)
    np.testing.assert_array_equal(got_admitted.numpy(), admitted)
    np.testing.assert_allclose(model.alignment.running.numpy(), running, rtol=1e-6)
    np.testing.assert_allclose(model.class_confidence.confidence.numpy(), bank, rtol=1e-6)


def test_controls_are_off_by_default_and_bad_settings_refused():
    plain = UniMatch(linear_segmenter()[0], NUM_CLASSES)
    assert plain.class_confidence is None and plain.alignment is None
    controlled = UniMatch(linear_segmenter()[0], NUM_CLASSES, **CONTROLS)
    # The released recipe's checkpoints keep their layout; the controls add their state.
    state = controlled.class_confidence.weights + controlled.alignment.weights
    assert len(state) == 3 and len(controlled.weights) == len(plain.weights) + 3
    assert all(any(w is v for v in controlled.weights) for w in state)
    assert FixMatch(tiny_segmenter(0), NUM_CLASSES, **CONTROLS).alignment is not None
    class_aware = FixMatch(tiny_segmenter(0), NUM_CLASSES, confidence_threshold=0.7,
                           **CLASS_AWARE)
    assert class_aware.class_confidence is not None and class_aware.alignment is None
    class_aware.class_confidence.confidence.assign([1.0, 0.5, 0.2])
    assert class_aware.pixel_thresholds(tf.constant([[0, 1, 2]])) == 0.7  # still fixed
    with pytest.raises(ValueError, match="second_batch"):
        FixMatch(tiny_segmenter(0), NUM_CLASSES, mix_source="batch", **CLASS_AWARE)
    with pytest.raises(ValueError, match="class_prior"):
        UniMatch(linear_segmenter()[0], NUM_CLASSES, distribution_alignment=True)
    with pytest.raises(ValueError, match="thresholds"):
        UniMatch(linear_segmenter()[0], NUM_CLASSES, thresholds="adaptive")
    with pytest.raises(ValueError, match="confidence_threshold"):  # 0 scales to 0
        UniMatch(linear_segmenter()[0], NUM_CLASSES, confidence_threshold=0.0,
                 thresholds="class_adaptive")
    with pytest.raises(ValueError, match="class weights"):  # none to weigh by
        FixMatch(tiny_segmenter(0), NUM_CLASSES, unsup_class_weights=True, seed=0)
    with pytest.raises(ValueError, match="total_weight must be a number > 0, got 0"):
        UniMatch(linear_segmenter()[0], NUM_CLASSES, total_weight=0)


def numpy_ohem(logits, labels, threshold, min_kept):
    """The released ProbOhemCrossEntropy2d on one device."""
    probs = np.exp(log_softmax(logits)).reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    valid = target != IGNORE_LABEL
    if min_kept <= valid.sum() and valid.sum() > 0:
        mask_prob = np.where(valid, probs[np.arange(len(target)), np.where(valid, target, 0)],
                             1.0)
        cut = threshold
        if min_kept > 0:
            kth = mask_prob[mask_prob.argsort()[min(len(mask_prob), min_kept) - 1]]
            cut = kth if kth > threshold else threshold
        valid = valid & (mask_prob <= cut)
    ce = pixel_cross_entropy(logits, labels).reshape(-1)
    return ce[valid].mean(), valid.sum()


@pytest.mark.parametrize("threshold, min_kept", [(0.7, 5), (0.05, 30), (0.7, 500)])
def test_ohem_matches_the_released_loss(threshold, min_kept):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (2, 6, 5, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 6, 5)).astype(np.int32)
    labels[1, :2] = IGNORE_LABEL
    want, kept = numpy_ohem(logits, labels, threshold, min_kept)
    assert 0 < kept  # (0.7, 500): fewer labelled pixels than min_kept, nothing is mined
    got = losses.ohem_cross_entropy(logits, labels, threshold, min_kept).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


# -- the feature perturbation ---------------------------------------------------------------
def test_channel_dropout_rate_and_scale():
    features = np.ones((64, 2, 2, 128), np.float32)
    out = feature_ops.channel_dropout(features, 0.3, seeds.step_seed(0, 0, 1)).numpy()
    per_channel = out[:, 0, 0, :]
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.7)}
    np.testing.assert_array_equal(out, np.broadcast_to(per_channel[:, None, None], out.shape))
    dropped = (per_channel == 0).mean()
    assert abs(dropped - 0.3) < 4 * np.sqrt(0.3 * 0.7 / per_channel.size)


@pytest.mark.parametrize("perturb_labelled", [True, False])
def test_feature_perturbation_only_on_the_perturbed_pass(perturb_labelled):
    net, kernel, bias = linear_segmenter()
    model = UniMatch(net, NUM_CLASSES, fp_rate=0.25, perturb_labelled=perturb_labelled,
                     seed=0)
    rng = np.random.default_rng(6)
    labelled = rng.uniform(0, 255, (3, 4, 4, 3)).astype(np.float32)
    weak = rng.uniform(0, 255, (5, 4, 4, 3)).astype(np.float32)
    x, w, fp = (t.numpy() for t in model.weak_pass(labelled, weak, 0))
    np.testing.assert_allclose(x, labelled @ kernel + bias, rtol=1e-5)
    np.testing.assert_allclose(w, weak @ kernel + bias, rtol=1e-5)
    both = np.concatenate([labelled, weak])
    decoder = model.perturbed_features({"stem": tf.constant(both)}, 3, 0)["stem"].numpy()
    assert len(decoder) == (16 if perturb_labelled else 13)
    np.testing.assert_array_equal(decoder[:8], both)  # the clean pass is untouched
    ratio = decoder[8:] / both[-len(decoder) + 8:]
    assert set(np.round(np.unique(ratio), 5)) == {0.0, np.float32(1 / 0.75).round(5)}
    np.testing.assert_allclose(fp, decoder[-5:] @ kernel + bias, rtol=1e-5)
    assert not np.allclose(fp, w)
    # The strong pass is the plain network (no dropout anywhere else).
    np.testing.assert_allclose(model.segmenter(weak, training=True).numpy(), w, rtol=1e-6)


def test_perturbation_reaches_the_blocks_each_head_reads():
    for arch, expected in [("deeplabv3plus", {"stage1", "stage3"}), ("deeplabv2", {"stage3"})]:
        keras.utils.set_random_seed(0)
        net = models.build_segmenter(arch, "small", num_classes=NUM_CLASSES,
                                     **({"aspp_channels": 8, "low_level_channels": 4,
                                         "decoder_channels": 8} if arch != "deeplabv2"
                                        else {}))
        assert set(net.head_input_blocks) == expected
    with pytest.raises(TypeError, match="Segmenter"):
        UniMatch(tiny_segmenter(0), NUM_CLASSES)  # a plain Keras model has no blocks
    FixMatch(tiny_segmenter(0), NUM_CLASSES)  # FixMatch needs none


# -- the unlabelled stream: views and padding ------------------------------------------------
def test_pipeline_pairs_views_and_marks_padding():
    reader = Shapes(num_train=6, height=32, width=40)
    examples = reader.examples("train")
    ids = list(examples.ids)
    labelled, unlabelled = examples.select(ids[:2]), examples.select(ids[2:])
    ds = pipeline.train_dataset(reader, labelled, unlabelled, batch_size=2,
                                unlabelled_batch_size=2, crop_size=(32, 40),
                                scale_range=(0.5, 0.9), unlabelled_views=2,
                                unlabelled_padding=True)
    differ = False
    for _, batch in ds.take(4):
        ids = batch["id"].numpy()
        assert len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3]
        padded = batch["padding"].numpy() == IGNORE_LABEL
        assert padded.any(axis=(1, 2)).all()  # scaled below the crop: always padded
        assert (batch["image"].numpy()[padded] == 0).all()
        assert set(np.unique(batch["padding"].numpy())) <= {0, IGNORE_LABEL}
        differ |= not np.array_equal(batch["image"][0], batch["image"][1])
    assert differ  # the two views of an image are augmented independently


# -- distribution and the driver -------------------------------------------------------------
def replica_data():
    labelled, unlabelled = random_batches(4, (16, 16), seed=7, n_unlabelled=8)
    padding = np.zeros((8, 16, 16), np.int32)
    padding[4:, 10:] = IGNORE_LABEL
    return labelled, {"image": unlabelled["image"], "padding": padding}


@pytest.mark.parametrize("options", [
    {"variant": "fixmatch", "mix_source": "batch", "supervised_criterion": "ohem",
     "ohem_min_kept": 100},
    {**CONTROLS, "class_aware_mixing": True, "class_weights": [0.5, 1.0, 3.0],
     "unsup_class_weights": True, "joint_batch_norm": False}],
    ids=["fixmatch_batch_ohem", "unimatch_controls_class_aware_weighted_separate_norm"])
def test_two_steps_same_on_one_and_two_replicas(two_replicas, tmp_path, options):
    """The released UniMatch step with every control on (the plain step runs the same
    operations less the controls) and a pass per group (labelled, weak) for batch
    norm, and FixMatch's other paths. Also the controls' state:
    from the global batch's counted pixels (the padded rows fall on the second replica),
    the same copy on each replica, saved and restored; the class-aware boxes, drawn per
    global example from that state; the class-weighted unlabelled terms, normalised by
    global sums."""
    def make_method():
        keras.utils.set_random_seed(0)
        net = models.build_segmenter("deeplabv3plus", "small", num_classes=NUM_CLASSES,
                                     norm="sync_batch", aspp_channels=8, low_level_channels=4,
                                     decoder_channels=8, dropout=0.0)  # Keras's is stateful
        return UniMatch(net, NUM_CLASSES, confidence_threshold=0.4, cutmix_probability=1.0,
                        seed=1, **options)

    single, logs, _, _ = run_method_test(
        make_method, [replica_data()] * 2, two_replicas, tmp_path,
        optimizer=lambda: keras.optimizers.SGD(0.05, momentum=0.9))
    assert 0 < logs["confident_share"][0] < 1 and logs["strong_loss"][0] > 0
    if options.get("distribution_alignment"):
        # The state moved (run_method_test compared and restored it).
        assert not np.allclose(single.alignment.running.numpy(), PRIOR)
        assert not np.allclose(single.class_confidence.confidence.numpy(), 1.0)


TINY_CONFIG = tiny_run_config("UniMatch") + """
pipeline.scale_range = (0.6, 1.0)
pipeline.unlabelled_batch_size = 2
pipeline.unlabelled_views = 2
pipeline.unlabelled_padding = True
train.method = @UniMatch
UniMatch.confidence_threshold = 0.5
"""


def test_driver_run_crashes_and_resumes(tmp_path, monkeypatch):
    """Two steps through kssl.training.train, killed after the first: the resumed run
    starts from the backed-up network and step counter and finishes the second step."""
    config.parse([], [TINY_CONFIG])
    crashed, resumed, metrics = crash_and_resume(
        str(tmp_path / "run"), monkeypatch,
        lambda meter, epoch: (int(meter.model.optimizer.iterations.numpy()),
                              [w.copy() for w in meter.model.segmenter.get_weights()]))
    saved_step, saved = crashed[-1]
    assert saved_step == 1
    assert len(resumed) == 1 and resumed[0][0] == 1  # only the second epoch ran
    for got, want in zip(resumed[0][1], saved):
        np.testing.assert_array_equal(got, want)
    assert metrics["steps"] == 2 and metrics["method"] == "UniMatch"
    assert 0.0 <= metrics["mean_iou"] <= 1.0
