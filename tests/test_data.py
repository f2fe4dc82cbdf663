"""Tests for simclr_tf.data: folders, a tiny generated tfds dataset, pipelines, Fashion-MNIST."""
import gzip
import io
import os
import struct
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import data, image_files

TINY = "simclr_tf_tiny_images"
TINY_SHARDS = 4


class SimclrTfTinyImages(tfds.core.GeneratorBasedBuilder):
    """8x8 grayscale images whose every pixel is the example index; label = index % 3."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 20), "test": self._generate_examples(100, 7)}

    def _generate_examples(self, start, count):
        for index in range(start, start + count):
            yield index, {"image": np.full((8, 8, 1), index, np.uint8), "label": index % 3}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)


def _png(array):
    return tf.io.encode_png(array).numpy()


def _jpeg(array):
    return tf.io.encode_jpeg(array, quality=100).numpy()


def _bmp(rgb):
    """A 24-bit bottom-up BMP, written by hand (TensorFlow has no BMP encoder)."""
    height, width, _ = rgb.shape
    padding = b"\0" * ((4 - width * 3 % 4) % 4)
    pixels = b"".join(rgb[y, :, ::-1].tobytes() + padding for y in reversed(range(height)))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + dib + pixels


def _rgb(height, width, value):
    return np.full((height, width, 3), value, np.uint8)


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """Classes a/b/c with JPEG, gray PNG, RGBA PNG and a nested image; plus non-image files."""
    root = tmp_path_factory.mktemp("labelled")
    _write(f"{root}/a/rgb.jpg", _jpeg(_rgb(20, 30, 200)))
    _write(f"{root}/a/gray.png", _png(np.full((16, 16, 1), 77, np.uint8)))
    rgba = np.zeros((12, 24, 4), np.uint8)
    rgba[...] = (10, 20, 30, 128)
    _write(f"{root}/b/rgba.png", _png(rgba))
    _write(f"{root}/c/nested/deep.png", _png(_rgb(9, 9, 5)))
    _write(f"{root}/c/notes.txt", b"not an image, not listed")
    _write(f"{root}/b/.hidden.png", _png(_rgb(4, 4, 1)))
    return str(root)


@pytest.fixture(scope="module")
def one_per_class_folder(tmp_path_factory):
    """Five classes with one image each (varying sizes), so a label identifies its image."""
    root = tmp_path_factory.mktemp("one_per_class")
    for index in range(5):
        _write(f"{root}/class{index}/img.png", _png(_rgb(10 + 3 * index, 14 + index, 40 * index)))
    return str(root)


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    for index in range(3):
        _write(f"{root}/img{index}.png", _png(_rgb(8 + index, 8, 10 * index)))
    return str(root)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder(TINY, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                     num_shards=TINY_SHARDS))
    return data_dir


def _images_and_labels(dataset):
    return [(image.numpy(), int(label)) for image, label in dataset]


def _context(num_pipelines, pipeline_id):
    return tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                      input_pipeline_id=pipeline_id)


def _take_batches(dataset, count):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset.take(count)]


# ---------------------------------------------------------------------------------------------
# Image folders


def test_labelled_folder_images_and_labels(labelled_folder):
    info = data.dataset_info(f"folder:{labelled_folder}", "train", None)
    assert info == data.DatasetInfo(f"folder:{labelled_folder}", 4, 3, None,
                                   ("a", "b", "c"))

    images, _ = data.load_images(f"folder:{labelled_folder}", "train")
    assert images.element_spec[0].dtype == tf.uint8
    assert images.element_spec[0].shape.as_list() == [None, None, 3]
    found = _images_and_labels(images)
    # Sorted class names → ids; files sorted within a class (gray.png before rgb.jpg).
    assert [label for _, label in found] == [0, 0, 1, 2]
    assert [image.shape for image, _ in found] == [(16, 16, 3), (20, 30, 3), (12, 24, 3), (9, 9, 3)]
    np.testing.assert_array_equal(found[0][0], 77)               # gray → 3 equal channels
    assert abs(int(found[1][0].astype(int).mean()) - 200) <= 2   # JPEG, lossy
    np.testing.assert_array_equal(found[2][0], np.broadcast_to([10, 20, 30], found[2][0].shape))
    np.testing.assert_array_equal(found[3][0], 5)


def test_flat_folder_is_unlabelled(flat_folder):
    images, info = data.load_images(f"folder:{flat_folder}", "test")
    assert (info.num_examples, info.num_classes) == (3, 0)
    found = _images_and_labels(images)
    assert [label for _, label in found] == [-1, -1, -1]
    assert [image.shape[0] for image, _ in found] == [8, 9, 10]


def test_folder_bmp_and_gif(tmp_path):
    _write(f"{tmp_path}/pic.bmp", _bmp(np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)))
    expected = [np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)]
    try:
        from PIL import Image  # optional: only to write a GIF
        buffer = io.BytesIO()
        Image.fromarray(_rgb(7, 3, 0) + np.array([255, 0, 0], np.uint8)).save(buffer, "GIF")
        _write(f"{tmp_path}/pic.gif", buffer.getvalue())
        expected.append(np.broadcast_to(np.array([255, 0, 0], np.uint8), (7, 3, 3)))
    except ImportError:
        pass
    found = _images_and_labels(data.load_images(f"folder:{tmp_path}", "train")[0])
    assert len(found) == len(expected)
    for (image, _), want in zip(found, expected):
        np.testing.assert_array_equal(image, want)


def test_corrupt_images_are_skipped(tmp_path):
    _write(f"{tmp_path}/dog/good.png", _png(_rgb(6, 6, 1)))
    _write(f"{tmp_path}/dog/broken.jpg", b"this is not a jpeg")
    _write(f"{tmp_path}/cat/truncated.png", _png(_rgb(6, 6, 2))[:20])
    _write(f"{tmp_path}/cat/good.jpg", _jpeg(_rgb(6, 6, 3)))
    images, info = data.load_images(f"folder:{tmp_path}", "train")
    assert info.num_examples == 2  # the two corrupt files are skipped (and named) at listing
    assert sorted(label for _, label in _images_and_labels(images)) == [0, 1]
    batches = list(data.eval_dataset(f"folder:{tmp_path}", "train", 4, 8, crop=False))
    assert len(batches) == 1 and batches[0]["mask"].numpy().sum() == 2


def _damaged_jpegs(height=40, width=48):
    """(intact, damaged in its image data, damaged in its Huffman tables): 50 bytes zeroed."""
    pixels = np.add.outer(np.arange(height), np.arange(width))[..., None] * [1, 2, 3] % 256
    intact = tf.io.encode_jpeg(pixels.astype(np.uint8), quality=90).numpy()
    scan = intact.index(b"\xff\xda")

    def zeroed(at):
        damaged = bytearray(intact)
        damaged[at:at + 50] = bytes(50)
        return bytes(damaged)

    return intact, zeroed((scan + len(intact)) // 2), zeroed(intact.index(b"\xff\xc4") + 10)


def test_jpeg_damaged_in_its_image_data_trains_and_one_the_decoder_refuses_is_named(tmp_path):
    """As an export's serving_bytes: TensorFlow's decoder recovers from damaged image data
    (libjpeg warns on stderr), and no check short of decoding finds it, so the file trains as it
    decodes; a JPEG whose Huffman tables the decoder refuses is skipped and named at listing
    (it used to pass the listing and be dropped by the pipeline without a name)."""
    intact, damaged_data, damaged_tables = _damaged_jpegs()
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(damaged_tables)
    _write(f"{tmp_path}/a/intact.jpg", intact)
    _write(f"{tmp_path}/a/damaged_data.jpg", damaged_data)
    _write(f"{tmp_path}/b/damaged_tables.jpg", damaged_tables)
    _write(f"{tmp_path}/b/other.jpg", intact)
    assert image_files.problem(f"{tmp_path}/b/damaged_tables.jpg") == (
        "corrupt JPEG (bad Huffman table)")
    images, info = data.load_images(f"folder:{tmp_path}", "train")
    assert info.num_examples == 3
    found = [image for image, _ in _images_and_labels(images)]
    assert len(found) == 3 and found[0].shape == (40, 48, 3)  # damaged_data.jpg, sorted first
    assert not np.array_equal(found[0], found[1])  # decoded, garbled


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(data.DatasetError, match="has no images"):
        data.load_images(f"folder:{tmp_path}", "train")
    (tmp_path / "class_without_images").mkdir()
    with pytest.raises(data.DatasetError, match="has no images"):
        data.dataset_info(f"folder:{tmp_path}", "train", None)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_images(f"folder:{tmp_path}/nope", "train")


def test_folder_mixing_images_and_class_folders(tmp_path):
    _write(f"{tmp_path}/loose.png", _png(_rgb(4, 4, 1)))
    _write(f"{tmp_path}/cls/img.png", _png(_rgb(4, 4, 1)))
    with pytest.raises(data.DatasetError, match="both images and sub-folders"):
        data.load_images(f"folder:{tmp_path}", "train")


def test_folder_split_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for index in range(count):
            _write(f"{tmp_path}/{split}/cls{index % 2}/img{index}.png", _png(_rgb(4, 4, index)))
    assert data.dataset_info(f"folder:{tmp_path}", "train", None).num_examples == 3
    assert data.dataset_info(f"folder:{tmp_path}", "test", None).num_examples == 2
    with pytest.raises(data.DatasetError, match="no 'validation'"):
        data.dataset_info(f"folder:{tmp_path}", "validation", None)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets names


def test_unknown_dataset_name():
    with pytest.raises(data.DatasetError, match="unknown dataset 'no_such_dataset_xyz'.*folder:"):
        data.dataset_info("no_such_dataset_xyz", "train", None)


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetError, match="not prepared in .*tfds build cifar10"):
        data.load_images("cifar10", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert not os.listdir(tmp_path)  # nothing downloaded or written


def test_tfds_info_and_images(tiny_tfds_dir):
    info = data.dataset_info(TINY, "train", tiny_tfds_dir)
    assert info == data.DatasetInfo(TINY, 20, 3, (8, 8, 3), ("0", "1", "2"))
    images, _ = data.load_images(TINY, "train", data_dir=tiny_tfds_dir)
    assert images.element_spec[0].shape.as_list() == [8, 8, 3]
    assert images.element_spec[1].dtype == tf.int32
    found = _images_and_labels(images)
    ids = sorted(int(image[0, 0, 0]) for image, _ in found)
    assert ids == list(range(20))
    for image, label in found:
        np.testing.assert_array_equal(image, image[0, 0, 0])  # gray tiled to 3 equal channels
        assert label == image[0, 0, 0] % 3


def test_tfds_unknown_split(tiny_tfds_dir):
    with pytest.raises(data.DatasetError, match="no split 'valid'"):
        data.dataset_info(TINY, "valid", tiny_tfds_dir)


# 2 pipelines: tfds shards the 4 files; 8 pipelines > 4 files: tfds's even sub-splits instead.
@pytest.mark.parametrize("num_pipelines", [2, 8])
def test_tfds_input_pipelines_are_disjoint(tiny_tfds_dir, num_pipelines):
    shards = []
    for pipeline_id in range(num_pipelines):
        images, _ = data.load_images(TINY, "train", data_dir=tiny_tfds_dir,
                                     input_context=_context(num_pipelines, pipeline_id))
        shards.append([int(image[0, 0, 0]) for image, _ in _images_and_labels(images)])
    every = [index for shard in shards for index in shard]
    assert sorted(every) == list(range(20))  # disjoint and complete


# ---------------------------------------------------------------------------------------------
# Pretraining pipeline


class _FakeViews:
    """Cheap stand-in for `views` in plumbing tests: view_a = the resized image, view_b = noise
    drawn from the seed, so a test sees both which images a batch holds and which seed it got.
    (The real augmentation graph takes seconds to trace per pipeline.)"""

    calls = []

    @staticmethod
    def two_views(images, seed, image_size, **kwargs):
        sized_a, sized_b = _FakeViews.sized_pair(images, seed, image_size)
        return _FakeViews.finish_pair(sized_a, sized_b, seed, image_size, **kwargs)

    @staticmethod
    def sized_pair(images, seed, image_size, **kwargs):
        del seed, kwargs
        view_a = tf.image.resize(tf.cast(images, tf.float32) / 255.0, [image_size, image_size],
                                 method="nearest")
        return view_a, tf.zeros_like(view_a)

    @staticmethod
    def finish_pair(sized_a, sized_b, seed, image_size, **kwargs):
        del sized_b, image_size
        _FakeViews.calls.append(kwargs)
        return sized_a, tf.random.stateless_uniform(tf.shape(sized_a), seed)


@pytest.fixture
def fake_augment(monkeypatch):
    _FakeViews.calls.clear()
    monkeypatch.setattr(data, "views_lib", _FakeViews)
    return _FakeViews


def _check_pretrain_batches(batches, batch_size, image_size, num_classes, count):
    spec = batches.element_spec
    assert set(spec) == {"view_a", "view_b", "label"}
    view_shape = [batch_size, image_size, image_size, 3]
    assert spec["view_a"].shape.as_list() == spec["view_b"].shape.as_list() == view_shape
    assert spec["label"].shape.as_list() == [batch_size]
    assert (spec["view_a"].dtype, spec["label"].dtype) == (tf.float32, tf.int32)
    found = _take_batches(batches, count)
    for batch in found:
        for key in ("view_a", "view_b"):
            assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
        assert not np.array_equal(batch["view_a"], batch["view_b"])
        assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
    return found


def test_pretrain_folder_with_real_augment(labelled_folder):
    """Varying sizes: each image cropped as a batch of 1, the rest of the views made a batch at a
    time; more batches than an epoch (repeats).

    Seeds and sharding are checked with the fake below: the real graph takes seconds to trace.
    """
    batches = data.pretrain_dataset(f"folder:{labelled_folder}", "train", 3, 16, seed=7,
                                    shuffle_buffer=4)
    _check_pretrain_batches(batches, 3, 16, 3, count=3)


def test_pretrain_tfds_with_real_augment(tiny_tfds_dir):
    """Fixed size: whole batches augmented at once."""
    batches = data.pretrain_dataset(TINY, "train", 4, 12, data_dir=tiny_tfds_dir, seed=3,
                                    color_jitter_strength=0.5, use_blur=False)
    _check_pretrain_batches(batches, 4, 12, 3, count=6)


def test_views_of_varying_sizes_crop_each_image_then_finish_the_batch():
    """Images of varying sizes: each image's crops come from its own seed (`sized_pair` on a batch
    of one), the rest of the views from the batch's seed (`finish_pair`, XLA stages); the
    pipeline's views equal that composition made by hand."""
    from simclr_tf import augment, views

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
              for h, w in ((40, 52), (33, 30), (48, 48), (36, 60))]
    dataset = tf.data.Dataset.from_generator(
        lambda: ((image, np.int32(i)) for i, image in enumerate(images)),
        output_signature=(tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32)))
    settings = dict(image_size=24, color_jitter_strength=1.0, use_blur=True, augmentations=None,
                    asymmetric=False)
    base_seed = tf.constant([5, 0], tf.int64)
    batches = data._views_of_varying_sizes(dataset, 2, base_seed, 5, settings)
    found = list(batches.as_numpy_iterator())
    assert len(found) == 2

    crop_seed, finish_seed = augment.split_seed(base_seed, 2)

    def seed(base, count):  # the pipeline's counters are int64, and fold_in hashes the dtype too
        return tf.random.experimental.stateless_fold_in(base, tf.constant(count, tf.int64))

    for step, batch in enumerate(found):
        sized = [views.sized_pair(images[i][None], seed(crop_seed, i), 24)
                 for i in (2 * step, 2 * step + 1)]
        sized_a, sized_b = (tf.concat([pair[k] for pair in sized], 0) for k in (0, 1))
        expected = views.finish_pair(sized_a, sized_b, seed(finish_seed, step), 24,
                                     made_in="host")
        np.testing.assert_array_equal(batch["label"], [2 * step, 2 * step + 1])
        for key, view in zip(("view_a", "view_b"), expected):
            np.testing.assert_allclose(batch[key], view.numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(found[0]["view_a"], found[0]["view_b"])


@pytest.mark.parametrize("source", ["folder", "tfds"])
def test_pretrain_seeds(source, labelled_folder, tiny_tfds_dir, fake_augment):
    dataset, data_dir = ((f"folder:{labelled_folder}", None) if source == "folder"
                         else (TINY, tiny_tfds_dir))

    def first_batches(seed):
        batches = data.pretrain_dataset(dataset, "train", 2, 8, data_dir=data_dir, seed=seed,
                                        shuffle_buffer=4, color_jitter_strength=0.3,
                                        use_blur=False)
        return _check_pretrain_batches(batches, 2, 8, 3, count=3)

    same_a, same_b, other = first_batches(7), first_batches(7), first_batches(8)
    for batch_a, batch_b in zip(same_a, same_b):
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])
    assert not np.array_equal(same_a[0]["view_b"], other[0]["view_b"])  # another seed
    assert not np.array_equal(same_a[0]["view_b"], same_a[1]["view_b"])  # a seed per batch
    assert fake_augment.calls[0] == dict(color_jitter_strength=0.3, use_blur=False,
                                         augmentations=None, asymmetric=False,
                                         made_in="host")


