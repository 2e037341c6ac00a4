"""What megatron is given without Transformer Engine: one backend spec provider and the decoder layer built from it.

`QuestaSpecProvider` follows megatron-core's `BackendSpecProvider` protocol (megatron/core/models/backends.py),
the interface megatron's own local / TE / inference specs are built from:
- linear layers: `ColumnLinear` / `RowLinear` (model/linear.py: megatron's tensor-parallel linears with one
  F.linear at TP = 1),
- core attention: `SDPACoreAttention` (model/attention.py; `VarlenCoreAttention` for packed micro-batches through
  torch's variable-length kernel), or megatron's `DotProductAttention` when asked for,
- norms: torch's (megatron's `WrappedTorchNorm`, RMSNorm from the config), as megatron's local spec has them,
  or with fusions our Triton `RMSNorm` (model/fused.py) for the layers' input and pre-MLP norms,
- activation: our fused `SwiGLU` (model/fused.py) as the MLP's activation submodule, or none (megatron's
  `config.activation_func`),
- RoPE: `rope_fusion()`. RoPE is not a submodule: megatron's attention calls `rope_utils.apply_rotary_pos_emb`,
  which with `apply_rope_fusion` calls the module-level slots `rope_utils.fused_apply_rotary_pos_emb(_thd)`
  that megatron fills from TE. No spec entry reaches those calls in megatron-core 0.14 .. 0.19 (the only
  per-call hooks between the q/k split and core attention take neither `packed_seq_params` nor a stable
  signature), so the provider fills the empty slots with ours (`fused.install`) when it turns the fusion on.
  With the fusion and `fused.FUSED_QKV_ROPE` on (megatron-core 0.16+) the self-attention is
  `fused.FusedQKVSelfAttention`: megatron's, taking megatron's fused QKV-split-and-RoPE path for unpacked
  micro-batches, with our kernel in its slot.
  (RoPE inside our core attention, with the GPTModel's own RoPE off, would drop `model.rotary_pos_emb`, which
  the rollout decoder reads, and leave megatron's local attention and CPU runs without megatron's RoPE.)

`decoder_layer_spec` builds the GPT decoder layer of megatron's `get_gpt_layer_local_spec(normalization="RMSNorm")`
(no MoE, no MLA, no q/k norm) from a provider: the same module classes, params and submodule fields, including
the `sharded_state_dict_keys_map`, so state-dict and checkpoint keys are megatron's. The dense-MLP spec comes
from megatron's own `get_mlp_module_spec_for_backend`, whose form changes across versions (model/mcore_compat.py).
Transformer Engine runs take megatron's TE spec instead (model/megatron.py `layer_spec`).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from questa_nemo.model import fused, mcore_compat
from questa_nemo.model.attention import FA4CoreAttention, SDPACoreAttention, VarlenCoreAttention
from questa_nemo.model.linear import ColumnLinear, RowLinear


class QuestaSpecProvider(BackendSpecProvider):
    """Our modules for megatron's layer specs (no Transformer Engine).

    sdpa: SDPA core attention (else megatron's O(s^2) `DotProductAttention`); swiglu: our fused SwiGLU as the
    MLP's activation submodule (megatron-core 0.15+); fused_rope: `apply_rope_fusion` on our Triton RoPE
    where TE's is missing; fused_norm: our Triton RMSNorm for the decoder layers' norms; varlen (with sdpa):
    packed micro-batches through torch's variable-length kernel where usable (`VarlenCoreAttention`); fa4
    (with sdpa): FlashAttention 4's kernels (`FA4CoreAttention`).
    """

    def __init__(
        self,
        *,
        sdpa: bool = True,
        swiglu: bool = False,
        fused_rope: bool = False,
        fused_norm: bool = False,
        varlen: bool = False,
        fa4: bool = False,
    ):
        self.sdpa, self.swiglu, self.fused_rope, self.fused_norm = sdpa, swiglu, fused_rope, fused_norm
        self.varlen, self.fa4 = varlen, fa4

    def column_parallel_linear(self) -> type:
        return ColumnLinear

    def row_parallel_linear(self) -> type:
        return RowLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self) -> type | None:
        return None

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, **_) -> type:
        """torch's LayerNorm / RMSNorm, chosen by `config.normalization` (0.19 adds `has_residual`); with
        fused_norm, an RMSNorm on our Triton kernels."""
        if self.fused_norm and rms_norm and not for_qk:
            return fused.RMSNorm
        return WrappedTorchNorm

    def core_attention(self) -> type:
        if not self.sdpa:
            return DotProductAttention
        if self.fa4:
            return FA4CoreAttention
        return VarlenCoreAttention if self.varlen else SDPACoreAttention

    def activation_func(self) -> type | None:
        """The MLP's activation submodule (megatron-core 0.15+ builds it under `use_te_activation_func`)."""
        return fused.SwiGLU if self.swiglu else None

    def grouped_mlp_modules(self, *args, **kwargs):
        raise NotImplementedError("questa-nemo's models have no mixture-of-experts layers")

    def rope_fusion(self) -> bool:
        """`TransformerConfig.apply_rope_fusion`. When on, megatron's fused-RoPE slots that Transformer Engine
        left empty get ours (idempotent; TE's stay); call it before building the config, which checks them."""
        if self.fused_rope:
            fused.install()
        return self.fused_rope


def decoder_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """A causal GPT decoder layer (pre-norm self-attention and MLP, no q/k norm) of `backend`'s modules."""
    norm = backend.layer_norm(rms_norm=True, for_qk=False)
    fused_qkv = (
        isinstance(backend, QuestaSpecProvider)
        and backend.fused_rope
        and fused.FUSED_QKV_ROPE
        and fused.qkv_rope_supported()
    )
    attention = ModuleSpec(
        module=fused.FusedQKVSelfAttention if fused_qkv else SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mcore_compat.dense_mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
            # megatron's local spec: checkpoint keys as if the norms were fused into the next linear (TE's layout)
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )
