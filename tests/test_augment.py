"""Tests for simclr_tf.augment: shapes and reproducibility, each transform against numpy (or an
independent TensorFlow kernel), and the paper's views (`views`) inside tf.data and under XLA."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import augment, views

SEED = tf.constant([7, 11], tf.int32)
LUMA_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


def random_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def random_unit(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def assert_unit_range(images):
    images = np.asarray(images)
    assert images.min() >= 0.0 and images.max() <= 1.0


# --------------------------------------------------------------------------------------------
# Dtypes, shapes, seeds.

def test_to_float_scales_uint8_and_casts_floats():
    pixels = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_allclose(augment.to_float(pixels), pixels / 255.0, atol=1e-7)
    converted = augment.to_float(np.array([0.25], np.float64))
    assert converted.dtype == tf.float32 and float(converted[0]) == 0.25
    with pytest.raises(ValueError, match="uint8 or float"):
        augment.to_float(np.array([1], np.int32))


@pytest.mark.parametrize("make_images", [random_uint8, random_unit], ids=["uint8", "float32"])
@pytest.mark.parametrize("options", [dict(), dict(augmentations="color")],
                         ids=["all", "colour_only"])
def test_two_views_shape_dtype_range(make_images, options):
    images = make_images([3, 40, 48, 3])
    view_a, view_b = views.two_views(images, SEED, 24, **options)
    for view in (view_a, view_b):
        assert view.shape == (3, 24, 24, 3) and view.dtype == tf.float32
        assert_unit_range(view)


def test_dynamic_height_width_give_static_output_shape():
    spec = tf.TensorSpec([1, None, None, 3], tf.uint8)

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def views_and_eval(images, seed):
        view_a, view_b = views.two_views(images, seed, 16)
        return view_a, view_b, augment.preprocess_for_eval(images, 16)

    for output in views_and_eval.get_concrete_function().structured_outputs:
        assert output.shape == (1, 16, 16, 3)
    for height, width in [(37, 53), (64, 20)]:
        for output in views_and_eval(random_uint8([1, height, width, 3]), SEED):
            assert output.shape == (1, 16, 16, 3)
            assert_unit_range(output)


def test_preprocess_for_train_single_is_train_view_on_a_batch_of_one():
    image = random_uint8([30, 26, 3])
    single = views.preprocess_for_train_single(image, SEED, 20, use_blur=False)
    batched = views.train_view(image[None], SEED, 20, use_blur=False)
    assert single.shape == (20, 20, 3)
    np.testing.assert_array_equal(single, batched[0])


def test_seed_reproduces_views_and_views_differ():
    images = random_uint8([4, 32, 32, 3])
    first = views.two_views(images, SEED, 32)
    again = views.two_views(images, tf.constant([7, 11], tf.int64), 32)
    other = views.two_views(images, tf.constant([7, 12]), 32)
    for view, same in zip(first, again):
        np.testing.assert_array_equal(view, same)
    assert not np.allclose(first[0], other[0])
    assert not np.allclose(first[0], first[1])
    # Each image in the batch gets its own randomness, not one draw for the whole batch.
    identical = np.repeat(images[:1], 4, axis=0)
    view = views.train_view(identical, SEED, 32).numpy()
    assert not np.allclose(view[0], view[1])


def test_bad_arguments_raise():
    images = random_uint8([2, 8, 8, 3])
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        views.train_view(images, tf.constant([1, 2, 3]), 8)
    with pytest.raises(ValueError, match="area_range"):
        augment.random_resized_crop(images, SEED, 8, area_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="min_object_covered"):
        augment.random_resized_crop(images, SEED, 8, min_object_covered=1.5)
    with pytest.raises(ValueError, match="p must be in"):
        augment.random_flip_left_right(images, SEED, p=1.5)
    with pytest.raises(ValueError, match="\\[B, H, W, C\\]"):
        augment.random_resized_crop(images[0], SEED, 8)
    with pytest.raises(ValueError, match="RGB images"):  # the colour ops mix 3 channels
        augment.random_color_jitter(random_uint8([2, 8, 8, 4]), SEED, 1.0)


# --------------------------------------------------------------------------------------------
# Random resized crop.

def reference_crop_boxes(height, width, count):
    """The original SimCLR code's boxes: TF's own sampler, one image at a time (min_object_covered
    0.1, area 0.08-1, aspect 3/4-4/3, 100 attempts), as int [count, 4] (top, left, h, w)."""
    boxes = []
    for i in range(count):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=[i, 7],
            min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=100)
        boxes.append([begin[0], begin[1], size[0], size[1]])
    return np.array(boxes)


@pytest.mark.parametrize("height, width", [(512, 512), (300, 500)])
def test_crop_boxes_fit_and_follow_the_original_codes_distribution(height, width):
    boxes = augment._sample_crop_boxes(SEED, 8192, height, width, (0.08, 1.0), (3 / 4, 4 / 3),
                                       100, 0.1).numpy()
    top, left, crop_h, crop_w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    fraction = crop_h * crop_w / (height * width)
    aspect = crop_w / crop_h
    # Rounding the sides to whole pixels moves the aspect ratio by well under 1% at this size.
    assert fraction.min() >= 0.1 and fraction.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
    reference = reference_crop_boxes(height, width, 2000)
    ref_fraction = reference[:, 2] * reference[:, 3] / (height * width)
    # Its area is far from uniform in [0.08, 1] (mean 0.54): about 0.42 for a square image.
    for q in (0.1, 0.5, 0.9):  # each within ~3 standard errors of the reference's quantile
        assert abs(np.quantile(fraction, q) - np.quantile(ref_fraction, q)) < 0.025, q
    assert abs(aspect.mean() - (reference[:, 3] / reference[:, 2]).mean()) < 0.01
    # Placement is uniform over the free range: its relative position averages 1/2.
    free = height - crop_h
    relative_top = top[free > 0] / free[free > 0]
    assert abs(relative_top.mean() - 0.5) < 0.03


@pytest.mark.parametrize("height, width", [(32, 32), (20, 40), (40, 20)])
def test_crop_falls_back_to_the_whole_image_when_nothing_fits(height, width):
    boxes = augment._sample_crop_boxes(SEED, 5, height, width, (2.0, 2.0), (3 / 4, 4 / 3), 10,
                                       0.1)
    np.testing.assert_array_equal(boxes, np.tile([0, 0, height, width], [5, 1]))


def test_impossible_crop_resizes_the_whole_image():
    images = random_uint8([2, 24, 24, 3])
    cropped = augment.random_resized_crop(images, SEED, 16, area_range=(2.0, 2.0))
    reference = tf.image.resize(images, [16, 16]) / 255.0
    np.testing.assert_allclose(cropped, reference, atol=1e-5)


def test_crop_and_resize_matches_tf_image_resize_of_the_crop():
    images = random_uint8([4, 30, 40, 3])
    boxes = np.array([[0, 0, 30, 40], [3, 5, 10, 7], [10, 2, 20, 38], [29, 39, 1, 1]], np.int32)
    resized = augment._crop_and_resize(images, boxes, 16).numpy()
    for image, (top, left, height, width), output in zip(images, boxes, resized):
        crop = image[top:top + height, left:left + width]
        np.testing.assert_allclose(output, tf.image.resize(crop, [16, 16]), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Flip.

def test_flip_with_p_one_and_zero():
    images = random_unit([3, 8, 10, 3])
    np.testing.assert_array_equal(augment.random_flip_left_right(images, SEED, p=1.0),
                                  tf.image.flip_left_right(images))
    np.testing.assert_array_equal(augment.random_flip_left_right(images, SEED, p=0.0), images)


def test_flip_chooses_per_image():
    images = random_unit([64, 4, 6, 3])
    flipped = augment.random_flip_left_right(images, SEED).numpy()
    was_flipped = [np.array_equal(out, image[:, ::-1]) for out, image in zip(flipped, images)]
    unchanged = [np.array_equal(out, image) for out, image in zip(flipped, images)]
    assert all(f or u for f, u in zip(was_flipped, unchanged))
    assert 16 <= sum(was_flipped) <= 48


# --------------------------------------------------------------------------------------------
# Colour.

def numpy_luma(image):
    return image @ LUMA_WEIGHTS


def numpy_jitter_op(op, image, params, index):
    """One jitter op on one image, torchvision semantics; hue through tf.image.adjust_hue."""
    if op == augment._BRIGHTNESS_OP:
        out = image * params["brightness"][index]
    elif op == augment._CONTRAST_OP:
        factor = params["contrast"][index]
        out = factor * image + (1 - factor) * numpy_luma(image).mean()
    elif op == augment._SATURATION_OP:
        factor = params["saturation"][index]
        out = factor * image + (1 - factor) * numpy_luma(image)[..., None]
    else:
        out = tf.image.adjust_hue(image.astype(np.float32), params["hue"][index]).numpy()
    return np.clip(out, 0.0, 1.0)


@pytest.mark.parametrize("random_order", [True, False])
def test_color_jitter_matches_per_image_numpy_reference(random_order):
    images = random_unit([12, 6, 5, 3], seed=1)
    params = {key: value.numpy() for key, value in
              augment._sample_jitter_params(SEED, 12, 1.0, random_order).items()}
    if not random_order:
        np.testing.assert_array_equal(params["order"], np.tile(np.arange(4), [12, 1]))
    jittered = augment.color_jitter(images, SEED, 1.0, random_order=random_order)
    for index, image in enumerate(images.astype(np.float64)):
        for op in params["order"][index]:
            image = numpy_jitter_op(op, image, params, index)
        np.testing.assert_allclose(jittered[index], image, atol=2e-5)


def test_hue_on_planes_is_tf_image_adjust_hue_up_to_float_rounding():
    """The jitter turns the hue on [B, 3, H, W] planes with the HSV formulas written out; per image
    it stays within 1e-6 of tf.image.adjust_hue (8.9e-7 here), gray pixels and ties included."""
    images = random_unit([16, 9, 7, 3], seed=4).astype(np.float32)
    images[0] = images[0, ..., :1]  # gray: no hue
    images[1, ..., 2] = images[1, ..., 1]  # two channels tied for the largest or smallest
    images[2, 0, 0] = 0.0  # black
    delta = np.random.default_rng(5).uniform(-0.5, 0.5, 16).astype(np.float32)
    turned = augment._interleaved(augment._adjust_hue(augment._planar(images), delta)).numpy()
    for image, shift, got in zip(images, delta, turned):
        np.testing.assert_allclose(got, tf.image.adjust_hue(image, shift), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(turned[0], images[0])


def test_jitter_factors_follow_the_strength():
    params = augment._sample_jitter_params(SEED, 2000, 0.5, True)
    for key in ("brightness", "contrast", "saturation"):
        assert 0.6 <= params[key].numpy().min() < 0.62
        assert 1.38 < params[key].numpy().max() <= 1.4
    assert -0.1 <= params["hue"].numpy().min() < -0.09 and 0.09 < params["hue"].numpy().max() <= 0.1
    strong = augment._sample_jitter_params(SEED, 2000, 1.5, True)
    assert 0.0 <= strong["brightness"].numpy().min() < 0.05  # lower bound max(0, 1 - 0.8 s)


def test_op_order_is_a_uniform_random_permutation():
    order = augment._sample_jitter_params(SEED, 2400, 1.0, True)["order"].numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in order:
        counts[tuple(row)] += 1
    assert min(counts.values()) > 60 and max(counts.values()) < 140  # 100 expected


@pytest.mark.parametrize("random_order", [True, False])
def test_color_jitter_with_strength_zero_is_identity(random_order):
    images = random_unit([5, 7, 7, 3])
    jittered = augment.color_jitter(images, SEED, 0.0, random_order=random_order)
    np.testing.assert_allclose(jittered, images, atol=1e-5)


def test_color_jitter_stays_in_unit_range():
    images = random_unit([8, 9, 9, 3])
    images[:, :3] = 0.0
    images[:, -3:] = 1.0
    assert_unit_range(augment.color_jitter(images, SEED, 1.5))
    assert_unit_range(augment.random_color_jitter(random_uint8([8, 9, 9, 3]), SEED, 1.0))


def test_grayscale_is_luma_on_three_equal_channels():
    images = random_uint8([2, 5, 6, 3])
    gray = augment.to_grayscale(images).numpy()
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_allclose(gray[..., 0], numpy_luma(images / 255.0), atol=1e-6)


def test_random_color_jitter_probabilities():
    images = random_unit([6, 5, 5, 3])
    untouched = augment.random_color_jitter(images, SEED, 1.0, p_jitter=0.0, p_grayscale=0.0)
    np.testing.assert_array_equal(untouched, images)
    gray = augment.random_color_jitter(images, SEED, 1.0, p_jitter=0.0, p_grayscale=1.0)
    np.testing.assert_allclose(gray, augment.to_grayscale(images), atol=1e-7)
    jittered = augment.random_color_jitter(images, SEED, 1.0, p_jitter=1.0, p_grayscale=0.0)
    assert not np.allclose(jittered, images)


# --------------------------------------------------------------------------------------------
# Blur.

def numpy_gaussian(sigma, radius):
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def test_gaussian_kernels_match_numpy():
    sigmas = np.array([0.1, 0.7, 2.0], np.float32)
    kernels = augment._gaussian_kernels(tf.constant(sigmas), 4).numpy()
    for sigma, kernel in zip(sigmas, kernels):
        np.testing.assert_allclose(kernel, numpy_gaussian(float(sigma), 4), atol=1e-6)


def _numpy_blur(images, kernels):
    """Separable blur with SAME zero padding, in float64, one image at a time."""
    out = np.zeros(images.shape, np.float64)
    for b, (image, kernel) in enumerate(zip(images.astype(np.float64), kernels)):
        radius = len(kernel) // 2
        padded = np.pad(image, [(radius, radius), (radius, radius), (0, 0)])
        rows = sum(k * padded[i:i + image.shape[0]] for i, k in enumerate(kernel))
        out[b] = sum(k * rows[:, i:i + image.shape[1]] for i, k in enumerate(kernel))
    return out


@pytest.mark.parametrize("height,width,radius", [(70, 45, 3), (37, 90, 20)],
                         ids=["three_blocks", "block_grows_to_2r"])
def test_blocked_blur_equals_the_direct_sum_across_blocks(height, width, radius):
    """The blur works in blocks of 32 rows (or 2r when larger); every block boundary and the
    zero padding at both ends must give the direct separable sum."""
    images = np.random.default_rng(1).uniform(size=(2, height, width, 3)).astype(np.float32)
    sigmas = np.array([0.7, 1.9], np.float32)
    kernels = augment._gaussian_kernels(tf.constant(sigmas), radius)
    blurred = augment._blur_with_kernels(tf.constant(images), kernels).numpy()
    np.testing.assert_allclose(blurred, _numpy_blur(images, kernels.numpy()), atol=2e-6)


def test_blur_of_a_delta_is_the_normalised_gaussian():
    delta = np.zeros([2, 15, 15, 3], np.float32)
    delta[:, 7, 7, :] = 1.0
    sigmas = np.array([0.8, 1.6], np.float32)
    blurred = augment._blur_with_kernels(delta, augment._gaussian_kernels(sigmas, 3)).numpy()
    for sigma, image in zip(sigmas, blurred):
        kernel = numpy_gaussian(float(sigma), 3)
        expected = np.zeros([15, 15])
        expected[4:11, 4:11] = np.outer(kernel, kernel)
        for channel in range(3):
            np.testing.assert_allclose(image[..., channel], expected, atol=1e-6)
        assert abs(image.sum() / 3 - 1.0) < 1e-5


def test_blur_is_a_zero_padded_separable_convolution():
    images = random_unit([2, 12, 10, 3])
    sigmas = np.array([0.5, 1.5], np.float32)
    blurred = augment._blur_with_kernels(images, augment._gaussian_kernels(sigmas, 2)).numpy()
    for image, sigma, output in zip(images, sigmas, blurred):
        kernel = numpy_gaussian(float(sigma), 2)
        rows = np.apply_along_axis(np.convolve, 0, image, kernel, mode="same")
        expected = np.apply_along_axis(np.convolve, 1, rows, kernel, mode="same")
        np.testing.assert_allclose(output, expected, atol=1e-5)


def test_random_blur_keeps_a_constant_interior_and_darkens_the_border():
    constant = np.full([4, 64, 64, 3], 0.5, np.float32)
    blurred = augment.random_gaussian_blur(constant, SEED, p=1.0).numpy()
    radius = 64 // 20
    np.testing.assert_allclose(blurred[:, radius:-radius, radius:-radius], 0.5, atol=1e-5)
    assert (blurred[:, 0, 0] < 0.5).all()  # zero (SAME) padding, as the original SimCLR


def test_random_blur_probabilities():
    images = random_unit([6, 40, 40, 3])
    np.testing.assert_array_equal(augment.random_gaussian_blur(images, SEED, p=0.0), images)
    assert not np.allclose(augment.random_gaussian_blur(images, SEED, p=1.0), images)


# --------------------------------------------------------------------------------------------
# Evaluation preprocessing.

def test_preprocess_for_eval_centre_crop_matches_numpy_and_resize():
    images = random_uint8([2, 40, 50, 3])
    side = int(round(0.875 * 40))  # 35
    top, left = (40 - side + 1) // 2, (50 - side + 1) // 2
    crop = images[:, top:top + side, left:left + side]
    expected = tf.image.resize(crop, [24, 24]) / 255.0
    np.testing.assert_allclose(augment.preprocess_for_eval(images, 24), expected, atol=1e-5)


def test_preprocess_for_eval_without_crop_only_resizes():
    images = random_unit([2, 32, 32, 3])
    np.testing.assert_allclose(augment.preprocess_for_eval(images, 32, crop=False), images,
                               atol=1e-6)
    np.testing.assert_allclose(augment.preprocess_for_eval(images, 20, crop=False),
                               tf.image.resize(images, [20, 20]), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Inside tf.data and XLA.

def test_two_views_inside_tf_data_map():
    images = random_uint8([6, 32, 32, 3])

    def augment_batch(index, batch):
        return views.two_views(batch, tf.random.experimental.stateless_fold_in(SEED, index), 32)

    # A remainder batch keeps the batch dimension dynamic inside the map.
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(4).enumerate().map(augment_batch)
    batches = list(dataset)
    assert [view_a.shape[0] for view_a, _ in batches] == [4, 2]
    for index, (view_a, view_b) in enumerate(batches):
        batch = images[4 * index:4 * index + 4]
        seed = tf.random.experimental.stateless_fold_in(SEED, tf.constant(index, tf.int64))
        eager = views.two_views(batch, seed, 32)
        np.testing.assert_allclose(view_a, eager[0], atol=1e-6)
        np.testing.assert_allclose(view_b, eager[1], atol=1e-6)


def test_two_views_compiles_with_xla_and_matches_the_graph_version():
    images = random_unit([4, 32, 32, 3])  # blur on: radius 32 // 20 = 1

    def two_views(images, seed):
        return views.two_views(images, seed, 32)

    # jit_compile=True raises if any op has no XLA kernel, so this call is the compile check.
    compiled = tf.function(two_views, jit_compile=True)(images, SEED)
    graph = tf.function(two_views)(images, SEED)
    # The random draws are bit-identical (uniforms are built from integer bits); XLA fuses and
    # reorders the float arithmetic, so the views agree to float rounding, not bit for bit.
    for xla_view, graph_view in zip(compiled, graph):
        assert xla_view.shape == (4, 32, 32, 3)
        assert_unit_range(xla_view)
        np.testing.assert_allclose(xla_view, graph_view, atol=1e-5)


def test_bilinear_weights_are_the_exact_fractions_rounded_once():
    """Output pixel i of a resize from L to S pixels samples ((2i + 1) L - S) / (2 S): whole part
    and weight from integers, so the weights are the exact fractions rounded once to float32 (and
    within one float32 ulp under XLA, which divides by a constant through its reciprocal; the
    old float formula, contracted into FMAs there, moved the weights by up to 1.7e-5)."""
    for size in (32, 96, 224):
        lengths = tf.range(8, 257)
        starts = tf.zeros_like(lengths)
        low, high, weight = augment._bilinear_taps(starts, lengths, size)
        i = np.arange(size)[None]
        position = ((2 * i + 1) * np.arange(8, 257)[:, None] - size) / (2 * size)
        expected_low = np.clip(np.floor(position), 0, np.arange(8, 257)[:, None] - 1)
        np.testing.assert_array_equal(low.numpy(), expected_low)
        np.testing.assert_array_equal(
            weight.numpy(), (position - np.floor(position)).astype(np.float32))
        xla = tf.function(augment._bilinear_taps, jit_compile=True)(starts, lengths, size)
        np.testing.assert_allclose(xla[2].numpy(), weight.numpy(), rtol=0, atol=6e-8)


def test_crop_of_one_image_equals_the_batched_crop_bit_for_bit():
    """A batch of one (a folder's image, cropped at its own size) gathers its columns as rows of
    the transposed image; a batch of unknown size takes the batched gathers: the same views."""
    def crop(batch_size):  # both in a graph: grappler rewrites graphs, not eager ops
        return tf.function(lambda x, s: augment.random_resized_crop(x, s, 24), input_signature=[
            tf.TensorSpec([batch_size, None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64)])

    one_image, unknown_batch = crop(1), crop(None)
    for height, width in ((40, 52), (33, 30), (17, 64)):
        image = random_uint8([1, height, width, 3])
        seed = tf.constant([height, width], tf.int64)
        np.testing.assert_array_equal(one_image(image, seed).numpy(),
                                      unknown_batch(image, seed).numpy())


def test_crop_and_flip_in_one_pass_equals_crop_then_flip_bit_for_bit():
    images = tf.cast(tf.random.stateless_uniform([6, 40, 44, 3], [1, 2], 0, 256, tf.int32),
                     tf.uint8)
    crop_seed, flip_seed = tf.constant([3, 4], tf.int64), tf.constant([5, 6], tf.int64)
    expected = augment.random_flip_left_right(
        augment.random_resized_crop(images, crop_seed, 24), flip_seed)
    got = augment.random_resized_crop_and_flip(images, crop_seed, flip_seed, 24)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    unflipped = augment.random_resized_crop(images, crop_seed, 24)
    assert 0 < np.mean(np.any(got.numpy() != unflipped.numpy(), axis=(1, 2, 3))) < 1


def test_blurring_the_selected_images_only_gives_the_same_views_bit_for_bit():
    """selected_only (the graph path) gathers the images drawn for the blur, blurs them and
    scatters them back: the same images as blurring all and selecting, at a fraction of it."""
    images = tf.random.stateless_uniform([9, 40, 44, 3], [3, 4])
    for p in (0.0, 0.5, 1.0):
        every = augment.random_gaussian_blur(images, SEED, p=p)
        selected = tf.function(lambda x, p=p: augment.random_gaussian_blur(
            x, SEED, p=p, selected_only=True))(images)
        np.testing.assert_array_equal(selected.numpy(), every.numpy())


def test_random_transforms_are_apply_of_draw_and_draws_slice_by_rows():
    """Each of the paper's four random transforms is apply_* of draw_*, and an image's draws
    depend only on the seed, the batch size and its row: the rows of a batch transformed with
    their rows of the batch's draws are the rows of the batch transformed (what `views`'
    chunked runs rely on)."""
    images = random_uint8((6, 28, 30, 3), seed=3)
    floats = augment.to_float(images)
    cases = {
        "crop": (lambda x: augment.random_resized_crop(x, SEED, 24),
                 augment.draw_crop(SEED, 6, 28, 30), lambda x, d: augment.apply_crop(x, d, 24),
                 images),
        "flip": (lambda x: augment.random_flip_left_right(x, SEED), augment.draw_flip(SEED, 6),
                 augment.apply_flip, floats),
        "color": (lambda x: augment.random_color_jitter(x, SEED, 1.0),
                  augment.draw_color(SEED, 6, 1.0), augment.apply_color, floats),
        "blur": (lambda x: augment.random_gaussian_blur(x, SEED), augment.draw_blur(SEED, 6),
                 augment.apply_blur, floats),
    }
    for name, (transform, draws, apply, batch) in cases.items():
        whole = transform(batch).numpy()
        np.testing.assert_array_equal(apply(batch, draws).numpy(), whole, err_msg=name)
        rows = [apply(batch[start:start + 2],
                      tf.nest.map_structure(lambda d: d[start:start + 2], draws)).numpy()
                for start in (0, 2, 4)]
        np.testing.assert_array_equal(np.concatenate(rows), whole, err_msg=name)


def test_bicubic_eval_preprocessing_is_the_original_codes():
    """resize_method="bicubic" (runs converted from the original code) is the original's
    preprocess_for_eval: its centre crop (tf.image.crop_to_bounding_box of the 87.5% square,
    offsets rounded up) resized by tf.image.resize bicubic, clipped to [0, 1], written here from
    the original's data_util.center_crop for non-square images of both orientations; a 32-px
    image (no crop) comes back as it was, as the original only reshapes it."""
    from simclr_tf import augment
    rng = np.random.default_rng(3)
    for height, width in ((300, 400), (401, 257)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        floats = tf.image.convert_image_dtype(image, tf.float32)
        side = int(tf.math.rint(0.875 * min(height, width)))
        top, left = (height - side + 1) // 2, (width - side + 1) // 2
        expected = tf.image.crop_to_bounding_box(floats, top, left, side, side)
        expected = tf.clip_by_value(
            tf.image.resize([expected], [224, 224], method=tf.image.ResizeMethod.BICUBIC)[0],
            0.0, 1.0)
        got = augment.preprocess_for_eval(image[None], 224, resize_method="bicubic")[0]
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6)
        bilinear = augment.preprocess_for_eval(image[None], 224)[0]
        assert np.abs(bilinear.numpy() - expected.numpy()).max() > 0.01
    small = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        augment.preprocess_for_eval(small, 32, crop=False, resize_method="bicubic").numpy(),
        small / 255.0, rtol=0, atol=1e-6)
