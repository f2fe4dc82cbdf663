"""Evaluation: kNN and top-k against hand-computed answers, the fast linear eval on separable
features, masked extraction counting each example once, and the kNN monitor's schedule."""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import classifier, evaluate, knn, knn_monitor, linear_eval, models, pretrain
from simclr_tf import results as results_lib
from simclr_tf import watch
from simclr_tf import config as cfg
from simclr_tf.schedules import Schedule


def _save(trainer, prefix):
    return tf.train.Checkpoint(**trainer.checkpoint_items()).save(prefix)


def test_knn_scores_match_hand_computation():
    # Unit vectors at easy angles: cosine similarities are 1, 0, -1 and 0.6 / 0.8 exactly.
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], np.float32)
    labels = np.array([0, 1, 1, 2])
    queries = np.array([[2.0, 0.0],    # cos: 1, 0, -1, 0.6 -> neighbours 0 (class 0), 3 (class 2)
                        [0.0, 0.5]],   # cos: 0, 1, 0, 0.8  -> neighbours 1 (class 1), 3 (class 2)
                       np.float32)
    scores = knn.knn_predict_scores(queries, bank, labels, num_classes=3, k=2, temperature=0.5)
    expected = np.array([[math.exp(1 / 0.5), 0.0, math.exp(0.6 / 0.5)],
                         [0.0, math.exp(1 / 0.5), math.exp(0.8 / 0.5)]])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_knn_two_weak_neighbours_outvote_one_strong_one():
    # k=3, query [1, 0]: neighbour cosines 1.0 (class 0), 0.8 and 0.6 (class 1).
    bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]], np.float32)
    labels = np.array([0, 1, 1, 0])
    query = np.array([[1.0, 0.0]], np.float32)
    # tau = 1: class 1 gets e^0.8 + e^0.6 = 4.05 > e^1 = 2.72.
    hot = knn.knn_predict_scores(query, bank, labels, 2, k=3, temperature=1.0)
    np.testing.assert_allclose(hot, [[math.e, math.exp(0.8) + math.exp(0.6)]], rtol=1e-5)
    assert hot.argmax() == 1
    # tau = 0.1: the nearest dominates: e^10 > e^8 + e^6.
    assert knn.knn_predict_scores(query, bank, labels, 2, k=3, temperature=0.1).argmax() == 0
    # k larger than the bank uses the whole bank.
    assert knn.knn_predict_scores(query, bank, labels, 2, k=50).shape == (1, 2)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert linear_eval.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert linear_eval.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert linear_eval.topk_accuracy(scores, labels, 5) == 1.0  # k clipped to the classes


def test_fast_linear_eval_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    num_classes, dim = 4, 16
    centres = rng.normal(size=(num_classes, dim)) * 3

    def sample(n):
        y = rng.integers(0, num_classes, n)
        return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y

    train_x, train_y = sample(800)
    eval_x, eval_y = sample(400)
    results = linear_eval.linear_eval_fast(train_x, train_y, eval_x, eval_y, num_classes,
                                        l2_grid=(1e-4, 1e-2), epochs=20)
    assert results["linear_top1"] >= 0.99
    assert results["linear_top5"] == 1.0
    assert results["linear_l2"] in (1e-4, 1e-2)
    assert results["linear_heldout_top1"] >= 0.99  # 80 held-out training examples

    shuffled = linear_eval.linear_eval_fast(train_x, rng.permutation(train_y), eval_x, eval_y,
                                         num_classes, l2_grid=(1e-4, 1e-2), epochs=20)
    assert shuffled["linear_heldout_top1"] < 0.5  # chance is 0.25: nothing to learn
    single = linear_eval.linear_eval_fast(train_x, train_y, eval_x, eval_y, num_classes,
                                       l2_grid=(1e-3,), epochs=20)
    assert "linear_heldout_top1" not in single and single["linear_l2"] == 1e-3