def test_pretrain_folder_pipelines_are_disjoint(one_per_class_folder, fake_augment):
    labels_per_pipeline = []
    for pipeline_id in range(2):
        batches = data.pretrain_dataset(f"folder:{one_per_class_folder}", "train", 1, 8,
                                        input_context=_context(2, pipeline_id), seed=0)
        labels_per_pipeline.append({int(b["label"][0]) for b in _take_batches(batches, 10)})
    assert labels_per_pipeline[0].isdisjoint(labels_per_pipeline[1])
    assert labels_per_pipeline[0] | labels_per_pipeline[1] == set(range(5))


@pytest.mark.parametrize("num_pipelines", [2, 8])
def test_pretrain_tfds_pipelines_are_disjoint(tiny_tfds_dir, fake_augment, num_pipelines):
    ids_per_pipeline, view_b = [], []
    for pipeline_id in range(num_pipelines):
        batches = data.pretrain_dataset(TINY, "train", 2, 8, data_dir=tiny_tfds_dir, seed=0,
                                        input_context=_context(num_pipelines, pipeline_id))
        found = _take_batches(batches, 12)
        pixels = [v for b in found for v in b["view_a"][:, 0, 0, 0]]
        ids_per_pipeline.append({int(round(v * 255)) for v in pixels})
        view_b.append(found[0]["view_b"])
    every = [index for ids in ids_per_pipeline for index in ids]
    assert sorted(every) == list(range(20))  # disjoint shards that cover the split
    assert not np.array_equal(view_b[0], view_b[1])  # pipelines draw different seeds


