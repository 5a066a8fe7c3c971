"""The checks that run before any training: every well-typed value that cannot be run is named.

Hydra's typed schema (``ablate.config``) already rejects wrong types and overrides of unknown keys.
This module rejects what gets past it: keys appended with ``+`` that the schema does not have (Hydra
adds them, and nothing would read them), interpolations that cannot be resolved, and what is
well-typed but impossible. It takes each option's allowed values from the registry that implements
it (networks, layers, precisions, devices, loaders, data sources, update rules), so a new option is
allowed where it is registered, and nowhere else needs to know.
"""
from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablate import augment, data, device, layers, models, optim, records, tracking
from ablate.config import Config, ConfigError, batch_size_of, update_rule

SEED_LIMIT = 2 ** 63  # torch.manual_seed takes a 64-bit seed; numpy's generators want it >= 0

__all__ = ["ConfigError", "validate"]


def _one_of(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(errors: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def unknown_keys(cfg: DictConfig, schema: Any = None, prefix: str = "") -> list[str]:
    """The keys of ``cfg`` that the schema (``ablate.config.Config``) does not have, each with the
    closest schema key when there is one (``optim.momentumm``: did you mean optim.momentum?)."""
    schema = OmegaConf.structured(Config) if schema is None else schema
    found = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            found.append(f"{name} is not a key of the configuration"
                         + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        child, known = cfg._get_node(key), schema._get_node(key)
        if isinstance(child, DictConfig) and isinstance(known, DictConfig) and not known._is_none():
            found += unknown_keys(child, known, f"{name}.")
    return found


def unresolvable(cfg: DictConfig) -> str | None:
    """The first value of ``cfg`` whose interpolation cannot be resolved, named with its key and
    expression (``data.root=${oc.env:NO_SUCH}: ...``); None when every value resolves."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        try:  # the expression as written, from the unresolved config
            raw: Any = OmegaConf.to_container(cfg, resolve=False)
            for part in key.split("."):
                raw = raw[int(part)] if isinstance(raw, list) else raw[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raw = None
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{key}={raw}: cannot be resolved ({message})" if raw is not None else f"{key}: {message}"
    return None


def validate(cfg: Any) -> None:
    """Raise ConfigError naming every impossible value in ``cfg`` (a composed Config): keys outside
    the schema and failing interpolations first (nothing else can be read safely past them)."""
    if isinstance(cfg, DictConfig):
        early = unknown_keys(cfg)
        problem = unresolvable(cfg)
        if problem:
            early.append(problem)
        if early:
            raise ConfigError("invalid configuration: " + "; ".join(early))
    e: list[str] = []
    if not 0 <= cfg.seed < SEED_LIMIT:
        e.append(f"seed={cfg.seed} must be in 0 <= seed < 2^63")
    if (why := device.device_problem(str(cfg.device))) is not None:
        e.append(why)
    if cfg.arch.name not in models.REGISTRY:
        e.append(f"arch.name={cfg.arch.name!r} is not registered; choose one of {', '.join(models.REGISTRY)}")
    _positive(e, "arch.width_mult", cfg.arch.width_mult)
    _positive(e, "scale.width_mult", cfg.scale.width_mult)
    if cfg.arch.stem is not None:
        _one_of(e, "arch.stem", cfg.arch.stem, tuple(models.STEMS))
    _one_of(e, "arch.preact_shortcut", cfg.arch.preact_shortcut, tuple(models.SHORTCUT_FROM_INPUT))
    _positive(e, "arch.whiten_eps", cfg.arch.whiten_eps)
    _one_of(e, "arch.init", cfg.arch.init, tuple(models.INITS))
    _positive(e, "batch_size", cfg.batch_size)
    _one_of(e, "precision.name", cfg.precision.name, device.PRECISIONS)
    _one_of(e, "precision.cpu_half", cfg.precision.cpu_half, device.CPU_HALF)
    _positive(e, "augmentation.crop_pad", cfg.augmentation.crop_pad, allow_zero=True)
    _positive(e, "augmentation.cutout", cfg.augmentation.cutout, allow_zero=True)
    if cfg.augmentation.cutout > 32:
        e.append(f"augmentation.cutout={cfg.augmentation.cutout} does not fit in a 32x32 image")
    _one_of(e, "loader.kind", cfg.loader.kind, augment.LOADER_KINDS)
    _one_of(e, "loader.preprocess", cfg.loader.preprocess, augment.PREPROCESS)
    _one_of(e, "loader.choices", cfg.loader.choices, augment.CHOICES)
    _positive(e, "loader.workers", cfg.loader.workers, allow_zero=True)
    if cfg.loader.max_options is not None:
        _positive(e, "loader.max_options", cfg.loader.max_options)
    _one_of(e, "norm.kind", cfg.norm.kind, tuple(layers.NORM_LAYERS))
    _one_of(e, "norm.scale_init", cfg.norm.scale_init, tuple(layers.SCALE_INITS))
    _positive(e, "norm.splits", cfg.norm.splits)
    if cfg.norm.splits > 0 and cfg.batch_size > 0 and cfg.batch_size % cfg.norm.splits:
        e.append(f"norm.splits={cfg.norm.splits} does not divide batch_size={cfg.batch_size}")
    if cfg.norm.splits > 1 and not cfg.loader.drop_last:
        e.append("ghost batch norm (norm.splits > 1) needs equal splits: set loader.drop_last=true")
    _one_of(e, "act.kind", cfg.act.kind, tuple(layers.ACT_LAYERS))
    _positive(e, "act.alpha", cfg.act.alpha)
    _positive(e, "act.beta", cfg.act.beta)
    knots, lrs = list(cfg.schedule.knots), list(cfg.schedule.lr)
    if len(knots) < 2 or len(knots) != len(lrs):
        e.append(f"schedule.knots ({len(knots)}) and schedule.lr ({len(lrs)}) need the same length, at least 2")
    elif any(b < a for a, b in zip(knots, knots[1:])) or knots[0] != 0 or knots[-1] <= 0:
        e.append(f"schedule.knots={knots} must start at 0, never decrease and end after 0")
    if any(v < 0 for v in lrs):
        e.append(f"schedule.lr={lrs} has a negative learning rate")
    if cfg.schedule.peak is not None and (cfg.schedule.peak < 0 or not any(v > 0 for v in lrs)):
        e.append(f"schedule.peak={cfg.schedule.peak} needs to be >= 0 and a schedule with a positive LR")
    if cfg.schedule.stop is not None and not 0 < cfg.schedule.stop <= (knots[-1] if knots else 0):
        e.append(f"schedule.stop={cfg.schedule.stop} must lie after 0 and not beyond the schedule's "
                 f"last knot ({knots[-1] if knots else None})")
    _positive(e, "optim.momentum", cfg.optim.momentum, allow_zero=True)
    _one_of(e, "optim.update", update_rule(cfg.optim), optim.UPDATES)
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        e.append("optim.nesterov=true needs optim.momentum > 0 (or set optim.nesterov=false)")
    if update_rule(cfg.optim) == "page2019" and not cfg.optim.nesterov:
        e.append("optim.update=page2019 is a Nesterov update: it needs optim.nesterov=true")
    _positive(e, "optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive(e, "optim.bias_lr_mult", cfg.optim.bias_lr_mult, allow_zero=True)
    _positive(e, "optim.bias_wd_mult", cfg.optim.bias_wd_mult, allow_zero=True)
    _positive(e, "optim.lars_trust", cfg.optim.lars_trust)
    if not 0 <= cfg.loss.label_smoothing < 1:
        e.append(f"loss.label_smoothing={cfg.loss.label_smoothing} must be in [0, 1)")
    _positive(e, "loss.uniform_kl", cfg.loss.uniform_kl, allow_zero=True)
    if cfg.ema.enabled:
        if not 0 < cfg.ema.momentum < 1:
            e.append(f"ema.momentum={cfg.ema.momentum} must be in (0, 1)")
        _positive(e, "ema.every", cfg.ema.every)
    _one_of(e, "data.source", cfg.data.source, data.SOURCES)
    for key in ("train_size", "test_size", "epochs"):
        value = getattr(cfg.scale, key)
        if value is not None:
            _positive(e, f"scale.{key}", value)
    batch = batch_size_of(cfg)  # a subset smaller than one batch trains in batches of the whole subset
    if batch < cfg.batch_size and cfg.norm.splits > 0 and batch % cfg.norm.splits:
        e.append(f"scale.train_size={cfg.scale.train_size} leaves batches of {batch}, which "
                 f"norm.splits={cfg.norm.splits} does not divide")
    _one_of(e, "step.ref.timing", cfg.step.ref.timing, records.TIMINGS)
    _one_of(e, "tracking.kind", cfg.tracking.kind, tuple(tracking.TRACKERS))
    if (why := tracking.missing_package(cfg.tracking.kind)) is not None:
        e.append(why)
    _positive(e, "checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _check_sequel_switches(e, cfg)
    if e:
        raise ConfigError("invalid configuration: " + "; ".join(e))


def _check_sequel_switches(e: list[str], cfg: Any) -> None:
    """The switches of the airbench steps (9, 10) and their recipes."""
    from ablate.train import AVERAGERS  # the engine's registry of weight averagings

    if cfg.arch.whitening is not None:
        _one_of(e, "arch.whitening", cfg.arch.whitening, tuple(layers.WHITENINGS))
    if cfg.augmentation.alternating_flip and not (cfg.augmentation.flip and cfg.loader.kind == "device"):
        e.append("augmentation.alternating_flip needs augmentation.flip=true and loader=device")
    _one_of(e, "schedule.step_at", cfg.schedule.step_at, tuple(optim.STEP_AT))
    if cfg.schedule.epochs is not None:
        _positive(e, "schedule.epochs", cfg.schedule.epochs)
    _one_of(e, "optim.units", cfg.optim.units, optim.UNITS)
    if cfg.optim.units == "decoupled" and not cfg.optim.momentum < 1:
        e.append(f"optim.units=decoupled divides by 1 - momentum: optim.momentum={cfg.optim.momentum} must be < 1")
    _one_of(e, "optim.whiten_bias_lr", cfg.optim.whiten_bias_lr, optim.WHITEN_BIAS_LR)
    if cfg.optim.whiten_bias_epochs is not None:
        _positive(e, "optim.whiten_bias_epochs", cfg.optim.whiten_bias_epochs)
    elif cfg.optim.whiten_bias_lr == "linear":
        e.append("optim.whiten_bias_lr=linear decays to 0 at optim.whiten_bias_epochs: set it")
    _positive(e, "optim.head_lr_mult", cfg.optim.head_lr_mult, allow_zero=True)
    _positive(e, "optim.head_wd_mult", cfg.optim.head_wd_mult, allow_zero=True)
    if update_rule(cfg.optim) == "muon":
        _positive(e, "optim.muon_lr", cfg.optim.muon_lr)
        if not 0 <= cfg.optim.muon_momentum < 1:
            e.append(f"optim.muon_momentum={cfg.optim.muon_momentum} must be in [0, 1)")
        _positive(e, "optim.muon_ns_steps", cfg.optim.muon_ns_steps)
    _one_of(e, "ema.kind", cfg.ema.kind, tuple(AVERAGERS))
    if cfg.tta.translate:
        _positive(e, "tta.translate", cfg.tta.translate)
