"""How a run's recipe differs from its journey step, as a short label: ``step8 · schedule.peak=0.8``.

A run's recorded config is compared with the config ``+step=<id>`` composes today: the config
groups chosen differently (``arch=residual_l2``), then every other value that differs
(``schedule.peak=0.8``). What does not change the recipe is left out: the seed, the scale (a panel of
its own in every chart), where the data lie, progress bars, and what fp16 or the memory layout was
asked to become on the device (the formats that ran are a column of their own). A record written
before the step's recipe was corrected shows the difference too, which is what a reader should see.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import yaml

# Keys (dotted prefixes) that are not part of a recipe's identity.
NOT_RECIPE = ("seed", "scale", "step", "progress", "device", "target_acc", "data.root", "data.cache_dir",
              "data.download", "precision.cpu_half", "precision.channels_last", "hydra", "tracking", "checkpoint")
# Groups whose choice is not a recipe change. The batch size is told by its value (batch_size=256), whichever
# named option set it (the group ``batch``; ``batch_size`` in records from before it was renamed).
NOT_A_CHOICE = ("step", "scale", "experiment", "tracking", "batch", "batch_size")
SEPARATOR = " · "


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of a nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _excluded(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def format_value(value: Any) -> str:
    """A config value as one would type it on the command line."""
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


@functools.lru_cache(maxsize=None)
def _composed(step: str) -> tuple[str, str] | None:
    """(flattened config, group choices) of ``+step=<step>`` as JSON, or None for an id that
    ``conf/step`` does not hold (a study's own step names, a record from elsewhere). Cached: a
    composition takes a third of a second."""
    from omegaconf import OmegaConf

    from ablate.compose import CONF_DIR, compose

    if not (CONF_DIR / "step" / f"{step}.yaml").is_file():
        return None
    cfg = compose([f"+step={step}"], return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)  # type: ignore[union-attr]
    return json.dumps(flatten(tree), default=str), json.dumps(choices)


def step_reference(step: str) -> tuple[dict, dict] | None:
    """The flattened config and the group choices of ``+step=<step>`` (fresh copies), or None."""
    composed = _composed(step)
    return None if composed is None else (json.loads(composed[0]), json.loads(composed[1]))


def recipe_changes(step: str, config: dict, choices: dict | None, overrides: list[str] | None = None,
                   ignore: tuple[str, ...] = NOT_RECIPE) -> list[str]:
    """``group=option`` and ``key=value`` items by which a run's recipe differs from its step's.

    Without a composable step, the run's command-line overrides stand in (``.hydra/overrides.yaml``)."""
    ref = step_reference(step) if step else None
    if ref is None:
        return [o.lstrip("+") for o in overrides or ()
                if not _excluded(o.lstrip("+").split("=", 1)[0], ignore + ("step",))]
    ref_values, ref_choices = ref
    items, changed_groups = [], []
    # A named recipe (+recipe=...) first: the changes after it are what it brings.
    for group, option in sorted((choices or {}).items(), key=lambda item: (item[0] != "recipe", item[0])):
        if group in NOT_A_CHOICE or group.startswith("hydra") or option is None:
            continue
        if ref_choices.get(group) != option:
            items.append(f"{group}={option}")
            changed_groups.append(group)
    for key, value in sorted(flatten(config).items()):
        if _excluded(key, ignore) or _excluded(key, tuple(changed_groups)):
            continue
        if key in ref_values and json.dumps(ref_values[key], default=str) != json.dumps(value, default=str):
            items.append(f"{key}={format_value(value)}")
    return items


def recipe_label(step: str, changes: list[str]) -> str:
    return SEPARATOR.join([step or "?", *changes])


def read_overrides(run_dir) -> list[str]:
    """The command-line overrides Hydra kept for a run (``.hydra/overrides.yaml``), or []."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        return [str(o) for o in overrides] if isinstance(overrides, list) else []
    except (OSError, yaml.YAMLError):
        return []


def shorten(label: str, width: int = 60) -> str:
    """A label cut to ``width`` characters for a chart, the step id always kept."""
    return label if len(label) <= width else label[:width - 1] + "…"
