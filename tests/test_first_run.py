"""The README's main command, shrunk: it ends with an evaluation next to its baselines, the
pictures of the embeddings, and a summary whose next commands run as printed."""

import dataclasses
import json
import os
import re
import shlex

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as cfg
from simclr_tf import evaluate, precision, summary

SMALL = ["--train_split=train[:600]", "--eval_split=test[:200]", "--eval_batch_size=100"]


def test_baselines_are_evaluated_like_f(tmp_path, image_folder):
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=image_folder(tmp_path / "images", per_class=4, size=8,
                                                 classes=("a", "b", "c")),
                            image_size=8, eval_split="train"),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        eval=cfg.EvalConfig(eval_batch_size=4, knn_k=3))
    results = evaluate.evaluate_baselines(config, 3, ("raw_pixels", "random_encoder"))
    assert {k for k in results if k.endswith("top1")} == {
        "raw_pixels_knn_top1", "raw_pixels_linear_top1", "raw_pixels_linear_heldout_top1",
        "raw_pixels_linear_train_top1", "random_encoder_knn_top1",
        "random_encoder_linear_top1", "random_encoder_linear_heldout_top1",
        "random_encoder_linear_train_top1"}
    # Raw pixels on their own split: each image's nearest neighbour is itself (cosine 1,
    # weight e^10 against at most 2 * e^(cos / 0.1) with cos < 0.9 here), so kNN is exact.
    images, labels = evaluate.extract(lambda x: x, evaluate.eval_batches(config, "train"))
    flat = images.reshape(len(images), -1)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    cosines = flat @ flat.T - 2 * np.eye(len(flat))
    assert cosines.max() < 0.9
    assert results["raw_pixels_knn_top1"] == 1.0

    # f at random initialisation: seeded, and only its batch-norm statistics are estimated.
    a, b = evaluate.random_encoder(config), evaluate.random_encoder(config)
    for x, y in zip(a.variables, b.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    statistics = [v for v in a.variables if "moving" in v.path]
    assert statistics and not any(v.trainable for v in statistics)
    assert any(np.abs(v.numpy()).max() > 0 for v in statistics if "moving_mean" in v.path)


def test_summary_reads_as_a_result(tmp_path):
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset="fashion_mnist", image_size=24),
        train=cfg.TrainConfig(model_dir=str(tmp_path), train_batch_size=256,
                              precision="bfloat16"),
        eval=cfg.EvalConfig(knn_bank_size=5000))
    results = {"num_examples": 10000, "linear_top1": 0.833, "knn_top1": 0.698,
               "probe_top1": 0.446, "raw_pixels_linear_top1": 0.835,
               "raw_pixels_knn_top1": 0.730, "random_encoder_linear_top1": 0.665,
               "random_encoder_knn_top1": 0.559, "projector_config": str(tmp_path / "projector_config.pbtxt"),
               "nearest_neighbours": str(tmp_path / "nearest_neighbours.png")}
    text = summary.text(config, results, train_seconds=456, num_examples=60000)
    lines = text.splitlines()
    assert lines[0].startswith("SimCLR pretraining of ResNet-50 x1 (CIFAR stem) on fashion_mnist "
                               "(train): step 0, batches of 256, 0.00 epochs, trained for 7.6 "
                               "minutes here in bfloat16.")
    table = lines[lines.index(next(l for l in lines if "f (this run)" in l)):][:4]
    assert table[0].split() == ["f", "(this", "run)", "raw", "pixels", "random", "f"]
    assert table[1].split() == ["linear", "evaluation", "83.3%", "83.5%", "66.5%"]
    assert table[2].split() == ["kNN", "69.8%", "73.0%", "55.9%"]
    assert table[3].split() == ["probe", "of", "pretraining", "44.6%"]
    assert ("f is -0.2 points from raw pixels by the linear evaluation and -3.2 by kNN; +16.8 and "
            "+13.9 from its random initialisation.") in text
    assert "the first 5000 training images" in text
    assert f"tensorboard --logdir={tmp_path}" in text and "nearest_neighbours.png" in text
    assert "Checkpoint: none yet" in text
    assert len([l for l in lines if l.startswith("  ") and "python -m simclr_tf.run" in l]) == 2

    # A fine-tuned classifier: its top-1 / top-5, and no kNN or baselines to speak of.
    tuned = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                  train_mode="finetune"))
    text = summary.text(tuned, {"num_examples": 10000, "protocol": "classifier", "top1": 0.8,
                                "top5": 0.99})
    assert ("Evaluated on fashion_mnist (test): 10000 images at 24 px: top-1 80.0%, top-5 "
            "99.0%.") in text
    assert "kNN" not in text and "fine-tune on 1%" not in text
    assert f"evaluate again: python -m simclr_tf.run --mode=eval --model_dir={tmp_path}" in text

    # --mode=eval takes the command's evaluation settings: the suggested command repeats the
    # run's, so that it measures the same way.
    held_out = dataclasses.replace(
        config, data=dataclasses.replace(config.data, eval_split="train[50000:]"),
        eval=dataclasses.replace(config.eval, eval_protocols="knn,linear",
                                 eval_baselines="raw_pixels", eval_batch_size=1024))
    text = summary.text(held_out, results)
    assert (f"evaluate again, with the whole train split as the bank: python -m simclr_tf.run "
            f"--mode=eval --model_dir={tmp_path} --eval_split='train[50000:]' "
            "--eval_batch_size=1024 --eval_protocols=knn,linear --eval_baselines=raw_pixels "
            "--knn_bank_size=0") in text


