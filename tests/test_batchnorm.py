"""The fused and the synchronised batch norm against the reference formula."""

import numpy as np
import tensorflow as tf

from simclr_tf.batchnorm import BatchNorm

EPS = 1e-5


def reference_bn(x, gamma, beta):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = x.var(axes)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta, mean, var


def _layer(x, synchronized=False, momentum=0.9):
    layer = BatchNorm(momentum=momentum, epsilon=EPS, synchronized=synchronized)
    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, x.shape[-1]).astype(np.float32))
    layer.beta.assign(np.linspace(-0.2, 0.3, x.shape[-1]).astype(np.float32))
    return layer


def test_fused_training_output_and_moving_stats_match_formula():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 5, 3)).astype(np.float32)
    layer = _layer(x)
    y = layer(x, training=True).numpy()
    expected, mean, var = reference_bn(x, layer.gamma.numpy(), layer.beta.numpy())
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)


def test_inference_uses_moving_statistics():
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    layer = _layer(x)
    layer.moving_mean.assign([1.0, 2.0, 3.0, 4.0])
    layer.moving_variance.assign([4.0, 4.0, 1.0, 1.0])
    y = layer(x, training=False).numpy()
    expected = ((x - [1, 2, 3, 4]) / np.sqrt(np.array([4, 4, 1, 1]) + EPS)
                * layer.gamma.numpy() + layer.beta.numpy())
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_2d_input_gradients_match_formula():
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    upstream = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    layer = _layer(x)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * upstream)
        g, b = tf.constant(layer.gamma.numpy()), tf.constant(layer.beta.numpy())
        tape.watch([g, b])
        mean, var = tf.nn.moments(xt, [0])
        ref = tf.reduce_sum(((xt - mean) * tf.math.rsqrt(var + EPS) * g + b) * upstream)
    got = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    want = tape.gradient(ref, [xt, g, b])
    for a, e in zip(got, want):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-3, atol=1e-4)


def test_synchronized_on_two_replicas_equals_global_batch():
    x = np.random.default_rng(4).normal(1.0, 2.0, size=(8, 3, 3, 2)).astype(np.float32)
    upstream = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        layer = _layer(x, synchronized=True)

    def replica_fn():
        i = tf.distribute.get_replica_context().replica_id_in_sync_group
        xi = tf.constant(x)[i * 4:(i + 1) * 4]
        ui = tf.constant(upstream)[i * 4:(i + 1) * 4]
        with tf.GradientTape() as tape:
            tape.watch(xi)
            loss = tf.reduce_sum(layer(xi, training=True) * ui)
        gx, gg = tape.gradient(loss, [xi, layer.gamma])
        return gx, gg

    @tf.function
    def step():
        gx, gg = strategy.run(replica_fn)
        return (tf.concat(strategy.experimental_local_results(gx), 0),
                strategy.reduce("SUM", gg, axis=None))

    gx, gg = step()
    # Reference: the single-replica fused layer on the whole batch.
    ref = _layer(x)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(ref(xt, training=True) * upstream)
    rgx, rgg = tape.gradient(loss, [xt, ref.gamma])
    np.testing.assert_allclose(gx.numpy(), rgx.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gg.numpy(), rgg.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance.numpy(),
                               rtol=1e-5)
