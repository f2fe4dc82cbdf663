"""The fine-tuning model: f (partly frozen) -> [the first layers of g] -> a linear classifier.

`Classifier` is what fine-tuning, linear evaluation and distillation train, and what evaluation
scores: the encoder f, frozen up to `fine_tune_after_block` (-1: everything trains; 0: after the
stem; k = 1..3: after block group k; 4: f is frozen, the paper's linear evaluation), optionally the
first `ft_proj_selector` layers of the projection head g (SimCLRv2 fine-tunes from the middle of g),
and a linear `logits` layer. Frozen layers run in inference mode (batch norm uses and keeps its
moving statistics) and get no gradient, so they stay exactly as they were. (The original TF2 code
runs them with batch statistics, so their moving averages drift while their weights stay.)
"""

import keras
import tensorflow as tf

from simclr_tf import checkpoints
from simclr_tf import models
from simclr_tf.heads import logits_initializer
from simclr_tf.resnet import OUTPUT_ENDPOINT, STEM_ENDPOINT, endpoint

LINEAR_EVAL_BLOCK = 4
LOGITS_NAME = "logits"


class Classifier:
    """logits = W · [g_{1..j}](f(images)) + b, with f frozen up to `fine_tune_after_block`.

    Args:
      encoder: the Keras encoder f (`resnet`).
      num_classes: width of the logits.
      head: the `ProjectionHead` g, needed when `ft_proj_selector > 0`.
      ft_proj_selector: 0 classifies h; j > 0 classifies the output of g's layer j (hiddens[j]).
      fine_tune_after_block: -1 (all of f trains), 0 (after the stem), 1..3 (after block group k)
        or 4 (f frozen: linear evaluation).
      zero_init_logits_layer: start the logits layer at zero (SimCLRv2), else at N(0, 0.01^2).
    """

    def __init__(self, encoder, num_classes, head=None, ft_proj_selector=0,
                 fine_tune_after_block=-1, zero_init_logits_layer=False):
        if not -1 <= fine_tune_after_block <= LINEAR_EVAL_BLOCK:
            raise ValueError(f"fine_tune_after_block must be in -1..4, got "
                             f"{fine_tune_after_block}")
        if ft_proj_selector and (head is None or not 0 < ft_proj_selector <= head.num_layers):
            raise ValueError(
                f"ft_proj_selector={ft_proj_selector} needs a projection head with at least that "
                f"many layers (and counts from 0 here); this one has "
                f"{0 if head is None else head.num_layers}")
        self.encoder = encoder
        self.head = head if ft_proj_selector else None
        self.ft_proj_selector = ft_proj_selector
        self.zero_init_logits_layer = zero_init_logits_layer
        self.fine_tune_after_block = fine_tune_after_block
        self._frozen = self._tail = None
        if 0 <= fine_tune_after_block < LINEAR_EVAL_BLOCK:
            name = (STEM_ENDPOINT if fine_tune_after_block == 0
                    else f"block_group{fine_tune_after_block}")
            boundary = endpoint(encoder, name)
            # Two views of the same layers (and weights): the frozen front and the trained back.
            self._frozen = keras.Model(encoder.input, boundary, name=f"{encoder.name}_frozen")
            self._tail = keras.Model(boundary, endpoint(encoder, OUTPUT_ENDPOINT),
                                     name=f"{encoder.name}_tuned")
        self.feature_dim = (models.encoder_output_dim(encoder) if not ft_proj_selector
                            else head.output_dim(ft_proj_selector))
        self.logits_layer = keras.layers.Dense(
            num_classes, kernel_initializer=logits_initializer(zero_init_logits_layer),
            name=LOGITS_NAME)
        self.logits_layer.build((None, self.feature_dim))

    @property
    def num_classes(self):
        return self.logits_layer.units

    @property
    def fine_tuned_layers(self):
        """The parts whose weights train: [tuned part of f] + [head layers] + [logits]."""
        parts = []
        if self.fine_tune_after_block == -1:
            parts.append(self.encoder)
        elif self._tail is not None:
            parts.append(self._tail)
        if self.head is not None:
            j = self.ft_proj_selector
            parts += self.head.dense_layers[:j] + self.head.bn_layers[:j]
        return parts + [self.logits_layer]

    @property
    def trainable_variables(self):
        seen, out = set(), []
        for part in self.fine_tuned_layers:
            for v in part.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def features(self, images, training=False):
        """The classifier's input: h, or g's layer `ft_proj_selector` output."""
        if self.fine_tune_after_block == LINEAR_EVAL_BLOCK:
            h = tf.stop_gradient(self.encoder(images, training=False))
        elif self._frozen is not None:
            x = tf.stop_gradient(self._frozen(images, training=False))
            h = self._tail(x, training=training)
        else:
            h = self.encoder(images, training=training)
        if self.head is None:
            return h
        return self.head.up_to(h, self.ft_proj_selector, training=training)

    def __call__(self, images, training=False):
        return tf.cast(self.logits_layer(self.features(images, training)), tf.float32)

    def checkpoint_items(self):
        """Named parts for `tf.train.Checkpoint` (f under "encoder", as pretraining saves it)."""
        items = {checkpoints.ENCODER: self.encoder, checkpoints.CLASSIFIER: self.logits_layer}
        if self.head is not None:
            items[checkpoints.PROJECTION_HEAD] = self.head
        return items


def build_classifier(config, num_classes, global_bn=False, image_size=-1):
    """The `Classifier` a `RunConfig` describes (call under the strategy's scope).

    image_size: the static input side; -1 = the config's, None = any.
    """
    ft = config.finetune
    size = config.data.image_size if image_size == -1 else image_size
    encoder = models.build_encoder(config.encoder, size, global_bn=global_bn)
    head = None
    if ft.ft_proj_selector:
        head = models.build_projection_head(config, models.encoder_output_dim(encoder),
                                            global_bn=global_bn)
    return Classifier(encoder, num_classes, head, ft.ft_proj_selector, ft.fine_tune_after_block,
                      ft.zero_init_logits_layer)
