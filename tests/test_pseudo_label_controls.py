"""Pseudo-label controls against numpy: class confidence and adaptive thresholds,
distribution alignment, class-aware draws, ST++ reliability; replica-identical state."""

import numpy as np
import pytest
import tensorflow as tf

from kssl.methods import pseudo_label_controls as controls


def probs_from(labels_and_conf, num_classes=3):
    """[1, 1, N, C] probabilities: pixel n has its label with the given confidence, the
    rest spread evenly over the other classes."""
    rows = []
    for label, conf in labels_and_conf:
        row = np.full(num_classes, (1 - conf) / (num_classes - 1))
        row[label] = conf
        rows.append(row)
    return tf.constant(np.array(rows, np.float32)[None, None])


def test_class_confidence_follows_an_exponential_average_per_class():
    bank = controls.ClassConfidence(3, decay=0.5)
    # Batch 1: class 0 at 0.9 and 0.7 (mean 0.8), class 1 at 0.6; class 2 absent.
    new = bank.updated(probs_from([(0, 0.9), (0, 0.7), (1, 0.6)])).numpy()
    np.testing.assert_allclose(new, [0.5 + 0.5 * 0.8, 0.5 + 0.5 * 0.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(bank.confidence.numpy(), new)
    new = bank.updated(probs_from([(2, 0.5)])).numpy()
    np.testing.assert_allclose(new, [0.9, 0.8, 0.5 * 1.0 + 0.5 * 0.5], rtol=1e-6)
    thresholds = controls.adaptive_thresholds(new, 0.95).numpy()
    np.testing.assert_allclose(thresholds, 0.95 * np.array([0.9, 0.8, 0.75]) / 0.9, rtol=1e-6)


def test_distribution_alignment_rescales_by_prior_over_running_average():
    prior = np.array([0.5, 0.3, 0.2])
    align = controls.DistributionAlignment(prior, decay=0.75)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=(2, 2, 3)).astype(np.float32)  # [2, 2, 3, 3]
    got = align.align(tf.constant(probs)).numpy()
    running = 0.75 * prior + 0.25 * probs.reshape(-1, 3).mean(0)
    expected = probs * prior / running
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(align.running.numpy(), running, rtol=1e-6)
    # rescale reads the stored average and changes nothing.
    np.testing.assert_allclose(align.rescale(tf.constant(probs)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(align.running.numpy(), running, rtol=1e-6)


def test_class_aware_draw_follows_the_weights():
    """With one class chosen of three, class c comes first with probability w_c / sum w."""
    weights = np.array([1.0, 2.0, 5.0], np.float32)
    uniform = tf.random.stateless_uniform((40000, 3), (7, 11))
    scores = controls.class_aware_scores(uniform, weights).numpy()
    assert ((scores >= 0) & (scores < 1)).all()
    first = np.bincount(scores.argmin(1), minlength=3) / len(scores)
    np.testing.assert_allclose(first, weights / weights.sum(), atol=0.01)
    # Weights of 1 give back the uniform draw.
    same = controls.class_aware_scores(uniform[:5], np.ones(3)).numpy()
    np.testing.assert_allclose(same, uniform[:5].numpy(), atol=1e-6)


def test_present_class_draw_follows_the_weights_of_the_present_classes():
    """Images holding classes {0, 2, 3} draw them with weights 1 : 2 : 3 (class 1, the
    heaviest, is absent); images holding {1, 3} draw 5 : 3; padding (-1) holds none."""
    weights = np.array([1.0, 5.0, 2.0, 3.0], np.float32)
    first = np.array([[0, 2, 2], [3, -1, 0]])
    second = np.array([[1, 1, 1], [3, -1, 3]])
    labels = np.stack([first] * 6000 + [second] * 6000 + [np.full((2, 3), -1)])
    uniform = tf.random.stateless_uniform((len(labels), 4), (3, 5))
    drawn = controls.draw_present_class(labels, 4, uniform, weights).numpy()
    assert drawn[-1] == -1
    first_share = np.bincount(drawn[:6000], minlength=4) / 6000
    np.testing.assert_allclose(first_share, [1 / 6, 0, 2 / 6, 3 / 6], atol=0.02)
    second_share = np.bincount(drawn[6000:-1], minlength=4) / 6000
    np.testing.assert_allclose(second_share, [0, 5 / 8, 0, 3 / 8], atol=0.02)
    assert (drawn[:6000] != 1).all() and np.isin(drawn[6000:-1], [1, 3]).all()


def test_stplusplus_stability_and_order_on_hand_made_masks():
    final = np.array([[[0, 0], [1, 1]], [[0, 1], [1, 1]]])
    earlier = [np.array([[[0, 0], [1, 1]], [[0, 0], [0, 1]]]),   # image 0 same; image 1
               np.array([[[0, 0], [1, 0]], [[1, 1], [1, 1]]])]   # differs in both
    scores = controls.stability_scores(final, earlier, 2)
    # image 0: IoU vs first = 1; vs second: class 0 2/3, class 1 1/2 -> 7/12.
    # image 1: vs first: class 0 1/3, class 1 1/3 -> 1/3; vs second: class 0 0/1, class 1
    # 3/4 -> 3/8.
    np.testing.assert_allclose(scores, [(1 + 7 / 12) / 2, (1 / 3 + 3 / 8) / 2])
    assert controls.reliable_order(["a", "b"], scores) == ["a", "b"]
    assert controls.reliable_order(["a", "b", "c"], [0.1, 0.9, 0.5]) == ["b", "c", "a"]


def test_stplusplus_selection_keeps_the_most_stable_share():
    final = np.array([[0, 0], [1, 1]])
    same, swapped = final, 1 - final
    one_off = np.array([[0, 0], [0, 1]])  # class 0: 2/3, class 1: 1/2 -> 7/12
    all_zero = np.zeros((2, 2), int)      # class 0: 1/2, class 1: 0 -> 1/4
    earlier = {"a": (same, same),          # 1
               "b": (same, one_off),       # (1 + 7/12) / 2 = 19/24
               "c": (swapped, swapped),    # 0
               "d": (one_off, one_off),    # 7/12
               "e": (all_zero, same)}      # (1/4 + 1) / 2 = 5/8
    ids = ["c", "a", "d", "e", "b"]  # pool order
    scores = controls.stability_scores(
        np.stack([final] * len(ids)),
        [np.stack([earlier[i][k] for i in ids]) for k in range(2)], 2)
    np.testing.assert_allclose(scores, [0, 1, 7 / 12, 5 / 8, 19 / 24])
    # Half of 5 keeps 2, as ST++'s first len // 2 of the order.
    assert controls.select_reliable(ids, scores, 0.5) == (["a", "b"], ["e", "d", "c"])
    assert controls.select_reliable(ids, scores, 0.6) == (["a", "b", "e"], ["d", "c"])
    assert controls.select_reliable(ids, scores, 1.0)[1] == []
    # Equal scores keep the pool order; 0.29 of 100 is 29 images despite float rounding.
    kept, dropped = controls.select_reliable([str(k) for k in range(100)], [0.5] * 100, 0.29)
    assert kept == [str(k) for k in range(29)] and len(dropped) == 71


def test_state_is_the_single_device_state_on_both_replicas(two_replicas):
    strategy = two_replicas
    probs = probs_from([(0, 0.9), (1, 0.6), (0, 0.5), (2, 0.8)])  # [1, 1, 4, 3]
    halves = [probs[:, :, :2], probs[:, :, 2:]]
    single_bank = controls.ClassConfidence(3, decay=0.5)
    single_bank.updated(probs)
    single_align = controls.DistributionAlignment([0.5, 0.3, 0.2], decay=0.5)
    expected = single_align.align(probs).numpy()
    with strategy.scope():
        bank = controls.ClassConfidence(3, decay=0.5)
        align = controls.DistributionAlignment([0.5, 0.3, 0.2], decay=0.5)

    @tf.function
    def step():
        def replica_fn():
            k = tf.distribute.get_replica_context().replica_id_in_sync_group
            part = tf.where(k == 0, halves[0], halves[1])
            bank.updated(part)
            return align.align(part)
        return strategy.run(replica_fn)

    aligned = strategy.experimental_local_results(step())
    np.testing.assert_allclose(np.concatenate([a.numpy() for a in aligned], axis=2),
                               expected, rtol=1e-5)
    for variable, want in [(bank.confidence, single_bank.confidence),
                           (align.running, single_align.running)]:
        copies = [v.numpy() for v in strategy.experimental_local_results(variable)]
        for copy in copies:
            np.testing.assert_allclose(copy, want.numpy(), rtol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay"):
        controls.ClassConfidence(3, decay=1.0)
    with pytest.raises(ValueError, match="prior"):
        controls.DistributionAlignment([0.0, 0.0])


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_guidedmix_class_target_is_the_decoupled_argmax_by_cross_entropy(threshold):
    """GuidedMix's target='argmax': CE of the direct logits against the argmax of the
    decoupled mask, over the pixels whose normalised decoupled confidence passes the
    threshold and whose row counts."""
    from kssl import models
    from kssl.methods import GuidedMix

    segmenter = models.build_segmenter(arch="psp_unet", backbone="small", num_classes=3,
                                       psp_channels=8)
    model = GuidedMix(segmenter, 3, pairs="random", target="argmax",
                      target_threshold=threshold, seed=0)
    rng = np.random.default_rng(0)
    direct = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    decoupled = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    counted = np.array([1.0, 0.0], np.float32)
    got = model.class_target_loss(tf.constant(direct), tf.constant(decoupled),
                                  tf.constant(counted)).numpy()
    positive = np.maximum(decoupled, 0)
    confidence = positive.max(-1) / np.maximum(positive.sum(-1), 1e-12)
    keep = (confidence >= threshold) & (counted[:, None, None] > 0)
    labels = decoupled.argmax(-1)
    log_probs = direct - np.log(np.exp(direct).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, ce[keep].mean(), rtol=1e-5)
    assert keep.sum() < keep.size
