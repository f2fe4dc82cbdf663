"""Seeing the embeddings: the projector's files, the nearest-neighbour picture's layout, and both
written by the evaluation of a pretraining checkpoint."""

import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins import projector

from simclr_tf import config as cfg
from simclr_tf import evaluate, pretrain, visualise
from simclr_tf import results as results_lib
from simclr_tf.schedules import Schedule

CELL, FRAME = visualise.CELL, visualise.FRAME


def _constant_images(values, side=8):
    return np.stack([np.full([side, side, 3], v, np.float32) for v in values])


def _read_png(path):
    return tf.io.decode_png(tf.io.read_file(path)).numpy()


def test_nearest_neighbours_by_cosine_best_first():
    bank = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [10, 1]], np.float32)
    queries = np.array([[1, 0.1], [0, -1]], np.float32)
    # cosines of query 0: 0.995, 0.0995, 0.774, -0.995, 0.9999 -> rows 4, 0, 2
    # query 1: 0, -1, -0.707, 0, -0.0995 -> rows 0 and 3 tie at 0 (lower index first), then 4
    np.testing.assert_array_equal(visualise.nearest_neighbours(queries, bank, k=3),
                                  [[4, 0, 2], [0, 3, 4]])


def test_queries_cover_the_classes_first():
    labels = np.array([2, 2, 0, 2, 1, 0, 1])
    np.testing.assert_array_equal(visualise.pick_queries(labels, 3), [0, 2, 4])
    np.testing.assert_array_equal(visualise.pick_queries(labels, 2), [0, 2])
    np.testing.assert_array_equal(visualise.pick_queries(labels, 5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(visualise.sample_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(visualise.sample_indices(3, 1000), [0, 1, 2])


def test_neighbour_picture_layout_and_frames():
    queries = _constant_images([0.2, 0.4])
    neighbours = np.stack([_constant_images([0.1, 0.3, 0.5]), _constant_images([0.6, 0.7, 0.8])])
    pixels = visualise.neighbour_picture(queries, [1, 2], neighbours, [[1, 0, 1], [2, 2, 5]])
    assert pixels.shape == (2 * CELL, 4 * CELL, 3) and pixels.dtype == np.uint8
    frames = [[visualise.QUERY, visualise.SAME, visualise.OTHER, visualise.SAME],
              [visualise.QUERY, visualise.SAME, visualise.SAME, visualise.OTHER]]
    values = [[0.2, 0.1, 0.3, 0.5], [0.4, 0.6, 0.7, 0.8]]
    for row in range(2):
        for column in range(4):
            cell = pixels[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL]
            assert tuple(cell[0, 0]) == frames[row][column]
            assert tuple(cell[FRAME - 1, CELL // 2]) == frames[row][column]
            inner = cell[FRAME:CELL - FRAME, FRAME:CELL - FRAME]
            assert (inner == round(values[row][column] * 255)).all()


def test_sprite_is_row_major_on_a_square_grid():
    pixels, side = visualise.sprite(_constant_images([0.2 * i for i in range(5)]))
    assert side == 8 and pixels.shape == (24, 24, 3)
    for i in range(9):
        row, column = divmod(i, 3)
        cell = pixels[row * 8:(row + 1) * 8, column * 8:(column + 1) * 8]
        assert (cell == (51 * i if i < 5 else 0)).all()
    big, side = visualise.sprite(np.zeros([2, 200, 200, 3], np.float32))
    assert side == visualise.MAX_SPRITE_THUMBNAIL and big.shape == (128, 128, 3)


def test_projector_files(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 4)).astype(np.float32)
    files = tmp_path / "eval_test"
    path = visualise.write_projector(str(tmp_path), str(files), features, [0, 1, 1, 2, 7],
                                     _constant_images([0.5] * 5), ("cat", "dog", "bird"),
                                     tensor_name="h of test at step 3")
    assert path == str(tmp_path / visualise.PROJECTOR_CONFIG_FILENAME)
    config = text_format.Parse(open(path).read(), projector.ProjectorConfig())
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "h of test at step 3"
    assert list(embedding.sprite.single_image_dim) == [8, 8]
    # TensorBoard resolves the relative paths against the config's directory.
    np.testing.assert_allclose(np.loadtxt(tmp_path / embedding.tensor_path, delimiter="\t"),
                               features, rtol=1e-5)
    assert open(tmp_path / embedding.metadata_path).read().splitlines() == [
        "label\tclass", "0\tcat", "1\tdog", "1\tdog", "2\tbird", "7\t7"]
    assert _read_png(str(tmp_path / embedding.sprite.image_path)).shape == (24, 24, 3)
    assert not [name for name in os.listdir(files) if ".tmp-" in name]

    # Another split's embeddings are kept, the newest first; the same split's are replaced.
    for split, step in (("validation", 3), ("test", 4)):
        visualise.write_projector(str(tmp_path), str(tmp_path / f"eval_{split}"), features,
                                  [0] * 5, _constant_images([0.5] * 5),
                                  tensor_name=f"h of {split} at step {step}")
    config = text_format.Parse(open(path).read(), projector.ProjectorConfig())
    assert [e.tensor_name for e in config.embeddings] == ["h of test at step 4",
                                                          "h of validation at step 3"]


def test_evaluation_writes_the_projector_and_the_neighbour_picture(tmp_path, image_folder):
    # Evaluated on its own training split: every query's nearest neighbour is itself.
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=image_folder(tmp_path / "images", per_class=5, size=8,
                                                 classes=("a", "b", "c")),
                            image_size=8, eval_split="train"),
        encoder=cfg.EncoderConfig(resnet_depth=18, cifar_stem=True),
        train=cfg.TrainConfig(model_dir=str(tmp_path / "run"), train_batch_size=2),
        eval=cfg.EvalConfig(eval_batch_size=4, eval_protocols="knn", projector_examples=6,
                            neighbour_queries=4))
    trainer = pretrain.Pretrainer(config, tf.distribute.get_strategy(),
                                  Schedule(total_steps=1, warmup_steps=0, steps_per_epoch=1),
                                  num_classes=3)
    path = tf.train.Checkpoint(**trainer.checkpoint_items()).save(str(tmp_path / "run" / "ckpt"))
    results = evaluate.evaluate_checkpoint(config, path)

    directory = results_lib.eval_dir(config)
    assert results["projector_config"] == os.path.join(config.train.model_dir,
                                                       visualise.PROJECTOR_CONFIG_FILENAME)
    embeddings = np.loadtxt(os.path.join(directory, visualise.EMBEDDINGS_FILENAME),
                            delimiter="\t")
    h, labels = evaluate.extract(lambda x: trainer.encoder(x, training=False),
                                 evaluate.eval_batches(config, "train"))
    sample = [0, 3, 6, 8, 11, 14]  # 6 of 15, evenly spread
    np.testing.assert_allclose(embeddings, h[sample], rtol=1e-5, atol=1e-6)
    metadata = open(os.path.join(directory, visualise.METADATA_FILENAME)).read().splitlines()
    assert metadata[1:] == [f"{labels[i]}\t{'abc'[labels[i]]}" for i in sample]

    assert results["nearest_neighbours"] == os.path.join(config.train.model_dir,
                                                         visualise.NEIGHBOURS_FILENAME)
    pixels = _read_png(results["nearest_neighbours"])
    assert pixels.shape == (4 * CELL, (1 + visualise.NEIGHBOURS) * CELL, 3)
    images, _ = evaluate.extract(lambda x: x, evaluate.eval_batches(config, "train"))
    queries = visualise.pick_queries(labels, 4)  # one per class, then the next image
    np.testing.assert_array_equal(queries, [0, 1, 5, 10])
    for row, query in enumerate(queries):
        cells = [pixels[row * CELL:(row + 1) * CELL, c * CELL:(c + 1) * CELL] for c in (0, 1)]
        expected = visualise._framed(images[query][None], visualise.QUERY)[0]
        np.testing.assert_array_equal(cells[0], expected)
        # The first neighbour is the query itself, framed as the same class.
        np.testing.assert_array_equal(cells[1][FRAME:-FRAME, FRAME:-FRAME],
                                      expected[FRAME:-FRAME, FRAME:-FRAME])
        assert tuple(cells[1][0, 0]) == visualise.SAME

    events = event_accumulator.EventAccumulator(directory, size_guidance={"images": 0})
    events.Reload()
    assert "eval/nearest_neighbours" in events.Tags()["tensors"] + events.Tags()["images"]


@pytest.mark.parametrize("name,value", [("projector_examples", -1),
                                        ("projector_examples", 10001),
                                        ("neighbour_queries", 65)])
def test_bad_visualisation_settings(name, value):
    with pytest.raises(cfg.ConfigError, match=f"{name} must be in"):
        cfg.validate(cfg.RunConfig(eval=cfg.EvalConfig(**{name: value})))
