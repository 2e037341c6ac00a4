"""The rollout backend registry: every registered backend has its YAML and doctor row, validation reads the
same table, and a new backend (tests/echo_backend.py) is one file + one entry + one YAML away from every
caller: config loading, doctor, the builder, the async builder and the GRPO step."""

from __future__ import annotations

import shutil

import pytest

from questa_nemo import config as config_module
from questa_nemo import doctor
from questa_nemo.config import ROLLOUT_BACKENDS, ConfigError, RolloutBackendInfo, conf_dir, load_config


def test_every_backend_has_a_yaml_and_every_yaml_a_backend():
    yamls = {p.stem for p in (conf_dir() / "rollout").glob("*.yaml")}
    assert yamls == set(ROLLOUT_BACKENDS)
    for name in yamls:
        assert load_config("default", [f"rollout={name}"]).rollout.backend == name


def test_an_unregistered_backend_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="rollout.backend.*'vllm' is not one of megatron, hf, trtllm"):
        load_config("default", ["rollout.backend=vllm"])


def test_doctor_rows_come_from_the_registry():
    rows = doctor.capability_rows(doctor.Gpus((), False, 1))
    assert [r.key for r in rows if r.key.startswith("rollout.backend=")] == [
        f"rollout.backend={name}" for name in ROLLOUT_BACKENDS
    ]


@pytest.fixture
def echo(monkeypatch, tmp_path):
    """Register tests/echo_backend.py: its entry, and conf/rollout/echo.yaml in a copy of conf/."""
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "rollout" / "echo.yaml").write_text(
        "# @package rollout\n# tests/echo_backend.py: repeats the prompt's last token\nbackend: echo\n"
        "top_p: 0.9\n"
    )
    monkeypatch.setattr(config_module, "conf_dir", lambda: conf)
    monkeypatch.setitem(ROLLOUT_BACKENDS, "echo", RolloutBackendInfo("echo_backend", "torch", False, "test"))


def test_a_new_backend_reaches_every_caller(echo, tmp_path):
    import torch

    from questa_nemo.algo.filtering import FilledStep  # noqa: F401 - the step's types import cleanly
    from questa_nemo.rollout import RolloutContext, SamplingParams, build_backend
    from questa_nemo.rollout.snapshot import AsyncSafeBackend, build_async_backend

    cfg = load_config("default", ["rollout=echo"])
    assert (cfg.rollout.backend, cfg.rollout.top_p) == ("echo", 0.9)  # the YAML was read
    assert doctor.check_config(cfg, doctor.Gpus((), False, 1)) == []
    assert "rollout.backend=echo" in [r.key for r in doctor.capability_rows(doctor.Gpus((), False, 1))]
    ctx = RolloutContext([torch.nn.Linear(1, 1)], vocab_size=10, version=3)
    backend = build_backend(cfg.rollout, ctx)
    result = backend.generate([[1, 2], [5]], SamplingParams(n=2, max_new_tokens=3))
    assert [[c.token_ids for c in g] for g in result.completions] == [[[2, 2, 2]] * 2, [[5, 5, 5]] * 2]
    assert result.completions[0][0].version == 3
    wrapped = build_async_backend(cfg.rollout, ctx)  # owns no trainer tensors: used as is, behind a lock
    assert isinstance(wrapped, AsyncSafeBackend) and wrapped.shadow == []
    wrapped.update_weights(4)
    assert (wrapped.version, wrapped.inner.updates) == (4, 1)

    # the trainer's construction (train/recipe.py), sync and async, from a session like the one it opens
    from types import SimpleNamespace

    from questa_nemo.config import read_hf_config
    from questa_nemo.train.recipe import Session
    from questa_nemo.train.recipe import build_backend as recipe_build

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    session = Session(cfg, None, read_hf_config(cfg.model.hf_config), tokenizer, "", tmp_path)
    policy = SimpleNamespace(modules=[torch.nn.Linear(1, 1)])
    assert type(recipe_build(session, policy)).__name__ == "EchoBackend"
    session.cfg = load_config("default", ["rollout=echo", "rollout.max_staleness=2"])
    assert isinstance(recipe_build(session, policy), AsyncSafeBackend)
