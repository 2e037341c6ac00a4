"""`questa-nemo doctor` and `check_config`: what this environment can run, and the reason when it cannot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from questa_nemo import doctor
from questa_nemo.config import Config, ConfigError

CPU = doctor.Gpus((), bf16=False, nodes=1)
EIGHT_H100 = doctor.Gpus(("NVIDIA H100 80GB HBM3",) * 8, bf16=True, nodes=1)


def _config(**sections) -> Config:
    """Schema defaults with some fields replaced: _config(rollout={"backend": "trtllm"})."""
    cfg = Config()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def test_import_error_names_the_missing_module():
    assert doctor.import_error("json") is None
    assert "No module named 'questa_nemo_no_such_module'" in doctor.import_error("questa_nemo_no_such_module")


def test_schema_defaults_can_run_on_this_cpu():
    assert doctor.check_config(Config(), CPU) == []


@pytest.mark.skipif(doctor.import_error("tensorrt_llm") is None, reason="TensorRT-LLM imports here")
def test_trtllm_without_tensorrt_llm_is_blocked_with_the_reason():
    problems = doctor.check_config(_config(rollout={"backend": "trtllm"}), CPU)
    assert len(problems) == 1
    assert problems[0].startswith("TensorRT-LLM not importable: rollout.backend=trtllm unavailable (")


@pytest.mark.skipif(doctor.import_error("transformer_engine.pytorch") is None, reason="TE imports here")
def test_te_attention_without_transformer_engine_is_blocked():
    problems = doctor.check_config(_config(model={"attention": "te"}), CPU)
    assert problems and problems[0].startswith(
        "Transformer Engine not importable: model.attention=te unavailable"
    )
    assert doctor.check_config(_config(model={"attention": "auto"}), CPU) == []  # auto falls back to sdpa


def test_model_compile_is_refused_with_te_attention_on_gpu_and_ignored_on_cpu():
    assert doctor.check_config(_config(model={"compile": True, "attention": "sdpa"}), EIGHT_H100) == []
    assert doctor.check_config(_config(model={"compile": True, "attention": "sdpa"}), CPU) == []
    problems = doctor.check_config(_config(model={"compile": True, "attention": "te"}), EIGHT_H100)
    assert any(p.startswith("model.compile: not supported with Transformer Engine") for p in problems)
    rows = {row.key: row.reason for row in doctor.capability_rows(CPU)}
    assert rows["model.compile=true"] == "ignored on CPU (eager)"


def test_keep_swiglu_needs_the_fused_swiglu_on_a_gpu():
    """model.recompute_keep_swiglu keeps our SwiGLU op's output: refused without it (CPU, fusions off, TE)."""
    keep = {"recompute": "full", "recompute_impl": "torch", "recompute_keep_swiglu": True, "attention": "sdpa"}
    assert doctor.check_config(_config(model=keep), EIGHT_H100) == []
    asked = "model.recompute_keep_swiglu: needs our fused SwiGLU (model.fusions on a GPU)"
    assert doctor.check_config(_config(model=keep), CPU) == [asked]
    assert doctor.check_config(_config(model={**keep, "fusions": False}), EIGHT_H100) == [asked]
    te = doctor.check_config(_config(model={**keep, "attention": "te"}), EIGHT_H100)
    assert any(p.startswith("model.recompute_keep_swiglu: not with Transformer Engine") for p in te)
    with pytest.raises(ConfigError, match="model.recompute_keep_swiglu"):
        _config(model={"recompute_keep_swiglu": True}).model.validate()  # megatron's recompute


def test_packed_varlen_attention_is_blocked_where_it_cannot_run():
    """model.packed_attention=varlen is refused with the model build's own reason (model/varlen.py); auto falls
    back to sdpa and is never a problem."""
    from questa_nemo.model import varlen

    asked = "model.packed_attention=varlen unavailable: "
    sdpa, local = ({"packed_attention": "varlen", "attention": a} for a in ("sdpa", "local"))
    assert doctor.check_config(_config(model=sdpa), CPU) == [asked + "needs a CUDA GPU"]
    assert doctor.check_config(_config(model={"packed_attention": "auto"}), CPU) == []
    assert doctor.check_config(_config(model=local), EIGHT_H100) == [asked + varlen.LOCAL_ATTENTION]
    on_gpu = [] if varlen.varlen_kernel() else [asked + varlen.NO_KERNEL]
    assert doctor.check_config(_config(model=sdpa), EIGHT_H100) == on_gpu
    row = {a.key: a for a in doctor.capability_rows(CPU)}["model.packed_attention=varlen"]
    assert not row.ok and row.reason == asked + "needs a CUDA GPU"


