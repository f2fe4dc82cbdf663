"""Input pipelines: datasets → batches of two augmented views (+ label), and eval batches.

Owns reading images (tensorflow-datasets builders, image folders, Debian's Fashion-MNIST prepared
offline), splitting the reading between input pipelines, shuffling, batching with static shapes and
the stateless seeds of the augmentations. How views are made lives in `views` and `augment`.

Dataset names:
  * a tensorflow-datasets name (`cifar10`, `fashion_mnist`, `imagenet2012:5.1.0`): read from
    `data_dir` (None = tfds's default, `~/tensorflow_datasets`). It must already be prepared there
    (`tfds build NAME --data_dir=DIR` on a machine with internet); nothing is downloaded. The
    exception is `fashion_mnist`, prepared from Debian's `dataset-fashion-mnist` files when missing.
  * `folder:/path/to/images` for your own JPEG/PNG/GIF/BMP images. Sub-folders are classes
    (sorted names → label ids 0, 1, ...; images inside them are found recursively); a flat folder
    of images is unlabelled (label -1). If every sub-folder is named `train`, `validation` or
    `test`, those are the splits and `split` picks one; otherwise the whole folder is every split.
    Files that cannot be decoded (not JPEG/PNG/GIF/BMP by content, truncated, or over 100
    megapixels) are skipped when the folder is listed, with one warning that counts them and names
    them (`image_files`); `DatasetInfo.num_examples` counts the files kept. A file that passes
    those checks but still fails to decode is dropped by `Dataset.ignore_errors` (TF's warning).
  * a union `a+b` of any of these (Cole et al.'s pooled domains): the same split of each, every
    image once per epoch, interleaved at random in proportion to the parts' sizes (so a larger
    part is seen more often, not oversampled). Class ids follow one another (b's first class
    comes after a's last) and class names become `a:name`; with an unlabelled part (a flat
    folder) the whole union is unlabelled. Read in order, the parts follow one another, which is
    the order `--train_examples` and label indices count in. A folder path that exists with a '+'
    in it stays one dataset.

Images stay uint8 through shuffling and batching; `views` turns them into float32 views. Grayscale
images become 3 channels (tiled) and RGBA images drop alpha.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import threading
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import augment, image_files, views as views_lib
from simclr_tf.errors import first_line

FOLDER_PREFIX = "folder:"
UNION = "+"
FOLDER_SPLITS = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

FASHION_MNIST = "fashion_mnist"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The files tfds's fashion_mnist builder asks for, as Debian ships them (gzipped IDX).
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# Keys of the dicts the pipelines yield.
VIEW_A = "view_a"
VIEW_B = "view_b"
IMAGE = "image"
LABEL = "label"
MASK = "mask"
SEED = "seed"

UNLABELLED = -1

_AUTOTUNE = tf.data.AUTOTUNE
_prepare_lock = threading.Lock()


class DatasetError(ValueError):
    """A dataset cannot be read; the message says what to install or which flag to set."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline needs to know about a split.

    Attributes:
      name: the dataset name as given.
      num_examples: examples in the split over all input pipelines (image files for folders).
      num_classes: number of label ids, 0 if unlabelled.
      image_shape: (H, W, 3) of the images `load_images` yields, None if their sizes vary.
      class_names: the name of each label id (sub-folder names, tfds label names); () if none.
    """
    name: str
    num_examples: int
    num_classes: int
    image_shape: tuple | None
    class_names: tuple = ()


# ---------------------------------------------------------------------------------------------
# Public API


def union_parts(dataset: str) -> list[str]:
    """The datasets a union `a+b` names, or [dataset] for a single one.

    A `folder:` path that exists as it is written stays whole, even with a '+' in it.
    """
    if UNION not in dataset or (dataset.startswith(FOLDER_PREFIX)
                                and tf.io.gfile.isdir(_folder_root(dataset))):
        return [dataset]
    parts = [part.strip() for part in dataset.split(UNION)]
    if not all(parts):
        raise DatasetError(f"dataset={dataset!r} has an empty name in its union: write the "
                           "datasets joined by '+', e.g. cifar10+folder:/data/mine")
    return parts


def dataset_info(dataset: str, split: str, data_dir: str | None = None) -> DatasetInfo:
    """Size, classes and image shape of `split` (prepares Fashion-MNIST offline if needed)."""
    parts = union_parts(dataset)
    if len(parts) > 1:
        return _union_info(dataset, [dataset_info(part, split, data_dir) for part in parts])
    if dataset.startswith(FOLDER_PREFIX):
        return _folder_info(dataset, _list_folder(dataset, split))
    builder = _prepared_builder(dataset, data_dir)
    return _tfds_info(dataset, builder, split)


def load_images(dataset: str, split: str, data_dir: str | None = None,
                input_context: tf.distribute.InputContext | None = None,
                shuffle_files: bool = False, seed: int | None = None, *,
                examples: np.ndarray | None = None, corruption=None):
    """Reads this input pipeline's share of a split as decoded images.

    Args:
      dataset: a tensorflow-datasets name or `folder:/path` (see the module docstring).
      split: split name (tfds slicing such as `train[:10%]` works for tfds datasets).
      data_dir: tensorflow-datasets directory; None = tfds's default.
      input_context: the `tf.distribute.InputContext` of this pipeline; None = read everything.
      shuffle_files: shuffle the order of files (tfds shards; every image for folders), per epoch.
      seed: seed of that shuffle (None = not reproducible).
      examples: read only these indices into the split's reading order (`example_subset`); the
        split is then read in order, unshuffled, and the chosen examples shared between the
        pipelines. `DatasetInfo.num_examples` counts them.
      corruption: a function uint8 image -> uint8 image applied to every image read
        (`corrupt.corruption_fn`), or None.

    Returns:
      (dataset of (image uint8 [H, W, 3], label int32, -1 if unlabelled), DatasetInfo).
    """
    if examples is not None:
        images, info = _load_images(dataset, split, data_dir, None, False, None)
        member = np.zeros([info.num_examples], bool)
        member[np.asarray(examples, np.int64)] = True
        member = tf.constant(member)
        images = images.enumerate().filter(lambda i, _: tf.gather(member, i)).map(
            lambda _, example: example)
        if input_context and input_context.num_input_pipelines > 1:
            images = images.shard(input_context.num_input_pipelines,
                                  input_context.input_pipeline_id)
        info = dataclasses.replace(info, num_examples=len(examples))
    else:
        images, info = _load_images(dataset, split, data_dir, input_context, shuffle_files, seed)
    if corruption is not None:  # after the subset: only the images read are corrupted
        images = images.map(lambda image, label: (corruption(image), label),
                            num_parallel_calls=_AUTOTUNE, deterministic=True)
    return images, info


def example_subset(num_examples: int, count: int, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of `count` of `num_examples` examples: the first `count` of a seeded
    permutation, so a smaller subset of the same seed lies inside a larger one. None for
    count 0 (all)."""
    if not count:
        return None
    if count > num_examples:
        raise DatasetError(f"train_examples={count} is more than the {num_examples} examples of "
                           "the split: use at most that, or 0 for all")
    return np.sort(np.random.RandomState(seed).permutation(num_examples)[:count])


