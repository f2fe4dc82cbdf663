"""LARS against a hand-computed update; LR scaling and the warm-up + cosine schedule."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.lars import LARS
from simclr_tf.schedules import WarmupCosine, scaled_learning_rate


def test_lars_two_steps_match_hand_computation():
    w0 = np.array([[3.0, 4.0]], np.float32)      # ||w|| = 5
    b0 = np.array([1.0, -1.0], np.float32)
    g = np.array([[0.6, 0.8]], np.float32)       # ||g|| = 1
    gb = np.array([0.5, 0.5], np.float32)
    w = keras.Variable(w0, name="kernel")
    b = keras.Variable(b0, name="bias")
    lr, mom, wd, eta = 0.1, 0.9, 0.01, 0.001
    opt = LARS(lr, momentum=mom, weight_decay=wd, eta=eta)
    opt.build([w, b])

    v_w = np.zeros_like(w0)
    v_b = np.zeros_like(b0)
    w_ref, b_ref = w0.copy(), b0.copy()
    for _ in range(2):
        opt.apply_gradients([(tf.constant(g), w), (tf.constant(gb), b)])
        g_total = g + wd * w_ref                              # coupled weight decay
        trust = eta * np.linalg.norm(w_ref) / np.linalg.norm(g_total)
        v_w = mom * v_w + lr * trust * g_total
        w_ref = w_ref - v_w
        v_b = mom * v_b + lr * gb                             # bias: no decay, no adaptation
        b_ref = b_ref - v_b
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6)
        np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-6)


def test_lars_zero_weights_use_trust_one():
    w = keras.Variable(np.zeros((2, 2), np.float32))
    opt = LARS(0.5, momentum=0.0, eta=0.001)
    opt.build([w])
    opt.apply_gradients([(tf.ones((2, 2)), w)])
    np.testing.assert_allclose(w.numpy(), -0.5 * np.ones((2, 2)))


def test_lars_under_mirrored_strategy_sums_replica_gradients():
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        w = keras.Variable(np.ones((2, 2), np.float32))
        opt = LARS(0.1, momentum=0.9, weight_decay=1.0, eta=0.001)
        opt.build([w])

    @tf.function
    def step():
        def fn():
            i = tf.distribute.get_replica_context().replica_id_in_sync_group
            grad = tf.one_hot(i, 4, dtype=tf.float32)
            opt.apply_gradients([(tf.reshape(grad, (2, 2)), w)])
        strategy.run(fn)

    step()
    # The replicas' gradients are summed: g = [[1, 1], [0, 0]], plus weight decay 1.0 * w.
    g = np.array([[2.0, 2.0], [1.0, 1.0]])
    trust = 0.001 * 2.0 / np.linalg.norm(g)
    np.testing.assert_allclose(w.numpy(), 1 - 0.1 * trust * g, rtol=1e-6)


def test_lr_scaling():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        scaled_learning_rate(0.3, 256, "cubic")


def test_warmup_cosine():
    s = WarmupCosine(peak=2.0, warmup_steps=10, total_steps=110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(2.0)
    assert float(s(60)) == pytest.approx(1.0, rel=1e-5)
    assert float(s(85)) == pytest.approx(1.0 + math.cos(math.pi * 0.75), rel=1e-5)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)
    assert float(s(200)) == pytest.approx(0.0, abs=1e-6)
