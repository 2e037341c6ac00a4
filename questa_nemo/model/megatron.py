"""The policy as a megatron-core GPTModel: TransformerConfig and layer spec from a Hugging Face config.json.

Qwen2 (q/k/v bias, untied), Llama (no bias, optionally tied) and Mistral (no sliding window) map onto the
same spec: RMSNorm, SwiGLU, RoPE, GQA. Attention is Transformer Engine's where it imports (NeMo containers)
and otherwise `SDPACoreAttention`; megatron's O(s^2) local attention is used only when asked for by name.
Parallel state must be initialised (`parallel.init_distributed`) before `build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from questa_nemo.config import ConfigError, ModelConfig, check_choice
from questa_nemo.model import flash4, mcore_compat, varlen
from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron, te_norm_names
from questa_nemo.model.linear import keep_autograd_wgrad
from questa_nemo.model.recompute import checkpoint_layers
from questa_nemo.model.spec import QuestaSpecProvider, decoder_layer_spec

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing
        return False
    return True


def uses_te(cfg: ModelConfig) -> bool:
    """Whether `cfg.attention` resolves to the Transformer Engine spec (whose norm names differ)."""
    if cfg.attention == "te" and not te_available():
        raise ConfigError("model.attention", "te was asked for but transformer_engine does not import")
    return cfg.attention == "te" or (cfg.attention == "auto" and te_available())


def _check_supported(hf: Mapping) -> None:
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "model.hf_config.model_type", f"{model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        )
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"model.hf_config.{key}", f"{rope} is not supported (only default RoPE)")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise ConfigError("model.hf_config.sliding_window", "sliding-window attention is not supported")
    if hf.get("mlp_bias"):
        raise ConfigError(
            "model.hf_config.mlp_bias", "MLP biases are not supported (Qwen2 / Llama have none)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            "model.hf_config.hidden_act", f"{hf['hidden_act']!r}: only silu (SwiGLU) is supported"
        )


def rope_theta(hf: Mapping) -> float:
    """RoPE base: top-level `rope_theta` (config.json on the Hub) or transformers 5's `rope_parameters`."""
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def transformer_config_from_hf(hf: Mapping, cfg: ModelConfig) -> TransformerConfig:
    """The TransformerConfig of a Qwen2 / Llama / Mistral config.json under `cfg`'s parallelism and recompute."""
    _check_supported(hf)
    if cfg.sequence_parallel and not uses_te(cfg):
        raise ConfigError(
            "model.sequence_parallel", "needs Transformer Engine (megatron's torch norms reject it)"
        )
    shape = ModelShape.from_hf(hf)
    backend = spec_provider(cfg, shape.head_dim)  # the modules, and the switches they need in the config
    dtype = torch.bfloat16 if cfg.params_dtype == "bf16" else torch.float32
    recompute: dict = {}
    if cfg.recompute == "full" and cfg.recompute_impl == "torch":
        pass  # torch's checkpoint of each layer (build_model: model/recompute.py), not megatron's
    elif cfg.recompute == "full" and cfg.recompute_num_layers is None:
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif cfg.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="block",
            recompute_num_layers=cfg.recompute_num_layers,
        )
    elif cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=list(cfg.recompute_modules))
    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.groups,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.get("initializer_range", 0.02),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline,
        context_parallel_size=cfg.context_parallel,
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fusions: RoPE TE's kernel or, without TE, ours (model/spec.py, model/fused.py); SwiGLU megatron's
        # jit_fuser under TE (or before megatron-core 0.15), else our activation submodule (built from the
        # layer spec, which is what use_te_activation_func asks for). Bias-dropout-add stays unfused: no bias,
        # dropout 0, so it is one add either way and the compiled call only costs host time. The others need
        # apex / TE.
        bias_activation_fusion=fusions_on(cfg) and not backend.swiglu,
        **mcore_compat.activation_submodule_kwargs(backend.swiglu),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=backend.rope_fusion(),
        gradient_accumulation_fusion=False,
        variable_seq_lengths=True,  # packed micro-batches differ in length: PP stages exchange shapes first
        moe_token_dispatcher_type="alltoall",  # no MoE here; megatron rejects variable lengths with "allgather"
        **recompute,
    )


def spec_provider(cfg: ModelConfig, head_dim: int | None = None) -> QuestaSpecProvider:
    """Our modules for megatron (model/spec.py): without TE the whole decoder layer, with TE only the RoPE
    fusion (TE's spec has TE's modules). `head_dim`: the model's, checked against FA4's kernels with fa4."""
    return QuestaSpecProvider(
        sdpa=cfg.attention != "local",
        swiglu=own_swiglu_on(cfg),
        fused_rope=fusions_on(cfg),
        fused_norm=fusions_on(cfg),
        varlen=packed_varlen_on(cfg),
        fa4=fa4_on(cfg, head_dim),
    )


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """The decoder-layer spec: TE's, or the layer of megatron's local spec built from `spec_provider(cfg)`."""
    if uses_te(cfg):
        return get_gpt_layer_with_transformer_engine_spec()
    return decoder_layer_spec(spec_provider(cfg))


def fusions_on(cfg: ModelConfig) -> bool:
    """Fused kernels run on GPU only; CPU runs (tests, the embedded default) take megatron's plain ops."""
    return cfg.fusions and torch.cuda.is_available()


def compile_on(cfg: ModelConfig) -> bool:
    """torch.compile of the decoder layers: asked for, on GPU (CPU runs stay eager), not with TE attention."""
    if not (cfg.compile and torch.cuda.is_available()):
        return False
    if uses_te(cfg):
        raise ConfigError(
            "model.compile", "not supported with Transformer Engine attention (use attention=sdpa)"
        )
    return True