def training_subset(dataset: str, split: str, data_dir: str | None, count: int,
                    seed: int = 0) -> np.ndarray | None:
    """`example_subset` of a split (`--train_examples`, `--train_examples_seed`)."""
    if not count:
        return None
    return example_subset(dataset_info(dataset, split, data_dir).num_examples, count, seed)


def _load_images(dataset, split, data_dir, input_context, shuffle_files, seed):
    parts = union_parts(dataset)
    if len(parts) > 1:
        return _load_union(dataset, parts, split, data_dir, input_context, shuffle_files, seed)
    if dataset.startswith(FOLDER_PREFIX):
        listing = _list_folder(dataset, split)
        images = _folder_images(listing, input_context, shuffle_files, seed)
        return images, _folder_info(dataset, listing)
    builder = _prepared_builder(dataset, data_dir)
    info = _tfds_info(dataset, builder, split)
    return _tfds_images(dataset, builder, split, input_context, shuffle_files, seed), info


def _union_info(dataset: str, infos: list[DatasetInfo]) -> DatasetInfo:
    shapes = {info.image_shape for info in infos}
    labelled = _all_labelled(infos)
    return DatasetInfo(
        name=dataset, num_examples=sum(info.num_examples for info in infos),
        num_classes=sum(info.num_classes for info in infos) if labelled else 0,
        image_shape=shapes.pop() if len(shapes) == 1 else None,
        class_names=tuple(f"{info.name}:{name}" for info in infos for name in info.class_names)
        if labelled else ())


