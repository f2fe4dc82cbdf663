"""Distillation: the loss against hand-computed values, a frozen teacher, self- and big-to-small
distillation steps, a tiny distillation run through the CLI, and --train_examples."""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoints, distill, finetune
from simclr_tf import config as cfg
from simclr_tf.schedules import Schedule


def test_distillation_loss_matches_hand_computation():
    student = [[1.0, 2.0, 3.0]]
    teacher = [[3.0, 2.0, 1.0]]
    # tau = 2: teacher probabilities softmax([1.5, 1, 0.5]), student log-softmax of [0.5, 1, 1.5].
    z = math.exp(1.5) + math.exp(1.0) + math.exp(0.5)
    p = [math.exp(1.5) / z, math.exp(1.0) / z, math.exp(0.5) / z]
    log_q = [0.5 - math.log(z), 1.0 - math.log(z), 1.5 - math.log(z)]
    expected = -(p[0] * log_q[0] + p[1] * log_q[1] + p[2] * log_q[2])
    assert expected == pytest.approx(1.3403, abs=1e-4)
    loss = distill.distillation_loss(tf.constant(student), tf.constant(teacher), 2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # tau = 1 and a one-hot-like teacher: the ordinary cross-entropy of the teacher's argmax.
    sharp = distill.distillation_loss(tf.constant(student), tf.constant([[0.0, 0.0, 100.0]]), 1.0)
    assert float(sharp) == pytest.approx(math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3,
                                         rel=1e-5)
    # The loss of a batch is the mean over its rows.
    both = distill.distillation_loss(tf.constant(student * 2), tf.constant(teacher + [[0.0] * 3]),
                                     2.0)
    uniform = math.log(z) - (0.5 + 1.0 + 1.5) / 3  # teacher [0, 0, 0]: uniform probabilities
    assert float(both) == pytest.approx((expected + uniform) / 2, rel=1e-6)


def test_distillation_gradient_reaches_the_student_only():
    student = tf.Variable([[0.5, -0.5]])
    teacher = tf.Variable([[2.0, 0.0]])
    with tf.GradientTape(persistent=True) as tape:
        loss = distill.distillation_loss(student, teacher, 1.0)
    grad_student = tape.gradient(loss, student).numpy()
    assert tape.gradient(loss, teacher) is None
    # d/ds of -sum p log softmax(s) = softmax(s) - p.
    q = np.exp([0.5, -0.5]) / np.exp([0.5, -0.5]).sum()
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    np.testing.assert_allclose(grad_student[0], q - p, rtol=1e-5)


def test_masked_cross_entropy():
    logits = tf.constant([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    labels = tf.constant([0, 1, 1])
    value = distill.masked_cross_entropy(logits, labels, tf.constant([1.0, 1.0, 0.0]))
    expected = (math.log(2) + (math.log(math.exp(2) + 1) - 0.0)) / 2
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert float(distill.masked_cross_entropy(logits, labels, tf.zeros([3]))) == 0.0


def _teacher_run(config, num_classes, depth=18):
    """A fine-tuning run directory (config.json + one checkpoint) with random weights."""
    config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder,
                                                                     resnet_depth=depth))
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    teacher = finetune.Finetuner(config, tf.distribute.get_strategy(), schedule, num_classes)
    model_dir = config.train.model_dir
    cfg.save(config, model_dir)
    manager = checkpoints.manager(tf.train.Checkpoint(**teacher.checkpoint_items()), model_dir,
                                  1, teacher.step)
    manager.save(checkpoint_number=0)
    return teacher


@pytest.mark.parametrize("teacher_depth,jit_compile", [(18, False), (34, False), (18, True)],
                         ids=["self", "big_to_small", "self_xla"])
def test_distiller_step_keeps_the_teacher_frozen(tmp_path, teacher_depth, jit_compile,
                                                 finetune_config, colour_data):
    original = _teacher_run(finetune_config(tmp_path / "teacher"), colour_data.num_classes,
                            teacher_depth)
    config = finetune_config(tmp_path / "student")
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, train_mode="distill",
                                          jit_compile=jit_compile),
        distill=cfg.DistillConfig(str(tmp_path / "teacher"), 2.0, 0.25))
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    trainer = distill.Distiller(config, tf.distribute.get_strategy(), schedule,
                                colour_data.num_classes,
                                distill.resolve_teacher(config.distill.teacher))
    for a, b in zip(trainer.teacher.encoder.variables, original.model.encoder.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    teacher_before = {v.path: v.numpy().copy() for v in trainer.teacher.encoder.variables}
    student_before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    batch = colour_data.batch()
    batch["labelled"] = tf.constant([1.0, 0.0] * 6)
    loss, parts = trainer.loss_and_metrics(batch)
    assert float(loss) == pytest.approx(
        0.75 * float(parts["distill_loss"]) + 0.25 * float(parts["label_loss"]), rel=1e-5)
    metrics = trainer.make_train_loop()(iter(tf.data.Dataset.from_tensors(batch).repeat()),
                                        tf.constant(2))
    assert np.isfinite(float(metrics["loss"]))
    for v in trainer.teacher.encoder.variables:
        np.testing.assert_array_equal(v.numpy(), teacher_before[v.path], err_msg=v.path)
    assert any(not np.array_equal(v.numpy(), b)
               for v, b in zip(trainer.model.trainable_variables, student_before))


def test_teacher_of_other_classes_is_refused(tmp_path, finetune_config):
    _teacher_run(finetune_config(tmp_path / "teacher"), num_classes=5)
    config = finetune_config(tmp_path / "student")
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, train_mode="distill"),
        distill=cfg.DistillConfig(str(tmp_path / "teacher"), 1.0, 0.0))
    schedule = Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=10)
    with pytest.raises(finetune.FinetuneError, match="predicts 5 classes but fashion_mnist has 3"):
        distill.Distiller(config, tf.distribute.get_strategy(), schedule, 3,
                          distill.resolve_teacher(config.distill.teacher))


