"""Fine-tuning: label subsets, frozen parts that stay frozen, linear eval on a separable problem,
the projection-head selector, the CLI's one-line errors, and a tiny pretrain -> fine-tune run."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoints, classifier, finetune, label_subset, models, pretrain
from simclr_tf import config as cfg
from simclr_tf import supervised_data
from simclr_tf.schedules import Schedule


def make_finetuner(config, num_classes, total_steps=40):
    schedule = Schedule(total_steps=total_steps, warmup_steps=0, steps_per_epoch=10)
    return finetune.Finetuner(config, tf.distribute.get_strategy(), schedule, num_classes)


def run_steps(trainer, batch, steps):
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    return trainer.make_train_loop()(iterator, tf.constant(steps))


# --------------------------------------------------------------------------------------------
# Label subsets.

def test_balanced_subset_has_the_right_size_and_balance_and_is_stable():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate((1000, 500, 250, 3))])
    labels = rng.permutation(labels)
    subset = label_subset.balanced_subset(labels, 0.1, seed=3)
    counts = np.bincount(labels[subset])
    np.testing.assert_array_equal(counts, [100, 50, 25, 1])  # round(10%), at least one
    assert len(np.unique(subset)) == len(subset) and np.all(np.diff(subset) > 0)
    np.random.seed(123)  # the global numpy state must not matter
    np.testing.assert_array_equal(label_subset.balanced_subset(labels, 0.1, seed=3), subset)
    assert not np.array_equal(label_subset.balanced_subset(labels, 0.1, seed=4), subset)
    # The 1% subset of a seed lies inside its 10% subset.
    small = label_subset.balanced_subset(labels, 0.01, seed=3)
    assert set(small) <= set(subset)
    np.testing.assert_array_equal(np.bincount(labels[small]), [10, 5, 2, 1])
    with pytest.raises(label_subset.LabelSubsetError, match="train_label_fraction"):
        label_subset.balanced_subset(labels, 0.0)


def test_fashion_mnist_one_percent_subset():
    indices = label_subset.subset_indices("fashion_mnist", "train", fraction=0.01, seed=0)
    labels = label_subset.split_labels("fashion_mnist", "train")
    assert len(labels) == 60000 and len(indices) == 600
    np.testing.assert_array_equal(np.bincount(labels[indices], minlength=10), [60] * 10)
    np.testing.assert_array_equal(indices, label_subset.balanced_subset(labels, 0.01, seed=0))
    assert label_subset.subset_indices("fashion_mnist", "train", fraction=1.0) is None


def test_id_files_by_index_and_by_file_name(tmp_path):
    by_index = tmp_path / "ids.txt"
    by_index.write_text("# the 1% list\n5\n2\n\n5  # twice\n")
    np.testing.assert_array_equal(label_subset.read_id_file(str(by_index)), [2, 5])
    by_name = tmp_path / "names.txt"
    by_name.write_text("b.JPEG\na.JPEG\n")
    np.testing.assert_array_equal(
        label_subset.read_id_file(str(by_name), ["a.JPEG", "c.JPEG", "b.JPEG"]), [0, 2])
    with pytest.raises(label_subset.LabelSubsetError, match="not in the split"):
        label_subset.read_id_file(str(by_name), ["a.JPEG"])
    with pytest.raises(label_subset.LabelSubsetError, match="integer indices"):
        label_subset.read_id_file(str(by_name), None)


def test_id_files_name_folder_images_by_path_or_unique_file_name(tmp_path, image_folder):
    dataset = image_folder(tmp_path / "images", 4, 8, "ab")  # reading order: a/0..3, b/0..3
    assert label_subset.split_file_names(dataset, "train") == [
        f"{label}/{i}.png" for label in "ab" for i in range(4)]
    ids = tmp_path / "ids.txt"
    ids.write_text("b/1.png\na/2.png\n")
    np.testing.assert_array_equal(
        label_subset.subset_indices(dataset, "train", id_file=str(ids)), [2, 5])
    ids.write_text("1.png\n")  # a/1.png and b/1.png share it: ambiguous, so not a name
    with pytest.raises(label_subset.LabelSubsetError, match="not in the split"):
        label_subset.subset_indices(dataset, "train", id_file=str(ids))
    np.testing.assert_array_equal(
        label_subset.read_id_file(str(ids), ["x/0.png", "y/1.png"]), [1])


def test_labelled_dataset_reads_or_marks_the_subset(tmp_path, image_folder):
    dataset = image_folder(tmp_path / "images", 4, 8, "ab")
    # Reading order: a/0..3 (label 0), b/0..3 (label 1); the subset is a/1 and b/2.
    subset = np.array([1, 6])
    only = supervised_data.labelled_dataset(dataset, "train", 4, 8, subset=subset, seed=1)
    batch = next(iter(only))
    assert batch["image"].shape == (4, 8, 8, 3)
    assert sorted(set(batch["label"].numpy())) == [0, 1]  # two examples, repeated
    marked = supervised_data.labelled_dataset(dataset, "train", 8, 8, subset=subset,
                                              mark_subset=True, seed=1)
    batch = next(iter(marked))
    assert batch["labelled"].numpy().sum() == 2  # all 8 examples, 2 of them labelled


# --------------------------------------------------------------------------------------------
# The model and the step.

def _values(variables):
    return {v.path: v.numpy().copy() for v in variables}


def test_linear_eval_keeps_f_frozen_and_separates_a_separable_problem(finetune_config,
                                                                     colour_data):
    config = finetune_config(fine_tune_after_block=4)
    config = dataclasses.replace(
        config, optimizer=dataclasses.replace(config.optimizer, learning_rate=10.0))
    trainer = make_finetuner(config, colour_data.num_classes)
    trained = [v.path for v in trainer.model.trainable_variables]
    assert trained == [v.path for v in trainer.model.logits_layer.trainable_variables]
    before = _values(trainer.model.encoder.variables)  # incl. batch-norm moving statistics
    logits_before = trainer.model.logits_layer.kernel.numpy().copy()
    iterator = iter(tf.data.Dataset.from_tensors(colour_data.batch()).repeat())
    loop = trainer.make_train_loop()
    loop(iterator, tf.constant(30))
    metrics = loop(iterator, tf.constant(10))  # means over the last 10 steps
    for v in trainer.model.encoder.variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    assert not np.allclose(trainer.model.logits_layer.kernel.numpy(), logits_before)
    assert float(metrics["loss"]) < 0.3 and float(metrics["train_acc"]) == 1.0
    held_out = colour_data.batch(seed=1)
    logits = trainer.model(held_out["image"], training=False)
    accuracy = np.mean(np.argmax(logits, 1) == held_out["label"].numpy())
    assert accuracy == 1.0


def test_fine_tuning_loop_compiles_with_xla_and_keeps_f_frozen(finetune_config, colour_data):
    config = finetune_config(fine_tune_after_block=4)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, jit_compile=True))
    trainer = make_finetuner(config, colour_data.num_classes)
    before = _values(trainer.model.encoder.variables)
    metrics = run_steps(trainer, colour_data.batch(), 2)
    assert np.isfinite(float(metrics["loss"]))
    assert int(trainer.optimizer.iterations.numpy()) == 2
    for v in trainer.model.encoder.variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)


def test_fine_tune_after_block_freezes_the_stem_and_early_groups(finetune_config, colour_data):
    config = finetune_config(fine_tune_after_block=2)
    trainer = make_finetuner(config, colour_data.num_classes)
    frozen_prefixes = ("stem", "group1_", "group2_")
    before = _values(trainer.model.encoder.variables)
    run_steps(trainer, colour_data.batch(), 2)
    changed = {v.path for v in trainer.model.encoder.variables
               if not np.array_equal(v.numpy(), before[v.path])}
    frozen = {p for p in before if p.startswith(frozen_prefixes)}
    assert frozen and not (changed & frozen)
    tuned = {p for p in before if p.startswith(("group3_", "group4_"))}
    assert changed and changed <= tuned
    # Moving statistics of the tuned part's batch norm are updated (training mode).
    assert any("moving_mean" in p for p in changed)


def test_fine_tune_everything_and_from_the_stem(finetune_config):
    everything = make_finetuner(finetune_config(fine_tune_after_block=-1), 3)
    encoder_vars = {v.path for v in everything.model.encoder.trainable_variables}
    assert encoder_vars <= {v.path for v in everything.model.trainable_variables}
    after_stem = make_finetuner(finetune_config(fine_tune_after_block=0), 3)
    names = {v.path.split("/")[0] for v in after_stem.model.trainable_variables}
    assert not any(n.startswith("stem") for n in names)
    assert any(n.startswith("group1_") for n in names)


def test_ft_proj_selector_and_zero_init_logits_layer(finetune_config, colour_data):
    config = finetune_config(ft_proj_selector=2, zero_init_logits_layer=True)
    trainer = make_finetuner(config, colour_data.num_classes)
    model = trainer.model
    images = colour_data.batch()["image"]
    features = model.features(images)
    assert features.shape == (12, model.head.dense_layers[1].units)
    # The head's first two layers, as the head itself computes them.
    _, hiddens = model.head(model.encoder(images))
    np.testing.assert_array_equal(features.numpy(), hiddens[2].numpy())
    np.testing.assert_array_equal(model(images).numpy(), 0.0)
    trained = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trained for v in model.head.dense_layers[1].trainable_variables)
    assert not any(id(v) in trained for v in model.head.dense_layers[2].trainable_variables)


def _pretraining_checkpoint(model_dir, finetune_config, num_classes):
    """A pretraining run's checkpoint (f, a 3-layer g, a probe) with its head and probe moved
    off their initial values; returns (checkpoint path, the Pretrainer)."""
    config = finetune_config(model_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                   train_mode="pretrain"))
    pretrainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(), Schedule(10, 0, 5),
                                     num_classes=num_classes)
    rng = np.random.default_rng(0)
    for v in pretrainer.head.variables + pretrainer.probe.variables:
        v.assign(v.numpy() + rng.uniform(0.1, 0.2, v.shape).astype(np.float32))
    cfg.save(config, str(model_dir))
    path = tf.train.Checkpoint(**pretrainer.checkpoint_items()).write(str(model_dir / "ckpt-3"))
    return path, pretrainer


def test_fine_tuning_from_the_middle_of_the_head_starts_from_the_pretrained_layers(
        tmp_path, finetune_config, colour_data):
    """The head's layers (and their BN statistics) come from the pretraining checkpoint, and a
    fine-tuned checkpoint gives back the classifier it saved."""
    path, pretrainer = _pretraining_checkpoint(tmp_path / "pre", finetune_config,
                                               colour_data.num_classes)
    config, source = finetune.prepare(finetune_config(tmp_path / "ft", checkpoint=path,
                                                      ft_proj_selector=2))
    trainer = make_finetuner(config, colour_data.num_classes)
    finetune.initialize_from(trainer.model, source)
    for got, want in zip(trainer.model.head.variables, pretrainer.head.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)

    run_steps(trainer, colour_data.batch(), 2)
    saved = tf.train.Checkpoint(**trainer.checkpoint_items()).write(str(tmp_path / "ft" / "ckpt"))
    restored = classifier.build_classifier(config, colour_data.num_classes)
    checkpoints.read_parts(saved, **restored.checkpoint_items())
    images = colour_data.batch(seed=3)["image"]
    np.testing.assert_array_equal(restored(images).numpy(), trainer.model(images).numpy())


@pytest.mark.parametrize("settings,num_classes,start", [
    (dict(), 3, "probe"),
    (dict(zero_init_logits_layer=True), 3, "zeros"),
    (dict(ft_proj_selector=1), 3, "random"),  # the probe was fitted to h, not to layer 1
    (dict(), 5, "random"),  # the probe predicts other classes
], ids=["probe", "zero_init", "from_layer_1", "other_classes"])
def test_the_classifier_starts_from_the_pretraining_probe_as_the_original(
        tmp_path, finetune_config, settings, num_classes, start):
    """The original restores the whole pretrained model: without --zero_init_logits_layer the
    classifier starts from the linear probe of pretraining, where that probe fits it."""
    path, pretrainer = _pretraining_checkpoint(tmp_path / "pre", finetune_config, 3)
    config, source = finetune.prepare(finetune_config(tmp_path / "ft", checkpoint=path,
                                                      **settings))
    model = make_finetuner(config, num_classes).model
    finetune.initialize_from(model, source)
    kernel, bias = (w.numpy() for w in model.logits_layer.weights)
    if start == "probe":
        for got, want in zip(model.logits_layer.weights, pretrainer.probe.dense.weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    elif start == "zeros":
        assert not kernel.any() and not bias.any()
    else:
        assert 0.008 < kernel.std() < 0.012 and not bias.any()  # N(0, 0.01^2)


def test_negative_ft_proj_selector_counts_from_the_end_of_the_head_as_the_original(
        finetune_config):
    layers = finetune_config().head.num_layers
    assert layers == 3
    resolved = {s: finetune.resolve_selector(finetune_config(ft_proj_selector=s)).finetune
                .ft_proj_selector for s in (-1, -2, -4, 0, 2, 3)}
    assert resolved == {-1: 3, -2: 2, -4: 0, 0: 0, 2: 2, 3: 3}
    for selector in (4, -5):
        with pytest.raises(finetune.FinetuneError, match=f"ft_proj_selector={selector} is "
                           "outside -4..3 for the 3 layers"):
            finetune.resolve_selector(finetune_config(ft_proj_selector=selector))
    with pytest.raises(ValueError, match="counts from 0 here"):
        classifier.Classifier(make_finetuner(finetune_config(), 3).model.encoder, 3,
                              ft_proj_selector=-1)


def test_one_and_two_replicas_fine_tune_alike(finetune_config, colour_data):
    config = finetune_config(fine_tune_after_block=2)  # global BN in the tuned part
    reference = make_finetuner(config, colour_data.num_classes)
    outcomes = []
    for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())):
        schedule = Schedule(total_steps=40, warmup_steps=0, steps_per_epoch=10)
        trainer = finetune.Finetuner(config, strategy, schedule, colour_data.num_classes)
        trainer.model.encoder.set_weights(reference.model.encoder.get_weights())
        trainer.model.logits_layer.set_weights(reference.model.logits_layer.get_weights())
        batches = tf.data.Dataset.from_tensor_slices(colour_data.batch()).batch(12).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(batches))
        metrics = trainer.make_train_loop()(iterator, tf.constant(1))
        outcomes.append((float(metrics["loss"]),
                         [v.numpy() for v in trainer.model.trainable_variables]))
    (loss_1, weights_1), (loss_2, weights_2) = outcomes
    assert loss_1 == pytest.approx(loss_2, rel=1e-5)
    for a, b in zip(weights_1, weights_2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The command line.

BAD_FLAGS = [
    (["--fine_tune_after_block=5"], "fine_tune_after_block must be in -1..4"),
    (["--train_label_fraction=0"], "train_label_fraction must be in (0, 1]"),
    (["--train_label_fraction=1.5"], "train_label_fraction must be in (0, 1]"),
    (["--train_label_seed=-3"], "train_label_seed must be in 0..2**32-1"),
    (["--train_mode=semi"], "train_mode must be one of"),
    (["--train_mode=distill"], "needs --teacher"),
    (["--distill_temperature=0"], "distill_temperature must be positive"),
    (["--distill_label_weight=1"], "distill_label_weight must be in [0, 1)"),
    (["--knn_k=0"], "knn_k must be >= 1"),
    (["--knn_temperature=-1"], "knn_temperature must be positive"),
    (["--eval_every=-5"], "eval_every must be >= 0"),
    (["--eval_protocols=knn,svm"], "eval_protocols must be"),
    (["--eval_batch_size=0"], "eval_batch_size must be positive"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_evaluation_flags_raise_one_line_errors(parsed_flags, argv, message):
    config = parsed_flags(argv)
    with pytest.raises(cfg.ConfigError) as error:
        cfg.validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_evaluation_flags_map_onto_the_config(parsed_flags):
    config = parsed_flags(["--train_mode=finetune", "--fine_tune_after_block=4",
                           "--ft_proj_selector=1", "--zero_init_logits_layer",
                           "--train_label_fraction=0.1", "--checkpoint=/x", "--knn_k=20",
                           "--eval_every=100"])
    assert config.train.train_mode == "finetune"
    assert config.finetune == cfg.FinetuneConfig("/x", 4, 1, True, True, 0.1, None, 0)
    assert config.eval.knn_k == 20 and config.eval.eval_every == 100
    assert cfg.RunConfig.from_json(config.to_json()) == config


def test_cli_bad_mode_and_missing_checkpoint_are_one_line_errors(tmp_path, cli):
    result = cli("--mode=predict", f"--model_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mode must be one of ('train', 'eval', 'train_then_eval'), got 'predict'")
    result = cli("--train_mode=finetune", f"--checkpoint={tmp_path}/nothing",
                  f"--model_dir={tmp_path}/ft", "--resnet_depth=18", "--image_size=16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and "nothing" in last


# --------------------------------------------------------------------------------------------
# End to end.

SMALL_DATA = ["--dataset=fashion_mnist", "--train_split=train[:600]", "--eval_split=test[:200]",
              "--image_size=16", "--eval_batch_size=100"]


@pytest.mark.slow
def test_pretrain_then_finetune_on_one_percent_and_from_the_export(tmp_path, finetune_config,
                                                                   cli):
    pre = finetune_config(tmp_path / "pre")
    pre = dataclasses.replace(
        pre, data=cfg.DataConfig(dataset="fashion_mnist", train_split="train[:600]",
                                 eval_split="test[:200]", image_size=16),
        train=dataclasses.replace(pre.train, train_mode="pretrain", train_steps=2,
                                  train_batch_size=8),
        optimizer=cfg.OptimizerConfig(warmup_epochs=0))
    cfg.save(pre, pre.train.model_dir)
    pretrain.run_pretraining(pre, tf.distribute.get_strategy())

    ft_dir = tmp_path / "ft"
    result = cli(*SMALL_DATA, "--train_mode=finetune", "--mode=train_then_eval",
                  f"--checkpoint={tmp_path / 'pre'}", f"--model_dir={ft_dir}",
                  "--fine_tune_after_block=4", "--ft_proj_selector=-3",  # layer 1 of 3
                  "--zero_init_logits_layer", "--train_label_fraction=0.1",
                  "--optimizer=momentum", "--learning_rate=0.1", "--weight_decay=0",
                  "--warmup_epochs=0", "--train_batch_size=8", "--train_steps=2",
                  "--steps_per_loop=1", "--checkpoint_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = cfg.load(str(ft_dir))
    assert saved.encoder == dataclasses.replace(pre.encoder, global_bn=True)  # from the source
    assert saved.head == pre.head
    assert saved.finetune.ft_proj_selector == 1  # resolved against the source's head
    with open(ft_dir / "results.json") as f:
        results = json.load(f)
    assert results["step"] == 2 and results["num_examples"] == 200
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0

    # The export written at the end of pretraining starts a fine-tuning run too.
    export_dir = sorted((tmp_path / "pre" / "export").iterdir())[-1]
    config, source = finetune.prepare(finetune_config(
        tmp_path / "ft_export", checkpoint=str(export_dir), fine_tune_after_block=4))
    assert source.kind == "export" and config.encoder.resnet_depth == 18
    trainer = make_finetuner(config, 10)
    finetune.initialize_from(trainer.model, source)
    reference = models.build_encoder(pre.encoder, 16)
    checkpoints.restore_encoder(reference, tf.train.latest_checkpoint(str(tmp_path / "pre")))
    for a, b in zip(trainer.model.encoder.variables, reference.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_float16_fine_tuning_scales_its_loss(finetune_config, colour_data):
    """float16 gradients underflow: fine-tuning wraps its optimiser for loss scaling, as
    pretraining does (it used to train float16 without it)."""
    import keras
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        config = finetune_config(fine_tune_after_block=2)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                       precision="float16"))
        trainer = make_finetuner(config, colour_data.num_classes)
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
        for _ in range(3):  # a step whose scaled gradients overflow is skipped
            metrics = run_steps(trainer, colour_data.batch(), 1)
            if int(trainer.step.numpy()) == 1:
                break
        assert int(trainer.step.numpy()) == 1 and np.isfinite(float(metrics["loss"]))
        assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
