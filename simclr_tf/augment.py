"""SimCLR's image transforms (Chen et al. 2020, appendix A and Figure 4), batched and graph-only.

This module owns the transforms that turn a batch of images into augmented views: random resized
crop (+ resize), horizontal flip, colour jitter in a random order, random grayscale, Gaussian blur,
the other transforms of the paper's augmentation study (cutout, Sobel, noise, rotation), and the
evaluation centre crop. Which transforms make a view, in which order, is a recipe (`views`).
Every transform

* works on a whole batch [B, H, W, 3] with per-image random parameters, vectorised (no per-image
  loop, no `tf.map_fn`), with graph ops only, so it runs inside `tf.data` `map` and inside
  `tf.function(jit_compile=True)`;
* takes one stateless seed (int32/int64 tensor of shape [2]); sub-seeds are derived with
  `tf.random.experimental.stateless_split`, so the same seed reproduces the same views;
* returns float32 in [0, 1] (uint8 input is read directly by the crop/resize and scaled there).

The four transforms of the paper's recipe are also two steps each: `draw_*` makes the batch's
per-image numbers from the seed, `apply_*` uses them (`random_*` is one then the other). An image's
numbers depend only on the seed, the batch size and its place in the batch, so `views` can make a
large batch a few images at a time, with slices of the whole batch's draws, and get the same views.

Reproducibility note: `tf.random.stateless_uniform` returns the same integer bits with and without
XLA but converts them to floats differently, so uniforms are built here from integer bits
(`_uniform`) and a seed gives the same views in both modes (up to float rounding of the image math).
"""
import math

import tensorflow as tf

from simclr_tf.config import SMALL_IMAGE_SIZE

_RNG_ALG = tf.random.Algorithm.PHILOX
_UNIFORM_BITS = 24  # a float32 mantissa holds 24 bits, so every draw is exactly representable

# Factors of the paper's colour jitter, multiplied by the strength s (appendix A, pseudo-code).
_BRIGHTNESS = 0.8
_CONTRAST = 0.8
_SATURATION = 0.8
_HUE = 0.2


# --------------------------------------------------------------------------------------------
# Randomness and small helpers.

def as_seed(seed):
    """Validates a seed and casts it to int64.

    stateless_split draws sub-seeds in the seed's own dtype, so without the cast an int32 and an
    int64 seed holding the same values would give different views.
    """
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed must be int32 or int64, got {seed.dtype}")
    if seed.shape.rank is not None and seed.shape != [2]:
        raise ValueError(f"seed must have shape [2], got {seed.shape}")
    return tf.cast(seed, tf.int64)


def split_seed(seed, num):
    """`num` independent seeds [2] drawn from `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num, alg=_RNG_ALG))


def fold_seed(seed, value):
    """A seed [2] derived from `seed` and the integer `value`."""
    # An explicit algorithm: "auto_select" folds large int64 seeds differently under XLA.
    return tf.random.experimental.stateless_fold_in(as_seed(seed), value, alg=_RNG_ALG)


def _uniform(seed, batch_size, *dims):
    """float32 [batch_size, *dims] uniform in [0, 1), the same with and without XLA.

    Each transform draws all its per-image numbers in one call: every stateless RNG op costs a
    few tenths of a second of XLA compile time, and a kernel launch per batch without XLA.
    """
    shape = tf.stack([batch_size, *dims])
    bits = tf.random.stateless_uniform(shape, as_seed(seed), minval=None, maxval=None,
                                       dtype=tf.int32, alg=_RNG_ALG)
    low_bits = tf.bitwise.bitwise_and(bits, (1 << _UNIFORM_BITS) - 1)
    return tf.cast(low_bits, tf.float32) * (2.0 ** -_UNIFORM_BITS)


def _in_range(unit, low, high):
    """Maps uniforms in [0, 1) to [low, high)."""
    return low + (high - low) * unit


def _select_per_image(mask, if_true, if_false):
    """Per image, `if_true` where mask[b] else `if_false` (both finite, so the blend is exact).

    An arithmetic blend, because tf.where with a [B, 1, 1, 1] condition broadcasts slowly on CPU
    (about 3x the time of this blend at 32 x 224 x 224 x 3).
    """
    weight = tf.cast(mask, if_true.dtype)[:, None, None, None]
    return weight * if_true + (1.0 - weight) * if_false


def _dim(images, axis):
    """The static size of `axis` if known, else the dynamic one (an int32 scalar tensor)."""
    static = images.shape[axis]
    return static if static is not None else tf.shape(images)[axis]


def _check_images(images):
    if images.shape.rank is not None and images.shape.rank != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if images.dtype != tf.uint8 and not images.dtype.is_floating:
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")


def _check_rgb(images):
    _check_images(images)
    if images.shape.rank is not None and images.shape[-1] not in (None, 3):
        raise ValueError(f"colour transforms need RGB images [B, H, W, 3], got shape "
                         f"{images.shape}")


def _check_probability(name, p):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def to_float(images):
    """Converts images to float32 in [0, 1].

    Args:
      images: uint8 tensor in [0, 255], or a float tensor already in [0, 1].

    Returns:
      float32 tensor of the same shape: uint8 divided by 255, floats only cast.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    if images.dtype.is_floating:
        return tf.cast(images, tf.float32)
    raise ValueError(f"images must be uint8 or float, got {images.dtype}")


def _scale_to_unit(resized, source_dtype):
    """Resized values come out as float32 in the source's range; uint8 ranges are rescaled."""
    if source_dtype == tf.uint8:
        return resized / 255.0
    return resized


# --------------------------------------------------------------------------------------------
# Crop and resize.

