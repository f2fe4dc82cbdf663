"""The encoder's Conv2D: same outputs and gradients as TensorFlow's convolution, same weights."""

import contextlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import conv
from simclr_tf.conv import Conv2D, conv2d


def _reference_grads(inputs, kernel, dy, strides, padding):
    """y and dx from TensorFlow; dw from its formula, tap by tap (see the 1x1 case below)."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = tf.nn.conv2d(inputs, kernel, strides=strides, padding=padding)
    dx = tape.gradient(outputs, inputs, output_gradients=dy)
    kh, kw = kernel.shape[:2]
    if padding == "SAME":
        inputs = tf.pad(inputs, [[0, 0], [kh // 2] * 2, [kw // 2] * 2, [0, 0]])
    h, w = dy.shape[1:3]
    dw = [[tf.einsum("nhwc,nhwd->cd", inputs[:, i:i + strides * (h - 1) + 1:strides,
                                              j:j + strides * (w - 1) + 1:strides], dy)
           for j in range(kw)] for i in range(kh)]
    return outputs, dx, tf.stack(dw)


SAME_STRIDE_1 = [
    ((1, 1), (4, 4), (8, 16)),
    ((3, 3), (2, 2), (16, 8)),
    ((3, 3), (5, 7), (3, 6)),
    ((5, 3), (6, 4), (4, 4)),
    ((7, 7), (9, 9), (3, 5)),
]


@pytest.mark.parametrize("forward_input,matmul_filter", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kernel_hw,map_hw,channels", SAME_STRIDE_1)
def test_same_conv2d_matches_tensorflow_gradients(kernel_hw, map_hw, channels, forward_input,
                                                  matmul_filter):
    _check_against_tensorflow(kernel_hw, map_hw, channels, 1, "SAME", forward_input,
                              matmul_filter)


@pytest.mark.parametrize("kernel_hw,map_hw,channels,strides", [
    ((3, 3), (9, 9), (8, 16), 2),
    # oneDNN's own Conv2DBackpropFilter (TF 2.21, AVX2) gets this one wrong (1x1, strided, fewer
    # than 8 input channels, map a multiple of the stride); the patches matmul does not.
    ((1, 1), (8, 8), (4, 6), 2),
    ((3, 3), (6, 5), (3, 4), 1),
    ((7, 7), (13, 13), (3, 4), 2),
])
def test_valid_conv2d_matmul_filter_gradient_matches_tensorflow(kernel_hw, map_hw, channels,
                                                                strides):
    _check_against_tensorflow(kernel_hw, map_hw, channels, strides, "VALID", False, True)


def _check_against_tensorflow(kernel_hw, map_hw, channels, strides, padding, forward_input,
                              matmul_filter):
    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.normal(size=(3, *map_hw, channels[0])), tf.float32)
    kernel = tf.constant(rng.normal(size=(*kernel_hw, *channels)), tf.float32)
    out_shape = tf.nn.conv2d(inputs, kernel, strides=strides, padding=padding).shape
    dy = tf.constant(rng.normal(size=out_shape), tf.float32)
    want_y, want_dx, want_dw = _reference_grads(inputs, kernel, dy, strides, padding)
    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        y = conv2d(inputs, kernel, strides, padding, forward_input, matmul_filter)
    dx, dw = tape.gradient(y, [inputs, kernel], output_gradients=dy)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs,map_hw,forward_input,matmul_filter", [
    (dict(kernel_size=3, padding="same"), 8, True, False),
    (dict(kernel_size=3, padding="same"), 4, True, True),
    (dict(kernel_size=1, padding="same"), 8, True, False),
    (dict(kernel_size=3, strides=2, padding="valid"), 8, False, True),
    (dict(kernel_size=3, strides=2, padding="valid"), 12, False, False),
    (dict(kernel_size=1, strides=2, padding="valid"), 8, False, True),
    (dict(kernel_size=3, strides=2, padding="same"), 4, False, False),
    (dict(kernel_size=2, padding="same"), 4, False, False),
    (dict(kernel_size=3, padding="same", dilation_rate=2), 4, False, False),
])
def test_layer_matches_keras_conv2d(kwargs, map_hw, forward_input, matmul_filter, monkeypatch):
    monkeypatch.setattr(conv, "USE_FORWARD_INPUT_GRADIENT", True)
    monkeypatch.setattr(conv, "USE_MATMUL_FILTER_GRADIENT", True)
    ours = Conv2D(6, use_bias=False, **kwargs)
    reference = keras.layers.Conv2D(6, use_bias=False, **kwargs)
    x = tf.random.stateless_normal([2, map_hw, map_hw, 8], seed=[1, 2])  # 8: see the 1x1 case
    ours.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(ours.get_weights())
    assert [w.path.split("/")[-1] for w in ours.weights] == ["kernel"]
    assert ours.forward_input_gradient_applies() is forward_input
    assert ours.matmul_filter_gradient_applies(x.shape) is matmul_filter
    assert not ours.matmul_filter_gradient_applies((None, None, None, 8))

    def outputs_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        return (loss,) + tuple(tape.gradient(loss, [x, layer.kernel]))

    for got, want in zip(outputs_and_grads(ours), outputs_and_grads(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_layer_under_bfloat16_policy_and_xla(monkeypatch):
    monkeypatch.setattr(conv, "USE_FORWARD_INPUT_GRADIENT", True)
    monkeypatch.setattr(conv, "USE_MATMUL_FILTER_GRADIENT", True)
    layer = Conv2D(4, 3, padding="same", use_bias=False, dtype="mixed_bfloat16")
    x = tf.random.stateless_uniform([2, 4, 4, 3], seed=[3, 4])
    layer.build(x.shape)
    assert layer.forward_input_gradient_applies() and layer.matmul_filter_gradient_applies(x.shape)

    @tf.function(jit_compile=True)
    def grads():
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return y, tape.gradient(loss, layer.kernel)

    y, dw = grads()
    assert y.dtype == tf.bfloat16
    assert dw.dtype == tf.float32 and dw.shape == (3, 3, 3, 4)
    kernel = tf.convert_to_tensor(layer.kernel)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        want_loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME") ** 2)
    want_dw = tape.gradient(want_loss, kernel)
    largest = float(tf.reduce_max(tf.abs(want_dw)))
    np.testing.assert_allclose(dw, want_dw, rtol=0.05, atol=0.05 * largest)


def _run_python(code, onednn_environment):
    """Runs `code` in a fresh interpreter with TF_ENABLE_ONEDNN_OPTS unset or set as given."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if onednn_environment is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn_environment
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("environment,onednn", [(None, True), ("0", False), ("1", True)])
def test_importing_simclr_tf_turns_on_onednn_unless_the_environment_chose(environment, onednn):
    code = ("import simclr_tf\nfrom simclr_tf import conv\n"
            "print(conv.onednn_enabled(), conv.USE_FORWARD_INPUT_GRADIENT,"
            " conv.USE_MATMUL_FILTER_GRADIENT)")
    out = _run_python(code, environment).stdout
    assert out.split() == [str(onednn), str(not onednn), str(onednn)]


