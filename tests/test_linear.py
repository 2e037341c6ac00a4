"""model/linear.py's weight gradient added into megatron DDP's main_grad inside the backward (one process,
TP = 1, gloo): on the CPU it must be the unfused arithmetic bit for bit, reach DDP through megatron's flag, and
stay out of layers that have no main_grad."""

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
warnings.filterwarnings("ignore", category=UserWarning)

import policy_common  # noqa: E402
from policy_common import TINY_HF, build_policy, fixed_sequences, nll_loss  # noqa: E402

from questa_nemo.model import linear  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402

LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused path's weight-gradient calls (which still do their arithmetic)."""
    calls = []
    real = linear.add_weight_grad

    def count(main_grad, grad_output, input_):
        calls.append(tuple(main_grad.shape))
        real(main_grad, grad_output, input_)

    monkeypatch.setattr(linear, "add_weight_grad", count)
    return calls


def linear_weights(policy) -> dict[str, torch.nn.Parameter]:
    return {
        name: p for name, p in policy.modules[0].named_parameters() if name.split(".")[-2] in LINEARS
        and name.endswith("weight")
    }  # fmt: skip


def train(policy, steps: int = 2):
    sequences = fixed_sequences()
    micro_batches = policy.pack(sequences)
    tokens = sum(float(s.loss_mask.sum()) for s in sequences)
    stats = [policy.train_step(micro_batches, nll_loss, tokens) for _ in range(steps)]
    state = {k: v.detach().clone() for k, v in policy.modules[0].state_dict().items() if "_extra_state" not in k}
    return len(micro_batches), [s.grad_norm for s in stats], state


def test_add_weight_grad_is_autograds_product_then_ddps_add():
    g = torch.Generator().manual_seed(0)
    main_grad = torch.randn(6, 5, generator=g)
    want = main_grad.clone()
    for rows in (7, 3):
        grad_output, input_ = torch.randn(rows, 6, generator=g), torch.randn(rows, 5, generator=g)
        linear.add_weight_grad(main_grad, grad_output, input_)
        want.add_(grad_output.t().mm(input_))
    assert torch.equal(main_grad, want)


RECOMPUTES = {  # ModelConfig fields: none; megatron's reentrant checkpoint (full, selective); torch's
    "none": {},
    "full": {"recompute": "full"},
    "selective": {"recompute": "selective"},
    "torch": {"recompute": "full", "recompute_impl": "torch"},  # saved tensors come back detached
    "keep_attention": {"recompute": "full", "recompute_impl": "torch", "recompute_keep_attention": True},
}


@pytest.mark.parametrize("recompute", sorted(RECOMPUTES))
def test_policy_steps_are_the_unfused_ones_bit_for_bit(monkeypatch, counted, recompute):
    base = policy_common.model_config
    fields = RECOMPUTES[recompute]
    monkeypatch.setattr(policy_common, "model_config", lambda *a: dataclasses.replace(base(*a), **fields))
    monkeypatch.setattr(linear, "WGRAD_INTO_MAIN_GRAD", False)
    try:
        _, unfused_norms, unfused = train(build_policy())
    finally:
        destroy_distributed()
    assert counted == []
    monkeypatch.setattr(linear, "WGRAD_INTO_MAIN_GRAD", True)
    try:
        micro_batches, fused_norms, fused = train(build_policy())
    finally:
        destroy_distributed()
    # every linear weight of every layer, once per micro-batch and step (backward runs once under recompute)
    assert len(counted) == TINY_HF["num_hidden_layers"] * len(LINEARS) * micro_batches * 2
    assert micro_batches > 1  # accumulation over micro-batches is what is checked
    assert fused_norms == unfused_norms
    assert all(torch.equal(fused[k], unfused[k]) for k in unfused)


def test_backward_leaves_the_gradient_in_main_grad_and_tells_ddp(counted):
    policy = build_policy()
    try:
        sequences = fixed_sequences()
        micro_batches = policy.pack(sequences)
        for chunk in policy.model_chunks:
            chunk.zero_grad_buffer()
        policy.train()
        policy._run(micro_batches[:1], lambda mb, model, hidden: _loss(policy, mb, model, hidden), False)
        weights = linear_weights(policy)
        assert len(weights) == TINY_HF["num_hidden_layers"] * len(LINEARS)
        for name, p in weights.items():
            assert p.grad is None, name  # DDP's hook dropped the placeholder
            assert p.grad_added_to_main_grad, name
            assert p.main_grad.abs().sum() > 0, name
        for chunk in policy.model_chunks:
            chunk.zero_grad_buffer()  # the next step starts with the flag down again
        assert not any(p.grad_added_to_main_grad for p in weights.values())
    finally:
        destroy_distributed()


def _loss(policy, mb, model, hidden):
    logprobs, entropy = policy._token_logprobs(mb, model, hidden, 1.0)
    loss, stats = nll_loss(logprobs, entropy, mb)
    return loss, (loss.detach(), stats)


def test_compiled_layers_keep_autograds_path_for_good(monkeypatch, counted):
    """Under model.compile build_model takes every linear layer off the fused path, so a call dynamo runs
    eagerly cannot take it either (a weight must not switch paths within a step: DDP's hook would drop its
    later gradients)."""
    from questa_nemo.model import megatron

    monkeypatch.setattr(megatron, "compile_on", lambda cfg: True)  # compile is lazy: nothing compiles here
    policy = build_policy()
    try:
        layers = [m for m in policy.modules[0].modules() if isinstance(m, (linear.ColumnLinear, linear.RowLinear))]
        assert len(layers) == TINY_HF["num_hidden_layers"] * len(LINEARS)
        assert not any(layer.fuse_wgrad for layer in layers)
        for layer in policy.modules[0].decoder.layers:  # run them eagerly, as dynamo would in a fallback
            layer._compiled_call_impl = None  # what nn.Module.compile set
        train(policy, steps=1)
        assert counted == []
    finally:
        destroy_distributed()


def test_layers_without_main_grad_keep_autograds_gradient(counted):
    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.parallel import init_distributed

    cfg = policy_common.model_config()
    init_distributed(cfg)
    try:
        model = build_model(TINY_HF, cfg)
        qkv = model.decoder.layers[0].self_attention.linear_qkv
        # on the model's device and dtype (build_model puts it on the GPU where there is one)
        w = qkv.weight
        x = torch.randn(5, 1, TINY_HF["hidden_size"], device=w.device, dtype=w.dtype, requires_grad=True)
        out, _ = qkv(x)
        out.sum().backward()
        assert counted == [] and w.grad is not None
        expected = torch.ones(5, out.shape[-1], device=w.device, dtype=w.dtype).t().mm(x.detach()[:, 0])
        # the same product autograd's linear backward makes: bit for bit on the CPU; on a GPU the GEMM may
        # pick another kernel for the transposed operand, so within rounding there
        tol = {"rtol": 0, "atol": 0} if w.device.type == "cpu" else {}
        torch.testing.assert_close(w.grad, expected, **tol)
    finally:
        destroy_distributed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-from-bf16 GEMM runs on CUDA only")
def test_bf16_weights_on_cuda_accumulate_into_fp32_main_grad(monkeypatch, counted):
    """bf16 weights, fp32 main_grad (the trainer's GPU layout): the GEMM writes the fp32 sum itself
    (torch.addmm out_dtype); gradients over two micro-batches as DDP's bf16-product-then-add gives them."""
    base = policy_common.model_config
    monkeypatch.setattr(policy_common, "model_config", lambda *a: dataclasses.replace(base(*a), params_dtype="bf16"))
    policy = build_policy()
    try:
        assert linear._has_out_dtype_addmm(torch.device("cuda"))
        micro_batches = policy.pack(fixed_sequences())[:2]
        grads = {}
        for fused in (False, True):
            monkeypatch.setattr(linear, "WGRAD_INTO_MAIN_GRAD", fused)
            for chunk in policy.model_chunks:
                chunk.zero_grad_buffer()
            policy.train()
            policy._run(micro_batches, lambda mb, model, hidden: _loss(policy, mb, model, hidden), False)
            grads[fused] = {k: p.main_grad.clone() for k, p in linear_weights(policy).items()}
        assert len(counted) == len(grads[True]) * 2
        for k, want in grads[False].items():
            assert grads[True][k].dtype == torch.float32
            assert (grads[True][k] - want).abs().max() <= 2e-2 * want.abs().max(), k
    finally:
        destroy_distributed()
