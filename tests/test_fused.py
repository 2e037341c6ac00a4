"""Our fused RoPE and SwiGLU (model/fused.py) against megatron's unfused ops: functions, and a whole model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from tiny_hf import VOCAB, tiny_hf_model  # noqa: E402

from questa_nemo.config import ModelConfig  # noqa: E402
from questa_nemo.model import fused  # noqa: E402


class _OneRank:
    """The context-parallel group megatron's thd RoPE asks for its size and rank."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _freqs(positions: int, dim: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(positions).float(), inv)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]  # megatron's [s, 1, 1, d]


def test_rope_equals_megatron_unfused_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    freqs = _freqs(12, 16).double()
    upstream = torch.randn(12, 2, 3, 16, generator=g, dtype=torch.float64)
    ours = fused.fused_rope_sbhd(t, freqs)
    (grad_ours,) = torch.autograd.grad(ours, t, upstream)
    ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    (grad_ref,) = torch.autograd.grad(ref, t, upstream)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_thd_positions_restart_at_each_segment_as_in_megatron():
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    assert fused.segment_positions(cu, 16).tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    t = torch.randn(16, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # more rows than tokens: megatron's unfused path reads freqs of exactly T rows as per-token angles (its
    # "exact mapping"), TE's fused one, whose slot ours fills, always by position within the segment
    freqs = _freqs(20, 8).double()
    # same angles, other packings, one after the other: the cos / sin tables kept from a call are not reused
    packings = (cu, torch.tensor([0, 16], dtype=torch.int32), torch.tensor([0, 9, 16], dtype=torch.int32))
    for packing in packings:
        ours = fused.fused_rope_thd(t, packing, freqs)
        ref = rope_utils._apply_rotary_pos_emb_thd(t, packing, freqs, cp_group=_OneRank())
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # nor across dtypes
    half = fused.fused_rope_thd(t.float(), packing, freqs.float())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), ref, rtol=0, atol=1e-5)


def test_unsupported_variants_raise():
    t, freqs = torch.randn(4, 1, 2, 8), _freqs(4, 8)
    with pytest.raises(ValueError, match="interleaved"):
        fused.fused_rope_sbhd(t, freqs, interleaved=True)
    with pytest.raises(ValueError, match="partial"):
        fused.fused_rope_sbhd(t, freqs[..., :4])
    with pytest.raises(ValueError, match="context parallelism"):
        fused.fused_rope_thd(t[:, 0], torch.tensor([0, 4], dtype=torch.int32), freqs, cp_size=2)


@pytest.fixture(scope="module")
def single_process():
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(ModelConfig(params_dtype="fp32"))
    yield
    destroy_distributed()


def test_model_logits_with_fused_rope_equal_unfused(single_process):
    """megatron's layers call the installed functions through `apply_rope_fusion` (bshd and packed thd)."""
    from questa_nemo.model.logprobs import final_hidden_states
    from questa_nemo.model.megatron import build_model, load_hf_weights

    ref, hf = tiny_hf_model("qwen2")
    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    model = build_model(hf, cfg)
    load_hf_weights(model, ref.state_dict(), hf, cfg)
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13
    )
    positions = fused.segment_positions(cu, 20)[None]
    inputs = [(torch.arange(20)[None], None), (positions, packed)]
    fused.install()
    calls = []
    original = rope_utils.fused_apply_rotary_pos_emb

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    try:
        rope_utils.fused_apply_rotary_pos_emb = counting
        with torch.no_grad():
            for pos, params in inputs:
                model.config.apply_rope_fusion = False
                expected = final_hidden_states(model, ids, pos, packed_seq_params=params)
                model.config.apply_rope_fusion = True
                got = final_hidden_states(model, ids, pos, packed_seq_params=params)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        rope_utils.fused_apply_rotary_pos_emb = original
        model.config.apply_rope_fusion = False
    assert calls, "megatron did not call the fused RoPE"


