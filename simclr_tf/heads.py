"""Heads on top of h: the projection head g (thrown away after pretraining) and the linear probe.

The projection head follows SimCLR/SimCLRv2: `num_proj_layers` dense layers, each followed by BN;
ReLU on all but the last; the last BN has no centring (no beta). Dense layers have no bias because
a BN follows. It returns z and the list of intermediate outputs (index 0 is h itself); `up_to(h, j)`
runs only its first j layers, the input SimCLRv2 fine-tunes from (`ft_proj_selector`).
"""

import keras
import tensorflow as tf

from simclr_tf.batchnorm import BatchNorm

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")


@keras.saving.register_keras_serializable(package="simclr_tf")
class ProjectionHead(keras.layers.Layer):
    """g: h -> z.

    Args:
      mode: "none" (z = h), "linear" (one dense + BN) or "nonlinear" (an MLP).
      num_layers: dense layers in "nonlinear" mode (2 = SimCLR, 3 = SimCLRv2).
      out_dim: width of z (`proj_out_dim`, 128).
      hidden_dim: width of the hidden layers; None = width of h.
      global_bn: synchronise BN statistics across replicas.
      bn_momentum, bn_epsilon: BN settings.
    """

    def __init__(self, mode="nonlinear", num_layers=2, out_dim=128, hidden_dim=None,
                 global_bn=False, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if mode not in PROJ_HEAD_MODES:
            raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {mode!r}")
        if mode == "nonlinear" and num_layers < 1:
            raise ValueError(f"num_proj_layers must be >= 1, got {num_layers}")
        if out_dim < 1:
            raise ValueError(f"proj_out_dim must be positive, got {out_dim}")
        self.mode = mode
        self.num_layers = {"none": 0, "linear": 1, "nonlinear": num_layers}[mode]
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.global_bn = global_bn
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.dense_layers = []
        self.bn_layers = []

    def build(self, input_shape):
        hidden = self.hidden_dim or int(input_shape[-1])
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            dense = keras.layers.Dense(
                self.out_dim if last else hidden, use_bias=False,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                name=f"dense_{j}")
            bn = BatchNorm(self.bn_momentum, self.bn_epsilon, center=not last,
                           synchronized=self.global_bn, name=f"bn_{j}")
            # Named attributes make them checkpoint dependencies of the head (`dense_0/kernel`,
            # `bn_0/moving_mean`, ...): TensorFlow's checkpoints do not follow a Keras layer's
            # lists, so a head whose layers only sat in lists was saved without them.
            setattr(self, f"dense_{j}", dense)
            setattr(self, f"bn_{j}", bn)
            self.dense_layers.append(dense)
            self.bn_layers.append(bn)
        width = int(input_shape[-1])
        for dense, bn in zip(self.dense_layers, self.bn_layers):
            dense.build((None, width))
            width = dense.units
            bn.build((None, width))

    def _layer(self, j, x, training):
        """Dense layer j (from 0), its BN, and a ReLU unless it is the last layer."""
        x = self.bn_layers[j](self.dense_layers[j](x), training=training)
        return x if j == self.num_layers - 1 else tf.nn.relu(x)

    def call(self, h, training=False):
        """Returns (z, hiddens): hiddens[0] is h, hiddens[j] the output of layer j."""
        hiddens = [h]
        for j in range(self.num_layers):
            hiddens.append(self._layer(j, hiddens[-1], training))
        return hiddens[-1], hiddens

    def up_to(self, h, layer, training=False):
        """hiddens[layer] of `call`, running only the first `layer` layers (the later layers'
        batch-norm statistics are left as they are)."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 0..{self.num_layers} for this {self.num_layers}-"
                             f"layer head, got {layer}")
        x = h
        for j in range(layer):
            x = self._layer(j, x, training)
        return x

    def output_dim(self, layer):
        """Width of hiddens[layer] (layer >= 1; the head must be built)."""
        return self.dense_layers[layer - 1].units

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, num_layers=self.num_layers, out_dim=self.out_dim,
                      hidden_dim=self.hidden_dim, global_bn=self.global_bn,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        return config


def logits_initializer(zero_init=False):
    """The supervised heads' kernel init: zeros (SimCLRv2's zero_init_logits_layer) or, as the
    reference code's head_supervised, N(0, 0.01^2)."""
    return "zeros" if zero_init else keras.initializers.RandomNormal(stddev=0.01)


@keras.saving.register_keras_serializable(package="simclr_tf")
class LinearProbe(keras.layers.Layer):
    """A linear classifier on stop_gradient(h): labels never reach f or g through it."""

    def __init__(self, num_classes, zero_init=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.zero_init = zero_init
        self.dense = keras.layers.Dense(
            num_classes, kernel_initializer=logits_initializer(zero_init), name="logits")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, h):
        return self.dense(tf.stop_gradient(h))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, zero_init=self.zero_init)
        return config
