"""The ablation losses (SimCLR Table 4) and SupCon: hand-computed values, numpy references, finite
gradients, the same loss and gradients on 1, 2 and 4 replicas, and their flags' validation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as cfg
from simclr_tf import losses
from simclr_tf import pretrain
from simclr_tf.schedules import Schedule


def softplus(x):
    return math.log1p(math.exp(x))


def both_views(per_anchor):
    """The implementation's scale: the a-anchors' mean loss plus the b-anchors' (n each), i.e.
    twice the mean over all 2n anchors (the reference code's NT-Xent scale)."""
    return 2 * np.mean(per_anchor)


# --------------------------------------------------------------------------------------------
# Independent numpy references: one anchor at a time over the 2N views, like the paper's sums.

def _unit_views(z_a, z_b, normalize):
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return z @ z.T, len(z_a)


def _negatives(sim, i, positive, semi_hard):
    for k in range(len(sim)):
        if k in (i, positive):
            continue
        if semi_hard and not sim[i, k] < sim[i, positive]:
            continue
        yield k


def numpy_nt_logistic(z_a, z_b, temperature, normalize=True, semi_hard=False):
    sim, n = _unit_views(z_a, z_b, normalize)
    per_anchor = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        loss = softplus(-sim[i, positive] / temperature)
        loss += sum(softplus(sim[i, k] / temperature)
                    for k in _negatives(sim, i, positive, semi_hard))
        per_anchor.append(loss)
    return both_views(per_anchor)


def numpy_margin_triplet(z_a, z_b, margin, normalize=True, semi_hard=False):
    sim, n = _unit_views(z_a, z_b, normalize)
    per_anchor = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        per_anchor.append(sum(max(sim[i, k] - sim[i, positive] + margin, 0.0)
                              for k in _negatives(sim, i, positive, semi_hard)))
    return both_views(per_anchor)


def numpy_supcon(z_a, z_b, labels, temperature, normalize=True):
    sim, n = _unit_views(z_a, z_b, normalize)
    view_labels = np.concatenate([labels, labels])
    per_anchor = []
    for i in range(2 * n):
        others = [k for k in range(2 * n) if k != i]
        log_denominator = np.log(np.sum(np.exp(sim[i, others] / temperature)))
        positives = [k for k in others if k == (i + n) % (2 * n)
                     or (view_labels[i] >= 0 and view_labels[k] == view_labels[i])]
        per_anchor.append(-np.mean([sim[i, p] / temperature - log_denominator
                                    for p in positives]))
    return both_views(per_anchor)


def random_views(n=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32),
            rng.normal(size=(n, d)).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Hand-computed values.

# Unit vectors in 2-D: a1 = (1, 0), b1 = (0.6, 0.8), a2 = (0.8, 0.6), b2 = (0, 1). Similarities:
# a1.b1 = 0.6, a1.a2 = 0.8, a1.b2 = 0, b1.a2 = 0.96, b1.b2 = 0.8, a2.b2 = 0.6. So every positive
# has similarity 0.6, and the negatives per anchor are
#   a1: a2 0.8, b2 0      b1: a2 0.96, b2 0.8      a2: a1 0.8, b1 0.96      b2: a1 0, b1 0.8
HAND_A = np.array([[1.0, 0.0], [0.8, 0.6]], np.float32)
HAND_B = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)


def test_margin_triplet_hand_computed():
    # m = 1: a1: (0.8 - 0.6 + 1) + (0 - 0.6 + 1) = 1.6; b1: 1.36 + 1.2 = 2.56; a2: 2.56; b2: 1.6.
    loss, _ = losses.margin_triplet_with_metrics(HAND_A, HAND_B, margin=1.0)
    np.testing.assert_allclose(loss.numpy(), both_views([1.6, 2.56, 2.56, 1.6]), rtol=1e-6)
    # Semi-hard: only negatives below 0.6 remain: b2 for a1 (0.4) and a1 for b2 (0.4).
    loss, _ = losses.margin_triplet_with_metrics(HAND_A, HAND_B, margin=1.0,
                                                 semi_hard_negatives=True)
    np.testing.assert_allclose(loss.numpy(), both_views([0.4, 0, 0, 0.4]), rtol=1e-6)


