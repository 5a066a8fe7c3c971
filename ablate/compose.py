"""Composing a recipe: where ``conf/`` lives, what Hydra's ConfigStore holds, and one ``compose``.

``python -m ablate.run``, the report, the bench and the tests all compose ``conf/config.yaml`` the
same way: the typed schema (``ablate.config``), one ``arch`` option per registered network (the
registry is the source of the names) and the Post 5 coordinate-descent sweeper, put into the store
by ``register`` (once; it is idempotent), and batch sizes quoted as Hydra needs them.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

NUMERIC_GROUPS = ("batch_size",)
_NUMERIC_CHOICE = re.compile(r"^(\+{0,2}(%s))=(\d+(,\d+)*)$" % "|".join(NUMERIC_GROUPS))
_registered = False


def quote_numeric_choices(overrides: list[str]) -> list[str]:
    """``batch_size=512`` -> ``batch_size='512'``: Hydra parses 512 as an int and refuses an int as a
    config-group choice, so the options named by numbers are quoted for it (sweeps too)."""
    def quote(arg: str) -> str:
        m = _NUMERIC_CHOICE.match(arg)
        return f"{m.group(1)}=" + ",".join(f"'{v}'" for v in m.group(3).split(",")) if m else arg
    return [quote(a) for a in overrides]


def register() -> None:
    """The schema, one ``arch`` option per registered network and the Post 5 sweeper
    (``hydra/sweeper=coordinate_descent``), in Hydra's ConfigStore."""
    global _registered
    if _registered:
        return
    from ablate.config import ArchConfig, register_configs
    from ablate.models import REGISTRY
    from ablate.descent import register_sweeper

    register_configs()
    register_sweeper()
    store = ConfigStore.instance()
    for name, spec in REGISTRY.items():
        # The whitening eps travels with the network (airbench's 5e-4, Page's 1e-2 default).
        store.store(group="arch", name=name, node=ArchConfig(name=name, whiten_eps=spec.whiten_eps))
    _registered = True


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config ``python -m ablate.run`` composes for these command-line overrides."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=quote_numeric_choices(list(overrides)),
                             return_hydra_config=return_hydra_config)
