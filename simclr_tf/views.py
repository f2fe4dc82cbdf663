"""How a view is made: a recipe is an ordered list of named transforms, looked up in one registry.

`TRANSFORMS` maps each name of the paper's Figure 4 to a transform of `augment`, with the paper's
probabilities where it gives them and always applied otherwise:

    crop    random resized crop (+ resize to S) and horizontal flip with p=0.5
    cutout  one square of zeros, half the image side, placed uniformly inside the image
    color   colour jitter with p=0.8, then grayscale with p=0.2 (strength s; s = 0: neither)
    sobel   Sobel gradient magnitude of the luma (an edge map), as 3 equal channels
    noise   additive Gaussian noise, sigma drawn per image from [0, 0.1]
    blur    Gaussian blur with p=0.5
    rotate  rotation by 90, 180 or 270 degrees, drawn uniformly per image

The paper's recipe (`paper_recipe`) is one such list, "crop,color" plus "blur" on large images;
`--augmentations` names another. `view` runs any recipe, so the paper's views and the ablations'
take one code path. Images enter at their own size when "crop" comes first; otherwise they are
first resized to S, so transforms before "crop" see the S x S image.

Each view's seed is split into the sub-seeds of crop, flip, colour and blur, and of cutout, noise
and rotation (from a fold of it): a transform draws the same numbers whichever other transforms the
recipe lists, so "crop,color,blur" differs from "crop,color" by the blur alone.
"""

import tensorflow as tf

from simclr_tf import augment
from simclr_tf.config import parse_augmentations

_PAPER_SEEDS = ("crop", "flip", "color", "blur")
_STUDY_SEEDS = ("cutout", "noise", "rotate")


def _crop(images, seeds, image_size, strength):
    return _flip(_resized_crop(images, seeds, image_size, strength), seeds, image_size, strength)


def _resized_crop(images, seeds, image_size, strength):
    del strength
    return augment.random_resized_crop(images, seeds["crop"], image_size)


def _flip(images, seeds, image_size, strength):
    # A pass of its own, not folded into the crop's column taps
    # (`augment.random_resized_crop_and_flip`, the same views bit for bit): XLA then keeps the
    # cropped views in memory instead of fusing the crop's gathers into every colour op, and a
    # view compiled whole by XLA (the --jit_compile step with --augment_on_device) ran 8x faster
    # at 32 px; without XLA the extra pass costs nothing measurable.
    del image_size, strength
    return augment.random_flip_left_right(images, seeds["flip"])


def _resize(images, seeds, image_size, strength):
    del seeds, strength
    return augment.resize(tf.convert_to_tensor(images), image_size)


def _color(images, seeds, image_size, strength):
    del image_size
    if strength <= 0:  # as the original's `if color_jitter_strength > 0`: no grayscale either
        return images
    return augment.random_color_jitter(images, seeds["color"], strength)


def _sobel(images, seeds, image_size, strength):
    del seeds, image_size, strength
    return augment.sobel(images)


def _seeded(transform, seed_name):
    def apply(images, seeds, image_size, strength):
        del image_size, strength
        return transform(images, seeds[seed_name])
    return apply


TRANSFORMS = {
    "crop": _crop,
    "cutout": _seeded(augment.cutout, "cutout"),
    "color": _color,
    "sobel": _sobel,
    "noise": _seeded(augment.random_gaussian_noise, "noise"),
    "blur": _seeded(augment.random_gaussian_blur, "blur"),
    "rotate": _seeded(augment.random_rotation, "rotate"),
}


# What runs: the recipe as stages. "crop" is two stages, the crop and the flip, so that the first
# stage (the crop, or the resize to S when the recipe does not start with a crop) is the only one
# that depends on the image's size: `sized_view` runs it alone, `finish_view` the rest.
_STAGES = {"resized_crop": _resized_crop, "flip": _flip, "resize": _resize,
           **{name: fn for name, fn in TRANSFORMS.items() if name != "crop"}}

