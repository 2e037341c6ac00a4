"""Issue 10, CPU: greedy text from our Megatron rollout backend on the real SmolLM2-135M-Instruct weights equals
transformers' greedy text (fp32), on chat-templated prompts that include a word-world problem with a hint."""

from __future__ import annotations

import random

import pytest
import torch
from smollm2_fixtures import VOCAB, smollm2  # noqa: F401

from questa_nemo.config import ModelConfig, RolloutConfig
from questa_nemo.data import word_world
from questa_nemo.rollout.base import SamplingParams

FP32 = ModelConfig(params_dtype="fp32", recompute="none", attention="sdpa")
NEW_TOKENS = 24


def _messages() -> list[str]:
    problem = word_world.sample_problem(random.Random(7), 3)
    hint = problem.solution().split("\n")[0] + "\n"
    return [
        "What is 12 + 35?",
        "Name a prime number larger than 10.",
        problem.text() + "\n\n",
        problem.text() + "\n\n" + word_world.HINT_PREFIX + hint,
    ]


@pytest.fixture(scope="module")
def megatron_smollm2(smollm2):  # noqa: F811
    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(FP32)
    model = build_model(smollm2.hf_config, FP32)
    model.load_state_dict(smollm2.megatron_tp1, strict=False)  # strict=False: TE-free _extra_state entries
    yield model.eval()
    destroy_distributed()


def test_megatron_rollout_greedy_text_equals_transformers(smollm2, megatron_smollm2):  # noqa: F811
    from questa_nemo.rollout import RolloutContext, build_backend

    tok = smollm2.tokenizer
    prompts = []
    for content in _messages():
        ids = tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    cfg = RolloutConfig(backend="megatron", cuda_graphs=False, max_batch_sequences=8)
    backend = build_backend(cfg, RolloutContext([megatron_smollm2], VOCAB))
    params = SamplingParams(
        n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=(tok.eos_token_id,)
    )
    ours = [group[0].token_ids for group in backend.generate(prompts, params).completions]
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = smollm2.model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        theirs = out[0, len(prompt) :].tolist()
        print(repr(tok.decode(got, skip_special_tokens=True)))
        assert tok.decode(got, skip_special_tokens=True) == tok.decode(theirs, skip_special_tokens=True)
        assert got == theirs
    assert any(len(t) > 5 for t in ours)  # real text, not an immediate stop
