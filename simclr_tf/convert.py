"""The released SimCLR v1/v2 weights as simclr_tf runs: converting the original TF2 code's
checkpoints and SavedModels.

    python -m simclr_tf.convert --source=PATH --model_dir=OUT [--image_size=224]
        [--dataset=imagenet2012] [--train_mode=pretrain|finetune --ft_proj_selector=J]

PATH is what the original code (google-research/simclr, `tf2/`) writes and Google released under
gs://simclr-checkpoints-tf2/: a checkpoint (a directory with a `checkpoint` file, or a prefix) or
a SavedModel (`<model_dir>/saved_model/<step>/`, or its parent, which means the newest step).
OUT becomes an ordinary run directory: `config.json`, a checkpoint `ckpt-<step>` holding f, g and
the supervised head (the linear probe of a pretrained model, the classifier of a fine-tuned one)
and `converted_from.json` saying what was read and what was inferred.

How the original's variables are found: both formats carry TensorFlow's object graph (the
SavedModel's `variables/variables` is a checkpoint too). Its variables are reached from the root
through the attributes of the original's layers (`model/resnet_model/block_groups/1/layers/0/
conv_relu_dropblock_layers/3/conv2d/kernel`), whatever key the value is stored under (a
SavedModel stores its trainable variables under `trainable_variables_list/<i>`). Each list of
the original's layers is read in index order, conv and batch norm alternating, and paired with
the layers of `resnet.resnet` of the same role; the architecture (depth, width, SK, SE, stem,
head, classes) is read off the shapes. What the weights cannot say (the image size, whether the
supervised head was fine-tuned, which head layer it reads) comes from flags, and is logged.
Any variable that maps to nothing, or a shape that disagrees, is a one-line `ConversionError`.
"""

import dataclasses
import json
import os
import re
import shutil

import tensorflow as tf

from simclr_tf import checkpoints
from simclr_tf import cli
from simclr_tf import config as config_lib
from simclr_tf import models
from simclr_tf import rundir
from simclr_tf.classifier import build_classifier
from simclr_tf.errors import first_line
from simclr_tf.resnet import DEPTHS

CONVERTED_FROM = "converted_from.json"
RELEASED = "gs://simclr-checkpoints-tf2/"
# The attribute names of the original's layers that lead to its variables (its Keras layers'
# SavedModel bookkeeping, such as `variables` or `keras_api`, is not followed).
_STRUCTURE = {
    "model", "resnet_model", "initial_conv_relu_max_pool", "block_groups",
    "conv_relu_dropblock_layers", "conv2d_bn_layers", "projection_layers", "shortcut_layers",
    "se_layer", "se_reduce", "se_expand", "conv2d", "bn", "conv2d_fixed_padding",
    "batch_norm_relu", "batch_norm_relu_1", "conv2d_0", "conv2d_1", "_projection_head",
    "linear_layers", "bn_relu", "dense", "supervised_head", "linear_layer",
    "kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"}
_STEM = re.compile(r"model/resnet_model/initial_conv_relu_max_pool/(\d+)/(conv2d|bn)/(\w+)")
_BLOCK = re.compile(r"model/resnet_model/block_groups/(\d+)/layers/(\d+)/(\w+)/(.+)")
_HEAD = re.compile(r"model/_projection_head/linear_layers/(\d+)/(dense|bn_relu/bn)/(\w+)")
_SUPERVISED = re.compile(r"model/supervised_head/linear_layer/dense/(kernel|bias)")
# The original's SK_Conv2D parts and the layers of resnet.selective_kernel they are.
_SK_PARTS = {"conv2d_fixed_padding/conv2d": "_2sk_conv", "batch_norm_relu/bn": "_2sk_bn",
             "conv2d_0": "_2sk_fc_conv", "batch_norm_relu_1/bn": "_2sk_fc_bn",
             "conv2d_1": "_2sk_mix"}


class ConversionError(ValueError):
    """The source cannot be converted; the message is one line saying why and what to do."""


@dataclasses.dataclass(frozen=True)
class Original:
    """The original model's variables: {path: checkpoint key}, read through `reader`."""
    source: str
    kind: str  # "checkpoint" or "saved_model"
    prefix: str
    step: int  # 0: unknown
    keys: dict
    reader: object
    shapes: dict  # {checkpoint key: shape}

    def shape(self, path):
        return tuple(self.shapes[self.keys[path]])

    def value(self, path):
        return _read(self.reader, self.keys[path], self.source)


def _read(reader, key, source):
    """The tensor `key` of a checkpoint; ConversionError when its data cannot be read (a
    truncated data file reads short: IndexError)."""
    try:
        return reader.get_tensor(key)
    except (tf.errors.OpError, ValueError, IndexError) as e:
        raise ConversionError(f"cannot read {key} from {source} ({first_line(e)}): is it "
                              "truncated or damaged? fetch it again") from None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the original's variables say about its model."""
    resnet_depth: int
    width_multiplier: int
    sk_ratio: float
    se_ratio: float
    cifar_stem: bool
    proj_head_mode: str
    num_proj_layers: int
    proj_out_dim: int
    num_classes: int  # of the supervised head; 0 without one
    supervised_input_dim: int
    h_dim: int  # width of h
    notes: tuple = ()  # what was chosen where the weights allow several settings


# --------------------------------------------------------------------------------------------
# Reading the source.

def read_source(source):
    """The `Original` at `source`: a checkpoint directory or prefix, or a SavedModel directory
    (or the `saved_model/` directory above the original's numbered exports: the newest)."""
    source = str(source).rstrip("/")
    if not tf.io.gfile.exists(source) and not tf.io.gfile.exists(f"{source}.index"):
        raise ConversionError(f"--source={source} does not exist")
    kind, prefix, step, source = _locate(source)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise ConversionError(f"cannot read {kind} {source} ({first_line(e)}): is it truncated "
                              "or damaged? fetch it again") from None
    try:
        graph = checkpoints.object_graph(reader)
    except (tf.errors.OpError, ValueError, IndexError) as e:  # truncated data reads short
        raise ConversionError(f"cannot read the object graph from {source} ({first_line(e)}): "
                              "is it truncated or damaged? fetch it again") from None
    if graph is None:
        raise ConversionError(
            f"{source} is a TF1 (name-based) checkpoint, such as the original TF1 code writes: "
            f"this converter reads the TF2 code's checkpoints and SavedModels ({RELEASED}...)")
    top = checkpoints.top_level_names(graph)
    if "model" not in top:
        hint = (" (it is a simclr_tf run already)" if "encoder" in top else "")
        raise ConversionError(
            f"{source} is not a checkpoint of the original SimCLR TF2 code{hint}: it has no "
            f"'model' object (its top-level objects: {', '.join(top[:6]) or 'none'})")
    keys = _variable_paths(graph)
    if not any(p.startswith("model/resnet_model/") for p in keys):
        raise ConversionError(f"{source} holds no model/resnet_model variables: it is not a "
                              "SimCLR model of the original TF2 code")
    if kind == "checkpoint":
        step = _global_step(reader, prefix)
    return Original(source, kind, prefix, step or 0, keys, reader,
                    reader.get_variable_to_shape_map())


def _locate(source):
    """(kind, checkpoint prefix to read, step or None, what is read: the SavedModel directory or
    the checkpoint prefix) of `source`."""
    if tf.io.gfile.isdir(source):
        if tf.io.gfile.exists(os.path.join(source, "tfhub_module.pb")):
            raise ConversionError(
                f"{source} is a TF1 hub module (the original TF1 code's export): convert the TF2 "
                f"checkpoint or SavedModel of the same model ({RELEASED}...) instead")
        if tf.io.gfile.exists(os.path.join(source, "saved_model.pb")):
            prefix = os.path.join(source, "variables", "variables")
            if not tf.io.gfile.exists(f"{prefix}.index"):
                raise ConversionError(f"SavedModel {source} has no variables/variables.index: is "
                                      "it complete?")
            name = os.path.basename(source)
            return "saved_model", prefix, int(name) if name.isdigit() else None, source
        steps = sorted(int(n.strip("/")) for n in tf.io.gfile.listdir(source)
                       if n.strip("/").isdigit()
                       and tf.io.gfile.exists(os.path.join(source, n.strip("/"), "saved_model.pb")))
        if steps:
            return _locate(os.path.join(source, str(steps[-1])))
        prefix = tf.train.latest_checkpoint(source)
        if prefix is None:
            raise ConversionError(
                f"{source} holds neither a checkpoint (no 'checkpoint' file) nor a SavedModel "
                "(no saved_model.pb): pass the original's model_dir, a checkpoint prefix, or "
                "a saved_model/<step> directory")
        return "checkpoint", prefix, None, prefix
    prefix = source[: -len(".index")] if source.endswith(".index") else source
    prefix = re.sub(r"\.data-\d+-of-\d+$", "", prefix)
    if not tf.io.gfile.exists(f"{prefix}.index"):
        raise ConversionError(f"--source={source} is neither a directory nor a checkpoint "
                              f"prefix (no {prefix}.index)")
    return "checkpoint", prefix, None, prefix


