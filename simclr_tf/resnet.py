"""The encoder f: ResNet v1 as SimCLR uses it (widths, selective kernels, SE, CIFAR stem).

`resnet(...)` returns a functional Keras model images -> h (global average pool of the last block
group). Its intermediate outputs are named endpoints (`ENDPOINTS`: the stem's output, the four
block groups' and h), which `endpoint(model, name)` and `feature_extractor(model, names)` give to
the parts that need them (freezing f up to a block, exporting feature maps). Layer names are stable
(`stem_*`, `group{g}_block{b}_*`) so checkpoints and exports are predictable; every layer is a
registered Keras layer, so `get_config` / `from_config` round-trip the model.

Architecture notes (from the SimCLR / SimCLRv2 papers and their reference code):
- depths 18/34 use basic blocks, 50/101/152/200 bottleneck blocks; the first block of every group
  has a projection shortcut; the last BN of every block starts with gamma = 0.
- strided convs pad explicitly ("fixed padding") so the output does not depend on the input size
  parity, as in the TF reference ResNets.
- `sk_ratio > 0` (SimCLRv2) replaces the 3x3 conv of bottleneck blocks by a two-path selective
  kernel conv and uses the ResNet-D stem (three 3x3 convs) and avg-pool projection shortcuts
  (group 1's stride-1 shortcut included).
- `se_ratio > 0` squeezes to `se_ratio` x the block's (inner) width, as the reference code.
- `cifar_stem`: one 3x3 stride-1 conv and no max-pool, for 32 px images.
"""

import keras
import tensorflow as tf

from simclr_tf.batchnorm import BatchNorm
from simclr_tf.conv import Conv2D

DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
STEM_ENDPOINT = "stem"
BLOCK_GROUP_ENDPOINTS = ("block_group1", "block_group2", "block_group3", "block_group4")
OUTPUT_ENDPOINT = "final_avg_pool"
ENDPOINTS = (STEM_ENDPOINT,) + BLOCK_GROUP_ENDPOINTS + (OUTPUT_ENDPOINT,)


