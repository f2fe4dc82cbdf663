"""The converter of the original SimCLR TF2 code's checkpoints and SavedModels (simclr_tf.convert).

The references are the original code's own outputs (tests/data/original, made by its
make_reference.py running google-research/simclr tf2/): the weights are written here in the
original's layout from its variable names and the fixtures' recipe, converted, and our model's
outputs compared with the original's, endpoint by endpoint.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from original_layout import (load_fixture, reference_images, write_checkpoint,
                             write_real_saved_model, write_saved_model)
from simclr_tf import checkpoints, classifier, convert, models
from simclr_tf import config as cfg
from simclr_tf.resnet import ENDPOINTS, feature_extractor

FIXTURES = ("r50_1x_sk0", "r50_1x_sk1", "r50_2x_sk1", "r50_2x_se", "r18_1x_se_cifar")
FINE_TUNED = "r18_1x_se_cifar_ft1"  # classifier on head layer 1, as the released finetuned_*
RELATIVE_ERROR = 1e-4
SMALL = "r18_1x_se_cifar"


def _write_original(description, kind, root, **kwargs):
    """An original-layout checkpoint directory or SavedModel (step 1000) under `root`."""
    if kind == "checkpoint":
        write_checkpoint(description, os.path.join(root, "ckpt-1000"), **kwargs)
        with open(os.path.join(root, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "ckpt-1000"\n')  # as the original's manager
        return str(root)
    return write_saved_model(description, os.path.join(root, "saved_model", "1000"), **kwargs)


def _outputs(model_dir, path, images):
    """Our model's outputs under the names of the original's, from the converted run."""
    config = cfg.load(model_dir)
    encoder = models.build_encoder(config.encoder, None, global_bn=False)
    checkpoints.restore_encoder(encoder, path)
    head = models.build_projection_head(config, models.encoder_output_dim(encoder))
    checkpoints.read_parts(path, projection_head=head)
    classes = checkpoints.classes_of(path, checkpoints.LINEAR_PROBE)
    probe = models.build_linear_probe(classes, models.encoder_output_dim(encoder))
    checkpoints.read_parts(path, linear_probe=probe)
    maps = {k: v.numpy() for k, v in feature_extractor(encoder, ENDPOINTS)(
        images, training=False).items()}
    h = maps["final_avg_pool"]
    z, hiddens = head(h, training=False)
    out = {"initial_max_pool": maps["stem"], "final_avg_pool": h,
           "proj_head_output": z.numpy(), "logits_sup": probe(h).numpy()}
    out.update({f"block_group{i}": maps[f"block_group{i}"] for i in range(1, 5)})
    out.update({f"proj_head_layer{j}": x.numpy() for j, x in enumerate(hiddens)})
    return out, (encoder, head, probe)


@pytest.mark.fidelity
@pytest.mark.parametrize("kind", ["checkpoint", "saved_model"])
@pytest.mark.parametrize("name", FIXTURES)
def test_converted_model_gives_the_original_codes_outputs(name, kind, tmp_path):
    description, reference = load_fixture(name)
    flags = description["flags"]
    source = _write_original(description, kind, tmp_path / "original")
    out = str(tmp_path / "run")
    path = convert.convert(source, out, image_size=flags["image_size"])
    assert os.path.basename(path) == "ckpt-1000" and checkpoints.step_of(path) == 1000

    config = cfg.load(out)  # the architecture, read off the weights
    assert (config.encoder.resnet_depth, config.encoder.width_multiplier,
            config.encoder.sk_ratio, config.encoder.se_ratio, config.encoder.cifar_stem) == (
        flags["resnet_depth"], flags["width_multiplier"], flags.get("sk_ratio", 0.0),
        flags.get("se_ratio", 0.0), flags["image_size"] <= 32)
    assert (config.head.num_layers, config.head.proj_out_dim) == (flags["num_proj_layers"], 128)
    assert config.train.train_mode == "pretrain" and config.data.image_size == flags["image_size"]
    assert config.data.eval_resize == "bicubic"  # evaluated as the original preprocesses

    ours, parts = _outputs(out, path, reference_images(flags["image_size"]))
    assert sorted(ours) == sorted(reference)
    for key, expected in reference.items():
        assert ours[key].shape == expected.shape, key
        error = np.abs(ours[key] - expected).max() / np.abs(expected).max()
        assert error < RELATIVE_ERROR, f"{key}: relative error {error:.2e}"
    # Every weight came across: as many values as the original holds (our uncentred last BN
    # of g keeps a zero beta the original does not have).
    original_count = sum(int(np.prod(v["shape"])) for v in description["variables"])
    ours_count = sum(int(np.prod(v.shape)) for part in parts for v in part.weights
                     if not (v.path.endswith("beta") and not np.any(v.numpy())))
    assert ours_count == original_count
    with open(os.path.join(out, convert.CONVERTED_FROM)) as f:
        described = json.load(f)
    assert described["format"] == kind and described["step"] == 1000
    if name == "r50_1x_sk1":  # at width 1 the SK layers' minimum width hides the ratio
        assert described["notes"] == [
            "sk_ratio: every squeezed layer is 32 wide, which any sk_ratio up to 0.0625 gives; "
            "recorded as 0.0625"]


@pytest.mark.fidelity
def test_the_original_codes_own_saved_model_layout_converts(tmp_path):
    """The SavedModel exactly as the original's run.build_saved_model + tf.saved_model.save lay
    it out (its object graph, 2,000-odd nodes of Keras bookkeeping that reach each variable
    several ways, and its keys), not the 300-node stand-in of the other tests: the converter
    finds every variable by its path under model/ and gives the original's outputs."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    description, reference = load_fixture(SMALL)
    source = write_real_saved_model(SMALL, description, str(tmp_path / "saved_model" / "1000"))
    reader = tf.train.load_checkpoint(os.path.join(source, "variables", "variables"))
    nodes = len(trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")).nodes)
    stand_in = _write_original(description, "saved_model", tmp_path / "stand_in")
    stand_in_nodes = len(trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        tf.train.load_checkpoint(os.path.join(stand_in, "variables", "variables")).get_tensor(
            "_CHECKPOINTABLE_OBJECT_GRAPH")).nodes)
    assert nodes > 3 * stand_in_nodes, (nodes, stand_in_nodes)
    out = str(tmp_path / "run")
    path = convert.convert(source, out, image_size=32)
    assert checkpoints.step_of(path) == 1000
    ours, _ = _outputs(out, path, reference_images(32))
    for key, expected in reference.items():
        error = np.abs(ours[key] - expected).max() / np.abs(expected).max()
        assert error < RELATIVE_ERROR, f"{key}: relative error {error:.2e}"


