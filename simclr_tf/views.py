"""How a view is made: a recipe is an ordered list of named transforms, looked up in one registry.

`TRANSFORMS` maps each name of the paper's Figure 4 to the stages it runs (transforms of
`augment`), with the paper's probabilities where it gives them and always applied otherwise:

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

Every transform is a `Stage` in one registry (`STAGES`): a draw of the batch's random numbers
from the view's seeds, then an apply, and whether XLA compiles it. The paper's recipe, the
ablations' recipes and fine-tuning's crop and flip (`crop_and_flip`) all run through it. Where
the views are made (`made_in`: "graph", "device" or "host") says how they are computed, and leaves
them as they are up to float rounding: see `view`.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from simclr_tf import augment
from simclr_tf.config import parse_augmentations

_PAPER_SEEDS = ("crop", "flip", "color", "blur")
_STUDY_SEEDS = ("cutout", "noise", "rotate")

# Where views are made, which says how they are computed (never what they are):
#   graph   plain TensorFlow ops on the whole batch: anywhere, and inside a step XLA compiles
#           whole (--jit_compile with --augment_on_device, TPUs);
#   device  inside a training step that XLA does not compile (--augment_on_device on a GPU):
#           the stages marked `xla` compiled each on its own, the whole batch at once;
#   host    the CPU input pipeline (tf.data): the `xla` stages compiled, the blur computed for the
#           images drawn for it only (XLA cannot compile its dynamic count), and large batches
#           made a few images at a time, each chunk staying in the CPU's caches between stages.
MADE_IN = ("graph", "device", "host")


class Stage(NamedTuple):
    """One transform as its two steps: `draw` the batch's random numbers from the view's seeds,
    then `apply` them. Split so that a batch can be made a few images at a time with the whole
    batch's draws (`_run_in_chunks`), and a draw compiled by XLA once for images of every size.
    `xla`: compiled by XLA where views are made on a device or the host (about 2x faster crops
    and 4x faster colour on CPU; the blur's matmuls were slower under XLA, docs/performance.md)."""
    draw: Callable  # (shape (B, H, W, C), seeds, image_size, strength) -> a nest of [B, ...]
    apply: Callable  # (images, draws, image_size, strength) -> images
    xla: bool = False

    def __call__(self, images, seeds, image_size, strength):
        return self.apply(images, self.draw(_shape_of(images), seeds, image_size, strength),
                          image_size, strength)


def _shape_of(images):
    """(B, H, W, C) of a batch, all a draw may read: B a Python int where static, H, W and C int32
    scalar tensors (so one XLA compile of a draw serves every image size)."""
    dynamic = tf.shape(images)
    batch = images.shape[0] if images.shape[0] is not None else dynamic[0]
    return batch, dynamic[1], dynamic[2], dynamic[3]


def _colour_off(strength):
    return strength <= 0  # as the original's `if color_jitter_strength > 0`: no grayscale either


def _no_draw(shape, seeds, image_size, strength):
    return {}


def _draw_per_image(draw, seed_name):
    """A stage's draw from `draw(seed, batch_size)` with the view's sub-seed `seed_name`."""
    return lambda shape, seeds, image_size, strength: draw(seeds[seed_name], shape[0])


# Every stage a view can run, by name. "crop" in a recipe is two stages, the crop and the flip.
# The flip is a pass of its own, not folded into the crop's column taps
# (`augment.random_resized_crop_and_flip`, the same views bit for bit): XLA then keeps the cropped
# views in memory instead of fusing the crop's gathers into every colour op, and a view compiled
# whole by XLA (the --jit_compile step with --augment_on_device) ran 8x faster at 32 px; without
# XLA the extra pass costs nothing measurable.
STAGES = {
    "resized_crop": Stage(
        draw=lambda shape, seeds, image_size, strength: augment.draw_crop(seeds["crop"],
                                                                          *shape[:3]),
        apply=lambda images, boxes, image_size, strength: augment.apply_crop(images, boxes,
                                                                             image_size),
        xla=True),
    "flip": Stage(_draw_per_image(augment.draw_flip, "flip"),
                  lambda images, flip, image_size, strength: augment.apply_flip(images, flip),
                  xla=True),
    "resize": Stage(_no_draw, lambda images, draws, image_size, strength: augment.resize(
        tf.convert_to_tensor(images), image_size)),
    "color": Stage(
        draw=lambda shape, seeds, image_size, strength: (
            {} if _colour_off(strength)
            else augment.draw_color(seeds["color"], shape[0], strength)),
        apply=lambda images, draws, image_size, strength: (
            images if _colour_off(strength) else augment.apply_color(images, draws)),
        xla=True),
    "blur": Stage(_draw_per_image(augment.draw_blur, "blur"),
                  lambda images, draws, image_size, strength: augment.apply_blur(images, draws)),
    "cutout": Stage(_draw_per_image(augment.draw_cutout, "cutout"),
                    lambda images, units, image_size, strength: augment.apply_cutout(images,
                                                                                     units)),
    "sobel": Stage(_no_draw, lambda images, draws, image_size, strength: augment.sobel(images)),
    "noise": Stage(
        draw=lambda shape, seeds, image_size, strength: augment.draw_noise(seeds["noise"],
                                                                           *shape),
        apply=lambda images, draws, image_size, strength: augment.apply_noise(images, draws)),
    "rotate": Stage(_draw_per_image(augment.draw_rotation, "rotate"),
                    lambda images, k, image_size, strength: augment.rotate90(
                        augment.to_float(images), k)),
}
# The host's blur: only the images drawn for it (the same views, half the work).
_BLUR_SELECTED_ONLY = STAGES["blur"]._replace(
    apply=lambda images, draws, image_size, strength: augment.apply_blur(images, draws,
                                                                         selected_only=True))

# The transforms a recipe names (the paper's Figure 4), as the stages they run.
TRANSFORMS = {
    "crop": ("resized_crop", "flip"),
    "cutout": ("cutout",),
    "color": ("color",),
    "sobel": ("sobel",),
    "noise": ("noise",),
    "blur": ("blur",),
    "rotate": ("rotate",),
}
_compiled = {}


def _compiled_once(key, fn):
    if key not in _compiled:
        _compiled[key] = tf.function(fn, jit_compile=True)
    return _compiled[key]


def _stage(name, made_in):
    """Stage `name` as it runs where views are `made_in`."""
    if made_in not in MADE_IN:
        raise ValueError(f"made_in must be one of {MADE_IN}, got {made_in!r}")
    stage = _BLUR_SELECTED_ONLY if name == "blur" and made_in == "host" else STAGES[name]
    if made_in == "graph" or not stage.xla:
        return stage
    return stage._replace(draw=_compiled_draw(name, stage.draw),
                          apply=_compiled_apply(name, stage.apply))


def _compiled_draw(name, draw):
    compiled = _compiled_once((name, "draw"), draw)

    def run(shape, *args):  # XLA needs the batch size at compile time
        return compiled(shape, *args) if isinstance(shape[0], int) else draw(shape, *args)
    return run


def _compiled_apply(name, apply):
    compiled = _compiled_once((name, "apply"), apply)

    def run(images, *args):
        # Images of dynamic height and width (a folder's, cropped one at a time) are applied
        # without XLA, which would compile again for every size; their draws are compiled.
        return compiled(images, *args) if images.shape[1:3].is_fully_defined() else apply(
            images, *args)
    return run


# Images per chunk (made_in="host"): views of about 2.5 MB (4 at 224 px) stay in this CPU's
# caches (1 MB of L2 per core, 32 MB of L3) from one stage to the next, where a batch of 32 such
# views (19 MB a copy) goes to memory and back between stages. See docs/performance.md.
_CHUNK_BYTES = 2_500_000


def _chunk_sizes(images, image_size):
    """Images per chunk, or None where the whole batch fits in one chunk or its size is dynamic.

    As few chunks as fit the budget, their sizes differing by at most one (every size is an XLA
    compile of each stage): 32 views at 224 px are 8 chunks of 4, 10 are 4, 3 and 3."""
    most = max(1, _CHUNK_BYTES // (image_size * image_size * 3 * 4))
    batch = images.shape[0]
    if batch is None or batch <= most:
        return None
    count = -(-batch // most)
    return [batch // count + (1 if index < batch % count else 0) for index in range(count)]


def _run_in_chunks(images, stages, sizes, seeds, image_size, strength):
    """Runs `stages` on chunks of `sizes` images, one chunk after the other.

    Every stage draws for the whole batch (its batch size, and its input's height, width and
    channels, read from the first chunk), and each chunk takes its rows of the draws: the views
    are those of the whole batch at once.
    """
    batch = images.shape[0]
    draws = [None] * len(stages)
    chunks = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        chunk = images[rows]
        if chunks:  # Not before the previous chunk is done, which keeps the cache to one chunk.
            with tf.control_dependencies([chunks[-1]]):
                chunk = tf.identity(chunk)
        for index, stage in enumerate(stages):
            if draws[index] is None:
                draws[index] = stage.draw((batch, *_shape_of(chunk)[1:]), seeds, image_size,
                                          strength)
            chunk = stage.apply(chunk, tf.nest.map_structure(lambda d: d[rows], draws[index]),
                                image_size, strength)
        chunks.append(chunk)
        start += size
    return tf.concat(chunks, axis=0)


def _stage_names(names):
    first = () if names[0] == "crop" else ("resize",)
    return first + sum((TRANSFORMS[name] for name in names), ())


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


def _run_stages(images, seeds, image_size, stage_names, color_jitter_strength, made_in):
    run = [_stage(name, made_in) for name in stage_names]
    sizes = _chunk_sizes(images, image_size) if made_in == "host" else None
    if sizes is not None:
        return _run_in_chunks(images, run, sizes, seeds, image_size, color_jitter_strength)
    views = images
    for stage in run:
        views = stage(views, seeds, image_size, color_jitter_strength)
    return views


def _recipe_stages(seed, recipe, stages):
    names = parse_augmentations(recipe)
    return _sub_seeds(seed, names), _stage_names(names)[stages]


def view(images, seed, image_size, recipe, color_jitter_strength=1.0, made_in="graph"):
    """One view per image, made by the recipe's transforms in order.

    Args:
      images: [B, H, W, 3] uint8 or float images (H, W may be dynamic).
      seed: int32/int64 tensor of shape [2]; the same seed gives the same view.
      image_size: output side S in pixels.
      recipe: names from TRANSFORMS, as a sequence or a comma-separated string.
      color_jitter_strength: the strength s of "color".
      made_in: where the views are made (`MADE_IN`), which says how they are computed; the views
        are the same up to float rounding:
        - "device" and "host" compile the crop, the flip and the colour distortion with XLA,
          each on its own. Give images of one shape: XLA compiles each shape. The random draws
          are compiled too (once for every image size): XLA's fused multiply-adds round some of
          their numbers differently, and a crop box, rarely (2 in 120,000 here), comes out a
          pixel wider or taller than the graph's. Images whose height and width are dynamic (in
          a graph) are cropped without XLA, their boxes drawn with it; with a dynamic batch size
          the draws run without XLA.
        - "host" also blurs only the images drawn for it (half the work; its count is dynamic,
          which XLA cannot compile and which on a GPU would stop the step for a copy to the
          host), and makes a batch with a static size a few images at a time (about 2.5 MB of
          views, 4 at 224 px), each chunk through every stage before the next, with the whole
          batch's draws: about 1.3x faster at 224 px on a CPU, whose caches then hold the chunk
          between stages (the blur's matmuls round differently with the number of images
          blurred at once, under 1e-6).

    Returns:
      float32 [B, S, S, 3] in [0, 1].
    """
    seeds, stages = _recipe_stages(seed, recipe, slice(None))
    views = _run_stages(images, seeds, image_size, stages, color_jitter_strength, made_in)
    return augment.clip_unit(augment.to_float(views))


def sized_view(images, seed, image_size, recipe, made_in="graph"):
    """A view's first stage, the only one that depends on the image's size: the random resized
    crop when the recipe starts with "crop" (without its flip), else the resize to S.

    `finish_view` of its output with the same seed is `view`, bit for bit. Images of varying size
    (folders) are cropped one at a time with this, then batched and finished a batch at a time;
    made on the host or a device their boxes are drawn by XLA (one compile for every size), the
    crop made without.

    Returns:
      float32 [B, S, S, 3] in [0, 1].
    """
    seeds, stages = _recipe_stages(seed, recipe, slice(0, 1))
    return _run_stages(images, seeds, image_size, stages, 1.0, made_in)


def finish_view(sized, seed, image_size, recipe, color_jitter_strength=1.0, made_in="graph"):
    """The rest of `view` after `sized_view` (same seed, recipe and arguments as `view`)."""
    seeds, stages = _recipe_stages(seed, recipe, slice(1, None))
    views = _run_stages(sized, seeds, image_size, stages, color_jitter_strength, made_in)
    return augment.clip_unit(augment.to_float(views))


def crop_and_flip(images, crop_seed, flip_seed, image_size, made_in="graph"):
    """Fine-tuning's and linear evaluation's augmentation (the paper's): a random resized crop
    to S and a horizontal flip with p=0.5, the "crop" stages of a view with these seeds; the same
    as `augment.random_resized_crop_and_flip`, bit for bit.

    Returns:
      float32 [B, S, S, C] in [0, 1].
    """
    seeds = {"crop": crop_seed, "flip": flip_seed}
    views = _run_stages(images, seeds, image_size, TRANSFORMS["crop"], 1.0, made_in)
    return augment.clip_unit(augment.to_float(views))


def identity_view(images, image_size):
    """The untransformed branch of the asymmetric setting: the whole image resized to S."""
    return augment.clip_unit(augment.resize(tf.convert_to_tensor(images), image_size))


def two_views(images, seed, image_size, color_jitter_strength=1.0, use_blur=True,
              augmentations=None, asymmetric=False, made_in="graph"):
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
      made_in: as in `view`.

    Returns:
      (view_a, view_b), each float32 [B, S, S, 3] in [0, 1].
    """
    seed_a, seed_b = augment.split_seed(seed, 2)
    recipe = _recipe(use_blur, augmentations)
    view_a = view(images, seed_a, image_size, recipe, color_jitter_strength, made_in)
    if asymmetric:
        return view_a, identity_view(images, image_size)
    return view_a, view(images, seed_b, image_size, recipe, color_jitter_strength, made_in)


def sized_pair(images, seed, image_size, *, use_blur=True, augmentations=None, asymmetric=False,
               made_in="graph"):
    """`sized_view` of both views of `two_views` (with asymmetric, view_b is already whole: the
    image resized to S). `finish_pair` of them with the same seed is `two_views`, bit for bit."""
    seed_a, seed_b = augment.split_seed(seed, 2)
    recipe = _recipe(use_blur, augmentations)
    sized_a = sized_view(images, seed_a, image_size, recipe, made_in)
    if asymmetric:
        return sized_a, identity_view(images, image_size)
    return sized_a, sized_view(images, seed_b, image_size, recipe, made_in)


def finish_pair(sized_a, sized_b, seed, image_size, *, color_jitter_strength=1.0, use_blur=True,
                augmentations=None, asymmetric=False, made_in="graph"):
    """The rest of `two_views` after `sized_pair`, batched (arguments as `two_views`)."""
    seed_a, seed_b = augment.split_seed(seed, 2)
    recipe = _recipe(use_blur, augmentations)
    view_a = finish_view(sized_a, seed_a, image_size, recipe, color_jitter_strength, made_in)
    if asymmetric:
        return view_a, sized_b
    return view_a, finish_view(sized_b, seed_b, image_size, recipe, color_jitter_strength,
                               made_in)


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