@pytest.mark.slow
def test_main_command_ends_with_a_result_and_next_commands_that_run(tmp_path, cli):
    model_dir = tmp_path / "run"
    result = cli("--flagfile=flags/fashion_mnist.flags", *SMALL, f"--model_dir={model_dir}",
                 "--train_steps=2", "--checkpoint_steps=2", "--steps_per_loop=1",
                 "--train_batch_size=32", "--knn_bank_size=300", "--projector_examples=50",
                 "--neighbour_queries=3", timeout=900, env={"TF_CPP_MIN_LOG_LEVEL": None})
    assert result.returncode == 0, result.stderr[-3000:]
    # The run's own lines, without the libraries' INFO chatter (a user's default).
    assert "step 2/2" in result.stderr and "Evaluating f of" in result.stderr
    for chatter in ("Load dataset info", "Sharding callback", "Assets written"):
        assert chatter not in result.stderr, result.stderr
    out = result.stdout
    assert "step 2, batches of 32" in out
    # --precision=auto: bfloat16 where the CPU has it natively, said in the log and the summary.
    chosen, why = precision.choose("default")
    assert f"Training in {chosen} ({why})" in result.stderr
    assert re.search(rf"trained for \d+\.\d minutes here in {chosen}\.", out), out
    assert cfg.load(str(model_dir)).train.precision == chosen
    # f against raw pixels (the default's one baseline), by both protocols.
    assert re.search(r"linear evaluation +\d+\.\d% +\d+\.\d%$", out, re.M), out
    assert re.search(r"kNN +\d+\.\d% +\d+\.\d%$", out, re.M), out
    assert re.search(r"f is [+-]\d+\.\d points from raw pixels by the linear evaluation and "
                     r"[+-]\d+\.\d by kNN\.", out), out
    assert f"Checkpoint: {model_dir}/ckpt-2" in out
    assert f"Export of f: {model_dir}/export/2" in out
    with open(model_dir / "results.json") as f:
        results = json.load(f)
    for key in ("linear_top1", "knn_top1", "raw_pixels_linear_top1", "raw_pixels_knn_top1"):
        assert 0 <= results[key] <= 1
    assert "random_encoder_knn_top1" not in results and "probe_top1" not in results
    assert f"{100 * results['linear_top1']:.1f}%" in out
    assert os.path.exists(model_dir / "nearest_neighbours.png")
    assert len(open(model_dir / "eval_test__200_" / "embeddings.tsv").readlines()) == 50

    # The next commands, as printed (plus a smaller data and step budget), run.
    commands = {name: line.split(": ", 1)[1] for name, line in
                (("eval", next(l for l in out.splitlines() if "evaluate again" in l)),
                 ("finetune", next(l for l in out.splitlines() if "fine-tune on 1%" in l)))}
    evaluation = cli(*shlex.split(commands["eval"])[3:], *SMALL, "--knn_bank_size=300",
                     "--projector_examples=0", "--neighbour_queries=0")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    # Measured as the run measured: at its 48 px, next to raw pixels.
    assert "images at 48 px" in evaluation.stdout, evaluation.stdout
    assert re.search(r"f is [+-]\d+\.\d points from raw pixels by the linear evaluation",
                     evaluation.stdout), evaluation.stdout
    finetune = cli(*shlex.split(commands["finetune"])[3:], *SMALL, "--train_steps=2",
                   f"--model_dir={tmp_path / 'ft'}")
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert re.search(r"top-1 \d+\.\d%, top-5 \d+\.\d%", finetune.stdout), finetune.stdout
    export = re.search(r"hub\.KerasLayer\('([^']+)'\)", out).group(1)
    assert tf.saved_model.contains_saved_model(export)


def test_features_are_traced_once_for_both_splits(tmp_path, image_folder):
    # evaluate_features extracts the eval split and the bank with one tf.function: the features
    # function's Python body runs once (one trace), not once per split.
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=image_folder(tmp_path / "images", per_class=4, size=8,
                                                 classes=("a", "b", "c")),
                            image_size=8, eval_split="train"),
        eval=cfg.EvalConfig(eval_batch_size=4, knn_k=3))
    traces = []

    def features(images):
        traces.append(1)
        return tf.reshape(images, [tf.shape(images)[0], -1])

    results, _ = evaluate.evaluate_features(features, config, 3, ("knn",))
    assert results["num_examples"] == 12 and len(traces) == 1
    images, _ = evaluate.extract(tf.function(features), evaluate.eval_batches(config, "train"))
    assert images.shape == (12, 8 * 8 * 3)
