"""simclr_tf: SimCLR and SimCLRv2 in TensorFlow 2 / Keras 3.

The public pieces: the encoder f (`resnet`), the heads (`ProjectionHead`, `LinearProbe`), the loss
(`nt_xent`), the optimiser (`LARS`) and the augmentations (`augment`, `preprocess_for_train_single`).
"""

from simclr_tf import augment
from simclr_tf.augment import preprocess_for_eval, preprocess_for_train_single, two_views
from simclr_tf.batchnorm import BatchNorm
from simclr_tf.heads import LinearProbe, ProjectionHead
from simclr_tf.lars import LARS
from simclr_tf.losses import nt_xent, nt_xent_with_metrics
from simclr_tf.resnet import feature_extractor, resnet
from simclr_tf.schedules import WarmupCosine, scaled_learning_rate

__all__ = [
    "augment", "preprocess_for_eval", "preprocess_for_train_single", "two_views", "BatchNorm",
    "LinearProbe", "ProjectionHead", "LARS", "nt_xent", "nt_xent_with_metrics", "resnet",
    "feature_extractor", "WarmupCosine", "scaled_learning_rate",
]
