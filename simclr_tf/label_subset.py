"""Which training examples keep their labels: class-balanced label fractions and id lists.

SimCLRv2's semi-supervised setting fine-tunes on 1% or 10% of the labels. An example is named by
its index in the split's reading order (`data.load_images(..., shuffle_files=False)`), which is
fixed for a prepared tfds dataset and for an image folder.

* `balanced_subset(labels, fraction, seed)`: per class, `round(fraction * class count)` examples
  (at least one), drawn with a seeded permutation of that class, so the same labels, fraction and
  seed always give the same subset, and a 1% subset is inside the 10% subset of the same seed.
* `read_id_file(path, ...)`: a file of example ids, one a line, like the ImageNet 1% / 10% lists
  of the original SimCLR: either integer indices into the split or file names (matched against
  the tfds `file_name` feature, e.g. `n01440764_10026.JPEG` for imagenet2012; for a `folder:`
  dataset, the path below the split's folder such as `cat/0001.jpg`, or the bare file name when no
  two files share it). `#` starts a comment.
"""

import collections
import os


import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import data as data_lib


class LabelSubsetError(ValueError):
    """The subset cannot be formed; the message is one line naming the flag."""


def balanced_subset(labels, fraction, seed=0):
    """Sorted indices of a class-balanced subset holding `fraction` of every class.

    Args:
      labels: int array [N] of class ids (negative ids, i.e. unlabelled examples, are never
        chosen).
      fraction: in (0, 1]; 1 keeps every labelled example.
      seed: the subset is a function of (labels, fraction, seed).

    Returns:
      int64 array of indices into `labels`, ascending.
    """
    if not 0.0 < fraction <= 1.0:
        raise LabelSubsetError(f"train_label_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    chosen = []
    for cls in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == cls)
        # One permutation per class, seeded by (seed, class): the first k of it is the subset, so
        # subsets of a seed are nested across fractions and independent of the other classes.
        order = np.random.default_rng([seed, int(cls)]).permutation(len(members))
        count = max(1, int(round(fraction * len(members))))
        chosen.append(members[order[:count]])
    if not chosen:
        raise LabelSubsetError("the training split has no labelled examples to fine-tune on")
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_id_file(path, names=None):
    """Indices named by a file of example ids (integer indices or file names, one a line).

    Args:
      path: the file (any tf.io.gfile path).
      names: the split's example names in reading order; needed only for name ids.

    Returns:
      int64 array of indices, ascending and unique.
    """
    if not tf.io.gfile.exists(path):
        raise LabelSubsetError(f"train_label_ids file {path} not found")
    with tf.io.gfile.GFile(path) as f:
        ids = [line.split("#")[0].strip() for line in f]
    ids = [i for i in ids if i]
    if not ids:
        raise LabelSubsetError(f"train_label_ids file {path} lists no example ids")
    if all(i.isdigit() for i in ids):
        return np.unique(np.asarray(ids, np.int64))
    if names is None:
        raise LabelSubsetError(
            f"train_label_ids file {path} names examples by file name, but this dataset has no "
            "file_name feature: list integer indices into the split instead")
    position = _positions_by_name(names)
    missing = [i for i in ids if i not in position]
    if missing:
        raise LabelSubsetError(f"train_label_ids file {path}: {len(missing)} ids are not in the "
                               f"split, e.g. {missing[0]!r}")
    return np.unique(np.asarray([position[i] for i in ids], np.int64))


def _positions_by_name(names):
    """{name: index}, also by bare file name where that name is unique in the split."""
    position = {name: i for i, name in enumerate(names)}
    base_names = [os.path.basename(name) for name in names]
    counts = collections.Counter(base_names)
    for i, base in enumerate(base_names):
        if counts[base] == 1:
            position.setdefault(base, i)
    return position


