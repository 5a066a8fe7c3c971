"""Typed configuration schema: one dataclass per config group.

Every config group of ``conf/`` fills one of the dataclasses below. Hydra merges the YAML options into
these typed nodes, so an unknown key or a value of the wrong type fails at composition;
``ablate.validate`` then rejects values that are well-typed but impossible (batch size 0, ghost-BN
splits that do not divide the batch, ...). This module imports neither torch nor the data, so it is
cheap to load (Hydra loads it at start-up).

Units (docs/references.md 0.1): learning rates are per-batch, mean-loss values, exactly as the blog quotes
them (0.1, 0.4, 1.0 ...); weight decay is the mean-loss coefficient (5e-4). ``ablate.optim`` converts
both, in one place, to the per-example LR on a summed loss that the reference code runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

@dataclass
class ArchConfig:
    """A registered network (``python -m ablate.models`` lists them) plus optional spec edits.

    ``None`` keeps what the registered spec says; any other value replaces it, so a single trick of
    the network can be switched on or off from the command line (``arch.pool_before_norm=false``).
    """

    name: str = "resnet9"
    width_mult: float = 1.0  # multiplies every channel width, on top of the scale's multiplier
    # 'conv' (a learned prep conv) | 'whiten' (Page's: fixed patch whitening + 1x1 conv_bn) | 'whiten_act'
    # (airbench's: fixed patch whitening with a learnable bias, straight into the activation)
    stem: Optional[str] = None
    # The whitening variant: 'page3x3' (3x3, 27 filters, Post 8) | 'airbench2x2' (2x2, 12 filters and
    # their negations, airbench94); None keeps the network's. ablate.layers.WHITENINGS.
    whitening: Optional[str] = None
    pool_before_norm: Optional[bool] = None  # conv -> pool -> norm -> act in the pooling layers
    logit_scale: Optional[float] = None
    whiten_eps: float = 1e-2
    # E6: Page's DAWN_net adds ReLU(BN(x)) on the identity path ('activated'); bkj adds x ('input').
    preact_shortcut: str = "activated"
    # 'default': PyTorch's own initialisation; 'he': every conv/linear weight N(0, 2/fan_in), the
    # initialisation under which Post 7's shifted ReLU ('frozen BN') keeps activations standardised;
    # 'dirac': airbench's partial identity (the first C_in filters of every conv are the identity);
    # 'dirac_unit_head': dirac plus a unit-std classifier (airbench94_muon).
    init: str = "default"


@dataclass
class NormConfig:
    kind: str = "batch"  # 'batch' | 'ghost' | 'none'
    splits: int = 1  # ghost BN: the batch is normalised in this many splits
    scale_init: str = "one"  # 'uniform' = PyTorch 0.4's U[0,1] default for BN scales (E11)
    frozen_scale: bool = False  # BN scales fixed at 1 and not trained (step 8_6)
    frozen_bias: bool = False  # BN biases fixed at 0 and not trained (Post 7: affine frozen, with frozen_scale)
    momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    eps: float = 1e-5


@dataclass
class ActConfig:
    # 'relu' | 'celu' | 'softplus' | 'shifted_relu' ((ReLU(x) - sqrt(1/pi)) / sqrt(1 - 1/pi), Post 7's
    # "frozen BN": zero mean, unit variance for an N(0, 2) input, which He initialisation produces)
    kind: str = "relu"
    alpha: float = 1.0  # CELU alpha
    beta: float = 10.0  # softplus: log(1 + exp(beta x)) / beta (Post 7: beta 10, a smooth ReLU) ...
    threshold: float = 2.5  # ... linear where beta x > threshold (Post 7: 2.5)


@dataclass
class PrecisionConfig:
    # fp16: the whole model in half precision, BN included (Posts 1-2); fp16_bn32: half precision
    # with BN kept in fp32 (Post 3 on); bf16: autocast with fp32 weights. No fp32 master weights for
    # fp16, as in the blog (A3: master weights cost ~1 s and changed nothing).
    name: str = "fp16_bn32"
    # Memory layout: None picks the device's fast one (CPU: channels_last, which oneDNN's convolutions
    # run natively; CUDA: NCHW as published). true / false force it. The same arithmetic, summed in
    # another order by other kernels: results agree up to floating-point rounding.
    channels_last: Optional[bool] = None
    # What fp16 and fp16_bn32 run as on a CPU, which has no fast fp16: 'auto' (bf16 autocast where the
    # CPU computes bf16 natively, AMX or AVX512-BF16; fp32 where it would be emulated, 10x slower),
    # 'fp32' or 'bf16'. Decided by measurement (docs/cpu.md): at scale=cpu, steps 4 and 8 in bf16 came
    # within 0.3 points of fp32 (2 seeds each) and trained 1.3-1.6x as fast. precision_used says which ran.
    cpu_half: str = "auto"
    # CUDA only: allow TF32 in matmuls and cuDNN convolutions. Off, so that fp32 means fp32.
    tf32: bool = False


@dataclass
class AugmentationConfig:
    crop_pad: int = 4  # reflect-pad by this much, then take a random 32x32 crop (0: no crop)
    flip: bool = True  # random horizontal flip, p = 0.5
    cutout: int = 8  # side of the zeroed square inside the crop (0: no cutout)
    # airbench's "alternating" flip: a random half of the images is flipped in the first epoch, and every
    # image's orientation alternates each epoch after (needs flip and the device loader).
    alternating_flip: bool = False


@dataclass
class LoaderConfig:
    """How training batches are made: the early steps' per-image DataLoader or the batched device path."""

    kind: str = "per_image"  # 'per_image' (torch DataLoader) | 'device' (whole set resident on the device)
    preprocess: str = "once"  # per_image: 'per_image' pads/normalises/transposes in __getitem__ (step 0)
    choices: str = "bulk"  # per_image: 'per_call' = one RNG call per choice; 'bulk' = drawn per epoch
    workers: int = 0  # per_image: DataLoader worker processes, restarted every epoch as in PyTorch 0.4
    max_options: Optional[int] = None  # device: at most this many random crop/cutout options per epoch
    drop_last: bool = False  # 2018 code keeps the last partial batch; the 2019 code drops it