@pytest.mark.parametrize("code,environment,warns", [
    ("import tensorflow, simclr_tf", None, True),   # unless TF turned oneDNN on itself (AVX-512)
    ("import tensorflow, simclr_tf", "0", False),
    ("import tensorflow, simclr_tf", "1", False),
    ("import simclr_tf, tensorflow", None, False),
])
def test_importing_tensorflow_first_warns_once_that_onednn_is_off(code, environment, warns):
    result = _run_python(code + "\nfrom simclr_tf import conv\nprint(conv.onednn_enabled())",
                         environment)
    err = result.stderr
    warns = warns and result.stdout.split() == ["False"]
    lines = [line for line in err.splitlines() if "oneDNN CPU kernels are off" in line]
    assert len(lines) == (1 if warns else 0), err
    if warns:
        assert "import simclr_tf first or set TF_ENABLE_ONEDNN_OPTS=1" in lines[0]


@pytest.mark.parametrize("device,gpus,route", [
    (None, False, "cpu"),                      # no scope, no GPU: the CPU
    ("/device:CPU:1", True, "cpu"),            # a strategy's CPU replica, even beside a GPU
    ("/job:worker/task:1", False, "cpu"),      # a worker without a device type: its default
    (None, True, "plain"),                     # no scope, a GPU: TensorFlow places it there
    ("/device:GPU:0", False, "plain"),
    ("/job:worker/task:0/device:TPU:0", False, "plain"),
])
def test_cpu_gradient_routes_only_on_cpus(device, gpus, route, monkeypatch):
    """The gradient graph of a 4x4 "same" convolution built under each device: the CPU routes
    (extract_patches + matmul for the filter, a forward conv for the input) only on a CPU; a GPU
    or TPU gets TensorFlow's own gradient ops (traced only: this machine has neither)."""
    monkeypatch.setattr(conv, "USE_FORWARD_INPUT_GRADIENT", True)
    monkeypatch.setattr(conv, "USE_MATMUL_FILTER_GRADIENT", True)
    if gpus:
        cpu_only = tf.config.list_logical_devices
        monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: (
            [tf.config.LogicalDevice("/device:GPU:0", "GPU")] if kind == "GPU"
            else cpu_only(kind)))
    layer = Conv2D(8, 3, padding="same", use_bias=False)
    layer.build((2, 4, 4, 8))

    @tf.function
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, layer.kernel])

    with tf.device(device) if device else contextlib.nullcontext():
        graph = gradients.get_concrete_function(tf.TensorSpec([2, 4, 4, 8])).graph
    ops = {op.type for op in graph.get_operations()}
    if route == "cpu":
        assert "ExtractImagePatches" in ops and "Conv2DBackpropFilter" not in ops
        assert "Conv2DBackpropInput" not in ops
    else:
        assert {"Conv2DBackpropFilter", "Conv2DBackpropInput"} <= ops
        assert "ExtractImagePatches" not in ops
