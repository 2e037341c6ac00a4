"""conf/optim/*.yaml load into OptimConfig, and the reference file keeps the recipe's numbers."""

from pathlib import Path

import pytest
import yaml

from questa_nemo.config import ConfigError, OptimConfig, conf_dir, to_config

OPTIM_FILES = sorted((Path(__file__).resolve().parents[1] / "conf" / "optim").glob("*.yaml"))


@pytest.mark.parametrize("path", OPTIM_FILES, ids=[p.stem for p in OPTIM_FILES])
def test_optim_yaml_loads(path):
    raw = yaml.safe_load(path.read_text())
    cfg = to_config({"optim": raw})
    assert isinstance(cfg.optim, OptimConfig)
    assert set(raw) <= set(OptimConfig.__dataclass_fields__)


def test_reference_matches_recipe():
    cfg = to_config({"optim": yaml.safe_load((conf_dir() / "optim" / "reference.yaml").read_text())})
    o = cfg.optim
    assert (o.lr, o.warmup_ratio, o.adam_beta1, o.adam_beta2, o.adam_eps) == (2e-5, 0.001, 0.9, 0.95, 1e-5)
    assert (o.weight_decay, o.grad_clip) == (0.05, 1.0)


def test_unknown_optim_key_is_named():
    with pytest.raises(ConfigError, match="optim.momentum"):
        to_config({"optim": {"momentum": 0.9}})