def fa4_on(cfg: ModelConfig, head_dim: int | None = None) -> bool:
    """model.attention=fa4: FlashAttention 4's core attention, refused where it cannot run (model/flash4.py),
    `head_dim` included where given."""
    if cfg.attention != "fa4":
        return False
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where build_model puts it
    problem = flash4.fa4_problem(device, head_dim)
    if problem is not None:
        raise ConfigError("model.attention", f"fa4 unavailable: {problem}")
    return True


def packed_varlen_on(cfg: ModelConfig) -> bool:
    """Whether SDPA core attention takes packed micro-batches through torch's variable-length kernel
    (`VarlenCoreAttention`) under model.packed_attention: varlen (refused where it cannot run: TE or local
    attention, no GPU, a torch without the kernel), auto where it can run (CPU runs: sdpa), sdpa never."""
    choice = cfg.packed_attention
    check_choice("model.packed_attention", choice)  # a ModelConfig built in code, not validated
    if choice == "sdpa":
        return False
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where build_model puts the model
    problem = varlen.varlen_problem(uses_te(cfg), cfg.attention, device)
    if problem is not None and choice == "varlen":
        raise ConfigError("model.packed_attention", f"varlen unavailable: {problem}")
    return problem is None


def own_swiglu_on(cfg: ModelConfig) -> bool:
    """Our SwiGLU as the MLP's activation submodule: with fusions, without TE, on megatron-core 0.15+."""
    return fusions_on(cfg) and not uses_te(cfg) and mcore_compat.HAS_ACTIVATION_SUBMODULE


def shard_layout(vp_stage: int | None = None) -> ShardLayout:
    """This process's shard coordinates (for `convert.hf_to_megatron`) from megatron's parallel state."""
    ps = parallel_state
    return ShardLayout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vp_stage=vp_stage,
        vp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def build_model(
    hf: Mapping,
    cfg: ModelConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel | list[GPTModel]:
    """This rank's GPTModel (randomly initialised; load weights with `load_hf_weights`).

    With virtual pipeline stages and no `vp_stage`, returns the list of this rank's chunks. pre/post_process
    default to whether this chunk is the first / last of the pipeline. On GPU the model lives on the current
    CUDA device; on CPU in host memory.
    """
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp_size is not None and vp_stage is None:
        return [
            build_model(hf, cfg, pre_process=pre_process, post_process=post_process, vp_stage=i)
            for i in range(vp_size)
        ]
    config = transformer_config_from_hf(hf, cfg)
    shape = ModelShape.from_hf(hf)
    layout = shard_layout(vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=shape.padded_vocab(cfg.tensor_parallel),
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        pre_process=layout.is_first if pre_process is None else pre_process,
        post_process=layout.is_last if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf)),
        vp_stage=vp_stage,
    )
    if config.bf16:
        # megatron's torch norms are created in fp32; bf16 weights keep rms_norm on its fused kernel (a dtype
        # mismatch falls back to the unfused path). Megatron-LM's Float16Module casts the same way.
        model.bfloat16()
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if cfg.recompute == "full" and cfg.recompute_impl == "torch":
        if cfg.recompute_keep_attention and uses_te(cfg):
            raise ConfigError(
                "model.recompute_keep_attention", "needs SDPA or FA4 attention (model.attention=sdpa | fa4), not TE's"
            )
        if cfg.recompute_keep_swiglu and not own_swiglu_on(cfg):
            raise ConfigError(
                "model.recompute_keep_swiglu",
                "needs our fused SwiGLU (model.fusions on a GPU, no Transformer Engine, megatron-core 0.15+)",
            )
        layers = model.decoder.layers
        checkpoint_layers(
            layers if cfg.recompute_num_layers is None else layers[: cfg.recompute_num_layers],
            keep_attention=cfg.recompute_keep_attention,
            keep_swiglu=cfg.recompute_keep_swiglu,
        )
    if compile_on(cfg):
        compile_layers(model)
    return model


def compile_layers(model: GPTModel, mode: str | None = None) -> None:
    """torch.compile every decoder layer (model.compile; `mode` is torch.compile's). One compiled graph serves
    every layer (parameters are inputs). Their linear layers keep autograd's weight gradient for good, so no
    weight switches paths within a step when dynamo runs a call eagerly (model/linear.py)."""
    for layer in model.decoder.layers:
        keep_autograd_wgrad(layer)
        layer.compile(mode=mode)


def load_hf_weights(
    model: GPTModel, hf_tensors, hf: Mapping, cfg: ModelConfig, vp_stage: int | None = None
) -> None:
    """Copy HF weights (a mapping or a getter by name, see `hf_io.HFCheckpoint`) into this rank's chunk."""
    shape = ModelShape.from_hf(hf)
    layout = shard_layout(vp_stage)
    converted = hf_to_megatron(hf_tensors, shape, layout)
    te = uses_te(cfg)
    own = model.state_dict()
    expected = {name for name in own if not name.endswith("_extra_state")}
    loaded = {te_norm_names(name) if te else name: t for name, t in converted.items()}
    if expected != set(loaded):
        raise ValueError(
            f"load_hf_weights: shard {layout} names differ; missing {sorted(expected - set(loaded))[:5]}, "
            f"unexpected {sorted(set(loaded) - expected)[:5]}"
        )
    with torch.no_grad():
        for name, tensor in loaded.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"load_hf_weights: {name} has shape {tuple(tensor.shape)}, model wants {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