def test_nt_logistic_hand_computed():
    positive = softplus(-0.6)  # every positive has similarity 0.6; tau = 1
    full = [positive + softplus(0.8) + softplus(0.0),     # a1
            positive + softplus(0.96) + softplus(0.8),    # b1
            positive + softplus(0.8) + softplus(0.96),    # a2
            positive + softplus(0.0) + softplus(0.8)]     # b2
    loss, _ = losses.nt_logistic_with_metrics(HAND_A, HAND_B, temperature=1.0)
    np.testing.assert_allclose(loss.numpy(), both_views(full), rtol=1e-6)
    semi_hard = [positive + softplus(0.0), positive, positive, positive + softplus(0.0)]
    loss, _ = losses.nt_logistic_with_metrics(HAND_A, HAND_B, temperature=1.0,
                                              semi_hard_negatives=True)
    np.testing.assert_allclose(loss.numpy(), both_views(semi_hard), rtol=1e-6)


def test_supcon_hand_computed():
    # a1 = b1 = e1, a2 = b2 = e2, tau = 1. Each anchor's other views have similarities 1, 0, 0.
    z = np.eye(2, dtype=np.float32)
    log_denominator = math.log(math.e + 2)
    # Same class: all three other views are positives: -(1/3)((1 - lse) + 2 (0 - lse)).
    loss, _ = losses.supcon_with_metrics(z, z, np.array([3, 3]), temperature=1.0)
    np.testing.assert_allclose(loss.numpy(), 2 * (log_denominator - 1 / 3), rtol=1e-6)
    # Different classes: the only positive is the other view, which is NT-Xent.
    loss, _ = losses.supcon_with_metrics(z, z, np.array([3, 4]), temperature=1.0)
    np.testing.assert_allclose(loss.numpy(), 2 * (log_denominator - 1), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Against numpy on random data.

@pytest.mark.parametrize("temperature,normalize,semi_hard",
                         [(0.1, True, False), (0.5, True, True), (1.0, False, False)])
def test_nt_logistic_matches_numpy(temperature, normalize, semi_hard):
    z_a, z_b = random_views()
    got, _ = losses.nt_logistic_with_metrics(z_a, z_b, temperature, normalize, semi_hard)
    np.testing.assert_allclose(
        got.numpy(), numpy_nt_logistic(z_a, z_b, temperature, normalize, semi_hard), rtol=1e-5)


@pytest.mark.parametrize("margin,normalize,semi_hard",
                         [(1.0, True, False), (0.5, True, True), (2.0, False, True)])
def test_margin_triplet_matches_numpy(margin, normalize, semi_hard):
    z_a, z_b = random_views()
    got, _ = losses.margin_triplet_with_metrics(z_a, z_b, margin, normalize, semi_hard)
    np.testing.assert_allclose(
        got.numpy(), numpy_margin_triplet(z_a, z_b, margin, normalize, semi_hard), rtol=1e-5)


@pytest.mark.parametrize("temperature,normalize", [(0.1, True), (1.0, False)])
def test_supcon_matches_numpy(temperature, normalize):
    z_a, z_b = random_views()
    labels = np.array([0, 1, 0, 2, -1, 1], np.int32)
    got, _ = losses.supcon_with_metrics(z_a, z_b, labels, temperature, normalize)
    np.testing.assert_allclose(
        got.numpy(), numpy_supcon(z_a, z_b, labels, temperature, normalize), rtol=1e-5)


def test_supcon_with_distinct_or_missing_labels_is_nt_xent():
    z_a, z_b = random_views()
    reference = losses.nt_xent(z_a, z_b, temperature=0.2).numpy()
    for labels in (np.arange(6), np.full(6, -1)):
        got, _ = losses.supcon_with_metrics(z_a, z_b, labels, temperature=0.2)
        np.testing.assert_allclose(got.numpy(), reference, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The dispatcher, gradients and metrics.

VARIANTS = [
    dict(name="nt_xent"),
    dict(name="nt_logistic"),
    dict(name="nt_logistic", semi_hard_negatives=True),
    dict(name="margin_triplet"),
    dict(name="margin_triplet", semi_hard_negatives=True),
    dict(name="supcon"),
]


def _variant_id(variant):
    return variant["name"] + ("_sh" if variant.get("semi_hard_negatives") else "")


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_every_loss_has_finite_gradients_and_the_metrics(variant):
    z_a, z_b = (tf.Variable(z) for z in random_views(seed=3))
    labels = tf.constant([0, 1, 0, 1, 2, 2])
    with tf.GradientTape() as tape:
        loss, metrics = losses.contrastive_loss(z_a=z_a, z_b=z_b, labels=labels,
                                                temperature=0.5, **variant)
    grads = tape.gradient(loss, [z_a, z_b])
    assert np.isfinite(loss.numpy()) and loss.numpy() > 0
    for grad in grads:
        assert np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0)
    assert set(metrics) == {"contrast_acc", "contrast_entropy"}
    assert 0.0 <= metrics["contrast_acc"].numpy() <= 1.0


def test_every_loss_compiles_with_xla_and_matches_eager():
    z_a, z_b = random_views(seed=4)
    labels = tf.constant([0, 1, 0, 1, 2, -1])
    for variant in VARIANTS:
        def loss_fn(a, b, variant=variant):
            return losses.contrastive_loss(z_a=a, z_b=b, labels=labels, temperature=0.5,
                                           **variant)[0]
        compiled = tf.function(loss_fn, jit_compile=True)(z_a, z_b)
        np.testing.assert_allclose(compiled.numpy(), loss_fn(z_a, z_b).numpy(), rtol=1e-5,
                                   err_msg=str(variant))


def test_dispatcher_nt_xent_is_the_original():
    z_a, z_b = random_views()
    got, got_metrics = losses.contrastive_loss("nt_xent", z_a, z_b, temperature=0.3)
    want, want_metrics = losses.nt_xent_with_metrics(z_a, z_b, 0.3)
    assert got.numpy() == want.numpy()
    assert got_metrics["contrast_acc"].numpy() == want_metrics["contrast_acc"].numpy()


def test_metrics_match_nt_xent_metrics():
    # The metrics of the new losses use NT-Xent's definitions on the same logits.
    z_a, z_b = random_views(seed=5)
    _, want = losses.nt_xent_with_metrics(z_a, z_b, 0.5)
    _, got = losses.nt_logistic_with_metrics(z_a, z_b, 0.5)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5)