def test_l2_grid_reaches_the_strong_regularisation_many_noisy_features_need():
    # Raw pixels at 48 px are 6,912 features for 5,000 images and need l2 = 0.1 (the grid once
    # stopped at 0.01, where such a baseline lost 2 points). Here 1,000 features, 2 of them
    # informative, and 300 images: the held-out choice must come from above 0.01.
    rng = np.random.default_rng(0)

    def sample(n):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 1000)).astype(np.float32)
        x[:, :2] += (2 * y[:, None] - 1) * 0.8
        return x, y

    train_x, train_y = sample(300)
    eval_x, eval_y = sample(1000)
    results = linear_eval.linear_eval_fast(train_x, train_y, eval_x, eval_y, 2)
    assert results["linear_l2"] > 1e-2
    at_old_top = linear_eval.linear_eval_fast(train_x, train_y, eval_x, eval_y, 2, l2_grid=(1e-2,))
    assert results["linear_top1"] > at_old_top["linear_top1"] + 0.02


def test_logistic_regression_reaches_the_optimum():
    # At the optimum of mean CE + l2/2 |W|^2 the gradient vanishes: Z^T (P - Y) / n + l2 W = 0.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    onehot = np.eye(3)[y]

    def objective_and_gradient(model):
        z = (x - model.mean) / model.std
        logits = z @ model.weights + model.bias
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        objective = (-np.mean(np.sum(onehot * np.log(p), 1))
                     + 0.05 * np.sum(model.weights ** 2))
        grad_w = z.T @ (p - onehot) / len(y) + 0.1 * model.weights
        return objective, np.concatenate([grad_w.ravel(), (p - onehot).mean(0)])

    full = linear_eval.LogisticRegression(3, l2=0.1, batch_size=200, min_steps=2000,
                                       learning_rate=0.05).fit(x, y)
    best, gradient = objective_and_gradient(full)
    assert np.abs(gradient).max() < 1e-3
    # Mini-batches (the default way on large feature sets) land within 0.1% of the optimum.
    mini = linear_eval.LogisticRegression(3, l2=0.1, batch_size=50).fit(x, y)
    assert objective_and_gradient(mini)[0] == pytest.approx(best, rel=1e-3)


def test_each_model_of_a_grid_fit_reaches_its_own_optimum():
    # fit_grid trains the grid's models side by side in one wide matmul: each must still satisfy
    # its own optimality condition Z^T (P - Y) / n + l2 W = 0 (numpy), not a shared or mixed one.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    onehot = np.eye(3)[y]
    l2_values = (0.01, 0.1, 1.0)
    models = linear_eval.fit_grid(x, y, 3, l2_values, batch_size=200, min_steps=3000,
                                  learning_rate=0.05)
    norms = []
    for l2, model in zip(l2_values, models):
        z = (x - model.mean) / model.std
        logits = z @ model.weights + model.bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert np.abs(z.T @ (p - onehot) / len(y) + l2 * model.weights).max() < 1e-3
        assert np.abs((p - onehot).mean(0)).max() < 1e-3
        norms.append(np.linalg.norm(model.weights))
    assert norms[0] > norms[1] > norms[2]  # stronger L2, smaller weights


def test_extract_counts_every_example_once():
    # 10 examples in batches of 4: the last batch has 2 padded rows (mask 0).
    images = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones([1, 2, 2, 3],
                                                                          np.float32)
    labels = np.arange(10) % 3
    pad = 2
    dataset = tf.data.Dataset.from_tensor_slices({
        "image": np.concatenate([images, np.zeros([pad, 2, 2, 3], np.float32)]),
        "label": np.concatenate([labels, np.zeros([pad], np.int64)]).astype(np.int32),
        "mask": np.concatenate([np.ones(10), np.zeros(pad)]).astype(np.float32)}).batch(4)
    out, y = evaluate.extract(lambda x: tf.reduce_mean(x, [1, 2]), dataset)
    assert out.shape == (10, 3)
    np.testing.assert_array_equal(out[:, 0], np.arange(10))
    np.testing.assert_array_equal(y, labels)
    out, y = evaluate.extract(lambda x: tf.reduce_mean(x, [1, 2]), dataset, max_examples=6)
    assert len(out) == 6


