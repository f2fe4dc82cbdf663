"""The model parts a `RunConfig` describes: the one place config sections become constructor
arguments of f (`resnet`), g (`ProjectionHead`) and the linear probe.

The parts themselves take plain arguments and know nothing of the config; trainers, evaluation
and the export call these builders so that the same settings always build the same model.
"""

import keras

from simclr_tf.heads import LinearProbe, ProjectionHead
from simclr_tf.resnet import resnet

ENCODER_NAME = "encoder"
PROJECTION_HEAD_NAME = "projection_head"
LINEAR_PROBE_NAME = "linear_probe"


def build_encoder(encoder_config, image_size=None, global_bn=None):
    """f: images [B, S, S, 3] in [0, 1] -> h.

    Args:
      encoder_config: a `config.EncoderConfig` (its derived defaults resolved, as a `RunConfig`
        resolves them).
      image_size: the static input side S, or None for any size.
      global_bn: synchronise batch norm across replicas; None: the config's setting.
    """
    if encoder_config.cifar_stem is None:
        raise ValueError("encoder_config.cifar_stem is unset: take the encoder section of a "
                         "RunConfig, which derives it from image_size")
    return resnet(
        encoder_config.resnet_depth, encoder_config.width_multiplier, encoder_config.sk_ratio,
        encoder_config.se_ratio, cifar_stem=encoder_config.cifar_stem, image_size=image_size,
        global_bn=encoder_config.global_bn if global_bn is None else global_bn,
        bn_momentum=encoder_config.batch_norm_decay, bn_epsilon=encoder_config.batch_norm_epsilon,
        name=ENCODER_NAME)


def build_float32_encoder(encoder_config):
    """f with per-replica batch norm, float32 weights and compute and any input size, whatever
    the global Keras dtype policy: the copy that is exported or evaluated at another size."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return build_encoder(encoder_config, image_size=None, global_bn=False)
    finally:
        keras.config.set_dtype_policy(policy)


def encoder_output_dim(encoder):
    """Width of h of a built encoder."""
    return int(encoder.output.shape[-1])


def build_projection_head(config, input_dim, global_bn=False):
    """g, built for h of width `input_dim`; its batch norm follows the encoder's settings."""
    head_config, encoder_config = config.head, config.encoder
    head = ProjectionHead(
        head_config.proj_head_mode, head_config.num_proj_layers, head_config.proj_out_dim,
        hidden_dim=head_config.proj_head_hidden_dim or None, global_bn=global_bn,
        bn_momentum=encoder_config.batch_norm_decay, bn_epsilon=encoder_config.batch_norm_epsilon,
        name=PROJECTION_HEAD_NAME)
    head.build((None, input_dim))
    return head


def build_linear_probe(num_classes, input_dim):
    """The linear probe trained on stop_gradient(h) during pretraining."""
    probe = LinearProbe(num_classes, name=LINEAR_PROBE_NAME)
    probe.build((None, input_dim))
    return probe
