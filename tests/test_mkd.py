"""MKD: class statistics, feature augmentation, teachers, loss pairing, pseudo-label
controls, distribution, fit."""

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, models, training
from kssl.augment import mixing, randaugment, seeds, strong
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import MKD, mkd
from kssl.methods.feature_augmentation import (ClassStatistics, augment_logits,
                                               feature_augmentation_strength, logit_offsets)
from kssl.models.heads import DeepLabV2Head
from tiny import (TINY_SHAPES_CONFIG, mean_cross_entropy, random_batches, run_method_test,
                  softmax)

NUM_CLASSES = 3


def small_segmenter(seed=0, norm="batch"):
    """A DeepLabV3+ on the small backbone cut to one narrow unit per stage: a compiled
    two-replica MKD step traces eight passes of it, so every layer counts."""
    keras.utils.set_random_seed(seed)
    head_norm = "sync_batch" if norm == "sync_batch" else "batch"
    backbone = models.build_backbone("small", norm=norm, widths=(4, 8, 8, 8),
                                     depths=(1, 1, 1, 1))
    head = models.build_head("deeplabv3plus", backbone, NUM_CLASSES, output_stride=16,
                             norm=head_norm, aspp_rates=(2,), aspp_channels=8,
                             low_level_channels=4, decoder_channels=8, separable=True,
                             dropout=0.0)
    network = models.Segmenter.from_backbone(backbone, head, name="tiny")
    network(tf.zeros((1, 32, 32, 3)))
    return network


# -- feature augmentation ------------------------------------------------------------------
def test_class_statistics_equal_a_batch_computation_over_the_same_pixels():
    rng = np.random.default_rng(0)
    classes, channels = 4, 5
    statistics = ClassStatistics(classes, channels)
    features, labels = [], []
    for shape in [(2, 3, 4), (1, 5, 2)]:
        f = rng.normal(2.0, 1.5, shape + (channels,)).astype(np.float32)
        y = rng.integers(0, 3, shape).astype(np.int32)  # class 3 never occurs
        y.flat[::4] = IGNORE_LABEL
        f[y == IGNORE_LABEL] = 1e4  # would show in any estimate that counted them
        statistics.update(f, y)
        features.append(f.reshape(-1, channels))
        labels.append(y.reshape(-1))
    f, y = np.concatenate(features), np.concatenate(labels)
    for c in range(classes):
        pixels = f[y == c].astype(np.float64)
        assert statistics.count.numpy()[c] == len(pixels)
        if len(pixels):
            np.testing.assert_allclose(statistics.mean.numpy()[c], pixels.mean(0), rtol=1e-5)
            np.testing.assert_allclose(statistics.variance.numpy()[c], pixels.var(0),
                                       rtol=1e-4)
        else:
            assert not statistics.mean.numpy()[c].any()
            assert not statistics.variance.numpy()[c].any()


@pytest.mark.parametrize("taps", [1, 3])
def test_augmented_logits_match_a_hand_computation(taps):
    rng = np.random.default_rng(1)
    classes, channels, strength = 4, 6, 0.7
    weights = rng.normal(size=(taps, channels, classes)).astype(np.float32)
    variances = rng.uniform(0.1, 2.0, (classes, channels)).astype(np.float32)
    logits = rng.normal(size=(2, 3, 3, classes)).astype(np.float32)
    labels = rng.integers(0, classes, (2, 3, 3)).astype(np.int32)
    labels[0, 0, 0] = labels[1, 2, 1] = IGNORE_LABEL
    offsets = logit_offsets(weights, variances, strength).numpy()
    got = augment_logits(logits, labels, offsets, IGNORE_LABEL).numpy()
    expected = logits.copy()
    for index in np.ndindex(labels.shape):
        y = labels[index]
        if y == IGNORE_LABEL:
            continue  # ignore pixels get no term
        for c in range(classes):
            expected[index + (c,)] += 0.5 * strength * sum(
                (weights[t, a, c] - weights[t, a, y]) ** 2 * variances[y, a]
                for t in range(taps) for a in range(channels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0, 0, 0], logits[0, 0, 0])
    assert (np.diag(offsets) == 0).all() and (offsets >= 0).all()


