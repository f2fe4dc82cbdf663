"""Weighted cosine k-nearest-neighbour classification of features (the kNN monitor).

As in Wu et al. 2018 (instance discrimination) and most self-supervised codebases: features are
l2-normalised, each query takes its k most cosine-similar training features, and neighbour i votes
for its class with weight exp(s_i / temperature). The class scores rank the predictions, so top-1
and top-5 come from the same votes. No training, so it tracks the representation itself.
"""

import numpy as np
import tensorflow as tf

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def nearest(queries, bank, k):
    """The k most cosine-similar rows of `bank` [N, D] for each of `queries` [Q, D], best first
    (ties: lower index first): (cosine similarities [Q, k'], indices [Q, k']), k' = min(k, N)."""
    queries = tf.math.l2_normalize(tf.cast(queries, tf.float32), axis=-1)
    bank = tf.math.l2_normalize(tf.cast(bank, tf.float32), axis=-1)
    similarities = tf.matmul(queries, bank, transpose_b=True)  # [Q, N]
    return tf.math.top_k(similarities, k=min(k, int(bank.shape[0])))


def knn_scores(queries, bank, bank_labels, num_classes, k=DEFAULT_K,
               temperature=DEFAULT_TEMPERATURE):
    """Class scores of `queries` voted by their k nearest (cosine) neighbours in `bank`.

    Args:
      queries: float [Q, D] features.
      bank: float [N, D] training features.
      bank_labels: int [N] class ids of the bank.
      num_classes: C.
      k: neighbours per query (clipped to N).
      temperature: tau of the vote weights exp(cosine / tau).

    Returns:
      float32 [Q, C]: sum over the neighbours of class c of exp(cosine / tau).
    """
    if k < 1:
        raise ValueError(f"knn_k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"knn_temperature must be positive, got {temperature}")
    top_sim, top_index = nearest(queries, bank, k)
    neighbour_labels = tf.gather(tf.cast(bank_labels, tf.int32), top_index)  # [Q, k]
    votes = tf.one_hot(neighbour_labels, num_classes) * tf.exp(top_sim / temperature)[..., None]
    return tf.reduce_sum(votes, axis=1)


def knn_predict_scores(queries, bank, bank_labels, num_classes, k=DEFAULT_K,
                       temperature=DEFAULT_TEMPERATURE, chunk=1024):
    """`knn_scores` for many queries, `chunk` at a time (memory [chunk, N]); numpy [Q, C]."""
    bank = tf.convert_to_tensor(bank, tf.float32)
    bank_labels = tf.convert_to_tensor(bank_labels, tf.int32)
    scores_fn = tf.function(lambda q: knn_scores(q, bank, bank_labels, num_classes, k,
                                                 temperature), reduce_retracing=True)
    queries = np.asarray(queries, np.float32)
    out = [scores_fn(tf.constant(queries[i:i + chunk])).numpy()
           for i in range(0, len(queries), chunk)]
    return np.concatenate(out) if out else np.zeros([0, num_classes], np.float32)
