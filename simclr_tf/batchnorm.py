"""Batch normalisation for the encoder and heads: fused on one replica, synchronised across many.

Keras 3's `BatchNormalization` on the TensorFlow backend computes the moments and normalises with
separate ops (no fused kernel); on this project's CPUs that costs ~15% of a ResNet step. This layer
uses `FusedBatchNormV3` whenever the statistics are per replica (one replica, or `synchronized=False`),
and computes global moments with one all-reduce of [sum, sum of squares, count] when
`synchronized=True` and the step runs on several replicas (SimCLR's global BN). Both paths are plain
differentiable TensorFlow ops, so an exported encoder fine-tunes after loading.

Moving statistics use the biased batch variance on both paths (the fused kernel's Bessel-corrected
variance is converted back), so single- and multi-replica runs update them identically.
"""

import keras
import tensorflow as tf

# FusedBatchNormV3 refuses epsilon below this value.
_MIN_FUSED_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="simclr_tf")
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over the last axis, for 2-D and 4-D (NHWC) inputs.

    Args:
      momentum: decay of the moving statistics (SimCLR's `batch_norm_decay`, 0.9).
      epsilon: added to the variance.
      center: learn a bias (beta).
      scale: learn a scale (gamma).
      gamma_zero_init: start gamma at 0 (last BN of a residual block).
      synchronized: compute the statistics over the global batch of every replica.
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, center=True, scale=True,
                 gamma_zero_init=False, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.gamma_zero_init = gamma_zero_init
        self.synchronized = synchronized

    def build(self, input_shape):
        channels = (int(input_shape[-1]),)
        self.gamma = self.add_weight(
            shape=channels, name="gamma", trainable=self.scale, autocast=False,
            initializer="zeros" if self.gamma_zero_init else "ones")
        self.beta = self.add_weight(
            shape=channels, name="beta", trainable=self.center, autocast=False,
            initializer="zeros")
        # "mean" aggregation lets replicas assign them inside a MirroredStrategy step.
        self.moving_mean = self.add_weight(
            shape=channels, name="moving_mean", trainable=False, autocast=False,
            initializer="zeros", aggregation="mean")
        self.moving_variance = self.add_weight(
            shape=channels, name="moving_variance", trainable=False, autocast=False,
            initializer="ones", aggregation="mean")

    def call(self, inputs, training=False):
        if not training:
            return self._normalize(inputs, self.moving_mean, self.moving_variance)
        if self.synchronized and _replicas_in_sync() > 1:
            outputs, mean, variance = self._cross_replica_train(inputs)
        else:
            outputs, mean, variance = self._fused_train(inputs)
        self._update_moving_statistics(mean, variance)
        return outputs

    def _normalize(self, inputs, mean, variance):
        inv = tf.math.rsqrt(tf.cast(variance, tf.float32) + self.epsilon) * self.gamma
        shift = self.beta - tf.cast(mean, tf.float32) * inv
        return inputs * tf.cast(inv, inputs.dtype) + tf.cast(shift, inputs.dtype)

    def _fused_train(self, inputs):
        rank = len(inputs.shape)
        x = inputs if rank == 4 else tf.reshape(inputs, [-1, 1, 1, inputs.shape[-1]])
        y, mean, corrected_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.convert_to_tensor(self.gamma), offset=tf.convert_to_tensor(self.beta),
            mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
            epsilon=max(self.epsilon, _MIN_FUSED_EPSILON), data_format="NHWC", is_training=True)
        if rank != 4:
            y = tf.reshape(y, tf.shape(inputs))
        count = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
        variance = corrected_variance * (count - 1.0) / tf.maximum(count, 1.0)
        return y, mean, variance

    def _cross_replica_train(self, inputs):
        x = tf.cast(inputs, tf.float32)
        axes = list(range(len(x.shape) - 1))
        local_count = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
        stats = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes),
                           tf.reshape(local_count, [1])], axis=0)
        stats = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, stats)
        channels = x.shape[-1]
        count = stats[-1]
        mean = stats[:channels] / count
        variance = tf.maximum(stats[channels:2 * channels] / count - tf.square(mean), 0.0)
        return self._normalize(inputs, mean, variance), mean, variance

    def _update_moving_statistics(self, mean, variance):
        decay = self.momentum
        self.moving_mean.assign(self.moving_mean * decay + tf.stop_gradient(mean) * (1 - decay))
        self.moving_variance.assign(
            self.moving_variance * decay + tf.stop_gradient(variance) * (1 - decay))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon, center=self.center,
                      scale=self.scale, gamma_zero_init=self.gamma_zero_init,
                      synchronized=self.synchronized)
        return config


def _replicas_in_sync():
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync
