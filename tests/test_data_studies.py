"""The data-study settings (Cole et al. 2022): image corruptions (`--corrupt`, `--eval_corrupt`),
training on a nested subset of the images (`--train_examples`) and on a union of datasets
(`--dataset=a+b`)."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as cfg
from simclr_tf import corrupt
from simclr_tf import data as data_lib
from simclr_tf import label_maps
from simclr_tf import label_subset


def _uint8(array):
    return tf.constant(np.asarray(array, np.uint8))


def test_downsample_averages_blocks_then_interpolates_back():
    # 2x2 blocks of 0 | 200: area-downsampling by 2 keeps [0, 200]; bilinear upsampling with
    # half-pixel centres puts output pixel i at source (i + 0.5) / 2 - 0.5, clamped:
    # -0.25 -> 0, 0.25 -> 0.75*0 + 0.25*200, 0.75 -> 0.25*0 + 0.75*200, 1.25 -> 200.
    row = [0, 0, 200, 200]
    image = np.repeat(np.array([row] * 4)[..., None], 3, axis=-1)
    got = corrupt.corruption_fn("downsample:2")(_uint8(image)).numpy()
    expected_row = [0, 50, 150, 200]
    np.testing.assert_array_equal(got[..., 0], [expected_row] * 4)
    assert got.dtype == np.uint8 and got.shape == (4, 4, 3)
    constant = np.full((9, 7, 3), 77)
    np.testing.assert_array_equal(corrupt.corruption_fn("downsample:3")(_uint8(constant)),
                                  constant)


def test_salt_and_pepper_hits_the_fraction_and_is_the_same_for_the_same_image():
    gray = np.full((100, 100, 3), 128)
    salted = corrupt.corruption_fn("salt_pepper:0.2")(_uint8(gray)).numpy()
    changed = (salted != 128).any(-1)
    assert abs(changed.mean() - 0.2) < 0.02  # 10,000 pixels: the std of the fraction is 0.004
    assert set(np.unique(salted[changed])) == {0, 255}
    assert abs((salted[changed][:, 0] == 255).mean() - 0.5) < 0.05
    assert (salted[changed] == salted[changed][:, :1]).all()  # a whole pixel, not a channel
    again = corrupt.corruption_fn("salt_pepper:0.2")(_uint8(gray)).numpy()
    np.testing.assert_array_equal(salted, again)
    other = gray.copy()
    other[0, 0] = 127  # another image: another pattern
    assert (corrupt.corruption_fn("salt_pepper:0.2")(_uint8(other)).numpy() != salted).any()


def test_jpeg_is_a_round_trip_at_that_quality():
    y, x = np.mgrid[0:32, 0:32]
    image = np.stack([4 * x, 4 * y, 128 + 60 * np.sin(x / 3.0)], -1).astype(np.uint8)
    for quality in (10, 90):
        expected = tf.io.decode_jpeg(tf.io.encode_jpeg(_uint8(image), quality=quality)).numpy()
        np.testing.assert_array_equal(corrupt.corruption_fn(f"jpeg:{quality}")(_uint8(image)),
                                      expected)
    error = {q: np.abs(corrupt.corruption_fn(f"jpeg:{q}")(_uint8(image)).numpy().astype(int)
                       - image).mean() for q in (10, 90)}
    assert error[10] > 2 * error[90]


def test_blur_spreads_a_point_as_the_gaussian():
    image = np.zeros((15, 15, 3))
    image[7, 7] = 255
    got = corrupt.corruption_fn("blur:1")(_uint8(image)).numpy()[..., 0]
    taps = np.exp(-np.arange(-3, 4) ** 2 / 2.0)  # radius ceil(3 sigma) = 3
    taps /= taps.sum()
    expected = np.zeros((15, 15))
    expected[4:11, 4:11] = 255 * np.outer(taps, taps)
    np.testing.assert_array_equal(got, np.round(expected))


@pytest.mark.parametrize("spec, message", [
    ("jpeg:101", "corrupt='jpeg:101': jpeg takes a JPEG quality Q in 1..100"),
    ("downsample:1", "corrupt='downsample:1': downsample takes a factor F > 1"),
    ("salt_pepper:2", "salt_pepper takes a fraction P in [0, 1]"),
    ("blur:wide", "corrupt='blur:wide': 'wide' is not a number"),
    ("noise:3", "corrupt='noise:3' is not one of downsample:F"),
])
def test_bad_corruptions_are_one_line_naming_the_flag(spec, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.validate(cfg.RunConfig(data=cfg.DataConfig(corrupt=spec)))
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(cfg.ConfigError, match="eval_corrupt="):
        cfg.validate(cfg.RunConfig(data=cfg.DataConfig(eval_corrupt=spec)))


def test_corruption_in_the_pipeline_is_the_same_whatever_the_reading_order(tmp_path,
                                                                           image_folder):
    dataset = image_folder(tmp_path / "images")
    salt = corrupt.corruption_fn("salt_pepper:0.3")

    def corrupted(seed):
        images, _ = data_lib.load_images(dataset, "train", shuffle_files=True, seed=seed,
                                         corruption=salt)
        return sorted(image.tobytes() for image, _ in images.as_numpy_iterator())

    clean, _ = data_lib.load_images(dataset, "train")
    by_hand = sorted(salt(tf.constant(image)).numpy().tobytes()
                     for image, _ in clean.as_numpy_iterator())
    assert corrupted(1) == corrupted(2) == by_hand


def test_train_examples_are_nested_seeded_subsets():
    small, large = data_lib.example_subset(1000, 10, 3), data_lib.example_subset(1000, 300, 3)
    assert len(small) == 10 and len(large) == 300 and set(small) <= set(large)
    assert list(small) == sorted(small)
    assert not np.array_equal(small, data_lib.example_subset(1000, 10, 4))
    assert data_lib.example_subset(1000, 0) is None
    with pytest.raises(data_lib.DatasetError, match="train_examples=1001 is more than the 1000"):
        data_lib.example_subset(1000, 1001)


def test_a_subset_is_read_and_shared_between_pipelines(tmp_path, image_folder):
    dataset = image_folder(tmp_path / "images")
    everything = [image.tobytes() for image, _ in
                  data_lib.load_images(dataset, "train")[0].as_numpy_iterator()]
    chosen = np.array([1, 4, 9, 12])
    images, info = data_lib.load_images(dataset, "train", examples=chosen)
    assert info.num_examples == 4
    assert [image.tobytes() for image, _ in images.as_numpy_iterator()] == [
        everything[i] for i in chosen]
    shares = [[image.tobytes() for image, _ in data_lib.load_images(
        dataset, "train", input_context=tf.distribute.InputContext(2, p, 1),
        examples=chosen)[0].as_numpy_iterator()] for p in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(everything[i] for i in chosen)
    assert len(shares[0]) == len(shares[1]) == 2


def test_label_fraction_is_taken_within_the_train_examples(tmp_path, image_folder):
    dataset = image_folder(tmp_path / "images", per_class=20)
    within = data_lib.example_subset(40, 20, seed=0)
    subset = label_subset.subset_indices(dataset, "train", fraction=0.5, within=within)
    assert set(subset) <= set(within)
    labels = label_subset.split_labels(dataset, "train")
    inside = labels[within]
    assert len(subset) == sum(math.floor(0.5 * (inside == c).sum() + 0.5) or 1 for c in (0, 1))
    np.testing.assert_array_equal(
        label_subset.subset_indices(dataset, "train", fraction=1.0, within=within), within)


# A two-step run on Fashion-MNIST, trained then evaluated.
TINY_RUN = ("--mode=train_then_eval", "--dataset=fashion_mnist", "--train_split=train[:600]",
            "--eval_split=test[:100]", "--image_size=16", "--resnet_depth=18",
            "--train_batch_size=16", "--train_steps=2", "--steps_per_loop=1",
            "--checkpoint_steps=2", "--eval_batch_size=50")


def _results(model_dir):
    with open(model_dir / "results.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_cli_pretrains_on_corrupted_subset_and_records_it(tmp_path, cli):
    run = tmp_path / "run"
    done = cli(*TINY_RUN, "--knn_bank_size=100",
               "--eval_protocols=knn", "--projector_examples=0", "--neighbour_queries=0",
               "--train_examples=64", "--corrupt=downsample:2", "--eval_corrupt=jpeg:20",
               f"--model_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Pretraining on 64 images of train[:600] (--train_examples)" in done.stderr
    with open(run / "config.json") as f:
        data = json.load(f)["data"]
    assert (data["train_examples"], data["corrupt"], data["eval_corrupt"]) == (
        64, "downsample:2", "jpeg:20")
    results = _results(run)
    assert (results["train_examples"], results["corrupt"], results["eval_corrupt"]) == (
        64, "downsample:2", "jpeg:20")
    # The same f at the coarse level: kNN fitted to 6 garment kinds, the probe's fine softmax
    # summed over each kind.
    coarse = cli("--mode=eval", f"--model_dir={run}", "--label_map=fashion_mnist_coarse",
                 "--eval_split=test[:100]", "--eval_protocols=probe,knn", "--eval_batch_size=50",
                 "--knn_bank_size=100", "--projector_examples=20", "--neighbour_queries=0")
    assert coarse.returncode == 0, coarse.stderr[-2000:]
    results = _results(run)
    assert results["label_map"] == "fashion_mnist_coarse"
    # Evaluation settings are the command's: this one asked for clean images.
    assert "eval_corrupt" not in results and results["corrupt"] == "downsample:2"
    assert 0 <= results["knn_top1"] <= 1 and 0 <= results["probe_top1"] <= 1
    with open(run / "eval_test__100_" / "metadata.tsv") as f:
        names = {line.split("\t")[1].strip() for line in f.readlines()[1:]}
    assert names <= set(label_maps.BUILTIN["fashion_mnist_coarse"].values())
    bad = cli("--corrupt=jpeg:0", f"--model_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: corrupt='jpeg:0': jpeg takes")


@pytest.mark.slow
def test_cli_supervised_baseline_on_corrupted_subset_under_two_replicas(tmp_path, cli):
    run = tmp_path / "run"
    done = cli(*TINY_RUN, "--train_mode=finetune", "--optimizer=momentum", "--learning_rate=0.01", "--warmup_epochs=0",
               "--train_examples=100", "--train_label_fraction=0.5", "--corrupt=jpeg:30",
               "--strategy=mirrored", "--num_cpu_replicas=2", f"--model_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    # Half of each class among the 100 examples (rounded, at least one): about 50 of 600.
    line = next(l for l in done.stderr.splitlines() if "Fine-tuning on" in l)
    count = int(line.split("Fine-tuning on ")[1].split()[0])
    assert 40 <= count <= 60 and "of train[:600]" in line
    results = _results(run)
    assert (results["train_examples"], results["corrupt"]) == (100, "jpeg:30")


def test_builtin_coarse_map_of_fashion_mnist():
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
             "Bag", "Ankle boot")
    coarse = label_maps.load("fashion_mnist_coarse", names, 10)
    assert coarse.names == ("tops", "bottoms", "dresses", "outerwear", "footwear", "bags")
    np.testing.assert_array_equal(coarse.fine_to_coarse, [0, 1, 0, 2, 3, 4, 0, 4, 5, 4])
    np.testing.assert_array_equal(coarse.labels(tf.constant([6, 9, 8])), [0, 4, 5])


def test_label_map_files_by_name_or_id_and_their_errors(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"cat": "animal", "1": "animal", "car": "vehicle"}))
    mapped = label_maps.load(str(path), ("cat", "dog", "car"), 3)
    assert mapped.names == ("animal", "vehicle")
    np.testing.assert_array_equal(mapped.fine_to_coarse, [0, 0, 1])
    with pytest.raises(label_maps.LabelMapError, match=r"does not map class 2 \('bus'\)"):
        label_maps.load(str(path), ("cat", "dog", "bus"), 3)
    path.write_text(json.dumps({"0": "a", "1": "a", "2": "b", "plane": "b"}))
    with pytest.raises(label_maps.LabelMapError, match="maps 'plane', which is not a class"):
        label_maps.load(str(path), ("cat", "dog", "car"), 3)
    with pytest.raises(label_maps.LabelMapError, match="neither a built-in map"):
        label_maps.load(str(tmp_path / "missing.json"), ("cat",), 1)


def test_fine_logits_become_coarse_log_probabilities():
    mapped = label_maps.LabelMap(np.array([0, 0, 1], np.int32), ("ab", "c"))
    # softmax([0, ln 3, 0]) = [1/5, 3/5, 1/5] -> coarse [4/5, 1/5]
    got = mapped.logits(np.array([[0.0, np.log(3.0), 0.0]]))
    np.testing.assert_allclose(np.exp(got), [[0.8, 0.2]], rtol=1e-6)


@pytest.mark.slow
def test_cli_evaluates_f_on_another_dataset(tmp_path, image_folder, cli):
    animals = image_folder(tmp_path / "animals", per_class=12, size=20)
    shapes = image_folder(tmp_path / "shapes", per_class=10, size=24,
                          classes=("circle", "square", "star"))
    run = tmp_path / "run"
    trained = cli(f"--dataset={animals}", "--train_split=train", "--eval_split=train",
                  "--image_size=16", "--resnet_depth=18", "--train_batch_size=8",
                  "--train_steps=2", "--steps_per_loop=1", "--checkpoint_steps=2",
                  f"--model_dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = cli("--mode=eval", f"--model_dir={run}", f"--eval_dataset={shapes}",
                    "--eval_dataset_train_split=train", "--eval_dataset_split=train",
                    "--eval_protocols=probe,knn,linear", "--eval_batch_size=10",
                    "--knn_k=1", "--projector_examples=0", "--neighbour_queries=0")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "The linear probe predicts" in evaluated.stderr
    results = _results(run)
    assert (results["pretraining_dataset"], results["eval_dataset"]) == (animals, shapes)
    assert results["num_examples"] == 30 and "probe_top1" not in results
    # 1-NN on its own bank: every image's nearest neighbour is itself.
    assert results["knn_top1"] == 1.0 and 0 <= results["linear_top1"] <= 1
    assert any(p.name.startswith("eval_folder_") for p in run.iterdir())


# ---------------------------------------------------------------------------------------------
# Domain: a union of datasets (--dataset=a+b)


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory, image_folder):
    """Two labelled folders: clothes (2 classes x 6 images, 20 px) and shoes (3 x 4, 24 px)."""
    root = tmp_path_factory.mktemp("domains")
    clothes = image_folder(root / "clothes", per_class=6, size=20, classes=("coat", "shirt"))
    shoes = image_folder(root / "shoes", per_class=4, size=24, classes=("boot", "heel", "sneaker"))
    return clothes, shoes


def test_union_counts_every_part_and_offsets_their_classes(two_domains):
    clothes, shoes = two_domains
    info = data_lib.dataset_info(f"{clothes}+{shoes}", "train")
    assert (info.num_examples, info.num_classes, info.image_shape) == (24, 5, None)
    assert info.class_names == tuple(f"{part}:{name}" for part, names in (
        (clothes, ("coat", "shirt")), (shoes, ("boot", "heel", "sneaker"))) for name in names)
    # Read in order, the parts follow one another: indices (--train_examples) count in it.
    images, _ = data_lib.load_images(f"{clothes}+{shoes}", "train")
    read = [(image.shape[0], int(label)) for image, label in images.as_numpy_iterator()]
    assert read == [(20, c) for c in (0, 1) for _ in range(6)] + [
        (24, c) for c in (2, 3, 4) for _ in range(4)]
    subset, _ = data_lib.load_images(f"{clothes}+{shoes}", "train", examples=[0, 11, 12, 23])
    assert [int(label) for _, label in subset.as_numpy_iterator()] == [0, 1, 2, 4]


def test_union_shuffled_reads_each_image_once_per_epoch_and_pretrains(two_domains):
    clothes, shoes = two_domains
    union = f"{shoes}+{clothes}"  # the other order: shoes are classes 0..2 now
    images, _ = data_lib.load_images(union, "train", shuffle_files=True, seed=3)
    labels = [int(label) for _, label in images.as_numpy_iterator()]
    assert sorted(labels) == [c for c in (0, 1, 2) for _ in range(4)] + [
        c for c in (3, 4) for _ in range(6)]
    assert labels != sorted(labels)  # interleaved, not one part after the other
    batches = data_lib.pretrain_dataset(union, "train", 4, 16, seed=1, shuffle_buffer=8)
    batch = next(iter(batches))
    assert batch["view_a"].shape == [4, 16, 16, 3]


def test_union_names_and_their_errors(tmp_path, monkeypatch, two_domains):
    clothes, _ = two_domains
    assert data_lib.union_parts("cifar10") == ["cifar10"]
    assert data_lib.union_parts("cifar10 + folder:/x") == ["cifar10", "folder:/x"]
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert data_lib.union_parts(f"folder:{plus}") == [f"folder:{plus}"]
    monkeypatch.setenv("HOME", str(tmp_path))  # the same folder through ~, as folders are read
    assert data_lib.union_parts("folder:~/a+b") == ["folder:~/a+b"]
    with pytest.raises(data_lib.DatasetError, match=r"has an empty name in its union"):
        data_lib.dataset_info(f"{clothes}+", "train")
    with pytest.raises(data_lib.DatasetError, match="no_such_dataset"):
        data_lib.dataset_info(f"{clothes}+no_such_dataset", "train")


def test_union_with_an_unlabelled_part_is_unlabelled(tmp_path, two_domains):
    """A flat folder has no classes: the whole union is unlabelled (label -1 everywhere), so no
    probe, fine-tuning or linear evaluation meets a label outside its classes."""
    clothes, _ = two_domains
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        tf.io.write_file(str(flat / f"{i}.png"), tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)))
    union = f"{clothes}+folder:{flat}"
    info = data_lib.dataset_info(union, "train")
    assert (info.num_examples, info.num_classes, info.class_names) == (15, 0, ())
    images, _ = data_lib.load_images(union, "train")
    assert {int(label) for _, label in images.as_numpy_iterator()} == {-1}
    with pytest.raises(label_subset.LabelSubsetError, match="has an unlabelled part"):
        label_subset.split_labels(union, "train")


def test_union_labels_without_decoding_follow_the_reading_order(two_domains):
    clothes, shoes = two_domains
    np.testing.assert_array_equal(label_subset.split_labels(f"{clothes}+{shoes}", "train"),
                                  [0] * 6 + [1] * 6 + [2] * 4 + [3] * 4 + [4] * 4)
