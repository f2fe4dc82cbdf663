"""Evaluation of one checkpoint: from its path to its results (a flat dict of accuracies).

What a checkpoint reports depends on the run that wrote it:

* a pretraining checkpoint (frozen f), with `eval_protocols` from
  - `probe`: the linear probe trained during pretraining on stop_gradient(h);
  - `knn`: weighted cosine kNN (k=200, tau=0.1) of eval h against training-set h (`knn`);
  - `linear`: the fast linear evaluation: h of the training split extracted once with the
    evaluation preprocessing, a multinomial logistic regression fitted on it (L2 strength picked
    on a held-out 10%), applied to the eval split's h (the solver: `linear_eval`).
  The paper's full protocol (a linear classifier trained on frozen f with crop + flip) is
  `--train_mode=finetune --fine_tune_after_block=4`, whose checkpoints are evaluated below.
* a fine-tuning or distillation checkpoint: its classifier's top-1 / top-5.

Evaluation images are `eval_image_size` pixels a side (default: the training `image_size`).

A pretraining checkpoint can be judged against baselines measured the same way, on the same
images (`eval_baselines`): raw pixels, and f at random initialisation. Its evaluation also writes
what TensorBoard's embedding projector reads and the nearest-neighbour picture (`visualise`).

Every eval example counts exactly once (the padded rows of `data.eval_dataset` are dropped by
their mask). Around it: `watch` (which checkpoints `--mode=eval` evaluates), `results` (where the
results go), `knn_monitor` (kNN during pretraining), `linear_eval` (the solver).
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import augment
from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import corrupt
from simclr_tf import data as data_lib
from simclr_tf import knn as knn_lib
from simclr_tf import label_maps
from simclr_tf import linear_eval
from simclr_tf import models
from simclr_tf import results as results_lib
from simclr_tf import tasks
from simclr_tf import visualise
from simclr_tf.classifier import build_classifier



# --------------------------------------------------------------------------------------------
# Features and accuracies.

def eval_image_size(config):
    """Side of the evaluation images: `eval.eval_image_size`, else the training `image_size`."""
    return config.eval.eval_image_size or config.data.image_size


def eval_batches(config, split, batch_size=None, image_size=None):
    """One pass over `split` with the evaluation preprocessing, in masked full batches, of
    `image_size` (default: `eval_image_size(config)`) pixels a side; over the eval split's first
    `eval.eval_steps` batches when that is set."""
    size = image_size or eval_image_size(config)
    batches = data_lib.eval_dataset(
        config.data.dataset, split, batch_size or config.eval.eval_batch_size, size,
        data_dir=config.data.data_dir, crop=augment.eval_crop(config.data.image_size),
        corruption=corrupt.corruption_fn(config.data.eval_corrupt, "eval_corrupt"),
        resize_method=config.data.eval_resize)
    if split == config.data.eval_split and config.eval.eval_steps:
        batches = batches.take(config.eval.eval_steps)
    label_map = label_map_for(config)
    if label_map is not None:
        batches = batches.map(lambda batch: {**batch, data_lib.LABEL: label_map.labels(
            batch[data_lib.LABEL])})
    return batches


def label_map_for(config):
    """The `label_maps.LabelMap` of `eval.label_map` for the run's dataset, or None."""
    if not config.eval.label_map:
        return None
    return _label_map(config.eval.label_map, config.data.dataset, config.data.eval_split,
                      config.data.data_dir)


@functools.lru_cache(maxsize=8)
def _label_map(spec, dataset, split, data_dir):
    """Read once per evaluation setting: every eval_batches call asks (a folder's listing is
    not free)."""
    info = data_lib.dataset_info(dataset, split, data_dir)
    return label_maps.load(spec, info.class_names, info.num_classes)


def evaluated_classes(config, info):
    """(number of classes, their names) evaluation scores: the label map's coarse ones if set."""
    label_map = label_map_for(config)
    if label_map is None:
        return info.num_classes, info.class_names
    return label_map.num_classes, label_map.names


def _takes_size(model, size):
    shape = getattr(model, "input_shape", None)
    return shape is None or shape[1] in (None, size)


