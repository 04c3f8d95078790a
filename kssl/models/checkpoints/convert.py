"""PyTorch state dicts -> kssl weight files, name by name, with shape checks.

Architectures (`ARCHS`):

  resnet50_torchvision, resnet101_torchvision
      torchvision's ResNet (v1.5: the stride of a stage sits on the 3x3 conv). The
      converted weights need `stride_on="3x3"` and `preprocess="torchvision"` (RGB / 255,
      ImageNet mean and std); the max pool is torchvision's (`stem_pool="floor"`).
  deeplabv2_resnet101
      `Res_Deeplab` / `ResNetDeepLab` of the PyTorch DeepLab-v2 code (AdvSemiSeg, ClassMix,
      CutMix-seg, the three-stage code): a Caffe ResNet-101 (the stride on the first 1x1
      conv, max pool with `ceil_mode=True`) and the ASPP classifier `layer5` (3x3 convs with
      rates 6, 12, 18, 24). Names with or without the `Scale.` prefix of the
      `MS_DeepLab_resnet_pretrained_COCO_init.pth` files. The weights need
      `stem_pool="ceil"` and `preprocess="deeplab_rgb"` (RGB minus (122.675, 116.669,
      104.008), no std: what that code feeds the network). The released code's classifier
      returns after adding the second branch, so only the rate-6 and rate-12 convs count:
      build with `aspp_rates=(6, 12)` to reproduce its numbers; the default four rates are
      the paper's.
  efficientnet_lite0
      mapped by the EfficientNet-Lite0 backbone module (`torch_targets`,
      `load_torch_state_dict`) into its ImageNet classifier, written with Keras
      `save_weights`: the `.weights.h5` that `efficientnet_lite0(weights=...)` reads. (That
      backbone also reads the `.pth` directly; converting once skips the pickle reading.)

Naming (ResNet, `L` = 1..4 is PyTorch's `layerL`, `i` its block index; Keras names are
keras.applications', which kssl's ResNet uses):

  conv1.weight                          -> conv1_conv/kernel
  bn1.{weight,bias,running_mean,running_var}
                                        -> conv1_bn/{gamma,beta,moving_mean,moving_variance}
  layerL.i.convJ.weight  (J = 1, 2, 3)  -> conv{L+1}_block{i+1}_J_conv/kernel
  layerL.i.bnJ.*                        -> conv{L+1}_block{i+1}_J_bn/*
  layerL.0.downsample.0.weight          -> conv{L+1}_block1_0_conv/kernel
  layerL.0.downsample.1.*               -> conv{L+1}_block1_0_bn/*
  layer5.conv2d_list.k.{weight,bias}    -> head aspp_k/{kernel,bias}   (DeepLab-v2 only)

Conv kernels are transposed from (out, in, kh, kw) to (kh, kw, in, out); the Keras convs
have biases the PyTorch ones lack, which are set to zero (a BN follows every one).
`num_batches_tracked` counters are skipped; any other tensor no row names is reported as
unused (torchvision's `fc.*`, for instance). A missing or mis-shaped tensor is an error
naming it.

The output file (HDF5, `.weights.h5` by convention) holds the weights keyed by kssl layer
name, not in Keras's positional `save_weights` layout, so it loads into any ResNet layout
of the right depth by name:
  attrs["kssl_converted_weights"]   JSON: arch, backbone, layout {stride_on, stem_pool,
                                    preprocess}, classifier {num_classes, rates,
                                    effective_rates} or null, source, counts, unused names
  backbone/<layer>/<variable>       e.g. backbone/conv4_block6_2_conv/kernel
  classifier/aspp_<k>/{kernel,bias} with attrs["rate"]
`model.weights = 'FILE.weights.h5'` (or `build_segmenter(weights=...)`) builds the backbone
in the recorded layout and loads it; see `kssl.models.backbones.resnet.resolve_layout`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from kssl.models.backbones.resnet import STAGE_DEPTHS, STAGE_FILTERS
# The file format is shared with the reading side; read_info and the loaders are re-exported
# so a converted file is written and read through one module.
from kssl.models.checkpoints.loading import (BACKBONE_GROUP, CLASSIFIER_GROUP, FORMAT_VERSION,
                                             INFO_ATTR, load_backbone_weights,
                                             load_classifier, read_info)

DEEPLABV2_RATES = (6, 12, 18, 24)
# The PyTorch DeepLab-v2 classifier returns inside its loop after the second branch.
DEEPLABV2_EFFECTIVE_RATES = (6, 12)
DEEPLABV2_PREFIX = "Scale."
BN_VARIABLES = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                ("running_var", "moving_variance"))
SKIPPED_SUFFIX = ".num_batches_tracked"


class ConversionError(ValueError):
    """A state dict that does not fit the architecture; the message is one line and names
    the offending tensor."""


@dataclasses.dataclass(frozen=True)
class TensorRow:
    """One row of a naming table: PyTorch tensor -> Keras layer variable.

    shape: the PyTorch shape the architecture expects.
    """

    torch_name: str
    layer: str
    variable: str
    shape: tuple


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: converted (PyTorch name, "layer/variable", shape) rows,
    unused tensors (name, shape), skipped BN counters, the classifier, layout and notes."""

    arch: str
    backbone: str
    layout: dict
    converted: list = dataclasses.field(default_factory=list)
    unused: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    classifier: dict | None = None
    zero_biases: int = 0
    notes: list = dataclasses.field(default_factory=list)
    source: str | None = None
    output: str | None = None

    def format(self, verbose: bool = False) -> str:
        """The report as text: a summary, every unused tensor, and (verbose) every row."""
        lines = [f"converted {self.arch}" + (f" from {self.source}" if self.source else "")]
        trunk = [row for row in self.converted if not row[1].startswith("head/")]
        layers = len({row[1].split("/")[0] for row in trunk})
        lines.append(f"  backbone {self.backbone}: {len(trunk)} tensors -> {layers} layers"
                     + (f"; {self.zero_biases} conv biases set to 0 (PyTorch convs have "
                        "none)" if self.zero_biases else ""))
        if self.classifier:
            c = self.classifier
            lines.append(f"  classifier: {len(self.converted) - len(trunk)} tensors -> "
                         f"{len(c['rates'])} ASPP branches (rates "
                         f"{', '.join(map(str, c['rates']))}), {c['num_classes']} classes")
        lines.append("  layout: " + " ".join(f"{k}={v}" for k, v in sorted(self.layout.items())))
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)} BN batch counters "
                         "(num_batches_tracked)")
        lines.append(f"  unused tensors: {len(self.unused)}")
        lines += [f"    {name} {tuple(shape)}" for name, shape in self.unused]
        lines += [f"  note: {note}" for note in self.notes]
        if verbose:
            lines.append("  mapping:")
            lines += [f"    {name} {tuple(shape)} -> {target}"
                      for name, target, shape in self.converted]
        if self.output:
            lines.append(f"  wrote {self.output}")
        return "\n".join(lines)


