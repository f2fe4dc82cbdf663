"""The views of the paper's recipe stay what they were: a recorded fixture at 32 and 224 px."""
import os

import numpy as np
import tensorflow as tf

import simclr_tf

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "default_views.npz")
FIXTURE_SEED = tf.constant([20261130, 7], tf.int64)
# (view side, source side, images, blur as the recipe sets it, stride of the recorded samples)
FIXTURE_CASES = ((32, 40, 4, False, 3), (224, 256, 2, True, 16))


def fixture_images(size, source, count):
    rng = np.random.default_rng(size)
    return rng.integers(0, 256, size=(count, source, source + 8, 3), dtype=np.uint8)


def test_default_views_match_the_recorded_ones_at_32_and_224_px():
    """tests/data/default_views.npz holds `two_views` of these images (every 3rd / 16th pixel,
    and per-image channel sums), with oneDNN on, on a 2-core AVX2 EPYC: the 32-px views as commit
    c86c48a made them, the 224-px views re-recorded when the bilinear weights became exact
    (issue 27; they moved by up to 2e-5, as the old float weights were off by up to 1.7e-5).
    Bit-identical there until the colour distortion moved to planar images with the HSV formulas
    written out (issue 27): that moved them by up to 6.6e-7, float rounding. 1e-6 also allows
    another CPU's rounding of the blur's matmuls."""
    recorded = np.load(FIXTURE)
    for size, source, count, blur, stride in FIXTURE_CASES:
        images = tf.constant(fixture_images(size, source, count))
        views = simclr_tf.two_views(images, FIXTURE_SEED, size, use_blur=blur)
        for name, view in zip("ab", views):
            view = view.numpy()
            key = f"v{size}_{name}"
            np.testing.assert_allclose(view[:, ::stride, ::stride], recorded[f"{key}_sample"],
                                       rtol=0, atol=1e-6, err_msg=key)
            np.testing.assert_allclose(view.astype(np.float64).sum(axis=(1, 2)),
                                       recorded[f"{key}_sum"], rtol=1e-6, err_msg=key)


def test_views_with_xla_stages_move_by_float_rounding_only():
    """made_in="device" (a step XLA does not compile, with --augment_on_device) and "host" (the
    training pipeline's fixed-size batches) compile the crop and the colour distortion: the same
    draws up to XLA's rounding (which moves a crop box by a pixel about twice in 120,000, not in
    these views), the image math rounded by XLA's code instead (1.1e-6 here at most on these
    views, 1.4e-6 on others: the hue's HSV round trip divides)."""
    for size, source, count, blur, _ in FIXTURE_CASES:
        images = tf.constant(fixture_images(size, source, count))
        graph = simclr_tf.two_views(images, FIXTURE_SEED, size, use_blur=blur)
        for made_in in ("device", "host"):
            staged = simclr_tf.two_views(images, FIXTURE_SEED, size, use_blur=blur,
                                         made_in=made_in)
            for a, b in zip(graph, staged):
                np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=2e-6,
                                           err_msg=made_in)


def test_the_paper_recipe_is_crop_flip_colour_blur_with_their_own_seeds():
    """The recipe path equals the transforms composed by hand, bit for bit, at 32 and 224 px."""
    from simclr_tf import augment, views

    for size, source, count, blur, _ in FIXTURE_CASES:
        images = tf.constant(fixture_images(size, source, count))
        crop_seed, flip_seed, colour_seed, blur_seed = augment.split_seed(FIXTURE_SEED, 4)
        expected = augment.random_resized_crop(images, crop_seed, size)
        expected = augment.random_flip_left_right(expected, flip_seed)
        expected = augment.random_color_jitter(expected, colour_seed, 1.0)
        if blur:
            expected = augment.random_gaussian_blur(expected, blur_seed)
        expected = tf.clip_by_value(expected, 0.0, 1.0)
        got = views.view(images, FIXTURE_SEED, size, views.paper_recipe(blur))
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
        assert views.paper_recipe(blur) == ("crop", "color") + (("blur",) if blur else ())


def test_colour_strength_zero_leaves_out_the_whole_colour_distortion_as_the_original():
    """The original runs its colour block only `if color_jitter_strength > 0`: no jitter and no
    random grayscale (here they used to run, the jitter as an identity HSV round trip)."""
    from simclr_tf import views

    images = tf.constant(fixture_images(32, 40, 8))
    without = views.view(images, FIXTURE_SEED, 32, ("crop", "color"), color_jitter_strength=0.0)
    crop_only = views.view(images, FIXTURE_SEED, 32, ("crop",))
    np.testing.assert_array_equal(without.numpy(), crop_only.numpy())
    for image in without.numpy():  # no image turned gray
        assert not np.allclose(image[..., 0], image[..., 1])
    weak = views.view(images, FIXTURE_SEED, 32, ("crop", "color"), color_jitter_strength=0.01)
    assert not np.array_equal(weak.numpy(), crop_only.numpy())


