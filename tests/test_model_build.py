"""Model build details: activation recompute leaves gradients unchanged, SDPA core attention, the bench smoke."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from tiny_hf import VOCAB, tiny_hf_model  # noqa: E402

from questa_nemo.config import ConfigError, ModelConfig  # noqa: E402
from questa_nemo.model import attention  # noqa: E402
from questa_nemo.model.attention import packed_causal_sdpa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_process():
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(ModelConfig(params_dtype="fp32"))
    yield
    destroy_distributed()


def _grads(cfg: ModelConfig, ref, hf) -> dict[str, torch.Tensor]:
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight
    from questa_nemo.model.megatron import build_model, load_hf_weights

    model = build_model(hf, cfg)
    load_hf_weights(model, ref.state_dict(), hf, cfg)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    hidden = final_hidden_states(model, ids, torch.arange(16).expand_as(ids))  # [s, b, h]
    out = chunked_logprobs(
        hidden, output_weight(model), ids.roll(-1, 1).t(), vocab_size=VOCAB, chunk_tokens=9
    )
    (out.logprobs.mean() + 0.1 * out.entropy.mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_variants_give_the_same_gradients(single_process):
    ref, hf = tiny_hf_model("qwen2")
    base = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    expected = _grads(base, ref, hf)
    variants = [
        ModelConfig(params_dtype="fp32", attention="sdpa", recompute="full"),
        ModelConfig(params_dtype="fp32", attention="sdpa", recompute="full", recompute_num_layers=2),
        ModelConfig(
            params_dtype="fp32",
            attention="sdpa",
            recompute="selective",
            recompute_modules=["core_attn", "mlp"],
        ),
        ModelConfig(params_dtype="fp32", attention="sdpa", recompute="full", recompute_impl="torch"),
        ModelConfig(
            params_dtype="fp32",
            attention="sdpa",
            recompute="full",
            recompute_impl="torch",
            recompute_keep_attention=True,
        ),
        ModelConfig(
            params_dtype="fp32",
            attention="sdpa",
            recompute="full",
            recompute_num_layers=1,
            recompute_impl="torch",
            recompute_keep_attention=True,
        ),
    ]
    for cfg in variants:
        got = _grads(cfg, ref, hf)
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(
                got[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{cfg.recompute}: {name}"
            )


def test_recompute_reruns_attention_unless_kept(single_process):
    """Backward reruns each layer's fused SDPA op under megatron's and torch's full recompute, not when it is
    kept; torch's recompute is not megatron's and skips a matmul a layer; a forward without grad is not
    checkpointed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from questa_nemo.model.logprobs import final_hidden_states
    from questa_nemo.model.megatron import build_model, transformer_config_from_hf
    from questa_nemo.model.recompute import KEPT_OPS

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = self.matmuls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func in KEPT_OPS
            self.matmuls += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    _, hf = tiny_hf_model("qwen2")
    layers = hf["num_hidden_layers"]
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    reruns, matmuls = {}, {}
    for impl, keep in (("megatron", False), ("torch", False), ("torch", True)):
        cfg = ModelConfig(
            params_dtype="fp32",
            attention="sdpa",
            recompute="full",
            recompute_impl=impl,
            recompute_keep_attention=keep,
        )
        cfg.validate()
        megatron_recompute = transformer_config_from_hf(hf, cfg).recompute_granularity
        assert megatron_recompute == ("full" if impl == "megatron" else None)
        model = build_model(hf, cfg)
        model.train()
        with CountAttention() as forward:
            hidden = final_hidden_states(model, ids, torch.arange(8)[None])
        with CountAttention() as backward:
            hidden.float().pow(2).mean().backward()
        assert forward.calls == layers
        reruns[impl, keep], matmuls[impl, keep] = backward.calls, backward.matmuls
        with torch.no_grad(), CountAttention() as inference:
            final_hidden_states(model, ids, torch.arange(8)[None])
        assert inference.calls == layers
    assert reruns == {("megatron", False): layers, ("torch", False): layers, ("torch", True): 0}
    # torch's recompute stops before each layer's MLP down projection (backward does not need its output)
    assert matmuls["megatron", False] - matmuls["torch", False] == layers