def test_lambda_ramps_by_a_cosine_from_the_first_step():
    for step in [0, 9, 49, 99, 150]:
        t = min(step + 1, 100)
        np.testing.assert_allclose(
            feature_augmentation_strength(step, 1.5, 100).numpy(),
            1.5 * (1 - np.cos(np.pi * t / 100)) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(feature_augmentation_strength(9, 1.5, 100, "linear"),
                               0.15, rtol=1e-6)


def test_the_heads_expose_their_classifier():
    rng = np.random.default_rng(2)
    network = small_segmenter()
    images = rng.uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    features, logits = network.classifier_inputs_and_logits(images)
    assert features.shape[-1] == network.classifier_weights().shape[1] == 8
    np.testing.assert_allclose(
        tf.image.resize(logits, (32, 32)).numpy(), network(images).numpy(), atol=1e-5)
    # DeepLabV2: logits(p) = bias + sum over distinct offsets of f(p + offset) @ W[offset],
    # the centre offset shared by every branch.
    head = DeepLabV2Head(NUM_CLASSES, rates=(1, 2), in_block="x")
    head.build({"x": (None, None, None, 4)})
    x = rng.normal(size=(1, 9, 9, 4)).astype(np.float32)
    weights, offsets = head.classifier_weights().numpy(), head.classifier_offsets()
    assert len(offsets) == 17 and weights.shape == (17, 4, NUM_CLASSES)
    logits = head({"x": x}).numpy()
    bias = sum(branch.bias.numpy() for branch in head.branches)
    expected = bias + sum(x[0, 4 + dy, 4 + dx] @ w for (dy, dx), w in zip(offsets, weights))
    np.testing.assert_allclose(logits[0, 4, 4], expected, rtol=1e-5, atol=1e-5)


# -- the strong view -----------------------------------------------------------------------
def test_the_strong_view_applies_one_op_per_image():
    augment = strong.OneOfPhotometric()
    seed = tf.constant([3, 4], tf.int64)
    choice = augment.choose(seed, 4000).numpy()
    np.testing.assert_allclose(np.bincount(choice, minlength=5) / 4000,
                               np.array(strong.MKD_CODE_OP_WEIGHTS) / 1.5, atol=0.03)
    images = np.random.default_rng(3).uniform(0, 255, (16, 12, 12, 3)).astype(np.float32)
    out = augment(tf.constant(images), seed).numpy()
    choice = augment.choose(seed, 16).numpy()
    for i, op in enumerate(choice):
        name = strong.PHOTOMETRIC_OPS[op]
        if name == "solarize":
            np.testing.assert_allclose(out[i], randaugment.solarize(images[i:i + 1], 128)[0])
        elif name == "equalize":
            np.testing.assert_allclose(out[i], randaugment.equalize(images[i:i + 1])[0])
        elif name == "grayscale":
            np.testing.assert_allclose(out[i, ..., 0], out[i, ..., 2], atol=1e-4)
        else:  # jitter or blur change the image
            assert np.abs(out[i] - images[i]).max() > 1.0
    assert set(choice) >= {1, 4}  # this seed draws blur and greyscale at least


# -- the networks and the losses ---------------------------------------------------------
def test_students_share_the_backbone_start_and_differ_in_the_head():
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, seed=0)
    s1, s2 = model.segmenter, model.student_2
    for a, b in zip(s1.block_layers, s2.block_layers):
        for x, y in zip(a.weights, b.weights):
            assert x is not y
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.allclose(s1.head.classifier.kernel.numpy(),
                           s2.head.classifier.kernel.numpy())
    for student, teacher in [(s1, model.teacher_1), (s2, model.teacher_2)]:
        for x, y in zip(student.weights, teacher.weights):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert model.inference_network is s1
    model.inference = "teacher_2"
    assert model.inference_network is model.teacher_2


def test_mutual_losses_pair_each_student_with_the_other_branch():
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, alpha=1.5, beta=1.0)
    rng = np.random.default_rng(4)
    logits = [[rng.normal(size=(2, 3, 3, NUM_CLASSES)).astype(np.float32) for _ in range(2)]
              for _ in range(2)]  # student k, part (labelled, mixed)
    targets = [[rng.integers(0, NUM_CLASSES, (2, 3, 3)).astype(np.int32) for _ in range(2)]
               for _ in range(2)]  # teacher k, part
    targets[1][0][0, 0, 0] = IGNORE_LABEL
    terms = model.mutual_losses((tf.constant(0.25), tf.constant(0.5)), logits, targets)

    def ce(student, labels):
        return mean_cross_entropy(np.concatenate([p.reshape(-1, NUM_CLASSES)
                                                for p in logits[student]]),
                                np.concatenate([p.reshape(-1) for p in labels]))

    def argmax(student):
        return [p.argmax(-1) for p in logits[student]]

    want = {"teacher_2_to_student_1": ce(0, targets[1]),
            "teacher_1_to_student_2": ce(1, targets[0]),
            "student_2_to_student_1": ce(0, argmax(1)),
            "student_1_to_student_2": ce(1, argmax(0))}
    for name, value in want.items():
        np.testing.assert_allclose(terms[name].numpy(), value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(terms["student_1_loss"].numpy(),
                               0.25 + 1.5 * want["teacher_2_to_student_1"]
                               + want["student_2_to_student_1"], rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].numpy(),
                               terms["student_1_loss"] + terms["student_2_loss"], rtol=1e-6)


def test_class_weighted_consistency_terms_are_weighted_means_over_all_parts():
    with pytest.raises(ValueError, match="class weights"):
        MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, unsup_class_weights=True)
    weights = np.arange(1, NUM_CLASSES + 1, dtype=np.float32)
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, class_weights=weights,
                unsup_class_weights=True)
    rng = np.random.default_rng(6)
    logits = [rng.normal(size=(n, 3, 3, NUM_CLASSES)).astype(np.float32) for n in (1, 2)]
    labels = [rng.integers(0, NUM_CLASSES, (n, 3, 3)).astype(np.int32) for n in (1, 2)]
    labels[1][0, 0, 0] = IGNORE_LABEL
    got = model.cross_entropy(logits, labels, model.unsup_class_weights).numpy()
    flat_logits = np.concatenate([p.reshape(-1, NUM_CLASSES) for p in logits])
    flat_labels = np.concatenate([p.reshape(-1) for p in labels])
    valid = flat_labels != IGNORE_LABEL
    log_p = flat_logits[valid] - np.log(np.exp(flat_logits[valid]).sum(-1, keepdims=True))
    ce = -log_p[np.arange(valid.sum()), flat_labels[valid]]
    w = weights[flat_labels[valid]]
    np.testing.assert_allclose(got, (w * ce).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(model.cross_entropy(logits, labels).numpy(), ce.mean(),
                               rtol=1e-5)  # no weights given: the plain mean


@pytest.mark.parametrize("setting", [True, "teacher_terms"])
def test_class_weights_reach_the_student_terms_only_when_asked(setting):
    """unsup_class_weights=True weighs all four consistency terms; 'teacher_terms' the
    two teacher terms, the students' mutual argmax terms staying plain means (numpy)."""
    weights = np.array([1.0, 4.0, 0.25], np.float32)
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, class_weights=weights,
                unsup_class_weights=setting)
    rng = np.random.default_rng(8)
    logits = [[rng.normal(size=(2, 3, 3, NUM_CLASSES)).astype(np.float32)] for _ in range(2)]
    targets = [[rng.integers(0, NUM_CLASSES, (2, 3, 3)).astype(np.int32)] for _ in range(2)]
    terms = model.mutual_losses((tf.constant(0.0), tf.constant(0.0)), logits, targets)

    def ce(student, labels, weighted):
        z = logits[student][0].reshape(-1, NUM_CLASSES).astype(np.float64)
        y = labels.reshape(-1)
        per_pixel = np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), y]
        w = weights[y] if weighted else np.ones(len(y))
        return (w * per_pixel).sum() / w.sum()

    students_weighted = setting is True
    want = {"teacher_2_to_student_1": ce(0, targets[1][0], True),
            "teacher_1_to_student_2": ce(1, targets[0][0], True),
            "student_2_to_student_1": ce(0, logits[1][0].argmax(-1), students_weighted),
            "student_1_to_student_2": ce(1, logits[0][0].argmax(-1), students_weighted)}
    for name, value in want.items():
        np.testing.assert_allclose(terms[name].numpy(), value, rtol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="teacher_terms"):
        MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, class_weights=weights,
            unsup_class_weights="teachers")


def step_logs(model, data):
    for metric in model.metrics:
        metric.reset_state()
    return {k: float(v) for k, v in model.train_step(data).items()}