@dataclass
class ScheduleConfig:
    """Piecewise-linear LR: ``knots`` in epochs, ``lr`` per-batch mean-loss values. Epochs = last knot."""

    knots: list[float] = field(default_factory=lambda: [0.0, 5.0, 24.0])
    lr: list[float] = field(default_factory=lambda: [0.0, 0.4, 0.0])
    peak: Optional[float] = None  # rescale ``lr`` so that its maximum is this (Post 5's max LR, lambda)
    stop: Optional[float] = None  # end training at this epoch, part-way through the schedule (Post 7)
    # Stretch the knots so that the schedule ends at this epoch (airbench defines its schedules as
    # fractions of the run); None keeps them. Fractional: training stops mid-epoch (9.9 = 476 steps of 48).
    epochs: Optional[float] = None
    # Step i of an epoch of n steps runs at the LR of epoch + (i+1)/n ('end', the 2018/2019 code) or
    # epoch + i/n ('start': airbench's LambdaLR, stepped after each update).
    step_at: str = "end"


@dataclass
class OptimConfig:
    momentum: float = 0.9
    nesterov: bool = True
    # 'torch': torch.optim.SGD (the 2018 code of Posts 1-4). 'page2019': the 2019 code's Nesterov step
    # (torch_backend.nesterov_update), whose momentum buffer holds LR-scaled steps; it differs from
    # torch's whenever the LR changes, i.e. at every step of a piecewise-linear schedule
    # (docs/references.md 0.2). The Post 8 steps use it, as the code behind the 26 s result did.
    update: str = "torch"
    weight_decay: float = 5e-4  # mean-loss units; applied to every trainable parameter (0.2)
    bias_lr_mult: float = 1.0  # BN biases get LR x this (step 8_6: 64) ...
    bias_wd_mult: float = 1.0  # ... and weight decay x this (step 8_6: 1/64)
    # LARS-style steps (Post 6's comparison) for the scale-invariant weights (convs feeding a batch
    # norm): each such layer's update direction g + wd*w is rescaled to norm lars_trust * |w|, so
    # every layer moves by the same fraction lr * lars_trust of its weight per step (before momentum).
    lars: bool = False
    # Not from the post (its LARS settings were not recovered): 0.02 gives, at the step-4 peak LR 0.4,
    # a step of 0.008|w| before momentum, which momentum's averaging of noisy steps (about 1/sqrt(1-rho^2)
    # = 2.3x at rho 0.9) brings near plain SGD's equilibrium sqrt(2 lr wd / (1 + rho)) = 0.0145 there.
    lars_trust: float = 0.02
    # What the LR and WD numbers mean (ablate.optim.UNITS): 'page' (blog: per-batch LR for a mean
    # loss, mean-loss WD), 'decoupled' (airbench94: LR per 1024 examples, divided by 1 + 1/(1 - momentum)
    # so that momentum does not change the step size; WD per 1024 examples, independent of the LR) or
    # 'torch' (torch's own per-example LR on the summed loss, as airbench94_muon writes it; WD as in
    # 'decoupled', per example).
    units: str = "page"
    head_lr_mult: float = 1.0  # the classifier's LR x this (airbench94_muon: 0.67 / 0.053) ...
    head_wd_mult: float = 1.0  # ... and its weight decay x this
    # Train the whitening layer's bias for this many epochs, then freeze it (airbench94: 3); None: never.
    whiten_bias_epochs: Optional[float] = None
    # Its LR meanwhile: 'schedule' (the main one, airbench94) or 'linear' (from the base LR linearly to 0
    # at whiten_bias_epochs, airbench94_muon).
    whiten_bias_lr: str = "schedule"
    # optim.update=muon: Muon on every trainable conv filter, Nesterov SGD on the rest (airbench94_muon).
    muon_lr: float = 0.24  # Muon's step length at the schedule's peak (it follows the schedule's shape)
    muon_momentum: float = 0.6
    muon_ns_steps: int = 3  # quintic Newton-Schulz iterations


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # loss = (1-a) CE + a * mean over classes of -log p (A3 8.3)
    uniform_kl: float = 0.0  # + this x KL(uniform || softmax) (Post 7's partial training: 0.5)


