"""Plain, validated configuration objects, built once from flags and saved beside the checkpoints.

Every library module takes these (or plain arguments) and never reads absl flags. `RunConfig` is
written to `<model_dir>/config.json`; the export rebuilds the encoder from it, so a run's
architecture never has to be typed again.
"""

import dataclasses
import json
import os

from simclr_tf.resnet import min_image_size, output_dim, resnet, validate as validate_resnet
from simclr_tf.heads import PROJ_HEAD_MODES
from simclr_tf.augment import parse_augmentations
from simclr_tf.losses import DEFAULT_MARGIN, LOSSES, SEMI_HARD_LOSSES
from simclr_tf.schedules import LR_SCALINGS

OPTIMIZERS = ("lars", "momentum", "adam")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")
CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag and what to do."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32
    cache_dataset: bool = False
    tf_data_service: str | None = None


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    color_jitter_strength: float = 1.0
    use_blur: bool = False
    augmentations: str | None = None  # None: the paper's recipe; else e.g. "crop,color"
    asymmetric_augment: bool = False


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    resnet_depth: int = 50
    width_multiplier: int = 1
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    cifar_stem: bool = False
    global_bn: bool = True
    batch_norm_decay: float = 0.9
    batch_norm_epsilon: float = 1e-5

    def build(self, image_size=None, global_bn=None):
        """The Keras encoder f these settings describe."""
        return resnet(
            self.resnet_depth, self.width_multiplier, self.sk_ratio, self.se_ratio,
            cifar_stem=self.cifar_stem, image_size=image_size,
            global_bn=self.global_bn if global_bn is None else global_bn,
            bn_momentum=self.batch_norm_decay, bn_epsilon=self.batch_norm_epsilon,
            name="encoder")

    @property
    def output_dim(self):
        return output_dim(self.resnet_depth, self.width_multiplier)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    proj_head_mode: str = "nonlinear"
    num_proj_layers: int = 2
    proj_out_dim: int = 128
    proj_head_hidden_dim: int = 0  # 0: the width of h


@dataclasses.dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.1
    hidden_norm: bool = True
    loss: str = "nt_xent"
    semi_hard_negatives: bool = False
    margin: float = DEFAULT_MARGIN


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    optimizer: str = "lars"
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str = "/tmp/simclr_tf"
    train_batch_size: int = 512
    train_epochs: int = 100
    train_steps: int = 0
    steps_per_loop: int = 10
    checkpoint_steps: int = 500
    keep_checkpoint_max: int = 5
    lineareval_while_pretraining: bool = True
    seed: int = 0
    jit_compile: bool = False
    precision: str = "float32"
    summary_images: int = 4
    export_every: int = 0
    keep_export_max: int = 5
    train_mode: str = "pretrain"  # pretrain, finetune or distill


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning / linear evaluation (train_mode=finetune) and the distillation student."""
    checkpoint: str | None = None  # pretraining run, checkpoint or export to start from
    fine_tune_after_block: int = -1  # -1 all of f trains, 0 after the stem, k after group k, 4 none
    ft_proj_selector: int = 0  # 0: classify h; j: the output of head layer j; -1: the last
    zero_init_logits_layer: bool = False
    train_label_fraction: float = 1.0
    train_label_ids: str | None = None  # file of example ids (indices or file names)
    train_label_seed: int = 0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """SimCLRv2 distillation (train_mode=distill): a fine-tuned teacher labels the train split."""
    teacher: str | None = None  # the fine-tuned teacher's run directory (or checkpoint)
    distill_temperature: float = 1.0
    distill_label_weight: float = 0.0  # weight of the labelled loss; 1 - this weighs distillation


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    eval_batch_size: int = 256
    eval_protocols: str = "probe,knn,linear"  # what evaluating a pretraining checkpoint reports
    eval_every: int = 0  # kNN monitor every this many pretraining steps; 0 = off
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_bank_size: int = 0  # training examples in the kNN bank; 0 = the whole train split
    eval_timeout: int = 0  # mode=eval: stop after this many seconds without a new checkpoint
    eval_image_size: int = 0  # side of the images evaluation sees; 0 = data.image_size


@dataclasses.dataclass(frozen=True)
class RunConfig:
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

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        raw = json.loads(text)
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, section_type in sections.items():
            section_cls = globals()[section_type] if isinstance(section_type, str) else section_type
            known = {f.name for f in dataclasses.fields(section_cls)}
            kwargs[name] = section_cls(**{k: v for k, v in raw.get(name, {}).items() if k in known})
        return cls(**kwargs)


def save(config, model_dir):
    """Writes config.json atomically (write a temporary file, then rename)."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILENAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(config.to_json())
    os.replace(tmp, path)
    return path


def load(model_dir):
    """Reads `<model_dir>/config.json`; ConfigError when the run has none."""
    path = os.path.join(model_dir, CONFIG_FILENAME)
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: is --model_dir a simclr_tf training directory?")
    with open(path) as f:
        return RunConfig.from_json(f.read())


def _check(condition, message):
    if not condition:
        raise ConfigError(message)