def test_a_distinctive_teacher_changes_only_the_other_students_loss():
    """With frozen teachers (decay 1) and a zero learning rate, teacher 2 made to predict
    class 0 everywhere changes student 1's loss only, teacher 1 student 2's only."""
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, ema_decay=1.0,
                ema_warmup=False, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    data = random_batches(4, (32, 32))
    start = model.get_weights()
    base = step_logs(model, data)
    for teacher, changed, same in [("teacher_2", "student_1_loss", "student_2_loss"),
                                   ("teacher_1", "student_2_loss", "student_1_loss")]:
        model.set_weights(start)
        model.optimizer.iterations.assign(0)  # the same step: the same masks and ops
        bias = model.network(teacher).head.classifier.bias
        bias.assign(bias + np.array([50.0, 0.0, 0.0], np.float32))
        logs = step_logs(model, data)
        assert abs(logs[changed] - base[changed]) > 1e-2, teacher
        np.testing.assert_allclose(logs[same], base[same], rtol=1e-6, err_msg=teacher)


def test_a_batch_with_non_finite_features_leaves_the_statistics_unchanged():
    rng = np.random.default_rng(4)
    statistics = ClassStatistics(3, 2)
    features = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    labels = rng.integers(0, 3, (1, 4, 4)).astype(np.int32)
    before = [w.numpy() for w in statistics.weights]
    state = statistics.update(features, labels)
    after_good = [s.numpy() for s in state]
    assert after_good[0].sum() == 16
    features[0, 1, 1, 0] = np.inf
    state = statistics.update(features, labels)
    for got, want in zip(state, after_good):
        np.testing.assert_array_equal(got.numpy(), want)
    assert not any(np.array_equal(b, a) for b, a in zip(before, after_good))


def test_offset_gradient_matches_the_derivative_of_the_table():
    rng = np.random.default_rng(2)
    taps, channels, classes, strength = 2, 3, 4, 0.8
    weights = rng.normal(size=(taps, channels, classes))
    variances = rng.uniform(0.1, 2.0, (classes, channels))
    cotangent = rng.normal(size=(classes, classes))  # d loss / d D[y, c]
    w = tf.constant(weights, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        table = logit_offsets(w, tf.constant(variances, tf.float32), strength)
        loss = tf.reduce_sum(table * cotangent)
    got = tape.gradient(loss, w).numpy()
    # d D[y, c] / d W[t, a, c] = lambda (W_c - W_y) var_y,a, and the negative for W_y.
    expected = np.zeros_like(weights)
    for y in range(classes):
        for c in range(classes):
            if c == y:
                continue
            term = strength * (weights[..., c] - weights[..., y]) * variances[y]
            expected[..., c] += cotangent[y, c] * term
            expected[..., y] -= cotangent[y, c] * term
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offset_gradient", [False, True])
def test_offset_gradient_reaches_the_classifier_only_when_asked(offset_gradient):
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, seed=0,
                offset_gradient=offset_gradient)
    rng = np.random.default_rng(3)
    channels = int(model.segmenter.classifier_weights().shape[1])
    features = tf.constant(rng.normal(size=(2, 4, 4, channels)), tf.float32)
    logits = tf.constant(rng.normal(size=(2, 4, 4, NUM_CLASSES)), tf.float32)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, (2, 4, 4)), tf.int32)
    variables = model.segmenter.trainable_variables
    with tf.GradientTape() as tape:
        (augmented,) = model.augmented("student_1", [(features, logits, labels)], 1.0)
        loss = tf.reduce_sum(tf.nn.softmax(augmented) * logits)
    reached = [g is not None for g in tape.gradient(loss, variables)]
    assert any(reached) == offset_gradient


def test_step_statistics_leave_out_ignore_pixels_and_are_saved(tmp_path):
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    labelled, unlabelled = random_batches(4, (32, 32))
    step_logs(model, (labelled, unlabelled))
    # The loss resolution is 1/8: 4 x 4 per 32 x 32 image; the labelled masks' ignore
    # stripes cover half the rows of two images (nearest resizing keeps them).
    labels = model.resize_labels(labelled["mask"], (4, 4)).numpy()
    assert (labels == IGNORE_LABEL).sum() == 2 * 8
    counted = (labels != IGNORE_LABEL).sum() + 4 * 16
    for name in mkd.NETWORKS:
        assert model.statistics[name].count.numpy().sum() == counted
    # The statistics and all four networks are saved with the method (BackupAndRestore
    # writes these files).
    path = str(tmp_path / "mkd.weights.h5")
    model.save_weights(path)
    restored = MKD(small_segmenter(seed=1), NUM_CLASSES, lambda_steps=1)
    restored.load_weights(path)
    for name in mkd.NETWORKS:
        for x, y in zip(model.statistics[name].weights + model.network(name).weights,
                        restored.statistics[name].weights + restored.network(name).weights):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


