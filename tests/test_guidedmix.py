"""GuidedMix-Net: lambda sampling, pairing, decoupling, MITrans, the loss terms of both
recipes against numpy, and one- versus two-replica training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import models
from kssl.augment import mixing, seeds
from kssl.data.examples import IGNORE_LABEL
from kssl.methods import GuidedMix, GuidedMixReleased
from kssl.methods.guidedmix import (classifier_targets, nearest_partners,
                                    random_other_partners, random_partners)
from kssl.methods.schedules import sigmoid_rampup
from kssl.models.heads import MITrans, PSPUNetHead
from kssl.models.heads.psp_unet import adaptive_average_pool
from tiny import mean_cross_entropy, run_method_test, softmax

NUM_CLASSES = 4


def numpy_lambdas(rng, n, alpha, cap):
    """Folded Beta(alpha, alpha) draws kept below the cap, by plain rejection."""
    kept = []
    while len(kept) < n:
        draws = rng.beta(alpha, alpha, n)
        draws = np.minimum(draws, 1 - draws)
        kept.extend(draws[draws < cap])
    return np.array(kept[:n])


@pytest.mark.parametrize("alpha,cap", [(1.0, 0.3), (1.0, 0.5), (2.0, 0.2)])
def test_lambda_is_folded_beta_below_the_cap(alpha, cap):
    draws = mixing.interpolation_lambdas(tf.constant([3, 4], tf.int64), 20000, alpha,
                                         cap).numpy()
    assert draws.shape == (20000,)
    assert 0.0 < draws.min() and draws.max() < cap
    reference = numpy_lambdas(np.random.default_rng(0), 20000, alpha, cap)
    assert abs(draws.mean() - reference.mean()) < 0.004
    assert abs(draws.std() - reference.std()) < 0.004
    if alpha == 1.0:  # uniform on (0, min(cap, 0.5)): the released code's distribution
        np.testing.assert_allclose(draws.mean(), min(cap, 0.5) / 2, atol=0.003)
    one = mixing.interpolation_lambdas(tf.constant([3, 4], tf.int64), None, alpha, cap)
    assert one.shape == () and 0.0 < float(one) < cap


def test_lambdas_compile_with_xla():
    draw = tf.function(lambda seed: mixing.interpolation_lambdas(seed, 4, 1.0, 0.3),
                       jit_compile=True)
    # XLA picks its own random algorithm, so the values differ from the plain run's.
    draws = draw(tf.constant([1, 2], tf.int64)).numpy()
    assert draws.shape == (4,) and np.all((0 < draws) & (draws < 0.3))


def test_sigmoid_rampup_follows_laine_and_aila():
    for step, expected in [(0, np.exp(-5.0)), (50, np.exp(-5 * 0.25)), (100, 1.0),
                           (150, 1.0)]:
        np.testing.assert_allclose(float(sigmoid_rampup(step, 100)), expected, rtol=1e-6)
    assert float(sigmoid_rampup(0, 0)) == 1.0


def test_nearest_partner_matches_numpy():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(5, 3, 2, 4)).astype(np.float32)
    keys = rng.normal(size=(6, 3, 2, 4)).astype(np.float32)
    distances = ((queries[:, None] - keys[None]) ** 2).sum(axis=(2, 3, 4))
    np.testing.assert_array_equal(nearest_partners(queries, keys).numpy(),
                                  distances.argmin(1))
    own = ((keys[:, None] - keys[None]) ** 2).sum(axis=(2, 3, 4))
    np.fill_diagonal(own, np.inf)
    np.testing.assert_array_equal(nearest_partners(keys, keys, exclude_self=True).numpy(),
                                  own.argmin(1))
    np.testing.assert_array_equal(nearest_partners(keys[:1], keys[:1], True).numpy(), [0])


def test_random_partners_are_permutations_and_never_self():
    seed = tf.constant([1, 2], tf.int64)
    partners = random_partners(seed, 6, 4).numpy()
    assert sorted(partners[:4]) == [0, 1, 2, 3]  # each key once before any repeat
    np.testing.assert_array_equal(partners[4:], partners[:2])
    for s in range(10):
        other = random_other_partners(tf.constant([s, 7], tf.int64), 5).numpy()
        assert sorted(other) == list(range(5)) and np.all(other != np.arange(5))
    np.testing.assert_array_equal(random_other_partners(seed, 1).numpy(), [0])


def test_classifier_targets_are_the_classes_present_outside_ignore():
    masks = np.full((3, 2, 3), IGNORE_LABEL, np.int32)
    masks[0, 0, :2] = [0, 2]
    masks[1] = 3
    targets = classifier_targets(masks, NUM_CLASSES, IGNORE_LABEL).numpy()
    np.testing.assert_array_equal(targets, [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    # An ignore label among the class ids is skipped too.
    masks = np.array([[[0, 2, 2]], [[1, 3, 3]]], np.int32)
    np.testing.assert_array_equal(classifier_targets(masks, NUM_CLASSES, 2).numpy(),
                                  [[1, 0, 0, 0], [0, 1, 0, 1]])


def test_mitrans_is_the_identity_at_initialisation_and_attends_over_positions():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 6)).astype(np.float32)
    block = MITrans()
    np.testing.assert_array_equal(block(x).numpy(), x)
    attention = block.attention(x).numpy()
    assert attention.shape == (2, 12, 12)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-6)

    # With a non-zero output conv: the formula of the module docstring, in numpy.
    rng = np.random.default_rng(1)
    for layer in (block.query, block.key, block.value, block.output_conv):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))

    def conv(layer, v):
        return v @ layer.kernel.numpy()[0, 0] + layer.bias.numpy()

    flat = x.reshape(2, 12, 6)
    q, k, v = conv(block.query, flat), conv(block.key, flat), conv(block.value, flat)
    weights = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(3))
    expected = flat + conv(block.output_conv, weights @ v)
    np.testing.assert_allclose(block(x).numpy(), expected.reshape(x.shape), rtol=1e-4,
                               atol=1e-4)


def test_adaptive_pooling_averages_the_torch_windows():
    x = np.arange(2 * 5 * 7 * 1, dtype=np.float32).reshape(2, 5, 7, 1)
    pooled = adaptive_average_pool(x, 3).numpy()
    for i in range(3):
        for j in range(3):
            rows = slice(i * 5 // 3, -(-(i + 1) * 5 // 3))
            cols = slice(j * 7 // 3, -(-(j + 1) * 7 // 3))
            np.testing.assert_allclose(pooled[:, i, j], x[:, rows, cols].mean((1, 2)),
                                       rtol=1e-6)


def test_psp_unet_builds_on_every_cpu_backbone():
    for backbone in ("small", "efficientnet_lite0"):
        net = models.build_segmenter("psp_unet", backbone, num_classes=3, psp_channels=16,
                                     low_level_channels=8, decoder_channels=8)
        assert isinstance(net.head, PSPUNetHead)
        assert [s for _, s in net.head.skip_blocks] == [8, 4]
        assert net(tf.zeros((1, 50, 70, 3))).shape == (1, 50, 70, 3)


# -- the loss terms against numpy -----------------------------------------------------------
def paper_model(**options):
    keras.utils.set_random_seed(0)
    net = models.build_segmenter("psp_unet", "small", num_classes=NUM_CLASSES,
                                 psp_channels=8, low_level_channels=4, decoder_channels=8)
    return GuidedMix(net, NUM_CLASSES, seed=5, **options)


def batch(n_l=3, n_u=2, size=(16, 24)):
    rng = np.random.default_rng(3)
    labelled = {"image": rng.uniform(0, 255, (n_l, *size, 3)).astype(np.float32),
                "mask": rng.integers(0, NUM_CLASSES, (n_l, *size)).astype(np.int32)}
    labelled["mask"][0, :4] = IGNORE_LABEL
    return labelled, rng.uniform(0, 255, (n_u, *size, 3)).astype(np.float32)


def squared_error(a, b):
    return ((a - b) ** 2).sum(-1).mean()


@pytest.mark.parametrize("decoupling", ["soft", "hard", "normalised"])
def test_decoupling_arithmetic(decoupling):
    model = paper_model(decoupling=decoupling, decouple_on="logits", pairs="random")
    rng = np.random.default_rng(0)
    mixed, guide, direct = (rng.normal(size=(2, 3, 2, NUM_CLASSES)).astype(np.float32)
                            for _ in range(3))
    lambdas = np.array([0.1, 0.4], np.float32)
    weight = {"soft": lambdas, "hard": np.ones(2), "normalised": lambdas}[decoupling]
    decoupled = mixed - weight[:, None, None, None] * guide
    if decoupling == "normalised":
        decoupled = decoupled / (1 - lambdas[:, None, None, None])
    got = model.decoupling_loss(mixed, guide, direct, lambdas).numpy()
    np.testing.assert_allclose(got, squared_error(direct, decoupled), rtol=1e-5)

    on_probs = paper_model(decoupling=decoupling, pairs="random")
    decoupled = softmax(mixed) - weight[:, None, None, None] * softmax(guide)
    if decoupling == "normalised":
        decoupled = decoupled / (1 - lambdas[:, None, None, None])
    got = on_probs.decoupling_loss(mixed, guide, direct, lambdas).numpy()
    np.testing.assert_allclose(got, squared_error(softmax(direct), decoupled), rtol=1e-5)


@pytest.mark.parametrize("detach,learner", [("decoupled", "direct"), ("direct", "mixed"),
                                            ("none", "both")])
def test_detach_chooses_which_side_learns(detach, learner):
    model = paper_model(detach=detach, pairs="random")
    rng = np.random.default_rng(0)
    mixed, guide, direct = (tf.constant(rng.normal(size=(2, 3, 2, NUM_CLASSES)), tf.float32)
                            for _ in range(3))
    with tf.GradientTape() as tape:
        tape.watch([mixed, guide, direct])
        loss = model.decoupling_loss(mixed, guide, direct, tf.constant([0.2, 0.3]))
    grads = tape.gradient(loss, [mixed, guide, direct])
    moved = [g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads]
    assert moved == {"direct": [False, False, True], "mixed": [True, True, False],
                     "both": [True, True, True]}[learner]


@pytest.mark.parametrize("pairs", ["similar", "random"])
def test_paper_loss_terms_match_numpy(pairs):
    model = paper_model(pairs=pairs, rampup_steps=10, unsup_weight=2.0)
    net = model.segmenter
    labelled, images_u = batch()
    step = 3
    terms = {k: float(v) for k, v in model.paper_losses(labelled, images_u, step).items()}

    def predict(images):  # batch statistics, as every pass of the step
        return net(images, training=True).numpy()

    images_l, masks = labelled["image"], labelled["mask"]
    logits_l, logits_u = predict(images_l), predict(images_u)
    np.testing.assert_allclose(terms["supervised_loss"], mean_cross_entropy(logits_l, masks),
                               rtol=1e-5)
    if pairs == "similar":
        encoded_l = net.features(images_l, training=True)["stage3"].numpy()
        encoded_u = net.features(images_u, training=True)["stage3"].numpy()
        distance = ((encoded_u[:, None] - encoded_l[None]) ** 2).sum((2, 3, 4))
        partners = distance.argmin(1)
        own = ((encoded_l[:, None] - encoded_l[None]) ** 2).sum((2, 3, 4))
        np.fill_diagonal(own, np.inf)
        labelled_partners = own.argmin(1)
        kernel = model.image_classifier.kernel.numpy()
        scores = encoded_l.mean((1, 2)) @ kernel + model.image_classifier.bias.numpy()
        present = np.array([[float(c in m[m != IGNORE_LABEL]) for c in range(NUM_CLASSES)]
                            for m in masks])
        bce = (np.maximum(scores, 0) - scores * present + np.log1p(np.exp(-np.abs(scores))))
        np.testing.assert_allclose(terms["classifier_loss"], bce.mean(), rtol=1e-5)
    else:
        partners = random_partners(seeds.step_seed(5, step, 1), 2, 3).numpy()
        labelled_partners = random_other_partners(seeds.step_seed(5, step, 3), 3).numpy()
    lambdas = mixing.interpolation_lambdas(seeds.step_seed(5, step, 2), 2, 1.0, 0.5).numpy()
    lambdas_l = mixing.interpolation_lambdas(seeds.step_seed(5, step, 4), 3, 1.0, 0.5).numpy()
    column = lambdas[:, None, None, None]
    mixed = column * images_l[partners] + (1 - column) * images_u
    decoupled = softmax(predict(mixed)) - column * softmax(logits_l)[partners]
    unsupervised = squared_error(softmax(logits_u), decoupled)
    np.testing.assert_allclose(terms["unsupervised_loss"], unsupervised, rtol=1e-4)
    column = lambdas_l[:, None, None, None]
    mixed_l = column * images_l + (1 - column) * images_l[labelled_partners]
    decoupled = softmax(predict(mixed_l)) - column * softmax(logits_l)
    decoupling = squared_error(softmax(logits_l)[labelled_partners], decoupled)
    np.testing.assert_allclose(terms["decoupling_loss"], decoupling, rtol=1e-4)
    weight = 2.0 * np.exp(-5 * (1 - step / 10) ** 2)
    np.testing.assert_allclose(terms["unsup_weight"], weight, rtol=1e-5)
    expected = (terms["supervised_loss"] + decoupling + weight * unsupervised
                + terms.get("classifier_loss", 0.0))
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-5)


def test_a_single_labelled_image_adds_no_decoupling_loss():
    model = paper_model(pairs="similar")
    labelled, images_u = batch(n_l=1, n_u=2)
    terms = model.paper_losses(labelled, images_u, 0)
    assert float(terms["decoupling_loss"]) == 0.0
    assert float(terms["unsupervised_loss"]) > 0.0


def test_released_loss_terms_match_numpy():
    keras.utils.set_random_seed(0)
    net = models.build_segmenter("deeplabv3", "small", num_classes=NUM_CLASSES,
                                 aspp_channels=4, dropout=0.0, output_stride=16)
    model = GuidedMixReleased(net, NUM_CLASSES, seed=5, focal_weight=10.0)
    labelled, images_u = batch(n_l=2, n_u=3, size=(32, 32))
    step = 2
    terms = {k: float(v) for k, v in model.released_losses(labelled, images_u, step).items()}

    both = np.concatenate([labelled["image"], images_u])
    branches = net.head.branch_features(net.features(both, training=True), training=True)
    logits = net.head.decode(branches, training=True).numpy()
    upsampled = tf.image.resize(logits[:2], (32, 32)).numpy()
    np.testing.assert_allclose(terms["supervised_loss"],
                               mean_cross_entropy(upsampled, labelled["mask"]), rtol=1e-5)
    partners = random_partners(seeds.step_seed(5, step, 1), 2, 3).numpy()
    lam = float(mixing.interpolation_lambdas(seeds.step_seed(5, step, 2), None, 1.0, 0.5))
    assert 0 < lam < 0.5
    np.testing.assert_allclose(terms["mean_lambda"], lam, rtol=1e-6)
    branches = branches.numpy()
    mixed = lam * branches[:2] + (1 - lam) * branches[2:][partners]
    decoupled = model.mix_head(mixed, training=True).numpy() - lam * logits[:2]
    targets = logits[2:][partners].argmax(-1)
    p = 1 / (1 + np.exp(-decoupled))
    positive = np.eye(NUM_CLASSES, dtype=bool)[targets]
    focal = np.where(positive, -0.5 * (1 - p) ** 0.5 * np.log(p),
                     -0.5 * p ** 0.5 * np.log(1 - p))
    np.testing.assert_allclose(terms["unsupervised_loss"], 10 * focal.mean(), rtol=1e-4)
    np.testing.assert_allclose(terms["loss"], terms["supervised_loss"]
                               + terms["unsupervised_loss"], rtol=1e-6)

    # The decoupled logits subtract a non-detached p_l: the unsupervised loss trains the
    # main head's classifier as well as the second head.
    with tf.GradientTape() as tape:
        unsupervised = model.released_losses(labelled, images_u, step)["unsupervised_loss"]
    main, mix = tape.gradient(unsupervised, [net.head.decoder.classifier.kernel,
                                             model.mix_head.classifier.kernel])
    assert float(tf.reduce_max(tf.abs(main))) > 0 and float(tf.reduce_max(tf.abs(mix))) > 0


def test_released_variant_needs_a_deeplabv3_head():
    net = models.build_segmenter("psp_unet", "small", num_classes=3, psp_channels=8,
                                 low_level_channels=4, decoder_channels=8)
    with pytest.raises(ValueError, match="model.arch = 'deeplabv3'"):
        GuidedMixReleased(net, 3)
    with pytest.raises(ValueError, match="decoupling"):
        GuidedMix(net, 3, decoupling="sideways")


# -- distribution ---------------------------------------------------------------------------
def replica_data():
    """4 labelled + 4 unlabelled images where every nearest pair lies within one half of the
    batch: labelled 1 is a variation of 0 and 3 of 2 (labelled-labelled partners), and each
    unlabelled image k is labelled image k plus a little noise (its LUPI partner)."""
    rng = np.random.default_rng(7)
    size = (16, 16, 3)
    first, second = rng.uniform(0, 120, size), rng.uniform(135, 255, size)
    images = np.stack([first, first + rng.normal(0, 4, size),
                       second, second + rng.normal(0, 4, size)]).astype(np.float32)
    unlabelled = images + rng.normal(0, 0.5, images.shape).astype(np.float32)
    masks = rng.integers(0, NUM_CLASSES, (4, 16, 16)).astype(np.int32)
    masks[2:, :8] = IGNORE_LABEL  # replicas count different pixel numbers
    return {"image": images, "mask": masks}, {"image": unlabelled}


def replica_model():
    keras.utils.set_random_seed(0)
    net = models.build_segmenter("psp_unet", "small", num_classes=NUM_CLASSES,
                                 norm="sync_batch", psp_channels=8, low_level_channels=4,
                                 decoder_channels=8)
    return GuidedMix(net, NUM_CLASSES, pairs="similar", seed=1, unsup_weight=5.0)


def test_two_steps_same_weights_on_one_and_two_replicas(two_replicas, tmp_path):
    start = replica_model()
    labelled, unlabelled = replica_data()
    encoded = start.segmenter.features(labelled["image"], training=True)["stage3"]
    queries = start.segmenter.features(unlabelled["image"], training=True)["stage3"]
    # The data does what it claims: the pairs found on the whole batch stay in one half,
    # so the per-replica choice is the single-device one.
    assert list(nearest_partners(queries, encoded).numpy()) == [0, 1, 2, 3]
    assert list(nearest_partners(encoded, encoded, True).numpy()) == [1, 0, 3, 2]

    _, logs, _, _ = run_method_test(replica_model, [replica_data()] * 2, two_replicas,
                                    tmp_path)
    assert {"loss", "unsupervised_loss", "decoupling_loss", "classifier_loss"} <= set(logs)
    assert logs["unsupervised_loss"][0] > 0