@dataclass
class EMAConfig:
    enabled: bool = False
    momentum: float = 0.99  # per step; an update every ``every`` steps uses momentum**every
    every: int = 5  # the step counter restarts every epoch, as in the 2019 code (A3 EMA mechanics)
    # 'ema': Page's, an averaged copy that is evaluated; 'lookahead': airbench's, every ``every`` steps
    # the average moves towards the live weights with decay momentum**every * (step/total)**power and the
    # live weights are reset to it; the live model is evaluated, and ends as the average.
    kind: str = "ema"
    power: float = 3.0


@dataclass
class TTAConfig:
    flip: bool = False  # average the logits of each test image and its mirror image
    # airbench's multi-crop: also the views shifted by (-t, -t) and (+t, +t) (reflect padding), each with
    # its mirror; the two shifted pairs weigh as much as the unshifted pair (6 views for t = 1).
    translate: int = 0


@dataclass
class MonitorConfig:
    # Post 6: per-layer weight norm |w| and mean effective step |dw|/|w| per epoch of every scale-
    # invariant weight (a conv feeding a batch norm), written into each metrics row.
    weights: bool = False


@dataclass
class TrackingConfig:
    """An experiment tracker that sees every run (``ablate.tracking``); none by default. Tracking never
    changes what a run computes, so it stays out of the config key (``ablate.records``)."""

    kind: str = "none"  # 'none' | 'mlflow' | 'tensorboard' (ablate.tracking.TRACKERS)
    # MLflow: the tracking URI; TensorBoard: the log directory. None: $MLFLOW_TRACKING_URI when set (MLflow),
    # else a local store under the run root (the sweep directory, or a single run's parent directory):
    # <root>/mlruns or <root>/tensorboard.
    uri: Optional[str] = None
    experiment: Optional[str] = None  # MLflow experiment name; None: the run root's name (a sweep: one experiment)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (``ablate.checkpoint``). They never change what a run computes (a resumed run
    ends as an uninterrupted one), so they stay out of the config key."""

    every: int = 0  # save model, optimiser, EMA, schedule position and RNG states every this many epochs; 0: never
    final: bool = False  # keep the final weights (the EMA's when there is one) in final.pt, for `ablate eval`


@dataclass
class DataConfig:
    source: str = "auto"  # auto: an ImageFolder tree if root has train/ and test/, else torchvision CIFAR-10
    root: Optional[str] = None
    download: bool = True  # torchvision CIFAR-10 only
    cache_dir: str = "~/.cache/ablate"
    synthetic_size: int = 1024  # source=synthetic (unit tests only): images per split


@dataclass
class ScaleConfig:
    name: str = "full"
    width_mult: float = 1.0
    train_size: Optional[int] = None  # a class-balanced subset of this many training images
    test_size: Optional[int] = None
    epochs: Optional[float] = None  # compress the schedule to at most this many epochs


@dataclass
class RefConfig:
    """The published numbers a step is compared with (steps.md, docs/references.md)."""

    time_s: Optional[float] = None
    # 'with_eval' (Posts 1-4 include per-epoch eval) | 'train_only' (Post 8) | 'train_tta' (airbench:
    # training, whitening fit included, plus the final evaluation pass; logging evaluation excluded)
    timing: str = "with_eval"
    accuracy: Optional[float] = None  # percent
    accuracy_note: str = ""
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    source: str = ""
    pflop: Optional[float] = None  # the run's published compute (airbench's ablation table)
    hardware: str = "V100"  # what the published time was measured on (Posts: one V100; airbench: one A100)


@dataclass
class StepConfig:
    id: str = "custom"
    stage: str = ""
    change: str = ""
    ref: RefConfig = field(default_factory=RefConfig)


@dataclass
class Config:
    arch: ArchConfig = field(default_factory=ArchConfig)
    batch_size: int = 512
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    act: ActConfig = field(default_factory=ActConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    step: StepConfig = field(default_factory=StepConfig)
    seed: int = 0
    device: str = "auto"  # 'auto' = CUDA when present, else CPU; or any torch device string
    compile: bool = False  # torch.compile the model; compile time is kept out of train time and reported
    target_acc: float = 94.0  # percent; for time-to-target and the share of runs reaching it
    progress: bool = True  # a progress bar within each epoch
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore; ``conf/config.yaml`` names it first in its defaults."""
    ConfigStore.instance().store(name="schema", node=Config)


def batch_size_of(cfg: Any) -> int:
    """The batch a run trains with: ``batch_size``, or the whole training subset of a reduced scale when
    that is smaller (smoke's 1,024 images and step 10's batch of 2,000: one batch of 1,024)."""
    subset = cfg.scale.train_size
    return min(cfg.batch_size, subset) if subset else cfg.batch_size


def update_rule(optim: Any) -> str:
    """``optim.update`` of an OptimConfig or its DictConfig (where the attribute is DictConfig's own
    ``update`` method, so the key must be read by subscription)."""
    return optim["update"] if isinstance(optim, Mapping) else optim.update


class ConfigError(ValueError):
    """A configuration value that is well-typed but cannot be run (see ``ablate.validate``)."""