# -- pseudo-label controls -----------------------------------------------------------------
PRIOR = np.array([0.6, 0.3, 0.1])
# Both controls on, with fast-moving running state.
CONTROLS = dict(confidence_threshold=0.6, thresholds="class_adaptive",
                distribution_alignment=True, control_decay=0.5, class_prior=PRIOR)


def controlled_mkd(seed=0):
    return MKD(small_segmenter(seed), NUM_CLASSES, lambda_steps=1, seed=0, **CONTROLS)


def control_state(model, name):
    """Teacher `name`'s (running class distribution, class confidence) as numpy."""
    return (model.alignment[name].running.numpy(),
            model.class_confidence[name].confidence.numpy())


def numpy_controlled_targets(state, logits_parts, augmented_parts, base=0.6, decay=0.5):
    """The controls applied as written, in float64: fold the last (unlabelled) part into
    the running distribution, then its aligned probabilities into the class confidence;
    each part's target is the argmax of the aligned augmented probabilities, ignored
    where the aligned confidence is below base * conf[target] / max(conf).
    Returns (new state, targets, admitted, how many targets differ from the aligned
    un-augmented argmax)."""
    running, bank = (np.asarray(s, np.float64) for s in state)
    probs_u = softmax(np.asarray(logits_parts[-1], np.float64)).reshape(-1, NUM_CLASSES)
    running = decay * running + (1 - decay) * probs_u.mean(0)

    def align(p):
        a = p * PRIOR / running
        return a / a.sum(-1, keepdims=True)

    aligned_u = align(probs_u)
    labels, confidence = aligned_u.argmax(-1), aligned_u.max(-1)
    bank = bank.copy()
    for c in range(NUM_CLASSES):
        if (labels == c).any():
            bank[c] = decay * bank[c] + (1 - decay) * confidence[labels == c].mean()
    thresholds = base * bank / bank.max()
    targets, admitted, changed = [], [], 0
    for logits, augmented in zip(logits_parts, augmented_parts):
        probs = align(softmax(np.asarray(logits, np.float64)))
        target = align(softmax(np.asarray(augmented, np.float64))).argmax(-1)
        changed += (target != probs.argmax(-1)).sum()
        keep = probs.max(-1) >= thresholds[target]
        targets.append(np.where(keep, target, IGNORE_LABEL))
        admitted.append(keep)
    return (running, bank), targets, admitted, changed


def test_controlled_targets_match_numpy_and_each_teacher_keeps_its_own_state():
    model = controlled_mkd()
    rng = np.random.default_rng(5)
    state = (PRIOR, np.ones(NUM_CLASSES))
    plain_differs = False
    for call in range(2):  # the second call starts from the state the first left
        # Parts (labelled, mixed unlabelled); the unlabelled logits favour class 2, which
        # the prior makes rare, so the alignment damps it.
        logits = [rng.normal(size=(2, 3, 4, NUM_CLASSES)) * 2 for _ in range(2)]
        logits[1][..., 2] += 1.5
        augmented = [z + rng.uniform(0, 1.5, z.shape) for z in logits]
        got = model.targets_from_logits(
            "teacher_1", [tf.constant(z, tf.float32) for z in logits],
            [tf.constant(z, tf.float32) for z in augmented])
        state, targets, admitted, changed = numpy_controlled_targets(state, logits,
                                                                     augmented)
        for name, got_state, want in zip(("running", "confidence"),
                                         control_state(model, "teacher_1"), state):
            np.testing.assert_allclose(got_state, want, rtol=1e-5,
                                       err_msg=f"{name}, call {call}")
        for part in range(2):
            np.testing.assert_array_equal(got.targets[part].numpy(), targets[part])
            np.testing.assert_array_equal(got.admitted[part].numpy(), admitted[part])
            # Some pixels pass and some fail their class's threshold.
            assert 0 < admitted[part].sum() < admitted[part].size
            plain = augmented[part].argmax(-1)  # the paper's target, fixed threshold
            plain = np.where(softmax(logits[part]).max(-1) >= 0.6, plain, IGNORE_LABEL)
            plain_differs |= (plain != targets[part]).any()
        assert float(got.changed) == changed
    assert plain_differs  # the controls changed the targets
    assert len(set(np.round(state[1], 6))) == NUM_CLASSES  # per-class thresholds differ
    # Teacher 2's state is its own: untouched by teacher 1's targets.
    np.testing.assert_allclose(control_state(model, "teacher_2")[0], PRIOR, rtol=1e-6)
    np.testing.assert_array_equal(control_state(model, "teacher_2")[1], 1.0)