def _crop_sizes(unit_ratio, unit_height, height, width, area_range, aspect_ratio_range):
    """Candidate crop (h, w) in whole pixels, and whether each meets the area constraints.

    The original SimCLR code's sampler, `tf.image.sample_distorted_bounding_box`: the aspect ratio
    is uniform in its range, then the height is a uniform whole number of pixels between those of
    the smallest and the largest allowed area (the largest clipped to fit the image), and the
    width follows from the ratio. Crops come out smaller than with an area drawn uniformly
    (torchvision's way), because the area grows as the square of the uniform height.
    """
    ratio = _in_range(unit_ratio, *aspect_ratio_range)
    min_area = area_range[0] * height * width
    max_area = area_range[1] * height * width
    low = tf.round(tf.sqrt(min_area / ratio))
    high = tf.round(tf.sqrt(max_area / ratio))
    # The tallest height whose rounded width still fits the image.
    widest = tf.floor((width + 0.5 - 1e-7) / ratio)
    widest = tf.where(tf.round(widest * ratio) > width, widest - 1.0, widest)
    high = tf.where(tf.round(high * ratio) > width, widest, high)
    high = tf.minimum(high, height)
    low = tf.minimum(low, high)
    crop_h = low + tf.minimum(tf.floor(unit_height * (high - low + 1.0)), high - low)
    crop_w = tf.round(crop_h * ratio)
    # Pixel rounding may leave the area just outside its range: one pixel of height more or less.
    crop_h = tf.where(crop_h * crop_w < min_area, crop_h + 1.0, crop_h)
    crop_w = tf.round(crop_h * ratio)
    crop_h = tf.where(crop_h * crop_w > max_area, crop_h - 1.0, crop_h)
    crop_w = tf.round(crop_h * ratio)
    area = crop_h * crop_w
    valid = ((area >= min_area) & (area <= max_area) & (crop_h >= 1.0) & (crop_w >= 1.0)
             & (crop_h <= height) & (crop_w <= width))
    return crop_h, crop_w, valid