# Stages `view(..., xla=True)` compiles, each on its own: XLA makes the crop about 2x and the
# colour distortion about 4x faster on CPU. The blur stays uncompiled: XLA's CPU code for its
# matmuls was slower than TensorFlow's kernels. See docs/performance.md.
_XLA_STAGES = ("resized_crop", "flip", "color")
_compiled_stages = {}
_blur_selected_only = _seeded(
    lambda images, seed: augment.random_gaussian_blur(images, seed, selected_only=True), "blur")


def _stage(name, xla, blur_selected_only):
    if name == "blur" and blur_selected_only:
        return _blur_selected_only
    if not (xla and name in _XLA_STAGES):
        return _STAGES[name]
    if name not in _compiled_stages:
        _compiled_stages[name] = tf.function(_STAGES[name], jit_compile=True)
    return _compiled_stages[name]


def _stage_names(names):
    first = () if names[0] == "crop" else ("resize",)
    expanded = (("resized_crop", "flip") if name == "crop" else (name,) for name in names)
    return first + sum(expanded, ())


def paper_recipe(use_blur=True):
    """The paper's views: crop (+ flip), colour distortion, and blur (the paper blurs ImageNet
    views, not CIFAR-10's)."""
    return ("crop", "color", "blur") if use_blur else ("crop", "color")


def _sub_seeds(seed, names):
    seeds = dict(zip(_PAPER_SEEDS, augment.split_seed(seed, len(_PAPER_SEEDS))))
    if any(name in _STUDY_SEEDS for name in names):
        study = augment.split_seed(augment.fold_seed(seed, 1), len(_STUDY_SEEDS))
        seeds.update(zip(_STUDY_SEEDS, study))
    return seeds


def _run_stages(images, seed, image_size, recipe, stages, color_jitter_strength, xla,
                blur_selected_only):
    names = parse_augmentations(recipe)
    seeds = _sub_seeds(seed, names)
    views = images
    for name in _stage_names(names)[stages]:
        views = _stage(name, xla, blur_selected_only)(views, seeds, image_size,
                                                      color_jitter_strength)
    return views


def view(images, seed, image_size, recipe, color_jitter_strength=1.0, xla=False,
         blur_selected_only=False):
    """One view per image, made by the recipe's transforms in order.

    Args:
      images: [B, H, W, 3] uint8 or float images (H, W may be dynamic).
      seed: int32/int64 tensor of shape [2]; the same seed gives the same view.
      image_size: output side S in pixels.
      recipe: names from TRANSFORMS, as a sequence or a comma-separated string.
      color_jitter_strength: the strength s of "color".
      xla: compile the crop, the flip and the colour distortion with XLA, each on its own (faster
        on CPU; the views move by float rounding). Give images of one shape: XLA compiles each
        shape.
      blur_selected_only: blur only the images drawn for it (`augment.random_gaussian_blur`'s
        selected_only): half the work, the same views. For a graph on the CPU (tf.data): XLA
        cannot compile it, and on a GPU its count would stop the step for a copy to the host.

    Returns:
      float32 [B, S, S, 3] in [0, 1].
    """
    return finish_view(sized_view(images, seed, image_size, recipe, xla), seed, image_size,
                       recipe, color_jitter_strength, xla, blur_selected_only)


def sized_view(images, seed, image_size, recipe, xla=False):
    """A view's first stage, the only one that depends on the image's size: the random resized
    crop when the recipe starts with "crop" (without its flip), else the resize to S.

    `finish_view` of its output with the same seed is `view`, bit for bit. Images of varying size
    (folders) are cropped one at a time with this, then batched and finished a batch at a time.

    Returns:
      float32 [B, S, S, 3] in [0, 1].
    """
    return _run_stages(images, seed, image_size, recipe, slice(0, 1), 1.0, xla, False)


def finish_view(sized, seed, image_size, recipe, color_jitter_strength=1.0, xla=False,
                blur_selected_only=False):
    """The rest of `view` after `sized_view` (same seed, recipe and arguments as `view`)."""
    views = _run_stages(sized, seed, image_size, recipe, slice(1, None), color_jitter_strength,
                        xla, blur_selected_only)
    return augment.clip_unit(augment.to_float(views))


