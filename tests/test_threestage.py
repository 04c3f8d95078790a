"""Three-stage self-training: branches, losses, pseudo-masks, the stage driver, distribution."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, evaluation, models, optimizers, training
from kssl.augment import randaugment
from kssl.data import pipeline, transforms
from kssl.data.examples import IGNORE_LABEL, Examples
from kssl.data.pseudo_masks import KEY, PseudoMaskStore, write_pseudo_masks
from kssl.data.readers.shapes import Shapes
from kssl.evaluation import mean_iou_from_confusion
from kssl.methods import ThreeStage, ema
from kssl.models import branches
from tiny import TINY_SHAPES_CONFIG, run_method_test

NUM_CLASSES = 3


def small_segmenter(seed=0, norm="batch", backbone="small"):
    keras.utils.set_random_seed(seed)
    head_norm = "sync_batch" if norm == "sync_batch" else None
    return models.build_segmenter("deeplabv3plus", backbone, num_classes=NUM_CLASSES,
                                  norm=norm, head_norm=head_norm, aspp_channels=8,
                                  low_level_channels=4, decoder_channels=8, separable=True,
                                  dropout=0.0)


def variable_ids(layers):
    return {id(v) for layer in layers for v in layer.weights}


# -- the multi-task network ---------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["small", "efficientnet_lite0", "resnet50"])
def test_branches_share_exactly_the_right_blocks(backbone):
    segmenter = small_segmenter(backbone=backbone)
    specs = segmenter.block_specs
    stage2 = branches.auxiliary_branch(segmenter, "last_block", NUM_CLASSES + 1)
    stage3 = branches.auxiliary_branch(segmenter, "head", NUM_CLASSES + 1)
    for branch, shared in [(stage2, len(specs) - 1), (stage3, len(specs))]:
        assert branch.shared_blocks == shared
        for own, theirs in zip(branch.block_layers[:shared], segmenter.block_layers[:shared]):
            assert own is theirs
        # Nothing beyond the shared blocks is shared: not the copied block, not the head.
        own_ids = variable_ids(branch.block_layers[shared:] + [branch.head])
        assert not own_ids & variable_ids(segmenter.block_layers + [segmenter.head])
        assert branch.head.num_classes == NUM_CLASSES + 1
    # The stage-2 branch's last block is a half-width copy.
    last = specs[-1]
    copy = stage2.block_specs[-1]
    assert copy.name == last.name and copy.stride == last.stride
    assert copy.channels == last.channels // 2 or (backbone == "efficientnet_lite0"
                                                   and copy.channels == 160)
    images = tf.zeros((1, 32, 32, 3))
    assert stage2(images).shape == (1, 32, 32, NUM_CLASSES + 1)
    assert stage3(images).shape == (1, 32, 32, NUM_CLASSES + 1)


def test_resnet_half_width_branch_matches_the_released_layout():
    segmenter = small_segmenter(backbone="resnet50")
    branch = branches.auxiliary_branch(segmenter, "last_block", NUM_CLASSES + 1)
    stage = branch.block_layers[-1]
    # conv5 at half width: bottleneck inner 256, output 1024, the same depth and dilation.
    assert stage.filters == 256 and stage.output_channels == 1024
    assert stage.depth == segmenter.block_layers[-1].depth
    assert stage.dilation_rate == segmenter.block_layers[-1].dilation_rate
    assert branch.block_specs[-1].channels == 1024


def test_gradient_routing_between_the_heads():
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, strong_augment=False, seed=0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (2, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, (2, 32, 32)), tf.int32)
    main_head = model.segmenter.head.trainable_variables
    aux_own = (model.auxiliary.head.trainable_variables
               + model.auxiliary.block_layers[-1].trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        main, aux = model.student_outputs(images, training=True)
        seg_con = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, main, from_logits=True))
        pl = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, aux, from_logits=True))
    assert all(g is None for g in tape.gradient(pl, main_head))
    assert all(g is None for g in tape.gradient(seg_con, aux_own))
    assert all(g is not None for g in tape.gradient(pl, aux_own))
    assert all(g is not None for g in tape.gradient(seg_con, main_head))
    # The shared trunk learns from both.
    trunk = model.segmenter.block_layers[0].trainable_variables
    assert all(g is not None for g in tape.gradient(pl, trunk))


@pytest.mark.parametrize("weights, moves", [((1.0, 1.0, 0.0), "main"), ((0.0, 0.0, 1.0), "aux")])
def test_a_training_step_moves_only_the_head_whose_loss_counts(weights, moves):
    seg, con, pl = weights
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, strong_augment=flip_augment,
                       seg_weight=seg, con_weight=con, pl_weight=pl, seed=0)
    model.compile(optimizer=optimizers.SGD(0.1))
    heads = {"main": model.segmenter.head, "aux": model.auxiliary.head}
    before = {k: [v.numpy() for v in h.trainable_variables] for k, h in heads.items()}
    model.train_step(stage_batch(np.random.default_rng(3)))
    for name, head in heads.items():
        changed = any(not np.array_equal(b, v.numpy())
                      for b, v in zip(before[name], head.trainable_variables))
        assert changed == (name == moves), name


def test_teacher_decay_schedule_by_step():
    boundaries, values = (20000, 40000, 50000), (0.99, 0.995, 0.9975, 0.999)
    for step, expected in [(0, 0.99), (19999, 0.99), (20000, 0.995), (39999, 0.995),
                           (40000, 0.9975), (50000, 0.999), (59999, 0.999)]:
        got = float(ema.stepwise_decay(tf.constant(step, tf.int64), boundaries, values))
        assert got == pytest.approx(expected), step
    with pytest.raises(ValueError, match="one more value"):
        ema.stepwise_decay(0, (10,), (0.9,))


def test_backbone_learning_rate_multiplier():
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, strong_augment=False,
                       backbone_lr_multiplier=0.1, seed=0)
    model.compile(optimizer=training.build_optimizer(10, name="sgd", learning_rate=1.0,
                                                     momentum=0.0, weight_decay=0.0,
                                                     schedule="constant"))
    model.optimizer.build(model.optimized_variables())
    backbone = model.segmenter.block_layers[0].trainable_variables[0]
    head = model.segmenter.head.trainable_variables[0]
    before = [backbone.numpy(), head.numpy()]
    grads = [tf.ones_like(backbone), tf.ones_like(head)]
    model.optimizer.apply(grads, [backbone, head])
    np.testing.assert_allclose(before[0] - backbone.numpy(), 0.1, rtol=1e-5)
    np.testing.assert_allclose(before[1] - head.numpy(), 1.0, rtol=1e-5)


# -- one training step --------------------------------------------------------------------
def flip_augment(images, seed):
    """A strong view whose geometric part is a left-right flip: coords say so."""
    del seed
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    coords = randaugment.identity_coords(batch, height, width)
    return tf.reverse(images, [2]) + 1.0, tf.reverse(coords, [2])


def stage_batch(rng, num_l=2, num_u=2, size=(16, 16)):
    image = lambda n: tf.constant(rng.uniform(0, 255, (n, *size, 3)), tf.float32)
    label = lambda n: tf.constant(rng.integers(0, NUM_CLASSES, (n, *size)), tf.int32)
    masks = label(num_l).numpy()
    masks[:, 0, :3] = IGNORE_LABEL
    labelled = {"image": image(num_l), "mask": tf.constant(masks), KEY: label(num_l)}
    unlabelled = {"image": image(num_u), KEY: label(num_u)}
    return labelled, unlabelled


def numpy_ce(logits, labels):
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -(picked * valid).sum() / valid.sum()


def test_stage2_losses_match_a_hand_computation():
    # The student sees the labelled images as they are and the second sub-batch through
    # A (here a flip plus 1); teacher labels and stored pseudo-masks follow A's geometry.
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, strong_augment=flip_augment,
                       seg_weight=1.0, con_weight=0.25, pl_weight=0.5, seed=0)
    model.compile(optimizer=optimizers.SGD(0.0))
    labelled, unlabelled = stage_batch(np.random.default_rng(1))
    # Independent computation with the weights before the step.
    x_l, x_u = labelled["image"].numpy(), unlabelled["image"].numpy()
    teacher = np.argmax(model.teacher(np.concatenate([x_l, x_u]), training=False), -1)
    strong_u = x_u[:, :, ::-1] + 1.0
    student_in = np.concatenate([x_l, strong_u])
    main, aux = [t.numpy() for t in model.student_outputs(student_in, training=True)]
    con_targets = np.concatenate([teacher[:2], teacher[2:, :, ::-1]])
    pl_targets = np.concatenate([labelled[KEY].numpy(), unlabelled[KEY].numpy()[:, :, ::-1]])
    seg = numpy_ce(main[:2], labelled["mask"].numpy())
    con = numpy_ce(main, con_targets)
    pl = numpy_ce(aux, pl_targets)
    assert aux.shape[-1] == NUM_CLASSES + 1  # the released code's placeholder class

    logs = model.train_step((labelled, unlabelled))
    assert float(logs["segmentation_loss"]) == pytest.approx(seg, rel=1e-4)
    assert float(logs["consistency_loss"]) == pytest.approx(con, rel=1e-4)
    assert float(logs["pseudo_mask_loss"]) == pytest.approx(pl, rel=1e-4)
    assert float(logs["loss"]) == pytest.approx(seg + 0.25 * con + 0.5 * pl, rel=1e-4)


def test_aligned_consistency_targets_match_a_numpy_computation():
    # Distribution alignment of the teacher's consistency targets: the running class
    # distribution folds in the second sub-batch's mean probabilities (decay 0.5), then
    # both sub-batches' targets are the argmax of probs * prior / running, renormalised.
    prior = np.array([0.1, 0.2, 0.7], np.float32)  # far from a fresh network's output
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, strong_augment=False,
                       distribution_alignment=True, control_decay=0.5, class_prior=prior,
                       seed=0)
    model.compile(optimizer=optimizers.SGD(0.0))
    labelled, unlabelled = stage_batch(np.random.default_rng(3))
    # Darker unlabelled images: their class distribution differs from the labelled ones',
    # so folding in the wrong sub-batch would show.
    unlabelled["image"] = unlabelled["image"] * 0.2
    x = np.concatenate([labelled["image"].numpy(), unlabelled["image"].numpy()])

    def softmax(network):
        logits = network(x, training=False).numpy().astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True)

    probs = softmax(model.teacher)
    running = 0.5 * prior + 0.5 * probs[2:].mean(axis=(0, 1, 2))
    assert not np.allclose(running, 0.5 * prior + 0.5 * probs.mean(axis=(0, 1, 2)),
                           rtol=1e-3)
    targets = (probs * prior / running).argmax(-1)
    plain = probs.argmax(-1)
    # The alignment changes targets on both sub-batches.
    assert (targets[:2] != plain[:2]).any() and (targets[2:] != plain[2:]).any()
    main, _ = [t.numpy() for t in model.student_outputs(x, training=True)]
    assert numpy_ce(main, targets) != pytest.approx(numpy_ce(main, plain), rel=1e-3)

    logs = model.train_step((labelled, unlabelled))
    np.testing.assert_allclose(model.alignment.running.numpy(), running, rtol=1e-5)
    assert float(logs["consistency_loss"]) == pytest.approx(numpy_ce(main, targets),
                                                            rel=1e-4)
    # The monitor sees the (moved) teacher's targets aligned with the stored running
    # distribution; nothing is updated.
    monitored, admitted = model.pseudo_label_targets(x)["teacher"]
    np.testing.assert_array_equal(monitored.numpy(),
                                  (softmax(model.teacher) * prior / running).argmax(-1))
    np.testing.assert_allclose(model.alignment.running.numpy(), running, rtol=1e-5)
    assert admitted is None
    # Off by default (the paper and the released code); stage 1 has no teacher to align.
    assert ThreeStage(small_segmenter(), NUM_CLASSES, stage=2, seed=0).alignment is None
    assert ThreeStage(small_segmenter(), NUM_CLASSES, stage=1, distribution_alignment=True,
                      seed=0).alignment is None
    with pytest.raises(ValueError, match="ThreeStage distribution_alignment needs"):
        ThreeStage(small_segmenter(), NUM_CLASSES, stage=3, distribution_alignment=True)
    with pytest.raises(ValueError, match="ThreeStage control_decay must be in"):
        ThreeStage(small_segmenter(), NUM_CLASSES, stage=1, control_decay=1.0)


def test_each_teacher_follows_its_student_by_the_schedule():
    model = ThreeStage(small_segmenter(), NUM_CLASSES, stage=3, strong_augment=False,
                       ema_boundaries=(1,), ema_decays=(0.5, 0.9), seed=0)
    model.compile(optimizer=optimizers.SGD(0.5))
    rng = np.random.default_rng(2)
    kernel = lambda net: net.head.trainable_variables[0].numpy()
    for step, decay in [(0, 0.5), (1, 0.9)]:
        teacher_before = kernel(model.teacher)
        model.train_step(stage_batch(rng))
        np.testing.assert_allclose(
            kernel(model.teacher),
            decay * teacher_before + (1 - decay) * kernel(model.segmenter), rtol=1e-5,
            atol=1e-7)
    # The auxiliary head has no teacher copy and is trained; the inference network is the
    # teacher (the released code), the pseudo-mask network too.
    assert model.inference_network is model.teacher
    assert model.pseudo_mask_network is model.teacher


# -- pseudo-masks -------------------------------------------------------------------------
def shapes_reader():
    return Shapes(num_train=6, num_val=2, height=32, width=40)


def test_pseudo_masks_round_trip_by_id_through_scale_crop_and_flip(tmp_path):
    reader = shapes_reader()
    examples = reader.examples("train")
    # Store each example's ground truth as its "pseudo-mask": after augmentation the
    # attached map must equal the mask everywhere (the same nearest-neighbour ops, the same
    # ignore padding), and a mix-up of ids would show as a mismatch.
    target = tmp_path / "masks"
    os.makedirs(target)
    files = []
    for k, element in enumerate(reader.load(examples)):
        files.append(f"{k}.png")
        tf.io.write_file(str(target / files[-1]), tf.io.encode_png(element["mask"][..., None]))
    with open(target / "index.json", "w") as f:
        json.dump({"ids": list(examples.ids), "files": files, "num_classes": 7}, f)
    store = PseudoMaskStore(str(target))
    ds = pipeline.augmented_stream(reader, examples, with_masks=True, batch_size=3,
                                   crop_size=(28, 44), scale_range=(0.6, 1.7), flip=True,
                                   seed=3, attach=store.attach)
    padded = 0
    for batch in ds.take(6):
        np.testing.assert_array_equal(batch[KEY].numpy(), batch["mask"].numpy())
        padded += int((batch[KEY].numpy() == IGNORE_LABEL).sum())
    assert padded > 0  # some crops were padded (width 44 > 40), and padding is ignore


def test_a_missing_pseudo_mask_is_named(tmp_path):
    target = tmp_path / "masks"
    os.makedirs(target)
    with open(target / "index.json", "w") as f:
        json.dump({"ids": ["train/00000"], "files": ["0.png"], "num_classes": 7}, f)
    store = PseudoMaskStore(str(target))
    with pytest.raises(Exception, match="2 training example"):
        store.check_covers(Examples(("train/00000", "a", "b"), ("0", "1", "2")), "training")
    assert not PseudoMaskStore(str(tmp_path / "absent")).complete
    # A set made for another resolution or class count is refused before training.
    with pytest.raises(Exception, match="made for 7 classes at pipeline.resize = None"):
        store.check_matches(7, (96, 128))
    store.check_matches(7, None)


def test_writing_under_two_replicas_stores_each_example_once(tmp_path, two_replicas):
    reader = shapes_reader()
    examples = reader.examples("train")
    labelled, unlabelled = examples.select(examples.ids[:2]), examples.select(examples.ids[2:])
    with two_replicas.scope():
        network = small_segmenter(norm="sync_batch")
    # What a crash while writing leaves behind: a partial folder, discarded on the next try.
    os.makedirs(tmp_path / "pl.partial")
    (tmp_path / "pl.partial" / "000000.png").write_bytes(b"half a file")
    report = write_pseudo_masks(str(tmp_path / "pl"), network, reader,
                                [("labelled", labelled), ("unlabelled", unlabelled)],
                                num_classes=7, resize=(12, 16), progress=False)
    store = PseudoMaskStore(str(tmp_path / "pl"))
    assert store.complete and sorted(store.ids) == sorted(examples.ids)
    assert len(os.listdir(tmp_path / "pl")) == len(examples) + 1  # the masks + index.json
    assert not os.path.exists(str(tmp_path / "pl") + ".partial")
    # Each stored mask is the network's argmax at the training resolution.
    images = tf.image.resize(
        tf.cast(next(iter(reader.load(examples.select([store.ids[0]]), False).batch(1)))
                ["image"], tf.float32), (12, 16))
    expected = np.argmax(network(images), -1)[0]
    first = store.index["files"][0]
    stored = tf.io.decode_png(tf.io.read_file(str(tmp_path / "pl" / first)))[..., 0].numpy()
    np.testing.assert_array_equal(stored, expected)
    assert set(report) >= {"labelled_mean_iou", "unlabelled_mean_iou", "num_masks"}
    # The unlabelled pool's confusion matrix counts stored mask against resized truth.
    files = dict(zip(store.ids, store.index["files"]))
    counts = np.zeros((7, 7), np.int64)
    for example in reader.load(unlabelled, True).map(lambda e: transforms.resize(e, (12, 16))):
        truth = example["mask"].numpy().astype(np.int64)
        stored = tf.io.decode_png(tf.io.read_file(
            str(tmp_path / "pl" / files[example["id"].numpy().decode()])))[..., 0].numpy()
        kept = truth != 255
        counts += np.bincount(7 * truth[kept] + stored[kept], minlength=49).reshape(7, 7)
    np.testing.assert_array_equal(report["unlabelled_confusion_matrix"], counts)
    assert report["unlabelled_mean_iou"] == pytest.approx(mean_iou_from_confusion(counts))


# -- distribution -------------------------------------------------------------------------
def test_two_stage2_steps_same_weights_on_one_and_two_replicas(two_replicas, tmp_path):
    rng = np.random.default_rng(5)
    n, size = 8, (24, 24)
    batches = {
        "l_image": rng.uniform(0, 255, (n, *size, 3)).astype(np.float32),
        "l_mask": rng.integers(0, NUM_CLASSES, (n, *size)).astype(np.int32),
        f"l_{KEY}": rng.integers(0, NUM_CLASSES, (n, *size)).astype(np.int32),
        "u_image": rng.uniform(0, 255, (n, *size, 3)).astype(np.float32),
        f"u_{KEY}": rng.integers(0, NUM_CLASSES, (n, *size)).astype(np.int32),
    }
    steps = []
    for start in (0, 4):  # two global batches of 4
        part = {k: v[start:start + 4] for k, v in batches.items()}
        steps.append(tuple({k[2:]: v for k, v in part.items() if k.startswith(prefix)}
                           for prefix in ("l_", "u_")))

    def make_method():
        return ThreeStage(small_segmenter(seed=4, norm="sync_batch"), NUM_CLASSES, stage=2,
                          seed=0, backbone_lr_multiplier=0.5,
                          strong_augment=randaugment.RandAugmentCutout(cutout_size=6),
                          distribution_alignment=True, control_decay=0.5,
                          class_prior=[0.5, 0.3, 0.2])

    # run_method_test compares the student, the auxiliary head, the teacher and the
    # alignment's running distribution, checks that each replica holds the same copy of
    # each, and that they are saved and restored.
    single, _, _, _ = run_method_test(make_method, steps, two_replicas, tmp_path,
                                      optimizer=lambda: optimizers.SGD(0.1, momentum=0.9))
    assert not np.allclose(single.alignment.running.numpy(), [0.5, 0.3, 0.2])


# -- the stage driver ---------------------------------------------------------------------
STAGED = TINY_SHAPES_CONFIG + """
train.method = @ThreeStage
train.steps = 4
train.steps_per_epoch = 2
stage_1/train.steps = 2
pipeline.unlabelled_batch_size = 4
ThreeStage.backbone_lr_multiplier = 1.0
ThreeStage.seed = 0
"""


def test_three_stages_run_in_turn_and_resume_after_a_crash(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    # Distribution alignment needs the labelled class prior, which the driver passes.
    staged = STAGED + "ThreeStage.distribution_alignment = True\n"
    config.parse([], [staged])
    calls = []
    original = training.write_pseudo_masks
    fit = ThreeStage.fit

    def crash_in_stage_3(self, *args, **kwargs):
        if self.stage == 3:
            raise RuntimeError("simulated crash")
        return fit(self, *args, **kwargs)

    def counting_writer(directory, *args, **kwargs):
        calls.append(os.path.basename(os.path.dirname(directory)))
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(training, "write_pseudo_masks", counting_writer)
    monkeypatch.setattr(ThreeStage, "fit", crash_in_stage_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(workdir)
    assert calls == ["stage_1", "stage_2"]
    for stage in (1, 2):
        assert PseudoMaskStore(os.path.join(workdir, f"stage_{stage}", "pseudo_masks")).complete
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))

    # Resuming runs stage 3 only: the finished stages and their pseudo-masks are kept.
    monkeypatch.setattr(ThreeStage, "fit", fit)
    result = training.train(workdir)
    assert calls == ["stage_1", "stage_2"]
    assert sorted(result["stages"]) == ["1", "2", "3"]
    assert result["stages"]["1"]["steps"] == 2 and result["stages"]["3"]["steps"] == 4
    assert result["stages"]["1"]["pseudo_masks"]["num_masks"] == 24
    assert np.sum(result["stages"]["2"]["pseudo_masks"]["unlabelled_confusion_matrix"]) > 0
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f)["mean_iou"] == pytest.approx(result["mean_iou"])
    # The top-level run is a finished run for bin/evaluate: config and final weights.
    for name in ("config.gin", "model.weights.h5"):
        assert os.path.exists(os.path.join(workdir, name))

    # --start_stage 3 --overwrite retrains stage 3 alone from the stored stage-2 masks.
    config.parse([], [staged])
    stage_3_weights = os.path.join(workdir, "stage_3", "model.weights.h5")
    os.utime(stage_3_weights, (0, 0))
    result = training.train(workdir, start_stage=3, overwrite=True)
    assert os.path.getmtime(stage_3_weights) > 0
    assert calls == ["stage_1", "stage_2"]
    assert sorted(result["stages"]) == ["1", "2", "3"]  # the summary keeps every stage


def test_start_stage_without_stored_pseudo_masks_fails_first(tmp_path):
    config.parse([], [STAGED])
    with pytest.raises(config.ConfigError, match="pseudo-masks of stage 1"):
        training.train(str(tmp_path / "run"), start_stage=2)


def test_a_confidence_threshold_stores_the_ignore_label_below_it(tmp_path):
    """Pseudo-masks filtered by confidence: below the threshold the stored pixel is 255,
    above it the argmax; the report says which share was kept."""
    reader = shapes_reader()
    examples = reader.examples("train")
    pool = examples.select(examples.ids[:3])
    network = small_segmenter()
    images = tf.image.resize(tf.cast(next(iter(reader.load(pool, False).batch(3)))["image"],
                                     tf.float32), (12, 16))
    probs = tf.nn.softmax(network(images)).numpy()
    threshold = float(np.median(probs.max(-1)))  # about half the pixels pass
    report = write_pseudo_masks(str(tmp_path / "pl"), network, reader, [("unlabelled", pool)],
                                num_classes=7, resize=(12, 16), progress=False,
                                confidence_threshold=threshold)
    store = PseudoMaskStore(str(tmp_path / "pl"))
    expected = np.where(probs.max(-1) >= threshold, probs.argmax(-1), 255)
    files = dict(zip(store.ids, store.index["files"]))
    for k, example_id in enumerate(pool.ids):
        stored = tf.io.decode_png(tf.io.read_file(
            str(tmp_path / "pl" / files[example_id])))[..., 0].numpy()
        np.testing.assert_array_equal(stored, expected[k])
    assert report["unlabelled_kept_share"] == pytest.approx(np.mean(expected != 255))
    assert 0.3 < report["unlabelled_kept_share"] < 0.7
    # The argmax scores count every pixel, the filtered ones included.
    truth = np.stack([e["mask"].numpy() for e in reader.load(pool, True).map(
        lambda e: transforms.resize(e, (12, 16)))]).astype(np.int64)
    argmax, scored = probs.argmax(-1), truth != 255
    counts = np.bincount(7 * truth[scored] + argmax[scored], minlength=49).reshape(7, 7)
    assert report["unlabelled_argmax_mean_iou"] == pytest.approx(mean_iou_from_confusion(counts))
    assert report["unlabelled_argmax_pixel_accuracy"] == pytest.approx(
        np.mean(argmax[scored] == truth[scored]))
    assert report["unlabelled_argmax_mean_iou"] != pytest.approx(report["unlabelled_mean_iou"])


# -- ST++'s reliable-image selection -----------------------------------------------------
RELIABLE = TINY_SHAPES_CONFIG + """
train.method = @ThreeStage
train.steps = 2
train.steps_per_epoch = 2
stage_1/train.steps = 4
stage_1/optimizer.learning_rate = 0.1
pipeline.unlabelled_batch_size = 4
ThreeStage.backbone_lr_multiplier = 1.0
ThreeStage.seed = 0
ThreeStage.reliable_share = 0.5
"""


def stage_1_predictions(stage_1, ids):
    """{id: argmax of stage 1's final network} and {id: ground truth}, at full size."""
    from kssl.cli.common import load_inference_network, load_run

    reader, _ = load_run(stage_1)
    network = load_inference_network(stage_1, reader.info.num_classes)
    examples = reader.examples("train")
    rows = list(reader.load(examples.select(list(ids))).as_numpy_iterator())
    logits = network(np.stack([row["image"] for row in rows]).astype(np.float32))
    predicted = np.argmax(logits, -1).astype(np.uint8)
    ids = [row["id"].decode() for row in rows]
    return dict(zip(ids, predicted)), {i: row["mask"] for i, row in zip(ids, rows)}


def masks_mean_iou(predicted, truth):
    return mean_iou_from_confusion(sum(
        evaluation.confusion_from_labels(truth[i], predicted[i], 7) for i in predicted))


def test_reliable_share_blanks_stage_1_masks_of_the_unstable_images(tmp_path, capsys,
                                                                    monkeypatch):
    from kssl import run_files
    from kssl.methods.pseudo_label_controls import select_reliable, stability_scores

    fit = ThreeStage.fit

    def stop_before_stage_3(self, *args, **kwargs):  # stage 3 reads no selection
        if self.stage == 3:
            raise RuntimeError("stage 3 not needed")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(ThreeStage, "fit", stop_before_stage_3)
    workdir = str(tmp_path / "run")
    config.parse([], [RELIABLE])
    with pytest.raises(RuntimeError, match="stage 3 not needed"):
        training.train(workdir)
    stage_1 = os.path.join(workdir, "stage_1")
    snapshots = [PseudoMaskStore(os.path.join(stage_1, "reliability", f"step_{step:06d}"))
                 for step in (1, 2)]  # 4 steps, K = 3: after 4 // 3 and 8 // 3 steps
    unlabelled = snapshots[0].ids
    assert len(unlabelled) == 16 and all(s.complete for s in snapshots)
    predicted, truth = stage_1_predictions(stage_1, PseudoMaskStore(
        os.path.join(stage_1, "pseudo_masks")).ids)

    def expected_selection(stores):
        scores = stability_scores(np.stack([predicted[i] for i in unlabelled]),
                                  [np.stack([s.load(i) for i in unlabelled]) for s in stores], 7)
        assert len(set(np.round(scores, 6))) > 4  # a test of the scores, not of pool order
        return select_reliable(unlabelled, scores, 0.5)

    def check_stage_1(kept, dropped, steps):
        stored = PseudoMaskStore(os.path.join(stage_1, "pseudo_masks"))
        for i in stored.ids:
            expected = (np.full_like(predicted[i], IGNORE_LABEL) if i in dropped
                        else predicted[i])  # labelled images keep their masks
            np.testing.assert_array_equal(stored.load(i), expected, err_msg=i)
        with open(os.path.join(stage_1, "metrics.json")) as f:
            report = json.load(f)["pseudo_masks"]
        assert report["reliable_share"] == 0.5
        assert report["reliability_snapshot_steps"] == steps
        assert report["reliable_images"] == len(kept) == 8
        assert report["unlabelled_dropped_images"] == len(dropped) == 8
        assert report["labelled_dropped_images"] == 0
        assert report["unlabelled_mean_iou"] == pytest.approx(
            masks_mean_iou({i: predicted[i] for i in kept}, truth))
        assert report["unlabelled_dropped_mean_iou"] == pytest.approx(
            masks_mean_iou({i: predicted[i] for i in dropped}, truth))
        # The every-pixel argmax counts the dropped images too.
        assert report["unlabelled_argmax_mean_iou"] == pytest.approx(
            masks_mean_iou({i: predicted[i] for i in unlabelled}, truth))

    kept, dropped = expected_selection(snapshots)
    check_stage_1(kept, dropped, [1, 2])
    # Stage 2's teacher labels every image for stage 3: no all-ignore mask there.
    stage_2 = PseudoMaskStore(os.path.join(workdir, "stage_2", "pseudo_masks"))
    assert all((stage_2.load(i) != IGNORE_LABEL).any() for i in stage_2.ids)
    assert run_files.foreign_files(workdir) == []  # --overwrite may clear the snapshots

    # A stage 1 resumed without a snapshot scores against the others, and says so.
    shutil.rmtree(snapshots[0].directory)
    shutil.rmtree(os.path.join(stage_1, "pseudo_masks"))
    os.remove(os.path.join(stage_1, "metrics.json"))
    capsys.readouterr()
    config.parse([], [RELIABLE])
    with pytest.raises(RuntimeError, match="stage 3 not needed"):
        training.train(workdir)
    assert "no prediction snapshot of step(s) [1]" in capsys.readouterr().out
    kept, dropped = expected_selection(snapshots[1:])
    check_stage_1(kept, dropped, [2])