def _sample_crop_boxes(seed, batch_size, height, width, area_range, aspect_ratio_range,
                       max_attempts, min_object_covered):
    """Samples one random-resized-crop box per image, as int32 [B, 4] rows (top, left, h, w).

    Per image, `max_attempts` candidates are drawn at once (see `_crop_sizes`); the first whose
    area is in `area_range` and at least `min_object_covered` of the image is placed uniformly at
    random. If none is, the box is the whole image, as in the original code.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    # Per image: (ratio, height) draws for each attempt, then one (top, left) placement draw.
    draws = _uniform(seed, batch_size, max_attempts + 1, 2)
    ratio_draws, height_draws = tf.unstack(draws[:, :-1], axis=2)
    u_top, u_left = tf.unstack(draws[:, -1], axis=1)

    crop_h, crop_w, valid = _crop_sizes(ratio_draws, height_draws, height, width, area_range,
                                        aspect_ratio_range)
    valid &= crop_h * crop_w >= min_object_covered * height * width
    first_valid = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(valid, axis=1)
    crop_h = tf.where(found, tf.gather(crop_h, first_valid, axis=1, batch_dims=1), height)
    crop_w = tf.where(found, tf.gather(crop_w, first_valid, axis=1, batch_dims=1), width)

    # The minimum guards against float rounding of u * n up to n for u just below 1.
    top = tf.minimum(tf.floor(u_top * (height - crop_h + 1.0)), height - crop_h)
    left = tf.minimum(tf.floor(u_left * (width - crop_w + 1.0)), width - crop_w)
    return tf.cast(tf.stack([top, left, crop_h, crop_w], axis=1), tf.int32)


def _bilinear_taps(start, length, size):
    """Source indices and weights to resize pixels [start, start + length) to `size` pixels.

    Half-pixel centres with edge clamping inside the crop, as `tf.image.resize` on the cropped
    image, so neighbouring pixels outside the crop never leak in. Output pixel i samples source
    position (i + 1/2) length / size - 1/2 = ((2i + 1) length - size) / (2 size): its whole part
    and remainder are computed in integers, so each weight is the exact fraction rounded once
    (within one ulp under XLA). The float formula this replaces was off by up to 1.7e-5, and XLA
    contracted it into FMAs differently from the graph.
    """
    numerator = (2 * tf.range(size)[None] + 1) * length[:, None] - size
    lower = tf.math.floordiv(numerator, 2 * size)
    weight = tf.cast(tf.math.floormod(numerator, 2 * size), tf.float32) / float(2 * size)
    last = length[:, None] - 1
    low_index = tf.clip_by_value(lower, 0, last) + start[:, None]
    high_index = tf.clip_by_value(lower + 1, 0, last) + start[:, None]
    return low_index, high_index, weight


def _gather_lerp(images, low_index, high_index, weight, axis):
    low = tf.cast(tf.gather(images, low_index, axis=axis, batch_dims=1), tf.float32)
    high = tf.cast(tf.gather(images, high_index, axis=axis, batch_dims=1), tf.float32)
    return low + (high - low) * weight


def _crop_and_resize(images, boxes, size, flip=None):
    """Crops each image to its box and resizes it bilinearly to [size, size].

    A batched, XLA-compilable equivalent of `tf.image.resize(image[top:top+h, left:left+w],
    [size, size])` per image (`tf.image.crop_and_resize` has no XLA kernel and uses align-corners
    sampling). Reads any dtype; returns float32 in the input's value range.

    Args:
      images: [B, H, W, C] tensor.
      boxes: int32 [B, 4] rows (top, left, height, width) in pixels.
      size: output side, a Python int.
      flip: optional bool [B]: mirror those images left-right. The column taps are reversed, so
        this is the crop followed by a flip, bit for bit, without a pass of its own.

    Returns:
      float32 [B, size, size, C].
    """
    top, left, crop_h, crop_w = tf.unstack(boxes, axis=1)
    y_low, y_high, y_weight = _bilinear_taps(top, crop_h, size)
    x_low, x_high, x_weight = _bilinear_taps(left, crop_w, size)
    if flip is not None:
        x_low, x_high, x_weight = (tf.where(flip[:, None], tf.reverse(taps, axis=[1]), taps)
                                   for taps in (x_low, x_high, x_weight))
    # Rows first: the row gather copies whole contiguous rows and shrinks H before the columns.
    rows = _gather_lerp(images, y_low, y_high, y_weight[:, :, None, None], axis=1)
    if images.shape[0] == 1:
        # One image (a folder's, cropped at its own size without XLA): TensorFlow's CPU gather
        # along axis 2 copies each 3-float pixel on its own; gathering whole rows of the
        # transposed image is 3x faster at 224 px, transposes included. The same view bit for bit.
        columns = _gather_lerp(tf.transpose(rows, [0, 2, 1, 3]), x_low, x_high,
                               x_weight[:, :, None, None], axis=1)
        return tf.transpose(columns, [0, 2, 1, 3])
    return _gather_lerp(rows, x_low, x_high, x_weight[:, None, :, None], axis=2)


def _whole_image_boxes(images):
    batch_size = _dim(images, 0)
    box = tf.stack([0, 0, tf.shape(images)[1], tf.shape(images)[2]])
    return tf.tile(box[None], tf.stack([batch_size, 1]))


def resize(images, size):
    """Bilinear resize of whole images to float32 [B, size, size, C] in [0, 1]."""
    images = tf.convert_to_tensor(images)
    resized = _crop_and_resize(images, _whole_image_boxes(images), size)
    return _scale_to_unit(resized, images.dtype)


def random_resized_crop(images, seed, size, area_range=(0.08, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=100,
                        min_object_covered=0.1, flip=None):
    """Inception-style random crop, resized bilinearly to a square, with its own box per image.

    The boxes follow the original SimCLR code's `tf.image.sample_distorted_bounding_box` with
    these arguments (see `_crop_sizes`), batched and XLA-compilable; the placement is uniform
    over every free position (the TF op never uses the last one). `apply_crop` of `draw_crop`.

    Args:
      images: [B, H, W, C] uint8 or float images (H, W may be dynamic).
      seed: int32/int64 tensor of shape [2].
      size: output side in pixels.
      area_range: range of the crop area as a fraction of the image area.
      aspect_ratio_range: range of the crop's width / height.
      max_attempts: candidates drawn per image before falling back to the whole image.
      min_object_covered: smallest fraction of the image a crop must cover (the original's 0.1
        raises the default area range's lower end from 0.08 to 0.1).
      flip: optional bool [B]: mirror those crops left-right (see `_crop_and_resize`).

    Returns:
      float32 [B, size, size, C] in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    _check_images(images)
    shape = tf.shape(images)
    boxes = draw_crop(seed, _dim(images, 0), shape[1], shape[2], area_range, aspect_ratio_range,
                      max_attempts, min_object_covered)
    return apply_crop(images, boxes, size, flip)


def draw_crop(seed, batch_size, height, width, area_range=(0.08, 1.0),
              aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=100, min_object_covered=0.1):
    """The boxes of `random_resized_crop` (same arguments) for a batch of `batch_size` images of
    `height` x `width` pixels: int32 [B, 4] rows (top, left, height, width) in pixels."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if not 0.0 < area_range[0] <= area_range[1]:
        raise ValueError(f"area_range must satisfy 0 < low <= high, got {area_range}")
    if not 0.0 < aspect_ratio_range[0] <= aspect_ratio_range[1]:
        raise ValueError(f"aspect_ratio_range must satisfy 0 < low <= high, got "
                         f"{aspect_ratio_range}")
    if not 0.0 <= min_object_covered <= 1.0:
        raise ValueError(f"min_object_covered must be in [0, 1], got {min_object_covered}")
    return _sample_crop_boxes(seed, batch_size, height, width, area_range, aspect_ratio_range,
                              max_attempts, min_object_covered)


def apply_crop(images, boxes, size, flip=None):
    """Crops each image to its box (`draw_crop`) and resizes it bilinearly to [size, size]:
    float32 [B, size, size, C] in [0, 1]. `flip` as in `random_resized_crop`."""
    images = tf.convert_to_tensor(images)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return _scale_to_unit(_crop_and_resize(images, boxes, size, flip), images.dtype)


def random_resized_crop_and_flip(images, crop_seed, flip_seed, size, p_flip=0.5):
    """`random_resized_crop` (default arguments) then `random_flip_left_right`, in one pass.

    Bit for bit the two transforms in turn with the same seeds; the flip reverses the crop's
    column taps instead of gathering the cropped images again (a full pass over every view).
    """
    flip = draw_flip(flip_seed, _dim(images, 0), p_flip)
    return random_resized_crop(images, crop_seed, size, flip=flip)


def _centre_square_box(height, width, crop_proportion):
    """(top, left, side, side) of the centred square of `crop_proportion` of the shorter side."""
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(tf.round(crop_proportion * shorter), tf.int32), 1)
    # Offsets round up, as the original SimCLR centre crop.
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


EVAL_CROP_PROPORTION = 0.875  # the original code's CROP_PROPORTION


def eval_crop(image_size):
    """Whether the evaluation preprocessing of a run trained at `image_size` takes the 87.5%
    centre crop: above 32 px (keyed on the training size, as the original code does, so f trained
    on small images and evaluated or served larger sees whole images). Evaluation, the probe and
    every export signature follow it."""
    return image_size > SMALL_IMAGE_SIZE


def preprocess_for_eval(images, image_size, crop=True, crop_proportion=EVAL_CROP_PROPORTION,
                        resize_method="bilinear"):
    """Evaluation preprocessing: centre crop, then resize.

    Args:
      images: [B, H, W, C] uint8 or float images (H, W may be dynamic).
      image_size: output side in pixels.
      crop: if True, take the centred square of `crop_proportion` of the shorter side first (the
        original code's box: its side rounded half to even, offsets rounded up); if False (e.g.
        32 px images), resize the whole image.
      crop_proportion: side of the centre crop as a fraction of the shorter image side.
      resize_method: "bilinear" (exact, as the training views are resized) or "bicubic" (the
        original code's evaluation: `tf.image.resize` bicubic, then clipped to [0, 1]).

    Returns:
      float32 [B, image_size, image_size, C] in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    _check_images(images)
    if resize_method not in ("bilinear", "bicubic"):
        raise ValueError(f"resize_method must be bilinear or bicubic, got {resize_method!r}")
    if crop and not 0.0 < crop_proportion <= 1.0:
        raise ValueError(f"crop_proportion must be in (0, 1], got {crop_proportion}")
    if resize_method == "bicubic":
        images = to_float(images)
        if crop:
            top, left, height, width = tf.unstack(
                _centre_square_box(tf.shape(images)[1], tf.shape(images)[2], crop_proportion))
            images = images[:, top:top + height, left:left + width]
        return clip_unit(tf.image.resize(images, [image_size, image_size], method="bicubic"))
    if not crop:
        return resize(images, image_size)
    box = _centre_square_box(tf.shape(images)[1], tf.shape(images)[2], crop_proportion)
    boxes = tf.tile(box[None], tf.stack([_dim(images, 0), 1]))
    return _scale_to_unit(_crop_and_resize(images, boxes, image_size), images.dtype)


# --------------------------------------------------------------------------------------------
# Flip.

def random_flip_left_right(images, seed, p=0.5):
    """Flips each image horizontally with probability p (`apply_flip` of `draw_flip`).

    Args:
      images: [B, H, W, C] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      p: probability that an image is flipped.

    Returns:
      float32 [B, H, W, C] in [0, 1].
    """
    images = to_float(images)
    return apply_flip(images, draw_flip(seed, _dim(images, 0), p))


def draw_flip(seed, batch_size, p=0.5):
    """bool [B]: which images a flip of probability p mirrors."""
    _check_probability("p", p)
    return _uniform(seed, batch_size) < p


def apply_flip(images, flip):
    """Mirrors left-right the images where `flip` [B] (`draw_flip`): float32 in [0, 1]."""
    images = to_float(images)
    _check_images(images)
    width = tf.shape(images)[2]
    columns = tf.range(width)
    # One gather of per-image column orders reads the images once; reverse + select reads twice
    # (and under XLA fuses with the crop's gathers, which then run twice: 1.5x slower views).
    source_columns = tf.where(flip[:, None], (width - 1 - columns)[None], columns[None])
    return tf.gather(images, source_columns, axis=2, batch_dims=1)


# --------------------------------------------------------------------------------------------
# Colour.

# Op indices of the colour jitter. Brightness, contrast and saturation are all the "linear" op
#   clip(a * x + b * luma(x) + c * mean(luma(x)))  with, for a factor f,
#   brightness (a, b, c) = (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0),
# and (1, 0, 0) is the identity, which is what lets one evaluation serve every image's op.
_BRIGHTNESS_OP, _CONTRAST_OP, _SATURATION_OP, _HUE_OP = range(4)
_NUM_JITTER_OPS = 4
_NUM_LINEAR_OPS = 3


def _luma(images):
    """[B, H, W, 1] luma with tf.image.rgb_to_grayscale's weights (0.2989, 0.5870, 0.1140)."""
    return tf.image.rgb_to_grayscale(images)


def to_grayscale(images):
    """Converts RGB images to grayscale (luma), kept as 3 equal channels.

    Args:
      images: [B, H, W, 3] uint8 or float images.

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    return tf.tile(_luma(to_float(images)), [1, 1, 1, 3])


def clip_unit(images):
    return tf.clip_by_value(images, 0.0, 1.0)


def _per_image(values):
    return values[:, None, None, None]


# The colour distortion works on planar images, [B, 3, H, W]: every colour op mixes the three
# channels of a pixel, which with channels innermost (NHWC) are 3 strided floats that the CPU's
# vector units handle one at a time; as planes the same math is whole-vector arithmetic. Under
# XLA the distortion took 1.3 ms per 224-px view in NHWC, and the two transposes cost 0.05 ms.

def _planar(images):
    return tf.transpose(images, [0, 3, 1, 2])


def _interleaved(planes):
    return tf.transpose(planes, [0, 2, 3, 1])


def _planar_luma(planes):
    """[B, 1, H, W] luma of [B, 3, H, W] planes, with `_luma`'s weights."""
    return 0.2989 * planes[:, 0:1] + 0.5870 * planes[:, 1:2] + 0.1140 * planes[:, 2:3]


def _linear_colour_op(planes, factor, luma_weight, mean_luma_weight):
    """clip(factor * x + luma_weight * luma(x) + mean_luma_weight * mean(luma(x))) per image,
    on [B, 3, H, W] planes.

    With the zero weights exactly zero, this equals the single op bit for bit (the zero terms add
    exact zeros), so the identity and brightness leave no rounding behind.
    """
    luma = _planar_luma(planes)
    mean_luma = tf.reduce_mean(luma, axis=[1, 2, 3], keepdims=True)
    # The luma terms are summed on one plane before broadcasting to three.
    offset = _per_image(luma_weight) * luma + _per_image(mean_luma_weight) * mean_luma
    return clip_unit(_per_image(factor) * planes + offset)


def _hue_of(red, green, blue, value, chroma):
    """Hue in [0, 1) of RGB planes, as tf.image.rgb_to_hsv defines it (0 where chroma is 0)."""
    norm = 1.0 / (6.0 * chroma)
    hue = tf.where(tf.equal(green, value), norm * (blue - red) + 2.0 / 6.0,
                   norm * (red - green) + 4.0 / 6.0)
    hue = tf.where(tf.equal(red, value), norm * (green - blue), hue)
    hue = tf.where(chroma > 0.0, hue, 0.0)
    return tf.where(hue < 0.0, hue + 1.0, hue)


def _adjust_hue(planes, delta):
    """Rotates the hue by `delta` (a fraction of the colour circle) per image, on [B, 3, H, W]
    planes.

    The HSV round trip of tf.image.adjust_hue, written out: value (the largest channel) and
    chroma (largest minus smallest) stay; the hue turns, and each channel is rebuilt as
    value * (1 - s + s * d(hue)) with s = chroma / value, tf.image.hsv_to_rgb's formula.
    """
    red, green, blue = planes[:, 0], planes[:, 1], planes[:, 2]
    value = tf.maximum(tf.maximum(red, green), blue)
    chroma = value - tf.minimum(tf.minimum(red, green), blue)
    saturation = tf.where(value > 0.0, chroma / value, 0.0)
    hue = _hue_of(red, green, blue, value, chroma) + delta[:, None, None]
    sextant = 6.0 * (hue - tf.floor(hue))
    weights = (tf.clip_by_value(tf.abs(sextant - 3.0) - 1.0, 0.0, 1.0),
               tf.clip_by_value(2.0 - tf.abs(sextant - 2.0), 0.0, 1.0),
               tf.clip_by_value(2.0 - tf.abs(sextant - 4.0), 0.0, 1.0))
    channels = [(1.0 - saturation + saturation * weight) * value for weight in weights]
    return clip_unit(tf.stack(channels, axis=1))


def _sample_jitter_params(seed, batch_size, strength, random_order):
    """Per-image jitter parameters: factors [B] for brightness/contrast/saturation, hue shift [B]
    and the op order [B, 4] (a permutation of the _*_OP indices)."""
    draws = _uniform(seed, batch_size, 4 + _NUM_JITTER_OPS)
    brightness, contrast, saturation, hue = tf.unstack(draws[:, :4], axis=1)

    def factor(unit, spread):
        return _in_range(unit, max(0.0, 1.0 - spread), 1.0 + spread)

    if random_order:
        # The argsort of i.i.d. keys is a uniformly random permutation.
        order = tf.argsort(draws[:, 4:], axis=1)
    else:
        order = tf.tile(tf.range(_NUM_JITTER_OPS)[None], tf.stack([batch_size, 1]))
    return dict(
        brightness=factor(brightness, _BRIGHTNESS * strength),
        contrast=factor(contrast, _CONTRAST * strength),
        saturation=factor(saturation, _SATURATION * strength),
        hue=_in_range(hue, -_HUE * strength, _HUE * strength),
        order=order)


def _apply_linear_slot(planes, op, active, params):
    """Applies, per image, linear op `op` [B] where `active` [B], else the identity."""
    # Stacked in _*_OP index order, so `op` indexes it directly.
    factors = tf.stack([params["brightness"], params["contrast"], params["saturation"]], axis=1)
    factor = tf.where(active, tf.gather(factors, op, axis=1, batch_dims=1), 1.0)
    luma_weight = tf.where(tf.equal(op, _SATURATION_OP), 1.0 - factor, 0.0)
    mean_luma_weight = tf.where(tf.equal(op, _CONTRAST_OP), 1.0 - factor, 0.0)
    return _linear_colour_op(planes, factor, luma_weight, mean_luma_weight)


def _jitter_with_params(planes, params):
    """Applies the four jitter ops to [B, 3, H, W] planes in each image's own order, vectorised
    over the batch.

    Every image has the hue op exactly once, preceded by k and followed by 3 - k linear ops.
    So the batch runs 3 linear slots (slot j active where j < k), hue once, and 3 linear slots
    (active where j >= k): 6 cheap linear passes and 1 hue pass, instead of every op at every
    stage (16 passes, 4 of them hue; about 4x slower at 32 x 224 x 224 on CPU).
    """
    order = params["order"]
    hue_position = tf.argmax(tf.cast(tf.equal(order, _HUE_OP), tf.int32), axis=1,
                             output_type=tf.int32)
    slots = tf.range(_NUM_LINEAR_OPS)[None]
    after_hue = slots >= hue_position[:, None]
    linear_ops = tf.gather(order, slots + tf.cast(after_hue, tf.int32), axis=1, batch_dims=1)
    for slot in range(_NUM_LINEAR_OPS):
        planes = _apply_linear_slot(planes, linear_ops[:, slot], ~after_hue[:, slot], params)
    planes = _adjust_hue(planes, params["hue"])
    for slot in range(_NUM_LINEAR_OPS):
        planes = _apply_linear_slot(planes, linear_ops[:, slot], after_hue[:, slot], params)
    return planes


def color_jitter(images, seed, strength, random_order=True):
    """Colour jitter of the paper (torchvision ColorJitter semantics) with per-image factors.

    Brightness multiplies by U[max(0, 1 - 0.8s), 1 + 0.8s]; contrast blends with the image's mean
    luma by a factor U[max(0, 1 - 0.8s), 1 + 0.8s]; saturation blends with the per-pixel luma by
    the same range; hue shifts by U[-0.2s, 0.2s] of the colour circle. Values are clipped to
    [0, 1] after each op.

    Args:
      images: [B, H, W, 3] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      strength: the colour-distortion strength s.
      random_order: apply the four ops in a random order drawn per image; if False, in the order
        brightness, contrast, saturation, hue.

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    images = to_float(images)
    _check_rgb(images)
    params = _sample_jitter_params(seed, _dim(images, 0), strength, random_order)
    return _interleaved(_jitter_with_params(_planar(images), params))


def random_color_jitter(images, seed, strength, p_jitter=0.8, p_grayscale=0.2):
    """The paper's colour distortion: jitter with p_jitter, then grayscale with p_grayscale
    (`apply_color` of `draw_color`).

    Args:
      images: [B, H, W, 3] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      strength: the colour-distortion strength s, as in `color_jitter`.
      p_jitter: per-image probability of colour jitter.
      p_grayscale: per-image probability of conversion to grayscale (after the jitter).

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    images = to_float(images)
    return apply_color(images, draw_color(seed, _dim(images, 0), strength, p_jitter,
                                          p_grayscale))


def draw_color(seed, batch_size, strength, p_jitter=0.8, p_grayscale=0.2):
    """The per-image numbers of `random_color_jitter` (same arguments): a dict of [B] tensors
    (the jitter's factors, hue shift and op order [B, 4], and whether to jitter and to gray)."""
    _check_probability("p_jitter", p_jitter)
    _check_probability("p_grayscale", p_grayscale)
    jitter_seed, choice_seed = split_seed(seed, 2)
    jitter_draw, grayscale_draw = tf.unstack(_uniform(choice_seed, batch_size, 2), axis=1)
    return dict(_sample_jitter_params(jitter_seed, batch_size, strength, random_order=True),
                jitter=jitter_draw < p_jitter, grayscale=grayscale_draw < p_grayscale)


def apply_color(images, draws):
    """The colour distortion of `draw_color`'s numbers: float32 [B, H, W, 3] in [0, 1]."""
    images = to_float(images)
    _check_rgb(images)
    planes = _planar(images)
    jittered = _jitter_with_params(planes, draws)
    planes = _select_per_image(draws["jitter"], jittered, planes)
    planes = _select_per_image(draws["grayscale"], _planar_luma(planes), planes)
    return _interleaved(planes)


# --------------------------------------------------------------------------------------------
# Blur.

def _gaussian_kernels(sigma, radius):
    """Normalised 1-D Gaussian kernels, float32 [B, 2 * radius + 1], one per sigma in [B]."""
    offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernels = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma[:, None])))
    return kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)


