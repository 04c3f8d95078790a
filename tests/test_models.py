"""Backbones, heads, norm layers and the model factory (kssl.models)."""

import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kssl.models import build_backbone, build_head, build_segmenter
from kssl.models.backbones.resnet import resnet50, transfer_weights
from kssl.models.heads import DeepLabV2Head, DeepLabV3PlusHead
from kssl.models.layers import FrozenBatchNormalization, make_norm, resize_bilinear

H, W = 33, 41  # odd sizes catch off-by-one padding
# keras.applications.ResNet50 layer that ends each of our blocks.
RESNET50_BLOCK_ENDS = {"stem": "pool1_pool", "stage1": "conv2_block3_out",
                       "stage2": "conv3_block4_out", "stage3": "conv4_block6_out",
                       "stage4": "conv5_block3_out"}


def images(n=1, h=H, w=W, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype("float32")


def run_backbone(backbone, x, training=False):
    feats = {}
    y = backbone.preprocess(x)
    for block in backbone.blocks:
        y = block.layer(y, training=training)
        feats[block.name] = y
    return feats


def assert_block_sizes(backbone, feats, h=H, w=W):
    for block in backbone.blocks:
        expected = (math.ceil(h / block.stride), math.ceil(w / block.stride), block.channels)
        assert tuple(feats[block.name].shape[1:]) == expected, block.name


@pytest.fixture(scope="module")
def keras_resnet50():
    """A randomly initialised keras.applications ResNet50 without top."""
    return keras.applications.ResNet50(weights=None, include_top=False,
                                       input_shape=(None, None, 3))


@pytest.fixture(scope="module")
def resnet50_file(keras_resnet50, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "resnet50.weights.h5")
    keras_resnet50.save_weights(path)
    return path


# -- backbones ----------------------------------------------------------------------
@pytest.mark.parametrize("output_stride,strides", [
    (16, {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16}),
    (8, {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 8}),
])
def test_small_backbone_strides_and_channels(output_stride, strides):
    bb = build_backbone("small", output_stride=output_stride)
    assert {b.name: b.stride for b in bb.blocks} == strides
    assert [b.channels for b in bb.blocks] == [16, 32, 64, 128]
    assert bb.low_level_block == "stage1"
    assert_block_sizes(bb, run_backbone(bb, images()))


@pytest.fixture(scope="module")
def resnet50_os32():
    return resnet50(output_stride=32)


def test_resnet50_os32_reproduces_keras_applications(keras_resnet50, resnet50_os32):
    bb = resnet50_os32
    assert {b.name: b.stride for b in bb.blocks} == {
        "stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}
    transfer_weights(keras_resnet50, [b.layer for b in bb.blocks])
    x = images()
    ends = keras.Model(keras_resnet50.input,
                       [keras_resnet50.get_layer(n).output for n in RESNET50_BLOCK_ENDS.values()])
    expected = ends(keras.applications.resnet.preprocess_input(x.copy()))
    feats = run_backbone(bb, x)
    assert_block_sizes(bb, feats)
    for name, want in zip(RESNET50_BLOCK_ENDS, expected):
        np.testing.assert_allclose(feats[name].numpy(), want.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize("output_stride,strides", [
    (16, {"stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16}),
    (8, {"stem": 4, "stage1": 4, "stage2": 8, "stage3": 8, "stage4": 8}),
])
def test_dilated_resnet50_takes_the_same_weights(output_stride, strides, keras_resnet50,
                                                 resnet50_file):
    if output_stride == 8:  # from a local .weights.h5 file, through the factory
        bb = build_backbone("resnet50", weights=resnet50_file, output_stride=output_stride)
    else:  # straight from a keras.applications model
        bb = resnet50(output_stride=output_stride)
        transfer_weights(keras_resnet50, [b.layer for b in bb.blocks])
    assert {b.name: b.stride for b in bb.blocks} == strides
    assert_block_sizes(bb, run_backbone(bb, images()))
    unit = bb.blocks[-1].layer.units[2]
    assert unit.conv2.dilation_rate == (32 // output_stride,) * 2
    for ours, name in [(unit.conv2.kernel, "conv5_block3_2_conv"),
                       (unit.bn2.moving_variance, "conv5_block3_2_bn"),
                       (bb.blocks[0].layer.conv.kernel, "conv1_conv")]:
        theirs = {w.name: w for w in keras_resnet50.get_layer(name).weights}[ours.name]
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_mismatched_weights_file_fails_naming_the_layer(resnet50_file, tmp_path):
    # Same file with one kernel of the wrong shape: loading must say which layer.
    bad = str(tmp_path / "bad.weights.h5")
    with h5py.File(resnet50_file) as src, h5py.File(bad, "w") as dst:
        for key in src:
            src.copy(src[key], dst, key)
        for attr, value in src.attrs.items():
            dst.attrs[attr] = value
        group = dst["layers/conv2d/vars"]  # the first conv, conv1_conv
        assert group["0"].shape == (7, 7, 3, 64)
        del group["0"]
        group["0"] = np.zeros((7, 7, 4, 64), "float32")
    with pytest.raises(ValueError, match=r"bad.weights.h5 .*'conv1_conv'.*\(7, 7, 4, 64\)"):
        build_backbone("resnet50", weights=bad, output_stride=32)


def test_transfer_weights_names_missing_and_mismatched_layers(keras_resnet50, resnet50_os32):
    blocks = [b.layer for b in resnet50_os32.blocks]
    with pytest.raises(ValueError, match=r"'conv4_block1_\d_conv'.*no counterpart in trunk"):
        transfer_weights(keras_resnet50, blocks[:3], "trunk")
    # A source whose conv1_conv expects 4 input channels.
    inputs = keras.Input((None, None, 4))
    wrong = keras.Model(inputs, keras.layers.Conv2D(64, 7, name="conv1_conv")(inputs))
    with pytest.raises(ValueError, match=r"'conv1_conv'.*\(7, 7, 4, 64\)"):
        transfer_weights(wrong, blocks)
    with pytest.raises(ValueError, match="missing from"):
        transfer_weights(keras.Model(inputs, inputs), blocks)


def test_weights_argument_errors():
    with pytest.raises(ValueError, match="no file at"):
        build_backbone("resnet50", weights="/nonexistent/resnet50.h5")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("small", weights="imagenet")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet50", output_stride=4)


# -- norm layers --------------------------------------------------------------------
def test_frozen_norm_keeps_moving_statistics_and_is_not_trainable():
    bb = build_backbone("small", norm="frozen")
    bns = [layer for b in bb.blocks for layer in b.layer._flatten_layers()
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(bn, FrozenBatchNormalization) for bn in bns)
    for bn in bns:  # non-default statistics, so a batch update would show
        bn.moving_mean.assign(np.full(bn.moving_mean.shape, 0.5, "float32"))
    before = [bn.moving_mean.numpy().copy() for bn in bns]
    layer = bb.blocks[0].layer
    layer.trainable = True  # a parent unfreezing everything must not unfreeze frozen BN
    run_backbone(bb, images(2), training=True)
    for bn, old in zip(bns, before):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), old)
        assert not bn.trainable and not bn.trainable_weights
        assert not any(v.trainable for v in bn.weights)
    trainable_ids = {id(v) for b in bb.blocks for v in b.layer.trainable_weights}
    assert trainable_ids and not trainable_ids & {id(v) for bn in bns for v in bn.weights}
    # Frozen BN normalises with moving statistics even in training mode.
    x = np.random.RandomState(1).normal(3.0, 2.0, (4, 3, 3, 16)).astype("float32")
    bn = bns[0]
    np.testing.assert_allclose(bn(x, training=True).numpy(), bn(x, training=False).numpy())


def test_batch_norm_does_update_in_training_mode():
    bn = make_norm("batch", momentum=0.0)
    x = np.random.RandomState(1).normal(3.0, 2.0, (4, 3, 3, 2)).astype("float32")
    bn(x, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_sync_batch_norm_matches_single_device_statistics(two_replicas):
    # conftest.py splits the CPU into two logical devices: one half-batch per replica.
    strategy = two_replicas
    rng = np.random.RandomState(0)
    x = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    x[2:] += 3.0  # replicas see different halves: per-replica statistics would differ
    with strategy.scope():
        bn = make_norm("sync_batch", momentum=0.0)
        bn.build((None, 3, 3, 2))
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(4))

    @tf.function
    def step(batch):
        return strategy.run(lambda t: bn(t, training=True), args=(batch,))

    for batch in dataset:
        step(batch)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-4)


def test_unknown_norm_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown norm 'group'; known: batch, sync_batch, frozen"):
        make_norm("group")


# -- heads --------------------------------------------------------------------------
def numpy_dilated_conv(x, kernel, bias, rate):
    """'same'-padded stride-1 dilated conv, NHWC, written independently of TF."""
    k = kernel.shape[0]
    pad = rate * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[-1]), "float64")
    for i in range(k):
        for j in range(k):
            patch = xp[:, i * rate:i * rate + h, j * rate:j * rate + w, :]
            out += patch @ kernel[i, j]
    return out + bias


@pytest.mark.parametrize("rates", [(1, 2, 3), (6, 12, 18, 24), (6, 12)])
def test_deeplabv2_head_is_sum_of_branch_convs(rates):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(2, 9, 11, 8)).astype("float32")
    head = DeepLabV2Head(5, rates=rates, in_block="last")
    out = head({"last": x, "other": np.zeros((2, 3, 3, 1), "float32")}).numpy()
    assert len(head.branches) == len(rates)
    for branch in head.branches:  # the branch bias is trainable; make it visible in the sum
        branch.bias.assign(rng.normal(size=5).astype("float32"))
        assert 0.005 < branch.kernel.numpy().std() < 0.02  # normal(0, 0.01) init
    out = head({"last": x}).numpy()
    expected = sum(numpy_dilated_conv(x, b.kernel.numpy(), b.bias.numpy(), r)
                   for b, r in zip(head.branches, rates))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_deeplabv3plus_head_widths_and_stride():
    feats = {"low": tf.zeros((2, 9, 11, 24)), "high": tf.random.normal((2, 3, 3, 40))}
    head = DeepLabV3PlusHead(7, high_block="high", low_block="low", aspp_channels=16,
                             low_level_channels=8, decoder_channels=12, separable=True)
    out = head(feats, training=True)
    assert tuple(out.shape) == (2, 9, 11, 7)  # logits at the low-level block's stride
    assert head.aspp.project.conv.kernel.shape == (1, 1, 16 * 5, 16)  # 1x1, 3 rates, pool
    assert head.decoder[0].conv.kernel.shape == (1, 1, 16 + 8, 12)  # separable: pointwise