def encoder_for_evaluation(encoder, config):
    """`encoder` itself if it takes the evaluation size; else a copy (same weights) for any size.

    A trained f has a static input side, its training `image_size`; `eval_image_size` may differ.
    """
    if _takes_size(encoder, eval_image_size(config)):
        return encoder
    copy = models.build_encoder(config.encoder, None, global_bn=False)
    copy.set_weights(encoder.get_weights())
    return copy


def classifier_for_evaluation(model, config):
    """As `encoder_for_evaluation`, for a `classifier.Classifier`."""
    if _takes_size(model.encoder, eval_image_size(config)):
        return model
    copy = build_classifier(config, model.num_classes, image_size=None)
    for name, part in model.checkpoint_items().items():
        copy.checkpoint_items()[name].set_weights(part.get_weights())
    return copy


def extract(fn, dataset, max_examples=0):
    """Runs `fn` (images -> [B, ...]) over a masked dataset, compiled: a plain function is traced
    for this call, a `tf.function` is used as it is (so its trace serves every call given it).

    Returns:
      (outputs [N, ...], labels [N]) as numpy, padded rows dropped; at most `max_examples` rows
      (0 = all).
    """
    step = (fn if isinstance(fn, tf.types.experimental.PolymorphicFunction)
            else tf.function(fn, reduce_retracing=True))
    outputs, labels, count = [], [], 0
    for batch in dataset:
        keep = batch[data_lib.MASK].numpy() > 0
        outputs.append(np.asarray(step(batch[data_lib.IMAGE]))[keep])
        labels.append(batch[data_lib.LABEL].numpy()[keep])
        count += int(keep.sum())
        if max_examples and count >= max_examples:
            break
    if not outputs:
        raise ValueError("the evaluation split has no examples")
    outputs, labels = np.concatenate(outputs), np.concatenate(labels)
    if max_examples:
        outputs, labels = outputs[:max_examples], labels[:max_examples]
    return outputs, labels


# --------------------------------------------------------------------------------------------
# Evaluating an encoder, a classifier, a checkpoint.

@dataclasses.dataclass
class Features:
    """What an evaluation extracted: features and labels of the eval split and of the bank (the
    training split's first `knn_bank_size` images; None when no protocol needed it)."""
    eval_h: np.ndarray
    eval_y: np.ndarray
    bank_h: np.ndarray | None = None
    bank_y: np.ndarray | None = None


def evaluate_encoder(encoder, config, num_classes, protocols=("knn", "linear"), probe=None,
                     return_features=False):
    """The frozen-f evaluations of `encoder` (f in inference mode) on the eval split.

    Args:
      encoder: callable(images, training=False) -> h.
      config: the run's `RunConfig` (data, eval settings).
      num_classes: classes of the dataset.
      protocols: subset of ("probe", "knn", "linear").
      probe: the `LinearProbe` for "probe" (skipped if None). It was fitted on h of views of
        the training `image_size`, so it is scored on eval images of that size whatever
        `eval_image_size` is (h's statistics change with the size).

    Returns:
      Flat dict of metrics (`knn_top1`, `linear_top5`, ...) and `num_examples`; with
      `return_features`, (that dict, the `Features` of f).
    """
    trained = encoder
    encoder = encoder_for_evaluation(trained, config)
    results, extracted = evaluate_features(
        lambda images: encoder(images, training=False), config, num_classes, protocols)
    if "probe" in protocols and probe is not None:
        probe_h = extracted.eval_h
        if eval_image_size(config) != config.data.image_size:
            probe_h, _ = extract(lambda images: trained(images, training=False),
                                 eval_batches(config, config.data.eval_split,
                                              image_size=config.data.image_size))
        scores = np.asarray(probe(tf.constant(probe_h)))
        label_map = label_map_for(config)
        if label_map is not None:  # the probe predicts the fine classes
            scores = label_map.logits(scores)
        results.update(linear_eval.accuracies(scores, extracted.eval_y, "probe_"))
    return (results, extracted) if return_features else results