# Output rows the blur computes per matmul (at least 2r): 32 rows need 32 + 2r input rows (54 at
# 224 px), so each matmul multiplies a band 54 wide instead of the image's whole height, which is
# mostly zeros.
_BLUR_BLOCK = 32


def _band_block(kernels, block):
    """[B, block, block + K - 1]: row t holds image b's kernel [K] at columns t .. t + K - 1, one
    block of rows of the banded blur matrix (every block is the same, as the blur is)."""
    taps = _dim(kernels, 1)
    offsets = tf.range(block + taps - 1)[None, :] - tf.range(block)[:, None]
    in_band = (offsets >= 0) & (offsets < taps)
    band = tf.gather(kernels, tf.clip_by_value(offsets, 0, taps - 1), axis=1)
    return band * tf.cast(in_band, tf.float32)[None]


def _blur_rows(images, kernels):
    """Blurs along axis 1 of [B, H, W, C] with each image's own kernel [B, K], SAME zero padding.

    The zero-padded rows are cut into blocks; output block i is one matmul of the band block with
    input block i followed by the first 2r rows of block i + 1. Slices and a concat, no gather:
    as fast under XLA as without it.
    """
    # Static sizes where known: XLA needs the blocks' shapes at compile time.
    batch, height, width, channels = (_dim(images, axis) for axis in range(4))
    radius = (_dim(kernels, 1) - 1) // 2
    block = (tf.maximum(_BLUR_BLOCK, 2 * radius) if isinstance(radius, tf.Tensor)
             else max(_BLUR_BLOCK, 2 * radius))
    blocks = (height + block - 1) // block
    rows = tf.reshape(images, tf.stack([batch, height, width * channels]))
    # radius zero rows above; below, enough for one more whole block (at least radius rows).
    padding = tf.stack([[0, 0], [radius, (blocks + 1) * block - height - radius], [0, 0]])
    cut = tf.reshape(tf.pad(rows, padding),
                     tf.stack([batch, blocks + 1, block, width * channels]))
    windows = tf.concat([cut[:, :-1], cut[:, 1:, :2 * radius]], axis=2)
    blurred = tf.matmul(_band_block(kernels, block)[:, None], windows)
    blurred = tf.reshape(blurred, tf.stack([batch, blocks * block, width, channels]))
    return blurred[:, :height]


