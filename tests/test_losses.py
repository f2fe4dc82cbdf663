"""NT-Xent against a numpy reference, and the same loss/gradients on 1, 2 and 4 replicas."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.losses import cross_replica_concat, nt_xent, nt_xent_with_metrics


def numpy_nt_xent(z_a, z_b, temperature, normalize=True):
    """Mean over the a-anchors of -log softmax of the positive, plus the same over the b-anchors:
    the reference code's scale, twice the paper's L (the mean over all 2N anchors)."""
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z_a)
    sim = z @ z.T / temperature
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [sim[i, k] for k in range(2 * n) if k != i]
        losses.append(-(sim[i, positive] - np.log(np.sum(np.exp(others)))))
    return 2 * np.mean(losses)


@pytest.mark.parametrize("temperature,normalize", [(0.1, True), (0.5, True), (1.0, False)])
def test_nt_xent_matches_numpy(temperature, normalize):
    rng = np.random.default_rng(0)
    z_a = rng.normal(size=(6, 5)).astype(np.float32)
    z_b = rng.normal(size=(6, 5)).astype(np.float32)
    got = nt_xent(z_a, z_b, temperature=temperature, hidden_norm=normalize).numpy()
    np.testing.assert_allclose(got, numpy_nt_xent(z_a, z_b, temperature, normalize), rtol=1e-5)


def test_hand_computed_two_images():
    # Orthogonal unit vectors: a1=b1=e1, a2=b2=e2, tau=1. Anchor a1: positive sim 1, negatives
    # a2 (0) and b2 (0): -log(e / (e + 2)) for every anchor; the a-views' mean plus the b-views'.
    z = np.eye(2, dtype=np.float32)
    got = nt_xent(z, z, temperature=1.0).numpy()
    np.testing.assert_allclose(got, -2 * np.log(np.e / (np.e + 2)), rtol=1e-6)


def test_metrics_rank_each_a_view_among_the_b_views_as_the_reference_code():
    # a1 = (1, 0), a2 = (0.9, 0.44): a1 is closer to a2 (0.9) than to its positive b1 = (0.8, 0.6)
    # (0.8), but among the b-views (b1, b2 = (0, 1)) it ranks its positive first; a2 (sims 0.984
    # with b1, 0.44 with b2) ranks b1 above its own b2: accuracy 1/2. Entropy over the b-views.
    z_a = np.array([[1.0, 0.0], [0.9, 0.44]], np.float32)
    z_b = np.array([[0.8, 0.6], [0.0, 1.0]], np.float32)
    _, metrics = nt_xent_with_metrics(z_a, z_b, temperature=0.5, hidden_norm=False)
    assert metrics["contrast_acc"].numpy() == 0.5
    logits = z_a @ z_b.T / 0.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want_entropy = -np.mean(np.sum(probs * np.log(probs), axis=1))
    np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), want_entropy, rtol=1e-5)


def test_metrics_perfect_alignment():
    z = np.eye(4, dtype=np.float32)
    _, metrics = nt_xent_with_metrics(z, z, temperature=0.01)
    assert metrics["contrast_acc"].numpy() == 1.0
    assert metrics["contrast_entropy"].numpy() < 1e-3


def _distributed_loss_and_grads(num_replicas, z_a, z_b, temperature):
    devices = [f"/cpu:{i}" for i in range(num_replicas)]
    # ReductionToOneDevice: collective group keys restart at 1 for every MirroredStrategy, so
    # several strategies over different CPU sets cannot share one process with collectives.
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    n = len(z_a) // num_replicas
    with strategy.scope():
        w = tf.Variable(np.eye(z_a.shape[1], dtype=np.float32) * 1.5)

    def replica_fn(ctx_unused=None):
        ctx = tf.distribute.get_replica_context()
        i = ctx.replica_id_in_sync_group
        a = tf.constant(z_a)[i * n:(i + 1) * n]
        b = tf.constant(z_b)[i * n:(i + 1) * n]
        with tf.GradientTape() as tape:
            loss = nt_xent(a @ w, b @ w, temperature=temperature)
            scaled = loss / ctx.num_replicas_in_sync
        grad = tape.gradient(scaled, w)
        return loss, grad

    @tf.function
    def step():
        loss, grad = strategy.run(replica_fn)
        return (strategy.reduce("MEAN", loss, axis=None), strategy.reduce("SUM", grad, axis=None))

    loss, grad = step()
    return loss.numpy(), grad.numpy()


def test_same_loss_and_gradients_on_1_2_4_replicas():
    rng = np.random.default_rng(1)
    z_a = rng.normal(size=(8, 4)).astype(np.float32)
    z_b = rng.normal(size=(8, 4)).astype(np.float32)
    reference_loss, reference_grad = _distributed_loss_and_grads(1, z_a, z_b, 0.2)
    np.testing.assert_allclose(reference_loss, numpy_nt_xent(z_a @ np.eye(4) * 1.5,
                                                             z_b @ np.eye(4) * 1.5, 0.2),
                               rtol=1e-5)
    for replicas in (2, 4):
        loss, grad = _distributed_loss_and_grads(replicas, z_a, z_b, 0.2)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_cross_replica_concat_identity_outside_replica_context():
    x = tf.ones([3, 2])
    assert cross_replica_concat(x) is x