@dataclasses.dataclass
class Conversion:
    """A converted state dict in Keras terms, not yet written.

    backbone_weights: layer name -> {variable name: array in Keras shape}.
    classifier: None, or {"num_classes", "rates", "branches": [(kernel, bias), ...]}.
    model: for archs whose backbone module converts into a built Keras model (Lite0), that
      model (saved with Keras `save_weights`); backbone_weights is then empty.
    """

    arch: str
    backbone: str
    layout: dict
    backbone_weights: dict
    classifier: dict | None
    report: ConversionReport
    model: object = None


# -- naming tables ------------------------------------------------------------------------
def resnet_table(depth: int) -> list[TensorRow]:
    """The PyTorch -> Keras rows of a ResNet-`depth` trunk (torchvision and DeepLab-v2 use
    the same names and shapes; only where the stride and the pool act differs)."""
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth}; known: {sorted(STAGE_DEPTHS)}")
    rows = [TensorRow("conv1.weight", "conv1_conv", "kernel", (64, 3, 7, 7))]
    rows += _bn_rows("bn1", "conv1_bn", 64)
    channels = 64
    for stage, (blocks, filters) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_FILTERS)):
        for i in range(blocks):
            torch_block = f"layer{stage + 1}.{i}"
            keras_block = f"conv{stage + 2}_block{i + 1}"
            shapes = {1: (filters, channels, 1, 1), 2: (filters, filters, 3, 3),
                      3: (4 * filters, filters, 1, 1)}
            for j in (1, 2, 3):
                rows.append(TensorRow(f"{torch_block}.conv{j}.weight", f"{keras_block}_{j}_conv",
                                      "kernel", shapes[j]))
                rows += _bn_rows(f"{torch_block}.bn{j}", f"{keras_block}_{j}_bn", shapes[j][0])
            if i == 0:
                rows.append(TensorRow(f"{torch_block}.downsample.0.weight",
                                      f"{keras_block}_0_conv", "kernel",
                                      (4 * filters, channels, 1, 1)))
                rows += _bn_rows(f"{torch_block}.downsample.1", f"{keras_block}_0_bn",
                                 4 * filters)
            channels = 4 * filters
    return rows


