"""Composing a recipe: where ``conf/`` lives, what Hydra's ConfigStore holds, and one ``compose``.

``python -m ablate.run``, the report, the bench and the tests all compose ``conf/config.yaml`` the
same way: the typed schema (``ablate.config``), one ``arch`` option per registered network (the
registry is the source of the names) and the Post 5 coordinate-descent sweeper, put into the store
by ``register`` (once; it is idempotent). ``compose`` also works inside a running Hydra job (the tracker
names a run by how it differs from its step, which composes the step).

The resolver ``${ablate.recipe:}`` (registered on import, so that every process resolving a sweep's
subdirectory has it: joblib's and submitit's workers import this module with the job) gives a job's
short recipe key, which names its sweep subdirectory (conf/config.yaml): different recipes never
share a directory, whatever their step and seed.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import yaml
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

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


@contextlib.contextmanager
def hydra_ready() -> Iterator[Any]:
    """Hydra set up with ablate's configs for the block (left as it is inside a running Hydra app);
    yields its config loader."""
    register()
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False,
            run_mode: RunMode = RunMode.RUN) -> DictConfig:
    """The config ``python -m ablate.run`` composes for these command-line overrides; with ``run_mode``
    MULTIRUN, a sweep's (its sweep values are left to its jobs). What ``hydra.compose`` does, with the run
    mode as a parameter, and inside a running Hydra app (a job) too, by that app's Hydra: a job can
    compose other recipes (its step's, to name how it differs)."""
    with hydra_ready():
        cfg = GlobalHydra.instance().hydra.compose_config(  # type: ignore[union-attr]
            "config", overrides=list(overrides), run_mode=run_mode, from_shell=False, with_log_configuration=False)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def journey_order(conf_dir: Path = CONF_DIR) -> list[str]:
    """Step ids in journey order, read from the step chain itself (each step names its parent)."""
    parents = {}
    for path in (conf_dir / "step").glob("*.yaml"):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
        parent = next((d for d in defaults if isinstance(d, str) and d != "_self_"), None)
        parents[path.stem] = parent
    children = {p: c for c, p in parents.items()}
    order, step = [], next(s for s, p in parents.items() if p is None)
    while step is not None:
        order.append(step)
        step = children.get(step)
    return order


def journey_steps(conf_dir: Path = CONF_DIR) -> list[dict]:
    """Every step's own block (id, stage, change, ref) from ``conf/step``, in journey order."""
    blocks = {}
    for path in (conf_dir / "step").glob("*.yaml"):
        step = (yaml.safe_load(path.read_text()) or {}).get("step") or {}
        blocks[path.stem] = dict(step, id=step.get("id", path.stem))
    return [blocks[s] for s in journey_order(conf_dir)]
