"""Image corruptions for the data-quality study (Cole et al. 2022, "When does contrastive visual
representation learning work?"): `--corrupt` for training images, `--eval_corrupt` for the images
evaluation reads.

Each applies to one decoded uint8 image [H, W, 3], in the tf.data graph, before any augmentation,
and gives the same result for the same image every time:

* `downsample:F`: resized to 1/F of its sides (area-averaging, as an image taken at the lower
  resolution), then back up to its own size (bilinear): the detail is lost, the size is kept;
* `jpeg:Q`: encoded as JPEG at quality Q and decoded;
* `salt_pepper:P`: a fraction P of the pixels set to black or white (half each, on average), the
  pixels drawn from a seed that is a hash of the image's own bytes;
* `blur:SIGMA`: a Gaussian blur of SIGMA pixels, radius ceil(3 SIGMA), zero padding.
"""

import math

import tensorflow as tf

from simclr_tf import augment
from simclr_tf.config import parse_corruption


def corruption_fn(spec, flag="corrupt"):
    """The function uint8 [H, W, 3] -> uint8 [H, W, 3] that `spec` (e.g. "jpeg:10") names, or
    None for no corruption. Raises ConfigError (naming `flag`) for a bad spec."""
    parsed = parse_corruption(spec, flag)
    if parsed is None:
        return None
    kind, value = parsed
    return {"downsample": lambda image: downsample(image, value),
            "jpeg": lambda image: jpeg(image, int(value)),
            "salt_pepper": lambda image: salt_and_pepper(image, value),
            "blur": lambda image: blur(image, value)}[kind]


def downsample(image, factor):
    size = tf.shape(image)[:2]
    small = tf.maximum(tf.cast(tf.math.round(tf.cast(size, tf.float32) / factor), tf.int32), 1)
    low = tf.image.resize(image, small, method="area")
    return _to_uint8(tf.image.resize(low, size, method="bilinear"))


def jpeg(image, quality):
    return tf.io.decode_jpeg(tf.io.encode_jpeg(image, quality=quality), channels=3)


def salt_and_pepper(image, fraction):
    seed = image_seed(image)
    hit, white = tf.unstack(tf.random.stateless_uniform(
        tf.concat([[2], tf.shape(image)[:2]], 0), seed))
    value = tf.where(white < 0.5, tf.constant(0, tf.uint8), tf.constant(255, tf.uint8))
    return tf.where((hit < fraction)[..., None], value[..., None], image)


def blur(image, sigma):
    radius = int(math.ceil(3 * sigma))
    blurred = augment.gaussian_blur(tf.cast(image, tf.float32)[None], sigma, radius)[0]
    return _to_uint8(blurred)


def image_seed(image):
    """A stateless seed [2] that is a function of the image's bytes and shape only."""
    digest = tf.strings.to_hash_bucket_fast(tf.io.serialize_tensor(image), 2**62)
    return tf.stack([digest, tf.constant(0x5eed, tf.int64)])


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.math.round(image), 0, 255), tf.uint8)
