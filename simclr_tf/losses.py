"""Contrastive losses and the cross-replica gathering they need.

NT-Xent (SimCLR eq. 1): for 2N views of N images, the anchor's positive is the other view of the same
image and the negatives are the other 2N - 2 views of the *global* batch. Each replica compares its
own 2n anchors against the 2N gathered views, so its logits are [2n, 2N] and never the full
[2N, 2N] on one device.

Scaling convention: every loss here returns, over the anchors it is given (the replica's own), the
mean per-anchor loss of the a-views plus that of the b-views, as the reference code's NT-Xent
(`reduce_mean(loss_a + loss_b)`): twice the paper's L = 1/(2N) sum over the 2N anchors. The
paper's hyper-parameters (learning rates, weight decay) were tuned with that gradient scale; it
matters for what LARS does not normalise (batch-norm parameters and biases, the weight-decay share
of the trust ratio) and for plain momentum. Inside a replica context the train step divides by
`num_replicas_in_sync` before taking gradients, because tf.distribute sums gradients over
replicas; the mean over replicas of the returned value is the global batch's loss.
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


def _normalized_and_gathered(z_a, z_b, hidden_norm):
    """float32 (optionally l2-normalised) local views and their every-replica concatenations."""
    z_a = tf.cast(z_a, tf.float32)
    z_b = tf.cast(z_b, tf.float32)
    if hidden_norm:
        z_a = tf.math.l2_normalize(z_a, axis=-1)
        z_b = tf.math.l2_normalize(z_b, axis=-1)
    return z_a, z_b, cross_replica_concat(z_a), cross_replica_concat(z_b)


def nt_xent_with_metrics(z_a, z_b, temperature=0.1, hidden_norm=True):
    """NT-Xent of two views with negatives from every replica, plus contrastive metrics.

    Args:
      z_a, z_b: [n, D] projections of the two views of this replica's n images (row i of each is
        the same image).
      temperature: tau in sim / tau.
      hidden_norm: l2-normalise z first (cosine similarity).

    Returns:
      (loss, metrics): loss is the mean over this replica's a-anchors of -log softmax(positive),
      plus the same mean over its b-anchors (2x the paper's L, the reference code's scale);
      metrics has `contrast_acc` (fraction of a-views whose most similar b-view of the global
      batch is their own) and `contrast_entropy` (mean entropy of the softmax over those N
      b-views), as the reference code computes them from its logits_ab.
    """
    z_a, z_b, all_a, all_b = _normalized_and_gathered(z_a, z_b, hidden_norm)
    n = tf.shape(z_a)[0]
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
    loss = tf.reduce_mean(losses_a) + tf.reduce_mean(losses_b)

    logits_ab = logits_a[:, :global_n]
    probs = tf.nn.softmax(logits_ab)
    entropy = -tf.reduce_mean(tf.reduce_sum(probs * tf.math.log(probs + 1e-12), axis=1))
    accuracy = tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(logits_ab, axis=1, output_type=tf.int32), positives), tf.float32))
    return loss, {"contrast_acc": accuracy, "contrast_entropy": entropy}


def nt_xent(z_a, z_b, temperature=0.1, hidden_norm=True):
    """NT-Xent of the two views, at the reference code's scale (see `nt_xent_with_metrics`)."""
    loss, _ = nt_xent_with_metrics(z_a, z_b, temperature, hidden_norm)
    return loss


# --------------------------------------------------------------------------------------------
# The paper's loss ablation (Table 4), supervised contrastive loss, and one dispatcher.
#
# Every loss below uses the same [local anchors x global views] layout as NT-Xent: the 2n anchor
# rows of this replica are [a-views; b-views], and each row's 2N columns are [the other view of
# every global image; the same view of every global image], so for local image i (global index
# g = replica offset + i) the positive is column g and the anchor itself is column N + g, in both
# halves. Each returns (loss, metrics) with loss `_both_views(per-anchor losses)`, the scaling of
# `nt_xent_with_metrics`.

LOSSES = ("nt_xent", "nt_logistic", "margin_triplet", "supcon")
SEMI_HARD_LOSSES = ("nt_logistic", "margin_triplet")
# The paper tunes the margin (appendix B.9) without printing the value it kept; 1.0 is FaceNet's
# and tf.contrib's `triplet_semihard_loss` default. With hidden_norm similarities lie in [-1, 1].
DEFAULT_MARGIN = 1.0


def _anchor_rows(z_a, z_b, hidden_norm):
    """Similarities of this replica's anchors with every view of the global batch.

    Returns:
      sims: float32 [2n, 2N]; rows [a-anchors; b-anchors], columns [other view; same view].
      positive_cols: int32 [2n], the column of each row's positive (the other view).
      self_mask: bool [2n, 2N], True at each row's own column.
    """
    z_a, z_b, all_a, all_b = _normalized_and_gathered(z_a, z_b, hidden_norm)
    n = tf.shape(z_a)[0]
    global_n = tf.shape(all_a)[0]
    rows_a = tf.matmul(z_a, tf.concat([all_b, all_a], axis=0), transpose_b=True)
    rows_b = tf.matmul(z_b, tf.concat([all_a, all_b], axis=0), transpose_b=True)
    sims = tf.concat([rows_a, rows_b], axis=0)
    positive_cols = tf.tile(tf.range(n) + _replica_offset(n), [2])
    self_mask = tf.one_hot(positive_cols + global_n, 2 * global_n, on_value=True, off_value=False)
    return sims, positive_cols, self_mask


