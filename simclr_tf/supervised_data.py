"""Labelled training batches for fine-tuning, linear evaluation and distillation.

The augmentation is the paper's for linear evaluation and fine-tuning: a random resized crop and a
horizontal flip, no colour distortion or blur (`augment=False` gives the evaluation preprocessing).
A label subset (`label_subset`) keeps only the chosen examples, or, for distillation, keeps every
example and marks the chosen ones with `labelled` = 1 (the others are unlabelled data for the
teacher to label).
"""

import numpy as np
import tensorflow as tf

from simclr_tf import augment
from simclr_tf import data as data_lib
from simclr_tf import views

IMAGE = data_lib.IMAGE
LABEL = data_lib.LABEL
LABELLED = "labelled"

_AUTOTUNE = tf.data.AUTOTUNE


def labelled_dataset(dataset, split, batch_size, image_size, *, data_dir=None,
                     input_context=None, subset=None, mark_subset=False, augment_images=True,
                     crop=True, seed=0, cache=False, shuffle_buffer=10000, examples=None,
                     corruption=None):
    """Endless shuffled batches {image, label, labelled} for one input pipeline.

    Args:
      dataset, split, data_dir: as in `data.load_images`.
      batch_size: examples per batch of this pipeline (the per-replica batch).
      image_size: side S of the images.
      input_context: this pipeline's `tf.distribute.InputContext`, or None.
      subset: indices (into the split's reading order) of the labelled examples; None = all.
      mark_subset: keep every example and set `labelled` to 1 on the subset only (distillation);
        False: read the subset only (`labelled` is then always 1).
      augment_images: random resized crop + flip; False = the evaluation preprocessing.
      crop: for the evaluation preprocessing, the 87.5% centre crop (off for images <= 32 px).
      seed: seed of the shuffle and of the augmentation.
      cache: keep the decoded images in memory (always done for a subset read alone: it is small).
      examples: indices of the examples read at all (`--train_examples`); None = the split.
      corruption: as in `data.load_images`.

    Returns:
      tf.data.Dataset of {image: float32 [B, S, S, 3] in [0, 1]; label: int32 [B];
      labelled: float32 [B]}.
    """
    if batch_size <= 0 or image_size <= 0:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, "
                         f"{image_size}")
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if subset is None:
        images, info = data_lib.load_images(dataset, split, data_dir, input_context,
                                            shuffle_files=True, seed=seed + pipeline_id,
                                            examples=examples, corruption=corruption)
        examples = images.map(lambda image, label: (image, label, tf.constant(1.0)))
    else:
        # Indices refer to the whole split in reading order: read it unsharded and unshuffled,
        # then shard the chosen examples between the pipelines.
        images, info = data_lib.load_images(dataset, split, data_dir, corruption=corruption)
        pool = None
        if examples is not None:
            pool = np.zeros([info.num_examples], bool)
            pool[np.asarray(examples, np.int64)] = True
            pool = tf.constant(pool)
        member = np.zeros([info.num_examples], np.float32)
        subset = np.asarray(subset, np.int64)
        if len(subset) and (subset.min() < 0 or subset.max() >= info.num_examples):
            raise ValueError(f"label subset index {int(subset.max())} is outside the "
                             f"{info.num_examples} examples of split {split!r}")
        member[subset] = 1.0
        member = tf.constant(member)
        indexed = images.enumerate()
        if pool is not None:
            indexed = indexed.filter(lambda i, _: tf.gather(pool, i))
        examples = indexed.map(
            lambda i, example: (example[0], example[1], tf.gather(member, i)))
        if not mark_subset:
            examples = examples.filter(lambda image, label, labelled: labelled > 0)
            cache = True
        if pipelines > 1:
            examples = examples.shard(pipelines, pipeline_id)
    if cache:
        examples = examples.cache()
    examples = examples.shuffle(shuffle_buffer, seed=seed + pipeline_id,
                                reshuffle_each_iteration=True).repeat()
    base_seed = tf.constant([seed, pipeline_id], tf.int64)

    def preprocess(step, images, labels, labelled):
        if augment_images:
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base_seed, step), 2))
            out = views.crop_and_flip(images, crop_seed, flip_seed, image_size)
        else:
            out = augment.preprocess_for_eval(images, image_size, crop=crop)
        return out, labels, labelled

    if info.image_shape is None:
        # Sizes vary: preprocess each image as a batch of one, then batch.
        def one(step, example):
            image, label, labelled = example
            out, _, _ = preprocess(step, image[tf.newaxis], label[tf.newaxis], labelled)
            return out[0], label, labelled

        batches = _counted(examples).map(one, num_parallel_calls=_AUTOTUNE, deterministic=True)
        batches = batches.batch(batch_size, drop_remainder=True)
    else:
        batches = _counted(examples.batch(batch_size, drop_remainder=True)).map(
            lambda step, example: preprocess(step, *example),
            num_parallel_calls=_AUTOTUNE, deterministic=True)
    shape = [batch_size, image_size, image_size, 3]
    return batches.map(lambda image, label, labelled: {
        IMAGE: tf.ensure_shape(image, shape), LABEL: tf.ensure_shape(label, shape[:1]),
        LABELLED: tf.ensure_shape(labelled, shape[:1])}).prefetch(_AUTOTUNE)


def _counted(dataset):
    """(element number, element): the input of the stateless augmentation seeds."""
    return tf.data.Dataset.zip(tf.data.Dataset.counter(), dataset)
