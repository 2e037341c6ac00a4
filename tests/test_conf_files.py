"""Every YAML under conf/ loads and validates, the way the CLI loads it.

- Each recipe file (conf/*.yaml) is composed through Hydra by `load_config(name)`, as `questa-nemo <command>
  -c name` does, without any model on disk: config load reads no file (the model's config.json is read at
  build time). The model shapes are then checked with `validate_model_shapes` against a stubbed config.json.
- Each group file (conf/<group>/<option>.yaml) is picked by a command-line override (`algo=drgrpo`) on a
  recipe that composes that group, and on its own merges into the schema and passes its section's validation.
- Each recipe file is used by a test or named in the docs; a file nobody uses should be removed.
New files are picked up by the globs; a new group needs its base recipe in BASE_RECIPE.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import questa_nemo.config as config_module
from questa_nemo.config import Config, conf_dir, load_config, to_config, validate_model_shapes

CONF = conf_dir()
REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_FILES = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))

# A recipe composing each group: `group=option` swaps the file in, as `questa-nemo train group=option` does.
BASE_RECIPE = {
    "algo": "default",
    "rollout": "default",
    "train": "default",
    "model": "smollm2_world",
    "optim": "smollm2_world",
    "data": "data_openr1",
    "eval": "eval_default",
    "reward": "eval_default",
}

# The shapes (from each model's config.json) behind the placeholder paths the shipped files name; nothing of
# these models is on disk in CI. The small world's config.json is shipped (data/world/) and read for real.
STUB_SHAPES = {
    "/models/OpenMath-Nemotron-1.5B": dict(
        num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28
    ),
    "outputs/smollm2/hf": dict(num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30),
}


def stub_read_hf_config(path: str) -> dict:
    if path in STUB_SHAPES:
        return STUB_SHAPES[path]
    assert Path(path).exists(), f"{path}: a shipped config names a model neither shipped nor stubbed here"
    return config_module.read_hf_config(path)


@pytest.fixture
def no_model_reads(monkeypatch):
    """Config load must not open the model's config.json: fail the test if it tries."""

    def forbidden(path):
        raise AssertionError(f"config load read {path}: file checks belong at build time")

    monkeypatch.setattr(config_module, "read_hf_config", forbidden)


def test_the_globs_see_the_shipped_files():
    assert {"default", "questa_partial_50", "questa_partial_50_25", "questa_single_gpu"} <= set(RECIPES)
    assert ("algo", "reference") in GROUP_FILES and ("model", "openmath_nemotron_1p5b") in GROUP_FILES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name, no_model_reads, monkeypatch):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    monkeypatch.undo()  # build time: config.json is read (stubbed for the models not on disk)
    if cfg.model.hf_config:
        validate_model_shapes(cfg.model, stub_read_hf_config(cfg.model.hf_config))


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_group_file_composes_into_its_recipe(group, option, no_model_reads, monkeypatch):
    assert group in BASE_RECIPE, f"conf/{group}/ is a new group: add a recipe composing it to BASE_RECIPE"
    cfg = load_config(BASE_RECIPE[group], [f"{group}={option}"])
    monkeypatch.undo()
    if group == "model":
        validate_model_shapes(cfg.model, stub_read_hf_config(cfg.model.hf_config))


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_group_file_alone_merges_into_the_schema(group, option):
    """The file's keys are schema keys of the right type, and its section's own validation passes."""
    raw = OmegaConf.load(CONF / group / f"{option}.yaml")
    assert set(raw.keys()) <= set(getattr(Config(), group).__dict__), f"conf/{group}/{option}.yaml"
    cfg = to_config({group: raw})
    getattr(cfg, group).validate()  # relations across sections: checked where the file is composed, above


def test_recipe_load_needs_no_model_on_disk(no_model_reads):
    """The four files that used to open /models/... or outputs/smollm2/hf at load time now load anywhere."""
    for name in ("questa_partial_50", "questa_partial_50_25", "questa_single_gpu", "smollm2_world"):
        assert load_config(name).model.hf_config  # names a model, which the load did not open


def test_model_shapes_are_checked_at_build_time():
    cfg = load_config("questa_partial_50", ["model.tensor_parallel=3"])  # loads: 3 does not divide 2 kv heads
    with pytest.raises(config_module.ConfigError, match="^model.tensor_parallel: 3 does not divide num_key"):
        validate_model_shapes(cfg.model, stub_read_hf_config(cfg.model.hf_config))


def _tracked_text(paths: list[str]) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--", *paths],
            check=True, capture_output=True, timeout=60,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout: {e}")
    me = Path(__file__).relative_to(REPO).as_posix()
    return "\n".join((REPO / p).read_text(errors="replace") for p in filter(None, out.split("\0")) if p != me)


def test_every_recipe_is_used_by_a_test_or_the_docs():
    text = _tracked_text(["README.md", "docs", "tests"])
    unused = [name for name in RECIPES if name not in text]
    assert not unused, f"recipe files no test or doc uses (document or remove them): {unused}"