def _all_labelled(infos: list[DatasetInfo]) -> bool:
    """A union is labelled only if every part is: a class count that leaves some images at -1
    would hand the probe, fine-tuning and the linear evaluation labels outside their classes."""
    return all(info.num_classes for info in infos)


def _load_union(dataset, parts, split, data_dir, input_context, shuffle_files, seed):
    """Every part's images, labels offset past the earlier parts' classes (all -1 if a part is
    unlabelled).

    Read in order (`shuffle_files=False`) the parts follow one another, so an index into the
    union is an index into that order; shuffled they are interleaved at random in proportion to
    their sizes, so that every epoch reads each image once.
    """
    loaded = [_load_images(part, split, data_dir, input_context, shuffle_files, seed)
              for part in parts]
    info = _union_info(dataset, [part_info for _, part_info in loaded])
    datasets, offset = [], 0
    for images, part_info in loaded:
        datasets.append(images.map(lambda image, label, shift=offset: (
            image, label + shift if info.num_classes else tf.constant(UNLABELLED, tf.int32))))
        offset += part_info.num_classes
    if not shuffle_files:
        union = datasets[0]
        for images in datasets[1:]:
            union = union.concatenate(images)
        return union, info
    weights = [part.num_examples / info.num_examples for _, part in loaded]
    return tf.data.Dataset.sample_from_datasets(datasets, weights, seed=seed), info