def evaluate_features(features, config, num_classes, protocols=("knn", "linear"),
                      reduce=None):
    """kNN and the fast linear evaluation of `features` (images -> [B, D]) on the eval split,
    with the training split's first `knn_bank_size` images as the bank and training set.
    `reduce` (optional) maps the extracted (eval, bank) features to what both protocols see, and
    the factor the linear evaluation's L2 grid is divided by: (eval, bank, l2_divisor).

    Returns:
      (results: `num_examples` and `knn_*` / `linear_*` metrics, the extracted `Features`).
    """
    ev = config.eval
    features = tf.function(features, reduce_retracing=True)  # traced once for both splits
    eval_h, eval_y = extract(features, eval_batches(config, config.data.eval_split))
    results = {"num_examples": int(len(eval_y))}
    extracted = Features(eval_h, eval_y)
    if "knn" in protocols or "linear" in protocols:
        train_h, train_y = extract(features, eval_batches(config, config.data.train_split),
                                   max_examples=ev.knn_bank_size)
        l2_grid = linear_eval.L2_GRID
        if reduce is not None:
            eval_h, train_h, l2_divisor = reduce(eval_h, train_h)
            l2_grid = tuple(value / l2_divisor for value in linear_eval.L2_GRID)
        extracted.bank_h, extracted.bank_y = train_h, train_y
        if "knn" in protocols:
            scores = knn_lib.knn_predict_scores(eval_h, train_h, train_y, num_classes, ev.knn_k,
                                                ev.knn_temperature)
            results.update(linear_eval.accuracies(scores, eval_y, "knn_"))
        if "linear" in protocols:
            results.update(linear_eval.linear_eval_fast(
                train_h, train_y, eval_h, eval_y, num_classes, l2_grid=l2_grid,
                seed=config.train.seed))
    return results, extracted


# --------------------------------------------------------------------------------------------
# Baselines: what f is judged against, measured the same way.

def raw_pixels(images):
    """The evaluation images themselves, flattened: the features of the raw-pixel baseline."""
    return tf.reshape(images, [tf.shape(images)[0], -1])


def gray_pixels(images):
    """`raw_pixels` of the first channel only, and one more column: how far the other channels
    of each image stray from it (0 for a gray image, which the loader tiles to three equal
    channels). A gray dataset's pixels are extracted and held once instead of three times."""
    first = images[..., :1]
    colour = tf.reduce_max(tf.abs(images - first), axis=[1, 2, 3])
    return tf.concat([raw_pixels(first), colour[:, None]], axis=1)


class HasColour(Exception):
    """Some image of the evaluation has channels that differ: `gray_pixels` does not apply."""


def gray_only(eval_h, bank_h):
    """`gray_pixels` features without their colour column, and the L2 divisor that keeps the
    linear evaluation what it is on the three channels; `HasColour` if any image has colour.

    The same information in a third of the features, so the logistic regression fits 3x faster.
    Cosine similarities (kNN) do not change. A weight v on one standardised pixel does what three
    equal weights v/3 on its three copies do, whose L2 penalty is l2 * v^2 / 3: so l2 on the copies
    is l2 / 3 on the one channel.

    Returns:
      (eval features, bank features, 3).
    """
    if np.any(eval_h[:, -1]) or np.any(bank_h[:, -1]):
        raise HasColour
    return eval_h[:, :-1], bank_h[:, :-1], 3


def _first_batch_is_gray(config):
    """Whether the eval split's first batch is all gray, so that the raw-pixel baseline tries one
    channel (a colour dataset is then not extracted twice)."""
    batch = next(iter(eval_batches(config, config.data.eval_split)))
    return not np.any(gray_pixels(batch[data_lib.IMAGE])[:, -1].numpy())


def random_encoder(config, bn_batches=30, bn_batch_size=64):
    """f at random initialisation (seeded by `train.seed`), at the evaluation image size, with
    its batch-norm moving statistics estimated on `bn_batches` batches of `bn_batch_size`
    training images (30 steps of the moving averages' momentum 0.9 cover 96% of the way).

    Without that estimate, inference-mode batch norm would use its initial statistics (mean 0,
    variance 1), and the baseline would measure un-normalised activations rather than random
    weights; any training fixes them within its first steps.
    """
    keras.utils.set_random_seed(config.train.seed)
    encoder = models.build_float32_encoder(config.encoder)
    update_statistics = tf.function(lambda images: encoder(images, training=True))
    for batch in eval_batches(config, config.data.train_split, bn_batch_size).take(bn_batches):
        update_statistics(batch[data_lib.IMAGE])
    return encoder