def test_factory_scales_aspp_rates_with_output_stride():
    bb = build_backbone("small", output_stride=8)
    head = build_head("deeplabv3plus", bb, 3, output_stride=8, aspp_channels=8,
                      low_level_channels=4, decoder_channels=8)
    assert head.aspp.rates == (12, 24, 36)
    assert build_head("deeplabv2", bb, 3, output_stride=8).rates == (6, 12, 18, 24)
    assert build_head("deeplabv2", bb, 3, output_stride=8, aspp_rates=(6, 12)).rates == (6, 12)


def test_resize_bilinear_align_corners_keeps_corner_values():
    x = tf.reshape(tf.range(12, dtype=tf.float16), (1, 3, 4, 1))
    out = resize_bilinear(x, (5, 7), align_corners=True)
    assert out.dtype == tf.float16
    np.testing.assert_array_equal(out.numpy()[0, [0, 0, -1, -1], [0, -1, 0, -1], 0],
                                  [0, 3, 8, 11])
    assert tuple(resize_bilinear(x, (5, 7)).shape) == (1, 5, 7, 1)


# -- factory errors -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(arch="pspnet", backbone="small"),
     "unknown arch 'pspnet'; known: deeplabv2, deeplabv3, deeplabv3plus, psp_unet"),
    (dict(arch="deeplabv2", backbone="vgg16"),
     "unknown backbone 'vgg16'; known: efficientnet_lite0, resnet101, resnet50, small"),
    (dict(arch="deeplabv2", backbone="small", decoder_channels=32),
     "arch 'deeplabv2' does not take decoder_channels"),
    (dict(arch="deeplabv2", backbone="small", norm="layer"), "unknown norm 'layer'"),
])
def test_factory_rejects_unknown_names_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        build_segmenter(num_classes=3, **kwargs)
    assert "\n" not in str(info.value)


def test_factory_head_norm_defaults():
    frozen = build_segmenter("deeplabv3plus", "small", num_classes=3, norm="frozen",
                             aspp_channels=8, low_level_channels=4, decoder_channels=8)
    assert isinstance(frozen.blocks["stem"].units[0].bn, FrozenBatchNormalization)
    # A fresh head has no statistics worth freezing: it trains its BN.
    assert not isinstance(frozen.head.aspp.project.bn, FrozenBatchNormalization)
    synced = build_segmenter("deeplabv3plus", "small", num_classes=3, norm="sync_batch",
                             aspp_channels=8, low_level_channels=4, decoder_channels=8)
    assert synced.head.aspp.project.bn.synchronized
    assert synced.blocks["stage3"].units[1].bn.synchronized