def _global_step(reader, prefix):
    """The original checkpoint's `global_step` (the optimiser's iterations), else the number
    at the end of its prefix (`ckpt-1000`), else 0 (unknown)."""
    key = "global_step/.ATTRIBUTES/VARIABLE_VALUE"
    if reader.has_tensor(key):
        return int(reader.get_tensor(key))
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else 0


def _variable_paths(graph):
    """{path of each variable through the original's layer attributes: its checkpoint key}.

    ConversionError if a variable of the model is reachable only through other names (a layer
    this converter does not know): it would otherwise be left behind unnoticed.
    """
    found = checkpoints.variables_below(graph, "model", _is_structural)
    everything = checkpoints.variables_below(graph, "model")
    mapped = {node_id for node_id, _ in found.values()}
    unknown = sorted(path for path, (node_id, _) in everything.items() if node_id not in mapped)
    if unknown:
        raise ConversionError(f"variable {unknown[0]} has no counterpart in simclr_tf's model "
                              f"({len(unknown)} such): is it a SimCLR model of the original "
                              "TF2 code?")
    return {path: key for path, (_, key) in found.items()}


def _is_structural(name, parts):
    """Whether attribute `name` (below the path `parts`) is one of the original's layers or
    variables (not its Keras layers' SavedModel bookkeeping, such as `variables/<i>`; `layers`
    is a BlockGroup's list of blocks only right below `block_groups/<g>`)."""
    if name == "layers":
        return len(parts) >= 2 and parts[-2] == "block_groups"
    return name in _STRUCTURE or name.isdigit()


# --------------------------------------------------------------------------------------------
# Reading the architecture off the shapes.

def infer_architecture(original):
    """The `Architecture` of the original's variables; ConversionError for what does not fit."""
    shapes = {p: original.shape(p) for p in original.keys}
    unknown = [p for p in shapes if not any(r.fullmatch(p) for r in
                                            (_STEM, _BLOCK, _HEAD, _SUPERVISED))]
    if unknown:
        raise ConversionError(f"variable {unknown[0]} of {original.source} has no counterpart in "
                              f"simclr_tf's model ({len(unknown)} such): is it a SimCLR model?")
    blocks = {}
    for p in shapes:
        m = _BLOCK.fullmatch(p)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    counts = tuple(len(blocks.get(g, ())) for g in range(4))
    bottleneck = any("/conv_relu_dropblock_layers/" in p for p in shapes)
    kind = "bottleneck" if bottleneck else "basic"
    depth = next((d for d, (k, c) in DEPTHS.items() if k == kind and c == counts), None)
    if depth is None or len(blocks) != 4:
        raise ConversionError(f"{original.source} has {kind} blocks {counts} per block group: no "
                              f"ResNet depth of {sorted(DEPTHS)} has them")
    stem_convs = sorted((int(m.group(1)), shapes[p]) for p in shapes
                        for m in [_STEM.fullmatch(p)] if m and m.group(3) == "kernel")
    if not stem_convs:
        raise ConversionError(f"{original.source} has no stem (model/resnet_model/"
                              "initial_conv_relu_max_pool) variables: is it complete?")
    width, remainder = divmod(stem_convs[-1][1][-1], 64)
    if remainder or width < 1:
        raise ConversionError(f"the stem of {original.source} ends with "
                              f"{stem_convs[-1][1][-1]} channels, not a multiple of 64")
    sk = any("/conv2d_0/" in p for p in shapes)
    cifar_stem = len(stem_convs) == 1 and stem_convs[0][1][0] == 3
    notes = []
    sk_ratio = _ratio(shapes, "conv2d_0/kernel", "sk_ratio", 0.0625, minimum=32,
                      notes=notes) if sk else 0.0
    # SE is a block's `se_layer` in basic blocks, and the last item of its layer list in
    # bottleneck blocks.
    se_ratio = _ratio(shapes, "/se_reduce/kernel", "se_ratio", 0.25, minimum=1,
                      notes=notes) if any("/se_reduce/" in p for p in shapes) else 0.0
    head_layers = sorted({int(m.group(1)) for p in shapes for m in [_HEAD.fullmatch(p)] if m})
    if head_layers != list(range(len(head_layers))):
        raise ConversionError(f"the projection head of {original.source} has layers "
                              f"{head_layers}: expected 0..n-1")
    n = len(head_layers)
    h_dim = 512 * width * (4 if bottleneck else 1)
    out_dim = shapes[f"model/_projection_head/linear_layers/{n - 1}/dense/kernel"][-1] if n \
        else h_dim
    supervised = shapes.get("model/supervised_head/linear_layer/dense/kernel")
    return Architecture(
        resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio, se_ratio=se_ratio,
        cifar_stem=cifar_stem, proj_head_mode="none" if n == 0 else
        "linear" if n == 1 else "nonlinear", num_proj_layers=n if n >= 2 else 2,
        proj_out_dim=int(out_dim), num_classes=int(supervised[-1]) if supervised else 0,
        supervised_input_dim=int(supervised[0]) if supervised else 0, h_dim=h_dim,
        notes=tuple(notes))


