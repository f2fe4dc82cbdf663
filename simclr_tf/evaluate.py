"""Evaluation: accuracy of a checkpoint on the eval split, `results.json`, and the kNN monitor.

What a checkpoint reports depends on the run that wrote it:

* a pretraining checkpoint (frozen f), with `eval_protocols` from
  - `probe`: the linear probe trained during pretraining on stop_gradient(h);
  - `knn`: weighted cosine kNN (k=200, tau=0.1) of eval h against training-set h (`knn`);
  - `linear`: the fast linear evaluation: h of the training split extracted once with the
    evaluation preprocessing, a multinomial logistic regression fitted on it (L2 strength picked
    on a held-out 10%), applied to the eval split's h.
  The paper's full protocol (a linear classifier trained on frozen f with crop + flip) is
  `--train_mode=finetune --fine_tune_after_block=4`, whose checkpoints are evaluated below.
* a fine-tuning or distillation checkpoint: its classifier's top-1 / top-5.

Evaluation images are `eval_image_size` pixels a side (default: the training `image_size`).

A pretraining checkpoint can be judged against baselines measured the same way, on the same
images (`eval_baselines`): raw pixels, and f at random initialisation. Its evaluation also writes
what TensorBoard's embedding projector reads and the nearest-neighbour picture (`visualise`).

Every eval example counts exactly once (the padded rows of `data.eval_dataset` are dropped by
their mask). Results go to TensorBoard (`<model_dir>/eval_<split>/`) and to
`<model_dir>/results.json` (the latest evaluated checkpoint; `eval_<split>/results-<step>.json`
keeps each one).
"""

import dataclasses
import functools
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import corrupt
from simclr_tf import data as data_lib
from simclr_tf import finetune
from simclr_tf import knn as knn_lib
from simclr_tf import label_maps
from simclr_tf import models
from simclr_tf import visualise
from simclr_tf.classifier import build_classifier
from simclr_tf.schedules import make_schedule

RESULTS_FILENAME = "results.json"
# Wide enough that every line finds its optimum inside it: raw pixels at 48 px (6,912 standardised
# features, 5,000 images) need 0.1 (83.1% test top-1 on Fashion-MNIST against 81.2% at 0.01,
# the old grid's top), a trained f 1e-5 to 1e-3.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------------------------
# Features and accuracies.

def eval_crop(image_size):
    """Whether the evaluation preprocessing takes the 87.5% centre crop: for runs on images larger
    than 32 px (`image_size`: the run's training size, as the original code keys it, so f trained on
    small images and evaluated larger, `eval_image_size`, sees whole images)."""
    return image_size > 32


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
        data_dir=config.data.data_dir, crop=eval_crop(config.data.image_size),
        corruption=corrupt.corruption_fn(config.data.eval_corrupt, "eval_corrupt"))
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
    """Runs `fn` (images -> [B, ...]) over a masked dataset.

    Returns:
      (outputs [N, ...], labels [N]) as numpy, padded rows dropped; at most `max_examples` rows
      (0 = all).
    """
    step = tf.function(fn, reduce_retracing=True)
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


