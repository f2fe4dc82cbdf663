"""Contrastive losses and the cross-replica gathering they need.

NT-Xent (SimCLR eq. 1): for 2N views of N images, the anchor's positive is the other view of the same
image and the negatives are the other 2N - 2 views of the *global* batch. Each replica compares its
own 2n anchors against the 2N gathered views, so its logits are [2n, 2N] and never the full
[2N, 2N] on one device.

Scaling convention: `nt_xent` returns the mean of the per-anchor losses over the anchors it is given
(the replica's own), i.e. the paper's L when called on one replica. Inside a replica context the
train step divides by `num_replicas_in_sync` before taking gradients, because tf.distribute sums
gradients over replicas; the mean over replicas of the returned value is the paper's L.
"""

import tensorflow as tf


def cross_replica_concat(tensor):
    """Concatenates `tensor` [n, ...] of every replica along axis 0 -> [n * replicas, ...].

    Built as "scatter my rows into zeros at my replica index, then all-reduce SUM": unlike
    `all_gather`, this works under MultiWorkerMirroredStrategy, and all_reduce's gradient is
    itself an all-reduce, so each replica receives the gradient of every replica's loss with
    respect to its own rows. Outside a replica context (or on one replica) it is the identity.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    num_replicas = context.num_replicas_in_sync
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    scattered = tf.scatter_nd(
        indices=[[replica_id]], updates=tensor[tf.newaxis],
        shape=tf.concat([[num_replicas], tf.shape(tensor)], axis=0))
    gathered = context.all_reduce(tf.distribute.ReduceOp.SUM, scattered)
    return tf.reshape(gathered, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0))


def _replica_offset(local_batch):
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0
    return tf.cast(context.replica_id_in_sync_group, tf.int32) * local_batch


def nt_xent_with_metrics(z_a, z_b, temperature=0.1, hidden_norm=True):
    """NT-Xent of two views with negatives from every replica, plus contrastive metrics.

    Args:
      z_a, z_b: [n, D] projections of the two views of this replica's n images (row i of each is
        the same image).
      temperature: tau in sim / tau.
      hidden_norm: l2-normalise z first (cosine similarity).

    Returns:
      (loss, metrics): loss is the mean over this replica's 2n anchors of
      -log softmax(positive); metrics has `contrast_acc` (fraction of anchors whose most similar
      other view is the positive) and `contrast_entropy` (mean entropy of the softmax), both over the
      a-anchors like the reference implementation.
    """
    z_a = tf.cast(z_a, tf.float32)
    z_b = tf.cast(z_b, tf.float32)
    if hidden_norm:
        z_a = tf.math.l2_normalize(z_a, axis=-1)
        z_b = tf.math.l2_normalize(z_b, axis=-1)
    n = tf.shape(z_a)[0]
    all_a = cross_replica_concat(z_a)
    all_b = cross_replica_concat(z_b)
    global_n = tf.shape(all_a)[0]
    positives = tf.range(n) + _replica_offset(n)
    self_mask = tf.one_hot(positives, global_n, on_value=True, off_value=False)

    def anchor_losses(anchors, other_view, same_view):
        logits_other = tf.matmul(anchors, other_view, transpose_b=True) / temperature
        logits_same = tf.matmul(anchors, same_view, transpose_b=True) / temperature
        logits_same = tf.where(self_mask, tf.float32.min, logits_same)
        logits = tf.concat([logits_other, logits_same], axis=1)  # [n, 2N]
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(positives, logits)
        return losses, logits

    losses_a, logits_a = anchor_losses(z_a, all_b, all_a)
    losses_b, _ = anchor_losses(z_b, all_a, all_b)
    loss = (tf.reduce_mean(losses_a) + tf.reduce_mean(losses_b)) / 2.0

    probs = tf.nn.softmax(logits_a)
    entropy = -tf.reduce_mean(tf.reduce_sum(probs * tf.math.log(probs + 1e-12), axis=1))
    accuracy = tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(logits_a, axis=1, output_type=tf.int32), positives), tf.float32))
    return loss, {"contrast_acc": accuracy, "contrast_entropy": entropy}


def nt_xent(z_a, z_b, temperature=0.1, hidden_norm=True):
    """The paper's NT-Xent loss L for the two views (see `nt_xent_with_metrics`)."""
    loss, _ = nt_xent_with_metrics(z_a, z_b, temperature, hidden_norm)
    return loss
