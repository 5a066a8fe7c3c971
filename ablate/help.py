"""``ablate run --help``: Hydra's help template (conf/hydra/help/ablate.yaml), filled by the resolver
``${ablate.help:<section>}`` with what only the composed app knows: the config groups with their
options in natural order (128, 256, 512, 768, 1024, not as text) and the current choice marked, and
the journey's steps with their one-line change.

Hydra resolves the template while it composes the help (``Hydra.app_help``), with the app's config
loader set up and the composed config in ``HydraConfig``, so the groups listed are those of the
search path in use (a ``--config-dir`` of one's own included).
"""
from __future__ import annotations

import re
import textwrap

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from omegaconf import OmegaConf

from ablate.compose import journey_steps

WIDTH = 100
NOT_LISTED = ("hydra", "step")  # Hydra's own groups (--hydra-help); the steps have a section of their own


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: 128 < 256 < 1024, step4_9 < step4_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def groups() -> dict[str, list[str]]:
    """Every config group of the app (nested ones as ``a/b``) and its options, in natural order."""
    loader = GlobalHydra.instance().config_loader()
    found: dict[str, list[str]] = {}

    def visit(parent: str) -> None:
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group.split("/")[0] in NOT_LISTED:
                continue
            options = loader.get_group_options(group, ObjectType.CONFIG)
            if options:
                found[group] = sorted(options, key=natural_key)
            visit(group)

    visit("")
    return dict(sorted(found.items()))


def groups_text() -> str:
    """One entry per group: ``group`` (``+group`` where the defaults choose none) and its options,
    the current choice starred."""
    choices, found = HydraConfig.get().runtime.choices, groups()
    width = max(len(g) for g in found) + 2
    lines = []
    for group, options in found.items():
        name = group if group in choices else f"+{group}"
        shown = ", ".join(f"{o}*" if choices.get(group) == o else o for o in options)
        lines += textwrap.wrap(shown, WIDTH - width - 2, initial_indent=f"  {name:<{width}}",
                               subsequent_indent=" " * (width + 2))
    return "\n".join(lines)


def steps_text() -> str:
    """Each journey step, in journey order, with its one-line change."""
    steps = journey_steps()
    width = max(len(s["id"]) for s in steps) + 2
    lines = [f"  {s['id']:<{width}}{s.get('change', '')}" for s in steps]
    return "\n".join(line if len(line) <= WIDTH else line[:WIDTH - 3] + "..." for line in lines)


SECTIONS = {"groups": groups_text, "steps": steps_text}


def section(name: str) -> str:
    """``${ablate.help:<name>}``; ``$`` doubled, because Hydra then fills the text as a string.Template."""
    return SECTIONS[name]().replace("$", "$$")


# Registered on import: ablate.run imports this module before Hydra renders the help.
OmegaConf.register_new_resolver("ablate.help", section, replace=True)