def test_packed_varlen_attention_with_te_attention_is_blocked(monkeypatch):
    monkeypatch.setattr(doctor, "import_error", lambda module: None)  # all imports: auto resolves to TE
    cfg = _config(model={"packed_attention": "varlen", "attention": "auto"})
    problems = doctor.check_config(cfg, EIGHT_H100)
    assert "model.packed_attention=varlen unavailable: Transformer Engine attention attends packed rows" in (
        " ".join(problems)
    )


def test_model_parallel_larger_than_the_gpus_is_blocked():
    fits = _config(model={"tensor_parallel": 4, "pipeline_parallel": 2})
    too_big = _config(model={"tensor_parallel": 4, "pipeline_parallel": 4})
    assert doctor.check_config(fits, EIGHT_H100) == []
    (problem,) = doctor.check_config(too_big, EIGHT_H100)
    assert "= 16 is larger than the 8 GPUs" in problem
    two_nodes = doctor.Gpus(EIGHT_H100.names, bf16=True, nodes=2)
    assert doctor.check_config(too_big, two_nodes) == []


def test_bf16_on_a_gpu_without_bf16_is_blocked():
    v100 = doctor.Gpus(("Tesla V100",), bf16=False, nodes=1)
    (problem,) = doctor.check_config(_config(model={"params_dtype": "bf16"}), v100)
    assert problem.startswith("model.params_dtype=bf16 unavailable: Tesla V100")
    assert doctor.check_config(_config(model={"params_dtype": "fp32"}), v100) == []


@pytest.mark.skipif(doctor.import_error("tensorrt_llm") is None, reason="TensorRT-LLM imports here")
def test_check_config_gives_the_trainer_the_reason():
    """train.recipe.main prints these problems and exits 2 before building anything."""
    problems = doctor.check_config(_config(rollout={"backend": "trtllm"}))
    assert any("rollout.backend=trtllm unavailable" in p for p in problems)


def test_doctor_command_prints_the_table_and_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "questa_nemo.cli", "doctor"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    for row in ("Python", "torch", "megatron-core", "Transformer Engine", "TensorRT-LLM", "math-verify"):
        assert f"  {row} " in out.stdout
    assert re.search(r"  rollout.backend=megatron +ok\n", out.stdout)  # keys padded to the longest
    assert re.search(r"  model.packed_attention=varlen +(ok|no: )", out.stdout)
    assert "config default  can run here" in out.stdout


@pytest.mark.skipif(doctor.import_error("tensorrt_llm") is None, reason="TensorRT-LLM imports here")
def test_doctor_reports_an_unavailable_backend_and_exits_one(capsys):
    assert doctor.main("default", ["rollout.backend=trtllm"], []) == 1
    out = capsys.readouterr().out
    assert "config default  TensorRT-LLM not importable: rollout.backend=trtllm unavailable" in out


@pytest.mark.skipif(doctor.import_error("tensorrt_llm") is None, reason="TensorRT-LLM imports here")
def test_train_with_an_unavailable_backend_stops_before_building_anything(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "questa_nemo.cli",
            "train",
            f"train.run_dir={run_dir}",
            "rollout.backend=trtllm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "TensorRT-LLM not importable: rollout.backend=trtllm unavailable" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (run_dir / "checkpoints").exists()


def test_context_parallel_is_refused_by_validation_and_doctor_alike():
    from questa_nemo.config import load_config

    with pytest.raises(ConfigError, match="model.context_parallel.*SDPA core attention"):
        load_config("default", ["model.context_parallel=2"])
    (problem,) = doctor.check_config(_config(model={"context_parallel": 2}), EIGHT_H100)
    assert problem.startswith("model.context_parallel=2: context parallelism is not supported")
    rows = {a.key: a for a in doctor.capability_rows(CPU)}
    assert not rows["context_parallel > 1"].ok
    out = subprocess.run([sys.executable, "-m", "questa_nemo.cli", "doctor", "model.context_parallel=2"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode != 0 and "model.context_parallel" in out.stdout + out.stderr


def test_kl_coef_above_zero_is_refused_at_validation():
    from questa_nemo.config import load_config

    with pytest.raises(ConfigError, match="algo.kl_coef.*reference model"):
        load_config("default", ["algo.kl_coef=0.01"])
    assert load_config("default", ["algo.kl_coef=0"]).algo.kl_coef == 0
