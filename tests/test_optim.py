"""LARS against a hand-computed update; LR scaling and the warm-up + cosine schedule."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.lars import LARS
from simclr_tf.schedules import WarmupCosine, scaled_learning_rate


@pytest.mark.fidelity
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


@pytest.mark.fidelity
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


def test_lars_leaves_the_supervised_heads_to_momentum_and_their_l2_to_the_loss():
    """As the original's head_supervised: the probe / classifier kernel is neither adapted nor
    decayed by LARS (plain momentum SGD), and the loss carries its L2 instead; other optimisers
    have the L2 of every weight but batch norm's in the loss."""
    from simclr_tf import config as cfg
    from simclr_tf import optim
    from simclr_tf.batchnorm import BatchNorm
    from simclr_tf.heads import LinearProbe
    from simclr_tf.schedules import Schedule

    probe = LinearProbe(2, name="linear_probe")
    probe.build((None, 2))
    hidden = keras.layers.Dense(2, use_bias=False, name="hidden")
    hidden.build((None, 2))
    w0 = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)     # ||w|| = 5
    for kernel in (probe.dense.kernel, hidden.kernel):
        kernel.assign(w0)
    variables = [hidden.kernel, probe.dense.kernel, probe.dense.bias]
    lr, wd, eta = 0.5, 0.1, 0.001
    config = cfg.OptimizerConfig("lars", lr, "linear", 0.9, wd, warmup_epochs=0)
    opt = optim.build_optimizer(config, 256, Schedule(10, 0, 1))
    opt.build(variables)
    g = np.full((2, 2), 0.5, np.float32)
    opt.apply_gradients([(tf.constant(g), v) for v in variables[:2]]
                        + [(tf.zeros([2]), variables[2])])

    np.testing.assert_allclose(probe.dense.kernel.numpy(), w0 - lr * g, rtol=1e-6)
    g_total = g + wd * w0
    trust = eta * 5.0 / np.linalg.norm(g_total)
    np.testing.assert_allclose(hidden.kernel.numpy(), w0 - lr * trust * g_total, rtol=1e-6)

    assert optim.decayed_in_loss(variables, "lars") == [probe.dense.kernel]
    # Other optimisers: every weight but batch norm's, biases included, as the original.
    bn = BatchNorm(name="bn")
    bn.build((None, 2))
    everything = variables + bn.trainable_variables
    assert optim.decayed_in_loss(everything, "momentum") == variables
    assert optim.decayed_in_loss(everything, "adam") == variables
    want = wd * 0.5 * float(np.sum(probe.dense.kernel.numpy() ** 2))
    got = optim.l2_regularisation(wd, optim.decayed_in_loss(variables, "lars"))
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert optim.l2_regularisation(0.0, variables) == 0.0


@pytest.mark.fidelity
def test_momentum_is_nesterov_sgd_on_the_warmup_cosine_schedule_as_the_original():
    """--optimizer=momentum is the original's `SGD(lr, momentum, nesterov=True)`: three steps
    through the warm-up into the cosine, against the Nesterov update written out by hand
    (v <- m v - lr g; w <- w + m v - lr g, Keras' and tf-keras' form)."""
    from simclr_tf import config as cfg
    from simclr_tf import optim
    from simclr_tf.schedules import Schedule

    w0 = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    grads = [np.array([[0.3, -0.1], [0.2, 0.4]], np.float32),
             np.array([[-0.2, 0.5], [0.1, -0.3]], np.float32),
             np.array([[0.7, 0.2], [-0.4, 0.1]], np.float32)]
    base_lr, mom, batch, warmup, total = 0.4, 0.9, 512, 2, 5
    config = cfg.OptimizerConfig("momentum", base_lr, "linear", mom, 0.0, warmup_epochs=0)
    opt = optim.build_optimizer(config, batch, Schedule(total, warmup, 1))
    w = keras.Variable(w0, name="kernel")
    opt.build([w])

    peak = base_lr * batch / 256
    rates = [0.0, peak / 2, peak]          # steps 0 and 1 warm up; step 2 is the cosine's start
    v, w_ref = np.zeros_like(w0), w0.astype(np.float64)
    for g, lr in zip(grads, rates):
        opt.apply_gradients([(tf.constant(g), w)])
        v = mom * v - lr * g
        w_ref = w_ref + mom * v - lr * g
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-7)
    # Plain (heavy-ball) momentum would end elsewhere: the test tells the two apart.
    v_plain, w_plain = np.zeros_like(w0), w0.astype(np.float64)
    for g, lr in zip(grads, rates):
        v_plain = mom * v_plain - lr * g
        w_plain = w_plain + v_plain
    assert np.max(np.abs(w_plain - w_ref)) > 0.1


@pytest.mark.parametrize("num_examples,batch,epochs,warmup_epochs,total,warmup", [
    (1_281_167, 4096, 100, 10, 31_279, 3_127),   # ImageNet pretraining (r50 preset)
    (12_811, 1024, 60, 0, 751, 0),               # fine-tuning on 1% of ImageNet
    (60_000, 256, 10, 0.05, 2_344, 11),          # Fashion-MNIST
])
def test_schedule_counts_steps_as_the_reference_code(num_examples, batch, epochs, warmup_epochs,
                                                     total, warmup):
    from simclr_tf import config as cfg
    from simclr_tf.schedules import make_schedule
    schedule = make_schedule(
        cfg.TrainConfig(train_batch_size=batch, train_epochs=epochs, train_steps=0),
        cfg.OptimizerConfig(warmup_epochs=warmup_epochs), num_examples)
    assert (schedule.total_steps, schedule.warmup_steps) == (total, warmup)
    assert schedule.steps_per_epoch == num_examples // batch
    assert make_schedule(
        cfg.TrainConfig(train_batch_size=batch, train_epochs=epochs, train_steps=7),
        cfg.OptimizerConfig(warmup_epochs=0), num_examples).total_steps == 7