def _ratio(shapes, suffix, name, usual, minimum, notes):
    """The sk_ratio / se_ratio that gives the squeezed widths of every block (width =
    max(int(block width * ratio), minimum), as the original computes it); `usual` when it
    fits, since a minimum width hides the ratio below it."""
    widths = []
    for p, shape in shapes.items():
        if p.endswith(suffix):
            # SK squeezes the sum of its two paths (the block's width); SE squeezes x (a
            # bottleneck's 4x-wide output) by a ratio of the block's width.
            block_width = shape[-2] if name == "sk_ratio" else _se_block_width(p, shapes)
            widths.append((block_width, shape[-1]))

    def fits(r):
        return all(max(int(w * r), minimum) == s for w, s in widths)

    if fits(usual):
        if all(s == minimum for _, s in widths):
            notes.append(f"{name}: every squeezed layer is {minimum} wide, which any {name} up "
                         f"to {usual} gives; recorded as {usual}")
        return usual
    w, s = max(widths)
    for candidate in (s / w, (s + 0.5) / w):
        if fits(candidate):
            return float(candidate)
    raise ConversionError(f"no {name} gives the squeezed widths {sorted(set(widths))} "
                          "(block width, squeezed width) of this model")


def _se_block_width(path, shapes):
    """The width the original's SE_Layer squeezes from: its block's `filters` (the bottleneck's
    inner width: its first conv's output)."""
    block = re.match(r".*/block_groups/\d+/layers/\d+", path).group(0)
    first = [s for p, s in shapes.items()
             if p.startswith(block + "/") and re.search(r"_layers/0/conv2d/kernel$", p)
             and "/projection_layers/" not in p and "/shortcut_layers/" not in p]
    return first[0][-1]


# --------------------------------------------------------------------------------------------
# The mapping onto simclr_tf's layers.

def encoder_pairs(original, encoder):
    """[(original path, simclr_tf variable)] for every encoder variable."""
    layers = {layer.name: layer for layer in encoder.layers}
    pairs = []
    stem_items = _items(original.keys, _STEM, lambda m: (), lambda m: int(m.group(1)))
    names = (["stem"] if len(stem_items[()]) == 2 else ["stem1", "stem2", "stem3"])
    pairs += _pair_conv_bn(stem_items[()], names, layers, original)
    main = _items(original.keys, _BLOCK, lambda m: (int(m.group(1)), int(m.group(2)), m.group(3)),
                  lambda m: int(m.group(4).split("/", 1)[0]) if m.group(4)[0].isdigit() else -1)
    for (g, b, part), items in sorted(main.items()):
        prefix = f"group{g + 1}_block{b + 1}"
        if part in ("conv_relu_dropblock_layers", "conv2d_bn_layers"):
            count = 3 if part == "conv_relu_dropblock_layers" else 2
            names = [f"{prefix}_{i}" for i in range(1, count + 1)]
            squeeze = {i: paths for i, paths in items.items()
                       if any("/se_reduce/" in p or "/se_expand/" in p for p in paths)}
            convs = {i: paths for i, paths in items.items() if i not in squeeze}
            pairs += _pair_conv_bn(convs, names, layers, original, sk_prefix=prefix)
            pairs += _pair_squeeze_excite(sum(squeeze.values(), []), prefix, layers, original)
        elif part in ("projection_layers", "shortcut_layers"):
            pairs += _pair_conv_bn(items, [f"{prefix}_proj"], layers, original)
        elif part == "se_layer":
            pairs += _pair_squeeze_excite(items[-1], prefix, layers, original)
        else:
            raise ConversionError(f"variable {items[min(items)][0]} has no counterpart in "
                                  "simclr_tf's model")
    return pairs


