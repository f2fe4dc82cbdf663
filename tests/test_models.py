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
# and exactly, as the original code's `resnet.resnet` builds them (counted on 2026-12-07 with
# google-research/simclr tf2/ and tf-keras 2.21: its trainable variables after one call).
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


@pytest.fixture
def zero_conv_init(monkeypatch):
    """Conv kernels start at zero: a count needs shapes, not random draws (drawing 795 M of
    them took two thirds of the widest model's build)."""
    monkeypatch.setattr(keras.initializers.VarianceScaling, "__call__",
                        lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype=dtype))


def _check_count(depth, width, sk, paper, exact):
    model = resnet(depth, width, sk_ratio=sk)
    count = trainable_params(model)
    assert count == exact, (depth, width, sk, count)
    assert round(count / 1e6) == paper


@pytest.mark.parametrize("depth,width,sk,paper,exact", PAPER_COUNTS)
def test_parameter_counts_match_papers(depth, width, sk, paper, exact, zero_conv_init):
    _check_count(depth, width, sk, paper, exact)


@pytest.mark.slow
@pytest.mark.parametrize("depth,width,sk,paper,exact", LARGE_COUNTS)
def test_parameter_counts_of_wide_models(depth, width, sk, paper, exact, zero_conv_init):
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


# --------------------------------------------------------------------------------------------
# Named endpoints, the head cut at a layer, and get_config round trips.

@pytest.mark.parametrize("cifar_stem,sk_ratio,stem_side", [(True, 0.0, 16), (False, 0.0, 8),
                                                           (False, 0.0625, 8)])
def test_endpoints_name_the_stem_and_block_group_outputs(cifar_stem, sk_ratio, stem_side):
    from simclr_tf.resnet import ENDPOINTS
    depth = 50 if sk_ratio else 18
    model = resnet(depth, cifar_stem=cifar_stem, sk_ratio=sk_ratio, image_size=None)
    features = feature_extractor(model, ENDPOINTS)(tf.zeros([1, 32, 32, 3]) if not cifar_stem
                                                   else tf.zeros([1, 16, 16, 3]))
    assert features["stem"].shape[1:3] == (stem_side, stem_side)
    # The stem's output is what block group 1 reads: the first block's input.
    first_conv = model.get_layer("group1_block1_1_conv")
    assert first_conv.input is model.get_layer(
        "stem_pool" if not cifar_stem else "stem_bn_relu").output
    assert features["final_avg_pool"].shape[-1] == model.output.shape[-1]
    with pytest.raises(ValueError, match="endpoint must be one of"):
        feature_extractor(model, ("block_group5",))


def test_projection_head_up_to_layer_j_is_hiddens_j_without_running_later_layers():
    head = ProjectionHead("nonlinear", num_layers=3, out_dim=16)
    h = tf.random.normal([8, 32])
    _, hiddens = head(h, training=False)
    for j in range(4):
        np.testing.assert_array_equal(head.up_to(h, j).numpy(), hiddens[j].numpy())
    last_bn = head.bn_layers[-1]
    before = last_bn.moving_mean.numpy().copy()
    head.up_to(h, 2, training=True)  # layer 3 does not run: its statistics stay
    np.testing.assert_array_equal(last_bn.moving_mean.numpy(), before)
    assert head.output_dim(2) == 32 and head.output_dim(3) == 16
    with pytest.raises(ValueError, match="layer must be in 0..3"):
        head.up_to(h, 4)


def _layers_to_round_trip():
    from simclr_tf.batchnorm import BatchNorm
    from simclr_tf.conv import Conv2D
    from simclr_tf.resnet import SplitPaths, SqueezePaths
    return [
        (BatchNorm(0.8, 2e-5, center=False, gamma_zero_init=True, synchronized=True), [4, 5, 5, 6]),
        (Conv2D(4, 3, padding="same", use_bias=False), [2, 6, 6, 3]),
        (ProjectionHead("nonlinear", 3, 8, hidden_dim=12, global_bn=True, bn_momentum=0.8,
                        bn_epsilon=1e-4), [4, 10]),
        (ProjectionHead("linear", out_dim=8), [4, 10]),
        (LinearProbe(5, zero_init=True), [4, 10]),
        (SplitPaths(), [2, 4, 4, 6]),
        (SqueezePaths(), [2, 2, 4, 4, 3]),
    ]


@pytest.mark.parametrize("layer,shape", _layers_to_round_trip(),
                         ids=lambda x: type(x).__name__ if hasattr(x, "get_config") else None)
def test_every_layer_round_trips_through_get_config(layer, shape):
    x = tf.random.uniform(shape)
    layer(x)
    config = layer.get_config()
    copy = type(layer).from_config(config)
    assert copy.get_config() == config
    copy(x)
    copy.set_weights(layer.get_weights())
    want, got = layer(x), copy(x)
    for a, b in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_select_paths_round_trips_through_get_config():
    from simclr_tf.resnet import SelectPaths
    layer = SelectPaths(name="select")
    inputs = [tf.random.uniform([2, 3, 4, 4, 5]), tf.random.uniform([3, 1, 1, 10])]
    copy = SelectPaths.from_config(layer.get_config())
    assert copy.get_config() == layer.get_config()
    np.testing.assert_array_equal(layer(inputs).numpy(), copy(inputs).numpy())


@pytest.mark.parametrize("kwargs", [dict(depth=18, cifar_stem=True),
                                    dict(depth=50, sk_ratio=0.0625, se_ratio=0.25)],
                         ids=["resnet18_cifar", "resnet50_sk_se"])
def test_the_encoder_round_trips_through_get_config_and_a_keras_file(kwargs, tmp_path):
    model = resnet(**kwargs, image_size=32, global_bn=True, bn_momentum=0.8)
    x = tf.random.uniform([2, 32, 32, 3])
    copy = keras.Model.from_config(model.get_config())
    assert [layer.get_config() for layer in copy.layers] == \
        [layer.get_config() for layer in model.layers]
    copy.set_weights(model.get_weights())
    np.testing.assert_array_equal(copy(x, training=False).numpy(),
                                  model(x, training=False).numpy())
    if kwargs["depth"] != 18:
        return  # the same layer classes; the .keras file of a ResNet-50 only costs time
    path = str(tmp_path / "encoder.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  model(x, training=False).numpy())


def test_the_optimiser_and_schedule_round_trip_through_get_config():
    from simclr_tf.lars import LARS
    from simclr_tf.schedules import WarmupCosine
    schedule = WarmupCosine(2.0, 10, 110)
    assert WarmupCosine.from_config(schedule.get_config()).get_config() == schedule.get_config()
    lars = LARS(schedule, momentum=0.8, weight_decay=1e-4, eta=0.002, nesterov=True,
                exclude_names=("logits",))
    copy = keras.optimizers.deserialize(keras.optimizers.serialize(lars))
    assert isinstance(copy, LARS)
    assert (copy.momentum, copy.lars_weight_decay, copy.eta, copy.nesterov,
            copy.exclude_names) == (0.8, 1e-4, 0.002, True, ("logits",))
    assert copy._learning_rate.get_config() == schedule.get_config()
