"""simclr_tf: SimCLR and SimCLRv2 in TensorFlow 2 / Keras 3.

The public pieces: the encoder f (`resnet`), the heads (`ProjectionHead`, `LinearProbe`), the loss
(`nt_xent`), the optimiser (`LARS`), the transforms (`augment`) and the views made of them
(`views`, `two_views`, `preprocess_for_train_single`).

Importing simclr_tf before TensorFlow turns on TensorFlow's oneDNN CPU kernels
(`TF_ENABLE_ONEDNN_OPTS=1`) unless the environment already chose: on CPUs where TensorFlow does
not enable them itself (AVX2-only ones such as this project's machines) they make a ResNet step
~1.45x faster. Set `TF_ENABLE_ONEDNN_OPTS=0` to keep TensorFlow's own kernels. This is done here
rather than in `simclr_tf.run` because `python -m simclr_tf.run` imports this package, and
TensorFlow with it, before the module runs. When TensorFlow was imported first, with the variable
unset, and its oneDNN kernels are off, a one-line warning says how to turn them on.
"""

import os
import sys

from simclr_tf import quiet_start

_TF_LOADED_FIRST = "tensorflow" in sys.modules and "TF_ENABLE_ONEDNN_OPTS" not in os.environ
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # read by TensorFlow when it loads
# `python -m simclr_tf.<cli>` imports this package, and TensorFlow with it, before the CLI module
# runs: here is where TensorFlow's start-up messages are hidden (see `quiet_start`).
QUIET_START = quiet_start.wanted(sys.argv[0] if sys.argv else "", os.environ)
if QUIET_START:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # INFO and WARNING, after start-up too
with quiet_start.silenced(QUIET_START):  # TensorFlow and Keras load here
    from simclr_tf import augment, conv, views
    from simclr_tf.augment import preprocess_for_eval
    from simclr_tf.views import preprocess_for_train_single, two_views
    from simclr_tf.batchnorm import BatchNorm
    from simclr_tf.heads import LinearProbe, ProjectionHead
    from simclr_tf.lars import LARS
    from simclr_tf.losses import nt_xent, nt_xent_with_metrics
    from simclr_tf.resnet import feature_extractor, resnet
    from simclr_tf.schedules import WarmupCosine, scaled_learning_rate


if _TF_LOADED_FIRST and not conv.onednn_enabled():
    from absl import logging
    logging.warning(
        "simclr_tf: TensorFlow was imported before simclr_tf, so its oneDNN CPU kernels are off "
        "(a ResNet step runs ~1.45x slower on AVX2 CPUs): import simclr_tf first or set "
        "TF_ENABLE_ONEDNN_OPTS=1 (=0 keeps TensorFlow's kernels and silences this)")

__all__ = [
    "augment", "views", "preprocess_for_eval", "preprocess_for_train_single", "two_views",
    "BatchNorm", "LinearProbe", "ProjectionHead", "LARS", "nt_xent", "nt_xent_with_metrics",
    "resnet", "feature_extractor", "WarmupCosine", "scaled_learning_rate",
]
