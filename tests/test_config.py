"""The schema and validation reject bad input before any training."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from ablate.config import ConfigError
from ablate.validate import validate
from tests.conftest import make_cfg


def test_default_config_is_the_post4_recipe_and_valid():
    cfg = make_cfg()
    validate(cfg)
    assert cfg.arch.name == "resnet9" and cfg.batch_size == 512
    assert list(cfg.schedule.knots) == [0, 5, 24] and list(cfg.schedule.lr) == [0, 0.4, 0]
    assert cfg.augmentation.cutout == 8 and cfg.precision.name == "fp16_bn32"


@pytest.mark.parametrize("override, named", [
    ("batch=oops", "512"), ("arch=nosuch", "resnet9"), ("norm=nosuch", "ghost"),
    ("+step=nosuch", "step4"),
])
def test_unknown_option_names_the_valid_choices(override, named):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(override)
    assert named in str(err.value)


@pytest.mark.parametrize("override", ["optim.momentum=fast", "seed=1.5", "augmentation.flip=maybe",
                                      "arch.nosuch=1", "optim.nosuch=2"])
def test_wrong_type_or_unknown_key_is_rejected_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_cfg(override)


@pytest.mark.parametrize("overrides, message", [
    (["norm=ghost", "loader=device", "norm.splits=3"], "does not divide batch_size"),
    (["norm=ghost", "loader=per_image"], "drop_last"),
    (["schedule.lr=[0,-0.4,0]"], "negative learning rate"),
    (["arch.width_mult=0"], "arch.width_mult=0"),
    (["precision.name=fp8"], "precision.name='fp8'"),
    (["schedule.knots=[0,5]"], "same length"),
    (["augmentation.cutout=40"], "does not fit"),
    (["loader.workers=-1"], "loader.workers"),
    (["schedule.stop=30"], "schedule.stop=30"),
    (["schedule.stop=0"], "schedule.stop=0"),
    (["arch.init=xavier"], "arch.init='xavier'"),
    (["act=softplus", "act.beta=0"], "act.beta=0"),
    (["optim.lars=true", "optim.lars_trust=0"], "optim.lars_trust=0"),
    (["loss.uniform_kl=-0.5"], "loss.uniform_kl=-0.5"),
    (["act.kind=tanh"], "act.kind='tanh'"),
])
def test_impossible_values_fail_validation_naming_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


def test_batch_size_zero_is_rejected():
    cfg = make_cfg()
    cfg.batch_size = 0
    with pytest.raises(ConfigError, match="batch_size=0"):
        validate(cfg)