@pytest.mark.fidelity
@pytest.mark.parametrize("kind", ["checkpoint", "saved_model"])
def test_converted_fine_tuned_model_gives_the_original_codes_logits(kind, tmp_path):
    """The released SimCLRv2 fine-tuned models' path: the original's classifier reads projection
    head layer 1 (`--ft_proj_selector=1`), and so must the converted classifier, logit for logit
    (the original code run in finetune mode made the reference)."""
    description, reference = load_fixture(FINE_TUNED)
    flags = description["flags"]
    assert (flags["train_mode"], flags["ft_proj_selector"]) == ("finetune", 1)
    source = _write_original(description, kind, tmp_path / "original")
    out = str(tmp_path / "run")
    path = convert.convert(source, out, image_size=flags["image_size"], train_mode="finetune",
                           ft_proj_selector=1)
    config = cfg.load(out)
    assert (config.train.train_mode, config.finetune.ft_proj_selector) == ("finetune", 1)
    classes = checkpoints.classes_of(path, checkpoints.CLASSIFIER)
    assert classes == reference["logits_sup"].shape[1]
    model = classifier.build_classifier(config, classes)
    checkpoints.read_parts(path, **model.checkpoint_items())
    images = reference_images(flags["image_size"])
    logits = model(images, training=False).numpy()
    expected = reference["logits_sup"]
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error < RELATIVE_ERROR, f"logits: relative error {error:.2e}"


def test_v1_model_without_projection_head(tmp_path, small):
    """SimCLRv1's released models come without their projection head."""
    _, reference = load_fixture(SMALL)
    head = [v["path"] for v in small["variables"] if "/_projection_head/" in v["path"]]
    source = _write_original(small, "checkpoint", tmp_path / "original", drop=head)
    path = convert.convert(source, str(tmp_path / "run"))
    config = cfg.load(str(tmp_path / "run"))
    assert config.head.proj_head_mode == "none" and config.data.image_size == 32
    assert not checkpoints.holds(path, checkpoints.PROJECTION_HEAD)
    encoder = models.build_encoder(config.encoder, None, global_bn=False)
    checkpoints.restore_encoder(encoder, path)
    h = encoder(reference_images(32), training=False).numpy()
    expected = reference["final_avg_pool"]
    assert np.abs(h - expected).max() / np.abs(expected).max() < RELATIVE_ERROR


