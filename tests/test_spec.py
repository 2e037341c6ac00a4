"""The layer spec built from our backend spec provider (model/spec.py) against megatron's local spec with our
modules put in by hand (what model/megatron.py did before the provider): same spec, same model, same outputs."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from tiny_hf import VOCAB, tiny_hf_model  # noqa: E402

from questa_nemo.config import ModelConfig  # noqa: E402
from questa_nemo.model import fused, mcore_compat  # noqa: E402
from questa_nemo.model import megatron as mm  # noqa: E402
from questa_nemo.model.attention import SDPACoreAttention  # noqa: E402
from questa_nemo.model.linear import ColumnLinear, RowLinear  # noqa: E402
from questa_nemo.model.spec import QuestaSpecProvider  # noqa: E402

# (attention, fusions): fusions only take effect on GPU, so the tests switch them on by hand (`gpu_fusions`)
CONFIGS = [("sdpa", False), ("sdpa", True), ("local", False), ("local", True)]


def megatron_local_spec_with_our_modules(cfg: ModelConfig) -> ModuleSpec:
    """megatron's local spec, then our modules assigned into it: the reference the provider must equal."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp  # a ModuleSpec up to megatron-core 0.17, a partial from 0.18
    mlp = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    if cfg.attention != "local":
        attention.core_attention = SDPACoreAttention
    attention.linear_qkv, attention.linear_proj = ColumnLinear, RowLinear
    mlp.linear_fc1, mlp.linear_fc2 = ColumnLinear, RowLinear
    if mm.own_swiglu_on(cfg):
        mlp.activation_func = fused.SwiGLU
    if mm.fusions_on(cfg):
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = fused.RMSNorm
        if fused.FUSED_QKV_ROPE and fused.qkv_rope_supported():  # megatron-core 0.16+: its fused QKV split + RoPE path for unpacked rows
            spec.submodules.self_attention.module = fused.FusedQKVSelfAttention
    return spec


def tree(x):
    """A spec as nested tuples / dicts of classes and values (partials and dataclasses opened), for ==."""
    if isinstance(x, ModuleSpec):
        return ("ModuleSpec", x.module, tree(x.params), tree(x.submodules))
    if isinstance(x, functools.partial):
        return ("partial", x.func, tree(x.args), tree(x.keywords))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x), {f.name: tree(getattr(x, f.name)) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(tree(v) for v in x)
    return x


def _leaves(t):
    if isinstance(t, dict):
        t = tuple(t.values())
    return [leaf for x in t for leaf in _leaves(x)] if isinstance(t, tuple) else [t]


@pytest.fixture
def gpu_fusions(monkeypatch):
    """`model.fusions` as it acts on a GPU (our SwiGLU and RMSNorm submodules, RoPE fusion); the kernels' CPU
    paths run."""
    monkeypatch.setattr(mm, "fusions_on", lambda cfg: cfg.fusions)


@pytest.mark.parametrize("qkv", [False, True])
@pytest.mark.parametrize("attention,fusions", CONFIGS)
def test_the_provider_builds_megatrons_local_spec_with_our_modules(gpu_fusions, attention, fusions, qkv, monkeypatch):
    monkeypatch.setattr(fused, "FUSED_QKV_ROPE", qkv)
    cfg = ModelConfig(params_dtype="fp32", attention=attention, fusions=fusions)
    ours = mm.layer_spec(cfg)
    assert tree(ours) == tree(megatron_local_spec_with_our_modules(cfg))
    attn = ours.submodules.self_attention.submodules
    assert attn.core_attention is (SDPACoreAttention if attention == "sdpa" else DotProductAttention)
    assert (attn.linear_qkv, attn.linear_proj) == (ColumnLinear, RowLinear)
    swiglu = fusions and mcore_compat.HAS_ACTIVATION_SUBMODULE  # megatron-core 0.15+
    assert (fused.SwiGLU in _leaves(tree(ours))) == swiglu
    assert (fused.RMSNorm in _leaves(tree(ours))) == fusions


def test_rope_fusion_fills_only_the_empty_slots(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", sentinel)  # e.g. Transformer Engine's
    assert QuestaSpecProvider(fused_rope=False).rope_fusion() is False
    assert rope_utils.fused_apply_rotary_pos_emb is None
    assert QuestaSpecProvider(fused_rope=True).rope_fusion() is True
    assert rope_utils.fused_apply_rotary_pos_emb is fused.fused_rope_sbhd
    assert rope_utils.fused_apply_rotary_pos_emb_thd is sentinel


@pytest.fixture(scope="module")
def single_process():
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(ModelConfig(params_dtype="fp32"))
    yield
    destroy_distributed()


def _run(model, ids, packed=None):
    """Log-probs and parameter gradients of one forward/backward (bshd, or packed thd with `packed`)."""
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight

    s = ids.size(1)
    if packed is not None:
        positions = fused.segment_positions(packed.cu_seqlens_q, s)[None]
        mask = None
    else:
        positions = torch.arange(s).expand_as(ids)
        # megatron's local attention would build the causal mask on CUDA
        mask = torch.triu(torch.ones(s, s), 1).bool()[None, None]
    hidden = final_hidden_states(model, ids, positions, mask, packed_seq_params=packed)
    out = chunked_logprobs(hidden, output_weight(model), ids.roll(-1, 1).t(), vocab_size=VOCAB)
    out.logprobs.sum().backward()
    return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention,fusions", [("sdpa", True), ("local", False)])
def test_models_from_both_specs_are_the_same_bit_for_bit(
    single_process, gpu_fusions, monkeypatch, attention, fusions
):
    """Module tree, state-dict and checkpoint keys, log-probs and gradients (and packed thd with SDPA)."""
    ref, hf = tiny_hf_model("qwen2", layers=2)
    cfg = ModelConfig(params_dtype="fp32", attention=attention, fusions=fusions, recompute="none")
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(6))
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9
    )

    def build():
        model = mm.build_model(hf, cfg)
        mm.load_hf_weights(model, ref.state_dict(), hf, cfg)
        runs = [_run(model, ids)] + ([_run(model, ids[:1], packed)] if attention == "sdpa" else [])
        return dict(
            modules=[(n, type(m)) for n, m in model.named_modules()],
            state=model.state_dict(),
            sharded={k: getattr(v, "key", None) for k, v in model.sharded_state_dict().items()},
            runs=runs,
        )

    with monkeypatch.context() as m:
        m.setattr(mm, "layer_spec", megatron_local_spec_with_our_modules)
        expected = build()
    got = build()
    assert got["modules"] == expected["modules"]
    assert got["sharded"] == expected["sharded"]
    assert got["state"].keys() == expected["state"].keys()
    for name, t in expected["state"].items():
        assert not isinstance(t, torch.Tensor) or torch.equal(got["state"][name], t), name
    if fusions and mcore_compat.HAS_ACTIVATION_SUBMODULE:
        assert any(t is fused.SwiGLU for _, t in got["modules"])
    for (logprobs, grads), (ref_logprobs, ref_grads) in zip(got["runs"], expected["runs"]):
        assert torch.equal(logprobs, ref_logprobs)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            assert torch.equal(grads[name], grad), name
