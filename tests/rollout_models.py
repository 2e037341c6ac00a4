"""Tiny random Qwen2 / Llama models for the rollout tests: an HF model and the megatron GPTModel converted
from it by the model-core code (build_model + load_hf_weights), sharing one world-of-one process group."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

VOCAB = 96


def hf_model(kind: str, seed: int = 0):
    """A random float32 causal LM; weights are scaled up so greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    if kind == "qwen2":  # q/k/v biases, untied head
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:  # no biases, tied head, another RoPE base
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def megatron_twin(hf) -> torch.nn.Module:
    """The GPTModel holding `hf`'s weights (CPU, float32, SDPA attention)."""
    from questa_nemo.config import ModelConfig
    from questa_nemo.model.megatron import build_model, load_hf_weights
    from questa_nemo.model.parallel import init_distributed

    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    init_distributed(cfg)
    config = hf.config.to_dict()
    model = build_model(config, cfg)
    load_hf_weights(model, hf.state_dict(), config, cfg)
    return model.eval()


@torch.no_grad()
def full_forward_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """What the trainer recomputes: log_softmax(logits / T) of each completion token, one forward. [C]"""
    ids = torch.tensor([prompt + completion])
    logits = model(ids, torch.arange(ids.size(1))[None], None)[0, len(prompt) - 1 : -1, :VOCAB].float()
    if temperature > 0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def assert_step_is_capture_safe(runner, key, monkeypatch) -> None:
    """What CUDA-graph capture needs of a DecodeRunner step, checked on CPU: `runner._step(key)` never reads a
    tensor value on the host (.item / .tolist / bool / nonzero), and replaying it from restored buffers
    reproduces its tokens, log-probs and positions exactly."""

    def host_sync(*_args, **_kwargs):
        raise AssertionError("host sync inside the decode step")

    saved = runner.tokens.clone(), runner.positions.clone()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "nonzero"):
            m.setattr(torch.Tensor, name, host_sync)
        m.setattr(torch, "nonzero", host_sync)
        runner._step(key)
    first = runner.tokens.clone(), runner.logprobs.clone(), runner.positions.clone()
    runner.tokens.copy_(saved[0])
    runner.positions.copy_(saved[1])
    runner._step(key)
    assert all(torch.equal(a, b) for a, b in zip(first, (runner.tokens, runner.logprobs, runner.positions)))


def compile_for_hopper(script: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `script` (Triton's ahead-of-time compile of rollout kernels for sm_90: PTX and ptxas, no GPU) in a
    process of its own, without TRITON_INTERPRET, which the calling test process has on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
