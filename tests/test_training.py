"""The training driver's data preparation, optimizer choices and mixed precision."""

import os

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl import config, models, optimizers, training
from kssl.data.readers.base import DataError
from kssl.methods import Supervised
from tiny import shapes_reader_config, write_png


SHAPES = shapes_reader_config(12, 32, 32) + "shapes.num_val = 2\n"


def settings():
    return training.pipeline_settings()


def test_separate_unlabelled_folder_becomes_the_pool(tmp_path):
    for k in range(3):
        write_png(str(tmp_path / "extra" / f"u{k}.png"), np.zeros((32, 32, 3), np.uint8))
    # A gin scope keeps this folder's bindings apart from a labelled @folder() reader's.
    config.parse([], [SHAPES, "labels.count = 4",
                      "unlabelled.reader = @extra/folder()",
                      f"extra/folder.images_dir = '{tmp_path / 'extra'}'"])
    reader, split, _ = training.dataset_setup()
    labelled, unlabelled, extra_reader = training.prepare_data(reader, split, True,
                                                               settings())
    assert len(labelled) == 4
    assert sorted(unlabelled.ids) == ["u0", "u1", "u2"]
    assert extra_reader is not None and extra_reader is not reader


def test_supervised_method_gets_no_unlabelled_stream():
    config.parse([], [SHAPES, "labels.count = 4"])
    reader, split, _ = training.dataset_setup()
    labelled, unlabelled, _ = training.prepare_data(reader, split,
                                                    Supervised.uses_unlabelled, settings())
    assert len(labelled) == 4 and unlabelled is None


def test_empty_unlabelled_pool_fails_before_training():
    config.parse([], [SHAPES])  # no labels.* binding: every image is labelled
    reader, split, _ = training.dataset_setup()
    with pytest.raises(DataError, match="unlabelled pool .* is empty"):
        training.prepare_data(reader, split, True, settings())


def test_bad_unlabelled_file_is_named_before_training(tmp_path):
    write_png(str(tmp_path / "extra" / "broken.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "extra" / "broken.png").write_bytes(b"not an image")
    config.parse([], [SHAPES, "labels.count = 4", "unlabelled.reader = @folder()",
                      f"folder.images_dir = '{tmp_path / 'extra'}'"])
    reader, split, _ = training.dataset_setup()
    with pytest.raises(DataError, match="broken.png"):
        training.prepare_data(reader, split, True, settings())


def test_poly_schedule_and_weight_decay_exclusions():
    config.parse([], ["optimizer.learning_rate = 0.1", "optimizer.power = 1.0"])
    opt = training.build_optimizer(100)
    np.testing.assert_allclose(float(opt.learning_rate), 0.1)
    lr = opt._learning_rate  # the schedule: linear with power 1
    np.testing.assert_allclose(float(lr(50)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="optimizer.name"):
        config.parse([], ["optimizer.name = 'rmsprop'"])
        training.build_optimizer(10)


@pytest.mark.parametrize("rule, batch, expected", [
    ("linear", 4, 0.1 * 4 / 16), ("sqrt", 4, 0.1 * 0.5), ("none", 4, 0.1),
    ("linear", 16, 0.1), ("linear", None, 0.1), ("linear", 32, 0.2)])
def test_learning_rate_follows_the_global_batch(rule, batch, expected):
    assert optimizers.scaled_learning_rate(0.1, batch, 16, rule) == pytest.approx(expected)


def test_optimizer_scales_rate_and_schedule_end_for_a_smaller_batch(capsys):
    config.parse([], ["optimizer.learning_rate = 0.08", "optimizer.end_learning_rate = 0.008",
                      "optimizer.power = 1.0", "optimizer.reference_batch_size = 16"])
    opt = training.build_optimizer(100, batch_size=4)
    lr = opt._learning_rate
    np.testing.assert_allclose(float(lr(0)), 0.02, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 0.002, rtol=1e-6)
    assert "learning rate 0.08 scaled to 0.02 for a global batch of 4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="batch_scaling"):
        optimizers.scaled_learning_rate(0.1, 4, 16, "cubic")


def test_mixed_float16_step_scales_the_loss_and_stays_finite():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        net = models.build_segmenter("deeplabv3plus", "small", num_classes=3,
                                     aspp_channels=8, low_level_channels=4,
                                     decoder_channels=8)
        model = Supervised(net, num_classes=3)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        before = [w.numpy().copy() for w in net.trainable_weights]
        rng = np.random.default_rng(0)
        batch = {"image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
                 "mask": rng.integers(0, 3, (2, 32, 32)).astype(np.int32)}
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1,
                            steps_per_epoch=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [w.numpy() for w in net.trainable_weights]
        assert all(np.isfinite(w).all() for w in after)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))
        assert net(batch["image"]).dtype == tf.float32  # logits stay float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_call_configured_keeps_data_errors_and_real_bugs_intact():
    @gin.configurable("failing")
    def failing(kind="data"):
        if kind == "data":
            raise DataError("images/a.png: unreadable\n  second line")
        raise TypeError("a bug inside training")

    gin.parse_config("failing.kind = 'data'")
    with pytest.raises(DataError) as caught:
        config.call_configured(failing)
    assert str(caught.value) == "images/a.png: unreadable\n  second line"
    gin.parse_config("failing.kind = 'bug'")
    with pytest.raises(TypeError, match="a bug inside training"):
        config.call_configured(failing)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(config.ConfigError, match="precious.txt"):
        training.remove_run(str(tmp_path))
    assert (tmp_path / "precious.txt").exists()
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "config.gin").write_text("")
    training.remove_run(str(run))
    assert os.listdir(run) == []


def test_steps_must_fill_whole_epochs(tmp_path):
    config.parse([], [SHAPES, "train.steps = 10", "train.steps_per_epoch = 4"])
    with pytest.raises(config.ConfigError, match="multiple of train.steps_per_epoch"):
        training.train(str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(
    f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".gin")))
def test_every_shipped_config_parses_and_names_a_registered_method(name, monkeypatch):
    monkeypatch.chdir(REPO)  # includes are relative to the repository root
    config.parse([os.path.join("configs", name)])
    method = gin.query_parameter("train.method")
    assert method.selector.split(".")[-1] in {"Supervised", "ClassMix", "ThreeStage", "MKD",
                                               "GuidedMix", "GuidedMixReleased", "UniMatch",
                                               "FixMatch"}