def validate(config, num_replicas=1, strategy="default"):
    """Raises ConfigError (one line, naming the flag) for a setting that cannot run.

    `strategy` is the --strategy name; with `num_replicas` it says how the step is distributed.
    """
    data, enc, head, opt, train = (config.data, config.encoder, config.head, config.optimizer,
                                   config.train)
    try:
        validate_resnet(enc.resnet_depth, enc.width_multiplier, enc.sk_ratio, enc.se_ratio)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    min_size = min_image_size(enc.cifar_stem)
    _check(data.image_size >= min_size,
           f"image_size={data.image_size} is too small for the "
           f"{'CIFAR' if enc.cifar_stem else 'ImageNet'} stem: use at least {min_size}")
    _check(train.train_batch_size > 0,
           f"train_batch_size must be positive, got {train.train_batch_size}")
    _check(train.train_batch_size % num_replicas == 0,
           f"train_batch_size={train.train_batch_size} is not divisible by the {num_replicas} "
           f"replicas: use a multiple of {num_replicas}")
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
    _check(0 <= train.seed < 2**32, f"seed must be in 0..2**32-1, got {train.seed}")
    for name in ("steps_per_loop", "checkpoint_steps", "keep_checkpoint_max", "keep_export_max"):
        _check(getattr(train, name) > 0, f"{name} must be positive, got {getattr(train, name)}")
    _check(train.precision in PRECISIONS,
           f"precision must be one of {PRECISIONS}, got {train.precision!r}")
    _check(opt.optimizer in OPTIMIZERS,
           f"optimizer must be one of {OPTIMIZERS}, got {opt.optimizer!r}")
    _check(opt.learning_rate_scaling in LR_SCALINGS,
           f"learning_rate_scaling must be one of {LR_SCALINGS}, got {opt.learning_rate_scaling!r}")
    _check(opt.learning_rate > 0, f"learning_rate must be positive, got {opt.learning_rate}")
    _check(0.0 <= opt.momentum < 1.0, f"momentum must be in [0, 1), got {opt.momentum}")
    _check(opt.weight_decay >= 0, f"weight_decay must be >= 0, got {opt.weight_decay}")
    _check(opt.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {opt.warmup_epochs}")
    _check(head.proj_head_mode in PROJ_HEAD_MODES,
           f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {head.proj_head_mode!r}")
    _check(head.num_proj_layers >= 1,
           f"num_proj_layers must be >= 1, got {head.num_proj_layers}")
    _check(head.proj_out_dim >= 1, f"proj_out_dim must be positive, got {head.proj_out_dim}")
    _check(config.loss.temperature > 0,
           f"temperature must be positive, got {config.loss.temperature}")
    _check(config.augment.color_jitter_strength >= 0,
           f"color_jitter_strength must be >= 0, got {config.augment.color_jitter_strength}")
    _check(0.0 < enc.batch_norm_decay < 1.0,
           f"batch_norm_decay must be in (0, 1), got {enc.batch_norm_decay}")
    _validate_ablations(config)
    _validate_evaluation(config)


def _validate_ablations(config):
    loss, head, augment = config.loss, config.head, config.augment
    _check(loss.loss in LOSSES, f"loss must be one of {LOSSES}, got {loss.loss!r}")
    _check(not loss.semi_hard_negatives or loss.loss in SEMI_HARD_LOSSES,
           f"semi_hard_negatives applies to --loss={'|'.join(SEMI_HARD_LOSSES)}, "
           f"not --loss={loss.loss}")
    _check(loss.margin >= 0, f"margin must be >= 0, got {loss.margin}")
    _check(head.proj_head_hidden_dim >= 0,
           f"proj_head_hidden_dim must be >= 0 (0: the width of h), got "
           f"{head.proj_head_hidden_dim}")
    if augment.augmentations is not None:
        try:
            parse_augmentations(augment.augmentations)
        except ValueError as e:
            raise ConfigError(str(e)) from None


TRAIN_MODES = ("pretrain", "finetune", "distill")
EVAL_PROTOCOLS = ("probe", "knn", "linear")


def parse_protocols(text):
    """'knn,linear' -> ('knn', 'linear'); ConfigError for an empty list or an unknown name."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EVAL_PROTOCOLS]
    if not names or unknown:
        raise ConfigError(f"eval_protocols must be a comma-separated list from "
                          f"{','.join(EVAL_PROTOCOLS)}, got {text!r}")
    return names


def _validate_evaluation(config):
    train, ft, distill, ev = config.train, config.finetune, config.distill, config.eval
    min_size = min_image_size(config.encoder.cifar_stem)
    _check(ev.eval_image_size == 0 or ev.eval_image_size >= min_size,
           f"eval_image_size={ev.eval_image_size} is too small for the "
           f"{'CIFAR' if config.encoder.cifar_stem else 'ImageNet'} stem: use at least "
           f"{min_size}, or 0 for image_size")
    _check(train.train_mode in TRAIN_MODES,
           f"train_mode must be one of {TRAIN_MODES}, got {train.train_mode!r}")
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
    _check(train.train_mode != "distill" or distill.teacher,
           "train_mode=distill needs --teacher: the model_dir of a fine-tuned teacher run")
    _check(ev.eval_batch_size > 0, f"eval_batch_size must be positive, got {ev.eval_batch_size}")
    _check(ev.eval_every >= 0, f"eval_every must be >= 0 (0: no kNN monitor), got {ev.eval_every}")
    _check(ev.knn_k >= 1, f"knn_k must be >= 1, got {ev.knn_k}")
    _check(ev.knn_temperature > 0, f"knn_temperature must be positive, got {ev.knn_temperature}")
    _check(ev.knn_bank_size >= 0,
           f"knn_bank_size must be >= 0 (0: the whole train split), got {ev.knn_bank_size}")
    _check(ev.eval_timeout >= 0, f"eval_timeout must be >= 0, got {ev.eval_timeout}")
    parse_protocols(ev.eval_protocols)