def split_labels(dataset, split, data_dir=None):
    """int32 [N] labels of a split in reading order (tfds images are not decoded)."""
    parts = data_lib.union_parts(dataset)
    if len(parts) > 1:
        return _union_labels(dataset, parts, split, data_dir)
    if dataset.startswith(data_lib.FOLDER_PREFIX):
        images, _ = data_lib.load_images(dataset, split, data_dir)
        return np.fromiter((int(label) for _, label in images.as_numpy_iterator()), np.int32)
    builder, image_key, label_key = _tfds_parts(dataset, split, data_dir)
    if label_key is None:
        raise LabelSubsetError(f"dataset {dataset!r} has no labels to fine-tune on")
    labels = _without_images(builder, split, image_key).map(lambda e: e[label_key])
    return np.concatenate(list(labels.batch(8192).as_numpy_iterator())).astype(np.int32)


def _union_labels(dataset, parts, split, data_dir):
    """The parts' labels one after the other, each offset past the earlier parts' classes."""
    # Each part's info once: for a folder it lists the files and reads every header.
    infos = [data_lib.dataset_info(part, split, data_dir) for part in parts]
    if not all(info.num_classes for info in infos):  # as data's unions: unlabelled as a whole
        raise LabelSubsetError(f"dataset {dataset!r} has an unlabelled part, so no labels to "
                               "fine-tune on")
    offsets = np.cumsum([0] + [info.num_classes for info in infos[:-1]])
    return np.concatenate([split_labels(part, split, data_dir) + offset
                           for part, offset in zip(parts, offsets)]).astype(np.int32)


def split_file_names(dataset, split, data_dir=None):
    """Every example's file name in reading order (tfds `file_name`; for folders, the path below
    the split's folder), or None if the dataset has none (a union has none: use indices)."""
    if len(data_lib.union_parts(dataset)) > 1:
        return None
    if dataset.startswith(data_lib.FOLDER_PREFIX):
        listing = data_lib.folder_listing(dataset, split)
        return [os.path.relpath(path, listing.root).replace(os.sep, "/") for path in listing.paths]
    builder, image_key, _ = _tfds_parts(dataset, split, data_dir)
    if "file_name" not in builder.info.features.keys():
        return None
    names = _without_images(builder, split, image_key).map(lambda e: e["file_name"])
    return [n.decode() for b in names.batch(8192).as_numpy_iterator() for n in b]


def subset_indices(dataset, split, data_dir=None, fraction=1.0, id_file=None, seed=0,
                   within=None):
    """The indices of the labelled subset, or None for "every example" (fraction 1, no file).

    within: indices of the examples the subset is taken from (`--train_examples`); None = all.
    """
    if id_file:
        chosen = read_id_file(id_file, split_file_names(dataset, split, data_dir))
        return chosen if within is None else np.intersect1d(chosen, within)
    if not 0.0 < fraction <= 1.0:
        raise LabelSubsetError(f"train_label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return None if within is None else np.asarray(within)
    labels = split_labels(dataset, split, data_dir)
    if within is not None:
        outside = np.ones(len(labels), bool)
        outside[np.asarray(within, np.int64)] = False
        labels = np.where(outside, -1, labels)
    return balanced_subset(labels, fraction, seed)


def _tfds_parts(dataset, split, data_dir):
    """(builder, image feature, label feature or None) of a prepared tfds dataset."""
    data_lib.dataset_info(dataset, split, data_dir)  # prepares Fashion-MNIST offline; checks split
    builder = tfds.builder(dataset, data_dir=data_dir)
    keys = builder.info.supervised_keys
    if keys and all(isinstance(k, str) for k in keys[:2]):
        return builder, keys[0], keys[1]
    return builder, data_lib.IMAGE, None


def _without_images(builder, split, image_key):
    """The split's examples in reading order with the image left undecoded (cheap to scan)."""
    return builder.as_dataset(split=split, shuffle_files=False,
                              decoders={image_key: tfds.decode.SkipDecoding()})