def test_dispatcher_rejects_bad_arguments():
    z_a, z_b = random_views()
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.contrastive_loss("infonce", z_a, z_b)
    with pytest.raises(ValueError, match="semi_hard_negatives applies to"):
        losses.contrastive_loss("nt_xent", z_a, z_b, semi_hard_negatives=True)
    with pytest.raises(ValueError, match="needs the batch labels"):
        losses.contrastive_loss("supcon", z_a, z_b)


# --------------------------------------------------------------------------------------------
# Cross-replica: the same loss and gradients on 1, 2 and 4 replicas.

# Every code path once (the semi-hard mask is shared); NT-Xent has its own test in test_losses.
REPLICA_VARIANTS = [dict(name="nt_logistic"), dict(name="margin_triplet", semi_hard_negatives=True),
                    dict(name="supcon")]


def _losses_and_grads(strategy, z_a, z_b, labels):
    replicas = strategy.num_replicas_in_sync
    n = len(z_a) // replicas
    with strategy.scope():
        w = tf.Variable(np.eye(z_a.shape[1], dtype=np.float32) * 1.5)

    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        i = ctx.replica_id_in_sync_group
        a = tf.constant(z_a)[i * n:(i + 1) * n]
        b = tf.constant(z_b)[i * n:(i + 1) * n]
        local_labels = tf.constant(labels)[i * n:(i + 1) * n]
        results = []
        for variant in REPLICA_VARIANTS:
            with tf.GradientTape() as tape:
                loss, _ = losses.contrastive_loss(z_a=a @ w, z_b=b @ w, labels=local_labels,
                                                  temperature=0.3, margin=0.5, **variant)
                scaled = loss / ctx.num_replicas_in_sync
            results.append((loss, tape.gradient(scaled, w)))
        return results

    @tf.function
    def step():
        per_replica = strategy.run(replica_fn)
        return [(strategy.reduce("MEAN", loss, axis=None), strategy.reduce("SUM", grad, axis=None))
                for loss, grad in per_replica]

    return [(loss.numpy(), grad.numpy()) for loss, grad in step()]


