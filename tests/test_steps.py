"""The journey as configs: every step composes and runs, and each is its predecessor plus its row."""
import dataclasses

import pytest
from omegaconf import OmegaConf

from ablate.validate import validate
from ablate.models import REGISTRY, customise
from ablate.optim import training_epochs
from ablate.records import read_summary
from ablate.run import execute
from tests.conftest import REPO, SMOKE, make_cfg

# Each step = the step before it + these overrides (the "change" column of steps.md).
CHAIN = {
    "step1_1": ("step0", ["arch=preact18", "schedule=cycle35"]),
    "step1_2": ("step1_1", ["loader=per_image_once"]),
    "step1_3": ("step1_2", ["loader=per_image_bulk"]),
    "step1_4": ("step1_3", ["loader=per_image"]),
    "step1": ("step1_4", []),
    "step2": ("step1", ["batch_size=512", "schedule=cycle35_lr044"]),
    "step3_1": ("step2", ["precision=fp16_bn32"]),
    "step3_2": ("step3_1", ["augmentation=crop_flip_cutout8", "schedule=warmup30"]),
    "step3_3": ("step3_2", ["batch_size=768", "schedule=warmup30_lr06"]),
    "step3": ("step3_3", []),
    "step4_1": ("step3", ["arch=shortest_path_repeat", "batch_size=512", "schedule=warmup20"]),
    "step4_2": ("step4_1", ["arch=shortest_path"]),
    "step4_3": ("step4_2", ["arch=shortest_path_3x3"]),
    "step4_4": ("step4_3", ["arch=shortest_path_pool"]),
    "step4_5": ("step4_4", ["arch=shortest_path_wide"]),
    "step4_6": ("step4_5", ["arch=backbone", "norm=batchnorm"]),
    "step4_9": ("step4_6", ["arch=resnet9"]),
    "step4_10": ("step4_9", ["schedule=warmup24"]),
    "step4": ("step4_10", []),
    "step5": ("step4", []),
    "step6": ("step5", []),
    "step7": ("step6", []),
    "step8_1": ("step7", ["loader=device", "optim.update=page2019"]),
    "step8_2": ("step8_1", ["arch.pool_before_norm=true", "schedule=warmup25"]),
    "step8_3": ("step8_2", ["loss=label_smoothing", "schedule=warmup23"]),
    "step8_4": ("step8_3", ["act=celu075", "schedule=warmup20"]),
    "step8_5": ("step8_4", ["norm=ghost", "schedule=warmup18_lr06"]),
    "step8_6": ("step8_5", ["norm=ghost_frozen", "act=celu03", "arch.logit_scale=0.0625",
                            "optim=nesterov_bias64", "schedule=warmup17_lr06"]),
    "step8_7": ("step8_6", ["arch.stem=whiten", "augmentation=crop_flip_cutout5", "schedule=warmup14_lr1"]),
    "step8_8": ("step8_7", ["ema=ema", "schedule=ema13"]),
    "step8_9": ("step8_8", ["tta=flip", "augmentation=crop_flip", "schedule=ema10"]),
    "step8": ("step8_9", []),
    # The sequel (sota-facts 2.1): from Post 8 to airbench's base, then one row each.
    "step9_0": ("step8", ["arch=airbench94_base", "batch_size=1024", "augmentation=translate2",
                          "loader=device_unlimited", "norm=airbench0", "act=gelu", "schedule=airbench0",
                          "optim=airbench", "ema=none", "arch.stem=null", "arch.logit_scale=null",
                          "arch.pool_before_norm=null", "arch.whiten_eps=5e-4", "optim.update=torch"]),
    "step9_1": ("step9_0", ["arch=airbench94", "schedule.epochs=21"]),
    "step9_2": ("step9_1", ["arch.init=dirac", "schedule.epochs=18"]),
    "step9_3": ("step9_2", ["optim.bias_lr_mult=64", "optim.bias_wd_mult=0.015625", "schedule.epochs=13.5"]),
    "step9_4": ("step9_3", ["optim.whiten_bias_epochs=3"]),
    "step9_5": ("step9_4", ["ema=lookahead", "norm=airbench", "schedule=airbench", "schedule.epochs=12"]),
    "step9_6": ("step9_5", ["tta=multicrop", "schedule.epochs=10.8"]),
    "step9_7": ("step9_6", ["augmentation=translate2_alternating", "schedule.epochs=9.9"]),
    "step9_8": ("step9_7", ["compile=true"]),
    "step9": ("step9_8", []),
    "step10": ("step9", ["arch=airbench94_muon", "batch_size=2000", "optim=muon", "schedule=muon",
                         "ema=none", "arch.init=dirac_unit_head", "schedule.epochs=8",
                         "optim.update=muon", "optim.bias_lr_mult=1", "optim.bias_wd_mult=1"]),
}
TIMING = {"8": "train_only", "9": "train_tta", "10": "train_tta"}  # by stage; the Posts 1-7 with_eval
STEP_IDS = sorted(p.stem for p in (REPO / "conf" / "step").glob("*.yaml"))