def _pair_squeeze_excite(paths, prefix, layers, original):
    """Pairs an SE layer's se_reduce / se_expand variables with the block's SE layers."""
    pairs = []
    for path in paths:
        sub = re.search(r"/se_(reduce|expand)/", path).group(1)
        pairs.append((path, _weight(layers.get(f"{prefix}_se_{sub}"), path, original)))
    return pairs


def _items(keys, pattern, group_of, index_of):
    """{group: {index: [paths]}} of the paths matching `pattern`, e.g. the items of each of the
    original's layer lists."""
    out = {}
    for path in keys:
        m = pattern.fullmatch(path)
        if m:
            out.setdefault(group_of(m), {}).setdefault(index_of(m), []).append(path)
    return out


def _pair_conv_bn(items, names, layers, original, sk_prefix=None):
    """Pairs a list's items (in index order: conv, bn, conv, bn, ... or an SK item in place of
    a conv and its bn) with the conv/bn layers `names`."""
    pairs, queue = [], [items[i] for i in sorted(items)]
    for name in names:
        if not queue:
            raise ConversionError(f"the original's layer list of {name} is shorter than "
                                  "simclr_tf's block")
        paths = queue.pop(0)
        if any("/conv2d_fixed_padding/" in p for p in paths):  # a selective-kernel conv
            for p in paths:
                rest = p.split("/conv_relu_dropblock_layers/", 1)[1].split("/", 1)[1]
                part = rest.rsplit("/", 1)[0]
                layer = layers.get(f"{sk_prefix}{_SK_PARTS.get(part, '?')}")
                pairs.append((p, _weight(layer, p, original)))
            continue
        conv = layers.get(f"{name}_conv")
        pairs += [(p, _weight(conv, p, original)) for p in paths]
        if not queue:
            raise ConversionError(f"{paths[0]} has no batch norm after it")
        pairs += [(p, _weight(layers.get(f"{name}_bn"), p, original)) for p in queue.pop(0)]
    if queue:
        raise ConversionError(f"{queue[0][0]} has no counterpart in simclr_tf's model")
    return pairs


def head_pairs(original, head):
    """[(original path, variable)] of the projection head g."""
    pairs = []
    for path in original.keys:
        m = _HEAD.fullmatch(path)
        if m:
            j = int(m.group(1))
            layer = (head.dense_layers if m.group(2) == "dense" else head.bn_layers)[j]
            pairs.append((path, _weight(layer, path, original)))
    return pairs


def supervised_pairs(original, dense):
    """[(original path, variable)] of the supervised head, onto the Dense layer `dense`."""
    return [(p, _weight(dense, p, original)) for p in original.keys if _SUPERVISED.fullmatch(p)]


def _weight(layer, path, original):
    """The variable of `layer` the original variable at `path` becomes (same leaf name)."""
    leaf = path.rsplit("/", 1)[-1]
    found = [v for v in (layer.weights if layer is not None else []) if v.name == leaf]
    if not found:
        raise ConversionError(f"variable {path} of {original.source} has no counterpart in "
                              "simclr_tf's model")
    variable = found[0]
    if tuple(variable.shape) != original.shape(path):
        raise ConversionError(f"variable {path} of {original.source} is "
                              f"{list(original.shape(path))} but simclr_tf's "
                              f"{variable.path} is {list(variable.shape)}")
    return variable


def assign_all(original, pairs, parts):
    """Assigns every pair, after checking that each original variable and each variable of
    `parts` ({name: layer}) is used exactly once (but the beta of a batch norm without
    centring, which simclr_tf creates and keeps at zero, and the original has not)."""
    used = [p for p, _ in pairs]
    left = sorted(set(original.keys) - set(used))
    if left:
        raise ConversionError(f"variable {left[0]} of {original.source} has no counterpart in "
                              f"simclr_tf's model ({len(left)} such)")
    targets = {id(v) for _, v in pairs} | _uncentred_betas(parts.values())
    for name, part in parts.items():
        missing = [v.path for v in part.weights if id(v) not in targets]
        if missing:
            raise ConversionError(f"{original.source} has no value for {missing[0]} of the "
                                  f"{name} ({len(missing)} such): the source is incomplete")
    for path, variable in pairs:
        variable.assign(original.value(path))