def test_views_made_on_the_host_in_chunks_are_the_whole_batchs_views(monkeypatch):
    """made_in="host" makes a 224-px batch 4 images at a time (10 images: chunks of 4, 3 and
    3), each chunk with its rows of the whole batch's draws: the views of the whole batch at once
    ("device": the same XLA stages), up to the rounding of the blur's matmuls, which TensorFlow
    rounds differently for batches of other sizes (3e-8 to 6e-7 seen): within 1e-6. The chunks
    run (counted), a crop after the resize to S draws for S x S images, and every recipe runs in
    chunks, the ablations' transforms (cutout, noise, rotation, Sobel) included."""
    from simclr_tf import views

    chunked_runs = []
    run_in_chunks = views._run_in_chunks

    def counting(images, stages, sizes, *args):
        chunked_runs.append(list(sizes))
        return run_in_chunks(images, stages, sizes, *args)

    monkeypatch.setattr(views, "_run_in_chunks", counting)
    images = tf.constant(fixture_images(224, 256, 10))
    assert views._chunk_sizes(images, 224) == [4, 3, 3]
    assert views._chunk_sizes(images[:4], 224) is None  # one chunk: the whole batch
    assert views._chunk_sizes(images, 32) is None
    cases = ((224, images, views.paper_recipe(True)),
             (128, tf.constant(fixture_images(128, 144, 14)), views.paper_recipe(True)),
             (224, images, ("color", "crop")),  # the crop draws for S x S images
             (224, images, ("crop", "cutout", "noise", "rotate", "color", "sobel")))
    for size, batch, recipe in cases:
        whole = tf.function(lambda x: views.view(x, FIXTURE_SEED, size, recipe,
                                                 made_in="device"))(batch)
        assert not chunked_runs
        chunked = tf.function(lambda x: views.view(x, FIXTURE_SEED, size, recipe,
                                                   made_in="host"))(batch)
        assert chunked_runs == [views._chunk_sizes(batch, size)], (size, recipe)
        chunked_runs.clear()
        np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=0, atol=1e-6,
                                   err_msg=f"{size} {recipe}")


def test_crops_of_varying_sizes_draw_their_boxes_with_one_xla_compile():
    """A folder's images, cropped one at a time on the host (as the pipeline does): their
    boxes are drawn by XLA, compiled once for every image size (the draw reads the height and
    width as values), and inside a graph, where height and width are dynamic, the crop is made
    without XLA; the crops equal the graph's here (XLA rounds the boxes' arithmetic its own way,
    which moves a box by a pixel about twice in 120,000)."""
    from simclr_tf import views

    one_image = tf.TensorSpec([None, None, 3], tf.uint8)
    seed_spec = tf.TensorSpec([2], tf.int64)
    crops = {xla: tf.function(lambda x, s, xla=xla: views.sized_pair(
        x[None], s, 24, made_in="host" if xla else "graph"),
        input_signature=[one_image, seed_spec]) for xla in (False, True)}
    rng = np.random.default_rng(5)
    sizes = ((30, 40), (57, 33), (24, 24), (101, 64))
    images = [tf.constant(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]

    def apply_traces():
        apply = views._compiled.get(("resized_crop", "apply"))
        return 0 if apply is None else apply.experimental_get_tracing_count()

    before = apply_traces()
    for index, image in enumerate(images):
        seed = tf.constant([index, 3], tf.int64)
        for graph, compiled in zip(crops[False](image, seed), crops[True](image, seed)):
            np.testing.assert_array_equal(compiled.numpy(), graph.numpy())
    assert apply_traces() == before  # the compiled crop was not used
    # Eagerly, one compiled draw for every size (each a new shape for a compiled crop).
    draw = views._compiled[("resized_crop", "draw")]
    traces = draw.experimental_get_tracing_count()
    for index, image in enumerate(images):
        views.sized_pair(image[None], tf.constant([index, 3], tf.int64), 24, made_in="host")
    assert traces >= 1 and draw.experimental_get_tracing_count() <= traces + 1


def test_fine_tunings_crop_and_flip_are_the_views_crop_stages():
    """Fine-tuning's augmentation runs the views' "crop" stages (one registry): the same images as
    `augment.random_resized_crop_and_flip`, which folds the flip into the crop's taps: bit for
    bit at a fixed size; for one image of its own size in a graph (dynamic height and width) the
    bilinear arithmetic rounds differently, by one float32 step at 1.0 at most (6e-8 seen)."""
    from simclr_tf import augment, views

    crop_seed, flip_seed = tf.constant([3, 4], tf.int64), tf.constant([5, 6], tf.int64)
    for size, source, count in ((32, 40, 16), (224, 256, 6)):
        images = tf.constant(fixture_images(size, source, count))
        np.testing.assert_array_equal(
            views.crop_and_flip(images, crop_seed, flip_seed, size).numpy(),
            augment.random_resized_crop_and_flip(images, crop_seed, flip_seed, size).numpy())
    one_image = tf.function(lambda x: views.crop_and_flip(x[None], crop_seed, flip_seed, 24),
                            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    image = tf.constant(fixture_images(57, 57, 1)[0, :40])
    np.testing.assert_allclose(
        one_image(image).numpy(),
        augment.random_resized_crop_and_flip(image[None], crop_seed, flip_seed, 24).numpy(),
        rtol=0, atol=1.2e-7)