def test_pretrain_on_device_batches_give_the_host_views():
    """--augment_on_device: the same uint8 batches and seeds; views_of_batch (what the step runs)
    makes the views the host pipeline makes (Fashion-MNIST: images with content, of one size).

    Eagerly they are bit-identical; inside a tf.function grappler rewrites the graph (it fuses
    and reorders float ops), which moves them by float32 rounding (1.8e-7 here; with grappler's
    meta optimiser disabled they are bit-identical again)."""
    settings = dict(color_jitter_strength=0.5, use_blur=True)
    kwargs = dict(seed=3, shuffle_buffer=50, input_context=_context(2, 1), **settings)
    host = _take_batches(data.pretrain_dataset("fashion_mnist", "train", 4, 12, **kwargs), 3)
    on_device = data.pretrain_dataset("fashion_mnist", "train", 4, 12, augment_on_device=True,
                                      **kwargs)
    spec = on_device.element_spec
    assert {k: (v.shape.as_list(), v.dtype) for k, v in spec.items()} == {
        "image": ([4, 28, 28, 3], tf.uint8), "seed": ([2], tf.int64), "label": ([4], tf.int32)}
    step_views = tf.function(lambda batch: data.views_of_batch(batch, 12, **settings))
    for host_batch, batch in zip(host, on_device.take(3)):
        eager, in_function = data.views_of_batch(batch, 12, **settings), step_views(batch)
        for key in ("view_a", "view_b", "label"):
            np.testing.assert_array_equal(eager[key].numpy(), host_batch[key], err_msg=key)
            np.testing.assert_allclose(in_function[key].numpy(), host_batch[key], rtol=0,
                                       atol=1e-6, err_msg=key)