def _bn_rows(torch_prefix: str, layer: str, channels: int) -> list[TensorRow]:
    return [TensorRow(f"{torch_prefix}.{t}", layer, k, (channels,)) for t, k in BN_VARIABLES]


def deeplabv2_classifier_table(num_classes: int, branches: int = len(DEEPLABV2_RATES),
                               in_channels: int = 2048) -> list[TensorRow]:
    """Rows of the DeepLab-v2 ASPP classifier `layer5` (branch k -> head layer aspp_k)."""
    rows = []
    for k in range(branches):
        rows.append(TensorRow(f"layer5.conv2d_list.{k}.weight", f"aspp_{k}", "kernel",
                              (num_classes, in_channels, 3, 3)))
        rows.append(TensorRow(f"layer5.conv2d_list.{k}.bias", f"aspp_{k}", "bias",
                              (num_classes,)))
    return rows


# -- conversion ---------------------------------------------------------------------------
def _to_keras(row: TensorRow, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        raise ConversionError(f"tensor {row.torch_name!r} has dtype {value.dtype}, expected "
                              "floating point")
    value = value.astype("float32")
    # PyTorch conv kernels are (out, in, kh, kw); Keras wants (kh, kw, in, out).
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if value.ndim == 4 else value


def _take(rows: Iterable[TensorRow], tensors: Mapping[str, np.ndarray],
          display: Callable[[str], str], arch: str) -> dict:
    """{(layer, variable): Keras array} for `rows`, failing on the first missing or
    mis-shaped tensor with its name (and how many more are missing)."""
    rows = list(rows)
    missing = [r for r in rows if r.torch_name not in tensors]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = ""
        if len(missing) == len(rows):
            sample = ", ".join(list(tensors)[:3])
            hint = f"; no expected name is in the file, whose names look like: {sample}"
        raise ConversionError(f"missing tensor {display(first.torch_name)!r}{more} for "
                              f"{arch} (expected shape {first.shape}){hint}")
    out = {}
    for row in rows:
        value = tensors[row.torch_name]
        if tuple(value.shape) != tuple(row.shape):
            raise ConversionError(f"tensor {display(row.torch_name)!r} has shape "
                                  f"{tuple(value.shape)}, expected {row.shape} for {arch} "
                                  f"({row.layer}/{row.variable})")
        out[(row.layer, row.variable)] = _to_keras(row, value)
    return out


def _strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str):
    """(names without `prefix`, function giving a stripped name's spelling in the file;
    a name the file lacks is spelt as the file spells its others, so errors quote it as
    the user would search for it)."""
    stripped, original = {}, {}
    for name, value in state_dict.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short in stripped:
            raise ConversionError(f"tensors {original[short]!r} and {name!r} both map to "
                                  f"{short!r}")
        stripped[short] = value
        original[short] = name
    prefixed = any(name.startswith(prefix) for name in state_dict)
    return stripped, lambda short: original.get(short, prefix + short if prefixed else short)