def _negative_mask(sims, positive_cols, self_mask, semi_hard):
    """[2n, 2N] bool: every view but the anchor and its positive (2N - 2 per row).

    With `semi_hard`, only the negatives less similar to the anchor than its positive are kept:
    the hard ones (at least as similar as the positive) are dropped, as in FaceNet's semi-hard
    mining (Schroff et al. 2015), which found that they collapse training early on. Together with
    the hinge of the margin loss, which is zero below s+ - m, this leaves exactly FaceNet's band of
    semi-hard negatives s+ - m < s- < s+, the hardest negatives that are still less similar than
    the positive. An anchor with no such negative has no negative term.
    """
    positive_mask = tf.one_hot(positive_cols, tf.shape(sims)[1], on_value=True, off_value=False)
    negatives = ~(self_mask | positive_mask)
    if semi_hard:
        positive = tf.gather(sims, positive_cols, axis=1, batch_dims=1)
        negatives &= tf.stop_gradient(sims) < tf.stop_gradient(positive)[:, None]
    return negatives


def _both_views(losses):
    """Mean of the a-anchors' losses plus mean of the b-anchors' (rows [a; b], n each)."""
    return 2.0 * tf.reduce_mean(losses)


def _metrics(logits, positive_mask):
    """`contrast_acc` and `contrast_entropy` of the a-anchors (the first half of the rows) over
    the b-views (the first half of the columns), as `nt_xent_with_metrics`.

    Args:
      logits: [2n, 2N] scaled similarities with the self column already at float32.min.
      positive_mask: [2n, 2N] bool, the columns that count as a correct top-1.
    """
    n = tf.shape(logits)[0] // 2
    global_n = tf.shape(logits)[1] // 2
    logits_ab = logits[:n, :global_n]
    probs = tf.nn.softmax(logits_ab)
    entropy = -tf.reduce_mean(tf.reduce_sum(probs * tf.math.log(probs + 1e-12), axis=1))
    top = tf.argmax(logits_ab, axis=1, output_type=tf.int32)
    accuracy = tf.reduce_mean(tf.cast(
        tf.gather(positive_mask[:n, :global_n], top, axis=1, batch_dims=1), tf.float32))
    return {"contrast_acc": accuracy, "contrast_entropy": entropy}


def _masked_logits(sims, self_mask, temperature):
    return tf.where(self_mask, tf.float32.min, sims / temperature)


def nt_logistic_with_metrics(z_a, z_b, temperature=0.1, hidden_norm=True,
                             semi_hard_negatives=False):
    """NT-Logistic (SimCLR Table 1 and Table 4), with negatives from every replica.

    Per anchor u with positive v+ and negatives v- (the 2N - 2 other views, or their semi-hard
    subset, see `_negative_mask`):

        l(u) = -log sigmoid(u.v+ / tau) - sum_{v-} log sigmoid(-u.v- / tau)

    (the paper's table lists the negated objective log sigma(u.v+/tau) + log sigma(-u.v-/tau)).
    Both log-sigmoids are computed as softplus for stability.

    Args:
      z_a, z_b: [n, D] projections of the two views of this replica's n images.
      temperature: tau.
      hidden_norm: l2-normalise z first (u.v is then the cosine similarity).
      semi_hard_negatives: keep only the negatives less similar than the positive.

    Returns:
      (loss, metrics): loss is `_both_views` of l(u) over this replica's anchors; metrics as
      `nt_xent_with_metrics` (on the logits u.v / tau).
    """
    sims, positive_cols, self_mask = _anchor_rows(z_a, z_b, hidden_norm)
    negatives = _negative_mask(sims, positive_cols, self_mask, semi_hard_negatives)
    positive = tf.gather(sims, positive_cols, axis=1, batch_dims=1)
    negative_terms = tf.where(negatives, tf.nn.softplus(sims / temperature), 0.0)
    losses = tf.nn.softplus(-positive / temperature) + tf.reduce_sum(negative_terms, axis=1)
    positive_mask = tf.one_hot(positive_cols, tf.shape(sims)[1], on_value=True, off_value=False)
    return _both_views(losses), _metrics(_masked_logits(sims, self_mask, temperature),
                                         positive_mask)


