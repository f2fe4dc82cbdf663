"""Pretraining: same loss and update on 1 and 2 replicas; XLA compiles; views made in the step
give the host views' losses; a run checkpoints, exports and resumes; tf.data service; mixed precision."""

import contextlib
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context as eager_context

from simclr_tf import config as cfg
from simclr_tf import losses, pretrain
from simclr_tf.schedules import Schedule, make_schedule

import updates


def _mirrored(n):
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(n)], cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.fixture(scope="module")
def one_replica(pretrain_config, views_batch):
    """(config, initial weights, batch, one replica's update, tolerances) for the tests below."""
    config = pretrain_config()
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    reference = pretrain.Pretrainer(config, tf.distribute.get_strategy(), schedule, num_classes=10)
    weights = [part.get_weights() for part in (reference.encoder, reference.head, reference.probe)]
    batch = views_batch()
    update, tolerances = updates.update_tolerances(config, weights, batch)
    return config, weights, batch, update, tolerances


@pytest.mark.fidelity
def test_one_and_two_replicas_give_the_same_loss_and_update(one_replica):
    """Global BN + gathered negatives + summed gradients: every variable's update on 2 replicas
    equals 1 replica's, within a multiple of the float-order noise floor."""
    config, weights, batch, update, tolerances = one_replica
    m1, _, _ = updates.pretrain_step(tf.distribute.get_strategy(), weights, batch, config)
    m2, _, update2 = updates.pretrain_step(_mirrored(2), weights, batch, config)
    for key in ("contrast_loss", "probe_loss", "contrast_acc"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    differences = updates.worst_relative_differences(update, update2)
    assert differences.keys() == tolerances.keys()
    for group, difference in differences.items():
        assert difference <= tolerances[group], (group, difference, tolerances)


@pytest.mark.fidelity
@pytest.mark.parametrize("broken", ["local batch norm", "local negatives"])
def test_two_replicas_differ_without_global_bn_or_cross_replica_negatives(
        broken, one_replica, monkeypatch):
    """What makes 2 replicas equal 1: with per-replica batch norm or negatives from the replica's
    own batch only, some group's update moves far beyond its tolerance."""
    config, weights, batch, update, tolerances = one_replica
    if broken == "local batch norm":
        config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder,
                                                                          global_bn=False))
    else:
        monkeypatch.setattr(losses, "cross_replica_concat", lambda tensor: tensor)
        monkeypatch.setattr(losses, "_replica_offset", lambda local_batch: 0)
    _, _, update2 = updates.pretrain_step(_mirrored(2), weights, batch, config)
    differences = updates.worst_relative_differences(update, update2)
    assert max(differences[g] / tolerances[g] for g in differences) > 100, differences


def test_replica_step_compiles_with_xla(pretrain_config, views_batch):
    config = pretrain_config(jit_compile=True)
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(), schedule, num_classes=10)
    step = tf.function(trainer.replica_step, jit_compile=True)
    batch = {k: tf.constant(v) for k, v in views_batch().items()}
    out = step(batch)
    assert np.isfinite(out["loss"].numpy())
    assert int(trainer.step.numpy()) == 1


@pytest.mark.parametrize("replicas,jit_compile", [(2, False), (1, True)])
def test_views_made_in_the_step_give_the_host_views_losses(pretrain_config, replicas,
                                                           jit_compile):
    """--augment_on_device: the pipeline's uint8 batches, augmented inside the replica's step (on
    each replica's device; by XLA with --jit_compile), give the losses of the host pipeline's views
    of the same batches and seeds. (The losses only: the update is the same code either way, and
    tracing a second backward pass over two replicas would cost a minute.)"""
    strategy = _mirrored(replicas) if replicas > 1 else tf.distribute.get_strategy()
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    base = pretrain_config(jit_compile=jit_compile)
    config = {on_device: dataclasses.replace(base, augment=dataclasses.replace(
        base.augment, use_blur=True, augment_on_device=on_device)) for on_device in (False, True)}
    trainer = pretrain.Pretrainer(config[True], strategy, schedule, num_classes=10)
    batches = {on_device: next(iter(strategy.distribute_datasets_from_function(
        lambda ctx, c=c: pretrain.make_dataset_fn(c)(ctx, 5)))) for on_device, c in config.items()}
    assert "image" in strategy.experimental_local_results(batches[True])[0]
    replica_losses = tf.function(trainer.loss_and_metrics, jit_compile=jit_compile)

    @tf.function
    def losses(batch):
        loss, metrics = strategy.run(replica_losses, args=(batch,))
        return [strategy.reduce("MEAN", v, axis=None)
                for v in (loss, metrics["contrast_loss"], metrics["probe_loss"])]

    host, device = losses(batches[False]), losses(batches[True])
    np.testing.assert_allclose([float(v) for v in device], [float(v) for v in host], rtol=1e-5)