def evaluate_baselines(config, num_classes, names):
    """kNN and linear evaluation of the baselines `names` (from config.EVAL_BASELINES), on the
    same images, bank and eval split as f; keys prefixed `<baseline>_`."""
    results = {}
    for name in names:
        logging.info("Baseline %s: kNN and linear evaluation on the same images", name)
        if name == "raw_pixels":
            features, reduce = ((gray_pixels, gray_only) if _first_batch_is_gray(config)
                                else (raw_pixels, None))
            try:
                found, _ = evaluate_features(features, config, num_classes, reduce=reduce)
            except HasColour:  # gray at first, colour further on: all three channels after all
                found, _ = evaluate_features(raw_pixels, config, num_classes)
        else:
            encoder = random_encoder(config)
            found, _ = evaluate_features(lambda images: encoder(images, training=False), config,
                                         num_classes)
        results.update({f"{name}_{k}": v for k, v in found.items() if k != "num_examples"})
    return results


def evaluate_classifier(model, config):
    """top-1 / top-5 of a `classifier.Classifier` (inference mode) on the eval split."""
    model = classifier_for_evaluation(model, config)
    logits, labels = extract(lambda images: model(images, training=False),
                             eval_batches(config, config.data.eval_split))
    label_map = label_map_for(config)
    if label_map is not None:  # the classifier predicts the fine classes
        logits = label_map.logits(logits)
    return {"num_examples": int(len(labels)), **linear_eval.accuracies(logits, labels)}


def evaluate_checkpoint(config, path):
    """Evaluates one checkpoint of the run `config` describes; returns the results dict."""
    pretraining_dataset = config.data.dataset
    frozen_f = tasks.task_for(config).evaluates_frozen_f
    if frozen_f:
        config = config_lib.on_eval_dataset(config)
    info = data_lib.dataset_info(config.data.dataset, config.data.eval_split,
                                 config.data.data_dir)
    if not info.num_classes:
        raise ValueError(f"eval_split {config.data.eval_split!r} of {config.data.dataset} has no "
                         "labels to evaluate with")
    mode = config.train.train_mode
    results = {"step": checkpoints.step_of(path), "checkpoint": path, "train_mode": mode,
               "eval_split": config.data.eval_split, **data_study_settings(config)}
    num_classes, class_names = evaluated_classes(config, info)
    if frozen_f:
        protocols = config_lib.parse_protocols(config.eval.eval_protocols)
        if config.eval.eval_dataset and "probe" in protocols:
            logging.warning("The linear probe predicts %s's classes: evaluating f on %s with %s",
                            pretraining_dataset, config.eval.eval_dataset,
                            ",".join(p for p in protocols if p != "probe") or "nothing else")
            protocols = tuple(p for p in protocols if p != "probe")
            if not protocols:
                raise ValueError("--eval_dataset evaluates with knn and linear: the probe "
                                 "belongs to the pretraining dataset's classes")
        results["pretraining_dataset"] = pretraining_dataset
        results["eval_dataset"] = config.data.dataset
        encoder = models.build_encoder(config.encoder, config.data.image_size, global_bn=False)
        checkpoints.restore_encoder(encoder, path)
        probe = None
        probe_classes = checkpoints.classes_of(path, checkpoints.LINEAR_PROBE)
        if "probe" in protocols and probe_classes == info.num_classes:
            probe = models.build_linear_probe(info.num_classes,
                                              models.encoder_output_dim(encoder))
            checkpoints.read_parts(path, **{checkpoints.LINEAR_PROBE: probe})
        elif "probe" in protocols and probe_classes:
            if set(protocols) == {"probe"}:
                raise ValueError(f"the linear probe of {path} predicts {probe_classes} classes, "
                                 f"{config.data.dataset} has {info.num_classes}: use "
                                 "--eval_protocols=knn or linear")
            logging.warning("The linear probe of %s predicts %d classes, %s has %d: evaluating "
                            "%s only", path, probe_classes, config.data.dataset,
                            info.num_classes, ",".join(p for p in protocols if p != "probe"))
            protocols = tuple(p for p in protocols if p != "probe")
        elif "probe" in protocols:
            if set(protocols) == {"probe"}:
                raise ValueError(f"checkpoint {path} has no linear probe (it was trained with "
                                 "--lineareval_while_pretraining=false): use --eval_protocols="
                                 "knn or linear")
            logging.warning("Checkpoint %s has no linear probe: evaluating %s only", path,
                            ",".join(p for p in protocols if p != "probe"))
        logging.info("Evaluating f of %s on %s: %s", path, config.data.eval_split,
                     ",".join(protocols))
        found, extracted = evaluate_encoder(encoder, config, num_classes, protocols, probe,
                                            return_features=True)
        results.update(found)
        results.update(show_embeddings(config, extracted, class_names, results["step"]))
        results.update(evaluate_baselines(config, num_classes,
                                          config_lib.parse_baselines(config.eval.eval_baselines)))
        main = next((p for p in ("linear", "probe", "knn") if f"{p}_top1" in results), None)
        if main:
            results.update(protocol=main, top1=results[f"{main}_top1"],
                           top5=results[f"{main}_top5"])
    else:
        model = build_classifier(config, info.num_classes)
        checkpoints.read_parts(path, **model.checkpoint_items())  # not the optimiser slots
        results.update(protocol="classifier", **evaluate_classifier(model, config))
    return results