def _uncentred_betas(parts):
    """ids of the beta variables of batch norms with center=False inside `parts`."""
    found = set()
    for part in parts:
        for layer in getattr(part, "bn_layers", []):
            if not layer.center:
                found.add(id(layer.beta))
    return found


# --------------------------------------------------------------------------------------------
# Writing the run.

def run_config(arch, model_dir, image_size, dataset, train_mode, ft_proj_selector, step,
               data_dir=None):
    """The `RunConfig` of the converted run."""
    config = config_lib.RunConfig(
        # Evaluated (and served) as the original code preprocesses: its bicubic resize.
        data=config_lib.DataConfig(dataset=dataset, image_size=image_size, data_dir=data_dir,
                                   eval_resize="bicubic"),
        encoder=config_lib.EncoderConfig(
            resnet_depth=arch.resnet_depth, width_multiplier=arch.width_multiplier,
            sk_ratio=arch.sk_ratio, se_ratio=arch.se_ratio, cifar_stem=arch.cifar_stem),
        head=config_lib.HeadConfig(proj_head_mode=arch.proj_head_mode,
                                   num_proj_layers=arch.num_proj_layers,
                                   proj_out_dim=arch.proj_out_dim),
        # train_steps: the run ends at its one checkpoint, so --mode=eval does not wait for more.
        train=config_lib.TrainConfig(model_dir=model_dir, train_mode=train_mode, train_steps=step,
                                     lineareval_while_pretraining=bool(arch.num_classes)),
        finetune=config_lib.FinetuneConfig(ft_proj_selector=ft_proj_selector))
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise ConversionError(f"{e} (the converted model's settings; its stem is "
                              f"{'CIFAR' if arch.cifar_stem else 'ImageNet'})") from None
    return config


def convert(source, model_dir, image_size=None, dataset="imagenet2012", train_mode="pretrain",
            ft_proj_selector=0, data_dir=None):
    """Converts the original model at `source` into the run directory `model_dir`; returns the
    checkpoint path written.

    Args:
      source: an original checkpoint (directory or prefix) or SavedModel directory.
      model_dir: the new run directory (must not hold a run yet).
      image_size: the side the model is used at; None: 224 (32 for a CIFAR-stem model), which
        the weights cannot say.
      dataset: what evaluation and fine-tuning read by default (`--dataset` of the run).
      train_mode: "pretrain": the supervised head becomes the linear probe on h; "finetune": it
        becomes the classifier, reading head layer `ft_proj_selector` (0: h; -1: the last).
    """
    if train_mode not in ("pretrain", "finetune"):
        raise ConversionError(f"train_mode must be pretrain or finetune, got {train_mode!r}")
    _check_new_run(model_dir)
    original = read_source(source)
    arch = infer_architecture(original)
    notes = []
    if image_size is None:
        image_size = 32 if arch.cifar_stem else 224
        notes.append(f"image_size: not in the weights; {image_size} by default (--image_size)")
    selector = _resolve_selector(arch, train_mode, ft_proj_selector)
    if not original.step:
        original = dataclasses.replace(original, step=1)
        where = ("a SavedModel outside a numbered directory" if original.kind == "saved_model"
                 else "no global_step and no number in its name")
        notes.append(f"step: unknown ({where}); the run records step 1")
    config = run_config(arch, model_dir, image_size, dataset, train_mode, selector,
                        original.step, data_dir)
    items = build_parts(config, arch, train_mode, selector)
    pairs = encoder_pairs(original, items[checkpoints.ENCODER])
    if checkpoints.PROJECTION_HEAD in items:
        pairs += head_pairs(original, items[checkpoints.PROJECTION_HEAD])
    supervised = items.get(checkpoints.LINEAR_PROBE)
    supervised = supervised.dense if supervised is not None else items.get(checkpoints.CLASSIFIER)
    if supervised is not None:
        pairs += supervised_pairs(original, supervised)
    dropped = _dropped(original, items)
    if dropped:
        notes.append(f"the projection head ({len(dropped)} variables) is left out: the "
                     "classifier reads h (--ft_proj_selector=0)")
    original_used = dataclasses.replace(
        original, keys={p: k for p, k in original.keys.items() if p not in dropped})
    assign_all(original_used, pairs, items)
    return _write_run(config, items, original, arch, notes)