def _blur_with_kernels(images, kernels):
    """Separable blur of each image with its own 1-D kernel, SAME zero padding.

    Each 1-D pass is a batched matmul of blocks of rows with a band of the blur matrix
    (`_blur_rows`): per 224-px view 1.3 ms without XLA and 1.4 with it, against 2.0 and 2.4 for
    the whole banded matrix at once, whose FLOPs are 90% multiplications by zero. A depthwise
    convolution with the batch folded into the channels was no faster without XLA and about 20x
    slower under XLA.

    Args:
      images: float32 [B, H, W, C].
      kernels: float32 [B, K] with K odd.

    Returns:
      float32 [B, H, W, C].
    """
    vertical = _blur_rows(images, kernels)
    horizontal = _blur_rows(tf.transpose(vertical, [0, 2, 1, 3]), kernels)
    return tf.ensure_shape(tf.transpose(horizontal, [0, 2, 1, 3]), images.shape)


def gaussian_blur(images, sigma, radius):
    """Every image blurred by the same separable Gaussian of `sigma` (a float), `2 * radius + 1`
    taps, SAME zero padding; float32 [B, H, W, C] -> the same."""
    batch = tf.shape(images)[0]
    kernels = _gaussian_kernels(tf.fill([batch], tf.constant(sigma, tf.float32)), radius)
    return _blur_with_kernels(images, kernels)


