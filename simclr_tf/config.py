"""The run's configuration: plain, frozen dataclasses, validated, saved beside the checkpoints.

This module is the single source of every setting: its default, its command-line help (each field's
`help` metadata, from which `simclr_tf.run` defines the flag of the same name) and the defaults
derived from other settings, resolved when a `RunConfig` is made (so a `RunConfig` built in Python
behaves as the command line). `RunConfig` is written to `<model_dir>/config.json`; evaluation,
export and fine-tuning rebuild the model from it, so a run's architecture is never typed twice.

It imports no model code: the vocabularies below are the settings' allowed values, and
tests/test_config.py checks that they agree with the modules that implement them. Library modules
take these objects (or plain arguments) and never read absl flags.
"""

import dataclasses
import json
import os

import tensorflow as tf

from simclr_tf.errors import first_line
from simclr_tf.rundir import write_atomically

CONFIG_FILENAME = "config.json"

# The allowed values of the settings (tests/test_config.py checks each against its implementation).
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
LOSSES = ("nt_xent", "nt_logistic", "margin_triplet", "supcon")
SEMI_HARD_LOSSES = ("nt_logistic", "margin_triplet")
AUGMENTATIONS = ("crop", "cutout", "color", "sobel", "noise", "blur", "rotate")
OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
EVAL_RESIZES = ("bilinear", "bicubic")
TRAIN_MODES = ("pretrain", "finetune", "distill")
EVAL_PROTOCOLS = ("probe", "knn", "linear")
EVAL_BASELINES = ("raw_pixels", "random_encoder")
# --corrupt kinds (Cole et al. 2022's data-quality study) and the values each takes.
CORRUPTIONS = {
    "downsample": ("F", "a factor F > 1: down to 1/F of the side, then back up (bilinear)"),
    "jpeg": ("Q", "a JPEG quality Q in 1..100"),
    "salt_pepper": ("P", "a fraction P in [0, 1] of pixels set to black or white"),
    "blur": ("SIGMA", "a Gaussian sigma > 0 in pixels"),
}
# Smallest input side that f's strides divide evenly down to one pixel (resnet.min_image_size).
MIN_IMAGE_SIZE = {"CIFAR": 8, "ImageNet": 32}
# image_size at or below which the CIFAR stem and no blur are the defaults (the paper's CIFAR-10).
SMALL_IMAGE_SIZE = 32


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag and what to do."""


def _setting(default, help, choices=None):  # noqa: A002 (the absl name)
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = _setting(
        "fashion_mnist",
        "tensorflow-datasets name, or folder:/path/to/images (sub-folders = classes), or a "
        "union of them joined by '+' (mixed in proportion to their sizes).")
    data_dir: str | None = _setting(None, "tensorflow-datasets data directory.")
    train_split: str = _setting("train", "Split to pretrain on.")
    eval_split: str = _setting("test", "Split to evaluate on.")
    image_size: int = _setting(32, "Side of the square views fed to the encoder.")
    cache_dataset: bool = _setting(False, "Cache the decoded dataset in memory.")
    tf_data_service: str | None = _setting(
        None, "grpc://host:port of a tf.data service dispatcher: decode and augment on its "
        "workers instead of this host.")
    train_examples: int = _setting(
        0, "Train on this many images of train_split: a seeded random subset, a smaller one "
        "inside a larger one (0: all). Fine-tuning's label fraction is taken within it.")
    train_examples_seed: int = _setting(0, "Seed of the train_examples subset.")
    corrupt: str | None = _setting(
        None, "Corrupt every training image (pretraining, fine-tuning, distillation) before "
        "augmenting it, the same way every time: downsample:F, jpeg:Q, salt_pepper:P or "
        "blur:SIGMA.")
    eval_corrupt: str | None = _setting(
        None, "The same for the images evaluation reads (its train-split bank and eval split).")
    eval_resize: str = _setting(
        "bilinear", "How the evaluation preprocessing (and an export's serving_bytes) resizes "
        "the centre crop: bilinear (the training views' resize), or bicubic (the original "
        "code's tf.image.resize; runs converted from it are set to it).")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    color_jitter_strength: float = _setting(
        1.0, "Colour jitter strength s; 0 leaves out the whole colour distortion, random "
        "grayscale included, as the original code.")
    use_blur: bool | None = _setting(
        None, f"Gaussian blur in the views; default: on when image_size > {SMALL_IMAGE_SIZE} "
        "(as the paper).")
    augmentations: str | None = _setting(
        None, "Ordered comma-separated transforms of the paper's Figure 4, e.g. crop,color, from "
        "crop (+ resize, flip), cutout, color (jitter + grayscale), sobel, noise, blur, rotate; "
        "default: the paper's recipe (then use_blur applies).")
    asymmetric_augment: bool = _setting(
        False, "Augment one view only; the other is the resized image (paper's Figure 5).")
    augment_on_device: bool = _setting(
        False, "Pretraining: make the two views inside the training step, on each replica's "
        "device, from uint8 batches the host only decodes (for GPU/TPU hosts whose CPU cannot "
        "keep up); images of one size give the same views as on the host.")
    augment_input_size: int | None = _setting(
        None, "With augment_on_device, the side images of varying size (folders, ImageNet) are "
        "resized to, whole and as uint8, so that they batch; default: image_size x 8/7 "
        "(256 for 224).")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    resnet_depth: int = _setting(50, "ResNet depth: 18, 34, 50, 101, 152 or 200.")
    width_multiplier: int = _setting(1, "ResNet width multiplier.")
    sk_ratio: float = _setting(
        0.0, "Selective-kernel ratio (SimCLRv2: 0.0625); 0 disables SK.")
    se_ratio: float = _setting(0.0, "Squeeze-and-excitation ratio; 0 disables SE.")
    cifar_stem: bool | None = _setting(
        None, "3x3 stride-1 stem without max-pool; default: on when image_size <= "
        f"{SMALL_IMAGE_SIZE}.")
    global_bn: bool = _setting(True, "Synchronise batch-norm statistics across replicas.")
    batch_norm_decay: float = _setting(0.9, "Batch-norm moving-average decay.")
    batch_norm_epsilon: float = _setting(1e-5, "Batch-norm epsilon.")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    proj_head_mode: str = _setting("nonlinear", "Projection head g.", choices=PROJ_HEAD_MODES)
    num_proj_layers: int = _setting(2, "Layers of the non-linear head (SimCLRv2: 3).")
    proj_out_dim: int = _setting(128, "Width of z.")
    proj_head_hidden_dim: int = _setting(
        0, "Width of the head's hidden layers; 0: width of h.")

    @property
    def num_layers(self):
        """Dense layers of the head these settings describe."""
        return {"none": 0, "linear": 1}.get(self.proj_head_mode, self.num_proj_layers)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    temperature: float = _setting(0.1, "Temperature of nt_xent, nt_logistic and supcon.")
    hidden_norm: bool = _setting(True, "l2-normalise z before the similarities.")
    loss: str = _setting(
        "nt_xent", "nt_xent, nt_logistic, margin_triplet (paper's Table 4) or supcon "
        "(supervised contrastive: same-class views are positives; needs labels).")
    semi_hard_negatives: bool = _setting(
        False, "Semi-hard negative mining for nt_logistic and margin_triplet.")
    margin: float = _setting(1.0, "Margin m of --loss=margin_triplet.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    optimizer: str = _setting("lars", "lars, momentum or adam.")
    learning_rate: float = _setting(0.3, "Base learning rate (scaled by the batch size).")
    learning_rate_scaling: str = _setting(
        "linear", "linear (x batch/256) or sqrt (x sqrt(batch)).")
    momentum: float = _setting(0.9, "Momentum.")
    weight_decay: float = _setting(1e-6, "Weight decay.")
    warmup_epochs: float = _setting(10.0, "Linear warm-up epochs.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str = _setting("/tmp/simclr_tf", "Checkpoints, summaries, config and exports.")
    train_batch_size: int = _setting(512, "Global batch size (images; two views each).")
    train_epochs: int = _setting(100, "Epochs, unless train_steps is set.")
    train_steps: int = _setting(0, "Total steps; overrides train_epochs when > 0.")
    steps_per_loop: int = _setting(10, "Steps per compiled loop call (and per log line).")
    checkpoint_steps: int = _setting(500, "Checkpoint every this many steps.")
    checkpoint_epochs: int = _setting(
        0, "Checkpoint every this many epochs instead of checkpoint_steps (the original "
        "code's flag); 0: every checkpoint_steps.")
    keep_checkpoint_max: int = _setting(5, "Checkpoints kept.")
    lineareval_while_pretraining: bool = _setting(
        True, "Train a linear probe on stop_gradient(h) when the dataset has labels.")
    seed: int = _setting(0, "Seed of the weights and augmentations.")
    jit_compile: bool = _setting(
        False, "XLA-compile the train step (pretraining, fine-tuning and distillation).")
    precision: str = _setting(
        "auto", "auto (bfloat16 where the hardware has it natively, else float32: "
        "simclr_tf/precision.py), float32, bfloat16 or float16 (Keras mixed precision).")
    summary_images: int = _setting(
        4, "Augmented view pairs written to TensorBoard at the start of pretraining.")
    export_every: int = _setting(
        0, "Also export f at every this many checkpoints, i.e. at the multiples of "
        "checkpoint_steps x export_every (0: only at the end).")
    keep_export_max: int = _setting(5, "Exports kept in <model_dir>/export; 0: all.")
    train_mode: str = _setting(
        "pretrain", "pretrain (SimCLR), finetune (incl. linear eval: --fine_tune_after_block=4) "
        "or distill (SimCLRv2: a fine-tuned --teacher labels the train split).")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning / linear evaluation (train_mode=finetune) and the distillation student."""
    checkpoint: str | None = _setting(
        None, "finetune/distill: start from this pretraining run directory, checkpoint or "
        "exported encoder version (its architecture replaces the model flags); ignored when "
        "model_dir already has a checkpoint (resume).")
    fine_tune_after_block: int = _setting(
        -1, "Freeze f up to: -1 nothing, 0 the stem, 1..3 block group k, 4 all of f (linear "
        "evaluation).")
    ft_proj_selector: int = _setting(
        0, "Classify the output of projection-head layer j (SimCLRv2); 0: h; negative counts "
        "from the end as the original (-1: the last layer).")
    zero_init_logits_layer: bool = _setting(
        False, "Start the classifier at zero; otherwise it starts from the linear probe of the "
        "pretraining checkpoint when that fits (as the original), else at N(0, 0.01^2).")
    logits_from_probe: bool = _setting(
        True, "Without zero_init_logits_layer, start the classifier from the pretraining "
        "checkpoint's linear probe when it fits (the original restores it with the model).")
    train_label_fraction: float = _setting(
        1.0, "Class-balanced fraction of the train split that keeps its labels (0.01, 0.1).")
    train_label_ids: str | None = _setting(
        None, "File of example ids (split indices, tfds file names, or paths below a folder: "
        "dataset's split folder; one a line) to fine-tune on, like the ImageNet 1%/10% lists; "
        "overrides the fraction.")
    train_label_seed: int = _setting(0, "Seed of the label-fraction subset.")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """SimCLRv2 distillation (train_mode=distill): a fine-tuned teacher labels the train split."""
    teacher: str | None = _setting(
        None, "distill: the fine-tuned teacher's model_dir or checkpoint.")
    distill_temperature: float = _setting(
        1.0, "Temperature of teacher and student softmaxes.")
    distill_label_weight: float = _setting(
        0.0, "Weight of the labelled loss (on the label subset) in distillation; 0: none.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    eval_batch_size: int = _setting(256, "Batch size of evaluation.")
    eval_steps: int = _setting(
        0, "Evaluate on the first this many batches of the eval split (the original code's "
        "flag); 0: all of it.")
    eval_protocols: str = _setting(
        "probe,knn,linear", "What evaluating a pretraining checkpoint reports: probe (the "
        "linear probe of pretraining), knn, linear (logistic regression on extracted h).")
    eval_baselines: str = _setting(
        "", "Baselines a pretraining checkpoint is judged against, evaluated the same way (kNN, "
        "linear): raw_pixels, random_encoder (f at random initialisation); empty: none.")
    eval_every: int = _setting(0, "kNN monitor every this many pretraining steps; 0: off.")
    label_map: str | None = _setting(
        None, "Evaluate at a coarser label level: a built-in map (fashion_mnist_coarse) or a "
        "JSON file {fine class name or id: coarse class name}.")
    knn_k: int = _setting(200, "Neighbours of the kNN classifier.")
    knn_temperature: float = _setting(
        0.1, "Temperature of the kNN vote weights exp(cos / t).")
    knn_bank_size: int = _setting(
        0, "Training examples in the kNN (and fast linear eval) bank; 0: all.")
    projector_examples: int = _setting(
        1000, "Evaluation images whose h, label and thumbnail are written for TensorBoard's "
        "embedding projector (in eval_<split>/); 0: none.")
    neighbour_queries: int = _setting(
        8, "Rows of the nearest-neighbour picture (an evaluation image beside its 8 nearest "
        "bank images under f), in TensorBoard's Images tab and <model_dir>/"
        "nearest_neighbours.png; 0: none.")
    eval_timeout: int = _setting(
        0, "mode=eval: stop after this many seconds without a new checkpoint; 0: never.")
    eval_image_size: int = _setting(
        0, "Side of the images kNN, linear eval and classifier accuracy see (the pretraining "
        "probe stays at image_size); 0: image_size. Larger can pay: random resized crops "
        "enlarge objects in training (Touvron et al. 2019).")
    eval_dataset: str | None = _setting(
        None, "Evaluate f on this dataset instead of the pretraining one (kNN, linear "
        "evaluation and baselines; the probe belongs to the pretraining classes): the domain "
        "study. Its splits: eval_dataset_train_split (the bank) and eval_dataset_split.")
    eval_dataset_train_split: str = _setting(
        "train", "eval_dataset's split for the kNN bank and the linear evaluation's training.")
    eval_dataset_split: str = _setting("test", "eval_dataset's split to evaluate on.")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Limits of an export's `serving_bytes` signature, checked from the files' headers before
    anything is decoded (a small PNG can declare 20,000 x 20,000 pixels)."""
    max_image_pixels: int = _setting(
        16_000_000, "Exports: serving_bytes refuses an image file of more pixels (16 M: a 16-MP "
        "photo, 48 MB once decoded).")
    max_request_pixels: int = _setting(
        64_000_000, "Exports: serving_bytes refuses a request whose images hold more pixels "
        "together.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, by section. Unset derived defaults are resolved here:
    `augment.use_blur`, `augment.augment_input_size` and `encoder.cifar_stem` follow
    `data.image_size`."""
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    encoder: EncoderConfig = EncoderConfig()
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    serving: ServingConfig = ServingConfig()

    def __post_init__(self):
        small = self.data.image_size <= SMALL_IMAGE_SIZE
        if self.augment.use_blur is None:
            object.__setattr__(self, "augment",
                               dataclasses.replace(self.augment, use_blur=not small))
        if self.encoder.cifar_stem is None:
            object.__setattr__(self, "encoder",
                               dataclasses.replace(self.encoder, cifar_stem=small))
        if self.augment.augment_input_size is None:
            size = round(self.data.image_size * 8 / 7)
            object.__setattr__(self, "augment",
                               dataclasses.replace(self.augment, augment_input_size=size))

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """The config `to_json` wrote; ConfigError naming any section or setting it does not know
        (a setting it lacks takes its default: a run written before the setting existed)."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object of sections, got {raw!r:.80}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = [name for name in raw if name not in sections]
        kwargs = {}
        for name, section_cls in sections.items():
            values = raw.get(name, {})
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown += [f"{name}.{key}" for key in values if key not in known]
            kwargs[name] = section_cls(**{k: v for k, v in values.items() if k in known})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}: written by another "
                              "version of simclr_tf? remove them or use a matching version")
        return cls(**kwargs)


SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


def settings():
    """[(section name, dataclasses.Field)] of every setting, in declaration order."""
    return [(section.name, field) for section in dataclasses.fields(RunConfig)
            for field in dataclasses.fields(section.type)]


# --------------------------------------------------------------------------------------------
# config.json.

def path_in(model_dir):
    return os.path.join(model_dir, CONFIG_FILENAME)


def save(config, model_dir):
    """Writes `<model_dir>/config.json` atomically (a temporary file, then renamed)."""
    tf.io.gfile.makedirs(model_dir)
    path = path_in(model_dir)
    write_atomically(path, config.to_json())
    return path


def load(model_dir):
    """Reads `<model_dir>/config.json`; ConfigError when the run has none or it is unreadable."""
    path = path_in(model_dir)
    if not tf.io.gfile.exists(path):
        raise ConfigError(f"{path} not found: is --model_dir a simclr_tf training directory?")
    try:
        with tf.io.gfile.GFile(path) as f:
            return RunConfig.from_json(f.read())
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({first_line(e)}): use a new --model_dir, or "
                          "restore the file") from None


# --------------------------------------------------------------------------------------------
# Validation.

def _check(condition, message):
    if not condition:
        raise ConfigError(message)


def _stem_name(cifar_stem):
    return "CIFAR" if cifar_stem else "ImageNet"


def validate(config, num_replicas=1, strategy="default"):
    """Raises ConfigError (one line, naming the flag) for a setting that cannot run.

    `strategy` is the --strategy name; with `num_replicas` it says how the step is distributed.
    """
    _validate_encoder(config)
    _validate_data(config.data)
    _validate_training(config, num_replicas, strategy)
    _validate_optimizer(config.optimizer)
    _validate_head_and_loss(config)
    _validate_evaluation(config)
    validate_serving(config.serving)


def _validate_data(data):
    _check(data.train_examples >= 0,
           f"train_examples must be 0 (all) or a number of images, got {data.train_examples}")
    _check(0 <= data.train_examples_seed < 2**32,
           f"train_examples_seed must be in 0..2**32-1, got {data.train_examples_seed}")
    parse_corruption(data.corrupt, "corrupt")
    _check(data.eval_resize in EVAL_RESIZES,
           f"eval_resize must be one of {EVAL_RESIZES}, got {data.eval_resize!r}")
    parse_corruption(data.eval_corrupt, "eval_corrupt")


def validate_serving(serving):
    """ConfigError unless the export's pixel limits are positive, a request's at least an
    image's."""
    _check(serving.max_image_pixels > 0,
           f"max_image_pixels must be positive, got {serving.max_image_pixels}")
    _check(serving.max_request_pixels >= serving.max_image_pixels,
           f"max_request_pixels={serving.max_request_pixels} is below max_image_pixels="
           f"{serving.max_image_pixels}: a request of one largest image must fit")


def _validate_encoder(config):
    enc, size = config.encoder, config.data.image_size
    _check(enc.resnet_depth in RESNET_DEPTHS,
           f"resnet_depth must be one of {list(RESNET_DEPTHS)}, got {enc.resnet_depth}")
    _check(isinstance(enc.width_multiplier, int) and enc.width_multiplier >= 1,
           f"width_multiplier must be a positive integer, got {enc.width_multiplier}")
    _check(0.0 <= enc.sk_ratio < 1.0, f"sk_ratio must be in [0, 1), got {enc.sk_ratio}")
    _check(0.0 <= enc.se_ratio < 1.0, f"se_ratio must be in [0, 1), got {enc.se_ratio}")
    _check(0.0 < enc.batch_norm_decay < 1.0,
           f"batch_norm_decay must be in (0, 1), got {enc.batch_norm_decay}")
    _check(enc.batch_norm_epsilon > 0,
           f"batch_norm_epsilon must be positive, got {enc.batch_norm_epsilon}")
    stem = _stem_name(enc.cifar_stem)
    _check(size >= MIN_IMAGE_SIZE[stem],
           f"image_size={size} is too small for the {stem} stem: use at least "
           f"{MIN_IMAGE_SIZE[stem]}")
    eval_size = config.eval.eval_image_size
    _check(eval_size == 0 or eval_size >= MIN_IMAGE_SIZE[stem],
           f"eval_image_size={eval_size} is too small for the {stem} stem: use at least "
           f"{MIN_IMAGE_SIZE[stem]}, or 0 for image_size")


def _validate_training(config, num_replicas, strategy):
    train = config.train
    batch = train.train_batch_size
    _check(train.train_mode in TRAIN_MODES,
           f"train_mode must be one of {TRAIN_MODES}, got {train.train_mode!r}")
    _check(batch > 0, f"train_batch_size must be positive, got {batch}")
    # Every other view of the global batch is a negative: one image leaves only its positive.
    _check(batch >= 2 or train.train_mode != "pretrain",
           f"train_batch_size={batch} leaves the contrastive loss without negatives (an image's "
           "only other view is its positive): use at least 2")
    _check(batch % num_replicas == 0,
           f"train_batch_size={batch} is not divisible by the {num_replicas} replicas: use a "
           f"multiple of {num_replicas}")
    # Keras 3 turns jit_compile off under tf.distribute for the same reason: the replicas'
    # variables live on different devices, and XLA cannot compile the step's merge_call
    # (gradient all-reduce, synchronised batch norm, gathered negatives). TPUStrategy compiles it.
    _check(not train.jit_compile or num_replicas == 1 or strategy == "tpu",
           f"jit_compile=True runs one replica (or --strategy=tpu), not {num_replicas} replicas of "
           f"--strategy={strategy}: XLA cannot compile that step's cross-replica ops; drop "
           f"--jit_compile or use one replica")
    _check(train.train_steps > 0 or train.train_epochs > 0,
           "set train_epochs or train_steps to a positive number")
    _check(train.train_steps >= 0, f"train_steps must be >= 0, got {train.train_steps}")
    _check(train.train_epochs >= 0, f"train_epochs must be >= 0, got {train.train_epochs}")
    _check(train.export_every >= 0, f"export_every must be >= 0, got {train.export_every}")
    _check(train.summary_images >= 0,
           f"summary_images must be >= 0, got {train.summary_images}")
    _check(0 <= train.seed < 2**32, f"seed must be in 0..2**32-1, got {train.seed}")
    for name in ("steps_per_loop", "keep_checkpoint_max"):
        _check(getattr(train, name) > 0, f"{name} must be positive, got {getattr(train, name)}")
    _check(train.checkpoint_steps > 0 or train.checkpoint_epochs > 0,
           f"checkpoint_steps must be positive (or checkpoint_epochs set), got "
           f"{train.checkpoint_steps}")
    for name in ("checkpoint_epochs", "keep_export_max"):
        _check(getattr(train, name) >= 0, f"{name} must be >= 0, got {getattr(train, name)}")
    _check(train.precision in PRECISIONS,
           f"precision must be one of {PRECISIONS}, got {train.precision!r}")


def _validate_optimizer(opt):
    _check(opt.optimizer in OPTIMIZERS,
           f"optimizer must be one of {OPTIMIZERS}, got {opt.optimizer!r}")
    _check(opt.learning_rate_scaling in LR_SCALINGS,
           f"learning_rate_scaling must be one of {LR_SCALINGS}, got {opt.learning_rate_scaling!r}")
    _check(opt.learning_rate > 0, f"learning_rate must be positive, got {opt.learning_rate}")
    _check(0.0 <= opt.momentum < 1.0, f"momentum must be in [0, 1), got {opt.momentum}")
    _check(opt.weight_decay >= 0, f"weight_decay must be >= 0, got {opt.weight_decay}")
    _check(opt.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {opt.warmup_epochs}")


def _validate_head_and_loss(config):
    head, loss, augment = config.head, config.loss, config.augment
    _check(head.proj_head_mode in PROJ_HEAD_MODES,
           f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {head.proj_head_mode!r}")
    _check(head.num_proj_layers >= 1, f"num_proj_layers must be >= 1, got {head.num_proj_layers}")
    _check(head.proj_out_dim >= 1, f"proj_out_dim must be positive, got {head.proj_out_dim}")
    _check(head.proj_head_hidden_dim >= 0,
           f"proj_head_hidden_dim must be >= 0 (0: the width of h), got "
           f"{head.proj_head_hidden_dim}")
    _check(loss.temperature > 0, f"temperature must be positive, got {loss.temperature}")
    _check(loss.loss in LOSSES, f"loss must be one of {LOSSES}, got {loss.loss!r}")
    _check(not loss.semi_hard_negatives or loss.loss in SEMI_HARD_LOSSES,
           f"semi_hard_negatives applies to --loss={'|'.join(SEMI_HARD_LOSSES)}, "
           f"not --loss={loss.loss}")
    _check(loss.margin >= 0, f"margin must be >= 0, got {loss.margin}")
    _check(augment.color_jitter_strength >= 0,
           f"color_jitter_strength must be >= 0, got {augment.color_jitter_strength}")
    _check(augment.augment_input_size > 0,
           f"augment_input_size must be positive, got {augment.augment_input_size}")
    _check(not augment.augment_on_device or config.train.train_mode == "pretrain",
           f"augment_on_device applies to --train_mode=pretrain, not "
           f"--train_mode={config.train.train_mode}: drop --augment_on_device")
    if augment.augmentations is not None:
        parse_augmentations(augment.augmentations)


def parse_augmentations(augmentations):
    """'crop,color' (or a sequence of names) -> ('crop', 'color'), validated.

    Raises:
      ConfigError: one line naming the allowed transforms, for an empty list, an unknown name or
        a name given twice.
    """
    if isinstance(augmentations, str):
        names = tuple(name.strip() for name in augmentations.split(","))
    else:
        names = tuple(augmentations)
    allowed = ",".join(AUGMENTATIONS)
    _check(names and all(names),
           f"augmentations={augmentations!r} has an empty name: give an ordered comma-separated "
           f"list from {allowed}")
    unknown = [name for name in names if name not in AUGMENTATIONS]
    _check(not unknown, f"augmentations: unknown {','.join(unknown)}: give an ordered "
                        f"comma-separated list from {allowed}")
    _check(len(set(names)) == len(names),
           f"augmentations={','.join(names)} names a transform twice: give each of {allowed} at "
           "most once")
    return names


def parse_corruption(text, flag="corrupt"):
    """'jpeg:10' -> ("jpeg", 10.0); None or '' -> None; ConfigError naming `flag` otherwise."""
    if not text:
        return None
    kind, _, value = text.partition(":")
    usage = ", ".join(f"{k}:{letter}" for k, (letter, _) in CORRUPTIONS.items())
    _check(kind in CORRUPTIONS and value, f"{flag}={text!r} is not one of {usage}")
    takes = CORRUPTIONS[kind][1]
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: {value!r} is not a number ({kind} takes "
                          f"{takes})") from None
    valid = {"downsample": number > 1, "jpeg": number == int(number) and 1 <= number <= 100,
             "salt_pepper": 0 <= number <= 1, "blur": number > 0}[kind]
    _check(valid, f"{flag}={text!r}: {kind} takes {takes}")
    return kind, number


def parse_protocols(text):
    """'knn,linear' -> ('knn', 'linear'); ConfigError for an empty list or an unknown name."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EVAL_PROTOCOLS]
    _check(names and not unknown, f"eval_protocols must be a comma-separated list from "
                                  f"{','.join(EVAL_PROTOCOLS)}, got {text!r}")
    return names


def parse_baselines(text):
    """'raw_pixels,random_encoder' -> a tuple ('' -> ()); ConfigError for an unknown name."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EVAL_BASELINES]
    _check(not unknown, f"eval_baselines must be a comma-separated list from "
                        f"{','.join(EVAL_BASELINES)} (or empty), got {text!r}")
    return names


def _validate_evaluation(config):
    ft, distill, ev = config.finetune, config.distill, config.eval
    _check(-1 <= ft.fine_tune_after_block <= 4,
           f"fine_tune_after_block must be in -1..4 (-1: all layers, 4: linear eval), got "
           f"{ft.fine_tune_after_block}")
    _check(0 <= ft.train_label_seed < 2**32,
           f"train_label_seed must be in 0..2**32-1, got {ft.train_label_seed}")
    _check(0.0 < ft.train_label_fraction <= 1.0,
           f"train_label_fraction must be in (0, 1] (0.01 = 1% of the labels), got "
           f"{ft.train_label_fraction}")
    _check(distill.distill_temperature > 0,
           f"distill_temperature must be positive, got {distill.distill_temperature}")
    _check(0.0 <= distill.distill_label_weight < 1.0,
           f"distill_label_weight must be in [0, 1), got {distill.distill_label_weight}")
    _check(config.train.train_mode != "distill" or distill.teacher,
           "train_mode=distill needs --teacher: the model_dir of a fine-tuned teacher run")
    _check(ev.eval_batch_size > 0, f"eval_batch_size must be positive, got {ev.eval_batch_size}")
    _check(ev.eval_steps >= 0, f"eval_steps must be >= 0 (0: the whole eval split), got "
                               f"{ev.eval_steps}")
    _check(ev.eval_every >= 0, f"eval_every must be >= 0 (0: no kNN monitor), got {ev.eval_every}")
    _check(ev.knn_k >= 1, f"knn_k must be >= 1, got {ev.knn_k}")
    _check(ev.knn_temperature > 0, f"knn_temperature must be positive, got {ev.knn_temperature}")
    _check(ev.knn_bank_size >= 0,
           f"knn_bank_size must be >= 0 (0: the whole train split), got {ev.knn_bank_size}")
    _check(0 <= ev.projector_examples <= 10000,
           f"projector_examples must be in [0, 10000] (the projector's sprite holds at most "
           f"8192 x 8192 pixels), got {ev.projector_examples}")
    _check(0 <= ev.neighbour_queries <= 64,
           f"neighbour_queries must be in [0, 64], got {ev.neighbour_queries}")
    _check(ev.eval_timeout >= 0, f"eval_timeout must be >= 0, got {ev.eval_timeout}")
    parse_protocols(ev.eval_protocols)
    parse_baselines(ev.eval_baselines)


# --------------------------------------------------------------------------------------------
# A model_dir reused by another command.

def _unless_pretraining(config, value):
    """A fine-tuning setting, or None in a pretraining run (where the flag is not used)."""
    return None if config.train.train_mode == "pretrain" else value


# Settings that change which variables a checkpoint holds or what its optimiser slots mean; a run
# resuming from a checkpoint must match them (learning rate, steps, data, ... may change).
_MODEL_SETTINGS = (
    ("resnet_depth", lambda c: c.encoder.resnet_depth),
    ("width_multiplier", lambda c: c.encoder.width_multiplier),
    ("sk_ratio", lambda c: c.encoder.sk_ratio),
    ("se_ratio", lambda c: c.encoder.se_ratio),
    ("cifar_stem", lambda c: c.encoder.cifar_stem),
    ("proj_head_mode", lambda c: c.head.proj_head_mode),
    ("num_proj_layers", lambda c: c.head.num_proj_layers),
    ("proj_out_dim", lambda c: c.head.proj_out_dim),
    ("proj_head_hidden_dim", lambda c: c.head.proj_head_hidden_dim),
    ("optimizer", lambda c: c.optimizer.optimizer),
    ("lineareval_while_pretraining", lambda c: c.train.lineareval_while_pretraining),
    # Which layers of f train, and which head layer feeds the classifier, change the checkpoint.
    ("fine_tune_after_block", lambda c: _unless_pretraining(c, c.finetune.fine_tune_after_block)),
    ("ft_proj_selector", lambda c: _unless_pretraining(c, c.finetune.ft_proj_selector)),
    # float16 wraps the optimiser in a LossScaleOptimizer (other variables in the checkpoint).
    ("precision", lambda c: "float16" if c.train.precision == "float16" else "float32/bfloat16"),
)


def model_differences(saved, config):
    """["name=saved there, new in these flags", ...] for settings that change the checkpoint."""
    there, here = saved.train.train_mode, config.train.train_mode
    if there != here:  # pretraining, fine-tuning and distillation checkpoint different objects
        return [f"train_mode={there} there, {here} in these flags"]
    differences = []
    for name, get in _MODEL_SETTINGS:
        there, here = get(saved), get(config)
        if there != here:
            differences.append(f"{name}={there} there, {here} in these flags")
    return differences


def on_eval_dataset(config):
    """`config` reading `eval.eval_dataset` (and its splits) where evaluation reads the
    pretraining dataset, when one is set; the domain study evaluates f there."""
    ev = config.eval
    if not ev.eval_dataset:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(
        config.data, dataset=ev.eval_dataset, train_split=ev.eval_dataset_train_split,
        eval_split=ev.eval_dataset_split))


def config_for_evaluation(requested, given=frozenset()):
    """The saved config of the run in `requested.train.model_dir`, with the evaluation settings
    (eval section, eval split, data_dir) of `requested`: the model is rebuilt as it was trained.

    Two settings describe how the run's f is evaluated rather than what an evaluation asks, and
    stay the run's own unless named in `given` (the flags given explicitly): the evaluation resize
    (a converted run's bicubic) and the evaluation image size (the 48 px a run on 32-px views
    chose, where f is worth several points more than at 32).
    """
    model_dir = requested.train.model_dir
    saved = load(model_dir)

    def chosen(section_name, name):
        section = requested if name in given else saved
        return getattr(getattr(section, section_name), name)

    return dataclasses.replace(
        saved, eval=dataclasses.replace(requested.eval,
                                        eval_image_size=chosen("eval", "eval_image_size")),
        data=dataclasses.replace(saved.data, eval_split=requested.data.eval_split,
                                 data_dir=requested.data.data_dir or saved.data.data_dir,
                                 eval_corrupt=requested.data.eval_corrupt,
                                 eval_resize=chosen("data", "eval_resize")),
        train=dataclasses.replace(saved.train, model_dir=model_dir))


def check_same_model(config, model_dir):
    """ConfigError if `<model_dir>/config.json` describes a model other than `config`.

    Call it when model_dir holds checkpoints, before its config.json is replaced. A model_dir
    without config.json passes: restoring then checks the variables themselves.
    """
    if not tf.io.gfile.exists(path_in(model_dir)):
        return
    differences = "; ".join(model_differences(load(model_dir), config))
    _check(not differences,
           f"--model_dir={model_dir} holds checkpoints of another model ({differences}): use a "
           "new --model_dir, or the model flags of the run that wrote it")