def test_same_losses_and_gradients_on_1_2_4_replicas():
    z_a, z_b = random_views(n=8, d=4, seed=1)
    labels = np.array([0, 1, 2, 0, 1, 2, -1, 0], np.int32)
    reference = _losses_and_grads(tf.distribute.get_strategy(), z_a, z_b, labels)
    scaled = 1.5 * z_a, 1.5 * z_b
    np.testing.assert_allclose(reference[0][0], numpy_nt_logistic(*scaled, 0.3), rtol=1e-5)
    np.testing.assert_allclose(reference[1][0], numpy_margin_triplet(*scaled, 0.5, semi_hard=True),
                               rtol=1e-5)
    np.testing.assert_allclose(reference[2][0], numpy_supcon(*scaled, labels, 0.3), rtol=1e-5)
    for replicas in (2, 4):
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice())
        got = _losses_and_grads(strategy, z_a, z_b, labels)
        for variant, (loss, grad), (want_loss, want_grad) in zip(REPLICA_VARIANTS, got,
                                                                 reference):
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(variant))
            np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6,
                                       err_msg=str(variant))


# --------------------------------------------------------------------------------------------
# Config: validation with one-line messages, and old config.json files still load.

@pytest.mark.parametrize("loss_config,message", [
    (cfg.LossConfig(loss="triplet"), "loss must be one of"),
    (cfg.LossConfig(loss="nt_xent", semi_hard_negatives=True), "semi_hard_negatives applies to"),
    (cfg.LossConfig(loss="supcon", semi_hard_negatives=True), "semi_hard_negatives applies to"),
    (cfg.LossConfig(loss="margin_triplet", margin=-1.0), "margin must be >= 0"),
])
def test_bad_loss_settings_raise_one_line_config_errors(loss_config, message):
    with pytest.raises(cfg.ConfigError, match=message) as error:
        cfg.validate(cfg.RunConfig(loss=loss_config))
    assert "\n" not in str(error.value)


def test_bad_head_hidden_dim_raises():
    with pytest.raises(cfg.ConfigError, match="proj_head_hidden_dim must be >= 0"):
        cfg.validate(cfg.RunConfig(head=cfg.HeadConfig(proj_head_hidden_dim=-1)))


def test_new_fields_round_trip_and_old_json_loads_defaults():
    config = cfg.RunConfig(loss=cfg.LossConfig(loss="margin_triplet", semi_hard_negatives=True,
                                               margin=0.4),
                           head=cfg.HeadConfig(proj_head_hidden_dim=64))
    assert cfg.RunConfig.from_json(config.to_json()) == config
    old = '{"loss": {"temperature": 0.5, "hidden_norm": true}, "head": {"proj_out_dim": 64}}'
    loaded = cfg.RunConfig.from_json(old)
    assert loaded.loss == cfg.LossConfig(temperature=0.5)
    assert loaded.loss.loss == "nt_xent" and loaded.head.proj_head_hidden_dim == 0


def test_supcon_on_an_unlabelled_dataset_is_a_config_error(tmp_path):
    image = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image)
    config = cfg.RunConfig(data=cfg.DataConfig(dataset=f"folder:{tmp_path}", image_size=8),
                           loss=cfg.LossConfig(loss="supcon"),
                           train=cfg.TrainConfig(model_dir=str(tmp_path / "run")))
    with pytest.raises(cfg.ConfigError, match="supcon needs labels"):
        pretrain.run_pretraining(config, tf.distribute.get_strategy())


def test_replica_step_uses_the_configured_loss_and_head_width():
    config = cfg.RunConfig(
        data=cfg.DataConfig(image_size=8),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        head=cfg.HeadConfig(proj_out_dim=8, proj_head_hidden_dim=24),
        loss=cfg.LossConfig(loss="supcon", temperature=0.5),
        optimizer=cfg.OptimizerConfig(optimizer="momentum", learning_rate=0.1, warmup_epochs=0),
        train=cfg.TrainConfig(train_batch_size=4, lineareval_while_pretraining=False))
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(), schedule)
    assert trainer.head.dense_layers[0].units == 24
    rng = np.random.default_rng(0)
    views = rng.uniform(size=(2, 4, 8, 8, 3)).astype(np.float32)
    batch = {"view_a": views[0], "view_b": views[1], "label": np.array([0, 0, 1, 1], np.int32)}
    # The expected loss from the weights before the step (training-mode BN uses batch statistics).
    h = trainer.encoder(np.concatenate(views), training=True)
    z_a, z_b = np.split(trainer.head(h, training=True)[0].numpy(), 2)
    expected = numpy_supcon(z_a, z_b, batch["label"], 0.5)
    metrics = tf.function(trainer.replica_step)(batch)
    np.testing.assert_allclose(metrics["contrast_loss"].numpy(), expected, rtol=1e-4)
    assert expected != pytest.approx(numpy_supcon(z_a, z_b, np.arange(4), 0.5))