def identity_view(images, image_size):
    """The untransformed branch of the asymmetric setting: the whole image resized to S."""
    return augment.clip_unit(augment.resize(tf.convert_to_tensor(images), image_size))


def two_views(images, seed, image_size, color_jitter_strength=1.0, use_blur=True,
              augmentations=None, asymmetric=False, xla=False, blur_selected_only=False):
    """Two independently augmented views of each image (the positive pair).

    Args:
      images: [B, H, W, 3] uint8 or float images (H, W may be dynamic).
      seed: int32/int64 tensor of shape [2]; each view gets its own seed split from it.
      image_size: output side S in pixels.
      color_jitter_strength: the colour-distortion strength s.
      use_blur: the paper's recipe with blur (the paper blurs ImageNet views, not CIFAR-10's).
      augmentations: None for the paper's recipe, else a recipe (names from TRANSFORMS; use_blur
        is then ignored).
      asymmetric: augment view_a only; view_b is the untransformed image resized to S (the
        paper's Figure 5 setting).
      xla, blur_selected_only: as in `view`.

    Returns:
      (view_a, view_b), each float32 [B, S, S, 3] in [0, 1].
    """
    recipe = dict(use_blur=use_blur, augmentations=augmentations, asymmetric=asymmetric, xla=xla)
    sized_a, sized_b = sized_pair(images, seed, image_size, **recipe)
    return finish_pair(sized_a, sized_b, seed, image_size,
                       color_jitter_strength=color_jitter_strength,
                       blur_selected_only=blur_selected_only, **recipe)


def sized_pair(images, seed, image_size, *, use_blur=True, augmentations=None, asymmetric=False,
               xla=False):
    """`sized_view` of both views of `two_views` (with asymmetric, view_b is already whole: the
    image resized to S). `finish_pair` of them with the same seed is `two_views`, bit for bit."""
    seed_a, seed_b = augment.split_seed(seed, 2)
    recipe = _recipe(use_blur, augmentations)
    sized_a = sized_view(images, seed_a, image_size, recipe, xla)
    if asymmetric:
        return sized_a, identity_view(images, image_size)
    return sized_a, sized_view(images, seed_b, image_size, recipe, xla)


def finish_pair(sized_a, sized_b, seed, image_size, *, color_jitter_strength=1.0, use_blur=True,
                augmentations=None, asymmetric=False, xla=False, blur_selected_only=False):
    """The rest of `two_views` after `sized_pair`, batched (arguments as `two_views`)."""
    seed_a, seed_b = augment.split_seed(seed, 2)
    recipe = _recipe(use_blur, augmentations)
    how = dict(xla=xla, blur_selected_only=blur_selected_only)
    view_a = finish_view(sized_a, seed_a, image_size, recipe, color_jitter_strength, **how)
    if asymmetric:
        return view_a, sized_b
    return view_a, finish_view(sized_b, seed_b, image_size, recipe, color_jitter_strength, **how)


def _recipe(use_blur, augmentations):
    return paper_recipe(use_blur) if augmentations is None else augmentations


def train_view(images, seed, image_size, color_jitter_strength=1.0, use_blur=True):
    """One view of the paper's recipe per image (see `view`)."""
    return view(images, seed, image_size, paper_recipe(use_blur), color_jitter_strength)


def preprocess_for_train_single(image, seed, image_size, color_jitter_strength=1.0,
                                use_blur=True):
    """The paper's augmentation of one image: `train_view` on a batch of one.

    Args:
      image: [H, W, 3] uint8 or float image (H, W may be dynamic).
      seed: int32/int64 tensor of shape [2].
      image_size: output side S in pixels.
      color_jitter_strength, use_blur: as in `train_view`.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    return train_view(tf.convert_to_tensor(image)[None], seed, image_size, color_jitter_strength,
                      use_blur)[0]
