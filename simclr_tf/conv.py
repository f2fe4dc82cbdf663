"""The encoder's 2-D convolution, with a faster input gradient on CPUs.

TensorFlow's own (Eigen) CPU kernel for the input gradient of a convolution (`Conv2DBackpropInput`)
is slow on the small feature maps of a ResNet's last block group: 7.5x the forward convolution's
time on 4x4 maps (1.2-1.8x on larger ones), measured on this project's 2-core machines. For a
stride-1 convolution with "same" padding and an odd kernel, that gradient *is* a forward
convolution: dy convolved ("same") with the kernel flipped in both spatial axes and with its input
and output channels swapped. `Conv2D` computes it that way, and leaves every other case (strides,
dilation, even kernels, "valid" padding) to TensorFlow. The weights, their names and the forward
result are those of `keras.layers.Conv2D`, so checkpoints and exports do not change.

Under oneDNN (which importing `simclr_tf` turns on unless `TF_ENABLE_ONEDNN_OPTS` says otherwise)
the input gradient has no such problem and the plain op is a little faster, so the rewrite is used
only when TensorFlow runs its own kernels.
"""

import keras
import tensorflow as tf


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN CPU kernels in this process."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


# Read once: TensorFlow fixes the choice when it loads.
USE_FORWARD_INPUT_GRADIENT = not onednn_enabled()


def _flipped_transposed(kernel):
    """[kh, kw, cin, cout] -> [kh, kw, cout, cin], reversed in both spatial axes."""
    return tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])


@tf.custom_gradient
def same_conv2d(inputs, kernel):
    """Stride-1 "same" NHWC convolution whose input gradient is a forward convolution."""
    outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME")

    def grad(dy):
        d_inputs = tf.nn.conv2d(dy, _flipped_transposed(kernel), strides=1, padding="SAME")
        d_kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=inputs, filter_sizes=tf.shape(kernel), out_backprop=dy,
            strides=[1, 1, 1, 1], padding="SAME")
        return d_inputs, d_kernel

    return outputs, grad


@keras.saving.register_keras_serializable(package="simclr_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that uses `same_conv2d` where it applies (see the module docstring)."""

    def forward_input_gradient_applies(self):
        """Stride-1, "same", undilated, ungrouped, odd-sized NHWC convolution on TensorFlow."""
        return (self.padding == "same" and self.data_format == "channels_last"
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1)
                and self.groups == 1 and all(k % 2 == 1 for k in self.kernel_size)
                and keras.backend.backend() == "tensorflow")

    def convolution_op(self, inputs, kernel):
        if USE_FORWARD_INPUT_GRADIENT and self.forward_input_gradient_applies():
            return same_conv2d(inputs, tf.cast(kernel, inputs.dtype))
        return super().convolution_op(inputs, kernel)