def test_pseudo_label_targets_read_the_stored_controls_without_updating_them():
    model = controlled_mkd()
    stored = {"teacher_1": ([0.2, 0.3, 0.5], [0.9, 0.5, 0.7]),
              "teacher_2": ([0.5, 0.4, 0.1], [0.6, 0.8, 0.4])}
    for name, (running, confidence) in stored.items():
        model.alignment[name].running.assign(running)
        model.class_confidence[name].confidence.assign(confidence)
        # Spread the untrained teachers' probabilities, so some pixels pass a threshold.
        kernel = model.network(name).head.classifier.kernel
        kernel.assign(kernel * 20.0)
    images = np.random.default_rng(6).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    got = model.pseudo_label_targets(tf.constant(images))
    for name, (running, confidence) in stored.items():
        probs = softmax(model.network(name)(images, training=False).numpy()
                        .astype(np.float64))
        aligned = probs * PRIOR / np.array(running)
        aligned /= aligned.sum(-1, keepdims=True)
        labels = aligned.argmax(-1)
        thresholds = 0.6 * np.array(confidence) / max(confidence)
        admitted = aligned.max(-1) >= thresholds[labels]
        np.testing.assert_array_equal(got[name][0].numpy(), labels, err_msg=name)
        np.testing.assert_array_equal(got[name][1].numpy(), admitted, err_msg=name)
        assert 0 < admitted.sum() < admitted.size, name
        assert (labels != probs.argmax(-1)).any(), name  # the alignment mattered
        np.testing.assert_allclose(control_state(model, name)[0], running, rtol=1e-6)
        np.testing.assert_allclose(control_state(model, name)[1], confidence, rtol=1e-6)


def test_controls_state_and_targets_same_on_one_and_two_replicas(two_replicas):
    """Two rounds of both teachers' targets from the same logits, the global batch whole
    on one device or split over two replicas: the targets and every control's state equal
    the single-device ones (from global-batch sums), each replica holding the same copy."""
    rng = np.random.default_rng(7)
    rounds = []
    for _ in range(2):
        logits = [rng.normal(size=(4, 3, 4, NUM_CLASSES)).astype(np.float32) * 2
                  for _ in range(2)]
        logits[1][:2, ..., 2] += 2.0  # replica 0's half favours class 2: halves differ
        rounds.append((logits, [z + rng.uniform(0, 1.5, z.shape).astype(np.float32)
                                for z in logits]))
    single = controlled_mkd()
    with two_replicas.scope():
        double = controlled_mkd()

    def targets(model, logits, augmented):
        return [model.targets_from_logits(name, logits, augmented).targets
                for name in mkd.TEACHERS]

    for logits, augmented in rounds:
        want = targets(single, logits, augmented)
        shards = next(iter(two_replicas.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors((tuple(logits), tuple(augmented))).unbatch()
            .batch(4))))
        out = two_replicas.run(lambda z, a: targets(double, list(z), list(a)),
                               args=shards)
        for teacher, parts in enumerate(want):
            for part, target in enumerate(parts):
                halves = two_replicas.experimental_local_results(out[teacher][part])
                assert [len(h) for h in halves] == [2, 2]
                np.testing.assert_array_equal(
                    np.concatenate([h.numpy() for h in halves]), target.numpy())
    for name in mkd.TEACHERS:
        for x, y in zip(single.alignment[name].weights + single.class_confidence[name].weights,
                        double.alignment[name].weights + double.class_confidence[name].weights):
            copies = [c.numpy() for c in two_replicas.experimental_local_results(y.value)]
            for copy in copies:
                np.testing.assert_allclose(copy, x.numpy(), rtol=1e-6, err_msg=y.path)
            np.testing.assert_array_equal(copies[0], copies[1])
        # The state moved from its start (prior, ones).
        assert not np.allclose(control_state(single, name)[0], PRIOR)
        assert not np.allclose(control_state(single, name)[1], 1.0)


