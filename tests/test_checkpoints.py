"""The checkpoint module: finding checkpoints by name, step and source; restoring a whole run or
only a complete encoder; saving only finite weights; clearing what a killed run left behind."""

import os
import subprocess
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import checkpoints, export, models, pretrain, rundir
from simclr_tf import config as cfg
from simclr_tf.schedules import Schedule

IMAGE_SIZE = 16
STEPS = (5, 7)


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrain_config):
    """A pretraining run directory: config.json and checkpoints at steps 5 and 7."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    config = pretrain_config(model_dir)
    cfg.save(config, model_dir)
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(),
                                  Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=5),
                                  num_classes=10)
    manager = checkpoints.manager(tf.train.Checkpoint(**trainer.checkpoint_items()), model_dir,
                                  5, trainer.step)
    rng = np.random.default_rng(0)
    for v in trainer.head.variables:  # off their initial values, moving statistics included
        v.assign(v.numpy() + rng.uniform(0.1, 0.2, v.shape).astype(np.float32))
    for step in STEPS:
        trainer.optimizer.iterations.assign(step)
        checkpoints.save(manager, trainer.encoder.variables, step)
    return types.SimpleNamespace(model_dir=model_dir, config=config, trainer=trainer,
                                 checkpoints=manager.checkpoints)


def _encoder(config):
    return models.build_encoder(config.encoder, IMAGE_SIZE, global_bn=False)


# --------------------------------------------------------------------------------------------
# Finding checkpoints.

def test_resolve_by_name_step_and_latest(run):
    first, last = run.checkpoints
    assert checkpoints.latest(run.model_dir) == checkpoints.resolve(run.model_dir) == last
    assert checkpoints.resolve(run.model_dir, "5") == first
    assert checkpoints.resolve(run.model_dir, "ckpt-5") == first
    assert checkpoints.resolve(run.model_dir, first) == first
    with pytest.raises(checkpoints.CheckpointError, match="available: ckpt-5, ckpt-7"):
        checkpoints.resolve(run.model_dir, "ckpt-6")
    assert checkpoints.step_of(first) == 5
    assert checkpoints.holds(last, checkpoints.LINEAR_PROBE)
    assert not checkpoints.holds(last, checkpoints.CLASSIFIER)


def test_resolve_source_takes_a_run_a_checkpoint_or_an_export(run, tmp_path):
    first, last = run.checkpoints
    source = checkpoints.resolve_source(run.model_dir)
    assert (source.kind, source.path) == ("checkpoint", last)
    assert source.encoder == run.config.encoder and source.head == run.config.head
    assert checkpoints.resolve_source(first).path == first
    version = export.export_checkpoint(run.model_dir, str(tmp_path / "export"))
    source = checkpoints.resolve_source(version)
    assert (source.kind, source.path, source.head) == ("export", version, None)
    assert source.encoder == run.config.encoder
    with pytest.raises(checkpoints.CheckpointError, match="neither a simclr_tf run directory"):
        checkpoints.resolve_source(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Restoring.

def test_restore_of_a_whole_run_refuses_another_model(run):
    other = cfg.RunConfig(**{**run.config.__dict__, "head": cfg.HeadConfig(proj_out_dim=32)})
    trainer = pretrain.Pretrainer(other, tf.distribute.get_strategy(),
                                  Schedule(total_steps=10, warmup_steps=0, steps_per_epoch=5),
                                  num_classes=10)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.restore(run.checkpoints[-1], trainer.checkpoint_items())
    assert "does not fit the model these flags build" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_projection_head_is_saved_and_read_whole_batch_norm_statistics_included(run,
                                                                                    tmp_path):
    """Its layers sat in Python lists, which TensorFlow's checkpoints do not follow: the head
    was saved without them (its kernels only through the optimiser, its BN statistics not at
    all), and reading it restored nothing without a word."""
    assert len(run.trainer.head.variables) == 10  # 2 layers: kernel, gamma, beta, mean, variance
    keys = [key for key, _ in tf.train.list_variables(run.checkpoints[-1])]
    assert "projection_head/bn_0/moving_mean/.ATTRIBUTES/VARIABLE_VALUE" in keys
    head = models.build_projection_head(run.config, 512)
    checkpoints.read_parts(run.checkpoints[-1], projection_head=head)
    for got, want in zip(head.variables, run.trainer.head.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)
    encoder_only = tf.train.Checkpoint(encoder=_encoder(run.config)).write(
        str(tmp_path / "ckpt-1"))
    with pytest.raises(checkpoints.CheckpointError, match="has no 'projection_head' entry"):
        checkpoints.read_parts(encoder_only, projection_head=head)
    # A checkpoint from before: the head's node is there, with no values below it.
    before = tf.train.Checkpoint(encoder=_encoder(run.config),
                                 projection_head=tf.Module()).write(str(tmp_path / "ckpt-2"))
    with pytest.raises(checkpoints.CheckpointError, match="written before simclr_tf saved the "
                                                          "head's layers"):
        checkpoints.read_parts(before, projection_head=head)


def _object_graph(reader):
    return trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))


def _first_encoder_variable_node(graph):
    encoder = next(c.node_id for c in graph.nodes[0].children if c.local_name == "encoder")
    todo = [encoder]
    while todo:
        node = graph.nodes[todo.pop(0)]
        if any(a.name == "VARIABLE_VALUE" for a in node.attributes):
            return node
        todo.extend(c.node_id for c in node.children)
    raise AssertionError("no encoder variable in the checkpoint")


def _copy_checkpoint_without_one_encoder_variable(src, dst, keep_in_graph):
    """Writes a copy of checkpoint `src` whose encoder misses one variable's value."""
    reader = tf.train.load_checkpoint(src)
    graph = _object_graph(reader)
    node = _first_encoder_variable_node(graph)
    dropped = next(a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE")
    if not keep_in_graph:
        del node.attributes[:]
    names = [k for k in reader.get_variable_to_shape_map()
             if k not in (dropped, "_CHECKPOINTABLE_OBJECT_GRAPH")]
    tf.raw_ops.SaveV2(
        prefix=dst, tensor_names=names + ["_CHECKPOINTABLE_OBJECT_GRAPH"],
        shape_and_slices=[""] * (len(names) + 1),
        tensors=[reader.get_tensor(k) for k in names] + [graph.SerializeToString()])
    return dst


@pytest.mark.parametrize("keep_in_graph,message", [
    # A variable node without a value: `assert_existing_objects_matched` passes on it (checked
    # here), so only restore_encoder's count of the checkpoint's encoder values catches it.
    (False, "holds 104 encoder variables but the run's config.json builds 105"),
    (True, "misses the values of 1 encoder variable"),
])
def test_a_missing_encoder_variable_is_an_error(run, tmp_path, keep_in_graph, message):
    path = _copy_checkpoint_without_one_encoder_variable(
        run.checkpoints[-1], str(tmp_path / "ckpt-7"), keep_in_graph)
    encoder = _encoder(run.config)
    if not keep_in_graph:
        status = tf.train.Checkpoint(encoder=encoder).read(path)
        status.expect_partial()
        status.assert_existing_objects_matched()  # does not notice
    with pytest.raises(checkpoints.CheckpointError, match=message):
        checkpoints.restore_encoder(encoder, path)


def test_checkpoint_without_encoder_or_of_another_encoder_is_an_error(run, tmp_path):
    import keras

    head = keras.layers.Dense(3)
    head.build((None, 4))
    path = tf.train.Checkpoint(projection_head=head).write(str(tmp_path / "ckpt-1"))
    with pytest.raises(checkpoints.CheckpointError, match="no 'encoder' entry"):
        checkpoints.restore_encoder(_encoder(run.config), path)
    wider = cfg.EncoderConfig(resnet_depth=18, width_multiplier=2, cifar_stem=True)
    with pytest.raises(checkpoints.CheckpointError, match="does not hold this encoder"):
        checkpoints.restore_encoder(models.build_encoder(wider, IMAGE_SIZE), run.checkpoints[-1])
    deeper = cfg.EncoderConfig(resnet_depth=34, cifar_stem=True)
    with pytest.raises(checkpoints.CheckpointError, match="config and checkpoint disagree"):
        checkpoints.restore_encoder(models.build_encoder(deeper, IMAGE_SIZE),
                                    run.checkpoints[-1])


# --------------------------------------------------------------------------------------------
# Saving, and what a killed run leaves.

def test_save_refuses_non_finite_weights_and_names_the_last_good_checkpoint(tmp_path):
    weights = tf.Variable([1.0, 2.0])
    manager = checkpoints.manager(tf.train.Checkpoint(weights=weights), str(tmp_path), 2, None)
    good = checkpoints.save(manager, [weights], 1)
    weights.assign([1.0, np.nan])
    with pytest.raises(FloatingPointError) as error:
        checkpoints.save(manager, [weights], 2)
    assert str(error.value) == (f"{weights.name} is not finite after step 2: stopping without "
                                f"saving; the last good checkpoint is {good}")
    assert checkpoints.latest(str(tmp_path)) == good
    assert not any(name.startswith("ckpt-2") for name in os.listdir(tmp_path))


def test_remove_stale_temporaries_keeps_complete_files_and_live_writers(tmp_path):
    model_dir = tmp_path / "run"
    (model_dir / "eval_test__").mkdir(parents=True)
    (model_dir / "export" / ".tmp-3-host-1").mkdir(parents=True)  # export's own cleaning
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [model_dir / "ckpt-9_temp", model_dir / "checkpoint.tmp0a1b",
             model_dir / f"config.json.tmp-{dead.pid}", model_dir / f"results.json.tmp-{dead.pid}",
             model_dir / f"nearest_neighbours.png.tmp-{dead.pid}",
             model_dir / "eval_test__" / f"results-7.json.tmp-{dead.pid}"]
    kept = [model_dir / "ckpt-7.index", model_dir / "results.json",
            model_dir / f"config.json.tmp-{os.getpid()}",  # a live writer's, e.g. an evaluation
            model_dir / "eval_test__" / "results-7.json", model_dir / "export" / ".tmp-3-host-1"]
    (model_dir / "ckpt-9_temp").mkdir()
    for path in stale[1:] + kept[:-1]:
        path.write_text("{")
    rundir.remove_stale_temporaries(str(model_dir))
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