def random_gaussian_blur(images, seed, p=0.5, sigma_range=(0.1, 2.0), selected_only=False):
    """Gaussian blur with a per-image sigma, applied to each image with probability p
    (`apply_blur` of `draw_blur`).

    The kernel spans 10% of the image height: radius = height // 20, size 2 * radius + 1 (images
    under 20 px get a 1-tap kernel, i.e. no blur). As in the original SimCLR, the separable
    convolution pads with zeros (SAME), which darkens a border of `radius` pixels.

    Args:
      images: [B, H, W, 3] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      p: per-image probability of blurring.
      sigma_range: sigma is drawn uniformly from this range, in pixels.
      selected_only: blur only the images drawn for it (gathered, then scattered back), not all
        of them: the same result, about half the work. Their number is known only at run time,
        which XLA cannot compile: only where the blur is not compiled by XLA.

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    images = to_float(images)
    return apply_blur(images, draw_blur(seed, _dim(images, 0), p, sigma_range), selected_only)


def draw_blur(seed, batch_size, p=0.5, sigma_range=(0.1, 2.0)):
    """The per-image numbers of `random_gaussian_blur` (same arguments): a dict of sigma
    (float32 [B]) and selected (bool [B], the images to blur)."""
    _check_probability("p", p)
    sigma_draw, apply_draw = tf.unstack(_uniform(seed, batch_size, 2), axis=1)
    return dict(sigma=_in_range(sigma_draw, *sigma_range), selected=apply_draw < p)


def apply_blur(images, draws, selected_only=False):
    """The blur of `draw_blur`'s numbers (`selected_only` as in `random_gaussian_blur`):
    float32 [B, H, W, 3] in [0, 1]."""
    images = to_float(images)
    _check_images(images)
    kernels = _gaussian_kernels(draws["sigma"], _dim(images, 1) // 20)
    selected = draws["selected"]
    if not selected_only:
        return _select_per_image(selected, clip_unit(_blur_with_kernels(images, kernels)), images)
    chosen = tf.where(selected)
    blurred = clip_unit(_blur_with_kernels(tf.gather_nd(images, chosen),
                                           tf.gather_nd(kernels, chosen)))
    return tf.tensor_scatter_nd_update(images, chosen, blurred)


# --------------------------------------------------------------------------------------------
# The other transforms of the paper's Figure 4 (its augmentation study). The paper does not state
# the cutout size or the noise level; those here are our choices.

CUTOUT_FRACTION = 0.5
NOISE_STDDEV_RANGE = (0.0, 0.1)
# Sobel responses are divided by this so that a sharp black-to-white edge maps to 1.
_SOBEL_SCALE = 4.0


def cutout(images, seed, size_fraction=CUTOUT_FRACTION):
    """Zeroes one square per image, placed uniformly at random fully inside the image
    (`apply_cutout` of `draw_cutout`).

    Args:
      images: [B, H, W, C] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      size_fraction: side of the square as a fraction of the image side (rounded, >= 1 pixel);
        for non-square images the patch is that fraction of each side.

    Returns:
      float32 [B, H, W, C] in [0, 1].
    """
    images = to_float(images)
    return apply_cutout(images, draw_cutout(seed, _dim(images, 0)), size_fraction)


def draw_cutout(seed, batch_size):
    """float32 [B, 2]: where each image's square goes, as fractions of the free rows and columns."""
    return _uniform(seed, batch_size, 2)