@pytest.mark.parametrize("kind", ["checkpoint", "saved_model"])
def test_fine_tuning_straight_from_an_original_says_convert_first(tmp_path, small, kind):
    source = _write_original(small, kind, tmp_path / "original")
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.resolve_source(source)
    assert f"convert it first: python -m simclr_tf.convert --source={source} " in str(e.value)


# --------------------------------------------------------------------------------------------
# Bad input: one line naming what was expected.

@pytest.fixture(scope="module")
def small():
    return load_fixture(SMALL)[0]


def _convert_error(source, out, **kwargs):
    with pytest.raises(convert.ConversionError) as e:
        convert.convert(str(source), str(out), **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_tf1_checkpoint_is_refused(tmp_path):
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "model.ckpt-100"),
                      tensor_names=["base_model/conv2d/kernel"], shape_and_slices=[""],
                      tensors=[tf.zeros((3, 3, 3, 64))])
    assert "TF1 (name-based) checkpoint" in _convert_error(tmp_path / "model.ckpt-100",
                                                           tmp_path / "run")


def test_tf1_hub_module_is_refused(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "tfhub_module.pb").write_bytes(b"")
    assert "TF1 hub module" in _convert_error(tmp_path / "hub", tmp_path / "run")


def test_unrelated_and_own_checkpoints_are_refused(tmp_path, small):
    import keras

    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    prefix = tf.train.Checkpoint(net=dense).write(str(tmp_path / "other" / "ckpt"))
    message = _convert_error(prefix, tmp_path / "run")
    assert "not a checkpoint of the original SimCLR TF2 code" in message and "net" in message

    source = _write_original(small, "checkpoint", tmp_path / "original")
    convert.convert(source, str(tmp_path / "ours"), image_size=32)
    assert "simclr_tf run already" in _convert_error(tmp_path / "ours", tmp_path / "run2")