def test_knn_monitor_runs_when_a_multiple_of_eval_every_is_passed():
    config = cfg.RunConfig(eval=cfg.EvalConfig(eval_every=10))
    monitor = knn_monitor.KnnMonitor(config, num_classes=10)
    due = []
    for step in (5, 10, 15, 20, 24, 31):
        if monitor.due(step):
            due.append(step)
            monitor.last = step
    assert due == [10, 20, 31]
    assert not knn_monitor.KnnMonitor(cfg.RunConfig(), 10).due(100)  # eval_every=0: off


def test_config_for_evaluation_keeps_the_trained_model_and_takes_eval_settings(tmp_path):
    trained = cfg.RunConfig(encoder=cfg.EncoderConfig(resnet_depth=18),
                            train=cfg.TrainConfig(model_dir="/elsewhere", train_mode="finetune"))
    cfg.save(trained, str(tmp_path))
    requested = cfg.RunConfig(data=cfg.DataConfig(eval_split="validation"),
                              eval=cfg.EvalConfig(knn_k=7),
                              train=cfg.TrainConfig(model_dir=str(tmp_path)))
    config = cfg.config_for_evaluation(requested)
    assert config.encoder.resnet_depth == 18 and config.train.train_mode == "finetune"
    assert config.data.eval_split == "validation" and config.eval.knn_k == 7
    assert config.train.model_dir == str(tmp_path)


def test_config_for_evaluation_keeps_the_runs_resize_and_size_unless_given(tmp_path):
    # A converted run evaluates with bicubic resizes, and a run on 32-px views chose 48 px for its
    # evaluation; --mode=eval without those flags keeps them, and an explicit flag (once silently
    # dropped for the resize) is what the evaluation uses. The other eval settings are the
    # command's.
    cfg.save(cfg.RunConfig(data=cfg.DataConfig(image_size=32, eval_resize="bicubic"),
                           eval=cfg.EvalConfig(eval_image_size=48, knn_bank_size=20000)),
             str(tmp_path))
    requested = cfg.RunConfig(train=cfg.TrainConfig(model_dir=str(tmp_path)),
                              eval=cfg.EvalConfig(knn_bank_size=0))
    assert requested.data.eval_resize == "bilinear"  # the flags' defaults
    assert requested.eval.eval_image_size == 0
    kept = cfg.config_for_evaluation(requested)
    assert (kept.data.eval_resize, kept.eval.eval_image_size) == ("bicubic", 48)
    assert kept.eval.knn_bank_size == 0
    given = cfg.config_for_evaluation(requested, given={"eval_resize", "eval_image_size"})
    assert (given.data.eval_resize, given.eval.eval_image_size) == ("bilinear", 0)
    assert cfg.config_for_evaluation(requested, given={"eval_image_size"}).data.eval_resize == (
        "bicubic")


def test_write_results(tmp_path):
    config = cfg.RunConfig(train=cfg.TrainConfig(model_dir=str(tmp_path)))
    path = results_lib.write_results(config, {"step": 7, "top1": 0.5, "top5": 0.9,
                                           "checkpoint": "ckpt-7"})
    with open(path) as f:
        assert json.load(f) == {"step": 7, "top1": 0.5, "top5": 0.9, "checkpoint": "ckpt-7"}
    assert (tmp_path / "eval_test" / "results-7.json").exists()
    assert any(p.name.startswith("events.out") for p in (tmp_path / "eval_test").iterdir())