def apply_cutout(images, units, size_fraction=CUTOUT_FRACTION):
    """The cutout of `draw_cutout`'s numbers: float32 [B, H, W, C] in [0, 1]."""
    if not 0.0 < size_fraction <= 1.0:
        raise ValueError(f"size_fraction must be in (0, 1], got {size_fraction}")
    images = to_float(images)
    _check_images(images)
    height, width = tf.shape(images)[1], tf.shape(images)[2]

    def side(length):
        return tf.maximum(tf.cast(tf.round(size_fraction * tf.cast(length, tf.float32)),
                                  tf.int32), 1)

    side_h, side_w = side(height), side(width)
    u_top, u_left = tf.unstack(units, axis=1)

    def start(unit, length, patch):
        slots = length - patch + 1
        return tf.minimum(tf.cast(unit * tf.cast(slots, tf.float32), tf.int32), slots - 1)

    top, left = start(u_top, height, side_h), start(u_left, width, side_w)
    rows = tf.range(height)[None]
    cols = tf.range(width)[None]
    in_rows = (rows >= top[:, None]) & (rows < (top + side_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + side_w)[:, None])
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return images * (1.0 - tf.cast(inside, tf.float32))[..., None]


def sobel(images):
    """Sobel edge map: gradient magnitude of the luma, divided by 4, clipped, as 3 channels.

    Borders repeat the edge pixels (not zeros), so a constant image maps to exactly zero.

    Args:
      images: [B, H, W, 3] uint8 or float images.

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    images = to_float(images)
    _check_images(images)
    luma = _luma(images)
    luma = tf.concat([luma[:, :1], luma, luma[:, -1:]], axis=1)
    luma = tf.concat([luma[:, :, :1], luma, luma[:, :, -1:]], axis=2)
    d_dx = tf.constant([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], tf.float32)
    kernels = tf.stack([d_dx, tf.transpose(d_dx)], axis=-1)[:, :, None, :]  # [3, 3, 1, 2]
    gradients = tf.nn.conv2d(luma, kernels, strides=1, padding="VALID")
    magnitude = tf.sqrt(tf.reduce_sum(tf.square(gradients), axis=-1, keepdims=True))
    edges = clip_unit(magnitude / _SOBEL_SCALE)
    return tf.ensure_shape(tf.tile(edges, [1, 1, 1, 3]), images.shape)


def _standard_normal(seed, batch_size, *dims):
    """N(0, 1) draws by Box-Muller from `_uniform`, so they are the same with and without XLA."""
    u_radius, u_angle = tf.unstack(_uniform(seed, batch_size, *dims, 2), axis=-1)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u_radius))  # 1 - u is in (0, 1]
    return radius * tf.cos(2.0 * math.pi * u_angle)


def random_gaussian_noise(images, seed, stddev_range=NOISE_STDDEV_RANGE):
    """Adds i.i.d. Gaussian noise to every pixel and channel, with a sigma drawn per image
    (`apply_noise` of `draw_noise`).

    Args:
      images: [B, H, W, C] uint8 or float images.
      seed: int32/int64 tensor of shape [2].
      stddev_range: sigma is drawn uniformly from this range (in [0, 1] pixel units).

    Returns:
      float32 [B, H, W, C] in [0, 1] (clipped after the noise).
    """
    images = to_float(images)
    _check_images(images)
    shape = tf.shape(images)
    return apply_noise(images, draw_noise(seed, _dim(images, 0), shape[1], shape[2], shape[3],
                                          stddev_range))


def draw_noise(seed, batch_size, height, width, channels, stddev_range=NOISE_STDDEV_RANGE):
    """The numbers of `random_gaussian_noise` (same arguments) for a batch of `batch_size` images
    of height x width x channels: a dict of sigma (float32 [B]) and noise ([B, H, W, C],
    N(0, 1))."""
    if not 0.0 <= stddev_range[0] <= stddev_range[1]:
        raise ValueError(f"stddev_range must satisfy 0 <= low <= high, got {stddev_range}")
    sigma_seed, noise_seed = split_seed(seed, 2)
    return dict(sigma=_in_range(_uniform(sigma_seed, batch_size), *stddev_range),
                noise=_standard_normal(noise_seed, batch_size, height, width, channels))


def apply_noise(images, draws):
    """The noise of `draw_noise`'s numbers, added and clipped: float32 [B, H, W, C] in [0, 1]."""
    images = to_float(images)
    _check_images(images)
    noise = tf.reshape(draws["noise"], tf.shape(images))
    return clip_unit(images + _per_image(draws["sigma"]) * noise)


