"""``ablate eval <run dir> [--tta none|flip|multicrop]``: evaluate the final weights a run kept
(``checkpoint.final=true``: the EMA's when it had one) on its test set again, on this machine, with
its own test-time augmentation or another one (any option of ``conf/tta/``).

The weights are read with ``torch.load(weights_only=True)``; the network is built from the run's
recorded config, as training built it, and the test set is the run's (its data source and scale).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ablate import data
from ablate.checkpoint import FINAL_FILE, load
from ablate.compose import CONF_DIR
from ablate.config import Config, TTAConfig
from ablate.device import device_name, resolve_channels_last, resolve_device, resolve_precision
from ablate.layers import Whitening
from ablate.records import config_key, read_config, read_summary
from ablate.train import build_network, evaluate

TTA_OPTIONS = tuple(sorted(p.stem for p in (CONF_DIR / "tta").glob("*.yaml")))


def recorded_config(run_dir: Path, device: str = "auto", tta: Optional[str] = None) -> DictConfig:
    """The run's config as the schema types it, on ``device``, with the ``conf/tta/<tta>`` option if given."""
    config = read_config(run_dir)
    if config is None:
        raise ValueError(f"{run_dir / 'config.yaml'} is missing or unreadable: is {run_dir} a run directory?")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), config, {"device": device})
    if tta is not None:
        cfg.tta = OmegaConf.merge(OmegaConf.structured(TTAConfig), OmegaConf.load(CONF_DIR / "tta" / f"{tta}.yaml"))
    return cfg


def evaluate_run(run_dir: Path, tta: Optional[str] = None, device: str = "auto") -> dict:
    """Test loss and accuracy of the run's final weights, with the run's TTA or ``tta``."""
    run_dir = Path(run_dir)
    cfg = recorded_config(run_dir, device, tta)
    if not (run_dir / FINAL_FILE).is_file():
        raise ValueError(f"{run_dir} kept no final weights ({FINAL_FILE}); train with checkpoint.final=true to keep them")
    weights = load(run_dir / FINAL_FILE)
    if weights.get("config_key") != config_key(read_config(run_dir) or {}):
        raise ValueError(f"{run_dir / FINAL_FILE} was saved for another recipe than {run_dir / 'config.yaml'}")
    dev = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision.name, dev, cfg.precision.cpu_half)
    channels_last = resolve_channels_last(cfg.precision.channels_last, dev)
    model = build_network(cfg, precision, dev)
    model.load_state_dict(weights["model"])
    for layer in model.modules():
        if isinstance(layer, Whitening):
            layer.fitted = True  # its fitted filters are among the loaded weights
    images = data.take_subset(data.load_images(cfg.data), cfg.scale)
    test_x = data.normalise(images.test_x.to(dev)).to(precision.param_dtype)
    loss, acc = evaluate(model, test_x, images.test_y.to(dev), cfg.tta.flip, channels_last, precision.autocast,
                         cfg.tta.translate)
    summary = read_summary(run_dir) or {}
    return dict(run_dir=str(run_dir), tta=tta or "as trained", flip=cfg.tta.flip, translate=cfg.tta.translate,
                test_acc=acc, test_loss=loss, recorded_test_acc=summary.get("test_acc"),
                device=device_name(dev), precision_used=precision.name, test_images=len(images.test_y))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ablate eval", description="Evaluate the final weights a run kept (trained with checkpoint.final=true; "
        "the EMA's when it had one) on its test set again, with its own test-time augmentation or another.")
    parser.add_argument("run_dir", type=Path, help="the run's directory (config.yaml, final.pt)")
    parser.add_argument("--tta", choices=TTA_OPTIONS, help="test-time augmentation (default: the run's own)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:1 ...")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.tta, args.device)
    except (ValueError, data.DataError) as err:
        parser.exit(2, f"ablate eval: {err}\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    recorded = result["recorded_test_acc"]
    print(f"{result['run_dir']}: test accuracy {result['test_acc']:.2f}% (test loss {result['test_loss']:.4f}) on "
          f"{result['test_images']:,} images, TTA {result['tta']}, {result['device']} {result['precision_used']}"
          + (f"; the run recorded {recorded:.2f}%" if isinstance(recorded, (int, float)) else ""), file=sys.stdout)


if __name__ == "__main__":
    main()