def _resolve_selector(arch, train_mode, ft_proj_selector):
    """The head layer the supervised head reads (0 for a pretrained model's probe)."""
    layers = config_lib.HeadConfig(arch.proj_head_mode, arch.num_proj_layers).num_layers
    if train_mode == "pretrain":
        if ft_proj_selector:
            raise ConversionError("--ft_proj_selector applies to --train_mode=finetune: a "
                                  "pretrained model's supervised head is a linear probe on h")
        if arch.num_classes and arch.supervised_input_dim != arch.h_dim:
            raise ConversionError(
                f"the supervised head reads {arch.supervised_input_dim}-wide inputs, not h "
                f"({arch.h_dim}): is it a fine-tuned model? pass --train_mode=finetune "
                "--ft_proj_selector=J")
        return 0
    if not arch.num_classes:
        raise ConversionError("--train_mode=finetune needs a supervised head, and this model "
                              "has none: convert it with --train_mode=pretrain")
    if not -(layers + 1) <= ft_proj_selector <= layers:
        raise ConversionError(f"ft_proj_selector={ft_proj_selector} is outside "
                              f"{-(layers + 1)}..{layers} for this {layers}-layer head")
    selector = ft_proj_selector % (layers + 1)
    # h, a hidden layer (as wide as h), or the head's output.
    width = arch.h_dim if selector < layers or layers == 0 else arch.proj_out_dim
    if arch.supervised_input_dim != width:
        raise ConversionError(
            f"the supervised head reads {arch.supervised_input_dim}-wide inputs but "
            f"--ft_proj_selector={ft_proj_selector} gives {width}: pass the layer it was "
            "fine-tuned from (SimCLRv2's released fine-tuned models: 1; v1's: 0)")
    return selector


def build_parts(config, arch, train_mode, selector):
    """{checkpoint entry: layer} of the converted run, as its trainer would checkpoint them."""
    encoder = models.build_encoder(config.encoder, image_size=None, global_bn=False)
    h_dim = models.encoder_output_dim(encoder)
    items = {checkpoints.ENCODER: encoder}
    if train_mode == "pretrain":
        if arch.proj_head_mode != "none":
            items[checkpoints.PROJECTION_HEAD] = models.build_projection_head(config, h_dim)
        if arch.num_classes:
            items[checkpoints.LINEAR_PROBE] = models.build_linear_probe(arch.num_classes, h_dim)
        return items
    model = build_classifier(config, arch.num_classes, image_size=None)
    return model.checkpoint_items()


def _dropped(original, items):
    """Original paths the run does not keep: the projection head of a model fine-tuned from h
    (--ft_proj_selector=0), which its classifier never reads."""
    if checkpoints.PROJECTION_HEAD in items:
        return set()
    return {p for p in original.keys if _HEAD.fullmatch(p)}


def _check_new_run(model_dir):
    """ConversionError unless model_dir is new, or an empty directory."""
    if tf.io.gfile.exists(config_lib.path_in(model_dir)):
        raise ConversionError(f"--model_dir={model_dir} holds a run already: choose a new "
                              "directory")
    if tf.io.gfile.exists(model_dir):
        if not tf.io.gfile.isdir(model_dir):
            raise ConversionError(f"--model_dir={model_dir} is a file: choose a new directory")
        if tf.io.gfile.listdir(model_dir):
            partial = " (a conversion that did not finish?)" if checkpoints.latest(model_dir) \
                else ""
            raise ConversionError(f"--model_dir={model_dir} is not empty{partial}: choose a new "
                                  "directory, or empty it")