def rotate90(images, k):
    """Rotates each image counter-clockwise by k[b] x 90 degrees (as `np.rot90`).

    One gather with a per-image index map, so the images are read once whatever their k.

    Args:
      images: [B, S, S, C] square images (any dtype).
      k: int [B] (or a scalar for every image), taken modulo 4.

    Returns:
      [B, S, S, C], the input dtype.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [B, S, S, C], got shape {images.shape}")
    if None not in images.shape[1:3] and images.shape[1] != images.shape[2]:
        raise ValueError(f"rotation needs square images, got shape {images.shape}")
    shape = tf.shape(images)
    size = shape[1]
    i = tf.range(size)[:, None] + tf.zeros([1, size], tf.int32)
    j = tf.transpose(i)
    last = size - 1
    # Source (row, col) of output pixel (i, j) for k = 0, 1, 2, 3.
    sources = tf.stack([i * size + j, j * size + last - i, (last - i) * size + last - j,
                        (last - j) * size + i])
    k = tf.broadcast_to(tf.math.floormod(tf.cast(k, tf.int32), 4), shape[:1])
    maps = tf.reshape(tf.gather(sources, k), tf.stack([shape[0], size * size]))
    flat = tf.reshape(images, tf.stack([shape[0], size * size, shape[3]]))
    return tf.ensure_shape(tf.reshape(tf.gather(flat, maps, batch_dims=1), shape), images.shape)


def random_rotation(images, seed):
    """Rotates each square image by 90, 180 or 270 degrees, drawn uniformly per image
    (`rotate90` by `draw_rotation`'s quarter turns).

    Args:
      images: [B, S, S, C] uint8 or float images.
      seed: int32/int64 tensor of shape [2].

    Returns:
      float32 [B, S, S, C] in [0, 1].
    """
    images = to_float(images)
    return rotate90(images, draw_rotation(seed, _dim(images, 0)))


def draw_rotation(seed, batch_size):
    """int32 [B]: each image's quarter turns, 1, 2 or 3 with equal probability."""
    return 1 + tf.minimum(tf.cast(_uniform(seed, batch_size) * 3.0, tf.int32), 2)