def test_teacher_must_be_a_fine_tuned_run(tmp_path):
    cfg.save(cfg.RunConfig(), str(tmp_path))
    with pytest.raises(finetune.FinetuneError, match="distil from a fine-tuned run"):
        distill.resolve_teacher(str(tmp_path))


@pytest.mark.slow
def test_cli_distils_and_evaluates_the_student(tmp_path, finetune_config, cli):
    _teacher_run(finetune_config(tmp_path / "teacher"), num_classes=10)  # Fashion-MNIST's
    student_dir = tmp_path / "student"
    result = cli(
        "--train_mode=distill", "--mode=train_then_eval", f"--teacher={tmp_path / 'teacher'}",
        f"--model_dir={student_dir}", "--dataset=fashion_mnist", "--train_split=train[:600]",
        "--eval_split=test[:100]", "--image_size=16", "--resnet_depth=18",
        "--distill_temperature=2", "--distill_label_weight=0.5", "--train_label_fraction=0.1",
        "--optimizer=momentum", "--learning_rate=0.1", "--weight_decay=0", "--warmup_epochs=0",
        "--train_batch_size=8", "--train_steps=2", "--steps_per_loop=1", "--checkpoint_steps=2",
        "--eval_batch_size=50")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(student_dir / "results.json") as f:
        results = json.load(f)
    assert results["train_mode"] == "distill" and results["step"] == 2
    assert results["num_examples"] == 100


def test_distillation_with_train_examples_reads_them_only_and_labels_within_them(finetune_config):
    """--train_examples with --train_mode=distill: the unlabelled pool is those N images, the
    labelled ones are taken within them, and one epoch of batches holds each of the N once, so
    its labelled marks add up to the labelled subset exactly (reading the whole split of 600
    instead, 120 images would carry about a fifth of them)."""
    base = finetune_config(train_label_fraction=0.1)
    config = dataclasses.replace(
        base, data=dataclasses.replace(base.data, train_split="train[:600]", train_examples=120),
        train=dataclasses.replace(base.train, train_mode="distill"))
    pool, labelled = finetune.training_examples(config), finetune.labelled_subset(config)
    assert len(pool) == 120 and set(labelled) <= set(pool)
    assert 10 <= len(labelled) <= 15  # 10% of each class among the 120, rounded, at least one
    dataset_fn = finetune.make_dataset_fn(config, labelled, mark_subset=True)
    batches = dataset_fn(tf.distribute.InputContext(), 0)
    epoch = list(batches.take(120 // config.train.train_batch_size).as_numpy_iterator())
    assert sum(int(batch["labelled"].sum()) for batch in epoch) == len(labelled)
