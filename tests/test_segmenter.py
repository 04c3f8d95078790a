"""Segmenter: named blocks, features, branches, precision, saving and export."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl.models import build_backbone, build_head, build_segmenter
from kssl.models.segmenter import Segmenter

SMALL_HEAD = dict(aspp_channels=16, low_level_channels=8, decoder_channels=16)


def images(n=1, h=33, w=41, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype("float32")


@pytest.fixture(scope="module")
def v3plus():
    return build_segmenter("deeplabv3plus", "small", num_classes=5, **SMALL_HEAD)


def test_logits_match_input_size_for_any_size(v3plus):
    for h, w in [(33, 41), (17, 9), (64, 64)]:
        out = v3plus(images(2, h, w), training=False)
        assert tuple(out.shape) == (2, h, w, 5)
        assert out.dtype == tf.float32
    # One trace with unknown height and width serves every size.
    serve = tf.function(lambda x: v3plus(x, training=False),
                        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for h, w in [(33, 41), (20, 30)]:
        x = images(1, h, w)
        np.testing.assert_allclose(serve(x).numpy(), v3plus(x, training=False).numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert tuple(v3plus(images(1).astype("uint8")).shape) == (1, 33, 41, 5)
    with pytest.raises(ValueError, match="incompatible"):
        v3plus(np.zeros((1, 33, 41, 1), "float32"))


def test_deeplabv2_resnet50_output_and_block_strides():
    model = build_segmenter("deeplabv2", "resnet50", num_classes=3)  # arch default OS 8
    assert model.block_names == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert model.strides == {"stem": 4, "stage1": 4, "stage2": 8, "stage3": 8, "stage4": 8}
    assert model.channels == {"stem": 64, "stage1": 256, "stage2": 512, "stage3": 1024,
                              "stage4": 2048}
    assert model.head.rates == (6, 12, 18, 24)
    x = images()
    feats = model.features(x)
    for name, stride in model.strides.items():
        assert tuple(feats[name].shape[1:3]) == (math.ceil(33 / stride), math.ceil(41 / stride))
    assert tuple(model(x).shape) == (1, 33, 41, 3)


def test_features_keys_and_upto(v3plus):
    x = images()
    assert v3plus.block_names == ("stem", "stage1", "stage2", "stage3")
    assert list(v3plus.features(x)) == list(v3plus.block_names)
    assert list(v3plus.features(x, upto="stage1")) == ["stem", "stage1"]
    assert list(v3plus.features(x, upto=3)) == ["stem", "stage1", "stage2"]
    assert list(v3plus.blocks) == list(v3plus.block_names)
    with pytest.raises(ValueError, match="unknown block 'stage9'"):
        v3plus.features(x, upto="stage9")
    # The head on features equals the full forward pass.
    feats = v3plus.features(x)
    np.testing.assert_allclose(v3plus.logits_from_features(feats, (33, 41)).numpy(),
                               v3plus(x).numpy(), rtol=1e-5, atol=1e-5)


def test_branch_shares_exactly_the_first_k_blocks(v3plus):
    k = 2
    fresh = build_backbone("small")  # new variables for the branch's own later blocks
    head = build_head("deeplabv3plus", fresh, 4, output_stride=16, **SMALL_HEAD)
    aux = v3plus.branch(k, fresh.blocks[k:], head, name="aux")
    assert isinstance(aux, Segmenter)
    assert aux.block_names == v3plus.block_names
    x = images()
    aux(x)  # builds the branch's own head
    for i, name in enumerate(v3plus.block_names):
        ours, theirs = v3plus.blocks[name], aux.blocks[name]
        if i < k:
            assert ours is theirs
            assert all(a is b for a, b in zip(ours.weights, theirs.weights))
        else:
            assert ours is not theirs
            assert not {id(v) for v in ours.weights} & {id(v) for v in theirs.weights}
    shared = {id(v) for name in v3plus.block_names[:k] for v in v3plus.blocks[name].weights}
    main_ids = {id(v) for v in v3plus.weights}
    aux_ids = {id(v) for v in aux.weights}
    assert main_ids & aux_ids == shared
    assert {v.path for v in v3plus.weights if id(v) in shared} == \
        {v.path for v in aux.weights if id(v) in shared}
    # Continuing the main network's trunk features equals running the branch from images,
    # even though the main network's own later blocks carry the same names.
    trunk = v3plus.features(x)
    cont = aux.extend_features(trunk, start="stage1")
    direct = aux.features(x)
    for name in aux.block_names:
        np.testing.assert_allclose(cont[name].numpy(), direct[name].numpy(), rtol=1e-5,
                                   atol=1e-5)
    assert tuple(aux(x).shape) == (1, 33, 41, 4)
    with pytest.raises(ValueError, match="own head"):
        v3plus.branch(1)


def test_logits_are_float32_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_segmenter("deeplabv3plus", "small", num_classes=3, **SMALL_HEAD)
        x = images()
        feats = model.features(x)
        assert feats["stage3"].dtype == tf.float16  # the work does run in half precision
        out = model(x, training=True)
        assert out.dtype == tf.float32
        assert all(v.dtype == "float32" for v in model.weights)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_save_and_load_weights_round_trip(v3plus, tmp_path):
    path = str(tmp_path / "model.weights.h5")
    x = images(2)
    v3plus.save_weights(path)
    restored = build_segmenter("deeplabv3plus", "small", num_classes=5, **SMALL_HEAD)
    assert not np.array_equal(restored(x).numpy(), v3plus(x).numpy())
    restored.load_weights(path)
    np.testing.assert_array_equal(restored(x).numpy(), v3plus(x).numpy())


def test_saved_model_export_serves_any_size(v3plus, tmp_path):
    path = str(tmp_path / "exported")
    v3plus.export(path, format="tf_saved_model", verbose=False)  # signature from build()
    served = tf.saved_model.load(path)
    x = images(1, 21, 30)
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), v3plus(x).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_unknown_arch_is_a_value_error():
    with pytest.raises(ValueError, match="unknown arch 'unet'; known: deeplabv2, deeplabv3, deeplabv3plus, psp_unet"):
        build_segmenter("unet", "small", num_classes=3)