def _convert_resnet(state_dict: Mapping[str, np.ndarray], arch: str, depth: int,
                    layout: dict, classifier: bool, prefix: str = "") -> Conversion:
    tensors, display = _strip_prefix(state_dict, prefix) if prefix else (
        dict(state_dict), lambda n: n)
    rows = resnet_table(depth)
    taken = _take(rows, tensors, display, arch)
    used = {r.torch_name for r in rows}
    report = ConversionReport(arch=arch, backbone=f"resnet{depth}", layout=dict(layout))
    report.converted = [(display(r.torch_name), f"{r.layer}/{r.variable}", r.shape)
                        for r in rows]
    weights: dict[str, dict[str, np.ndarray]] = {}
    for (layer, variable), value in taken.items():
        weights.setdefault(layer, {})[variable] = value
    for layer, variables in weights.items():
        if "kernel" in variables and "bias" not in variables:
            variables["bias"] = np.zeros(variables["kernel"].shape[-1], "float32")
            report.zero_biases += 1
    head = None
    if classifier:
        head = _convert_deeplabv2_classifier(tensors, display, arch, report)
        if head is not None:
            used |= {r.torch_name for r in deeplabv2_classifier_table(
                head["num_classes"], len(head["rates"]))}
    for name, value in tensors.items():
        if name in used:
            continue
        if name.endswith(SKIPPED_SUFFIX):
            report.skipped.append(display(name))
        else:
            report.unused.append((display(name), tuple(np.shape(value))))
    _add_hints(report, arch)
    return Conversion(arch=arch, backbone=report.backbone, layout=dict(layout),
                      backbone_weights=weights, classifier=head, report=report)


_BRANCH = re.compile(r"^layer5\.conv2d_list\.(\d+)\.(weight|bias)$")


def _convert_deeplabv2_classifier(tensors, display, arch, report) -> dict | None:
    """The `layer5` ASPP branches as Keras arrays; None when the file has no classifier."""
    indices = sorted({int(m.group(1)) for m in map(_BRANCH.match, tensors) if m})
    if not indices:
        report.notes.append("the file holds no ASPP classifier (layer5): the head of a "
                            "model built from it starts from scratch")
        return None
    if indices[-1] >= len(DEEPLABV2_RATES):
        raise ConversionError(f"tensor {display(f'layer5.conv2d_list.{indices[-1]}.weight')!r}"
                              f": the DeepLab-v2 classifier has {len(DEEPLABV2_RATES)} "
                              f"branches (rates {DEEPLABV2_RATES})")
    branches = indices[-1] + 1
    first = tensors.get("layer5.conv2d_list.0.weight")
    if first is None or np.ndim(first) != 4:
        raise ConversionError(f"missing tensor {display('layer5.conv2d_list.0.weight')!r} "
                              f"for {arch} (the classifier's first branch)")
    num_classes = int(np.shape(first)[0])
    rows = deeplabv2_classifier_table(num_classes, branches)
    taken = _take(rows, tensors, display, arch)
    report.converted += [(display(r.torch_name), f"head/{r.layer}/{r.variable}", r.shape)
                         for r in rows]
    rates = list(DEEPLABV2_RATES[:branches])
    report.classifier = {"num_classes": num_classes, "rates": rates,
                         "effective_rates": [r for r in rates if r in DEEPLABV2_EFFECTIVE_RATES]}
    report.notes.append("the released PyTorch DeepLab-v2 code sums only the rate-6 and "
                        "rate-12 branches (its loop returns early): build the model with "
                        "aspp_rates=(6, 12) (gin: model.aspp_rates = (6, 12)) to reproduce "
                        "its numbers, or keep the paper's four rates")
    return {"num_classes": num_classes, "rates": rates,
            "branches": [(taken[(f"aspp_{k}", "kernel")], taken[(f"aspp_{k}", "bias")])
                         for k in range(branches)]}