def _write_run(config, items, original, arch, notes):
    """Writes config.json, the checkpoint and converted_from.json.

    Locally, into `<model_dir>.converting` renamed to model_dir at the end, and removed if
    anything fails, so a conversion leaves a whole run or nothing (a killed one leaves the
    temporary directory, which the next conversion to the same model_dir replaces). Elsewhere
    (gs://, where nothing renames atomically) straight into model_dir, config.json last: without
    it, a directory is a conversion that did not finish."""
    bad = checkpoints.first_non_finite([v for part in items.values() for v in part.weights])
    if bad is not None:
        raise ConversionError(f"{original.source} holds non-finite values in {bad}")
    model_dir = config.train.model_dir
    local = rundir.is_local(model_dir)
    work = f"{model_dir.rstrip('/')}.converting" if local else model_dir
    if local:
        shutil.rmtree(work, ignore_errors=True)
    try:
        tf.io.gfile.makedirs(work)
        manager = checkpoints.manager(tf.train.Checkpoint(**items), work, 1, None)
        path = checkpoints.save(manager, [v for part in items.values() for v in part.weights],
                                original.step)
        described = {
            "source": original.source, "format": original.kind, "step": original.step,
            "train_mode": config.train.train_mode,
            "architecture": {k: v for k, v in dataclasses.asdict(arch).items() if k != "notes"},
            "notes": list(arch.notes) + notes,
        }
        rundir.write_atomically(os.path.join(work, CONVERTED_FROM),
                                     json.dumps(described, indent=2))
        config_lib.save(config, work)
        if local:
            if os.path.isdir(model_dir):
                os.rmdir(model_dir)  # empty: _check_new_run said so
            os.rename(work, model_dir)
            path = os.path.join(model_dir, os.path.basename(path))
    except BaseException:
        if local:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# The command line.

def main(argv):
    from absl import flags

    import simclr_tf
    from simclr_tf import quiet_start

    FLAGS = flags.FLAGS
    if simclr_tf.QUIET_START:
        quiet_start.hide_library_info()
    cli.only_flags(argv)
    if not FLAGS.source or not FLAGS.model_dir:
        cli.fail("--source and --model_dir are required")
    try:
        path = convert(FLAGS.source, FLAGS.model_dir, FLAGS.image_size, FLAGS.dataset,
                       FLAGS.train_mode, FLAGS.ft_proj_selector, FLAGS.data_dir)
        config = config_lib.load(FLAGS.model_dir)
    except (ConversionError, checkpoints.CheckpointError, config_lib.ConfigError) as e:
        cli.fail(str(e))
    except (tf.errors.OpError, OSError) as e:  # gs:// out of reach, a full disk, ...
        cli.fail(f"converting {FLAGS.source} into {FLAGS.model_dir} failed ({first_line(e)})")
    with tf.io.gfile.GFile(os.path.join(FLAGS.model_dir, CONVERTED_FROM)) as f:
        described = json.load(f)
    enc, head = config.encoder, config.head
    classes = described["architecture"]["num_classes"]
    role = "classifier" if config.train.train_mode == "finetune" else "linear probe"
    print(f"Converted {described['format']} {described['source']} (step {described['step']}): "
          f"ResNet-{enc.resnet_depth} {enc.width_multiplier}x, sk_ratio {enc.sk_ratio}, "
          f"se_ratio {enc.se_ratio}, {'CIFAR' if enc.cifar_stem else 'ImageNet'} stem; "
          + (f"{head.num_layers}-layer projection head to {head.proj_out_dim}; "
             if head.num_layers else "no projection head; ")
          + (f"{classes}-class supervised head as the {role}." if classes
             else "no supervised head."))
    for note in described["notes"]:
        print(f"Note: {note}")
    print(f"Run directory: {FLAGS.model_dir} (checkpoint {path}); image_size "
          f"{config.data.image_size}, dataset {config.data.dataset}.")
    print(f"Next: python -m simclr_tf.run --mode=eval --model_dir={FLAGS.model_dir}; "
          f"python -m export --model_dir={FLAGS.model_dir}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("source", None, "The original TF2 code's checkpoint (directory or "
                        "prefix) or SavedModel directory.")
    flags.DEFINE_string("model_dir", None, "The new simclr_tf run directory.")
    flags.DEFINE_integer("image_size", None, "Side the model is used at (not in the weights); "
                         "default 224, 32 for a CIFAR-stem model.")
    flags.DEFINE_string("dataset", "imagenet2012", "The run's dataset (what --mode=eval and "
                        "fine-tuning read unless told otherwise).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory of the run.")
    flags.DEFINE_string("train_mode", "pretrain", "pretrain: a pretrained model (its supervised "
                        "head is the linear probe); finetune: a fine-tuned, distilled or "
                        "supervised model (its supervised head is the classifier).")
    flags.DEFINE_integer("ft_proj_selector", 0, "train_mode=finetune: the projection-head layer "
                         "the classifier reads (SimCLRv2's released fine-tuned models: 1; 0: h).")


if __name__ == "__main__":
    cli.start(main, define_flags=_define_flags)