def pretrain_dataset(dataset: str, split: str, batch_size: int, image_size: int, *,
                     data_dir: str | None = None,
                     input_context: tf.distribute.InputContext | None = None,
                     color_jitter_strength: float = 1.0, use_blur: bool = True,
                     seed: int | None = 0, shuffle_buffer: int = 10000,
                     cache: bool = False, augmentations: str | None = None,
                     asymmetric: bool = False, examples: np.ndarray | None = None,
                     corruption=None, augment_on_device: bool = False,
                     augment_input_size: int | None = None) -> tf.data.Dataset:
    """Endless, shuffled batches of two augmented views per image, for one input pipeline.

    The views of a batch come from a stateless seed derived from (`seed`, input pipeline id, batch
    number), and for images of varying sizes their crops from one derived from the image's number,
    so the same arguments give the same stream. Fixed-size datasets are augmented a batch
    at a time, with the crop, flip and colour distortion compiled by XLA, and large views a few
    images at a time with the batch's draws (`views.view` made on the host); images of varying sizes
    (folders) are cropped one at a time, without XLA but for their boxes' draws, and the rest of
    their views is made a batch at a time as for fixed sizes (`_views_of_varying_sizes`). For
    folders the file order is already fully shuffled every epoch, so a small `shuffle_buffer`
    suffices (the buffer holds decoded images).

    With `augment_on_device` the pipeline stops before the views: it yields the uint8 batch and its
    seed, and the training step makes the views (`views_of_batch`), the same views as this
    pipeline makes from the same batch. Images of varying size are first resized (whole, as uint8)
    to `augment_input_size` so that they batch; their views then differ from the host's, which
    crops each image at its own size.

    Args:
      batch_size: examples per batch of THIS pipeline (the per-replica batch).
      image_size: side S of the square views.
      color_jitter_strength, use_blur: the paper's recipe, passed to `views.two_views`.
      augmentations, asymmetric: the augmentation ablation, passed to `views.two_views`.
      examples, corruption: which images, and how they are corrupted, as in `load_images`.
      cache: keep the decoded uint8 images in memory after the first epoch.
      seed: seed of the shuffles and views; None draws them afresh wherever the pipeline runs
        (needed on tf.data service, whose workers would otherwise all produce the same stream).
      augment_on_device: yield {image, seed, label} instead of the views (see above).
      augment_input_size: the side images of varying size are resized to with augment_on_device.
      Others: as in `load_images`.

    Returns:
      tf.data.Dataset of {view_a, view_b: float32 [batch_size, S, S, 3] in [0, 1];
      label: int32 [batch_size]}; with augment_on_device {image: uint8 [batch_size, H, W, 3];
      seed: int64 [2]; label: int32 [batch_size]}.
    """
    _check_positive(batch_size=batch_size, image_size=image_size, shuffle_buffer=shuffle_buffer)
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    pipeline_seed = None if seed is None else seed + pipeline_id
    images, info = load_images(dataset, split, data_dir, input_context,
                               shuffle_files=True, seed=pipeline_seed, examples=examples,
                               corruption=corruption)
    _check_enough_examples(info, input_context)
    if augment_on_device and info.image_shape is None:
        # Resized before the cache and the shuffle buffer, which then hold the small images.
        _check_positive(augment_input_size=augment_input_size or 0)
        images = images.map(
            lambda image, label: (_resize_uint8(image, augment_input_size), label),
            num_parallel_calls=_AUTOTUNE, deterministic=True)
    if cache:
        images = images.cache()
    images = images.shuffle(shuffle_buffer, seed=pipeline_seed, reshuffle_each_iteration=True)
    images = images.repeat()

    base_seed = tf.constant([seed or 0, pipeline_id], tf.int64)
    view_settings = dict(image_size=image_size, color_jitter_strength=color_jitter_strength,
                         use_blur=use_blur, augmentations=augmentations, asymmetric=asymmetric)

    def views(step, image, label, view_shape):
        step_seed = tf.random.experimental.stateless_fold_in(base_seed, step)
        batch = views_of_batch({IMAGE: image, SEED: step_seed, LABEL: label}, made_in="host",
                               **view_settings)
        return {VIEW_A: tf.ensure_shape(batch[VIEW_A], view_shape),
                VIEW_B: tf.ensure_shape(batch[VIEW_B], view_shape),
                LABEL: tf.ensure_shape(label, view_shape[:1])}

    if augment_on_device:
        shape = info.image_shape or (augment_input_size, augment_input_size, 3)

        def unaugmented_batch(step, example):
            image, label = example
            return {IMAGE: tf.ensure_shape(image, [batch_size, *shape]),
                    SEED: tf.random.experimental.stateless_fold_in(base_seed, step),
                    LABEL: tf.ensure_shape(label, [batch_size])}

        batches = _with_counter(images.batch(batch_size, drop_remainder=True), seed).map(
            unaugmented_batch)
    elif info.image_shape is None:
        batches = _views_of_varying_sizes(images, batch_size, base_seed, seed, view_settings)
    else:
        def whole_batch(step, example):
            return views(step, *example, [batch_size, image_size, image_size, 3])

        batches = _with_counter(images.batch(batch_size, drop_remainder=True), seed).map(
            whole_batch, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return batches.prefetch(_AUTOTUNE)


def _views_of_varying_sizes(images: tf.data.Dataset, batch_size: int, base_seed: tf.Tensor,
                            seed: int | None, view_settings: dict) -> tf.data.Dataset:
    """Batches of views of images whose sizes vary (folders, most tfds image datasets).

    No batch can be formed before the crop, the only stage that depends on the image's size:
    each image's two crops are made one image at a time, without XLA (it would compile again for
    every size) but for their boxes' draws, then batched, and the rest of the views (flip, colour,
    blur) is made a batch at a time with XLA, in chunks, as for fixed-size images
    (bench/augment_throughput.py measures both ways at 224 px from varying sizes). The first
    stage (the crop, or the resize to S of a recipe that does not start with one) draws from a
    seed per image, the rest from a seed per batch.
    """
    image_size = view_settings["image_size"]
    recipe = {key: view_settings[key] for key in ("use_blur", "augmentations", "asymmetric")}
    crop_seed, finish_seed = augment.split_seed(base_seed, 2)

    def crops_of_one_image(step, example):
        image, label = example
        sized_a, sized_b = views_lib.sized_pair(
            image[tf.newaxis], tf.random.experimental.stateless_fold_in(crop_seed, step),
            image_size, made_in="host", **recipe)
        return sized_a[0], sized_b[0], label

    def finish_batch(step, crops):
        sized_a, sized_b, label = crops
        view_a, view_b = views_lib.finish_pair(
            sized_a, sized_b, tf.random.experimental.stateless_fold_in(finish_seed, step),
            made_in="host", **view_settings)
        view_shape = [batch_size, image_size, image_size, 3]
        return {VIEW_A: tf.ensure_shape(view_a, view_shape),
                VIEW_B: tf.ensure_shape(view_b, view_shape),
                LABEL: tf.ensure_shape(label, [batch_size])}

    crops = _with_counter(images, seed).map(crops_of_one_image, num_parallel_calls=_AUTOTUNE,
                                            deterministic=True)
    crops = crops.batch(batch_size, drop_remainder=True)
    return _with_counter(crops, seed).map(finish_batch, num_parallel_calls=_AUTOTUNE,
                                          deterministic=True)


def views_of_batch(batch: dict, image_size: int, made_in: str = "host",
                   **view_settings) -> dict:
    """{image, seed, label} -> {view_a, view_b, label}: the two views of a batch, made from its seed.

    The host pipeline calls it in its `map`; with augment_on_device the training step calls it on
    the batches `pretrain_dataset` yields. `made_in` says where the views are made, and so how
    they are computed (`views.view`; the default is the host pipeline's); `view_settings` are
    `views.two_views`'s other keyword arguments (color_jitter_strength, use_blur, augmentations,
    asymmetric).
    """
    view_a, view_b = views_lib.two_views(batch[IMAGE], batch[SEED], image_size, made_in=made_in,
                                         **view_settings)
    return {VIEW_A: view_a, VIEW_B: view_b, LABEL: batch[LABEL]}


def _resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    """A whole image resized (bilinear) to [size, size, 3], rounded back to uint8."""
    resized = augment.resize(image[tf.newaxis], size)[0]
    return tf.cast(tf.round(resized * 255.0), tf.uint8)


def eval_dataset(dataset: str, split: str, batch_size: int, image_size: int, *,
                 data_dir: str | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 crop: bool = True, corruption=None,
                 resize_method: str = "bilinear") -> tf.data.Dataset:
    """One pass over this pipeline's share of a split, in full batches with a mask.

    The last partial batch is padded with zero images, label 0 (a valid class id, so a loss on a
    padded row stays finite) and mask 0: shapes stay static and summing `mask`-weighted values
    counts every example exactly once.

    Args:
      crop: centre-crop 87.5% before resizing (pass False for images of 32 px or less).
      resize_method: bilinear or bicubic (`augment.preprocess_for_eval`).
      corruption: as in `load_images`.
      Others: as in `pretrain_dataset`.

    Returns:
      tf.data.Dataset of {image: float32 [batch_size, S, S, 3]; label: int32 [batch_size];
      mask: float32 [batch_size]}.
    """
    _check_positive(batch_size=batch_size, image_size=image_size)
    images, info = load_images(dataset, split, data_dir, input_context, shuffle_files=False,
                               corruption=corruption)

    def preprocess(image):
        return augment.preprocess_for_eval(image, image_size, crop=crop,
                                           resize_method=resize_method)

    if info.image_shape is None:
        batches = images.map(lambda image, label: (preprocess(image[tf.newaxis])[0], label),
                             num_parallel_calls=_AUTOTUNE, deterministic=True)
        batches = batches.batch(batch_size)
    else:
        batches = images.batch(batch_size).map(lambda image, label: (preprocess(image), label),
                                               num_parallel_calls=_AUTOTUNE, deterministic=True)
    batches = batches.map(lambda image, label: _pad_batch(image, label, batch_size, image_size))
    return batches.prefetch(_AUTOTUNE)


def prepare_fashion_mnist_offline(data_dir: str | None,
                                  source_dir: str = DEBIAN_FASHION_MNIST_DIR) -> None:
    """Prepares tfds's `fashion_mnist` in `data_dir` from Debian's IDX files, without network.

    Runs the real tfds builder, handing it the decompressed Debian files instead of downloads
    (their .gz were recompressed, so tfds's registered checksums do not match them). Does nothing
    if the dataset is already prepared. tfds writes into a temporary folder and renames it, so a
    reader never sees a half-written dataset; the decompressed files are cached in
    `<data_dir>/downloads/debian_fashion_mnist/`.
    """
    with _prepare_lock:
        builder = tfds.builder(FASHION_MNIST, data_dir=data_dir)
        if builder.is_prepared():
            return
        root = os.fspath(builder.data_dir_root)
        sources = [os.path.join(source_dir, name) for name in FASHION_MNIST_FILES]
        if not all(os.path.isfile(path) for path in sources):
            raise DatasetError(
                f"Fashion-MNIST is not prepared in {root} and Debian's dataset-fashion-mnist "
                f"package is not installed (no IDX files in {source_dir}): run 'apt-get install "
                f"dataset-fashion-mnist' or point --data_dir at a prepared tensorflow-datasets "
                f"directory")
        cache_dir = os.path.join(root, "downloads", "debian_fashion_mnist")
        local_files = {os.path.basename(path): _gunzip_once(path, cache_dir) for path in sources}
        try:
            _download_and_prepare_from_local_files(builder, local_files)
        except Exception as err:  # pylint: disable=broad-except
            # Another process may have prepared it meanwhile (then tfds's final rename fails here).
            if tfds.builder(FASHION_MNIST, data_dir=data_dir).is_prepared():
                return
            raise DatasetError(f"preparing Fashion-MNIST in {root} from {source_dir} failed: "
                               f"{first_line(err)}") from err


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets


def _prepared_builder(name: str, data_dir: str | None):
    """The tfds builder of `name`, prepared in data_dir (Fashion-MNIST offline if needed)."""
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared() and _base_name(name) == FASHION_MNIST:
        prepare_fashion_mnist_offline(data_dir)
        builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        root = os.fspath(builder.data_dir_root)
        raise DatasetError(
            f"tensorflow-datasets dataset {name!r} is not prepared in {root}: run 'tfds build "
            f"{name} --data_dir=DIR' on a machine with internet and pass that directory as "
            f"--data_dir")
    return builder


def _tfds_builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise DatasetError(
            f"unknown dataset {name!r}: give a tensorflow-datasets name (e.g. 'cifar10', "
            f"'fashion_mnist') or '{FOLDER_PREFIX}/path/to/images' for a folder of your own images"
        ) from None
    except Exception as err:  # pylint: disable=broad-except  (bad version or config, ...)
        raise DatasetError(f"cannot open tensorflow-datasets dataset {name!r}: "
                           f"{first_line(err)}") from err


def _base_name(name: str) -> str:
    """'fashion_mnist/config:3.0.1' → 'fashion_mnist'."""
    return name.split(":")[0].split("/")[0]


def _tfds_keys(name: str, builder) -> tuple[str, str | None]:
    """(image feature, label feature or None): the supervised keys, else the feature 'image'."""
    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and all(isinstance(key, str) for key in keys[:2]):
        image_key, label_key = keys[0], keys[1]
    else:
        image_key, label_key = IMAGE, None
    if image_key not in features.keys() or not isinstance(features[image_key], tfds.features.Image):
        raise DatasetError(f"tensorflow-datasets dataset {name!r} has no image feature to train on")
    if label_key is not None and not isinstance(features[label_key], tfds.features.ClassLabel):
        label_key = None
    return image_key, label_key


def _tfds_split(name: str, builder, split: str):
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError, AssertionError):
        raise DatasetError(f"dataset {name!r} has no split {split!r}: choose one of "
                           f"{sorted(builder.info.splits)}") from None


