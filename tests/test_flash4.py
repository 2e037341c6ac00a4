"""model.attention=fa4: FlashAttention 4's core attention (model/attention.py FA4CoreAttention, model/flash4.py).

The kernels run on sm_90 / sm_100 GPUs only; here a reference with FA4's signatures (causal SDPA in fp32)
stands in for them, so what is tested on CPU is our side: the layouts handed to the kernels, grouped heads
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


def _sdpa_bshd(q, k, v, scale):
    """Causal attention of [b, s, h, d] / [b, s, g, d] tensors: the reference for FA4's kernels."""
    out = attention.causal_sdpa(*(x.transpose(1, 2) for x in (q, k, v)), scale)
    return out.transpose(1, 2)


class ReferenceFA4:
    """FA4's two entry points (flash_attn.cute.flash_attn_func / flash_attn_varlen_func) by causal SDPA, with
    the arguments our glue must pass checked; `calls` counts them."""

    def __init__(self):
        self.calls = {"dense": 0, "varlen": 0}

    def dense(self, q, k, v, *, softmax_scale=None, causal=False):
        assert causal and q.dim() == 4 and k.shape[:2] == q.shape[:2] and q.stride(-1) == 1
        assert q.size(2) % k.size(2) == 0  # grouped heads as they are, never repeated
        self.calls["dense"] += 1
        return _sdpa_bshd(q, k, v, softmax_scale), None  # (out, lse)

    def varlen(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
               causal=False):  # fmt: skip
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        cu = cu_seqlens_q.tolist()
        assert q.size(0) == cu[-1] and max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
        self.calls["varlen"] += 1
        parts = [_sdpa_bshd(*(x[a:b][None] for x in (q, k, v)), softmax_scale)[0] for a, b in zip(cu[:-1], cu[1:])]
        return torch.cat(parts), None


def _qkv(s, b=1, heads=4, groups=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, h, d, generator=g, requires_grad=True) for h in (heads, groups, groups)]


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_call_matches_sdpa_core_attention(batch):
    """megatron's [s, b, h, d] query / key / value through the FA4 call: SDPACoreAttention's output and
    gradients, the kernel handed [b, s, h, d] views (no copies) with grouped heads as they are."""
    q, k, v = _qkv(13, batch)
    kernels = ReferenceFA4()
    got = attention.fa4_dense(q, k, v, 8**-0.5, kernels)
    assert kernels.calls == {"dense": 1, "varlen": 0} and got.shape == q.shape
    want = attention.causal_sdpa(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), 8**-0.5).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    up = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _params(starts, lengths, total):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    padded = torch.tensor([*starts, total], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths), cu_seqlens_q_padded=padded)  # fmt: skip


@pytest.mark.parametrize("lengths", [[5, 6], [7, 7, 6, 1], [20, 2, 1]])
def test_packed_rows_take_one_varlen_call_and_padding_is_zero(lengths):
    g = torch.Generator().manual_seed(1)
    t = sum(lengths) + 3  # three rows of padding after the segments
    q, k, v = (torch.randn(t, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    kernels = ReferenceFA4()
    got = attention.fa4_packed(q, k, v, _params(starts, lengths, t), 8**-0.5, False, kernels)
    assert kernels.calls == {"dense": 0, "varlen": 1}
    want = packed_causal_sdpa(q, k, v, starts, lengths, scale=8**-0.5).reshape(t, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[sum(lengths) :].abs().max() == 0
    up = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segments_with_gaps_fall_back_to_the_sdpa_path():
    """Segments that do not lie back to back from row 0 (a padded layout) cannot be one varlen call."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, h, 8, generator=g) for h in (4, 2, 2))
    kernels = ReferenceFA4()
    got = attention.fa4_packed(q, k, v, _params([0, 8], [5, 6], 16), 8**-0.5, False, kernels)
    assert kernels.calls == {"dense": 0, "varlen": 0}
    torch.testing.assert_close(got, packed_causal_sdpa(q, k, v, [0, 8], [5, 6], scale=8**-0.5).reshape(16, -1))


def test_a_model_with_fa4_core_attention_gives_the_sdpa_models_outputs(single_process, monkeypatch):  # noqa: F811
    """The whole GPTModel built with model.attention=fa4 (the availability check passed, the reference kernels
    in): every layer's core attention is FA4's and the outputs, unpacked and packed, are the SDPA model's."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from questa_nemo.model import fused
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import final_hidden_states

    monkeypatch.setattr(flash4, "fa4_problem", lambda device: None)
    kernels = ReferenceFA4()
    monkeypatch.setattr(attention.FA4CoreAttention, "kernels", kernels)
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
    assert kernels.calls == {"dense": layers, "varlen": layers}
    for got, want in zip(outs["fa4"], outs["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
    problems = doctor.check_config(_config(model={"attention": "fa4"}), EIGHT_H100)
    assert problems == []


def test_config_takes_fa4_and_refuses_it_with_keep_attention():
    assert load_config("default", ["model.attention=fa4"]).model.attention == "fa4"
    cfg = ModelConfig(attention="fa4", recompute="full", recompute_impl="torch", recompute_keep_attention=True)
    with pytest.raises(ConfigError, match="^model.recompute_keep_attention: keeps SDPA's attention output"):
        cfg.validate()


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


# The parameters of FA4's entry points, as flash-attn-4 4.0.0b40 defines them (flash_attn/cute/interface.py,
# read from the wheel on PyPI): every keyword our calls pass must be one of them.
FA4_PARAMETERS = {
    "dense": ("q", "k", "v", "qv", "gather_kv_indices", "softmax_scale", "causal", "window_size",
              "learnable_sink", "softcap", "num_splits", "pack_gqa", "deterministic", "score_mod",
              "score_mod_bwd", "mask_mod", "aux_tensors", "aux_scalars", "block_sparse_tensors",
              "block_sparse_tensors_bwd", "return_lse", "gather_bwd_recompute_p", "gather_bwd_token_chunk",
              "config", "scales"),
    "varlen": ("q", "k", "v", "qv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
               "min_seqlen_k", "seqused_q", "seqused_k", "gather_kv_indices", "page_table", "softmax_scale",
               "causal", "window_size", "learnable_sink", "softcap", "num_splits", "pack_gqa", "deterministic",
               "score_mod", "score_mod_bwd", "mask_mod", "block_sparse_tensors", "aux_tensors", "aux_scalars",
               "return_lse", "scheduler_metadata", "seqlen_k_per_split", "disable_scheduler_metadata",
               "gather_bwd_recompute_p", "gather_bwd_token_chunk", "config", "scales"),
}  # fmt: skip


def test_our_calls_pass_only_parameters_fa4_has():
    """The reference's signatures are the keywords our glue passes (it fails on any other): each is one of
    FA4's recorded parameters and, where the package is installed, of its own signatures."""
    import inspect

    for name, fn in (("dense", ReferenceFA4.dense), ("varlen", ReferenceFA4.varlen)):
        ours = [p for p in inspect.signature(fn).parameters if p != "self"]
        real = FA4_PARAMETERS[name]
        assert [p in real for p in ours] == [True] * len(ours), (name, ours)
        assert ours[:3] == list(real[:3])  # q, k, v positionally first
        kernels = flash4.fa4_kernels()  # where the package is installed: its own signature has them too
        if isinstance(kernels, flash4.FA4):
            installed = inspect.signature(getattr(kernels, name)).parameters
            assert set(ours) <= set(installed), (name, sorted(set(ours) - set(installed)))
