"""The fused sampler kernel (rollout/sampling_triton.py) against rollout/sampling.py's `sample_tokens`, through
Triton's interpreter where Triton is installed (CI's CPU image has none: these tests skip, as in
tests/test_triton_kernels.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from questa_nemo.rollout.sampling import sample_tokens

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def draws(rows: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed)).clamp(1e-6, 1 - 2**-24)


@pytest.mark.parametrize("vocab", [100, 4096, 9000])  # one partial block, one full block, three blocks
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampler_picks_the_torch_samplers_tokens(vocab, temperature, dtype):
    from questa_nemo.rollout.sampling_triton import fused_sample

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(48, vocab, generator=g) * 3).to(dtype)
    u = draws(48, vocab)
    tokens, logprobs = fused_sample(logits, u, temperature)
    want_tokens, want_logprobs = sample_tokens(logits.float(), u, temperature, 1.0)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    # the same inverse CDF, summed in another order: a uniform within float32 rounding of a boundary may pick
    # the neighbour. Every pick is the float64 inverse CDF's up to that rounding; almost all are the same token
    cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
    below = torch.where(tokens > 0, cdf.gather(1, (tokens - 1).clamp_min(0)[:, None])[:, 0], torch.zeros(48).double())
    at = cdf.gather(1, tokens[:, None])[:, 0]
    assert bool(((below - 1e-5 <= u.double()) & (u.double() < at + 1e-5)).all())
    assert (tokens != want_tokens).sum() <= 1
    same = tokens == want_tokens
    torch.testing.assert_close(logprobs[same], want_logprobs[same], rtol=1e-5, atol=1e-5)
    exact = torch.log_softmax(logits.float() / temperature, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, exact, rtol=1e-5, atol=1e-5)


def test_fused_sampler_ends_of_the_distribution():
    """u near 0 picks the first token of non-zero probability, u within rounding of 1 the last one (tokens of
    probability 0, here -inf logits, are never picked); a one-hot row always picks its token."""
    from questa_nemo.rollout.sampling_triton import fused_sample

    vocab = 5000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, :7] = float("-inf")  # tokens 0..6 have probability 0
    logits[:, 4990:] = float("-inf")  # and so do the last ten
    logits[3] = float("-inf")
    logits[3, 1234] = 0.0  # all the mass on one token
    u = torch.tensor([1e-9, 1 - 2**-24, 0.5, 1 - 2**-24])
    tokens, logprobs = fused_sample(logits, u, 1.0)
    assert tokens.tolist()[0] == 7 and tokens.tolist()[3] == 1234
    assert tokens.tolist()[1] <= 4989 and logits[1, tokens[1]].isfinite()
    assert logprobs[3].item() == 0.0 and bool(logprobs.isfinite().all())
    with pytest.raises(ValueError, match="temperature"):
        fused_sample(logits, u, 0.0)


@pytest.fixture(scope="module")
def model():
    from rollout_models import hf_model, megatron_twin

    return megatron_twin(hf_model("qwen2"))


@pytest.fixture
def sampler_on(monkeypatch):
    """Engines built with EngineOptions.fused_sampler use the kernel (on a GPU only otherwise), here under the
    interpreter; returns the list its launches append to."""
    from questa_nemo.rollout import sampling_triton
    from questa_nemo.rollout.megatron_engine import MegatronBackend

    new_runner, fused, launches = MegatronBackend._new_runner, sampling_triton.fused_sample, []

    def runner(self, cache):
        made = new_runner(self, cache)
        made.fused_sampler = self.options.fused_sampler
        return made

    monkeypatch.setattr(MegatronBackend, "_new_runner", runner)
    monkeypatch.setattr(sampling_triton, "fused_sample", lambda *args: launches.append(1) or fused(*args))
    return launches


PROMPTS = [[5, 17, 3, 44, 9], [7], [60, 2, 2, 81, 13, 13, 40, 1, 90, 33, 8, 27] * 3]


@pytest.mark.parametrize("paged", [False, True])
def test_engine_samples_the_same_tokens_with_the_fused_sampler(model, sampler_on, paged):
    """At temperature 1 (the recipe's rollouts) the engine with the fused sampler samples the tokens of the
    engine without it, with the same log-probs up to float32 rounding; top-p and greedy decoding keep torch's
    sampler (no launch)."""
    from rollout_models import VOCAB

    from questa_nemo.rollout.base import SamplingParams
    from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend

    def generate(fused: bool, **params):
        options = EngineOptions(max_batch_sequences=16, paged_kv=paged, kv_block_size=16, fused_sampler=fused)
        result = MegatronBackend(model, VOCAB, options).generate(
            PROMPTS, SamplingParams(n=3, max_new_tokens=10, seed=4, ignore_eos=True, **params)
        )
        return [[c.token_ids for c in g] for g in result.completions], [c.logprobs for g in result.completions for c in g]

    plain_tokens, plain_logprobs = generate(False, temperature=1.0)
    assert not sampler_on
    fused_tokens, fused_logprobs = generate(True, temperature=1.0)
    assert len(sampler_on) == 10  # every decode step (one chunk, one batch)
    assert fused_tokens == plain_tokens
    for a, b in zip(fused_logprobs, plain_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    for params in ({"temperature": 1.0, "top_p": 0.9}, {"temperature": 0.0}):
        sampler_on.clear()
        assert generate(True, **params)[0] == generate(False, **params)[0] and not sampler_on


def test_fused_sampler_step_is_capture_safe(model, sampler_on, monkeypatch):
    from rollout_models import VOCAB, assert_step_is_capture_safe

    from questa_nemo.rollout.base import SamplingParams
    from questa_nemo.rollout.graphs import StepKey
    from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend

    b = MegatronBackend(model, VOCAB, EngineOptions(max_batch_sequences=16, fused_sampler=True))
    b.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4))
    b._runner.noise_key.copy_(torch.arange(1, b._runner.noise_key.numel() + 1))
    sampler_on.clear()
    assert_step_is_capture_safe(b._runner, StepKey(8, 256, 1.0, 1.0), monkeypatch)
    assert len(sampler_on) == 2  # the step and its replay


AOT_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from questa_nemo.rollout import sampling_triton

vocab = 151_936
for dtype in ("*bf16", "*fp32"):
    signature = {"logits_ptr": dtype, "uniforms_ptr": "*fp32", "tokens_ptr": "*i64", "logprobs_ptr": "*fp32",
                 "stride_row": "i32", "inv_temperature": "fp32", "vocab": "constexpr", "BLOCKS": "constexpr",
                 "BLOCK": "constexpr"}
    constants = {"vocab": vocab, "BLOCKS": triton.cdiv(vocab, sampling_triton.BLOCK), "BLOCK": sampling_triton.BLOCK}
    source = ASTSource(fn=sampling_triton._sample_kernel, signature=signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"] and ".entry _sample_kernel" in kernel.asm["ptx"], dtype
print("compiled")
"""


def test_fused_sampler_kernel_compiles_for_hopper():
    """Ahead of time, no GPU needed: Triton lowers the kernel to PTX and ptxas assembles it for sm_90 at the
    real vocabulary (151,936), bf16 and fp32 logits, as the engine launches it (the interpreter runs above do
    not compile). In a process of its own: the interpreter is on in this one."""
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(AOT_COMPILE, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