class _StashingLayer(torch.nn.Module):
    """What megatron-core 0.19's TransformerLayer does: from the pre-MLP norm to the end of the MLP it keeps
    `mlp_norm_manager`, a handle holding the post-attention hidden states, and sets it back to None at the end."""

    def __init__(self, offload: bool = False):
        super().__init__()
        self.offload = offload
        self.w1 = torch.nn.Parameter(torch.randn(4, 4))
        self.w2 = torch.nn.Parameter(torch.randn(4, 4))
        self.mlp_norm_manager = None

    def forward(self, x):
        from types import SimpleNamespace

        h = x @ self.w1  # "attention"
        self.mlp_norm_manager = SimpleNamespace(offload=self.offload, tensor=h)
        y = h.relu() @ self.w2  # "down projection": its output is not needed by backward
        self.mlp_norm_manager = None
        return y + x


@pytest.mark.parametrize("drop", [True, False])
def test_early_stopped_recompute_leaves_no_stash_on_the_layer(monkeypatch, drop):
    """Torch's checkpoint stops the recompute before the last matmul, so the layer's own reset never runs in
    backward: without model/recompute.py's drop the recomputed hidden states (and their graph) stay on the
    layer until the next forward (17.98 GiB at 32K on the 1.5B shape, docs/benchmarks.md (sigma)); with it, nothing
    stays. A handle that offloads is megatron's business and is left alone."""
    from questa_nemo.model import recompute

    monkeypatch.setattr(recompute, "DROP_STOPPED_STASH", drop)
    layer = _StashingLayer()
    recompute.checkpoint_layers([layer])
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    if drop:
        assert layer.mlp_norm_manager is None
    else:  # the early stop happened and left the recomputed tensor, its graph alive
        assert layer.mlp_norm_manager is not None and layer.mlp_norm_manager.tensor.grad_fn is not None
    offloading = _StashingLayer(offload=True)
    recompute.checkpoint_layers([offloading])
    offloading(x).sum().backward()
    assert offloading.mlp_norm_manager is not None and offloading.mlp_norm_manager.offload


def test_torch_recompute_options_are_validated():
    from questa_nemo.config import ConfigError

    with pytest.raises(ConfigError, match="model.recompute_keep_attention"):
        ModelConfig(recompute="full", recompute_keep_attention=True).validate()  # megatron's recompute
    with pytest.raises(ConfigError, match="model.recompute_impl"):
        ModelConfig(recompute="selective", recompute_impl="torch").validate()
    from questa_nemo.config import Config, validate

    cfg = Config()
    cfg.model.recompute_impl = "apex"
    with pytest.raises(ConfigError, match="model.recompute_impl"):
        validate(cfg)