@pytest.mark.parametrize("as_op", [False, True])
def test_swiglu_equals_megatron_glu_values_and_gradients(as_op):
    """The module through its autograd Function and through the custom op (`as_op`, what recompute keeps)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 2, 6, generator=g, dtype=torch.float64)
    module = fused.SwiGLU()
    module.as_op = as_op
    ours = module(y)
    (grad_ours,) = torch.autograd.grad(ours, y, upstream)
    gate, up = torch.chunk(y, 2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up  # megatron MLP's unfused glu
    (grad_ref,) = torch.autograd.grad(ref, y, upstream)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_swiglu_custom_op_registration_passes_torch_opcheck():
    """The op's schema, fake (meta) kernel and autograd registration, as torch.compile and recompute see them."""
    y = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(fused.swiglu, (y,))
    torch.library.opcheck(fused.swiglu_backward, (torch.randn(3, 4, dtype=torch.float64), y.detach()))


def test_model_with_swiglu_submodule_equals_megatron_glu(single_process):
    """megatron's MLP calls the spec's activation submodule on the whole fc1 output (use_te_activation_func)."""
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight
    from questa_nemo.model.megatron import build_model, load_hf_weights

    ref, hf = tiny_hf_model("llama")
    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))

    def loss_and_grads(ours: bool):
        model = build_model(hf, cfg)
        load_hf_weights(model, ref.state_dict(), hf, cfg)
        if ours:
            model.config.use_te_activation_func = True
            for layer in model.decoder.layers:
                layer.mlp.activation_func = fused.SwiGLU()
        hidden = final_hidden_states(model, ids, torch.arange(12).expand_as(ids))
        out = chunked_logprobs(hidden, output_weight(model), ids.t(), vocab_size=VOCAB)
        out.logprobs.sum().backward()
        return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, expected_grads = loss_and_grads(ours=False)
    got, got_grads = loss_and_grads(ours=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_rmsnorm_equals_torch_rmsnorm_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 24, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(7, 3, 24, generator=g, dtype=torch.float64)
    ours = fused.RMSNorm(hidden_size=24, eps=1e-6).double()
    ref = torch.nn.RMSNorm(24, eps=1e-6).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(24, generator=g, dtype=torch.float64))
        ref.weight.copy_(ours.weight)
    out, out_ref = ours(x), ref(x)
    grads = torch.autograd.grad(out, (x, ours.weight), upstream)
    grads_ref = torch.autograd.grad(out_ref, (x, ref.weight), upstream)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _uninstall() -> None:
    """megatron's slots as CPU runs find them (install() filled them)."""
    from megatron.core.transformer import attention as mcore_attention

    rope_utils.fused_apply_rotary_pos_emb = None
    rope_utils.fused_apply_rotary_pos_emb_thd = None
    if fused.qkv_rope_supported():
        mcore_attention.HAVE_FUSED_QKV_ROPE = False
        mcore_attention.__dict__.pop("apply_fused_qkv_rotary_pos_emb", None)


