"""torchrun worker: chunked log-probs over a TP=2 vocabulary split equal the naive full-softmax ones.

Launched by tests/test_model_logprobs.py as `torchrun --nproc-per-node 2 tests/dist/logprob_worker.py`.
Values and gradients (hidden and this rank's weight rows) are compared in fp64, with the two-pass statistics
and the one-pass ones; exits non-zero on mismatch.
"""

from __future__ import annotations

import torch

from questa_nemo.config import ModelConfig
from questa_nemo.model import logprobs
from questa_nemo.model.logprobs import chunked_logprobs, naive_logprobs
from questa_nemo.model.parallel import destroy_distributed, init_distributed


def check(vocab: int, padded: int, temperature: float, tp_rank: int, tp_size: int, group) -> None:
    g = torch.Generator().manual_seed(vocab)
    tokens, hidden_size = 29, 12
    hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(padded, hidden_size, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    coef_lp, coef_h = (
        torch.randn(tokens, generator=g, dtype=torch.float64),
        torch.randn(tokens, generator=g, dtype=torch.float64),
    )

    rows = padded // tp_size
    mine = weight[tp_rank * rows : (tp_rank + 1) * rows].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    out = chunked_logprobs(h, mine, targets, temperature, vocab_size=vocab, chunk_tokens=7, tp_group=group)
    (out.logprobs @ coef_lp + out.entropy @ coef_h).backward()

    full_w, full_h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
    ref = naive_logprobs((full_h @ full_w.t())[:, :vocab], targets, temperature)
    (ref.logprobs @ coef_lp + ref.entropy @ coef_h).backward()

    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h.grad, full_h.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        mine.grad, full_w.grad[tp_rank * rows : (tp_rank + 1) * rows], rtol=1e-10, atol=1e-10
    )


def main() -> None:
    from megatron.core import parallel_state as ps

    info = init_distributed(ModelConfig(params_dtype="fp32", tensor_parallel=2))
    group = ps.get_tensor_model_parallel_group()
    # Padding inside rank 1's slice; rank 1 holding nothing but padding; temperature != 1.
    for vocab, padded, temperature in [(50, 64, 1.0), (30, 64, 0.6), (64, 64, 1.3)]:
        check(vocab, padded, temperature, info.tp_rank, info.tp_size, group)
    # the one-pass statistics (the CUDA kernel's, here its torch reference): sums relative to each rank's
    # own max, rescaled to the global max after the all-reduce
    two_pass = logprobs._kernels
    logprobs._kernels = lambda mode: (logprobs.logprob_stats_reference, None, logprobs._grad_logits)
    try:
        for vocab, padded, temperature in [(50, 64, 1.0), (30, 64, 0.6), (64, 64, 1.3)]:
            check(vocab, padded, temperature, info.tp_rank, info.tp_size, group)
    finally:
        logprobs._kernels = two_pass
    print(f"rank {info.rank}: chunked log-probs match")
    destroy_distributed()


if __name__ == "__main__":
    main()