def test_a_step_with_the_controls_moves_their_state_and_saves_it(tmp_path):
    model = controlled_mkd()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    logs = step_logs(model, random_batches(4, (32, 32)))
    assert 0.0 <= logs["confident_share"] <= 1.0
    paths = [w.path for name in mkd.TEACHERS
             for w in model.alignment[name].weights + model.class_confidence[name].weights]
    assert len(set(paths)) == 6 and all(any(t in p for t in mkd.TEACHERS) for p in paths)
    for name in mkd.TEACHERS:
        assert not np.allclose(control_state(model, name)[0], PRIOR)
        assert not np.allclose(control_state(model, name)[1], 1.0)
    path = str(tmp_path / "mkd.weights.h5")
    model.save_weights(path)
    restored = controlled_mkd(seed=1)
    restored.load_weights(path)
    for name in mkd.TEACHERS:
        for got, want in zip(control_state(restored, name), control_state(model, name)):
            np.testing.assert_array_equal(got, want, err_msg=name)
    # Off by default (the paper): no control state, the checkpoint layout unchanged.
    plain = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1)
    assert not plain.alignment and not plain.class_confidence
    assert len(plain.weights) + len(paths) == len(model.weights)


def test_bad_control_settings_are_refused():
    with pytest.raises(ValueError, match="confidence_threshold"):
        MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, thresholds="class_adaptive")
    with pytest.raises(ValueError, match="class_prior"):
        MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, distribution_alignment=True)
    with pytest.raises(ValueError, match="thresholds"):
        MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, thresholds="adaptive")


def test_class_aware_boxes_follow_the_teachers_mean_labels_and_least_confident_class():
    """Class-aware mixing: the placement labels are the argmax of the two teachers' mean
    aligned probabilities (numpy), resized to the input; the class is drawn among each
    image's classes with weight 1 - mean confidence + 0.05, so with confidences
    (1, 1, 0) class 2 is drawn with chance 1.05 / 1.15 where all three are present; the
    fixed threshold stays fixed."""
    model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, seed=0,
                confidence_threshold=0.7, class_aware_mixing=True,
                distribution_alignment=True, class_prior=PRIOR)
    assert model.thresholds == "fixed" and set(model.class_confidence) == set(mkd.TEACHERS)
    running = {"teacher_1": [0.5, 0.3, 0.2], "teacher_2": [0.7, 0.2, 0.1]}
    for name in mkd.TEACHERS:
        model.alignment[name].running.assign(running[name])
    model.class_confidence["teacher_1"].confidence.assign([1.0, 0.8, 0.2])
    model.class_confidence["teacher_2"].confidence.assign([1.0, 1.2, -0.2])  # mean (1, 1, 0)
    np.testing.assert_allclose(model.pixel_thresholds("teacher_1", tf.constant([[0, 1, 2]])),
                               0.7)
    rng = np.random.default_rng(3)
    batch = 400
    logits = {name: rng.normal(size=(batch, 4, 4, NUM_CLASSES)).astype(np.float32) * 3
              for name in mkd.TEACHERS}
    # Every image holds all three classes in teacher 1's confident corner pixels.
    for c in range(NUM_CLASSES):
        logits["teacher_1"][:, 0, c, c] += 40.0
    outputs = {name: (None, tf.constant(z)) for name, z in logits.items()}
    labels, classes = (t.numpy() for t in model.box_classes(outputs, (8, 8), step=5))

    def aligned(z, run):
        a = softmax(np.asarray(z, np.float64)) * PRIOR / np.array(run)
        return a / a.sum(-1, keepdims=True)

    mean = sum(aligned(logits[n], running[n]) for n in mkd.TEACHERS) / 2
    np.testing.assert_array_equal(labels, np.kron(mean.argmax(-1), np.ones((2, 2), int)))
    assert all(set(np.unique(labels[i])) == {0, 1, 2} for i in range(batch))
    share = (classes == 2).mean()  # 400 draws: standard deviation about 0.014
    assert abs(share - 1.05 / 1.15) < 0.05, share
    assert set(np.unique(classes)) == {0, 1, 2}