def topk_accuracy(scores, labels, k):
    """Fraction of rows whose label is among the k highest scores (ties: lower class id first)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def accuracies(scores, labels, prefix=""):
    return {f"{prefix}top1": topk_accuracy(scores, labels, 1),
            f"{prefix}top5": topk_accuracy(scores, labels, 5)}


# --------------------------------------------------------------------------------------------
# Fast linear evaluation: multinomial logistic regression on extracted features.

class LogisticRegression:
    """Multinomial logistic regression on standardised features, fitted by mini-batch Adam.

    The objective is convex: mean cross-entropy + l2 / 2 * ||W||^2. Adam on random mini-batches
    with a cosine-decayed step size, from zero weights, for `epochs` passes over the data (at
    least `min_steps` steps), gets close to its optimum at a small fraction of the cost of
    full-batch steps (each of which reads every feature).
    """

    def __init__(self, num_classes, l2=1e-4, epochs=100, batch_size=1024, learning_rate=0.01,
                 min_steps=300, seed=0):
        self.num_classes = num_classes
        self.l2 = l2
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.min_steps = min_steps
        self.seed = seed
        self.mean = self.std = self.weights = self.bias = None

    def fit(self, features, labels):
        x = np.asarray(features, np.float32)
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-6
        n = len(x)
        batch = min(self.batch_size, n)
        steps = max(self.epochs * -(-n // batch), self.min_steps)
        w, b = _fit_softmax(
            tf.constant((x - self.mean) / self.std), tf.constant(np.asarray(labels, np.int32)),
            self.num_classes, tf.constant(self.l2, tf.float32), tf.constant(steps),
            tf.constant(batch), tf.constant(self.learning_rate, tf.float32),
            tf.constant([self.seed, 0], tf.int64))
        self.weights, self.bias = w.numpy(), b.numpy()
        return self

    def scores(self, features):
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return x @ self.weights + self.bias


@tf.function(reduce_retracing=True)
def _fit_softmax(x, y, num_classes, l2, steps, batch, learning_rate, seed):
    """Adam on mean cross-entropy + l2 / 2 * ||W||^2 over random mini-batches; returns (W, b)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = tf.shape(x)[0]

    def adam(param, grad, m, v, lr, t):
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * tf.square(grad)
        update = lr * (m / (1 - beta1 ** t)) / (tf.sqrt(v / (1 - beta2 ** t)) + eps)
        return param - update, m, v

    def body(t, w, b, mw, vw, mb, vb):
        if batch < n:
            rows = tf.random.stateless_uniform(
                [batch], tf.random.experimental.stateless_fold_in(seed, t), 0, n, tf.int32)
            xb, yb = tf.gather(x, rows), tf.gather(y, rows)
        else:
            xb, yb = x, y
        with tf.GradientTape() as tape:
            tape.watch([w, b])
            logits = tf.matmul(xb, w) + b
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
            loss += 0.5 * l2 * tf.reduce_sum(tf.square(w))
        grad_w, grad_b = tape.gradient(loss, [w, b])
        step = tf.cast(t, tf.float32)
        progress = (step - 1.0) / tf.cast(steps, tf.float32)
        lr = learning_rate * 0.5 * (1.0 + tf.cos(np.pi * progress))
        w, mw, vw = adam(w, grad_w, mw, vw, lr, step)
        b, mb, vb = adam(b, grad_b, mb, vb, lr, step)
        return t + 1, w, b, mw, vw, mb, vb

    w = tf.zeros([tf.shape(x)[1], num_classes])
    b = tf.zeros([num_classes])
    state = (tf.constant(1), w, b, tf.zeros_like(w), tf.zeros_like(w), tf.zeros_like(b),
             tf.zeros_like(b))
    _, w, b, *_ = tf.while_loop(lambda t, *_: t <= steps, body, state)
    return w, b


def linear_eval_fast(train_features, train_labels, eval_features, eval_labels, num_classes,
                     l2_grid=L2_GRID, holdout=0.1, seed=0, epochs=100):
    """Fits logistic regression on training features and scores the eval features.

    The L2 strength is the grid value with the best accuracy on a seeded `holdout` fraction of
    the training features (fitted on the rest); the final fit uses all training features.
    That held-out accuracy is returned too: compare settings on it, not on the eval split.

    Returns:
      {"linear_top1", "linear_top5", "linear_l2", "linear_train_top1"}, and
      "linear_heldout_top1" when `l2_grid` has more than one value.
    """
    n = len(train_labels)
    l2 = l2_grid[0]
    if len(l2_grid) > 1:
        order = np.random.default_rng(seed).permutation(n)
        cut = max(1, int(round(n * (1 - holdout))))
        fit_idx, val_idx = order[:cut], order[cut:]
        best = -1.0
        for value in l2_grid:
            model = LogisticRegression(num_classes, value, epochs, seed=seed).fit(
                train_features[fit_idx], train_labels[fit_idx])
            acc = topk_accuracy(model.scores(train_features[val_idx]), train_labels[val_idx], 1)
            if acc > best:
                best, l2 = acc, value
    model = LogisticRegression(num_classes, l2, epochs, seed=seed).fit(train_features,
                                                                       train_labels)
    results = accuracies(model.scores(eval_features), eval_labels, "linear_")
    results["linear_l2"] = l2
    if len(l2_grid) > 1:
        results["linear_heldout_top1"] = best
    results["linear_train_top1"] = topk_accuracy(model.scores(train_features), train_labels, 1)
    return results


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
        results.update(accuracies(scores, extracted.eval_y, "probe_"))
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
    eval_h, eval_y = extract(features, eval_batches(config, config.data.eval_split))
    results = {"num_examples": int(len(eval_y))}
    extracted = Features(eval_h, eval_y)
    if "knn" in protocols or "linear" in protocols:
        train_h, train_y = extract(features, eval_batches(config, config.data.train_split),
                                   max_examples=ev.knn_bank_size)
        l2_grid = L2_GRID
        if reduce is not None:
            eval_h, train_h, l2_divisor = reduce(eval_h, train_h)
            l2_grid = tuple(value / l2_divisor for value in L2_GRID)
        extracted.bank_h, extracted.bank_y = train_h, train_y
        if "knn" in protocols:
            scores = knn_lib.knn_predict_scores(eval_h, train_h, train_y, num_classes, ev.knn_k,
                                                ev.knn_temperature)
            results.update(accuracies(scores, eval_y, "knn_"))
        if "linear" in protocols:
            results.update(linear_eval_fast(train_h, train_y, eval_h, eval_y, num_classes,
                                            l2_grid=l2_grid, seed=config.train.seed))
    return results, extracted


