"""Tiny random Hugging Face reference models (transformers' own classes), shared by tests and torchrun workers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 200  # not a multiple of 128: exercises the vocabulary padding


def tiny_hf_model(kind: str, seed: int = 0, layers: int = 4) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config dict as config.json would hold it). Same seed -> same weights on every rank.

    qwen2: q/k/v bias, untied, RoPE theta 1e6; llama: no bias, tied embeddings. Both GQA (4 heads, 2 groups).
    """
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if kind == "qwen2":
        config = Qwen2Config(rope_theta=1e6, tie_word_embeddings=False, **common)
        model = Qwen2ForCausalLM(config)
    elif kind == "llama":
        config = LlamaConfig(tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    # Random norm weights and biases, so a swapped or dropped norm/bias cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf = config.to_dict()
    hf["model_type"] = kind
    return model.eval(), hf
