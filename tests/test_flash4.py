"""model.attention=fa4: FlashAttention 4's core attention (model/attention.py FA4CoreAttention, model/flash4.py).

The kernels run on sm_90 / sm_100 GPUs only; here a reference with the signatures of FA4's forward and backward
(fp64 attention, and the backward FlashAttention computes from the forward's output and log-sum-exp) stands
in for them, so what is tested on CPU is our side: the custom ops (torch's opcheck, no graph break when
compiled, kept whole by recompute's keep-attention policy), the layouts handed to the kernels, grouped heads
passed as they are, packed rows in one variable-length call with the padding zeroed, the SDPA fallback when
segments are not back to back, and the refusals (build, config, doctor) with their reasons. The GPU run
against cuDNN's SDPA is bench/bench_attention.py's (`--backends cudnn fa4 --check`).
"""

from __future__ import annotations

import pytest
import torch
from test_doctor import CPU, EIGHT_H100, _config
from test_model_build import VOCAB, single_process, tiny_hf_model  # noqa: F401  (fixture)

from questa_nemo import doctor
from questa_nemo.config import ConfigError, ModelConfig, load_config
from questa_nemo.model import attention, flash4
from questa_nemo.model.attention import packed_causal_sdpa


def _reference(q, k, v, scale):
    """Causal attention of one sequence's [s, h, d] queries over [s, g, d] keys / values in fp64: (out, lse
    [h, s], probabilities [h, s, s], keys and values expanded to h heads)."""
    heads = q.size(1)
    k, v = (x.double().repeat_interleave(heads // x.size(1), dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = scores.masked_fill(torch.ones(q.size(0), q.size(0), dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp()
    return torch.einsum("hqk,khd->qhd", probs, v), lse, probs, k, v


def _reference_grads(q, k, v, out, dout, lse, scale):
    """FlashAttention's backward from (out, lse) as its kernels compute it, for one sequence; grouped heads'
    key / value gradients summed over their group."""
    _, want_lse, probs, kx, vx = _reference(q, k, v, scale)
    torch.testing.assert_close(lse.double(), want_lse)  # the forward's lse came back to the backward
    dout, out = dout.double(), out.double()
    dv = torch.einsum("hqk,qhd->khd", probs, dout)
    dprobs = torch.einsum("qhd,khd->hqk", dout, vx)
    dscores = probs * (dprobs - (dout * out).sum(-1).T[..., None])
    dq = torch.einsum("hqk,khd->qhd", dscores, kx) * scale
    dk = torch.einsum("hqk,qhd->khd", dscores, q.double()) * scale
    group = q.size(1) // k.size(1)
    dk, dv = (x.unflatten(1, (k.size(1), group)).sum(2) for x in (dk, dv))
    return dq, dk, dv


class ReferenceFA4:
    """FA4's forward and backward (flash_attn.cute.interface's _flash_attn_fwd / _flash_attn_bwd) in fp64, with
    the arguments our custom ops must pass checked (any other keyword fails); `calls` counts them."""

    def __init__(self):
        self.calls = {"fwd": 0, "bwd": 0, "varlen": 0}

    @staticmethod
    def _segments(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        if cu_seqlens_q is None:
            assert q.dim() == 4 and cu_seqlens_k is None and max_seqlen_q is None
            return None
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
        cu = cu_seqlens_q.tolist()
        assert q.size(0) == cu[-1] and max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
        return list(zip(cu[:-1], cu[1:]))

    def fwd(self, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            softmax_scale=None, causal=False, return_lse=False):  # fmt: skip
        assert causal and return_lse and q.stride(-1) == 1 and q.size(-2) % k.size(-2) == 0  # groups as they are
        segments = self._segments(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        self.calls["fwd"] += 1
        if segments is None:  # [b, s, h, d]: lse [b, h, s]
            outs = [_reference(q[i], k[i], v[i], softmax_scale)[:2] for i in range(q.size(0))]
            out, lse = torch.stack([o for o, _ in outs]), torch.stack([x for _, x in outs])
        else:  # [t, h, d]: lse [h, t]
            self.calls["varlen"] += 1
            outs = [_reference(q[a:b], k[a:b], v[a:b], softmax_scale)[:2] for a, b in segments]
            out, lse = torch.cat([o for o, _ in outs]), torch.cat([x for _, x in outs], dim=1)
        return out.to(q.dtype), lse.float(), None, None, None

    def bwd(self, q, k, v, out, dout, lse, softmax_scale=None, causal=False, *, cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):  # fmt: skip
        assert causal and lse.dtype == torch.float32 and out.shape == q.shape and dout.shape == q.shape
        segments = self._segments(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        self.calls["bwd"] += 1
        if segments is None:
            grads = [_reference_grads(q[i], k[i], v[i], out[i], dout[i], lse[i], softmax_scale) for i in range(q.size(0))]
            dq, dk, dv = (torch.stack(g) for g in zip(*grads))
        else:
            grads = [_reference_grads(q[a:b], k[a:b], v[a:b], out[a:b], dout[a:b], lse[:, a:b], softmax_scale)
                     for a, b in segments]  # fmt: skip
            dq, dk, dv = (torch.cat(g) for g in zip(*grads))
        # as FA4 allocates them: torch.empty_like of each input (a transposed view keeps its strides)
        return tuple(torch.empty_like(x).copy_(g) for g, x in zip((dq, dk, dv), (q, k, v)))


@pytest.fixture
def kernels(monkeypatch):
    """The reference in place of the installed package's kernels (the custom ops look them up when called)."""
    reference = ReferenceFA4()
    monkeypatch.setattr(flash4, "fa4_kernels", lambda: flash4.FA4(reference.fwd, reference.bwd))
    return reference


def _qkv(s, b=1, heads=4, groups=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, h, d, generator=g, requires_grad=True) for h in (heads, groups, groups)]


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_call_matches_sdpa_core_attention(batch, kernels):
    """megatron's [s, b, h, d] query / key / value through the FA4 op: SDPACoreAttention's output and
    gradients, the kernels handed [b, s, h, d] views (no copies) with grouped heads as they are, the backward
    given the forward's own output and lse (the reference checks it)."""
    q, k, v = _qkv(13, batch)
    got = attention.fa4_dense(q, k, v, 8**-0.5)
    assert kernels.calls == {"fwd": 1, "bwd": 0, "varlen": 0} and got.shape == q.shape
    want = attention.causal_sdpa(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), 8**-0.5).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    up = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert kernels.calls["bwd"] == 1


@pytest.mark.parametrize("packed", [False, True])
def test_the_custom_ops_pass_torchs_opcheck(packed, kernels):
    """torch.library.opcheck: schema, the fake kernels' shapes, dtypes and strides against the real ones
    (what torch.compile traces with), the autograd registration, and AOT dispatch."""
    g = torch.Generator().manual_seed(4)
    if packed:
        q, k, v = (torch.randn(11, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
        args = (q, k, v, torch.tensor([0, 5, 11], dtype=torch.int32), 6, 8**-0.5)
    else:
        q, k, v = (x.transpose(0, 1) for x in _qkv(7, 2))  # [b, s, h, d] views, as fa4_dense passes them
        args = (q, k, v, None, 0, 8**-0.5)
    torch.library.opcheck(torch.ops.questa.fa4_attention.default, args)
    out, lse = flash4.fa4_attention(*args)
    dout = torch.randn(out.shape, generator=g)
    backward_args = (dout, *(x.detach() for x in (*args[:3], out, lse)), *args[3:])  # no double backward
    torch.library.opcheck(torch.ops.questa.fa4_attention_backward.default, backward_args)


def test_lse_is_not_differentiable_and_gradients_keep_the_kernels_layout(kernels):
    """lse is for the backward only (marked non-differentiable: a caller differentiating it gets an error, not
    zeros); gradients come back as FA4 allocates them (empty_like of each input, for a transposed view its
    strides, for a non-dense split of a fused projection contiguous): the layout the fake promises."""
    q, k, v = (x.transpose(0, 1) for x in _qkv(6, 2))
    out, lse = flash4.fa4_attention(q, k, v, None, 0, 8**-0.5)
    assert out.requires_grad and not lse.requires_grad
    fused = torch.randn(6, 2, 8, 8, requires_grad=True)  # [s, b, heads + 2 groups, d]: megatron's fused q/k/v
    qs, ks, vs = (x.transpose(0, 1) for x in torch.split(fused, [4, 2, 2], dim=2))  # non-dense views
    grads = torch.autograd.grad(flash4.fa4_attention(qs, ks, vs, None, 0, 8**-0.5)[0].sum(), (qs, ks, vs))
    for g, x in zip(grads, (qs, ks, vs)):
        assert g.stride() == torch.empty_like(x).stride()


def test_compiled_callers_trace_the_ops_without_a_graph_break(kernels):
    """A layer compiled around the dense call (megatron's layers under model.compile): one graph."""
    import torch._dynamo

    q, k, v = _qkv(9, 2)
    torch._dynamo.reset()

    def layer(q, k, v):
        return (attention.fa4_dense(q * 2, k, v, 8**-0.5) + 1).sum()

    explained = torch._dynamo.explain(layer)(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_keep_attention_keeps_the_fa4_output_through_recompute(kernels):
    """recompute_keep_attention's policy with FA4: the forward runs once (its output and lse kept, not rerun
    in backward), and the gradients are those of the plain call."""
    from torch.utils.checkpoint import checkpoint

    from questa_nemo.model.recompute import keep_attention_contexts

    q, k, v = _qkv(10, 2)

    def layer(q, k, v):
        return attention.fa4_dense(q * 1.5, k, v, 8**-0.5).tanh()

    up = torch.randn(10, 2, 4, 8)
    want = torch.autograd.grad(layer(q, k, v), (q, k, v), up)
    kernels.calls.update(fwd=0, bwd=0)
    kept = checkpoint(layer, q, k, v, use_reentrant=False, context_fn=keep_attention_contexts)
    got = torch.autograd.grad(kept, (q, k, v), up)
    assert kernels.calls == {"fwd": 1, "bwd": 1, "varlen": 0}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    kernels.calls.update(fwd=0, bwd=0)  # the plain full recompute reruns it
    torch.autograd.grad(checkpoint(layer, q, k, v, use_reentrant=False), (q, k, v), up)
    assert kernels.calls["fwd"] == 2


def _params(starts, lengths, total):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    padded = torch.tensor([*starts, total], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths), cu_seqlens_q_padded=padded)  # fmt: skip


@pytest.mark.parametrize("lengths", [[5, 6], [7, 7, 6, 1], [20, 2, 1]])
def test_packed_rows_take_one_varlen_call_and_padding_is_zero(lengths, kernels):
    g = torch.Generator().manual_seed(1)
    t = sum(lengths) + 3  # three rows of padding after the segments
    q, k, v = (torch.randn(t, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    got = attention.fa4_packed(q, k, v, _params(starts, lengths, t), 8**-0.5, False)
    assert kernels.calls == {"fwd": 1, "bwd": 0, "varlen": 1}
    want = packed_causal_sdpa(q, k, v, starts, lengths, scale=8**-0.5).reshape(t, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[sum(lengths) :].abs().max() == 0
    up = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segments_with_gaps_fall_back_to_the_sdpa_path(kernels):
    """Segments that do not lie back to back from row 0 (a padded layout) cannot be one varlen call."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, h, 8, generator=g) for h in (4, 2, 2))
    got = attention.fa4_packed(q, k, v, _params([0, 8], [5, 6], 16), 8**-0.5, False)
    assert kernels.calls == {"fwd": 0, "bwd": 0, "varlen": 0}
    torch.testing.assert_close(got, packed_causal_sdpa(q, k, v, [0, 8], [5, 6], scale=8**-0.5).reshape(16, -1))


def test_a_model_with_fa4_core_attention_gives_the_sdpa_models_outputs(single_process, monkeypatch, kernels):  # noqa: F811
    """The whole GPTModel built with model.attention=fa4 (the availability check passed, the reference kernels
    in): every layer's core attention is FA4's and the outputs, unpacked and packed, are the SDPA model's."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from questa_nemo.model import fused
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import final_hidden_states

    monkeypatch.setattr(flash4, "fa4_problem", lambda device, head_dim=None: None)
    ref, hf = tiny_hf_model("qwen2")
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    outs = {}
    for choice in ("sdpa", "fa4"):
        cfg = ModelConfig(params_dtype="fp32", attention=choice, recompute="none")
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        cores = {type(layer.self_attention.core_attention) for layer in model.decoder.layers}
        assert all(issubclass(c, attention.FA4CoreAttention) == (choice == "fa4") for c in cores)
        with torch.no_grad():
            outs[choice] = (
                final_hidden_states(model, ids, torch.arange(20)[None]),
                final_hidden_states(model, ids, fused.segment_positions(cu, 20)[None], packed_seq_params=packed),
            )
    layers = hf["num_hidden_layers"]
    assert kernels.calls == {"fwd": 2 * layers, "bwd": 0, "varlen": layers}
    for got, want in zip(outs["fa4"], outs["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_recompute_keeping_fa4s_attention_gives_the_sdpa_models_gradients(single_process, monkeypatch, kernels):  # noqa: F811
    """The whole GPTModel with fa4 under torch's full recompute keeping attention (the fastest 32K setting on an
    H100): the SDPA model's gradients without recompute, and FA4's forward run once a layer, never rerun."""
    from test_model_build import _grads

    monkeypatch.setattr(flash4, "fa4_problem", lambda device, head_dim=None: None)
    ref, hf = tiny_hf_model("qwen2")
    want = _grads(ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none"), ref, hf)
    cfg = ModelConfig(params_dtype="fp32", attention="fa4", recompute="full", recompute_impl="torch",
                      recompute_keep_attention=True)  # fmt: skip
    got = _grads(cfg, ref, hf)
    layers = hf["num_hidden_layers"]
    assert kernels.calls == {"fwd": layers, "bwd": layers, "varlen": 0}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
def test_fa4_is_refused_with_the_reason_where_it_cannot_run():
    from questa_nemo.model import megatron as mg

    assert flash4.fa4_problem("cpu") == flash4.NEEDS_GPU
    with pytest.raises(ConfigError, match="^model.attention: fa4 unavailable: needs a CUDA GPU$"):
        mg.spec_provider(ModelConfig(params_dtype="fp32", attention="fa4"))
    assert doctor.check_config(_config(model={"attention": "fa4"}), CPU) == [
        "model.attention=fa4 unavailable: needs a CUDA GPU"
    ]
    row = {a.key: a for a in doctor.capability_rows(CPU)}["model.attention=fa4"]
    assert not row.ok


def test_fa4_problem_names_what_is_missing(monkeypatch):
    """On a GPU machine: the architecture first, then whether the package imports (its own reason)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert flash4.fa4_problem("cuda") == "its kernels are for sm_90 / sm_100 GPUs, this one is sm_80"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flash4, "fa4_kernels", lambda: flash4.NOT_INSTALLED)
    assert flash4.fa4_problem("cuda") == flash4.NOT_INSTALLED
    monkeypatch.setattr(flash4, "fa4_kernels", lambda: flash4.FA4(None, None))
    assert flash4.fa4_problem("cuda") is None
    assert flash4.fa4_problem("cuda", head_dim=128) is None
    assert flash4.fa4_problem("cuda", head_dim=320) == (
        "its kernels take head sizes 8-256 in multiples of 8 on sm_90, this model's is 320"
    )
    problems = doctor.check_config(_config(model={"attention": "fa4"}), EIGHT_H100)
    assert problems == []


def test_config_takes_fa4_with_keep_attention_and_refuses_it_in_fp32():
    assert load_config("questa_partial_50", ["model.attention=fa4"]).model.attention == "fa4"
    ModelConfig(attention="fa4", recompute="full", recompute_impl="torch", recompute_keep_attention=True).validate()
    with pytest.raises(ConfigError, match="^model.params_dtype: attention=fa4 needs bf16"):
        ModelConfig(attention="fa4", params_dtype="fp32").validate()


@pytest.mark.parametrize(
    "head_dim, major, ok",
    [(128, 9, True), (64, 9, True), (256, 9, True), (192, 9, True), (264, 9, False), (100, 9, False),
     (128, 10, True), (256, 10, True), (192, 10, False), (4, 9, False)],
)  # fmt: skip
def test_head_sizes_fa4_takes(head_dim, major, ok):
    """flash-attn-4's own rule (_validate_head_dims, bf16): a model outside it is refused at the build, not
    by an assertion in the first step."""
    assert (flash4.fa4_head_dim_problem(head_dim, major) is None) == ok


def test_fa4_kernels_gives_the_import_problem(monkeypatch):
    """Not installed: the install hint; installed but failing to import (a part of the CuTe DSL missing, as
    when nvidia-cutlass-dsl-libs-core is left out): that error, named."""
    import builtins
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        assert flash4.fa4_kernels() == flash4.NOT_INSTALLED
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise ModuleNotFoundError("No module named 'cutlass.cute'", name="cutlass.cute")
        return real_import(name, *args, **kwargs)

    flash4.fa4_kernels.cache_clear()
    monkeypatch.setattr(builtins, "__import__", broken)
    try:
        assert flash4.fa4_kernels() == (
            "flash_attn.cute does not import (ModuleNotFoundError: No module named 'cutlass.cute')"
        )
    finally:
        monkeypatch.undo()
        flash4.fa4_kernels.cache_clear()


# The parameters of FA4's forward and backward, as flash-attn-4 4.0.0b40 defines them (flash_attn/cute/interface.py
# _flash_attn_fwd / _flash_attn_bwd, read from the wheel on PyPI): every argument our ops pass must be one of
# them, the positional ones in their places.
FA4_PARAMETERS = {
    "fwd": ("q", "k", "v", "qv", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "max_seqlen_q",
            "max_seqlen_k", "min_seqlen_k", "page_table", "softmax_scale", "causal", "softcap", "window_size_left",
            "window_size_right", "learnable_sink", "tile_mn", "mma_pv_is_rs", "intra_wg_overlap", "num_splits",
            "pack_gqa", "_arch", "score_mod", "mask_mod", "block_sparse_tensors", "return_lse", "out", "lse",
            "aux_tensors", "aux_scalars", "scales", "gather_kv_indices", "scheduler_metadata",
            "seqlen_k_per_split", "disable_scheduler_metadata", "gather_bwd_recompute_p", "config"),
    "bwd": ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "softcap", "window_size_left",
            "window_size_right", "m_block_size", "n_block_size", "num_threads", "pack_gqa", "num_stages_Q",
            "num_stages_dO", "SdP_swapAB", "dKV_swapAB", "dQ_swapAB", "AtomLayoutMSdP", "AtomLayoutNdKV",
            "AtomLayoutMdQ", "V_in_regs", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k",
            "max_seqlen_q", "max_seqlen_k", "deterministic", "dq", "dk", "dv", "score_mod", "score_mod_bwd",
            "mask_mod", "aux_tensors", "aux_scalars", "block_sparse_tensors", "dlse", "learnable_sink", "config"),
}  # fmt: skip
POSITIONAL = {"fwd": 3, "bwd": 6}  # what our ops pass by position: q, k, v (and out, dout, lse)


def test_our_calls_pass_only_parameters_fa4_has():
    """The reference's signatures are what our ops pass (it fails on any other keyword): each is one of
    FA4's recorded parameters and, where the package is installed, of its own functions' signatures."""
    import inspect

    for name in ("fwd", "bwd"):
        ours = [p for p in inspect.signature(getattr(ReferenceFA4, name)).parameters if p != "self"]
        real = FA4_PARAMETERS[name]
        assert [p in real for p in ours] == [True] * len(ours), (name, ours)
        assert ours[: POSITIONAL[name]] == list(real[: POSITIONAL[name]])
        kernels = flash4.fa4_kernels()  # where the package is installed: its own signature has them too
        if isinstance(kernels, flash4.FA4):
            installed = list(inspect.signature(getattr(kernels, name)).parameters)
            assert set(ours) <= set(installed), (name, sorted(set(ours) - set(installed)))
            assert installed[: POSITIONAL[name]] == ours[: POSITIONAL[name]]


def test_the_backward_sweep_picks_only_a_candidate_faster_at_every_length_with_the_defaults_gradients():
    """bench/fa4_bwd_sweep.py's choice: faster than the faster of the default's two timings by 2% at every
    length, gradients within 3x the default's run-to-run difference (or 1e-2), refused or failed ones never;
    of several, the one fastest at its slowest length."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fa4_bwd_sweep import best

    def default(seq, ms):
        return {"seq": seq, "name": "default", "ms_before_after": ms, "self_rel_err": 1e-3}

    def row(seq, name, ms, err=1e-3):
        return {"seq": seq, "name": name, "ms": ms, "max_rel_err": {"q": err, "k": err, "v": err}}

    rows = [default(8, [1.0, 1.02]), default(32, [10.0, 10.0]),
            row(8, "fast", 0.9), row(32, "fast", 9.5),  # 1.13x / 1.05x
            row(8, "faster_at_8", 0.5), row(32, "faster_at_8", 10.1),  # slower at 32
            row(8, "wrong", 0.5, err=0.5), row(32, "wrong", 5.0),  # its gradients differ
            row(8, "one_length", 0.5), {"seq": 32, "name": "one_length", "error": "ValueError: refused"}]  # fmt: skip
    assert best(rows) == "fast"
    assert best(rows, min_speedup=1.06) == "default"  # fast is 1.05x at 32
    assert best([default(8, [1.0, 1.0]), row(8, "noise", 0.99)]) == "default"
    assert best([default(8, [1.0, 1.05]), row(8, "drift", 0.99)]) == "default"  # 1.06x only against the slower
    two = [default(8, [1.0, 1.0]), default(32, [10.0, 10.0]), row(8, "a", 0.5), row(32, "a", 9.5),
           row(8, "b", 0.9), row(32, "b", 9.0)]  # a: 2.0x / 1.05x, b: 1.11x / 1.11x  # fmt: skip
    assert best(two) == "b"


def _fa4_shaped_forward(workspace: bool = False, launches: int = 1, listed: bool = False):
    """A forward shaped like FA4's `_flash_attn_fwd`: its compile cache an attribute of the function, the
    compiled kernel looked up there and called with q, k, v detached, the out / lse it allocated and
    non-tensor arguments (with `workspace`, also a buffer of its own; with `listed`, a list holding a tensor;
    `launches` kernel calls, 0 as for an empty problem). Counts its Python calls and launches."""
    from typing import NamedTuple

    class AuxData(NamedTuple):  # as flash_attn.cute.utils defines it
        tensors: tuple | None = None
        scalars: tuple | None = None

    counts = {"python": 0, "launches": 0}

    def kernel(q, k, v, out, lse, scale, cu_q, cu_k, used_q, used_k, pages, left, right, sink, sparse, aux, *extra):
        assert cu_q is None and (len(extra) == 1) == workspace
        counts["launches"] += 1
        for i in range(q.size(0)):
            o, log_z = _reference(q[i], k[i], v[i], scale)[:2]
            out[i].copy_(o)
            lse[i].copy_(log_z)

    def fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        assert causal and return_lse
        counts["python"] += 1
        key = (q.shape, k.shape, q.dtype)
        if key not in fwd.compile_cache:
            fwd.compile_cache[key] = kernel
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(q.size(0), q.size(2), q.size(1), dtype=torch.float32)
        extra = (torch.zeros(4),) if workspace else ()
        aux = [torch.zeros(1)] if listed else AuxData(None, None)  # a bare list, as FA4's cute_aux_tensors
        for _ in range(launches):
            fwd.compile_cache[key](q.detach(), k.detach(), v.detach(), out, lse, softmax_scale, None, None, None,
                                   None, None, None, None, None, None, aux, *extra)  # fmt: skip
        return out, lse, None, None, None

    fwd.compile_cache = {}
    return fwd, counts


@pytest.fixture
def fresh_direct(monkeypatch):
    monkeypatch.setattr(flash4, "_direct", {})


def _bshd(s=9, b=2, heads=4, groups=2, d=8, seed=0):
    return [x.transpose(0, 1) for x in _qkv(s, b, heads, groups, d, seed)]


def test_a_dense_problem_seen_before_launches_fa4s_kernel_without_its_python(fresh_direct):
    """The first call of a problem goes through FA4's forward (recorded); later ones with other tensors of the
    same layout call the kernel it compiled directly, with FA4's arguments and our tensors: the reference's
    outputs, one Python call in all. The recording keeps none of the first call's tensors."""
    fwd, counts = _fa4_shaped_forward()
    inputs = [[x.detach() for x in _bshd(seed=seed)] for seed in range(3)]
    outputs = [flash4._direct_forward(fwd, q, k, v, 8**-0.5) for q, k, v in inputs]
    assert len({out.data_ptr() for out, _ in outputs}) == 3  # each call its own out (all still alive here)
    for (q, k, v), (out, lse) in zip(inputs, outputs):  # checked after all calls: none overwrote another's
        for i in range(q.size(0)):
            want, want_lse = _reference(q[i], k[i], v[i], 8**-0.5)[:2]
            torch.testing.assert_close(out[i].double(), want)
            torch.testing.assert_close(lse[i].double(), want_lse)
    assert counts == {"python": 1, "launches": 3}
    (recorded,) = flash4._direct.values()
    assert sorted(recorded.slots.values()) == ["k", "lse", "out", "q", "v"]
    assert not any(isinstance(a, torch.Tensor) for a in recorded.args)
    q, k, v = (x.detach() for x in _bshd(s=5))  # another problem: recorded anew
    flash4._direct_forward(fwd, q, k, v, 8**-0.5)
    assert counts == {"python": 2, "launches": 4} and len(flash4._direct) == 2
    out = flash4._direct_forward(fwd, q, k, v, 0.5)[0]  # another scale: another problem, its own result
    assert counts == {"python": 3, "launches": 5} and len(flash4._direct) == 3
    torch.testing.assert_close(out[0].double(), _reference(q[0], k[0], v[0], 0.5)[0])


@pytest.mark.parametrize("shape", [dict(workspace=True), dict(listed=True), dict(launches=2), dict(launches=0)])
def test_a_call_that_is_not_one_launch_on_our_tensors_keeps_fa4s_path(shape, fresh_direct):
    """A first call that passed its kernel a tensor of FA4's own (a workspace, scheduler metadata; inside a
    list too), or launched other than one kernel, cannot be replayed with our tensors alone: every call goes
    through FA4's forward, and FA4's cache is put back after the recording."""
    fwd, counts = _fa4_shaped_forward(**shape)
    q, k, v = (x.detach() for x in _bshd())
    flash4._direct_forward(fwd, q, k, v, 8**-0.5)
    flash4._direct_forward(fwd, q, k, v, 8**-0.5)
    launches = shape.get("launches", 1)
    assert counts == {"python": 2, "launches": 2 * launches} and list(flash4._direct.values()) == [None]
    assert fwd.compile_cache.__class__ is dict


def test_the_op_takes_the_direct_forward_for_dense_calls_only(fresh_direct, kernels, monkeypatch):
    """fa4_attention: with FAST_FORWARD on, dense calls through `_direct_forward`; off (the default until it has
    run on a GPU), every call through FA4's forward."""
    assert flash4.FAST_FORWARD is False
    monkeypatch.setattr(flash4, "FAST_FORWARD", True)
    seen = []
    monkeypatch.setattr(flash4, "_direct_forward", lambda fwd, q, k, v, scale: seen.append(q.shape) or
                        fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2])  # fmt: skip
    q, k, v = _qkv(7)
    attention.fa4_dense(q, k, v, 8**-0.5)
    assert len(seen) == 1
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    flash4.fa4_attention(*(x[:, 0].detach() for x in (q, k, v)), cu, 4, 8**-0.5)  # packed: FA4's forward
    assert len(seen) == 1 and kernels.calls == {"fwd": 2, "bwd": 0, "varlen": 1}
    monkeypatch.setattr(flash4, "FAST_FORWARD", False)
    attention.fa4_dense(q, k, v, 8**-0.5)
    assert len(seen) == 1 and kernels.calls["fwd"] == 3