# --------------------------------------------------------------------------------------------
# Baselines: what f is judged against, measured the same way.

def raw_pixels(images):
    """The evaluation images themselves, flattened: the features of the raw-pixel baseline."""
    return tf.reshape(images, [tf.shape(images)[0], -1])


def distinct_channels(*flat_images, channels=3):
    """`raw_pixels` features with one channel instead of three when every image is gray (the
    loader tiles gray images to RGB), and the L2 divisor that keeps the linear evaluation the same.

    The same information in a third of the features, so the logistic regression fits 3x faster.
    Cosine similarities (kNN) do not change. A weight v on one standardised pixel does what three
    equal weights v/3 on its three copies do, whose L2 penalty is l2 * v^2 / 3: so l2 on the copies
    is l2 / 3 on the one channel. Colour images (any channel differs anywhere) are kept whole.

    Returns:
      (*features, l2_divisor): the arrays, reduced or as given, and 3 or 1.
    """
    gray = all(np.array_equal(x[:, c::channels], x[:, 0::channels])
               for x in flat_images for c in range(1, channels))
    if not gray:
        return (*flat_images, 1)
    return (*(x[:, 0::channels] for x in flat_images), channels)


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
        reduce = None
        if name == "raw_pixels":
            features, reduce = raw_pixels, distinct_channels
        else:
            encoder = random_encoder(config)
            features = lambda images, encoder=encoder: encoder(images, training=False)  # noqa
        found, _ = evaluate_features(features, config, num_classes, reduce=reduce)
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
    return {"num_examples": int(len(labels)), **accuracies(logits, labels)}


def on_eval_dataset(config):
    """`config` reading `eval.eval_dataset` (and its splits) where evaluation reads the
    pretraining dataset, when one is set; the domain study evaluates f there."""
    ev = config.eval
    if not ev.eval_dataset:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(
        config.data, dataset=ev.eval_dataset, train_split=ev.eval_dataset_train_split,
        eval_split=ev.eval_dataset_split))


def evaluate_checkpoint(config, path):
    """Evaluates one checkpoint of the run `config` describes; returns the results dict."""
    pretraining_dataset = config.data.dataset
    if config.train.train_mode == "pretrain":
        config = on_eval_dataset(config)
    info = data_lib.dataset_info(config.data.dataset, config.data.eval_split,
                                 config.data.data_dir)
    if not info.num_classes:
        raise ValueError(f"eval_split {config.data.eval_split!r} of {config.data.dataset} has no "
                         "labels to evaluate with")
    mode = config.train.train_mode
    results = {"step": checkpoints.step_of(path), "checkpoint": path, "train_mode": mode,
               "eval_split": config.data.eval_split, **data_study_settings(config)}
    num_classes, class_names = evaluated_classes(config, info)
    if mode == "pretrain":
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
    directory = eval_dir(config)
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


def eval_dir(config):
    """`<model_dir>/eval_<split>` (a sliced split such as test[:10%] as test__10__), or
    `eval_<eval_dataset>_<its split>` when f is evaluated on another dataset."""
    name = on_eval_dataset(config).data.eval_split
    if config.eval.eval_dataset:
        name = f"{config.eval.eval_dataset}_{name}"
    return os.path.join(config.train.model_dir, f"eval_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}")


def write_results(config, results, summary_prefix="eval"):
    """TensorBoard scalars in eval_<split>/, results.json (latest) and results-<step>.json."""
    model_dir = config.train.model_dir
    directory = eval_dir(config)
    tf.io.gfile.makedirs(directory)
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default(step=results["step"]):
        for key, value in results.items():
            if isinstance(value, float):
                tf.summary.scalar(f"{summary_prefix}/{key}", value)
    writer.flush()
    text = json.dumps(results, indent=2, sort_keys=True)
    for path in (os.path.join(directory, f"results-{results['step']}.json"),
                 os.path.join(model_dir, RESULTS_FILENAME)):
        checkpoints.write_atomically(path, text + "\n")
    return os.path.join(model_dir, RESULTS_FILENAME)


def _summary_line(results):
    keys = [k for k in sorted(results) if k.endswith(("top1", "top5"))]
    return "  ".join(f"{k} {results[k]:.4f}" for k in keys)