def test_truncated_checkpoint_is_refused_and_nothing_is_left(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    data = tmp_path / "original" / "ckpt-1000.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    message = _convert_error(source, tmp_path / "run", image_size=32)
    assert "truncated or damaged" in message
    assert sorted(os.listdir(tmp_path)) == ["original"]  # no run, no temporary directory


def test_a_variable_under_an_unknown_layer_is_named(tmp_path, small):
    extra = dict(small, variables=small["variables"] + [
        {"path": "model/resnet_model/mystery_layer/kernel", "shape": [3, 3], "trainable": True}])
    source = _write_original(extra, "checkpoint", tmp_path / "original")
    message = _convert_error(source, tmp_path / "run")
    assert "variable model/resnet_model/mystery_layer/kernel has no counterpart" in message


def test_model_dir_must_be_new_or_empty(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    (tmp_path / "file").write_text("x")
    assert "is a file" in _convert_error(source, tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    assert "is not empty" in _convert_error(source, tmp_path / "full")
    (tmp_path / "empty").mkdir()
    convert.convert(source, str(tmp_path / "empty"))
    assert cfg.load(str(tmp_path / "empty")).encoder.resnet_depth == 18


def test_step_from_the_name_or_unknown(tmp_path, small):
    (tmp_path / "a").mkdir()
    write_checkpoint(small, str(tmp_path / "a" / "ckpt-2500"), global_step=None)
    path = convert.convert(str(tmp_path / "a" / "ckpt-2500"), str(tmp_path / "run_a"))
    assert checkpoints.step_of(path) == 2500
    write_saved_model(small, str(tmp_path / "b" / "saved_model"))  # no numbered directory
    path = convert.convert(str(tmp_path / "b" / "saved_model"), str(tmp_path / "run_b"))
    assert checkpoints.step_of(path) == 1
    with open(tmp_path / "run_b" / convert.CONVERTED_FROM) as f:
        notes = json.load(f)["notes"]
    assert "step: unknown (a SavedModel outside a numbered directory); the run records step 1" \
        in notes
    assert "image_size: not in the weights; 32 by default (--image_size)" in notes


def test_fine_tuned_from_h_leaves_the_head_out(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    path = convert.convert(source, str(tmp_path / "run"), train_mode="finetune")
    assert checkpoints.holds(path, checkpoints.CLASSIFIER)
    assert not checkpoints.holds(path, checkpoints.PROJECTION_HEAD)
    assert checkpoints.classes_of(path, checkpoints.CLASSIFIER) == 1000
    with open(tmp_path / "run" / convert.CONVERTED_FROM) as f:
        assert any("projection head (9 variables) is left out" in n for n in json.load(f)["notes"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_mode="finetune", ft_proj_selector=5), "ft_proj_selector=5 is outside -3..2"),
    (dict(train_mode="finetune", ft_proj_selector=-1), "gives 128"),
    (dict(train_mode="linear"), "train_mode must be pretrain or finetune"),
])
def test_selector_and_mode_are_checked(tmp_path, small, kwargs, message):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    assert message in _convert_error(source, tmp_path / "run", **kwargs)


def test_supervised_head_on_another_layer_or_none(tmp_path, small):
    kernel = "model/supervised_head/linear_layer/dense/kernel"
    source = _write_original(small, "checkpoint", tmp_path / "a", reshape={kernel: [128, 1000]})
    assert "is it a fine-tuned model?" in _convert_error(source, tmp_path / "run")
    path = convert.convert(source, str(tmp_path / "run"), train_mode="finetune",
                           ft_proj_selector=2)  # read the head's 128-wide output
    assert cfg.load(str(tmp_path / "run")).finetune.ft_proj_selector == 2
    assert checkpoints.holds(path, checkpoints.PROJECTION_HEAD)
    headless = [kernel, "model/supervised_head/linear_layer/dense/bias"]
    source = _write_original(small, "checkpoint", tmp_path / "b", drop=headless)
    assert "needs a supervised head" in _convert_error(source, tmp_path / "run_b",
                                                       train_mode="finetune")


def test_wrong_shapes_and_missing_values_name_the_variable(tmp_path, small):
    kernel = "model/resnet_model/block_groups/1/layers/1/conv2d_bn_layers/2/conv2d/kernel"
    source = _write_original(small, "checkpoint", tmp_path / "a",
                             reshape={kernel: [3, 3, 64, 128]})
    message = _convert_error(source, tmp_path / "run", image_size=32)
    assert kernel in message and "[3, 3, 64, 128]" in message and "[3, 3, 128, 128]" in message

    gamma = "model/resnet_model/block_groups/2/layers/0/conv2d_bn_layers/1/bn/gamma"
    source = _write_original(small, "checkpoint", tmp_path / "b", drop=[gamma])
    message = _convert_error(source, tmp_path / "run", image_size=32)
    assert "group3_block1_1_bn/gamma" in message and "incomplete" in message


def test_image_size_the_stem_cannot_take_is_refused(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    message = _convert_error(source, tmp_path / "run", image_size=4)
    assert "image_size=4 is too small for the CIFAR stem: use at least 8" in message


def test_supervised_head_and_mode_must_agree(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    message = _convert_error(source, tmp_path / "run", train_mode="finetune", ft_proj_selector=2)
    assert "gives 128" in message and "SimCLRv2's released fine-tuned models: 1" in message
    assert "applies to --train_mode=finetune" in _convert_error(
        source, tmp_path / "run", ft_proj_selector=1)


def test_an_existing_run_is_not_overwritten(tmp_path, small):
    source = _write_original(small, "checkpoint", tmp_path / "original")
    convert.convert(source, str(tmp_path / "run"), image_size=32)
    before = sorted(os.listdir(tmp_path / "run"))
    assert "holds a run already" in _convert_error(source, tmp_path / "run", image_size=32)
    assert sorted(os.listdir(tmp_path / "run")) == before


# --------------------------------------------------------------------------------------------
# Every mode on a converted run, through the command lines.

TEN_CLASSES = {"model/supervised_head/linear_layer/dense/kernel": [512, 10],
               "model/supervised_head/linear_layer/dense/bias": [10]}  # Fashion-MNIST's
SMALL_RUN = ("--eval_split=test[:100]", "--eval_batch_size=50", "--knn_bank_size=200",
             "--projector_examples=0", "--neighbour_queries=0")
SMALL_TRAINING = ("--dataset=fashion_mnist", "--train_split=train[:600]", "--image_size=32",
                  "--train_batch_size=8", "--train_steps=2", "--steps_per_loop=1",
                  "--checkpoint_steps=2", "--optimizer=momentum", "--learning_rate=0.01",
                  "--warmup_epochs=0", "--mode=train_then_eval") + SMALL_RUN


def _convert_cli(*flags):
    return subprocess.run([sys.executable, "-m", "simclr_tf.convert", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO))


def _results(model_dir):
    with open(os.path.join(model_dir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_cli_converts_a_pretrained_model_that_evaluates_fine_tunes_and_exports(tmp_path, small,
                                                                                cli):
    # As a released pretrained model: its 1000-class head is the linear probe (of ImageNet).
    source = _write_original(small, "saved_model", tmp_path / "original")
    run = tmp_path / "run"
    done = _convert_cli(f"--source={tmp_path / 'original' / 'saved_model'}",
                        f"--model_dir={run}", "--dataset=fashion_mnist")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Converted saved_model {source} (step 1000)" in done.stdout  # the newest step
    assert ("ResNet-18 1x, sk_ratio 0.0, se_ratio 0.25, CIFAR stem; 2-layer projection head to "
            "128; 1000-class supervised head as the linear probe") in done.stdout
    assert "image_size 32, dataset fashion_mnist" in done.stdout  # 32: the CIFAR stem's size

    evaluated = cli("--mode=eval", f"--model_dir={run}", "--eval_protocols=probe,knn,linear",
                    *SMALL_RUN)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "predicts 1000 classes, fashion_mnist has 10: evaluating knn,linear only" in \
        evaluated.stderr
    results = _results(run)
    assert results["step"] == 1000 and results["num_examples"] == 100
    assert "probe_top1" not in results
    assert all(0 <= results[f"{p}_top1"] <= 1 for p in ("knn", "linear"))

    tuned = tmp_path / "finetuned"
    finetuned = cli("--train_mode=finetune", f"--checkpoint={run}", "--ft_proj_selector=1",
                    f"--model_dir={tuned}", *SMALL_TRAINING)
    assert finetuned.returncode == 0, finetuned.stderr[-2000:]
    assert _results(tuned)["step"] == 2 and _results(tuned)["protocol"] == "classifier"

    exported = subprocess.run([sys.executable, "-m", "export", f"--model_dir={run}"], cwd=REPO,
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=REPO))
    assert exported.returncode == 0, exported.stderr[-2000:]
    version = exported.stdout.strip().splitlines()[-1]
    assert os.path.basename(version) == "1000"
    with open(os.path.join(version, checkpoints.EXPORT_METADATA)) as f:
        assert json.load(f)["preprocessing"]["resize"] == "bicubic"  # serving_bytes as well
    _, reference = load_fixture(SMALL)
    images = reference_images(32)
    expected = reference["final_avg_pool"]  # the original code's h for these images

    def close(got):
        return np.abs(np.asarray(got) - expected).max() / np.abs(expected).max() < RELATIVE_ERROR

    loaded = tf.saved_model.load(version)
    assert close(loaded.signatures["serving_default"](images=tf.constant(images))["embedding"])

    import keras
    import tensorflow_hub as hub
    import tf_keras

    inputs = tf_keras.Input((32, 32, 3))
    hub_model = tf_keras.Model(inputs, hub.KerasLayer(version, trainable=True)(inputs))
    assert close(hub_model(images, training=False))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(hub_model(images, training=True))
    grads = tape.gradient(loss, hub_model.trainable_weights)
    assert grads and all(g is not None for g in grads)  # fine-tunable after loading
    tfsm = keras.layers.TFSMLayer(version, call_endpoint="serving_default")
    assert close(tfsm(images)["embedding"])


@pytest.mark.slow
def test_cli_converts_a_fine_tuned_model_that_evaluates_and_teaches(tmp_path, small, cli):
    source = _write_original(small, "checkpoint", tmp_path / "original", reshape=TEN_CLASSES)
    teacher = tmp_path / "teacher"
    done = _convert_cli(f"--source={source}", f"--model_dir={teacher}", "--image_size=32",
                        "--dataset=fashion_mnist", "--train_mode=finetune",
                        "--ft_proj_selector=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "10-class supervised head as the classifier" in done.stdout
    config = cfg.load(str(teacher))
    assert (config.train.train_mode, config.finetune.ft_proj_selector) == ("finetune", 1)

    evaluated = cli("--mode=eval", f"--model_dir={teacher}", *SMALL_RUN)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert _results(teacher)["protocol"] == "classifier" and _results(teacher)["step"] == 1000

    student = tmp_path / "student"
    distilled = cli("--train_mode=distill", f"--teacher={teacher}", f"--model_dir={student}",
                    "--resnet_depth=18", *SMALL_TRAINING)
    assert distilled.returncode == 0, distilled.stderr[-2000:]
    assert _results(student)["train_mode"] == "distill" and _results(student)["step"] == 2


def test_cli_bad_source_is_one_line(tmp_path):
    done = _convert_cli(f"--source={tmp_path / 'nothing'}", f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --source={tmp_path / 'nothing'} does not exist")