def data_study_settings(config):
    """The data-study settings a run used (`--train_examples`, `--corrupt`, `--eval_corrupt`,
    `--label_map`), for its results; the ones left at their defaults are left out."""
    data = config.data
    settings = {"train_examples": data.train_examples, "corrupt": data.corrupt,
                "eval_corrupt": data.eval_corrupt, "label_map": config.eval.label_map}
    return {name: value for name, value in settings.items() if value}


def show_embeddings(config, extracted, class_names=(), step=0):
    """The projector files for `eval.projector_examples` evaluation images and the
    nearest-neighbour picture for `eval.neighbour_queries` of them (`visualise`), from the
    `Features` an evaluation extracted. Returns {"projector_config", "nearest_neighbours"}: the
    paths written."""
    ev, written = config.eval, {}
    directory = results_lib.eval_dir(config)
    sample = visualise.sample_indices(len(extracted.eval_y), ev.projector_examples)
    queries = np.zeros([0], np.int64)
    if ev.neighbour_queries and extracted.bank_h is not None:
        queries = visualise.pick_queries(extracted.eval_y, ev.neighbour_queries)
    wanted = np.union1d(sample, queries)
    if not len(wanted):
        return written
    eval_images = visualise.images_at(eval_batches(config, config.data.eval_split), wanted)
    image_of = lambda rows: eval_images[np.searchsorted(wanted, rows)]  # noqa: E731
    if len(sample):
        split = config.data.eval_split
        written["projector_config"] = visualise.write_projector(
            config.train.model_dir, directory, extracted.eval_h[sample],
            extracted.eval_y[sample], image_of(sample), class_names,
            tensor_name=f"h of {split} at step {step}")
    if len(queries):
        neighbours = visualise.nearest_neighbours(extracted.eval_h[queries], extracted.bank_h)
        bank_rows = np.unique(neighbours)
        bank_images = visualise.images_at(eval_batches(config, config.data.train_split),
                                          bank_rows)
        neighbour_images = bank_images[np.searchsorted(bank_rows, neighbours)]
        query_labels = extracted.eval_y[queries]
        pixels = visualise.neighbour_picture(image_of(queries), query_labels, neighbour_images,
                                             extracted.bank_y[neighbours])
        written["nearest_neighbours"] = visualise.write_neighbour_picture(
            config.train.model_dir, directory, step, pixels,
            visualise.legend(query_labels, class_names))
    logging.info("Embeddings to look at in TensorBoard: %s", ", ".join(
        f"{key} {value}" for key, value in written.items()))
    return written