def test_pretrain_on_device_resizes_varying_sizes_to_one_uint8_size(labelled_folder):
    batches = data.pretrain_dataset(f"folder:{labelled_folder}", "train", 3, 16, seed=7,
                                    shuffle_buffer=4, augment_on_device=True, augment_input_size=18)
    batch = next(iter(batches))
    assert batch["image"].shape == [3, 18, 18, 3] and batch["image"].dtype == tf.uint8
    views = data.views_of_batch(batch, 16)
    assert views["view_a"].shape == [3, 16, 16, 3]
    # The single-colour images stay their colour through the uint8 resize (up to rounding).
    image = data._resize_uint8(tf.fill([5, 9, 3], tf.constant(77, tf.uint8)), 18)
    np.testing.assert_array_equal(image.numpy(), np.full([18, 18, 3], 77, np.uint8))


def test_pretrain_too_few_examples_for_pipelines(flat_folder):
    with pytest.raises(data.DatasetError, match="fewer than the 4 input pipelines"):
        data.pretrain_dataset(f"folder:{flat_folder}", "train", 1, 8, input_context=_context(4, 0))


# ---------------------------------------------------------------------------------------------
# Eval pipeline


def test_eval_folder_pads_last_batch(one_per_class_folder):
    batches = data.eval_dataset(f"folder:{one_per_class_folder}", "test", 2, 10, crop=True)
    spec = batches.element_spec
    assert spec["image"].shape.as_list() == [2, 10, 10, 3] and spec["image"].dtype == tf.float32
    assert spec["label"].shape.as_list() == [2] and spec["mask"].shape.as_list() == [2]
    found = _take_batches(batches, 100)
    assert [b["mask"].tolist() for b in found] == [[1, 1], [1, 1], [1, 0]]
    np.testing.assert_array_equal(found[-1]["image"][1], 0.0)
    labels = [int(label) for b in found for label, mask in zip(b["label"], b["mask"]) if mask]
    assert labels == [0, 1, 2, 3, 4]  # every example exactly once, in order


