"""Run configuration: one pydantic model validates YAML files, `--set` overrides and REST bodies alike.

Every field has a default that works on the built-in dataset, so a config file only says what differs.
Errors name the dotted path of the field at fault (see `ConfigError`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.modes import MODES, mode_spec, modes_where
from schemas.policy import PolicyName
from schemas.storage import Location, location_problem

Mode = Literal["paa", "lad", "kd", "solad", "colad"]  # spelled out for type checkers; the table is schemas.modes
if get_args(Mode) != MODES:
    raise ImportError(f"schemas.config.Mode {get_args(Mode)} disagrees with schemas.modes.MODES {MODES}")


class ConfigError(ValueError):
    """A config that cannot run; the message names the source and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _where(value: str) -> str:
    problem = location_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Where = Annotated[str, AfterValidator(_where)]  # a local path or a URI (s3://, gs://, file://): `schemas.storage`

PAD_DIVISOR = 32  # keep-ratio batches are padded to a multiple of this (as MMDetection's pad_size_divisor=32)


class DataConfig(_Strict):
    train: Where = "data/digits/train.json"
    val: Optional[Where] = "data/digits/val.json"
    image_root: Optional[Where] = Field(None, description="directory file_names are relative to; default: the json's")
    val_image_root: Optional[Where] = Field(
        None, description="the same for data.val (COCO keeps train2017/ and val2017/ apart); default: image_root")

    @property
    def val_root(self) -> Optional[str]:
        return self.val_image_root or self.image_root
    input_size: Union[int, tuple[int, int]] = Field(
        128, description="one number S: letterbox every image into an S x S square; a pair [long, short], e.g. "
        "[1333, 800] as the COCO recipes: resize keeping the aspect ratio to fit long x short, and pad each batch "
        f"only to its largest image, rounded up to a multiple of {PAD_DIVISOR}")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    group_by_orientation: bool = Field(
        True, description="with a [long, short] input_size: cut each batch from landscape images or from portrait "
        "images (as MMDetection's aspect-ratio grouping), so that batches are not padded to squares; the epoch's "
        "leftovers of both close it. No effect on square inputs")
    num_workers: int = Field(0, ge=0, description="torch DataLoader workers for in-process runs")

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v):
        sides = [v] if isinstance(v, int) else list(v)
        if any(not 32 <= s <= 4096 for s in sides):
            raise ValueError(f"sides must be between 32 and 4096, got {v}")
        if len(sides) == 2 and sides[0] < sides[1]:
            raise ValueError(f"a pair is [long, short] (e.g. [1333, 800]), got {list(v)}")
        return v