def test_eval_config_round_trips_and_validates():
    config = cfg.RunConfig(eval=cfg.EvalConfig(eval_protocols="knn", eval_every=50, knn_k=20))
    assert cfg.RunConfig.from_json(config.to_json()) == config
    # A config.json written before these sections existed still loads.
    raw = json.loads(config.to_json())
    for key in ("eval", "finetune", "distill"):
        raw.pop(key)
    assert cfg.RunConfig.from_json(json.dumps(raw)).eval == cfg.EvalConfig()
    with pytest.raises(cfg.ConfigError, match="eval_protocols must be"):
        cfg.validate(dataclasses.replace(config, eval=cfg.EvalConfig(eval_protocols="knn,svm")))


def test_features_of_an_encoder_built_under_mirrored_strategy():
    # The kNN monitor calls the pretraining encoder (mirrored variables) outside strategy.run.
    from simclr_tf.resnet import resnet
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        mirrored = resnet(18, cifar_stem=True, image_size=8, global_bn=True)
    plain = resnet(18, cifar_stem=True, image_size=8)
    plain.set_weights(mirrored.get_weights())
    images = np.random.default_rng(0).uniform(size=(6, 8, 8, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices({
        "image": images, "label": np.zeros(6, np.int32), "mask": np.ones(6, np.float32)}).batch(4)
    out, _ = evaluate.extract(lambda x: mirrored(x, training=False), dataset)
    np.testing.assert_allclose(out, plain(images, training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_probe_only_evaluation_of_a_run_without_a_probe_is_a_one_line_error(tmp_path,
                                                                           image_folder):
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=image_folder(tmp_path / "images", per_class=1, size=8),
                            image_size=8, eval_split="train"),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        train=cfg.TrainConfig(train_batch_size=2, lineareval_while_pretraining=False),
        eval=cfg.EvalConfig(eval_protocols="probe"))
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(),
                                  Schedule(total_steps=1, warmup_steps=0, steps_per_epoch=1))
    path = _save(trainer, str(tmp_path / "run" / "ckpt"))
    with pytest.raises(ValueError, match="has no linear probe .* use --eval_protocols=knn or "
                                         "linear") as error:
        evaluate.evaluate_checkpoint(config, path)
    assert "\n" not in str(error.value)


def test_evaluation_at_another_image_size_uses_the_trained_weights(tmp_path, image_folder):
    # f trained at 8 px, evaluated at 12 px (FixRes): 12-px images, the trained weights.
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=image_folder(tmp_path / "images", per_class=3, size=16),
                            image_size=8, eval_split="train"),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        train=cfg.TrainConfig(train_batch_size=2),
        eval=cfg.EvalConfig(eval_batch_size=4, eval_image_size=12, eval_protocols="probe,knn"))
    assert evaluate.eval_image_size(config) == 12
    images = next(iter(evaluate.eval_batches(config, "train")))["image"]
    assert images.shape == (4, 12, 12, 3)
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(),
                                  Schedule(total_steps=1, warmup_steps=0, steps_per_epoch=1),
                                  num_classes=2)
    at_training_size = dataclasses.replace(config, eval=cfg.EvalConfig(eval_image_size=8))
    assert evaluate.encoder_for_evaluation(trainer.encoder, at_training_size) is trainer.encoder
    reference = models.build_encoder(config.encoder, 12, global_bn=False)
    reference.set_weights(trainer.encoder.get_weights())
    expected = reference(images, training=False).numpy()
    copy = evaluate.encoder_for_evaluation(trainer.encoder, config)
    np.testing.assert_allclose(copy(images, training=False), expected, rtol=1e-5, atol=1e-6)

    # A checkpoint evaluated at 12 px gives the same kNN as the in-process encoder.
    path = _save(trainer, str(tmp_path / "run" / "ckpt"))
    from_checkpoint = evaluate.evaluate_checkpoint(config, path)
    in_process = evaluate.evaluate_encoder(trainer.encoder, config, 2, ("knn", "probe"),
                                           probe=trainer.probe)
    assert from_checkpoint["num_examples"] == in_process["num_examples"] == 6
    for key in ("knn_top1", "probe_top1"):
        assert from_checkpoint[key] == in_process[key]
    # The probe, fitted on h of 8-px views, is scored on h of 8-px eval images.
    seen = []
    evaluate.evaluate_encoder(trainer.encoder, config, 2, ("probe",),
                              probe=lambda h: seen.append(h.numpy()) or trainer.probe(h))
    h8, _ = evaluate.extract(lambda x: trainer.encoder(x, training=False),
                             evaluate.eval_batches(config, "train", image_size=8))
    np.testing.assert_allclose(seen[0], h8, rtol=1e-6)

    # A classifier (the supervised or fine-tuned model) likewise.
    model = classifier.build_classifier(config, 2)
    reference = classifier.build_classifier(config, 2, image_size=12)
    for name, part in model.checkpoint_items().items():
        reference.checkpoint_items()[name].set_weights(part.get_weights())
    copy = evaluate.classifier_for_evaluation(model, config)
    np.testing.assert_allclose(copy(images), reference(images).numpy(), rtol=1e-5, atol=1e-6)

    with pytest.raises(cfg.ConfigError, match="eval_image_size=6 is too small for the CIFAR "
                                              "stem: use at least 8, or 0 for image_size"):
        cfg.validate(dataclasses.replace(config, eval=cfg.EvalConfig(eval_image_size=6)))