@pytest.mark.parametrize("num_pipelines", [1, 2, 8])
def test_eval_tfds_every_example_once(tiny_tfds_dir, num_pipelines):
    ids = []
    for pipeline_id in range(num_pipelines):
        batches = data.eval_dataset(TINY, "test", 3, 8, data_dir=tiny_tfds_dir, crop=False,
                                    input_context=_context(num_pipelines, pipeline_id))
        for batch in _take_batches(batches, 100):
            assert batch["image"].shape == (3, 8, 8, 3)
            ids += [int(round(image.mean() * 255)) for image, mask
                    in zip(batch["image"], batch["mask"]) if mask]
    assert sorted(ids) == list(range(100, 107))


# ---------------------------------------------------------------------------------------------
# Offline Fashion-MNIST


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    if not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return str(tmp_path_factory.mktemp("fashion_tfds"))


@pytest.mark.slow
def test_fashion_mnist_prepared_offline(fashion_dir):
    # load_images on an empty data_dir prepares it from the Debian files (no network).
    images, info = data.load_images("fashion_mnist", "train", data_dir=fashion_dir)
    assert info == data.DatasetInfo(
        "fashion_mnist", 60000, 10, (28, 28, 3),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"))
    builder = tfds.builder("fashion_mnist", data_dir=fashion_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    assert builder.info.features["image"].shape == (28, 28, 1)

    idx_images = _read_idx(f"{data.DEBIAN_FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz")
    idx_labels = _read_idx(f"{data.DEBIAN_FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")
    image, label = next(iter(images))
    assert image.dtype == tf.uint8 and image.shape == (28, 28, 3)
    # tfds shuffles examples when it writes them, so find the first one among the IDX images.
    matches = np.flatnonzero((idx_images == image.numpy()[..., 0]).all(axis=(1, 2)))
    assert len(matches) >= 1 and int(label) in idx_labels[matches]
    all_labels = np.concatenate([b.numpy() for _, b in images.batch(20000)])
    np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(idx_labels))

    start = time.monotonic()
    data.prepare_fashion_mnist_offline(fashion_dir)  # already prepared: a quick no-op
    assert time.monotonic() - start < 5


def test_fashion_mnist_missing_debian_files(tmp_path):
    with pytest.raises(data.DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.prepare_fashion_mnist_offline(str(tmp_path / "tfds"),
                                           source_dir=str(tmp_path / "none"))