def _tfds_info(name: str, builder, split: str) -> DatasetInfo:
    image_key, label_key = _tfds_keys(name, builder)
    features = builder.info.features
    height, width = features[image_key].shape[:2]
    return DatasetInfo(
        name=name,
        num_examples=int(_tfds_split(name, builder, split).num_examples),
        num_classes=int(features[label_key].num_classes) if label_key else 0,
        image_shape=(height, width, 3) if height and width else None,
        class_names=tuple(features[label_key].names) if label_key else ())


def _tfds_images(name, builder, split, input_context, shuffle_files, seed) -> tf.data.Dataset:
    image_key, label_key = _tfds_keys(name, builder)
    my_split, file_context = _tfds_read_plan(builder.info.splits[split], split, input_context)
    read_config = tfds.ReadConfig(input_context=file_context, shuffle_seed=seed)
    if builder.info.splits[my_split].num_examples:
        examples = builder.as_dataset(split=my_split, shuffle_files=shuffle_files,
                                      read_config=read_config)
    else:  # more input pipelines than examples: tfds refuses an empty sub-split
        examples = builder.as_dataset(split=split).take(0)

    def image_and_label(example):
        label = (tf.cast(example[label_key], tf.int32) if label_key
                 else tf.constant(UNLABELLED, tf.int32))
        return _to_rgb(example[image_key]), label

    return examples.map(image_and_label, num_parallel_calls=_AUTOTUNE, deterministic=True)