def test_watching_a_run_of_train_examples_counted_in_epochs_ends_at_its_last_checkpoint(
        tmp_path, image_folder, cli):
    """--train_examples=8 of 16 images for 2 epochs at batch 4 ends at step 8 * 2 // 4 + 1 = 5
    (not 16 * 2 // 4 + 1 = 9): a --mode=eval watcher with no timeout must stop there."""
    dataset = image_folder(tmp_path / "images", per_class=8, size=8)
    run = tmp_path / "run"
    flags = [f"--dataset={dataset}", f"--model_dir={run}", "--image_size=8", "--resnet_depth=18",
             "--proj_out_dim=8", "--train_batch_size=4", "--train_examples=8",
             "--train_epochs=2", "--warmup_epochs=0", "--checkpoint_steps=100",
             "--eval_split=train", "--eval_batch_size=8", "--knn_k=3"]
    trained = cli("--mode=train", *flags)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert tf.train.latest_checkpoint(str(run)).endswith("ckpt-5")
    config = cfg.load(str(run))
    assert watch.total_steps(config) == 5
    watched = cli("--mode=eval", f"--model_dir={run}", "--eval_protocols=knn", "--eval_timeout=0",
                  "--eval_image_size=12", timeout=300)
    assert watched.returncode == 0, watched.stderr[-2000:]
    assert "(step 5)" in watched.stderr
    # An evaluation setting the run also has (its image size, its resize) given explicitly is
    # the command's.
    assert "images at 12 px" in watched.stdout, watched.stdout


def test_small_images_evaluated_larger_are_not_centre_cropped(tmp_path):
    # A 28-px image, black with a white 1-px frame. The original code keys the 87.5% centre
    # crop on the run's image_size (> 32 px), not on the evaluation size: f trained on 32-px views
    # and evaluated at 48 px sees the whole image, frame included; a run on 64-px images crops
    # the frame away (12.5% of 28 px is 1.75 px a side, more than the frame).
    image = np.zeros([28, 28, 3], np.uint8)
    image[0], image[-1], image[:, 0], image[:, -1] = 255, 255, 255, 255
    (tmp_path / "images" / "a").mkdir(parents=True)
    tf.io.write_file(str(tmp_path / "images" / "a" / "0.png"), tf.io.encode_png(image))
    dataset = f"folder:{tmp_path / 'images'}"

    def evaluated(image_size):
        config = cfg.RunConfig(data=cfg.DataConfig(dataset=dataset, image_size=image_size,
                                                   eval_split="train"),
                               eval=cfg.EvalConfig(eval_batch_size=1, eval_image_size=48))
        images, _ = evaluate.extract(lambda x: x, evaluate.eval_batches(config, "train"))
        return images[0]

    whole = evaluated(32)
    assert whole.shape == (48, 48, 3)
    assert whole[0, 0].min() > 0.99 and whole[24, 24].max() < 0.01
    cropped = evaluated(64)
    assert cropped[0, 0].max() < 0.01 and cropped[24, 24].max() < 0.01