class _Builder:
    """Holds the per-network settings so the block functions stay short."""

    def __init__(self, bn_momentum, bn_epsilon, global_bn, sk_ratio, se_ratio):
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.global_bn = global_bn
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio

    def conv(self, x, filters, kernel_size, strides, name):
        if strides > 1:
            pad = kernel_size - 1
            x = keras.layers.ZeroPadding2D(((pad // 2, pad - pad // 2),) * 2, name=f"{name}_pad")(x)
        return Conv2D(
            filters, kernel_size, strides=strides, use_bias=False,
            padding="same" if strides == 1 else "valid",
            kernel_initializer=keras.initializers.VarianceScaling(), name=name)(x)

    def bn(self, x, name, relu=True, zero_init=False):
        x = BatchNorm(self.bn_momentum, self.bn_epsilon, gamma_zero_init=zero_init,
                      synchronized=self.global_bn, name=name)(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def conv_bn(self, x, filters, kernel_size, strides, name, relu=True, zero_init=False):
        x = self.conv(x, filters, kernel_size, strides, f"{name}_conv")
        return self.bn(x, f"{name}_bn", relu=relu, zero_init=zero_init)

    def stem(self, x, width_multiplier, cifar_stem):
        base = 64 * width_multiplier
        if cifar_stem:
            return self.conv_bn(x, base, 3, 1, "stem")
        if self.sk_ratio > 0:  # ResNet-D stem
            x = self.conv_bn(x, base // 2, 3, 2, "stem1")
            x = self.conv_bn(x, base // 2, 3, 1, "stem2")
            x = self.conv_bn(x, base, 3, 1, "stem3")
        else:
            x = self.conv_bn(x, base, 7, 2, "stem")
        return keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)

    def shortcut(self, x, filters, strides, name):
        if self.sk_ratio > 0:  # ResNet-D: a 2x2 average pool, then a 1x1 conv, as the reference
            # code builds it: strided, with one row and column of zeros padded at the end (they
            # count in the average); at stride 1 (group 1) too, "same", the padding not counted.
            if strides > 1:
                x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pool_pad")(x)
            padding = "valid" if strides > 1 else "same"
            x = keras.layers.AveragePooling2D(2, strides, padding, name=f"{name}_pool")(x)
            strides = 1
        return self.conv_bn(x, filters, 1, strides, name, relu=False)

    def selective_kernel(self, x, filters, strides, name, min_dim=32):
        x = self.conv_bn(x, 2 * filters, 3, strides, name)
        paths = SplitPaths(name=f"{name}_paths")(x)
        fused = SqueezePaths(name=f"{name}_squeeze")(paths)
        mid = max(int(filters * self.sk_ratio), min_dim)
        fused = self.conv_bn(fused, mid, 1, 1, f"{name}_fc")
        mix = Conv2D(2 * filters, 1, use_bias=False, name=f"{name}_mix",
                     kernel_initializer=keras.initializers.VarianceScaling())(fused)
        return SelectPaths(name=f"{name}_select")([paths, mix])

    def squeeze_excite(self, x, filters, name):
        """Squeeze to filters * se_ratio channels (`filters`: the block's width, the bottleneck's
        inner width, as the reference code), excite back to x's channels."""
        s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
        squeezed = max(1, int(filters * self.se_ratio))
        s = Conv2D(squeezed, 1, activation="relu", name=f"{name}_reduce",
                   kernel_initializer=keras.initializers.VarianceScaling())(s)
        s = Conv2D(x.shape[-1], 1, activation="sigmoid", name=f"{name}_expand",
                   kernel_initializer=keras.initializers.VarianceScaling())(s)
        return keras.layers.Multiply(name=f"{name}_scale")([x, s])

    def basic_block(self, x, filters, strides, projection, name):
        shortcut = self.shortcut(x, filters, strides, f"{name}_proj") if projection else x
        x = self.conv_bn(x, filters, 3, strides, f"{name}_1")
        x = self.conv_bn(x, filters, 3, 1, f"{name}_2", relu=False, zero_init=True)
        if self.se_ratio > 0:
            x = self.squeeze_excite(x, filters, f"{name}_se")
        x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
        return keras.layers.ReLU(name=f"{name}_out")(x)

    def bottleneck_block(self, x, filters, strides, projection, name):
        shortcut = self.shortcut(x, 4 * filters, strides, f"{name}_proj") if projection else x
        x = self.conv_bn(x, filters, 1, 1, f"{name}_1")
        if self.sk_ratio > 0:
            x = self.selective_kernel(x, filters, strides, f"{name}_2sk")
        else:
            x = self.conv_bn(x, filters, 3, strides, f"{name}_2")
        x = self.conv_bn(x, 4 * filters, 1, 1, f"{name}_3", relu=False, zero_init=True)
        if self.se_ratio > 0:
            x = self.squeeze_excite(x, filters, f"{name}_se")
        x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
        return keras.layers.ReLU(name=f"{name}_out")(x)


# The selective kernel's weightless steps, as layers (not Lambdas) so the model serialises.

@keras.saving.register_keras_serializable(package="simclr_tf")
class SplitPaths(keras.layers.Layer):
    """[B, H, W, 2C] -> [2, B, H, W, C]: the two kernel paths of a selective-kernel conv."""

    def call(self, x):
        return tf.stack(tf.split(x, 2, axis=-1))


@keras.saving.register_keras_serializable(package="simclr_tf")
class SqueezePaths(keras.layers.Layer):
    """[2, B, H, W, C] -> [B, 1, 1, C]: the paths summed, then averaged over space."""

    def call(self, paths):
        return tf.reduce_mean(tf.reduce_sum(paths, 0), [1, 2], keepdims=True)


@keras.saving.register_keras_serializable(package="simclr_tf")
class SelectPaths(keras.layers.Layer):
    """([2, B, H, W, C], mix [B, 1, 1, 2C]) -> [B, H, W, C]: the paths weighted by a softmax of
    the mix over the two paths."""

    def call(self, inputs):
        paths, mix = inputs
        weights = tf.nn.softmax(tf.stack(tf.split(mix, 2, axis=-1)), axis=0)
        return tf.reduce_sum(paths * tf.cast(weights, paths.dtype), axis=0)


def validate(depth, width_multiplier, sk_ratio, se_ratio):
    """Raises a one-line ValueError for settings no ResNet here can take."""
    if depth not in DEPTHS:
        raise ValueError(f"resnet_depth must be one of {sorted(DEPTHS)}, got {depth}")
    if not (isinstance(width_multiplier, int) and width_multiplier >= 1):
        raise ValueError(f"width_multiplier must be a positive integer, got {width_multiplier}")
    if not 0.0 <= sk_ratio < 1.0:
        raise ValueError(f"sk_ratio must be in [0, 1), got {sk_ratio}")
    if not 0.0 <= se_ratio < 1.0:
        raise ValueError(f"se_ratio must be in [0, 1), got {se_ratio}")


def min_image_size(cifar_stem):
    """Smallest input side that the encoder's strides divide evenly down to one pixel. A policy,
    not a hard limit: smaller sides run (every map keeps at least one pixel), their block groups on
    maps that are partly padding."""
    return 8 if cifar_stem else 32


def resnet(depth, width_multiplier=1, sk_ratio=0.0, se_ratio=0.0, cifar_stem=False,
           image_size=None, global_bn=False, bn_momentum=0.9, bn_epsilon=1e-5, name=None):
    """Builds the SimCLR ResNet v1 encoder f: images [B, H, W, 3] in [0, 1] -> h [B, D].

    Args:
      depth: 18, 34, 50, 101, 152 or 200.
      width_multiplier: channel multiplier (1, 2, 3, 4 in the papers).
      sk_ratio: selective-kernel reduction ratio (SimCLRv2 uses 0.0625); 0 disables SK.
      se_ratio: squeeze-and-excitation ratio; 0 disables SE.
      cifar_stem: 3x3 stride-1 stem without max-pool, for 32 px images.
      image_size: static input side, or None for any size.
      global_bn: synchronise batch-norm statistics across replicas.
      bn_momentum, bn_epsilon: batch-norm decay and epsilon (0.9 and 1e-5 in SimCLR).
      name: model name; default `resnet{depth}`.

    Returns:
      A `keras.Model` whose output is h, the global average pool of the last block group.
    """
    validate(depth, width_multiplier, sk_ratio, se_ratio)
    kind, blocks_per_group = DEPTHS[depth]
    builder = _Builder(bn_momentum, bn_epsilon, global_bn, sk_ratio, se_ratio)
    block = builder.basic_block if kind == "basic" else builder.bottleneck_block

    images = keras.Input((image_size, image_size, 3), name="images")
    x = builder.stem(images, width_multiplier, cifar_stem)
    for group, (num_blocks, strides) in enumerate(zip(blocks_per_group, (1, 2, 2, 2)), start=1):
        filters = 64 * width_multiplier * 2 ** (group - 1)
        for b in range(num_blocks):
            x = block(x, filters, strides if b == 0 else 1, projection=(b == 0),
                      name=f"group{group}_block{b + 1}")
        x = keras.layers.Identity(name=f"block_group{group}")(x)
    h = keras.layers.GlobalAveragePooling2D(name=OUTPUT_ENDPOINT)(x)
    return keras.Model(images, h, name=name or f"resnet{depth}")


def endpoint(encoder, name):
    """The output tensor of endpoint `name` (one of ENDPOINTS) of an encoder `resnet` built.

    "stem" is the input of block group 1: after the max-pool of the ImageNet stems, after the
    3x3 conv + BN + ReLU of the CIFAR stem.
    """
    if name == OUTPUT_ENDPOINT:
        return encoder.output
    if name == STEM_ENDPOINT:
        names = {layer.name for layer in encoder.layers}
        return encoder.get_layer("stem_pool" if "stem_pool" in names else "stem_bn_relu").output
    if name in BLOCK_GROUP_ENDPOINTS:
        return encoder.get_layer(name).output
    raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {name!r}")


def feature_extractor(encoder, names=BLOCK_GROUP_ENDPOINTS + (OUTPUT_ENDPOINT,)):
    """A model with the same weights returning {name: endpoint output} for `names`."""
    outputs = {name: endpoint(encoder, name) for name in names}
    return keras.Model(encoder.input, outputs, name=f"{encoder.name}_features")


def output_dim(depth, width_multiplier):
    """Width of h."""
    kind, _ = DEPTHS[depth]
    return 512 * width_multiplier * (4 if kind == "bottleneck" else 1)