def _add_hints(report: ConversionReport, arch: str) -> None:
    """Notes for files that look like the other ResNet layout: the shapes are the same, so
    only the leftover names can tell."""
    names = {name for name, _ in report.unused}
    if arch.endswith("_torchvision") and any(_BRANCH.match(n.split(DEEPLABV2_PREFIX)[-1])
                                             for n in names):
        report.notes.append("the file holds a DeepLab-v2 classifier (layer5.conv2d_list): "
                            "if it is a Res_Deeplab checkpoint, convert it with --arch "
                            "deeplabv2_resnet101 (stride on the 1x1 conv, ceil-mode pool)")
    if arch.startswith("deeplabv2") and {"fc.weight", "fc.bias"} & names:
        report.notes.append("the file holds a classification layer (fc): if it is a "
                            "torchvision ResNet, convert it with --arch resnet101_torchvision "
                            "(stride on the 3x3 conv)")


def _resnet_torchvision(depth: int):
    layout = {"stride_on": "3x3", "stem_pool": "floor", "preprocess": "torchvision"}

    def convert(state_dict, arch):
        return _convert_resnet(state_dict, arch, depth, layout, classifier=False)
    return convert


def _deeplabv2(depth: int):
    layout = {"stride_on": "1x1", "stem_pool": "ceil", "preprocess": "deeplab_rgb"}

    def convert(state_dict, arch):
        return _convert_resnet(state_dict, arch, depth, layout, classifier=True,
                               prefix=DEEPLABV2_PREFIX)
    return convert


LITE0_MODULE = "kssl.models.backbones.efficientnet_lite"
LITE0_FUNCTIONS = ("efficientnet_lite0_classifier", "torch_targets", "load_torch_state_dict")


def _efficientnet_lite0(state_dict, arch):
    """Lite0 through its backbone module's own name-by-name loader (strict: a missing,
    mis-shaped or foreign tensor fails naming it), into its ImageNet classifier."""
    try:
        lite = importlib.import_module(LITE0_MODULE)
    except ImportError as error:
        raise ConversionError(f"arch {arch!r} needs {LITE0_MODULE} ({error})") from None
    absent = [f for f in LITE0_FUNCTIONS if not hasattr(lite, f)]
    if absent:
        raise ConversionError(f"arch {arch!r}: {LITE0_MODULE} lacks {', '.join(absent)}")
    model = lite.efficientnet_lite0_classifier(None)
    # Without `_fc.*` (a backbone-only file) the classifier's dense layer stays random; a
    # backbone built from the file never reads it.
    dense = model.fc if "_fc.weight" in state_dict else None
    try:
        skipped = lite.load_torch_state_dict(model.block_layers, state_dict, dense=dense,
                                             source="state dict")
    except ValueError as error:
        raise ConversionError(str(error)) from None
    report = ConversionReport(arch=arch, backbone="efficientnet_lite0",
                              layout={"preprocess": "lite (x - 127) / 128"})
    for name, variable, _ in lite.torch_targets(model.block_layers, dense):
        report.converted.append((name, variable.path, tuple(np.shape(state_dict[name]))))
    for name in skipped:
        if name.endswith(SKIPPED_SUFFIX):
            report.skipped.append(name)
        else:
            report.unused.append((name, tuple(np.shape(state_dict[name]))))
    if dense is None:
        report.notes.append("no _fc.* tensors: the file's ImageNet classifier layer is "
                            "random (backbones built from it do not use it)")
    return Conversion(arch=arch, backbone="efficientnet_lite0", layout=report.layout,
                      backbone_weights={}, classifier=None, report=report, model=model)


ARCHS = {
    "resnet50_torchvision": _resnet_torchvision(50),
    "resnet101_torchvision": _resnet_torchvision(101),
    "deeplabv2_resnet101": _deeplabv2(101),
    "efficientnet_lite0": _efficientnet_lite0,
}