def _tfds_read_plan(split_info, split: str, input_context):
    """(split to read, input context for tfds.ReadConfig) for this input pipeline.

    tfds shards by file when every pipeline gets at least one file; with fewer files than
    pipelines (small datasets are a single file) it refuses, so use its even sub-splits instead.
    """
    if input_context is None or input_context.num_input_pipelines == 1:
        return split, None
    if len(split_info.file_instructions) >= input_context.num_input_pipelines:
        return split, input_context
    sub_splits = tfds.even_splits(split, n=input_context.num_input_pipelines)
    return sub_splits[input_context.input_pipeline_id], None


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C] with C in {1, 3, 4} → uint8 [H, W, 3]."""
    channels = image.shape[-1]
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels == 4:
        return image[..., :3]
    return image


# ---------------------------------------------------------------------------------------------
# The offline Fashion-MNIST download manager


class _LocalFilesDownloadManager(tfds.download.DownloadManager):
    """Serves already-extracted local files instead of downloading: URL basename → local file.

    A request for any other URL is an error, so a change in the builder shows up as a clear failure
    rather than as a network download.
    """

    def __init__(self, local_files: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self._local_files = dict(local_files)

    def _local_path(self, url):
        name = os.path.basename(str(getattr(url, "url", url)))
        if name not in self._local_files:
            raise DatasetError(f"offline preparation has no local file for {url}")
        return tfds.core.Path(self._local_files[name])

    def download_and_extract(self, url_or_urls):
        return tf.nest.map_structure(self._local_path, url_or_urls)

    def download(self, url_or_urls):
        return self.download_and_extract(url_or_urls)


def _download_and_prepare_from_local_files(builder, local_files: dict[str, str]) -> None:
    """Runs builder.download_and_prepare with a download manager that serves `local_files`.

    tfds has no public way to hand a builder files whose checksums differ from the registered
    ones (its manual_dir path still validates them). The builder makes its download manager in
    the private `_make_download_manager`, so this replaces that method on this one instance; all
    of tfds's own preparation (split generation, atomic write, dataset_info.json) runs unchanged.
    """
    if not callable(getattr(builder, "_make_download_manager", None)):
        raise DatasetError("this tensorflow-datasets version has no DatasetBuilder."
                           "_make_download_manager to hand the Debian files to: install "
                           "tensorflow-datasets 4.9.x or prepare fashion_mnist in --data_dir")
    manager = _LocalFilesDownloadManager(
        local_files, download_dir=os.path.join(os.fspath(builder.data_dir_root), "downloads"),
        dataset_name=builder.name)
    # pylint: disable-next=protected-access
    builder._make_download_manager = lambda *args, **kwargs: manager
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _gunzip_once(gz_path: str, out_dir: str) -> str:
    """Decompresses gz_path into out_dir (atomically, once) and returns the decompressed file."""
    out_path = os.path.join(out_dir, os.path.basename(gz_path)[:-len(".gz")])
    if tf.io.gfile.exists(out_path):
        return out_path
    tf.io.gfile.makedirs(out_dir)
    tmp_path = f"{out_path}.tmp-{uuid.uuid4().hex}"
    try:
        with gzip.open(gz_path, "rb") as src, tf.io.gfile.GFile(tmp_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        tf.io.gfile.rename(tmp_path, out_path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp_path):
            tf.io.gfile.remove(tmp_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# Image folders


@dataclasses.dataclass(frozen=True)
class _FolderListing:
    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]


def _folder_root(dataset: str) -> str:
    return os.path.expanduser(dataset[len(FOLDER_PREFIX):]).rstrip("/") or "/"


def _list_folder(dataset: str, split: str) -> _FolderListing:
    """Finds the image files of a `folder:` dataset and their labels (sorted, so reproducible)."""
    root = _folder_root(dataset)
    if not tf.io.gfile.isdir(root):
        raise DatasetError(f"image folder {root!r} of dataset {dataset!r} does not exist")
    root = _folder_split_dir(root, split)
    subdirs, top_images = _entries(root)
    if subdirs and top_images:
        raise DatasetError(f"image folder {root!r} has both images and sub-folders: put every "
                           f"image in a class sub-folder (labelled) or none (unlabelled)")
    if subdirs:
        per_class = [_images_below(_join(root, name)) for name in subdirs]
        paths = tuple(path for files in per_class for path in files)
        labels = tuple(label for label, files in enumerate(per_class) for _ in files)
    else:
        paths = tuple(_join(root, name) for name in top_images)
        labels = (UNLABELLED,) * len(paths)
    paths, labels, skipped = image_files.keep_decodable(root, paths, labels)  # warns, naming them
    if not paths and skipped:
        raise DatasetError(f"image folder {root!r} has no images that can be decoded: all "
                           f"{skipped} image files were skipped (see the warning naming them)")
    if not paths:
        raise DatasetError(f"image folder {root!r} has no images (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)} files)")
    return _FolderListing(root, paths, labels, tuple(subdirs))


def _folder_split_dir(root: str, split: str) -> str:
    """root/split if root holds only split sub-folders (train/validation/test), else root."""
    subdirs, _ = _entries(root)
    if not subdirs or any(name not in FOLDER_SPLITS for name in subdirs):
        return root
    if split not in subdirs:
        raise DatasetError(f"image folder {root!r} has split sub-folders {subdirs} but no "
                           f"{split!r}: pass one of them as the split")
    return _join(root, split)


def _entries(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, image file names) of folder, sorted; hidden entries are skipped.

    Names with an image extension are taken to be files without asking the file system, so a
    folder of a million images costs one listing, not a million stats (slow on GCS).
    """
    subdirs, images = [], []
    for name in tf.io.gfile.listdir(folder):
        name = name.rstrip("/")  # gfile lists directories on GCS with a trailing '/'
        if not name or name.startswith("."):
            continue
        if name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(name)
        elif tf.io.gfile.isdir(_join(folder, name)):
            subdirs.append(name)
    return sorted(subdirs), sorted(images)