class ModelConfig(_Strict):
    depth: Literal[18, 34, 50, 101] = 18
    pretrained: Optional[Where] = Field(None, description="file with torchvision ResNet weights (state dict)")
    norm: Literal["bn", "frozen_bn", "gn"] = Field(
        "bn", description="backbone norm: bn (from scratch), frozen_bn (with pretrained weights), gn (same in "
        "train and eval mode)")
    num_classes: int = Field(10, ge=1)
    fpn_levels: list[int] = Field(default_factory=lambda: [2, 3, 4], description="pyramid levels, e.g. [3,4,5,6,7]")
    fpn_channels: int = Field(64, ge=8)
    head_convs: int = Field(2, ge=0, le=8)
    head_channels: int = Field(64, ge=8)
    octave_base_scale: float = Field(8.0, gt=0)
    frozen_stages: int = Field(
        -1, ge=-1, le=4, description="as MMDetection's ResNet: -1 trains every stage; 0 freezes the stem; N "
        "freezes the stem and layers 1..N (no gradients, no optimizer state, their BatchNorms kept in eval mode). "
        "For pretrained backbones; the official configs use 1")
    norm_eval: bool = Field(False, description="keep every backbone BatchNorm in eval mode while training: "
                            "running statistics stay those of the pretrained weights (the official configs: true)")

    @field_validator("fpn_levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or sorted(set(v)) != v or v[0] < 2 or v[0] > 5 or v[-1] > 7 or v != list(range(v[0], v[-1] + 1)):
            raise ValueError("must be consecutive increasing levels between 2 and 7, starting at 5 or below, "
                             "e.g. [3, 4, 5, 6, 7]")
        return v

    @model_validator(mode="after")
    def _frozen_within_backbone(self) -> "ModelConfig":
        built = max(lv for lv in self.fpn_levels if lv <= 5) - 1  # ResNet layers the FPN reads (C2 = layer1)
        if self.frozen_stages > built:
            raise ValueError(f"frozen_stages {self.frozen_stages} freezes layer{self.frozen_stages}, but with "
                             f"fpn_levels {self.fpn_levels} the backbone stops at layer{built}; use at most {built}")
        return self

    @property
    def strides(self) -> list[int]:
        return [2 ** level for level in self.fpn_levels]


class AssignConfig(_Strict):
    topk: int = Field(9, ge=1)
    iou_thr: float = Field(0.1, gt=0.0, le=1.0)
    gmm: Literal["torch", "sklearn"] = "torch"
    single_candidate: Literal["keep", "drop"] = Field(
        "keep", description="a GT with a single candidate anchor: keep it as that GT's positive (ours), or drop the "
        "GT from the selection, as every official training head does (the GMM needs two)")


class LossConfig(_Strict):
    cls_weight: float = Field(1.0, ge=0)
    box_weight: float = Field(1.3, ge=0)
    iou_weight: float = Field(0.5, ge=0)
    box_iou_weighted: bool = Field(True, description="weight GIoU by the IoU target, as PAA does (see decisions.md)")


class DistillConfig(_Strict):
    """Soft-label KD terms (modes kd, solad). None means the paper's value for the mode."""
    cls_weight: Optional[float] = Field(None, ge=0)
    iou_weight: Optional[float] = Field(None, ge=0)
    box_weight: Optional[float] = Field(None, ge=0)
    min_iou: Optional[float] = Field(None, ge=0, le=1)
    gamma: float = Field(0.5, ge=0)
    focal_smoothing: float = Field(
        0.0, ge=0, description="focal factor of the KD terms: 0 gives |t - p|^gamma (ours); e > 0 gives "
        "((t - p)^2 + e)^(gamma / 2), the official FocalKLLoss with e = 1e-6")


KD_DEFAULTS = {  # one entry per mode with `soft` (schemas.modes)
    "kd": dict(cls_weight=10.0, iou_weight=10.0, box_weight=1.3, min_iou=0.1),
    "solad": dict(cls_weight=2.0, iou_weight=10.0, box_weight=1.3, min_iou=0.5),
}
if set(KD_DEFAULTS) != set(modes_where("soft")):
    raise ImportError(f"schemas.config.KD_DEFAULTS covers {sorted(KD_DEFAULTS)}, the soft modes are "
                      f"{modes_where('soft')}")


class TeacherConfig(_Strict):
    checkpoint: Optional[Where] = Field(None, description="a checkpoint written by `lad train` (modes lad, kd, solad)")


class ColearnConfig(_Strict):
    model_b: Optional[ModelConfig] = Field(None, description="network B; default: the same as `model`")
    checkpoint_a: Optional[Where] = None
    checkpoint_b: Optional[Where] = None
    policy: PolicyName = Field("auto", description="auto | pin-a | pin-b | alternate:N")
    seed_b: Optional[int] = Field(None, description="initialisation seed of network B (default: model seed + 1)")
    mode: Literal["inline", "split"] = "inline"
    cpus_per_worker_b: Optional[float] = Field(
        None, gt=0, description="split: CPUs of each network-B worker (default: pipeline.cpus_per_worker)")
    gpus_per_worker_b: Optional[float] = Field(
        None, ge=0, description="split: GPUs of each network-B worker (default: pipeline.gpus_per_worker)")
    exchange_timeout_s: float = Field(
        600.0, gt=0, description="split: how long one side waits for the other at the coordinator")


class TrainConfig(_Strict):
    epochs: int = Field(12, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps (all epochs otherwise)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    warmup_max_fraction: Optional[float] = Field(
        None, gt=0, le=1, description="cap the warm-up at this fraction of the run's steps (rounded up), so a short "
        "run warms up over the same share of its length as the reference schedule")
    milestones: list[float] = Field(default_factory=lambda: [0.75, 0.9], description="fractions of the total steps")
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: Optional[float] = Field(35.0, gt=0)
    recipe: Literal["lad", "official"] = Field(
        "lad", description="lad: this project's defaults; official: the defaults of the official LAD/CoLAD configs "
        "(schemas.config.OFFICIAL_RECIPE; docs/decisions.md has the table). Fields set explicitly win")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: only at the end)")
    checkpoint_every: int = Field(200, ge=1, description="also checkpoint every N steps")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads")
    amp: bool = Field(False, description="mixed precision: forwards under autocast (see amp_dtype); candidate "
                      "losses, the GMM and loss reductions stay float32")
    channels_last: bool = Field(True, description="networks and images in NHWC memory, where oneDNN's convolutions "
                                "are faster (0.84-0.86x the float32 PAA step at digits scale and 0.87-0.91x at COCO "
                                "shapes, on a 2-core CPU; not measured on a GPU); false: PyTorch's NCHW, the same "
                                "arithmetic in another order")
    amp_dtype: Literal["auto", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CPU, fp16 with a loss scaler on CUDA; bf16 on a GPU that supports it")

    @field_validator("amp_dtype")
    @classmethod
    def _fp16_needs_cuda(cls, v: str, info) -> str:
        if v == "fp16" and info.data.get("amp") and info.data.get("device") == "cpu":
            raise ValueError("fp16 needs a CUDA device but train.device is cpu; use bf16 (or auto) on the CPU")
        return v


class InferenceConfig(_Strict):
    score_thr: float = Field(0.05, ge=0, le=1)
    nms_iou: float = Field(0.6, gt=0, le=1)
    pre_nms_topk: int = Field(1000, ge=1)
    max_det: int = Field(100, ge=1)
    score_voting: bool = True


class PipelineConfig(_Strict):
    """How a run is executed. `local` trains in this process; `ray` streams assignments from an actor pool."""
    engine: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = Field(None, description="None: a local Ray started in-process")
    num_workers: int = Field(1, ge=1, description="Ray Train student workers")
    assigners: int = Field(1, ge=1, description="teacher-assigner actors")
    assignment_store: Optional[Where] = Field(
        None, description="mode lad, engine ray: a folder (or s3://, gs:// URI) where the teacher's labels of each "
        "image view are kept and reused by later epochs and runs (pipeline.assignment_store); made if absent")
    cpus_per_worker: float = Field(0.5, gt=0)
    cpus_per_assigner: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    gpus_per_assigner: float = Field(0, ge=0)
    cpus_per_read_task: float = Field(0.25, gt=0)
    prefetch_batches: int = Field(2, ge=0)
    max_batches_ahead: Optional[int] = Field(
        None, ge=1, description="the stream holds at most this many batches that are assigned (or read) and not yet "
        "trained on; the teacher waits beyond it. Default: prefetch_batches + 4 per student worker. At least "
        "prefetch_batches + 2 per worker: Ray Data's iterator waits for prefetch_batches + 1 batches before it "
        "hands over the first")
    soft_label_quality: int = Field(
        85, ge=1, le=100, description="kd/solad through the stream: the AVIF quality of the picture the teacher's "
        "class probabilities travel as (trainer.soft_codec). 85 sends under a tenth of a COCO-sized JPEG with the "
        "KD loss within 0.4 % of dense (10 classes; docs/results.md); 100 is lossless, every probability within "
        "0.0031 of the teacher's, at about 4 times the bytes. In-process runs use the dense probabilities and "
        "ignore it")
    max_failures: int = Field(2, ge=0, description="lost Train workers the run recovers from, each time resuming "
                              "from checkpoints/last.pt (engine ray)")

    @model_validator(mode="before")
    @classmethod
    def _older_soft_label_settings(cls, data):
        """Configs (and the checkpoints that store them) from schemas 3-5 bound the soft labels' error by
        `soft_label_floor` or `soft_label_tolerance`. The picture has no such bound except when lossless, so 0
        (every entry exact) reads as quality 100 and any other value as the default quality."""
        if isinstance(data, dict) and {"soft_label_floor", "soft_label_tolerance"} & data.keys():
            data = dict(data)
            old = [data.pop(k) for k in ("soft_label_floor", "soft_label_tolerance") if k in data]
            if any(v == 0 for v in old):
                data.setdefault("soft_label_quality", 100)
        return data

    @model_validator(mode="after")
    def _ahead(self) -> "PipelineConfig":
        least = (self.prefetch_batches + 2) * self.num_workers
        if self.max_batches_ahead is not None and self.max_batches_ahead < least:
            raise ValueError(f"max_batches_ahead must be at least prefetch_batches + 2 per worker ({least} for "
                             f"{self.num_workers} workers and prefetch_batches {self.prefetch_batches}), "
                             f"got {self.max_batches_ahead}")
        return self

    @property
    def batches_ahead(self) -> int:
        return self.max_batches_ahead or (self.prefetch_batches + 4) * self.num_workers


# The official 1x schedule (CoLAD's configs/_base_/schedules/schedule_1x.py): 12 epochs with LR steps at epochs 8
# and 11, linear warm-up over 500 iterations from 0.001, no gradient clipping. 12 epochs of COCO train2017's
# 117,266 images with annotations at 16 images a batch are 87,960 iterations; 500 of them are 0.57 % of the run.
OFFICIAL_ITERATIONS = 87_960
OFFICIAL_RECIPE: dict[str, Any] = {  # dotted field -> the official value (docs/decisions.md names each source)
    "train.milestones": [8 / 12, 11 / 12],
    "train.grad_clip": None,
    "train.warmup_steps": 500,
    "train.warmup_ratio": 0.001,
    "train.warmup_max_fraction": 500 / OFFICIAL_ITERATIONS,
    "assign.single_candidate": "drop",
    "distill.focal_smoothing": 1e-6,
}


def official_values(raw: dict) -> dict[str, Any]:
    """`train.recipe: official` for this (raw) config: `OFFICIAL_RECIPE`, plus what depends on the mode and the
    backbones. The student's GIoU is unweighted where another network assigns (PAA_LAD_Head, which SoLAD's student
    uses too, and the CoLAD head), IoU-weighted where the student assigns itself (PAAHead). A pretrained backbone
    gets `frozen_stages: 1, norm_eval: true` (_paa_distil_fpn.py); one trained from scratch keeps every stage."""
    values = dict(OFFICIAL_RECIPE)
    mode = raw.get("mode", "paa")
    if mode in MODES:
        values["loss.box_iou_weighted"] = mode_spec(mode).assigner not in ("teacher", "pair")
    for section in ("model", "colearn.model_b"):
        node = _section(raw, section)
        if isinstance(node, dict) and node.get("pretrained"):
            values[f"{section}.frozen_stages"] = 1
            values[f"{section}.norm_eval"] = True
    return values


def _section(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def resolve_recipe(raw: Any) -> Any:
    """A raw config with `train.recipe: official` gets every official value it does not set itself; any other
    config comes back as it is. Idempotent, so a run's resolved config.yaml reads back to the same run."""
    if not isinstance(raw, dict) or _section(raw, "train.recipe") != "official":
        return raw
    raw = copy.deepcopy(raw)
    for dotted, value in official_values(raw).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                break  # not a section: validation names the field
        else:
            node.setdefault(leaf, copy.deepcopy(value))
    return raw


def recipe_deviations(cfg: "RunConfig") -> list[str]:
    """Under `train.recipe: official`, the fields whose value is not the official one (set explicitly, as in a
    config that spells out every field): `dotted=value (official value)`, for a warning."""
    if cfg.train.recipe != "official":
        return []
    raw = cfg.to_dict()
    out = []
    for dotted, official in official_values(raw).items():
        value = _section(raw, dotted)
        if value != official:
            out.append(f"{dotted}={value!r} (official {official!r})")
    return out


class RunConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    mode: Mode = "paa"
    seed: int = Field(0, description="data order, augmentation and (unless model_seed is set) initialisation")
    model_seed: Optional[int] = Field(None, description="initialisation seed of network A (default: seed)")
    output_dir: Where = Field("runs", description="where run directories go: a local path or s3://, gs://, file://")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    assign: AssignConfig = Field(default_factory=AssignConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    colearn: ColearnConfig = Field(default_factory=ColearnConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data):
        return resolve_recipe(data)

    @model_validator(mode="after")
    def _mode_needs(self) -> "RunConfig":
        spec = mode_spec(self.mode)
        if spec.needs_teacher and not self.teacher.checkpoint:
            raise ValueError(f"mode {self.mode!r} needs teacher.checkpoint (a checkpoint written by `lad train`)")
        if self.pipeline.assignment_store and (self.mode != "lad" or self.pipeline.engine != "ray"):
            raise ValueError("pipeline.assignment_store keeps a frozen teacher's hard labels for the assigner pool: it "
                             f"needs mode lad and pipeline.engine ray (this run: mode {self.mode}, engine "
                             f"{self.pipeline.engine}); kd and solad need the teacher's soft outputs at every step")
        if spec.co_learning and self.colearn.mode == "split" and self.pipeline.engine != "ray":
            raise ValueError("colearn.mode 'split' trains A and B on separate Ray worker groups: it needs "
                             "pipeline.engine: ray (pipeline.engine local trains both networks in one process)")
        if spec.co_learning and self.colearn.model_b is not None:
            for key in ("fpn_levels", "octave_base_scale", "num_classes"):  # what decides the anchors and labels
                a, b = getattr(self.model, key), getattr(self.colearn.model_b, key)
                if a != b:
                    raise ValueError(f"colearn.model_b.{key} is {b!r} but model.{key} is {a!r}: co-learning assigns "
                                     "both networks on the same anchors and classes, so they must agree")
        if spec.soft:
            for key, value in KD_DEFAULTS[self.mode].items():
                if getattr(self.distill, key) is None:
                    setattr(self.distill, key, value)
        return self

    @property
    def run_dir(self) -> "Path | Location":
        """The run's directory: a Path when local, a `Location` on object storage."""
        where = Location(self.output_dir) / self.name
        return where if where.remote else where.local

    @property
    def model_b(self) -> ModelConfig:
        return self.colearn.model_b or self.model

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix to our own validators' messages
        lines.append(f"{source}: field '{loc}': {msg}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings -> (path, YAML-parsed value). Values parse as YAML, so `[3,4]`, `true`, `1e-3` work."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        out.append((path, value))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        node = raw
        for p in path[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{p}' is not a section")
            node = node[p]
        node[path[-1]] = value
    return raw


def config_from_dict(raw: Any, source: str = "config", overrides: Optional[list[str]] = None) -> RunConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate. Raises ConfigError with file and field."""
    path = Location(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(raw, str(path), overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
