"""Composing a recipe: where ``conf/`` lives, what Hydra's ConfigStore holds, and one ``compose``.

``python -m ablate.run``, the report, the bench and the tests all compose ``conf/config.yaml`` the
same way: the typed schema (``ablate.config``), one ``arch`` option per registered network (the
registry is the source of the names) and the Post 5 coordinate-descent sweeper, put into the store
by ``register`` (once; it is idempotent), and batch sizes quoted as Hydra needs them.

The resolver ``${ablate.recipe:}`` (registered on import, so that every process resolving a sweep's
subdirectory has it: joblib's and submitit's workers import this module with the job) gives a job's
short recipe key, which names its sweep subdirectory (conf/config.yaml): different recipes never
share a directory, whatever their step and seed.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

NUMERIC_GROUPS = ("batch_size",)
_NUMERIC_CHOICE = re.compile(r"^(\+{0,2}(%s))=(\d+(,\d+)*)$" % "|".join(NUMERIC_GROUPS))
_registered = False
UNRESOLVED_KEY = "unresolved"  # the recipe key of a job whose config does not resolve (validate says why)


def recipe_dir_key(*, _root_: DictConfig) -> str:
    """``${ablate.recipe:}``: the first characters of the job's recipe key (``records.recipe_key``,
    the seed left out), computed from the job's resolved config without its ``hydra`` node."""
    from ablate.records import DIR_KEY_CHARS, recipe_key

    try:
        config = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
                  for k in _root_.keys() if k != "hydra" for v in [_root_[k]]}
        return recipe_key(config)[:DIR_KEY_CHARS]
    except Exception:  # a failing interpolation: the job itself reports it, before it writes anything
        return UNRESOLVED_KEY


OmegaConf.register_new_resolver("ablate.recipe", recipe_dir_key, replace=True)


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