def margin_triplet_with_metrics(z_a, z_b, margin=DEFAULT_MARGIN, hidden_norm=True,
                                semi_hard_negatives=False, temperature=0.1):
    """Margin triplet loss (SimCLR Table 1 and Table 4), with negatives from every replica.

    Per anchor u with positive v+ and negatives v- (the 2N - 2 other views, or their semi-hard
    subset, see `_negative_mask`):

        l(u) = sum_{v-} max(u.v- - u.v+ + m, 0)

    (the paper's table lists the negated objective -max(u.v- - u.v+ + m, 0)). There is no
    temperature in this loss.

    Args:
      z_a, z_b: [n, D] projections of the two views of this replica's n images.
      margin: m.
      hidden_norm: l2-normalise z first (u.v is then the cosine similarity).
      semi_hard_negatives: keep only the negatives less similar than the positive.
      temperature: used only to scale the logits of `contrast_entropy`.

    Returns:
      (loss, metrics): loss is `_both_views` of l(u) over this replica's anchors; metrics as
      `nt_xent_with_metrics`.
    """
    sims, positive_cols, self_mask = _anchor_rows(z_a, z_b, hidden_norm)
    negatives = _negative_mask(sims, positive_cols, self_mask, semi_hard_negatives)
    positive = tf.gather(sims, positive_cols, axis=1, batch_dims=1)
    hinge = tf.nn.relu(sims - positive[:, None] + margin)
    losses = tf.reduce_sum(tf.where(negatives, hinge, 0.0), axis=1)
    positive_mask = tf.one_hot(positive_cols, tf.shape(sims)[1], on_value=True, off_value=False)
    return _both_views(losses), _metrics(_masked_logits(sims, self_mask, temperature),
                                         positive_mask)


def supcon_with_metrics(z_a, z_b, labels, temperature=0.1, hidden_norm=True):
    """Supervised contrastive loss L^sup_out (Khosla et al. 2020, eq. 2), global batch.

    Every other view in the global batch with the anchor's label is a positive, and so is the
    anchor's own other view:

        l(i) = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

    Labels < 0 (unlabelled) match nothing, so such an anchor's only positive is its other view;
    with every label distinct or negative this is exactly NT-Xent. (The reference implementation
    also multiplies by tau / 0.07, a constant learning-rate factor, left out here.) Labels are
    gathered across replicas like the projections, as float32 (exact for ids below 2^24).

    Args:
      z_a, z_b: [n, D] projections of the two views of this replica's n images.
      labels: int [n] class ids of the n images (-1 = unlabelled).
      temperature: tau.
      hidden_norm: l2-normalise z first.

    Returns:
      (loss, metrics): loss is `_both_views` of l(i) over this replica's anchors; `contrast_acc`
      counts an a-anchor as right when its most similar b-view is any positive.
    """
    sims, positive_cols, self_mask = _anchor_rows(z_a, z_b, hidden_norm)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    all_labels = tf.cast(cross_replica_concat(tf.cast(labels, tf.float32)), tf.int32)
    row_labels = tf.tile(labels, [2])[:, None]
    col_labels = tf.tile(all_labels, [2])[None, :]
    same_class = tf.equal(row_labels, col_labels) & (row_labels >= 0)
    own_view = tf.one_hot(positive_cols, tf.shape(sims)[1], on_value=True, off_value=False)
    positives = (same_class | own_view) & ~self_mask
    logits = _masked_logits(sims, self_mask, temperature)
    log_prob = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    positive_log_prob = tf.reduce_sum(tf.where(positives, log_prob, 0.0), axis=1)
    losses = -positive_log_prob / tf.reduce_sum(tf.cast(positives, tf.float32), axis=1)
    return _both_views(losses), _metrics(logits, positives)


def contrastive_loss(name, z_a, z_b, labels=None, temperature=0.1, hidden_norm=True,
                     semi_hard_negatives=False, margin=DEFAULT_MARGIN):
    """The contrastive loss `name` of the two views, with negatives from every replica.

    Args:
      name: one of LOSSES: "nt_xent" (the paper's), "nt_logistic", "margin_triplet" (Table 4) or
        "supcon" (needs `labels`).
      z_a, z_b: [n, D] projections of the two views of this replica's n images.
      labels: int [n] class ids (-1 = unlabelled); used by "supcon" only.
      temperature: tau (not used by "margin_triplet").
      hidden_norm: l2-normalise z first.
      semi_hard_negatives: semi-hard negative mining, for "nt_logistic" and "margin_triplet".
      margin: m of "margin_triplet".

    Returns:
      (loss, metrics) as `nt_xent_with_metrics`: the a-anchors' mean loss plus the b-anchors',
      and `contrast_acc`, `contrast_entropy`.
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if semi_hard_negatives and name not in SEMI_HARD_LOSSES:
        raise ValueError(f"semi_hard_negatives applies to {SEMI_HARD_LOSSES} only, not {name!r}")
    if name == "nt_xent":
        return nt_xent_with_metrics(z_a, z_b, temperature, hidden_norm)
    if name == "nt_logistic":
        return nt_logistic_with_metrics(z_a, z_b, temperature, hidden_norm, semi_hard_negatives)
    if name == "margin_triplet":
        return margin_triplet_with_metrics(z_a, z_b, margin, hidden_norm, semi_hard_negatives,
                                           temperature)
    if labels is None:
        raise ValueError("loss 'supcon' needs the batch labels")
    return supcon_with_metrics(z_a, z_b, labels, temperature, hidden_norm)
