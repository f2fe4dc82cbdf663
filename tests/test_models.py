"""Encoder f and heads: shapes, parameter counts against the papers, head structure."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from simclr_tf.heads import LinearProbe, ProjectionHead
from simclr_tf.resnet import feature_extractor, resnet


def trainable_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


# Trainable parameters of f (ImageNet stem, no head), in millions, as the papers report them,
# with this implementation's exact count.
PAPER_COUNTS = [
    # depth, width, sk_ratio, paper (M), exact
    (50, 1, 0.0, 24, 23_508_032),
    (50, 2, 0.0, 94, 93_907_072),
    (50, 1, 0.0625, 35, 35_215_584),
    (101, 1, 0.0, 43, 42_500_160),
    (152, 1, 0.0, 58, 58_143_808),
]
LARGE_COUNTS = [
    (50, 4, 0.0, 375, 375_378_176),
    (50, 2, 0.0625, 140, 140_306_048),
    (152, 3, 0.0625, 795, 794_704_160),
]


def _check_count(depth, width, sk, paper, exact):
    model = resnet(depth, width, sk_ratio=sk)
    count = trainable_params(model)
    assert abs(count - exact) < 100_000, (depth, width, sk, count)
    assert round(count / 1e6) == paper


@pytest.mark.parametrize("depth,width,sk,paper,exact", PAPER_COUNTS)
def test_parameter_counts_match_papers(depth, width, sk, paper, exact):
    _check_count(depth, width, sk, paper, exact)


@pytest.mark.slow
@pytest.mark.parametrize("depth,width,sk,paper,exact", LARGE_COUNTS)
def test_parameter_counts_of_wide_models(depth, width, sk, paper, exact):
    _check_count(depth, width, sk, paper, exact)


@pytest.mark.parametrize("depth,dim", [(18, 512), (34, 512), (50, 2048)])
def test_output_width_and_cifar_stem(depth, dim):
    model = resnet(depth, width_multiplier=1, cifar_stem=True)
    h = model(tf.zeros([2, 32, 32, 3]), training=False)
    assert h.shape == (2, dim)
    features = feature_extractor(model)(tf.zeros([2, 32, 32, 3]))
    # CIFAR stem: no downsampling before group 1.
    assert features["block_group1"].shape[1:3] == (32, 32)
    assert features["block_group4"].shape[1:3] == (4, 4)


def test_imagenet_stem_downsamples_by_32():
    features = feature_extractor(resnet(18))(tf.zeros([1, 64, 64, 3]))
    assert features["block_group1"].shape[1:3] == (16, 16)
    assert features["block_group4"].shape[1:3] == (2, 2)


def test_sk_and_se_blocks_run_and_add_parameters():
    plain = resnet(50, cifar_stem=True)
    sk = resnet(50, sk_ratio=0.0625, cifar_stem=True)
    se = resnet(50, se_ratio=0.25, cifar_stem=True)
    assert trainable_params(sk) > trainable_params(plain)
    assert trainable_params(se) > trainable_params(plain)
    for model in (sk, se):
        assert model(tf.random.uniform([2, 16, 16, 3]), training=True).shape == (2, 2048)


def test_last_bn_of_each_block_starts_at_zero_so_blocks_start_as_identity():
    model = resnet(18, cifar_stem=True)
    gammas = [layer.gamma.numpy() for layer in model.layers if layer.name.endswith("_2_bn")]
    assert gammas and all(np.all(g == 0) for g in gammas)


def test_bad_settings_raise_one_line_errors():
    with pytest.raises(ValueError, match="resnet_depth must be one of"):
        resnet(42)
    with pytest.raises(ValueError, match="width_multiplier"):
        resnet(18, width_multiplier=0)


def test_projection_head_structure():
    head = ProjectionHead("nonlinear", num_layers=3, out_dim=16)
    h = tf.random.normal([8, 32])
    z, hiddens = head(h, training=True)
    assert z.shape == (8, 16)
    assert [x.shape[-1] for x in hiddens] == [32, 32, 32, 16]
    assert np.all(hiddens[1].numpy() >= 0)                     # ReLU on hidden layers
    assert not head.bn_layers[-1].beta.trainable                # last BN without centring
    assert all(layer.bn_layers[0].beta.trainable for layer in [head])
    assert all(not d.use_bias for d in head.dense_layers)
    linear = ProjectionHead("linear", out_dim=16)
    assert linear(h)[0].shape == (8, 16) and len(linear.dense_layers) == 1
    none = ProjectionHead("none")
    np.testing.assert_array_equal(none(h)[0].numpy(), h.numpy())
    with pytest.raises(ValueError, match="proj_head_mode"):
        ProjectionHead("mlp")


def test_linear_probe_blocks_gradients_to_h():
    probe = LinearProbe(3)
    h = tf.random.normal([4, 5])
    with tf.GradientTape() as tape:
        tape.watch(h)
        out = tf.reduce_sum(probe(h))
    assert tape.gradient(out, h) is None


def test_public_api():
    model = simclr_tf.resnet(18, cifar_stem=True)
    assert model(tf.zeros([1, 32, 32, 3])).shape == (1, 512)
    for name in ("ProjectionHead", "nt_xent", "LARS", "preprocess_for_train_single"):
        assert hasattr(simclr_tf, name)


def test_se_squeezes_to_se_ratio_of_the_blocks_inner_width_as_the_reference_code():
    plain, se = resnet(50, cifar_stem=True), resnet(50, se_ratio=0.25, cifar_stem=True)
    added = 0
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        squeezed, out = int(width * 0.25), 4 * width
        added += blocks * (out * squeezed + squeezed + squeezed * out + out)  # kernels + biases
    assert trainable_params(se) - trainable_params(plain) == added


def test_resnet_d_shortcut_average_pools_at_stride_one_and_pads_zeros_when_strided():
    """The reference code's ResNet-D shortcut: 2x2 average pool at stride 1 ("same", padding not
    counted) in group 1, and after one row/column of zeros at stride 2 (the zeros counted)."""
    from simclr_tf.resnet import _Builder
    builder = _Builder(0.9, 1e-5, False, sk_ratio=0.0625, se_ratio=0.0)
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    padded = np.pad(x[0, :, :, 0], ((0, 1), (0, 1)))
    for strides in (1, 2):
        inputs = keras.Input((5, 5, 1))
        shortcut = keras.Model(inputs, builder.shortcut(inputs, 4, strides, f"s{strides}"))
        model = keras.Model(inputs, shortcut.get_layer(f"s{strides}_pool").output)
        pooled = model(x).numpy()[0, :, :, 0]
        if strides == 1:
            counts = np.pad(np.ones((5, 5)), ((0, 1), (0, 1)))
            window = lambda a: a[:-1, :-1] + a[1:, :-1] + a[:-1, 1:] + a[1:, 1:]  # noqa: E731
            want = window(padded) / window(counts)
        else:
            want = padded.reshape(3, 2, 3, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(pooled, want, rtol=1e-6)


def test_supervised_heads_start_as_the_reference_code_or_at_zero():
    probe = LinearProbe(10)
    probe.build((None, 512))
    kernel = probe.dense.kernel.numpy()
    assert 0.009 < kernel.std() < 0.011 and abs(kernel.mean()) < 0.001   # N(0, 0.01^2)
    assert np.all(probe.dense.bias.numpy() == 0)
    zero = LinearProbe(10, zero_init=True)
    zero.build((None, 512))
    assert np.all(zero.dense.kernel.numpy() == 0)