def total_steps(config):
    """The final step of the run `config` describes (where watching its checkpoints stops)."""
    if config.train.train_mode == "finetune":  # epochs over the labelled examples
        return finetune.schedule_for(config, finetune.labelled_subset(config)).total_steps
    # Pretraining and distillation count epochs over the split, or its --train_examples.
    num_examples = config.data.train_examples or data_lib.dataset_info(
        config.data.dataset, config.data.train_split, config.data.data_dir).num_examples
    return make_schedule(config.train, config.optimizer, num_examples).total_steps


def run_evaluation(config, checkpoint=None):
    """Evaluates `checkpoint`, or every new checkpoint of model_dir until the run's last step.

    Watching ends at the checkpoint of the final step, or after `eval.eval_timeout` seconds
    (0 = no limit) without a new checkpoint. Returns the last results.
    """
    model_dir = config.train.model_dir
    if checkpoint is not None:
        path = checkpoints.resolve(model_dir, checkpoint)
        return _evaluate_and_write(config, path)
    final = total_steps(config)
    results = None
    timeout = config.eval.eval_timeout or None
    for path in tf.train.checkpoints_iterator(model_dir, min_interval_secs=10, timeout=timeout):
        try:
            results = _evaluate_and_write(config, path)
        except tf.errors.NotFoundError:
            # The trainer's CheckpointManager deleted it (keep_checkpoint_max) meanwhile.
            logging.warning("Checkpoint %s was deleted before it was evaluated", path)
            continue
        if results["step"] >= final:
            break
    if results is None:
        raise ValueError(f"no checkpoint appeared in {model_dir} within eval_timeout="
                         f"{config.eval.eval_timeout}s")
    return results


def _evaluate_and_write(config, path):
    t0 = time.time()
    results = evaluate_checkpoint(config, path)
    results["eval_seconds"] = round(time.time() - t0, 1)
    written = write_results(config, results)
    logging.info("Evaluated %s (step %d) on %s: %s -> %s", path, results["step"],
                 config.data.eval_split, _summary_line(results), written)
    return results


# --------------------------------------------------------------------------------------------
# The kNN monitor during pretraining.

class KnnMonitor:
    """kNN accuracy of the current f every `eval.eval_every` steps, as a training-loop hook.

    Call it as `monitor(trainer, step)` after each compiled loop (`pretrain.run_pretraining`'s
    `on_loop_end`); it runs when a multiple of `eval_every` was passed since the last run (exactly
    at the multiple when `steps_per_loop` divides `eval_every`). f runs in inference mode, so the
    training state is untouched. Writes `monitor/knn_top1|top5` to `<model_dir>/eval_<split>/`.
    """

    def __init__(self, config, num_classes):
        config = on_eval_dataset(config)
        if config.eval.eval_dataset:
            num_classes = data_lib.dataset_info(config.data.dataset, config.data.eval_split,
                                                config.data.data_dir).num_classes
        label_map = label_map_for(config)
        num_classes = label_map.num_classes if label_map else num_classes
        self.config = config
        self.num_classes = num_classes
        self.every = config.eval.eval_every
        self.last = None
        self.history = []  # [(step, results)]
        self._writer = None

    def due(self, step):
        if not self.every:
            return False
        # Before the first run, `last` is 0: a resumed run is evaluated at its first loop end.
        return step // self.every > (self.last or 0) // self.every

    def __call__(self, trainer, step):
        if not self.due(step):
            return None
        self.last = step
        t0 = time.time()
        results = evaluate_encoder(trainer.encoder, self.config, self.num_classes, ("knn",))
        results["seconds"] = round(time.time() - t0, 1)
        self.history.append((step, results))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(eval_dir(self.config))
        with self._writer.as_default(step=step):
            for key in ("knn_top1", "knn_top5"):
                tf.summary.scalar(f"monitor/{key}", results[key])
        self._writer.flush()
        logging.info("step %d  kNN monitor on %s: top1 %.4f  top5 %.4f  (%.0f s)", step,
                     self.config.data.eval_split, results["knn_top1"], results["knn_top5"],
                     results["seconds"])
        return results


def config_for_evaluation(requested):
    """The saved config of the run in `requested.train.model_dir`, with the evaluation settings
    (eval section, eval split, data_dir) of `requested`: the model is rebuilt as it was trained."""
    model_dir = requested.train.model_dir
    saved = config_lib.load(model_dir)
    return dataclasses.replace(
        saved, eval=requested.eval,
        data=dataclasses.replace(saved.data, eval_split=requested.data.eval_split,
                                 data_dir=requested.data.data_dir or saved.data.data_dir,
                                 eval_corrupt=requested.data.eval_corrupt),
        train=dataclasses.replace(saved.train, model_dir=model_dir))