def test_raw_pixels_of_gray_images_keep_one_channel_and_the_same_cosines():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.random((6, 4, 4, 1), np.float32), 3, axis=-1)
    bank_gray = np.repeat(rng.random((5, 4, 4, 1), np.float32), 3, axis=-1)
    compact = [evaluate.gray_pixels(tf.constant(x)).numpy() for x in (gray, bank_gray)]
    queries, bank, l2_divisor = evaluate.gray_only(*compact)
    assert l2_divisor == 3
    np.testing.assert_array_equal(queries, gray[..., 0].reshape(6, -1))
    np.testing.assert_array_equal(bank, bank_gray[..., 0].reshape(5, -1))
    flat = [evaluate.raw_pixels(tf.constant(x)).numpy() for x in (gray, bank_gray)]
    whole = knn.nearest(flat[0], flat[1], 3)
    reduced = knn.nearest(queries, bank, 3)
    np.testing.assert_array_equal(whole.indices.numpy(), reduced.indices.numpy())
    np.testing.assert_allclose(whole.values.numpy(), reduced.values.numpy(), rtol=1e-6)
    # One coloured pixel anywhere, in the bank or the queries, keeps all three channels.
    for images, other in ((bank_gray, gray), (gray, bank_gray)):
        tinted = images.copy()
        tinted[-1, 3, 3, 2] += 0.1
        with pytest.raises(evaluate.HasColour):
            evaluate.gray_only(evaluate.gray_pixels(tf.constant(other)).numpy(),
                               evaluate.gray_pixels(tf.constant(tinted)).numpy())


def test_raw_pixel_baseline_extracts_gray_images_once_and_evaluates_them_as_before(
        tmp_path, image_folder, monkeypatch):
    # Gray images (tiled to three equal channels by the loader) are extracted as one channel: the
    # evaluation is the one of all three channels reduced to one afterwards, with l2 / 3 (the
    # reduction this replaced). Colour images keep all three channels.
    def evaluated(dataset):
        config = cfg.RunConfig(data=cfg.DataConfig(dataset=dataset, image_size=8,
                                                   eval_split="train"),
                               eval=cfg.EvalConfig(eval_batch_size=8, knn_k=3))
        baseline = evaluate.evaluate_baselines(config, 3, ["raw_pixels"])
        return config, {k[len("raw_pixels_"):]: v for k, v in baseline.items()}

    original_extract = evaluate.extract

    def reference(config, reduce=None):
        found, _ = evaluate.evaluate_features(evaluate.raw_pixels, config, 3, reduce=reduce)
        return {k: v for k, v in found.items() if k != "num_examples"}

    colour = image_folder(tmp_path / "colour", per_class=8, size=8, classes=("a", "b", "c"))
    extracted = []
    monkeypatch.setattr(evaluate, "extract", lambda fn, *args, **kwargs: (
        extracted.append(fn), original_extract(fn, *args, **kwargs))[1])
    config, found = evaluated(colour)
    assert len(extracted) == 2  # the eval split and the bank, once: colour is seen up front
    assert found == reference(config)
    gray = tmp_path / "gray"
    for path in (tmp_path / "colour").rglob("*.png"):
        target = gray / path.relative_to(tmp_path / "colour")
        target.parent.mkdir(parents=True, exist_ok=True)
        image = tf.io.decode_png(tf.io.read_file(str(path)), channels=3)
        tf.io.write_file(str(target), tf.io.encode_png(tf.image.rgb_to_grayscale(image)))
    config, found = evaluated(f"folder:{gray}")
    assert found == reference(config, lambda queries, bank: (queries[:, 0::3], bank[:, 0::3], 3))
    assert found["linear_l2"] in [value / 3 for value in linear_eval.L2_GRID]
