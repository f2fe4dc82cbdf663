"""The encoder's 2-D convolution, with faster gradients on CPUs.

Two of TensorFlow's CPU gradient kernels are slow on a ResNet's small feature maps (measured on this
project's 2-core machines); `Conv2D` routes around them and leaves everything else to TensorFlow:

- Input gradient, on TensorFlow's own (Eigen) kernels: `Conv2DBackpropInput` takes 7.5x the forward
  convolution's time on 4x4 maps (1.2-1.8x on larger ones). For a stride-1 convolution with "same"
  padding and an odd kernel that gradient *is* a forward convolution: dy convolved ("same") with the
  kernel flipped in both spatial axes and with its input and output channels swapped. Under oneDNN
  the plain op is fine (and a little faster), so this is used only on Eigen.
- Filter gradient under oneDNN, on maps of at most `MATMUL_FILTER_GRADIENT_MAX_POSITIONS` output
  positions: oneDNN's `Conv2DBackpropFilter` runs at a third of the matmul peak on 4x4 maps (50
  GFLOP/s for a 3x3, 512-channel conv with 256 views, against 88 for the forward conv). There the
  gradient is one matmul of the input patches with dy, [kh*kw*cin, n*h*w] x [n*h*w, cout] (110
  GFLOP/s); the patches of a map that small are no bigger than the activations of a larger one.
  Eigen's filter gradient is as fast as that matmul (102 against 93 GFLOP/s), so it keeps its own.

Both are CPU routes, chosen per convolution from the device it is built for (`device_type`): a GPU
build of TensorFlow on x86 has oneDNN on too, and on a GPU the matmul route would replace cuDNN's
filter-gradient kernel with `extract_patches` + matmul. On GPUs and TPUs every convolution is the
plain op.

The weights, their names and the forward result are those of `keras.layers.Conv2D`, so checkpoints
and exports do not change.
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


def _requested_device():
    """The device string in force where the next op is created ("" if none was asked for): in a
    graph, the scope its ops record (a strategy's replica device); else, or if that is empty,
    the eager context's (a `tf.device` around the call, which places a whole tf.function)."""
    from tensorflow.python.eager import context
    in_graph = "" if tf.executing_eagerly() else tf.raw_ops.NoOp().device
    return in_graph or context.context().device_name or ""


def device_type():
    """"CPU", "GPU" or "TPU": where an op created here runs. TPUStrategy's replica functions run
    on TPUs; otherwise the device scope in force decides (a strategy's replica device,
    `tf.device`), and without one TensorFlow's default placement: a GPU when there is one."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
        return "TPU"
    requested = tf.DeviceSpec.from_string(_requested_device()).device_type
    if requested:
        return requested.upper()
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


# Read once: TensorFlow fixes the choice when it loads.
USE_FORWARD_INPUT_GRADIENT = not onednn_enabled()
USE_MATMUL_FILTER_GRADIENT = onednn_enabled()
# Output maps up to 4x4. On 8x8 maps the patches matmul is no faster than the op.
MATMUL_FILTER_GRADIENT_MAX_POSITIONS = 16


def _flipped_transposed(kernel):
    """[kh, kw, cin, cout] -> [kh, kw, cout, cin], reversed in both spatial axes."""
    return tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])


def _same_padded(inputs, kernel_shape):
    """Zero-pads like a stride-1 "same" convolution with an odd kernel (centred)."""
    kh, kw = kernel_shape[0], kernel_shape[1]
    return tf.pad(inputs, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])


def _filter_gradient_as_matmul(inputs, kernel_shape, dy, strides, padding):
    """dW = patches(inputs)^T @ dy, with patches [n*h*w, kh*kw*cin] in (kh, kw, cin) order."""
    kh, kw, cin, cout = kernel_shape
    if padding == "SAME":
        inputs = _same_padded(inputs, kernel_shape)
    patches = tf.image.extract_patches(inputs, sizes=[1, kh, kw, 1],
                                       strides=[1, strides, strides, 1], rates=[1, 1, 1, 1],
                                       padding="VALID")
    dw = tf.matmul(tf.reshape(patches, [-1, kh * kw * cin]), tf.reshape(dy, [-1, cout]),
                   transpose_a=True)
    return tf.reshape(dw, kernel_shape)


def conv2d(inputs, kernel, strides, padding, forward_input_gradient, matmul_filter_gradient):
    """NHWC `tf.nn.conv2d` (square `strides`, "SAME" or "VALID") with the chosen gradient paths.

    `forward_input_gradient` needs stride 1, "SAME" and an odd kernel; `matmul_filter_gradient`
    needs "VALID", or "SAME" with stride 1 and an odd kernel.
    """

    @tf.custom_gradient
    def convolve(x, w):
        def grad(dy):
            if forward_input_gradient:
                dx = tf.nn.conv2d(dy, _flipped_transposed(w), strides=1, padding="SAME")
            else:
                dx = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=w, out_backprop=dy,
                    strides=[1, strides, strides, 1], padding=padding)
            if matmul_filter_gradient:
                dw = _filter_gradient_as_matmul(x, w.shape, dy, strides, padding)
            else:
                dw = tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                    strides=[1, strides, strides, 1], padding=padding)
            return dx, dw

        return tf.nn.conv2d(x, w, strides=strides, padding=padding), grad

    return convolve(inputs, kernel)


@keras.saving.register_keras_serializable(package="simclr_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with the gradient paths of the module docstring where they apply."""

    def _plain_nhwc(self):
        """Undilated, ungrouped, square-strided NHWC convolution on TensorFlow, padded so the
        custom paths can reproduce it ("valid", or stride-1 "same" with an odd kernel)."""
        same_ok = tuple(self.strides) == (1, 1) and all(k % 2 == 1 for k in self.kernel_size)
        return (self.data_format == "channels_last" and self.strides[0] == self.strides[1]
                and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                and (self.padding == "valid" or (self.padding == "same" and same_ok))
                and keras.backend.backend() == "tensorflow")

    def forward_input_gradient_applies(self):
        """Stride-1, "same", odd-sized plain NHWC convolution."""
        return self._plain_nhwc() and self.padding == "same"

    def matmul_filter_gradient_applies(self, input_shape):
        """Plain NHWC convolution whose static output map has few enough positions."""
        if not self._plain_nhwc():
            return False
        height, width = self.compute_output_shape(input_shape)[1:3]
        return height is not None and width is not None and (
            height * width <= MATMUL_FILTER_GRADIENT_MAX_POSITIONS)

    def convolution_op(self, inputs, kernel):
        on_cpu = device_type() == "CPU"
        forward_input = (on_cpu and USE_FORWARD_INPUT_GRADIENT
                         and self.forward_input_gradient_applies())
        matmul_filter = (on_cpu and USE_MATMUL_FILTER_GRADIENT
                         and self.matmul_filter_gradient_applies(inputs.shape))
        if not (forward_input or matmul_filter):
            return super().convolution_op(inputs, kernel)
        return conv2d(inputs, tf.cast(kernel, inputs.dtype), self.strides[0],
                      self.padding.upper(), forward_input, matmul_filter)