def known_archs() -> list[str]:
    """Every architecture name `convert_state_dict` accepts."""
    return sorted(ARCHS)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str) -> Conversion:
    """Maps a PyTorch state dict ({name: numpy array}) onto kssl's layers for `arch`.

    The ResNet archs are pure numpy (nothing is built); efficientnet_lite0 builds its
    classifier. Raises ConversionError naming the first missing or mis-shaped tensor;
    unused tensors are listed in the result's report.
    """
    if arch not in ARCHS:
        raise ConversionError(f"unknown arch {arch!r}; known: {', '.join(known_archs())}")
    return ARCHS[arch](state_dict, arch)


# -- the weight file ----------------------------------------------------------------------
def save_conversion(conversion: Conversion, path: str, source: str | None = None) -> None:
    """Writes `conversion` to `path` (HDF5, layout in the module docstring).

    Written to a temporary name first and renamed, so a failure leaves no partial file.
    """
    import h5py

    path = os.fspath(path)
    if conversion.model is not None:
        if not path.endswith(".weights.h5"):
            raise ConversionError(f"{conversion.arch} is written with Keras save_weights: "
                                  f"the output name must end in .weights.h5, got {path!r}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = path[:-len(".weights.h5")] + ".partial.weights.h5"
        try:
            conversion.model.save_weights(partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return
    info = {"format_version": FORMAT_VERSION, "arch": conversion.arch,
            "backbone": conversion.backbone, "layout": conversion.layout,
            "source": source, "converted_tensors": len(conversion.report.converted),
            "unused_tensors": [name for name, _ in conversion.report.unused]}
    if conversion.classifier is not None:
        c = conversion.classifier
        info["classifier"] = {"arch": "deeplabv2", "num_classes": c["num_classes"],
                              "rates": c["rates"],
                              "effective_rates": [r for r in c["rates"]
                                                  if r in DEEPLABV2_EFFECTIVE_RATES]}
    else:
        info["classifier"] = None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = path + ".partial"
    try:
        with h5py.File(partial, "w") as f:
            f.attrs[INFO_ATTR] = json.dumps(info)
            group = f.create_group(BACKBONE_GROUP)
            for layer, variables in conversion.backbone_weights.items():
                for variable, value in variables.items():
                    group.create_dataset(f"{layer}/{variable}", data=value)
            if conversion.classifier is not None:
                group = f.create_group(CLASSIFIER_GROUP)
                for k, (rate, (kernel, bias)) in enumerate(
                        zip(conversion.classifier["rates"], conversion.classifier["branches"])):
                    branch = group.create_group(f"aspp_{k}")
                    branch.attrs["rate"] = rate
                    branch.create_dataset("kernel", data=kernel)
                    branch.create_dataset("bias", data=bias)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def convert_file(source: str, arch: str, output: str, key: str | None = None) -> ConversionReport:
    """Reads a PyTorch checkpoint (no torch needed), converts it for `arch`, writes `output`.

    key: the checkpoint entry holding the state dict, if the automatic unwrapping of
      {"state_dict": ...} / {"model": ...} does not find it.
    Returns the report (its `format()` is what bin/convert_weights prints).
    """
    from kssl.models.checkpoints.torch_reader import read_state_dict

    if arch not in known_archs():  # before reading what may be a large file
        raise ConversionError(f"unknown arch {arch!r}; known: {', '.join(known_archs())}")
    if not os.fspath(output).endswith(".h5"):
        raise ConversionError(f"--output must be an HDF5 file name (FILE.weights.h5), "
                              f"got {output!r}")
    state_dict = read_state_dict(source, key=key)
    conversion = convert_state_dict(state_dict, arch)
    save_conversion(conversion, output, source=os.path.basename(os.fspath(source)))
    conversion.report.source = os.fspath(source)
    conversion.report.output = os.fspath(output)
    return conversion.report


__all__ = ["ARCHS", "Conversion", "ConversionError", "ConversionReport", "TensorRow",
           "convert_file", "convert_state_dict", "deeplabv2_classifier_table", "known_archs",
           "load_backbone_weights", "load_classifier", "read_info", "resnet_table",
           "save_conversion"]
