"""PyTorch -> kssl weight conversion (kssl.models.checkpoints.convert, bin/convert_weights).

State dicts are made with numpy in each layout, written in torch.save's byte formats by
tests/torch_files.py, converted through the CLI function, loaded into kssl segmenters and
checked against an independent numpy computation with PyTorch's conventions (symmetric
padding, ceil-mode pooling, BN epsilon 1e-5).
"""

import io
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from kssl import models, training
from kssl.cli import convert_weights
from kssl.models.checkpoints import convert
from kssl.models.heads import DeepLabV2Head

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_files  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BN_EPS = 1e-5
TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406]) * 255
TORCHVISION_STD = np.array([0.229, 0.224, 0.225]) * 255
DEEPLAB_MEAN_RGB = np.array([122.67891434, 116.66876762, 104.00698793])


# -- state dicts ----------------------------------------------------------------------------
def resnet_state(depth, seed=0, prefix="", classes=None, counters=False):
    """A random ResNet state dict with PyTorch names; `classes` adds a DeepLab-v2 layer5."""
    rng = np.random.RandomState(seed)
    state = {}
    for row in convert.resnet_table(depth):
        if row.variable == "moving_variance":
            value = rng.uniform(0.5, 1.5, row.shape)
        elif row.variable == "kernel":
            fan_in = np.prod(row.shape[1:])
            value = rng.standard_normal(row.shape) / np.sqrt(fan_in)
        else:
            value = rng.uniform(-0.5, 0.5, row.shape)
        state[prefix + row.torch_name] = value.astype("float32")
        if counters and row.variable == "moving_variance":
            counter = row.torch_name.replace("running_var", "num_batches_tracked")
            state[prefix + counter] = np.array(7, "int64")
    if classes:
        for k in range(4):
            state[f"{prefix}layer5.conv2d_list.{k}.weight"] = (
                rng.standard_normal((classes, 2048, 3, 3)) * 0.01).astype("float32")
            state[f"{prefix}layer5.conv2d_list.{k}.bias"] = rng.uniform(
                -1, 1, classes).astype("float32")
    return state


def convert_quietly(source, arch, output):
    out = io.StringIO()
    report = convert_weights.convert(source, arch, output, stream=out)
    return report, out.getvalue()


# -- numpy reference with PyTorch's conventions -------------------------------------------
def np_conv(x, w, stride=1, pad=0, dilation=1, bias=None):
    """x [H, W, C], w torch (out, in, kh, kw), symmetric zero padding `pad`."""
    h, wd, _ = x.shape
    out_c, _, kh, kw = w.shape
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    ho = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((ho, wo, out_c))
    for i in range(kh):
        for j in range(kw):
            patch = xp[i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
                       j * dilation: j * dilation + stride * (wo - 1) + 1: stride]
            out += patch @ w[:, :, i, j].T.astype("float64")
    return out if bias is None else out + bias


def np_bn(x, state, prefix):
    return ((x - state[f"{prefix}.running_mean"])
            / np.sqrt(state[f"{prefix}.running_var"] + TORCH_BN_EPS)
            * state[f"{prefix}.weight"] + state[f"{prefix}.bias"])


def pool_size(n, ceil_mode, k=3, s=2, pad=1):
    """PyTorch MaxPool2d output size (ceil_mode drops a window starting in the padding)."""
    if not ceil_mode:
        return (n + 2 * pad - k) // s + 1
    out = -(-(n + 2 * pad - k) // s) + 1
    return out - 1 if (out - 1) * s >= n + pad else out


def np_maxpool(x, ceil_mode, k=3, s=2, pad=1):
    h, w, _ = x.shape
    ho, wo = pool_size(h, ceil_mode), pool_size(w, ceil_mode)
    extra_h = max(0, (ho - 1) * s + k - h - pad)
    extra_w = max(0, (wo - 1) * s + k - w - pad)
    xp = np.pad(x, ((pad, extra_h), (pad, extra_w), (0, 0)), constant_values=-np.inf)
    out = np.full((ho, wo, x.shape[2]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[i: i + s * (ho - 1) + 1: s, j: j + s * (wo - 1) + 1: s])
    return out


def np_stem(image, state, ceil_mode):
    y = np_conv(image, state["conv1.weight"], stride=2, pad=3)
    y = np.maximum(np_bn(y, state, "bn1"), 0)
    return np_maxpool(y, ceil_mode)


def np_bottleneck(x, state, prefix, stride, stride_on):
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    y = np.maximum(np_bn(np_conv(x, state[f"{prefix}.conv1.weight"], stride=s1), state,
                         f"{prefix}.bn1"), 0)
    y = np.maximum(np_bn(np_conv(y, state[f"{prefix}.conv2.weight"], stride=s2, pad=1), state,
                         f"{prefix}.bn2"), 0)
    y = np_bn(np_conv(y, state[f"{prefix}.conv3.weight"]), state, f"{prefix}.bn3")
    shortcut = np_bn(np_conv(x, state[f"{prefix}.downsample.0.weight"], stride=stride), state,
                     f"{prefix}.downsample.1")
    return np.maximum(y + shortcut, 0)


def conv_size(n, k, s, pad):
    return (n + 2 * pad - k) // s + 1


def image(h, w, seed=1):
    return np.random.RandomState(seed).uniform(0, 255, (h, w, 3)).astype("float32")


# -- torchvision ResNet-50 (zip file) ---------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory):
    """(state dict, converted file, report, stdout, segmenter at output stride 32)."""
    folder = tmp_path_factory.mktemp("torchvision")
    state = resnet_state(50, counters=True)
    state["fc.weight"] = np.zeros((1000, 2048), "float32")
    state["fc.bias"] = np.zeros((1000,), "float32")
    source, output = str(folder / "resnet50.pth"), str(folder / "r50.weights.h5")
    torch_files.write_zip_checkpoint(source, state)
    report, printed = convert_quietly(source, "resnet50_torchvision", output)
    model = models.build_segmenter("deeplabv2", "resnet50", num_classes=3, weights=output,
                                   output_stride=32)
    return state, output, report, printed, model


def test_torchvision_report_lists_converted_and_unused(torchvision_r50):
    _, output, report, printed, _ = torchvision_r50
    assert len(report.converted) == 265
    assert ("layer2.0.conv2.weight", "conv3_block1_2_conv/kernel", (128, 128, 3, 3)) \
        in report.converted
    assert report.unused == [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    assert len(report.skipped) == 53  # num_batches_tracked, one per BN
    assert "fc.weight (1000, 2048)" in printed and "unused tensors: 2" in printed
    assert convert.read_info(output)["layout"] == {
        "stride_on": "3x3", "stem_pool": "floor", "preprocess": "torchvision"}


def test_torchvision_stem_matches_numpy(torchvision_r50):
    state, _, _, _, model = torchvision_r50
    assert models.backbone_layout(model) == {
        "stride_on": "3x3", "stem_pool": "floor", "preprocess": "torchvision"}
    img = image(20, 26)
    x = model.normalize(img[None])
    np.testing.assert_allclose(x[0], (img - TORCHVISION_MEAN) / TORCHVISION_STD, atol=1e-5)
    stem = model.blocks["stem"]
    reference = (img - TORCHVISION_MEAN) / TORCHVISION_STD
    conv_bn = stem.bn(stem.conv(stem.pad1(x)), training=False)[0]
    np.testing.assert_allclose(
        conv_bn, np_bn(np_conv(reference, state["conv1.weight"], stride=2, pad=3), state, "bn1"),
        rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stem(x, training=False)[0],
                               np_stem(reference, state, ceil_mode=False), rtol=1e-4, atol=1e-4)


def test_stride_on_3x3_matches_torchvision_bottleneck(torchvision_r50):
    """layer2.0 (stride 2 on the 3x3 conv, padded 1 on every side) on an even-sized input,
    where TF's one-sided "same" padding would sample a shifted grid."""
    state, _, _, _, model = torchvision_r50
    x = np.random.RandomState(2).uniform(0, 1, (8, 10, 256)).astype("float32")
    unit = model.blocks["stage2"].units[0]
    got = unit(x[None], training=False)[0]
    want = np_bottleneck(x, state, "layer2.0", stride=2, stride_on="3x3")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The other layout really differs: the test can tell them apart.
    other = np_bottleneck(x, state, "layer2.0", stride=2, stride_on="1x1")
    assert np.abs(other - want).max() > 1e-2


def test_torchvision_feature_sizes(torchvision_r50):
    *_, model = torchvision_r50
    h, w = 33, 41
    feats = model.features(image(h, w)[None])
    sizes = [(h, w)]
    sizes.append(tuple(pool_size(conv_size(n, 7, 2, 3), False) for n in sizes[0]))  # stem
    sizes.append(sizes[1])  # layer1
    for _ in range(3):  # layer2..4: the 3x3 conv, stride 2, padding 1
        sizes.append(tuple(conv_size(n, 3, 2, 1) for n in sizes[-1]))
    for name, size in zip(["stem", "stage1", "stage2", "stage3", "stage4"], sizes[1:]):
        assert tuple(feats[name].shape[1:3]) == size, name


def test_layout_must_agree_with_converted_weights(torchvision_r50):
    _, output, *_ = torchvision_r50
    with pytest.raises(ValueError, match="stride_on='1x1' disagrees.*need stride_on='3x3'"):
        models.build_segmenter("deeplabv2", "resnet50", num_classes=3, weights=output,
                               stride_on="1x1")
    with pytest.raises(ValueError, match="converted for resnet50.*not resnet101"):
        models.build_segmenter("deeplabv2", "resnet101", num_classes=3, weights=output)
    with pytest.raises(ValueError, match="backbone 'small' does not take stride_on"):
        models.build_segmenter("deeplabv2", "small", num_classes=3, stride_on="3x3")
    with pytest.raises(ValueError, match="unknown stem_pool 'round'"):
        models.build_backbone("resnet50", stem_pool="round")


def test_training_records_the_adopted_layout(torchvision_r50, tmp_path):
    """bin/evaluate rebuilds with weights=None: config.gin must carry the layout."""
    _, output, *_, model = torchvision_r50
    path = tmp_path / "config.gin"
    gin.clear_config()
    try:
        gin.parse_config(f"model.weights = {output!r}\nmodel.backbone = 'resnet50'")
        path.write_text(f"model.weights = {output!r}\n")
        training.record_model_layout(str(path), model)
        text = path.read_text()
        assert "model.stride_on = '3x3'" in text and "model.preprocess = 'torchvision'" in text
        assert "stem_pool" not in text  # the default needs no line
        gin.clear_config()
        gin.parse_config_file(str(path))
        rebuilt = training.build_model(3, weights=None, arch="deeplabv2", output_stride=32)
        assert models.backbone_layout(rebuilt) == models.backbone_layout(model)
    finally:
        gin.clear_config()


# -- Res_Deeplab ResNet-101 (legacy file, "Scale." prefix) ------------------------------------
@pytest.fixture(scope="module")
def deeplab_r101(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deeplab")
    state = resnet_state(101, seed=3, prefix="Scale.", classes=21)
    source, output = str(folder / "coco.pth"), str(folder / "coco.weights.h5")
    torch_files.write_legacy_checkpoint(source, state)
    report, printed = convert_quietly(source, "deeplabv2_resnet101", output)
    model = models.build_segmenter("deeplabv2", "resnet101", num_classes=21, weights=output,
                                   aspp_rates=(6, 12))
    plain = {k[len("Scale."):]: v for k, v in state.items()}
    return plain, output, report, printed, model


def test_deeplabv2_report_and_info(deeplab_r101):
    _, output, report, printed, _ = deeplab_r101
    assert len(report.converted) == 520 + 8 and report.unused == []
    assert ("Scale.layer3.22.conv2.weight", "conv4_block23_2_conv/kernel", (256, 256, 3, 3)) \
        in report.converted
    assert "rate-6 and rate-12" in printed
    info = convert.read_info(output)
    assert info["layout"] == {"stride_on": "1x1", "stem_pool": "ceil",
                              "preprocess": "deeplab_rgb"}
    assert info["classifier"] == {"arch": "deeplabv2", "num_classes": 21,
                                  "rates": [6, 12, 18, 24], "effective_rates": [6, 12]}


def test_deeplabv2_stem_with_ceil_pool_matches_numpy(deeplab_r101):
    state, *_, model = deeplab_r101
    img = image(20, 24)  # conv1 gives 10x12: ceil mode adds a row and a column
    x = model.normalize(img[None])
    np.testing.assert_allclose(x[0], img - DEEPLAB_MEAN_RGB, atol=1e-4)
    got = model.blocks["stem"](x, training=False)[0]
    want = np_stem((img - DEEPLAB_MEAN_RGB).astype("float64"), state, ceil_mode=True)
    assert tuple(got.shape[:2]) == (6, 7) == want.shape[:2]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_deeplabv2_output_stride_8_size_follows_ceil_pool(deeplab_r101):
    *_, model = deeplab_r101
    feats = model.features(image(40, 40)[None])
    # Res_Deeplab: conv1 20 -> ceil pool 11 -> layer2 (stride on the 1x1) 6; floor would be 5
    stem = pool_size(conv_size(40, 7, 2, 3), True)
    assert stem == 11
    assert tuple(feats["stage4"].shape[1:3]) == (conv_size(stem, 1, 2, 0),) * 2 == (6, 6)


def test_deeplabv2_classifier_rates_6_12_is_sum_of_two_convs(deeplab_r101):
    state, *_, model = deeplab_r101
    assert model.head.rates == (6, 12)
    x = np.random.RandomState(4).uniform(0, 1, (14, 15, 2048)).astype("float32")
    got = model.head({"stage4": x[None]})[0]
    want = sum(np_conv(x, state[f"layer5.conv2d_list.{k}.weight"], pad=rate, dilation=rate,
                       bias=state[f"layer5.conv2d_list.{k}.bias"])
               for k, rate in ((0, 6), (1, 12)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_classifier_loads_only_where_it_fits(deeplab_r101):
    state, output, *_ = deeplab_r101

    def head(classes, rates):
        layer = DeepLabV2Head(classes, rates=rates)
        layer.build({"stage4": (None, None, None, 2048)})
        return layer

    four = head(21, (6, 12, 18, 24))
    assert convert.load_classifier(output, four) == (True, None)
    np.testing.assert_array_equal(four.branches[3].kernel.numpy(),
                                  state["layer5.conv2d_list.3.weight"].transpose(2, 3, 1, 0))
    loaded, reason = convert.load_classifier(output, head(19, (6, 12)))
    assert not loaded and "21-class" in reason and "19 classes" in reason
    loaded, reason = convert.load_classifier(output, head(21, (6, 36)))
    assert not loaded and "rate(s) 36" in reason


# -- mapping tables and failures ------------------------------------------------------------
def test_resnet101_names_map_onto_the_kssl_backbone():
    table = convert.resnet_table(101)
    assert len(table) == 520 and len({r.torch_name for r in table}) == 520
    from kssl.models.checkpoints.loading import weighted_leaf_layers as _weighted_leaf_layers

    backbone = models.build_backbone("resnet101", output_stride=8)
    layers = _weighted_leaf_layers([b.layer for b in backbone.blocks])
    expected = {(name, v.name) for name, layer in layers.items() for v in layer.weights}
    mapped = {(r.layer, r.variable) for r in table}
    # Every Keras variable but the conv biases (PyTorch's convs have none) is mapped.
    assert expected - mapped == {(n, "bias") for n in layers if n.endswith("_conv")}
    assert mapped <= expected
    for row in table:  # shapes agree once transposed to Keras
        shape = tuple(layers[row.layer].__getattribute__(row.variable).shape)
        torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
        assert torch_shape == row.shape, row.torch_name


def lazy_state(depth, prefix="", classes=None):
    """A state dict of zero-stride arrays (no memory), for mapping-only checks."""
    state = {prefix + r.torch_name: np.broadcast_to(np.float32(0), r.shape)
             for r in convert.resnet_table(depth)}
    if classes:
        for k in range(4):
            state[f"{prefix}layer5.conv2d_list.{k}.weight"] = np.broadcast_to(
                np.float32(0), (classes, 2048, 3, 3))
            state[f"{prefix}layer5.conv2d_list.{k}.bias"] = np.zeros(classes, "float32")
    return state


def test_deeplabv2_names_with_and_without_prefix():
    for prefix in ("", "Scale."):
        conversion = convert.convert_state_dict(lazy_state(101, prefix, classes=21),
                                                "deeplabv2_resnet101")
        assert conversion.classifier["num_classes"] == 21
        assert conversion.backbone_weights["conv5_block3_3_bn"]["moving_variance"].shape \
            == (2048,)
    state = lazy_state(101, "Scale.", classes=21)
    del state["Scale.layer5.conv2d_list.1.bias"]
    with pytest.raises(convert.ConversionError, match="'Scale.layer5.conv2d_list.1.bias'"):
        convert.convert_state_dict(state, "deeplabv2_resnet101")
    backbone_only = convert.convert_state_dict(lazy_state(101), "deeplabv2_resnet101")
    assert backbone_only.classifier is None


def test_wrong_layout_hints():
    conversion = convert.convert_state_dict(lazy_state(101, classes=21),
                                            "resnet101_torchvision")
    assert any("deeplabv2_resnet101" in note for note in conversion.report.notes)
    assert len(conversion.report.unused) == 8


def test_missing_and_misshaped_tensors_fail_naming_them(tmp_path):
    state = resnet_state(50, seed=5)
    del state["layer2.3.bn1.running_var"]
    source, output = str(tmp_path / "missing.pth"), str(tmp_path / "out.weights.h5")
    torch_files.write_zip_checkpoint(source, state)
    with pytest.raises(convert.ConversionError, match="missing tensor 'layer2.3.bn1.running_var'"):
        convert_quietly(source, "resnet50_torchvision", output)
    assert not os.path.exists(output)
    with pytest.raises(convert.ConversionError, match="resnet50_torchvision.*no expected name"):
        convert.convert_state_dict({"encoder.weight": np.zeros(3, "float32")},
                                   "resnet50_torchvision")
    with pytest.raises(convert.ConversionError, match="unknown arch 'resnet18'"):
        convert_quietly(source, "resnet18", output)


def test_cli_fails_with_one_line_naming_the_tensor(tmp_path):
    state = resnet_state(50, seed=6)
    state["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1), "float32")
    source, output = str(tmp_path / "bad.pth"), str(tmp_path / "bad.weights.h5")
    torch_files.write_legacy_checkpoint(source, state)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "convert_weights"), "--from", source,
         "--arch", "resnet50_torchvision", "--output", output],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "'layer3.0.conv2.weight' has shape (256, 256, 1, 1), expected (256, 256, 3, 3)" \
        in errors[0]
    assert not os.path.exists(output)


def test_efficientnet_lite0_dispatches_to_its_backbone_module(tmp_path):
    lite = pytest.importorskip("kssl.models.backbones.efficientnet_lite")
    reference = lite.efficientnet_lite0_classifier(None)
    rng = np.random.RandomState(7)
    state = {}
    for name, variable, transform in lite.torch_targets(reference.block_layers, reference.fc):
        shape = tuple(variable.shape)
        order = lite._INVERSE.get(transform)
        state[name] = rng.uniform(0.5, 1.0, tuple(shape[a] for a in order) if order else shape
                                  ).astype("float32")
    state["_bn0.num_batches_tracked"] = np.array(3, "int64")
    source, output = str(tmp_path / "lite0.pth"), str(tmp_path / "lite0.weights.h5")
    torch_files.write_zip_checkpoint(source, state)
    report, printed = convert_quietly(source, "efficientnet_lite0", output)
    assert len(report.converted) == len(state) - 1
    assert report.skipped == ["_bn0.num_batches_tracked"] and "wrote" in printed
    backbone = models.build_backbone("efficientnet_lite0", weights=output, output_stride=32)
    stem = backbone.blocks[0].layer
    np.testing.assert_array_equal(stem.conv_stem.kernel.numpy(),
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