def test_training_runs_checkpoints_and_resumes_at_the_same_step(tmp_path, pretrain_config,
                                                               image_folder):
    dataset = image_folder(tmp_path / "images")
    model_dir = tmp_path / "run"
    config = pretrain_config(model_dir, train_steps=4, summary_images=2)
    config = cfg.RunConfig(**{**config.__dict__,
                              "data": cfg.DataConfig(dataset=dataset, image_size=16)})
    trainer, metrics = pretrain.run_pretraining(config, tf.distribute.get_strategy())
    assert int(trainer.step.numpy()) == 4
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["contrast_acc"] <= 1.0
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    assert any(p.name.startswith("events.out.tfevents") for p in model_dir.iterdir())
    assert sorted(os.listdir(model_dir / "export")) == ["4"]
    saved = {v.path: v.numpy() for v in trainer.encoder.variables + trainer.head.variables}
    saved_velocities = [v.numpy() for v in trainer.optimizer.velocities]

    # The same command with a longer schedule resumes from step 4 with the same weights...
    longer = cfg.RunConfig(**{**config.__dict__,
                              "train": cfg.TrainConfig(**{**config.train.__dict__,
                                                          "train_steps": 6})})
    restored = pretrain.Pretrainer(longer, tf.distribute.get_strategy(),
                                   make_schedule(longer.train, longer.optimizer, 16), 2)
    tf.train.Checkpoint(**restored.checkpoint_items()).restore(
        tf.train.latest_checkpoint(str(model_dir)))
    assert int(restored.step.numpy()) == 4
    for v in restored.encoder.variables + restored.head.variables:  # BN statistics too
        np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)
    assert any(np.any(v != 0) for v in saved_velocities)
    for v, expected in zip(restored.optimizer.velocities, saved_velocities):
        np.testing.assert_array_equal(v.numpy(), expected)
    # ...and stops at the new total; a third run with nothing left to do keeps the step.
    trainer, _ = pretrain.run_pretraining(longer, tf.distribute.get_strategy())
    assert int(trainer.step.numpy()) == 6
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-6")
    assert sorted(os.listdir(model_dir / "export")) == ["4", "6"]
    trainer, _ = pretrain.run_pretraining(longer, tf.distribute.get_strategy())
    assert int(trainer.step.numpy()) == 6
    assert sorted(os.listdir(model_dir / "export")) == ["4", "6"]
    # export_every counts checkpoints from step 0, not from where this process resumed: with a
    # checkpoint every 2 steps and export_every=2, exports at multiples of 4 (and the end).
    every_other = cfg.RunConfig(**{**config.__dict__, "train": cfg.TrainConfig(
        **{**config.train.__dict__, "train_steps": 10, "export_every": 2})})
    pretrain.run_pretraining(every_other, tf.distribute.get_strategy())
    assert sorted(os.listdir(model_dir / "export"), key=int) == ["4", "6", "8", "10"]


def test_training_reads_from_a_tf_data_service(tmp_path, pretrain_config, image_folder):
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=dispatcher.target.split("://")[1]))
    dataset = image_folder(tmp_path / "images")
    config = pretrain_config(tmp_path / "run", train_steps=2)
    config = cfg.RunConfig(**{**config.__dict__, "data": cfg.DataConfig(
        dataset=dataset, image_size=16, tf_data_service=dispatcher.target)})
    trainer, metrics = pretrain.run_pretraining(config, tf.distribute.get_strategy())
    assert int(trainer.step.numpy()) == 2 and np.isfinite(metrics["loss"])
    # The service workers draw their own seeds: two reads of the stream differ.
    fn = pretrain.make_dataset_fn(config)
    first = next(iter(fn(tf.distribute.InputContext(), 0)))["view_a"].numpy()
    second = next(iter(fn(tf.distribute.InputContext(), 0)))["view_a"].numpy()
    assert not np.array_equal(first, second)
    del worker