def _recipe(*overrides):
    cfg = OmegaConf.to_container(make_cfg(*overrides), resolve=True)
    cfg.pop("step")
    return cfg


def test_every_step_file_is_in_the_chain():
    assert set(STEP_IDS) == set(CHAIN) | {"step0"}


@pytest.mark.parametrize("step", list(CHAIN))
def test_step_is_its_predecessor_plus_its_row(step):
    parent, overrides = CHAIN[step]
    assert _recipe(f"+step={step}") == _recipe(f"+step={parent}", *overrides)


@pytest.mark.parametrize("step", STEP_IDS)
def test_step_is_valid_and_carries_reference_numbers(step):
    cfg = make_cfg(f"+step={step}")
    validate(cfg)
    assert cfg.step.id == step and cfg.step.ref.time_s > 0 and cfg.step.ref.source
    epochs = training_epochs(cfg.schedule, None)
    assert cfg.step.ref.epochs == pytest.approx(epochs) and cfg.step.ref.batch_size == cfg.batch_size
    assert cfg.step.ref.timing == TIMING.get(cfg.step.stage, "with_eval")
    # the sequel's references are airbench's A100 numbers with their PFLOP (sota-facts 2.1, 2.4)
    assert cfg.step.ref.hardware == ("A100" if cfg.step.stage in ("9", "10") else "V100")
    assert (cfg.step.ref.pflop is not None) == (cfg.step.stage in ("9", "10"))


def test_step0_is_the_published_baseline():
    cfg = make_cfg("+step=step0")
    assert (cfg.arch.name, cfg.batch_size, cfg.precision.name) == ("preact18_repeat", 128, "fp16")
    assert cfg.norm.scale_init == "uniform" and cfg.augmentation.cutout == 0
    assert (cfg.loader.kind, cfg.loader.preprocess, cfg.loader.choices) == ("per_image", "per_image", "per_call")
    assert cfg.loader.workers > 1 and list(cfg.schedule.knots)[-1] == 35
    assert cfg.optim.momentum == 0.9 and cfg.optim.nesterov and cfg.optim.weight_decay == 5e-4


def test_step8_network_is_the_published_final_net():
    cfg = make_cfg("+step=step8")
    built = customise(REGISTRY[cfg.arch.name], cfg.arch)
    final = REGISTRY["resnet9_final"]
    fields = [f.name for f in dataclasses.fields(final) if f.name not in ("name", "description", "norm", "act")]
    assert {f: getattr(built, f) for f in fields} == {f: getattr(final, f) for f in fields}
    assert (cfg.norm.kind, cfg.norm.splits, cfg.norm.frozen_scale) == (final.norm.kind, 16, True)
    assert (cfg.act.kind, cfg.act.alpha) == ("celu", 0.3)
    assert cfg.tta.flip and cfg.ema.enabled and cfg.loss.label_smoothing == 0.2 and cfg.augmentation.cutout == 0
    assert cfg.loader.max_options == 200 and cfg.loader.drop_last


def test_a_single_trick_switches_off_alone():
    on, off = _recipe("+step=step8"), _recipe("+step=step8", "tta=none")
    assert off.pop("tta") != on.pop("tta") and off == on


@pytest.mark.parametrize("step", STEP_IDS)
def test_every_step_runs_at_smoke_scale(step, tmp_path):
    # torch.compile (steps 9_8 on) takes over a minute on a CPU: test_train's slow tests compile
    summary = execute(make_cfg(f"+step={step}", *SMOKE, "compile=false"), tmp_path)
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert read_summary(tmp_path)["status"] == "completed"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_fenwicks_recipe_is_step4_with_the_tutorials_differences(tmp_path):
    """sota-facts 1 row 11: Page's ResNet9 recipe of step 4 with a quarter of its weight decay
    (1.25e-4 x batch), every image its own crop (tf.data per example), the LR read at the step's start
    (TF's global step), and the tutorial's 94.24% (one run, TPUv2-8) as its reference."""
    assert _recipe("+recipe=fenwicks") == _recipe("+step=step4", "loader=device_unlimited",
                                                  "optim.weight_decay=1.25e-4", "schedule.step_at=start")
    cfg = make_cfg("+recipe=fenwicks")
    validate(cfg)
    assert cfg.step.id == "step4" and (cfg.step.ref.accuracy, cfg.step.ref.hardware) == (94.24, "TPUv2-8")
    assert (cfg.arch.name, cfg.batch_size, cfg.augmentation.cutout, cfg.optim.momentum) == ("resnet9", 512, 8, 0.9)
    summary = execute(make_cfg("+recipe=fenwicks", *SMOKE), tmp_path)
    assert summary["status"] == "completed"
