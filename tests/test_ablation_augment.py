"""The augmentation ablation: every Figure 4 transform keeps shape and range and does what it says,
`--augmentations` recipes compose them in order (the paper's recipe is one of them), and
`--asymmetric_augment` leaves one view untransformed; eagerly, inside tf.data and under XLA."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import augment, views
from simclr_tf import config as cfg

SEED = tf.constant([3, 5], tf.int32)


def random_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def assert_unit_range(images):
    images = np.asarray(images)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("name", list(views.TRANSFORMS))
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_each_transform_keeps_shape_and_range(name, dtype):
    images = random_uint8([3, 20, 20, 3])
    if dtype == "float32":
        images = images.astype(np.float32) / 255.0
    view = views.view(images, SEED, 16, name)
    assert view.shape == (3, 16, 16, 3)
    assert_unit_range(view)


# --------------------------------------------------------------------------------------------
# Each transform does what it says.

def test_sobel_of_a_constant_image_is_zero():
    for value in (0.0, 0.37, 1.0):
        edges = augment.sobel(np.full([2, 9, 11, 3], value, np.float32))
        assert edges.shape == (2, 9, 11, 3)
        np.testing.assert_allclose(edges, 0.0, atol=1e-6)  # oneDNN's conv rounds to ~1e-8


def test_sobel_of_a_step_edge():
    # Black left half, white right half: a response of 4 (-> 1) on the two columns at the step,
    # zero elsewhere, including the borders (edge pixels are repeated, not zero-padded).
    images = np.zeros([1, 6, 8, 3], np.float32)
    images[:, :, 4:] = 1.0
    edges = augment.sobel(images).numpy()[0, :, :, 0]
    expected = np.zeros([6, 8], np.float32)
    expected[:, 3:5] = 1.0
    np.testing.assert_allclose(edges, expected, atol=2e-4)  # the luma of white is 0.9999
    assert np.all(augment.sobel(images).numpy() == edges[None, :, :, None])  # 3 equal channels


def test_rotate90_four_times_is_identity_and_matches_numpy():
    images = random_uint8([4, 7, 7, 3])
    rotated = tf.constant(images)
    for _ in range(4):
        rotated = augment.rotate90(rotated, 1)
    np.testing.assert_array_equal(rotated, images)
    per_image = augment.rotate90(images, tf.constant([0, 1, 2, 3])).numpy()
    for b, k in enumerate(range(4)):
        np.testing.assert_array_equal(per_image[b], np.rot90(images[b], k))


def test_random_rotation_is_90_180_or_270_degrees():
    images = random_uint8([16, 6, 6, 3]).astype(np.float32) / 255.0
    rotated = augment.random_rotation(images, SEED).numpy()
    angles = []
    for image, result in zip(images, rotated):
        matches = [k for k in range(4) if np.array_equal(result, np.rot90(image, k))]
        assert len(matches) == 1 and matches[0] != 0
        angles.append(matches[0])
    assert set(angles) == {1, 2, 3}


def test_rotation_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        augment.rotate90(np.zeros([1, 4, 6, 3], np.float32), 1)


@pytest.mark.parametrize("height,width,fraction", [(16, 16, 0.5), (12, 20, 0.25), (7, 7, 0.5)])
def test_cutout_zeroes_one_square_of_the_stated_size(height, width, fraction):
    images = np.ones([8, height, width, 3], np.float32)
    out = augment.cutout(images, SEED, size_fraction=fraction).numpy()
    side_h, side_w = max(round(fraction * height), 1), max(round(fraction * width), 1)
    tops = set()
    for image in out:
        zero = np.all(image == 0.0, axis=-1)
        assert zero.sum() == side_h * side_w  # fully inside the image
        rows, cols = np.nonzero(zero)
        assert rows.max() - rows.min() + 1 == side_h and cols.max() - cols.min() + 1 == side_w
        np.testing.assert_array_equal(image[~zero], 1.0)  # the rest is untouched
        tops.add((rows.min(), cols.min()))
    assert len(tops) > 1  # placed per image


def test_gaussian_noise_is_zero_mean_with_the_drawn_sigma():
    images = np.full([4, 32, 32, 3], 0.5, np.float32)
    noisy = augment.random_gaussian_noise(images, SEED, stddev_range=(0.05, 0.05)).numpy()
    residual = noisy - 0.5  # 0.5 +- 0.05 sigma never clips
    assert abs(residual.mean()) < 0.003
    np.testing.assert_allclose(residual.std(axis=(1, 2, 3)), 0.05, rtol=0.05)
    assert not np.array_equal(residual[0], residual[1])  # independent per image
    unchanged = augment.random_gaussian_noise(images, SEED, stddev_range=(0.0, 0.0))
    np.testing.assert_array_equal(unchanged, images)


# --------------------------------------------------------------------------------------------
# Composition, the default recipe and the asymmetric setting.

@pytest.mark.parametrize("use_blur,names", [(False, "crop,color"), (True, "crop,color,blur")])
def test_named_recipe_is_the_default_bit_for_bit(use_blur, names):
    images = random_uint8([3, 30, 26, 3])
    default = views.two_views(images, SEED, 16, color_jitter_strength=0.5, use_blur=use_blur)
    named = views.two_views(images, SEED, 16, color_jitter_strength=0.5, augmentations=names)
    for want, got in zip(default, named):
        np.testing.assert_array_equal(got, want)


def test_order_matters_and_transforms_before_crop_see_the_resized_image():
    images = random_uint8([2, 24, 24, 3])
    first = views.view(images, SEED, 16, "sobel,color")
    second = views.view(images, SEED, 16, "color,sobel")
    assert not np.allclose(first, second)
    # Sobel first: the edges of the image resized to 16 px, then cropped (from 16 px) and resized.
    rotated_then_cropped = views.view(images, SEED, 16, "rotate,crop")
    assert rotated_then_cropped.shape == (2, 16, 16, 3)


def test_asymmetric_leaves_view_b_untransformed():
    images = random_uint8([3, 20, 20, 3])
    identity = views.identity_view(images, 16)
    np.testing.assert_allclose(identity, tf.image.resize(images / 255.0, [16, 16]), atol=1e-5)
    for augmentations in (None, "rotate", "crop,cutout"):
        view_a, view_b = views.two_views(images, SEED, 16, augmentations=augmentations,
                                           asymmetric=True)
        np.testing.assert_array_equal(view_b, identity)
        assert not np.allclose(view_a, identity)
    default_a, _ = views.two_views(images, SEED, 16)
    asymmetric_a, _ = views.two_views(images, SEED, 16, asymmetric=True)
    np.testing.assert_array_equal(asymmetric_a, default_a)  # the recipe, on one branch only


def test_seed_reproduces_and_views_differ():
    images = random_uint8([2, 20, 20, 3])
    names = "crop,cutout,noise,rotate"
    first = views.two_views(images, SEED, 16, augmentations=names)
    again = views.two_views(images, tf.constant([3, 5], tf.int64), 16, augmentations=names)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(*first)


def test_all_transforms_inside_tf_data_with_varying_image_sizes():
    # Folder datasets augment one image (of its own size) at a time.
    sizes = [(20, 30), (33, 17)]
    dataset = tf.data.Dataset.from_generator(
        lambda: (random_uint8([h, w, 3], seed=h) for h, w in sizes),
        output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    dataset = dataset.map(lambda image: views.two_views(
        image[None], SEED, 12, augmentations="color,rotate,crop,sobel", asymmetric=True))
    for view_a, view_b in dataset:
        assert view_a.shape == (1, 12, 12, 3) and view_b.shape == (1, 12, 12, 3)
        assert_unit_range(view_a)


def test_new_transforms_compile_with_xla_and_match_eager():
    # crop, color and blur are checked under XLA in test_augment; these are the new ones.
    images = random_uint8([2, 16, 16, 3])
    names = "rotate,cutout,sobel,noise"

    @tf.function(jit_compile=True)
    def compiled_views(images, seed):
        return views.two_views(images, seed, 12, augmentations=names)

    for compiled, eager in zip(compiled_views(images, SEED),
                               views.two_views(images, SEED, 12, augmentations=names)):
        assert compiled.shape == (2, 12, 12, 3)
        np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_data_pipeline_passes_the_ablation_through(tmp_path):
    from simclr_tf import data, pretrain
    for i in range(4):
        image = tf.io.encode_png(random_uint8([20, 20, 3], seed=i)).numpy()
        (tmp_path / f"{i}.png").write_bytes(image)
    config = cfg.RunConfig(
        data=cfg.DataConfig(dataset=f"folder:{tmp_path}", image_size=12),
        augment=cfg.AugmentConfig(augmentations="rotate", asymmetric_augment=True),
        train=cfg.TrainConfig(train_batch_size=2))
    dataset = pretrain.make_dataset_fn(config)(tf.distribute.InputContext(), 0)
    batch = next(iter(dataset))
    originals = [tf.io.decode_png((tmp_path / f"{i}.png").read_bytes()).numpy()
                 for i in range(4)]
    for view_a, view_b in zip(batch[data.VIEW_A].numpy(), batch[data.VIEW_B].numpy()):
        # view_b is the resized image; view_a that image rotated by 90, 180 or 270 degrees.
        source = [o for o in originals
                  if np.allclose(views.identity_view(o[None], 12)[0], view_b, atol=1e-6)]
        assert len(source) == 1
        assert any(np.allclose(np.rot90(view_b, k), view_a, atol=1e-6) for k in (1, 2, 3))


# --------------------------------------------------------------------------------------------
# The --augmentations value.

def test_parse_augmentations():
    assert cfg.parse_augmentations("crop, color") == ("crop", "color")
    assert cfg.parse_augmentations(["rotate"]) == ("rotate",)


@pytest.mark.parametrize("value,message", [
    ("crop,colour", "unknown colour"),
    ("crop,,color", "empty name"),
    ("", "empty name"),
    ("crop,crop", "names a transform twice"),
])
def test_bad_augmentations_raise_one_line_config_errors(value, message):
    config = cfg.RunConfig(augment=cfg.AugmentConfig(augmentations=value))
    with pytest.raises(cfg.ConfigError, match=message) as error:
        cfg.validate(config)
    assert "\n" not in str(error.value)
    assert "crop,cutout,color,sobel,noise,blur,rotate" in str(error.value)