def test_tf_data_service_workers_make_different_streams_under_a_global_seed(tmp_path,
                                                                            image_folder):
    """run.py seeds TensorFlow globally (keras.utils.set_random_seed). Built as make_dataset_fn
    builds it for the service (`_unseeded_ops`), the pipeline's unseeded ops draw their seeds on
    each worker: 2 workers' first batches differ. Built under the global seed, each worker makes
    the same batches (every batch comes twice)."""
    import keras
    from simclr_tf import data as data_lib

    dispatcher = tf.data.experimental.service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    workers = [tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address)) for _ in range(2)]
    dataset = image_folder(tmp_path / "images")

    def batches_from_both_workers(unseeded):
        keras.utils.set_random_seed(0)
        with pretrain._unseeded_ops() if unseeded else contextlib.nullcontext():
            stream = data_lib.pretrain_dataset(dataset, "train", 2, 8, seed=None, use_blur=False)
        assert eager_context.global_seed() == 0  # set again once the pipeline is built
        # Finite per worker, so that the reader takes every batch of both workers.
        stream = stream.take(3).apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
            service=dispatcher.target))
        return {batch["view_b"].tobytes() for batch in stream.as_numpy_iterator()}

    try:
        assert len(batches_from_both_workers(unseeded=True)) == 6
        assert len(batches_from_both_workers(unseeded=False)) == 3
    finally:
        tf.random.set_seed(None)
    del workers


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_step_keeps_float32_variables_and_loss(precision, pretrain_config,
                                                               views_batch):
    import keras
    keras.mixed_precision.set_dtype_policy(f"mixed_{precision}")
    try:
        config = pretrain_config(precision=precision)
        schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
        trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(), schedule,
                                      num_classes=10)
        before = [v.numpy() for v in trainer.encoder.trainable_variables]
        step = tf.function(trainer.replica_step)
        batch = {k: tf.constant(v) for k, v in views_batch().items()}
        for _ in range(3):
            # float16: a step whose scaled gradients overflow is skipped, and the dynamic loss
            # scale (2^15 at first) halves; the next one applies.
            out = step(batch)
            if int(trainer.step.numpy()) == 1:
                break
        assert int(trainer.step.numpy()) == 1
        assert trainer.encoder(tf.zeros([1, 16, 16, 3])).dtype == precision
        assert all(v.dtype == "float32" for v in trainer.encoder.variables)
        assert out["contrast_loss"].dtype == tf.float32 and np.isfinite(out["loss"].numpy())
        changed = [not np.array_equal(b, v.numpy())
                   for b, v in zip(before, trainer.encoder.trainable_variables)]
        assert any(changed)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.fidelity
def test_bfloat16_step_moves_the_weights_as_float32_does(pretrain_config, views_batch):
    """--precision=auto picks bfloat16 on CPUs with AVX512_BF16: its step must be float32's step
    up to bfloat16's rounding of activations (8 bits of mantissa), far nearer to it than float32's
    step on other images is.

    Measured (worst variable per group, bfloat16 against float32): kernels 0.23-0.24, batch norm
    0.25, its statistics 0.004, biases 0.004; float32 on other images: 1.4, 1.7, 0.24, 0.005.
    Weights kept in bfloat16 (the `bfloat16` policy instead of `mixed_bfloat16`) lose LARS's small
    updates to rounding and fail it."""
    import keras
    batch, other = views_batch(seed=0), views_batch(seed=1)
    other["label"] = batch["label"]
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    config32 = pretrain_config()
    reference = pretrain.Pretrainer(config32, tf.distribute.get_strategy(), schedule, 10)
    weights = [part.get_weights() for part in (reference.encoder, reference.head, reference.probe)]
    one = tf.distribute.get_strategy()
    _, _, update32 = updates.pretrain_step(one, weights, batch, config32)
    _, _, elsewhere = updates.pretrain_step(one, weights, other, config32)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        _, trainer, update16 = updates.pretrain_step(one, weights, batch,
                                                     pretrain_config(precision="bfloat16"))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert trainer.encoder.compute_dtype == "bfloat16"
    tolerances = {"kernel": 0.5, "bn": 0.5, "bn_statistics": 0.01, "bias": 0.01}  # 2x measured
    differences = updates.worst_relative_differences(update32, update16)
    for group, difference in differences.items():
        assert difference <= tolerances[group], (group, differences)
    unrelated = updates.worst_relative_differences(update32, elsewhere)
    assert min(unrelated[g] / tolerances[g] for g in ("kernel", "bn")) > 2, unrelated