def test_class_aware_student_view_same_on_one_and_two_replicas(two_replicas):
    """The class-aware boxes and mixed images of a step, from the same teacher outputs,
    whole on one device or split over two replicas (the class draw, the centres and the
    boxes keyed by global example index; the mixing partner taken across replicas)."""
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    logits = [rng.normal(size=(4, 4, 4, NUM_CLASSES)).astype(np.float32) * 3
              for _ in mkd.TEACHERS]

    def make():
        model = MKD(small_segmenter(), NUM_CLASSES, lambda_steps=1, seed=0,
                    class_aware_mixing=True, strong_augment=False)
        for name in mkd.TEACHERS:
            model.class_confidence[name].confidence.assign([1.0, 0.3, 0.6])
        return model

    def view(model, x, z1, z2):
        outputs = {"teacher_1": (None, z1), "teacher_2": (None, z2)}
        return model.student_view(x, tf.constant(3, tf.int64), outputs)

    single = make()
    want = [t.numpy() for t in view(single, images, *logits)]
    uniform = mixing.box_masks(4, 16, 16, seeds.step_seed(0, 3, mkd._MASK_STREAM),
                               num_boxes=3, proportion_range=(0.25, 0.5)).numpy()
    assert not np.array_equal(want[1], uniform)  # the boxes moved onto classes
    with two_replicas.scope():
        double = make()
    shards = next(iter(two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, *logits)).batch(4))))
    out = two_replicas.run(lambda x, z1, z2: view(double, x, z1, z2), args=shards)
    for got, expected in zip(out, want):
        halves = [h.numpy() for h in two_replicas.experimental_local_results(got)]
        np.testing.assert_array_equal(np.concatenate(halves), expected)


# -- distribution and the teachers ---------------------------------------------------------
STEPS = 3


def make_mkd():
    return MKD(small_segmenter(norm="sync_batch"), NUM_CLASSES, lambda_steps=1, seed=0)


@pytest.fixture(scope="module")
def runs(two_replicas, tmp_path_factory):
    """STEPS steps of MKD through `run_method_test`: (one-replica method, its logs,
    two-replica method, its logs, both one-replica students before and after each step)."""
    students = []

    def record(model):
        if model.distribute_strategy.num_replicas_in_sync == 1:
            students.append([model.segmenter.get_weights(), model.student_2.get_weights()])

    # Targets are argmaxes: a near-tie could flip between the one- and two-replica runs
    # (summation order differs by ~1e-7) and move one pixel's gradient. These seeds give a
    # batch without such ties, so the runs agree to float precision.
    return run_method_test(make_mkd, [random_batches(4, (32, 32))] * STEPS, two_replicas,
                           tmp_path_factory.mktemp("mkd"),
                           optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                           on_step=record, log_atol=0) + (students,)


def test_each_teacher_tracks_its_own_student(runs):
    model, _, _, _, students = runs
    # Updates at the start of steps 0, 1, 2 with decays 0, 1/2, min(2/3, 0.6): the teacher
    # is 0.3 S(start) + 0.3 S(after step 0) + 0.4 S(after step 1).
    for k, (student, teacher) in enumerate([(model.segmenter, model.teacher_1),
                                            (model.student_2, model.teacher_2)]):
        other = 1 - k
        checked = 0
        for i, (variable, value) in enumerate(zip(student.weights, teacher.get_weights())):
            if not variable.trainable:
                continue
            want = 0.3 * students[0][k][i] + 0.3 * students[1][k][i] + 0.4 * students[2][k][i]
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
            checked += 1
        assert checked == len(student.trainable_variables)
        # ... and not the other student's average.
        other_mix = [0.3 * a + 0.3 * b + 0.4 * c
                     for a, b, c in zip(*(s[other] for s in students[:3]))]
        assert any(not np.allclose(t, o, atol=1e-6)
                   for t, o in zip(teacher.get_weights(), other_mix))
    momenta = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert len(momenta) == len(model.optimized_variables())


def test_three_steps_same_on_one_and_two_replicas(runs):
    """run_method_test compared every network and the class statistics (those of the
    global batch, identical on both replicas) and the logs of each step."""
    one, logs, _, _, _ = runs
    assert logs["teacher_student_loss"][0] > 0 and logs["student_student_loss"][0] > 0
    for network in mkd.NETWORKS:
        assert one.statistics[network].count.numpy().sum() > 0


# -- the driver ----------------------------------------------------------------------------
TINY_CONFIG = TINY_SHAPES_CONFIG + """
shapes.num_val = 2
model.aspp_rates = (2,)
model.low_level_channels = 4
model.decoder_channels = 8
pipeline.unlabelled_batch_size = 4
train.method = @MKD
MKD.lambda_steps = 2
train.steps = 2
train.steps_per_epoch = 2
"""


def test_fit_through_the_driver(tmp_path):
    path = tmp_path / "mkd.gin"
    path.write_text(TINY_CONFIG)
    workdir = tmp_path / "run"
    gin.clear_config()
    config.parse([str(path)])
    try:
        metrics = training.train(str(workdir))
    finally:
        gin.clear_config()
    assert metrics["steps"] == 2 and metrics["method"] == "MKD"
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert (workdir / "model.weights.h5").exists()