def _images_below(folder: str) -> list[str]:
    """Paths of every image under folder, recursively, in sorted order."""
    subdirs, images = _entries(folder)
    paths = [_join(folder, name) for name in images]
    for name in subdirs:
        paths += _images_below(_join(folder, name))
    return sorted(paths)


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def _folder_info(dataset: str, listing: _FolderListing) -> DatasetInfo:
    return DatasetInfo(name=dataset, num_examples=len(listing.paths),
                       num_classes=len(listing.class_names), image_shape=None,
                       class_names=listing.class_names)


def _folder_images(listing: _FolderListing, input_context, shuffle_files: bool,
                   seed: int | None) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices(
        (list(listing.paths), np.asarray(listing.labels, np.int32)))
    if input_context is not None and input_context.num_input_pipelines > 1:
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_files:
        files = files.shuffle(len(listing.paths), seed=seed, reshuffle_each_iteration=True)
    images = files.map(_read_image, num_parallel_calls=_AUTOTUNE, deterministic=True)
    # Listing already skipped (and named) the files that cannot be decoded; this drops the rare
    # file corrupt beyond what image_files checks, with TF's warning.
    return images.ignore_errors(log_warning=True)


def _read_image(path: tf.Tensor, label: tf.Tensor):
    """Decodes JPEG/PNG/GIF (first frame)/BMP into uint8 [H, W, 3] (gray → RGB, alpha dropped)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


# ---------------------------------------------------------------------------------------------
# Small helpers


def _with_counter(dataset: tf.data.Dataset, seed: int | None) -> tf.data.Dataset:
    """(step, element): the input of the stateless seeds.

    step counts elements from 0; with seed None it is a fresh random number instead, drawn where
    the pipeline runs.
    """
    steps = tf.data.Dataset.counter() if seed is not None else tf.data.Dataset.random()
    return tf.data.Dataset.zip(steps, dataset)


def _pad_batch(image, label, batch_size: int, image_size: int) -> dict:
    count = tf.shape(label)[0]
    padding = batch_size - count
    image = tf.pad(image, [[0, padding], [0, 0], [0, 0], [0, 0]])
    return {
        IMAGE: tf.ensure_shape(image, [batch_size, image_size, image_size, 3]),
        LABEL: tf.ensure_shape(tf.pad(label, [[0, padding]]), [batch_size]),
        MASK: tf.ensure_shape(tf.pad(tf.ones([count], tf.float32), [[0, padding]]), [batch_size]),
    }


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_enough_examples(info: DatasetInfo, input_context) -> None:
    """An input pipeline with no examples would end the endless pretraining stream at once."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    if info.num_examples < pipelines:
        raise DatasetError(f"dataset {info.name!r} has {info.num_examples} examples, fewer than "
                           f"the {pipelines} input pipelines reading it")


def folder_listing(dataset: str, split: str) -> _FolderListing:
    """The decodable files of a `folder:` dataset's split, in reading order (see `load_images`)."""
    return _list_folder(dataset, split)