@pytest.mark.fidelity
def test_float16_with_loss_scaling_on_two_replicas_updates_as_one(pretrain_config, views_batch):
    """The GPU recipe's float16 step (a LossScaleOptimizer around LARS) under MirroredStrategy:
    the replicas skip the same overflowing calls (the loss scale and its finiteness check are
    global) and then apply one replica's update, within 3x what float16 itself moves it from the
    float32 update (and the same batch permuted). Per-replica batch norm breaks that by far.

    Measured (worst variable per group): 2 replicas against 1, kernels 0.062 and batch norm 0.075;
    float16 against float32, 0.067 and 0.071; per-replica batch norm, 0.98 and 1.14."""
    import keras
    batch = views_batch()
    permuted = {k: v[updates.PERMUTATION] for k, v in batch.items()}
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    config32 = pretrain_config()
    reference = pretrain.Pretrainer(config32, tf.distribute.get_strategy(), schedule, 10)
    weights = [part.get_weights() for part in (reference.encoder, reference.head, reference.probe)]
    _, _, update32 = updates.pretrain_step(tf.distribute.get_strategy(), weights, batch, config32)
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        config = pretrain_config(precision="float16")
        local_bn = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder,
                                                                           global_bn=False))
        one = tf.distribute.get_strategy()
        m1, t1, update1 = updates.pretrain_step(one, weights, batch, config, max_calls=20)
        m2, t2, update2 = updates.pretrain_step(_mirrored(2), weights, batch, config,
                                                max_calls=20)
        _, _, shuffled = updates.pretrain_step(one, weights, permuted, config, max_calls=20)
        _, _, broken = updates.pretrain_step(_mirrored(2), weights, batch, local_bn,
                                             max_calls=20)
        scales = [float(t.optimizer.dynamic_scale.numpy()) for t in (t1, t2)]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert int(t1.step.numpy()) == int(t2.step.numpy()) == 1
    assert m1["calls"] == m2["calls"] and scales[0] == scales[1], (m1["calls"], m2["calls"], scales)
    assert m1["contrast_loss"] == pytest.approx(m2["contrast_loss"], rel=1e-3)
    permutation_floor = updates.worst_relative_differences(update1, shuffled)
    float16_floor = updates.worst_relative_differences(update32, update1)
    tolerances = {group: 3 * max(float16_floor[group], permutation_floor[group])
                  for group in ("kernel", "bn", "bias")}
    # Skipped calls still move the batch-norm statistics, so float32 (one call) is no floor there.
    tolerances["bn_statistics"] = updates.FLOOR_MULTIPLE * max(
        permutation_floor["bn_statistics"], updates.FLOOR_HERE["bn_statistics"])
    differences = updates.worst_relative_differences(update1, update2)
    for group, difference in differences.items():
        assert difference <= tolerances[group], (group, differences, tolerances)
    local = updates.worst_relative_differences(update1, broken)
    assert min(local[g] / tolerances[g] for g in ("kernel", "bn")) > 2, (local, tolerances)


def test_views_made_inside_an_xla_compiled_step_equal_the_host_views(pretrain_config):
    """--augment_on_device --jit_compile (the accelerator recipe): the views XLA makes inside the
    step, blur included, are the host pipeline's views of the same images and seeds, pixel by
    pixel (the losses test above compares only what they lead to)."""
    from simclr_tf import data as data_lib
    base = pretrain_config(jit_compile=True)
    config = {on_device: dataclasses.replace(base, augment=dataclasses.replace(
        base.augment, use_blur=True, augment_on_device=on_device)) for on_device in (False, True)}
    batches = {on_device: next(iter(pretrain.make_dataset_fn(c)(tf.distribute.InputContext(), 5)))
               for on_device, c in config.items()}
    assert data_lib.IMAGE in batches[True] and data_lib.IMAGE not in batches[False]

    @tf.function(jit_compile=True)
    def views_in_step(batch):  # as Pretrainer.loss_and_metrics makes them in a step XLA compiles
        return data_lib.views_of_batch(batch, made_in="graph",
                                       **pretrain.view_settings(config[True]))

    made = views_in_step(batches[True])
    for key in (data_lib.VIEW_A, data_lib.VIEW_B):
        # Equal bit for bit on the 2-core EPYC (2026-12-07); 1e-5 leaves room for another CPU's
        # float order in the blur's matmuls.
        np.testing.assert_allclose(made[key].numpy(), batches[False][key].numpy(), rtol=0,
                                   atol=1e-5)
