"""The encoder's Conv2D: same outputs and gradients as TensorFlow's convolution, same weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import conv
from simclr_tf.conv import Conv2D, same_conv2d


def _reference_grads(inputs, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME")
    return (outputs,) + tuple(tape.gradient(outputs, [inputs, kernel], output_gradients=dy))


@pytest.mark.parametrize("kernel_hw,map_hw,channels", [
    ((1, 1), (4, 4), (8, 16)),
    ((3, 3), (2, 2), (16, 8)),
    ((3, 3), (5, 7), (3, 6)),
    ((5, 3), (6, 4), (4, 4)),
    ((7, 7), (9, 9), (3, 5)),
])
def test_same_conv2d_matches_tensorflow_gradients(kernel_hw, map_hw, channels):
    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.normal(size=(3, *map_hw, channels[0])), tf.float32)
    kernel = tf.constant(rng.normal(size=(*kernel_hw, *channels)), tf.float32)
    dy = tf.constant(rng.normal(size=(3, *map_hw, channels[1])), tf.float32)
    want_y, want_dx, want_dw = _reference_grads(inputs, kernel, dy)
    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        y = same_conv2d(inputs, kernel)
    dx, dw = tape.gradient(y, [inputs, kernel], output_gradients=dy)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs,fast", [
    (dict(kernel_size=3, padding="same"), True),
    (dict(kernel_size=1, padding="same"), True),
    (dict(kernel_size=3, strides=2, padding="valid"), False),
    (dict(kernel_size=2, padding="same"), False),
    (dict(kernel_size=3, padding="same", dilation_rate=2), False),
])
def test_layer_matches_keras_conv2d(kwargs, fast, monkeypatch):
    monkeypatch.setattr(conv, "USE_FORWARD_INPUT_GRADIENT", True)
    ours = Conv2D(6, use_bias=False, **kwargs)
    reference = keras.layers.Conv2D(6, use_bias=False, **kwargs)
    x = tf.random.stateless_normal([2, 8, 8, 4], seed=[1, 2])
    ours.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(ours.get_weights())
    assert [w.path.split("/")[-1] for w in ours.weights] == ["kernel"]
    assert ours.forward_input_gradient_applies() is fast

    def outputs_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        return (loss,) + tuple(tape.gradient(loss, [x, layer.kernel]))

    for got, want in zip(outputs_and_grads(ours), outputs_and_grads(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_layer_under_bfloat16_policy_and_xla(monkeypatch):
    monkeypatch.setattr(conv, "USE_FORWARD_INPUT_GRADIENT", True)
    layer = Conv2D(4, 3, padding="same", use_bias=False, dtype="mixed_bfloat16")
    x = tf.random.stateless_uniform([2, 6, 6, 3], seed=[3, 4])
    layer.build(x.shape)

    @tf.function(jit_compile=True)
    def grads():
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return y, tape.gradient(loss, layer.kernel)

    y, dw = grads()
    assert y.dtype == tf.bfloat16
    assert dw.dtype == tf.float32 and dw.shape == (3, 3, 3, 4)
    assert float(tf.reduce_sum(tf.abs(dw))) > 0


@pytest.mark.parametrize("environment,onednn", [(None, True), ("0", False), ("1", True)])
def test_importing_simclr_tf_turns_on_onednn_unless_the_environment_chose(environment, onednn):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if environment is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = environment
    code = ("import simclr_tf\nfrom simclr_tf import conv\n"
            "print(conv.onednn_enabled(), conv.USE_FORWARD_INPUT_GRADIENT)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert out.split() == [str(onednn), str(not onednn)]