def test_bf16_build_has_only_bf16_parameters(single_process):
    """Mixed fp32 norm weights would push torch's rms_norm off its fused kernel."""
    from questa_nemo.model.megatron import build_model

    _, hf = tiny_hf_model("qwen2", layers=1)
    model = build_model(hf, ModelConfig(params_dtype="bf16", attention="sdpa", recompute="none"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_recompute_config_reaches_megatron():
    from questa_nemo.model.megatron import transformer_config_from_hf

    _, hf = tiny_hf_model("llama")
    full = transformer_config_from_hf(
        hf, ModelConfig(params_dtype="fp32", recompute="full", recompute_num_layers=3)
    )
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "block",
        3,
    )
    sel = transformer_config_from_hf(hf, ModelConfig(params_dtype="bf16", recompute="selective"))
    assert sel.recompute_granularity == "selective" and sel.bf16 and sel.params_dtype == torch.bfloat16
    none = transformer_config_from_hf(hf, ModelConfig(recompute="none"))
    assert none.recompute_granularity is None
    assert none.hidden_dropout == 0 and none.attention_dropout == 0


@pytest.mark.parametrize(
    "lengths",
    [[5, 6], [7, 7, 6, 1], [20, 2, 1]],  # batched (similar lengths), batched with a 1-token one, per segment
)
def test_packed_sdpa_is_causal_within_segments_and_zero_on_padding(lengths):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths) + 1  # the last row is padding
    q = torch.randn(t, 4, 8, generator=g, requires_grad=True)  # [t, heads, d]
    k = torch.randn(t, 2, 8, generator=g, requires_grad=True)  # 2 query groups
    v = torch.randn(t, 2, 8, generator=g, requires_grad=True)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    out = packed_causal_sdpa(q, k, v, starts, lengths, scale=8**-0.5)
    expected = torch.zeros_like(out)
    for start, length in zip(starts, lengths):
        rows = slice(start, start + length)
        kk = k[rows].repeat_interleave(2, dim=1)  # GQA: query head i reads group i // 2
        vv = v[rows].repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[rows], kk) * 8**-0.5
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), -torch.inf)
        expected[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out[-1].abs().max() == 0
    weights = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_attention_reads_no_segments_back_from_the_device_once_planned(monkeypatch):
    """The policy registers each micro-batch's plan from its host copy of cu_seqlens (policy._packed_params), so
    a layer never reads cu_seqlens back (a host sync per layer on a GPU); an unregistered micro-batch reads it
    once and every later layer reuses the plan. Same output as the plan-less call."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from questa_nemo.model import attention
    from questa_nemo.model.packing import PackedMicroBatch
    from questa_nemo.model.policy import _packed_params

    lengths = [7, 7, 6, 1]  # batched path (index tensors in the plan)
    cu = torch.tensor([0, 7, 14, 20, 21, 24], dtype=torch.int32)  # 3 positions of padding at the end
    mb = PackedMicroBatch(
        tokens=torch.zeros(1, 24, dtype=torch.long),
        sequence_ids=[0, 1, 2, 3],
        cu_seqlens=cu,
        **{f: None for f in PackedMicroBatch.__dataclass_fields__ if f not in ("tokens", "sequence_ids", "cu_seqlens")},
    )
    params = _packed_params(mb, torch.device("cpu"))
    reads = []
    monkeypatch.setattr(attention, "_segments", lambda p: reads.append(p) or (_ for _ in ()).throw(AssertionError))
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(24, 4, 8, generator=g), torch.randn(24, 2, 8, generator=g), torch.randn(24, 2, 8, generator=g)
    got = attention._packed_forward(q, k, v, params, 8**-0.5)
    want = attention.packed_causal_sdpa(q, k, v, [0, 7, 14, 20], lengths, 8**-0.5).reshape(24, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not reads
    kept = list(attention._plans)
    _packed_params(mb, torch.device("cpu"), plan=False)  # a model without SDPA core attention: no plan made
    assert [id(c) for c, _ in attention._plans] == [id(c) for c, _ in kept]

    monkeypatch.undo()
    calls = []
    original = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda p: calls.append(p) or original(p))
    fresh = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu[:5].clone(), cu_seqlens_kv=cu[:5].clone())
    for _ in range(3):  # three layers of one forward
        torch.testing.assert_close(attention._packed_forward(q, k, v, fresh, 8**-0.5)[:21], want[:21])
    assert len(calls) == 1


def _reference_varlen(native_gqa: bool):
    """A stand-in for torch's flash varlen_attn on CPU, with its signature: causal SDPA per segment of cu."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    **extra):  # fmt: skip
        assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        assert extra == ({"enable_gqa": True} if native_gqa and key.size(1) != query.size(1) else {})
        assert key.size(1) == query.size(1) or native_gqa  # without enable_gqa the heads come repeated
        cu = cu_seq_q.tolist()
        assert query.size(0) == cu[-1] and max_q == max(b - a for a, b in zip(cu[:-1], cu[1:]))
        parts = []
        for a, b in zip(cu[:-1], cu[1:]):
            q, k, v = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            parts.append(attention.causal_sdpa(q, k, v, scale).squeeze(0).transpose(0, 1))
        return torch.cat(parts)

    return varlen_attn, native_gqa



@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("lengths", [[5, 6], [7, 7, 6, 1], [20, 2, 1]])
def test_varlen_path_attends_each_segment_causally_and_zeroes_the_padding(lengths, native_gqa):
    """The GPU path (one variable-length kernel call for all segments) on CPU with a reference kernel of the same
    signature: same output and gradients as the SDPA path, padding rows zero, grouped heads passed as they are
    (torch >= 2.13, enable_gqa) or repeated (torch 2.10-2.12). Gaps between segments keep the SDPA path."""
    g = torch.Generator().manual_seed(0)
    t = sum(lengths) + 3  # three rows of padding
    q = torch.randn(t, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(t, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(t, 2, 8, generator=g, requires_grad=True)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    plan = attention.segment_plan(starts, lengths, q.device)
    assert plan.end == sum(lengths) and plan.cu.tolist() == [0, *[sum(lengths[: i + 1]) for i in range(len(lengths))]]
    got = attention._varlen_attend(q, k, v, plan, 8**-0.5, kernel=_reference_varlen(native_gqa))
    want = packed_causal_sdpa(q, k, v, starts, lengths, scale=8**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[sum(lengths):].abs().max() == 0
    weights = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (q, k, v)),
                    torch.autograd.grad((want * weights).sum(), (q, k, v))):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gap = attention.segment_plan([0, lengths[0] + 1], lengths[:2], q.device)  # a padding row between segments
    assert gap.cu is None
    assert not attention.varlen_usable(q, plan)  # CPU float32: the SDPA path even when varlen is asked for
    assert attention.attention_path(q, plan, varlen=True) == attention.attention_path(q, plan) != "varlen"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash varlen kernel runs on CUDA only")
def test_varlen_kernel_matches_the_sdpa_path_on_gpu():
    """On a GPU in bf16: the variable-length kernel against the SDPA paths (output and gradients)."""
    if attention.varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [700, 33, 1, 512, 512, 90]
    t = sum(lengths) + 64
    q, k, v = (torch.randn(t, h, 128, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (12, 2, 2))  # fmt: skip
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    plan = attention.segment_plan(starts, lengths, q.device)
    assert attention.varlen_usable(q, plan) and attention.attention_path(q, plan, varlen=True) == "varlen"
    assert attention.attention_path(q, plan) != "varlen"  # not asked for: SDPA
    got = attention._attend(q, k, v, plan, 128**-0.5, varlen=True)
    want = attention._attend(q, k, v, plan, 128**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
    assert got[sum(lengths):].abs().max() == 0
    weights = torch.randn(got.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (q, k, v)),
                    torch.autograd.grad((want * weights).sum(), (q, k, v))):  # fmt: skip
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2)


def test_keep_attention_keeps_the_varlen_op():
    """recompute_keep_attention saves torch's variable-length attention op (the packed path with
    model.packed_attention=varlen) as it saves SDPA's; on a GPU, a checkpointed packed attention under the keep
    policy does not rerun it."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint

    from questa_nemo.model import recompute

    if attention.varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    op = torch.ops.torch_attn._varlen_attn.default
    assert op in recompute.kept_ops() and recompute.KEPT_OPS <= recompute.kept_ops()
    assert recompute._policy(recompute.kept_ops(), None, op) == CheckpointPolicy.MUST_SAVE
    assert recompute._policy(recompute.kept_ops(), None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    if not torch.cuda.is_available():
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is op
            return func(*args, **(kwargs or {}))

    lengths = [300, 200, 12]
    plan = attention.segment_plan([0, 300, 500], lengths, torch.device("cuda"))
    x = torch.randn(520, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def layer(x):
        out = attention._attend(x * 2, x[:, :2] * 3, x[:, :2] * 4, plan, 128**-0.5, varlen=True)
        return out.float().pow(2).sum()

    for keep, reruns in ((False, 1), (True, 0)):
        context_fn = recompute.keep_attention_contexts if keep else recompute.noop_context_fn
        loss = checkpoint(layer, x, use_reentrant=False, context_fn=context_fn)
        Count.calls = 0
        with Count():
            loss.backward()
        assert Count.calls == reruns, keep


def test_packed_attention_key_is_validated():
    """model.packed_attention: sdpa | varlen | auto (the default: varlen where usable); anything else is refused naming the key.
    Whether varlen can run on this machine is the model build's and doctor's question, not validation's."""
    from questa_nemo.config import ConfigError, load_config

    assert ModelConfig().packed_attention == "auto"
    with pytest.raises(ConfigError, match=r"^model.packed_attention: 'flash' is not one of sdpa, varlen, auto$"):
        load_config("default", ["model.packed_attention=flash"])
    for choice in ("sdpa", "varlen", "auto"):
        assert load_config("default", [f"model.packed_attention={choice}"]).model.packed_attention == choice


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
def test_packed_varlen_on_is_sdpa_on_cpu_and_refuses_varlen_with_the_reason(monkeypatch):
    from questa_nemo.config import ConfigError
    from questa_nemo.model import megatron as mg
    from questa_nemo.model import varlen

    monkeypatch.setattr(mg, "te_available", lambda: False)
    assert not mg.packed_varlen_on(ModelConfig())  # the default (auto) on CPU: sdpa
    assert not mg.packed_varlen_on(ModelConfig(packed_attention="auto"))  # auto on CPU: sdpa
    assert not mg.packed_varlen_on(ModelConfig(attention="local", packed_attention="auto"))
    refused = "^model.packed_attention: varlen unavailable: "
    with pytest.raises(ConfigError, match=f"{refused}{varlen.NEEDS_GPU}$"):
        mg.packed_varlen_on(ModelConfig(packed_attention="varlen"))
    with pytest.raises(ConfigError, match=f"{refused}megatron's local attention"):
        mg.packed_varlen_on(ModelConfig(attention="local", packed_attention="varlen"))
    with pytest.raises(ConfigError, match="^model.packed_attention: 'flash' is not one of"):
        mg.packed_varlen_on(ModelConfig(packed_attention="flash"))
    # where the kernel can run: auto takes it, except under Transformer Engine or local attention
    monkeypatch.setattr(varlen, "varlen_available", lambda device: None)
    assert mg.packed_varlen_on(ModelConfig(packed_attention="auto"))
    assert mg.packed_varlen_on(ModelConfig(packed_attention="varlen"))
    assert not mg.packed_varlen_on(ModelConfig(attention="local", packed_attention="auto"))
    monkeypatch.setattr(mg, "te_available", lambda: True)  # attention=auto resolves to TE
    assert not mg.packed_varlen_on(ModelConfig(packed_attention="auto"))
    with pytest.raises(ConfigError, match=f"{refused}Transformer Engine attention attends packed rows"):
        mg.packed_varlen_on(ModelConfig(packed_attention="varlen"))


def test_varlen_available_gives_the_reason():
    from questa_nemo.model import varlen

    assert attention.varlen_available is varlen.varlen_available  # one check, megatron-free (doctor's too)
    assert varlen.varlen_available("cpu") == varlen.NEEDS_GPU == "needs a CUDA GPU"
    on_gpu = None if varlen.varlen_kernel() else varlen.NO_KERNEL
    assert varlen.varlen_available(torch.device("cuda")) == on_gpu


def test_spec_provider_gives_varlen_core_attention_where_it_can_run(monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from questa_nemo.model import megatron as mg
    from questa_nemo.model import varlen
    from questa_nemo.model.attention import SDPACoreAttention, VarlenCoreAttention

    auto = ModelConfig(params_dtype="fp32", attention="sdpa", packed_attention="auto")
    if not torch.cuda.is_available():
        assert mg.spec_provider(auto).core_attention() is SDPACoreAttention  # auto on CPU: sdpa
    monkeypatch.setattr(varlen, "varlen_available", lambda device: None)
    assert mg.spec_provider(auto).core_attention() is VarlenCoreAttention
    assert VarlenCoreAttention.varlen and not SDPACoreAttention.varlen
    sdpa = ModelConfig(params_dtype="fp32", attention="sdpa", packed_attention="sdpa")
    assert mg.spec_provider(sdpa).core_attention() is SDPACoreAttention
    local = ModelConfig(params_dtype="fp32", attention="local", packed_attention="auto")
    assert mg.spec_provider(local).core_attention() is DotProductAttention


def test_varlen_core_attention_on_cpu_attends_packed_rows_through_sdpa(single_process, monkeypatch):
    """A model built with VarlenCoreAttention (auto, the kernel made to look available) runs on CPU in fp32:
    `varlen_usable` is false for CPU tensors, so packed rows take the SDPA path, with the SDPA model's outputs."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from questa_nemo.model import fused, varlen
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.attention import SDPACoreAttention, VarlenCoreAttention
    from questa_nemo.model.logprobs import final_hidden_states

    monkeypatch.setattr(varlen, "varlen_available", lambda device: None)
    monkeypatch.setattr(attention, "_varlen_attend", lambda *a, **k: pytest.fail("varlen kernel called"))
    ref, hf = tiny_hf_model("qwen2")
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11
    )
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    positions = fused.segment_positions(cu, 20)[None]
    outs = {}
    for choice, core_type in (("sdpa", SDPACoreAttention), ("auto", VarlenCoreAttention)):
        cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none", packed_attention=choice)
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        assert {type(layer.self_attention.core_attention) for layer in model.decoder.layers} == {core_type}
        with torch.no_grad():
            outs[choice] = final_hidden_states(model, ids, positions, packed_seq_params=params)
    torch.testing.assert_close(outs["auto"], outs["sdpa"], rtol=0, atol=0)


def test_layers_trace_under_torch_compile_with_packed_batches(single_process, monkeypatch):
    """model.compile's path, traced by dynamo (eager backend: no C++ compiler needed): our fused modules (CPU
    reference maths) and packed attention (kept eager) give the uncompiled model's outputs and gradients over
    micro-batches of varying packing, and an unpacked one through the fused QKV split + RoPE path
    (`FusedQKVSelfAttention`, megatron-core 0.16+; its flag set per call); compile is off on CPU (`compile_on`)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from questa_nemo.model import fused
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import final_hidden_states

    ref, hf = tiny_hf_model("qwen2")
    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none", compile=True)
    assert not mg.compile_on(cfg)
    monkeypatch.setattr(mg, "fusions_on", lambda cfg: True)
    monkeypatch.setattr(fused, "FUSED_QKV_ROPE", True)
    models = []
    for compiled in (False, True):
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        if compiled:
            for layer in model.decoder.layers:
                layer.compile(backend="eager")
        models.append(model)
    try:
        for cuts in ([0, 9, 20], [0, 4, 11, 17], [0, 15], [0, 13]):
            cu = torch.tensor(cuts, dtype=torch.int32)
            longest = int(cu.diff().max())
            params = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=longest,
                max_seqlen_kv=longest,
            )
            ids = torch.randint(0, VOCAB, (1, cuts[-1]), generator=torch.Generator().manual_seed(cuts[1]))
            positions = fused.segment_positions(cu, cuts[-1])[None]
            if cuts == [0, 13]:  # one unpacked sequence
                params, positions = None, torch.arange(13)[None]
            outs, grads = [], []
            for model in models:
                model.zero_grad()
                hidden = final_hidden_states(model, ids, positions, packed_seq_params=params)
                hidden.pow(2).mean().backward()
                outs.append(hidden.detach())
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
            assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
            for name, grad in grads[0].items():
                torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        torch._dynamo.reset()
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.transformer import attention as mcore_attention

        rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb_thd = None
        if fused.qkv_rope_supported():
            mcore_attention.HAVE_FUSED_QKV_ROPE = False
            mcore_attention.__dict__.pop("apply_fused_qkv_rotary_pos_emb", None)


def test_bench_train_cpu_smoke(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_train

    out = tmp_path / "bench.json"
    runs = ["32/mcore:recompute=full,chunk=8", "32/mcore:recompute=selective,docs=3", "32/hf:recompute=none",
            "32/mcore:recompute=full,keepattn=1,newstuff=0", "32/mcore:recompute=full,optim=megatron,accum=2",
            "64/mcore:recompute=none,docs=r1,segplan=0", "64/mcore:recompute=none,docs=r1"]  # fmt: skip
    code = bench_train.main(["--device", "cpu", "--tiny", "--preset", "none", "--runs", *runs,
                             "--steps", "1", "--warmup", "1", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0 and result["card"] == "cpu"
    assert [r["status"] for r in result["runs"]] == ["ok"] * 7
    r1 = result["runs"][-1]  # the trainer's packing of NeMo-RL-shaped lengths, in miniature: rows of several
    assert 1 < r1["attended"] < 64 and 0.95 <= r1["real_fraction"] <= 1  # sequences, each row >= 95% full
    assert all(bench_train.parse_run(run) for preset in bench_train.PRESETS.values() for run in preset)
    assert all(r["tokens_per_s"] > 0 for r in result["runs"])
    assert bench_train.flops_per_token(bench_train.QWEN25_15B, 8192) == pytest.approx(11.36e9, rel=0.01)
    # --saved-sites on a GPU: live blocks with frames (allocated while recording) by site, largest first
    frame = {"filename": "/x/megatron/core/layer.py", "line": 7, "name": "forward"}
    snap = {"segments": [{"blocks": [
        {"state": "active_allocated", "size": 8, "frames": [frame]},
        {"state": "active_allocated", "size": 4, "frames": [frame]},
        {"state": "active_allocated", "size": 99, "frames": []},  # allocated before recording
        {"state": "inactive", "size": 50, "frames": [frame]},
    ]}]}
    assert bench_train.alive_sites(snap) == [{"site": "layer.py:7 forward", "gib": 12 / 2**30, "blocks": 2}]


def test_bench_train_clock_sampler_summarises_nvml_readings(monkeypatch):
    """--clocks on a GPU: NVML's SM clock, power (mW) and clock-limit reason bits sampled on a thread until
    stopped, summarised as means and the share of samples under each reason (NVML stood in for by a module
    of its calls)."""
    import types

    sys.path.insert(0, str(REPO / "bench"))
    import bench_train

    samples = [(1980, 650.0, 0x4), (1755, 700.0, 0x4), (1980, 400.0, 0x0)]
    out = bench_train.clock_summary(samples, 700.0)
    assert out["samples"] == 3 and out["sm_mhz_min"] == 1755
    assert out["sm_mhz_mean"] == pytest.approx((1980 + 1755 + 1980) / 3)
    assert out["power_w_mean"] == pytest.approx((650 + 700 + 400) / 3) and out["power_limit_w"] == 700
    assert out["share_sw_power_cap"] == pytest.approx(2 / 3) and out["share_hw_slowdown"] == 0
    assert bench_train.clock_summary([], 700.0) == {}
    nvml = types.SimpleNamespace(
        NVML_CLOCK_SM=0, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu",
        nvmlDeviceGetClockInfo=lambda h, kind: 1755, nvmlDeviceGetPowerUsage=lambda h: 690_000,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlShutdown=lambda: None,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sampler = bench_train.ClockSampler(period=0.001)
    time.sleep(0.05)
    out = sampler.stop()
    assert out["samples"] >= 1 and out["sm_mhz_mean"] == 1755 and out["power_w_mean"] == 690
    assert out["power_limit_w"] == 700 and out["share_sw_power_cap"] == 1


@pytest.mark.parametrize("name", ["openmath_nemotron_1p5b", "world_cpu"])
def test_model_yaml_loads_and_validates(name, tmp_path):
    """conf/model/*.yaml merge into the schema; the reference one against a Qwen2.5-1.5B-shaped config.json."""
    from omegaconf import OmegaConf

    from questa_nemo.config import Config, read_hf_config, to_config, validate, validate_model_shapes

    sys.path.insert(0, str(REPO / "bench"))
    import bench_train

    raw = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    if name == "openmath_nemotron_1p5b":
        (tmp_path / "config.json").write_text(json.dumps(bench_train.QWEN25_15B))
        raw.hf_config = raw.checkpoint = str(tmp_path)
    cfg = to_config({"model": raw, "train": {"micro_batch_tokens": 10**6}})
    validate(cfg)
    validate_model_shapes(cfg.model, read_hf_config(cfg.model.hf_config))
    assert isinstance(cfg, Config) and cfg.model.recompute in ("none", "full")


def test_cuda_allocator_default_is_expandable_segments_unless_the_user_set_one(monkeypatch):
    """`questa-nemo train` / `eval` set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True on a GPU before CUDA
    starts, unless the user set it (or PYTORCH_ALLOC_CONF), the backend shares weights by CUDA IPC (trtllm),
    or it is too late (CUDA initialised)."""
    import os

    from questa_nemo.model import parallel

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert parallel.cuda_allocator_defaults("trtllm") is None and "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert parallel.cuda_allocator_defaults("megatron") == "expandable_segments:True"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    assert parallel.cuda_allocator_defaults("megatron") is None and env["PYTORCH_CUDA_ALLOC_CONF"].startswith("max")
    del env["PYTORCH_CUDA_ALLOC_CONF"]
    env["PYTORCH_ALLOC_CONF"] = "expandable_segments:False"
    assert parallel.cuda_allocator_defaults("megatron") is None and "PYTORCH_CUDA_ALLOC_CONF" not in env
    del env["PYTORCH_ALLOC_CONF"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert parallel.cuda_allocator_defaults("megatron") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert parallel.cuda_allocator_defaults("megatron") is None and "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_train_and_eval_set_the_allocator_default_before_anything_starts_cuda(monkeypatch):
    """`train` checks the config against the GPUs (doctor.check_config starts CUDA): the allocator default comes
    first; `eval` sets it before its own checks too."""
    from questa_nemo import doctor
    from questa_nemo.config import ConfigError
    from questa_nemo.eval import run as eval_run
    from questa_nemo.model import parallel
    from questa_nemo.train import recipe

    calls = []
    monkeypatch.setattr(parallel, "cuda_allocator_defaults", lambda backend: calls.append(("alloc", backend)))
    monkeypatch.setattr(doctor, "check_config", lambda cfg: calls.append(("check", None)) or ["stop here"])
    assert recipe.main("default", ["rollout.backend=hf"]) == 2
    assert calls == [("alloc", "hf"), ("check", None)]
    calls.clear()
    with pytest.raises(ConfigError, match="eval.benchmarks"):
        eval_run.main("eval_default", ["eval.benchmarks=[]"], [])
    assert calls == [("alloc", "megatron")]


def test_ckpt_leftovers_counts_what_the_next_step_frees(tmp_path):
    """bench/ckpt_leftovers.py's count: memory allocated before the mark and freed after it, by (free site,
    allocation site); what is freed within a step, or never, does not count. Its CPU smoke run writes a row
    per run."""
    sys.path.insert(0, str(REPO))
    from bench.ckpt_leftovers import carried, main

    def ev(action, addr, size, where):
        return {"action": action, "addr": addr, "size": size,
                "frames": [{"filename": "/x/questa_nemo/model/m.py", "line": where, "name": "f"}]}

    traces = [ev("alloc", 1, 100, 10), ev("alloc", 2, 50, 11), ev("free_requested", 2, 50, 12),
              ev("alloc", 3, 7, 13),  # mark = 4: the second step starts
              ev("alloc", 4, 9, 14), ev("free_requested", 1, 100, 15), ev("free_requested", 4, 9, 16)]
    total, sites = carried(traces, mark=4)
    assert total == 100
    assert sites == [{"freed_at": "m.py:15 f", "allocated_at": "m.py:10 f", "gib": 100 / 2**30, "blocks": 1}]
    out = tmp_path / "leftovers.json"
    assert main(["--device", "cpu", "--tiny", "--runs", "64/mcore:recompute=full,ckpt=torch,clear=0",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in rows] == ["64/mcore:recompute=full,ckpt=torch,clear=0"] and rows[0]["seq"] == 256


def test_keep_swiglu_keeps_the_swiglu_op_through_recompute(monkeypatch):
    """model.recompute_keep_swiglu: backward does not rerun our SwiGLU's forward (it does without the knob), the
    layers call it as the custom op only then, and the gradients are those of the model without recompute.
    Our SwiGLU on the CPU (fusions forced on) is the eager maths."""
    from megatron.core.models.common.embeddings import rope_utils

    from questa_nemo.model import fused
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import final_hidden_states
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    calls = []
    forward = fused._swiglu_forward
    monkeypatch.setattr(fused, "_swiglu_forward", lambda y: calls.append(1) or forward(y))
    monkeypatch.setattr(mg, "fusions_on", lambda cfg: True)
    ref, hf = tiny_hf_model("qwen2")
    layers = hf["num_hidden_layers"]
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))

    def run(**recompute):
        cfg = ModelConfig(params_dtype="fp32", attention="sdpa", **recompute)
        cfg.validate()
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        model.train()
        as_op = {m.as_op for m in model.modules() if isinstance(m, fused.SwiGLU)}
        assert as_op == {bool(recompute.get("recompute_keep_swiglu"))}
        hidden = final_hidden_states(model, ids, torch.arange(8)[None])
        calls.clear()
        hidden.float().pow(2).mean().backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    init_distributed(ModelConfig(params_dtype="fp32"))
    try:
        if not mg.own_swiglu_on(ModelConfig()):  # megatron-core 0.14: megatron's SwiGLU, refused
            with pytest.raises(ConfigError, match="model.recompute_keep_swiglu"):
                run(recompute="full", recompute_impl="torch", recompute_keep_swiglu=True)
            return
        _, expected = run(recompute="none")
        rerun, _ = run(recompute="full", recompute_impl="torch")
        kept, got = run(recompute="full", recompute_impl="torch", recompute_keep_swiglu=True)
        both, _ = run(
            recompute="full", recompute_impl="torch", recompute_keep_swiglu=True, recompute_keep_attention=True
        )
    finally:
        rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb_thd = None
        destroy_distributed()
    assert (rerun, kept, both) == (layers, 0, 0)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
