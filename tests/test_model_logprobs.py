"""Chunked log-probs / entropy equal the naive full-softmax computation (values and gradients); peak memory.

The TP=2 case (vocabulary split over two gloo ranks) runs under torchrun in tests/dist/logprob_worker.py.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from questa_nemo.model.logprobs import chunked_logprobs, naive_logprobs

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import torchrun  # noqa: E402


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated by the ops run inside (forward and backward), freed ones
    subtracted when their last reference dies. Tensors that existed before entering are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and storage.nbytes() > 0:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def _problem(tokens: int, hidden: int, padded: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(padded, hidden, generator=g, dtype=dtype).requires_grad_()
    return h, w


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_equal_naive(chunk_tokens, temperature):
    vocab, padded = 90, 128  # padded rows must not enter the softmax
    h, w = _problem(53, 16, padded)
    targets = torch.randint(0, vocab, (53,), generator=torch.Generator().manual_seed(1))
    coef = torch.randn(2, 53, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    out = chunked_logprobs(h, w, targets, temperature, vocab_size=vocab, chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad(out.logprobs @ coef[0] + out.entropy @ coef[1], [h, w])
    ref = naive_logprobs((h @ w.t())[:, :vocab], targets, temperature)
    ref_grads = torch.autograd.grad(ref.logprobs @ coef[0] + ref.entropy @ coef[1], [h, w])

    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[1][vocab:].abs().max() == 0


def test_gradient_of_logprobs_alone_and_sb_layout():
    """Entropy unused (its gradient None) and megatron's [s, b, h] hidden layout with [s, b] targets."""
    h, w = _problem(24, 8, 40)
    targets = torch.randint(0, 40, (6, 4))
    out = chunked_logprobs(h.view(6, 4, 8), w, targets, chunk_tokens=5)
    assert out.logprobs.shape == (6, 4)
    grads = torch.autograd.grad(out.logprobs.sum(), [h, w])
    ref = naive_logprobs(h.view(6, 4, 8) @ w.t(), targets)
    for got, want in zip(grads, torch.autograd.grad(ref.logprobs.sum(), [h, w])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_inputs_match_fp32_reference_within_bf16_error():
    h, w = _problem(64, 32, 256, dtype=torch.float32)
    targets = torch.randint(0, 256, (64,))
    out = chunked_logprobs(h.bfloat16(), w.bfloat16(), targets, chunk_tokens=16)
    assert out.logprobs.dtype == torch.float32
    ref = naive_logprobs(h.bfloat16() @ w.bfloat16().t(), targets)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=1e-4)


def _peak_bytes(fn, tokens: int, vocab: int) -> int:
    h, w = _problem(tokens, 64, vocab, dtype=torch.float32)
    targets = torch.randint(0, vocab, (tokens,))
    with PeakTensorMemory() as mem:
        out = fn(h, w, targets)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        del out
    return mem.peak


def test_peak_memory_does_not_grow_with_a_logits_matrix():
    """Forward + backward with an 8K vocabulary at 256 and 1024 tokens: the naive path's peak grows by
    several fp32 [T, V] matrices, the chunked path's only by [T]- and [T, h]-sized tensors. Prints the peaks
    (the numbers quoted in the model report)."""
    vocab, chunk = 8192, 32
    naive = {t: _peak_bytes(lambda h, w, y: naive_logprobs(h @ w.t(), y), t, vocab) for t in (256, 1024)}
    chunked = {
        t: _peak_bytes(lambda h, w, y: chunked_logprobs(h, w, y, chunk_tokens=chunk), t, vocab)
        for t in (256, 1024)
    }
    extra_logits_bytes = (1024 - 256) * vocab * 4
    print(
        "\npeak tensor memory fwd+bwd, 8K vocab (MiB): "
        + ", ".join(
            f"T={t}: naive {naive[t] / 2**20:.0f}, chunked({chunk}) {chunked[t] / 2**20:.0f}" for t in naive
        )
    )
    assert naive[1024] - naive[256] >= 2 * extra_logits_bytes
    assert chunked[1024] - chunked[256] < extra_logits_bytes / 20
    assert chunked[1024] < naive[1024] / 5


@pytest.mark.slow
def test_tensor_parallel_vocab_split_equals_naive():
    out = torchrun("logprob_worker.py")
    assert out.count("chunked log-probs match") == 2