@pytest.mark.parametrize("packed", [False, True])
def test_model_built_with_fusions_equals_unfused(single_process, monkeypatch, packed):
    """The spec with fusions (our RMSNorm and SwiGLU submodules, our RoPE through megatron's fusion slots, in
    megatron-core 0.16+ the fused QKV split + RoPE for unpacked rows) gives the unfused model's log-probs and
    gradients; on CPU every fused op runs its eager reference maths. Packed rows take megatron's split path
    (with the fused flag on megatron would refuse them)."""
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight

    ref, hf = tiny_hf_model("qwen2")
    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    if packed:
        ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
        cu = torch.tensor([0, 7, 20], dtype=torch.int32)
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13
        )
        positions = fused.segment_positions(cu, 20)[None]
    else:
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
        params, positions = None, torch.arange(12).expand_as(ids)
    qkv_calls = []
    counted = fused.fused_qkv_rope

    def counting(*args, **kwargs):
        qkv_calls.append(1)
        return counted(*args, **kwargs)

    monkeypatch.setattr(fused, "fused_qkv_rope", counting)
    monkeypatch.setattr(fused, "FUSED_QKV_ROPE", True)  # off by default until run on a GPU
    _uninstall()  # install() puts the function in megatron's slot once: the counting one here

    def loss_and_grads(fusions: bool):
        monkeypatch.setattr(mg, "fusions_on", lambda cfg: fusions)
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        norms = [type(layer.input_layernorm) for layer in model.decoder.layers]
        assert all(n is (fused.RMSNorm if fusions else torch.nn.RMSNorm) for n in norms), norms
        attention = type(model.decoder.layers[0].self_attention)
        assert (attention is fused.FusedQKVSelfAttention) == (fusions and fused.qkv_rope_supported())
        hidden = final_hidden_states(model, ids, positions, packed_seq_params=params)
        out = chunked_logprobs(hidden, output_weight(model), ids.t(), vocab_size=VOCAB)
        out.logprobs.sum().backward()
        assert not getattr(model.config, "fused_single_qkv_rope", False)  # set per call only
        return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    try:
        expected, expected_grads = loss_and_grads(fusions=False)
        got, got_grads = loss_and_grads(fusions=True)
    finally:
        _uninstall()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    layers = hf["num_hidden_layers"]
    assert len(qkv_calls) == (0 if packed or not fused.qkv_rope_supported() else layers)


def test_fused_qkv_rope_equals_megatron_split_then_rope():
    """megatron's split path (views of the fused projection, the query reshaped, megatron's RoPE on each) and
    the fused function: values and the gradient of the fused projection; a split it cannot take raises."""
    g = torch.Generator().manual_seed(7)
    dim, q_per_group = 16, 3
    freqs = _freqs(10, dim)
    qkv = torch.randn(10, 2, 2, (q_per_group + 2) * dim, generator=g, requires_grad=True)
    split = [q_per_group * dim, dim, dim]
    query, key, value = torch.split(qkv, split, dim=3)
    query = query.reshape(10, 2, -1, dim)
    expected = [rope_utils._apply_rotary_pos_emb_bshd(t, freqs) for t in (query, key)] + [value]
    got = fused.fused_qkv_rope(qkv, freqs, freqs, split)
    upstream = [torch.randn(t.shape, generator=g) for t in expected]
    grad_expected = torch.autograd.grad(expected, qkv, upstream)[0]
    grad_got = torch.autograd.grad(got, qkv, upstream)[0]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_got, grad_expected)
    with pytest.raises(ValueError, match="unexpected split"):
        fused.fused_qkv_rope(qkv, freqs, freqs, [q_per_group * dim, dim, dim // 2])


def test_fused_qkv_path_follows_the_models_rope_fusion_switch(single_process, monkeypatch):
    """FusedQKVSelfAttention takes the fused path only while the model's `apply_rope_fusion` is on (megatron's
    fused QKV path ignores that switch), and puts the config's flag back after each call."""
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import final_hidden_states

    if not fused.qkv_rope_supported():
        pytest.skip("megatron-core before 0.16 has no fused_single_qkv_rope path")
    ref, hf = tiny_hf_model("qwen2")
    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    calls = []
    counted = fused.fused_qkv_rope
    monkeypatch.setattr(fused, "fused_qkv_rope", lambda *a, **k: calls.append(1) or counted(*a, **k))
    monkeypatch.setattr(fused, "FUSED_QKV_ROPE", True)
    monkeypatch.setattr(mg, "fusions_on", lambda cfg: True)
    _uninstall()
    try:
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            fused_out = final_hidden_states(model, ids, torch.arange(10)[None])
            assert len(calls) == hf["num_hidden_layers"] and not model.config.fused_single_qkv_rope
            model.config.apply_rope_fusion = False  # megatron's unfused RoPE, and so its split path
            plain_out = final_hidden_states(model, ids, torch.arange(10)[None])
    finally:
        _uninstall()
    assert len(calls) == hf["num_hidden_layers"]
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
