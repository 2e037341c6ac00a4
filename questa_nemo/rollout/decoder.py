"""A KV-cached decoder over a megatron GPTModel's own parameter tensors, for fast generation.

megatron's eager forward is launch-bound at decode (75-82 ms per step at batch 64 and 256 on an H200), so the
Megatron backend runs its own forward: the same math as the GPTModel (RMSNorm, fused QKV with megatron's
per-group layout, RoPE, grouped-query attention, SwiGLU MLP) written as a handful of plain torch ops with static
shapes, so a whole decode step can be captured in one CUDA graph (rollout/graphs.py).

`DecoderWeights.from_gpt_model` takes the parameters BY REFERENCE (no copy): an optimizer step on the trainer's
model is seen by the next generation for free. That needs the whole model on the rank (TP = PP = 1); a sharded
trainer hands the decoder a gathered replica instead (`from_state_dict`, see rollout/megatron_engine.py).
Supported: RMSNorm, gated SiLU MLP, non-interleaved RoPE over the full head dim (Qwen2, Llama, Mistral), local
or Transformer Engine layer specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from questa_nemo.model.convert import _local_name


@dataclass
class LayerWeights:
    """One transformer layer's tensors, shared with the megatron module (megatron's layout)."""

    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * groups) * head_dim, hidden], per query group: its q heads, k, v
    qkv_bias: torch.Tensor | None  # [(heads + 2 * groups) * head_dim]
    proj: torch.Tensor  # [hidden, heads * head_dim]
    proj_bias: torch.Tensor | None  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    fc1: torch.Tensor  # [2 * ffn, hidden]: gate rows then up rows
    fc1_bias: torch.Tensor | None  # [2 * ffn]
    fc2: torch.Tensor  # [hidden, ffn]
    fc2_bias: torch.Tensor | None  # [hidden]


@dataclass
class DecoderWeights:
    """Everything a forward needs; tensors alias the GPTModel's parameters."""

    embedding: torch.Tensor  # [padded_vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]: the real vocabulary only (padding rows are never sampled)
    inv_freq: torch.Tensor  # [head_dim / 2] float32 RoPE frequencies (already scaled for Llama 3 / linear)
    heads: int
    groups: int
    head_dim: int
    eps: float
    # EngineOptions.weights8: per layer, {"qkv", "proj", "fc1", "fc2"} -> (int8 or float8 weight, float32 scale a
    # row) (model/weights8.quantize_rows), owned by the engine and refreshed in place on every weight
    # update; the fused-norms step multiplies by them at up to WEIGHTS8_MAX_ROWS sequences. Not in `tensors()`.
    w8: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    @classmethod
    def from_gpt_model(cls, model: torch.nn.Module, vocab_size: int) -> DecoderWeights:
        """Alias the parameters of an unwrapped megatron GPTModel that holds the whole model (TP = PP = 1)."""
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
            raise ValueError(
                "DecoderWeights.from_gpt_model reads whole tensors in place; at "
                f"TP={cfg.tensor_model_parallel_size}, PP={cfg.pipeline_model_parallel_size} build it from the "
                "gathered weights (from_state_dict)"
            )
        tensors = {
            _local_name(name): t.detach()
            for name, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")
        }
        return cls.from_state_dict(tensors, model, vocab_size)

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, vocab_size: int
    ) -> DecoderWeights:
        """Take (by reference) a whole model's tensors under megatron's local-spec names at TP = PP = 1, e.g.
        `convert.hf_to_megatron(gathered, shape, ShardLayout())`. `model` is any of the trainer's GPTModel chunks:
        it supplies the architecture (global head counts, norm epsilon) and the RoPE frequencies."""
        cfg = model.config
        if cfg.normalization != "RMSNorm" or not cfg.gated_linear_unit:
            raise ValueError(
                "rollout.backend=megatron: the fast decoder supports RMSNorm + gated (SwiGLU) MLPs only"
            )
        rotary = model.rotary_pos_emb
        if getattr(rotary, "rotary_interleaved", False):
            raise ValueError(
                "rollout.backend=megatron: interleaved RoPE is not supported by the fast decoder"
            )
        inv_freq = rotary.inv_freq.detach().float()
        if getattr(rotary, "seq_len_interpolation_factor", None):
            inv_freq = inv_freq / rotary.seq_len_interpolation_factor
        heads = cfg.num_attention_heads
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError("rollout.backend=megatron: partial RoPE (rotary_percent < 1) is not supported")

        def optional(name: str) -> torch.Tensor | None:
            t = tensors.get(name)  # Transformer Engine keeps an empty tensor for a disabled bias
            return t if t is not None and t.numel() else None

        layers = []
        for i in range(cfg.num_layers):
            p = f"decoder.layers.{i}."
            layers.append(
                LayerWeights(
                    attn_norm=tensors[p + "input_layernorm.weight"],
                    qkv=tensors[p + "self_attention.linear_qkv.weight"],
                    qkv_bias=optional(p + "self_attention.linear_qkv.bias"),
                    proj=tensors[p + "self_attention.linear_proj.weight"],
                    proj_bias=optional(p + "self_attention.linear_proj.bias"),
                    mlp_norm=tensors[p + "pre_mlp_layernorm.weight"],
                    fc1=tensors[p + "mlp.linear_fc1.weight"],
                    fc1_bias=optional(p + "mlp.linear_fc1.bias"),
                    fc2=tensors[p + "mlp.linear_fc2.weight"],
                    fc2_bias=optional(p + "mlp.linear_fc2.bias"),
                )
            )
        embedding = tensors["embedding.word_embeddings.weight"]
        head = tensors.get("output_layer.weight", embedding)  # absent: tied to the embedding
        return cls(
            embedding=embedding,
            layers=layers,
            final_norm=tensors["decoder.final_layernorm.weight"],
            lm_head=head[:vocab_size],
            inv_freq=inv_freq.to(embedding.device),
            heads=heads,
            groups=cfg.num_query_groups or heads,
            head_dim=head_dim,
            eps=cfg.layernorm_epsilon,
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor, in a fixed order (two DecoderWeights of one model pair up position by position)."""
        out = [self.embedding, self.final_norm, self.lm_head]
        for lw in self.layers:
            out += [t for t in vars(lw).values() if t is not None]
        return out

    def data_ptrs(self) -> tuple[int, ...]:
        """Storage addresses of every tensor: CUDA graphs baked these in and must be recaptured if they move."""
        return tuple(t.data_ptr() for t in self.tensors())


@dataclass
class KVCache:
    """Preallocated keys and values for every slot; slot b, position p lives at [layer, b, :, p].

    The decode step reads every slot up to the step's attention span. rollout/paged.py has the same interface
    over a block pool (each sequence reads its own blocks only).
    """

    k: torch.Tensor  # [layers, slots, groups, max_len, head_dim]
    v: torch.Tensor  # [layers, slots, groups, max_len, head_dim]

    span_matters = True  # the step's attention span sets the work (and the captured graph)

    @classmethod
    def allocate(cls, w: DecoderWeights, slots: int, max_len: int) -> KVCache:
        shape = (len(w.layers), slots, w.groups, max_len, w.head_dim)
        like = w.embedding
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def slots(self) -> int:
        return self.k.size(1)

    def copy_prefix(self, src: int, dst: slice, length: int) -> None:
        """Share slot `src`'s first `length` positions (a prefilled prompt) with the slots in `dst`."""
        self.k[:, dst, :, :length] = self.k[:, src : src + 1, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src : src + 1, :, :length]

    def store(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [G, C, D] at positions start..start+C-1 of `slot`."""
        self.k[layer, slot, :, start : start + k.size(1)] = k
        self.v[layer, slot, :, start : start + v.size(1)] = v

    def prefix(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [1, G, end, D] of `slot`'s positions 0..end-1."""
        return self.k[layer, slot : slot + 1, :, :end], self.v[layer, slot : slot + 1, :, :end]

    def decode_context(self, positions: torch.Tensor, attend_len: int) -> dict:
        """Per-step tensors shared by every layer: slot ids and the visibility mask [B, 1, 1, attend_len]."""
        b = positions.numel()
        visible = torch.arange(attend_len, device=positions.device)[None, :] <= positions[:, None]
        return {
            "slots": torch.arange(b, device=positions.device),
            "positions": positions,
            "visible": visible[:, None, None, :],
            "attend_len": attend_len,
        }

    def decode_attention(
        self, layer: int, ctx: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Append k, v [B, G, D] at the step's positions; q [B, G, per_group, D] attends to every position
        <= its own below the span -> [B, G, per_group, D]."""
        b, span = q.size(0), ctx["attend_len"]
        self.k[layer, ctx["slots"], :, ctx["positions"]] = k
        self.v[layer, ctx["slots"], :, ctx["positions"]] = v
        keys, values = self.k[layer, :b, :, :span], self.v[layer, :b, :, :span]  # [B, G, L, D]
        # A group's query heads take the "query length" axis, so grouped-query attention needs no repeat of
        # the cache; the fused kernel keeps scores in float32 (a bf16 score matmul would shift log-probs).
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx["visible"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., hidden] -> same shape; torch's fused RMSNorm, the kernel megatron's local spec runs too."""
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, 1, T, D/2] in the model dtype (as megatron and HF apply them) for positions [B, T].

    Computed once per forward and shared by every layer: fewer kernels in the captured decode step.
    """
    angles = positions.float()[:, None, None, :, None] * inv_freq  # [B, 1, 1, T, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, G, heads_per_group, T, D] with tables from `rope_tables`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _qkv(
    h: torch.Tensor, lw: LayerWeights, w: DecoderWeights, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B, T, hidden] -> q [B, G, per_group, T, D] and k, v [B, G, T, D] (G = query groups).

    Megatron's fused QKV holds, per query group, its query heads then its key then its value; q and k are
    rotated together in one pass.
    """
    b, t, _ = h.shape
    per_group = w.heads // w.groups
    qkv = F.linear(rms_norm(h, lw.attn_norm, w.eps), lw.qkv, lw.qkv_bias)
    qkv = qkv.view(b, t, w.groups, per_group + 2, w.head_dim).permute(0, 2, 3, 1, 4)  # [B, G, per+2, T, D]
    qk = rope(qkv[:, :, : per_group + 1], cos, sin)  # [B, G, per+1, T, D]
    return qk[:, :, :per_group], qk[:, :, per_group], qkv[:, :, per_group + 1]


def _mlp_and_proj(h: torch.Tensor, attn: torch.Tensor, lw: LayerWeights, w: DecoderWeights) -> torch.Tensor:
    """Residual stream after attention output projection and the SwiGLU MLP. attn [B, T, heads * D]."""
    h = h + F.linear(attn, lw.proj, lw.proj_bias)
    gate, up = F.linear(rms_norm(h, lw.mlp_norm, w.eps), lw.fc1, lw.fc1_bias).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, lw.fc2, lw.fc2_bias)


def prefill(w: DecoderWeights, cache, slot: int, tokens: torch.Tensor, chunk: int) -> None:
    """Write the keys/values of one prompt (positions 0..T-1) into cache slot `slot`, `chunk` tokens at a time.

    tokens: [T]. No logits are computed: the last prompt token is fed to the first decode step instead.
    `cache`: a KVCache, or a paged cache (rollout/paged.py) whose slot already owns blocks for T positions.
    """
    total = tokens.numel()
    per_group = w.heads // w.groups
    for start in range(0, total, chunk):
        ids = tokens[start : start + chunk][None]  # [1, C]
        c = ids.size(1)
        end = start + c
        positions = torch.arange(start, end, device=ids.device)[None]  # [1, C]
        h = F.embedding(ids, w.embedding)  # [1, C, hidden]
        cos, sin = rope_tables(positions, w.inv_freq, h.dtype)
        # chunk rows attend to every cached key up to and including their own position
        mask = None
        if start:
            mask = torch.arange(end, device=ids.device)[None, :] <= positions[0, :, None]  # [C, end]
        for i, lw in enumerate(w.layers):
            q, k, v = _qkv(h, lw, w, cos, sin)
            cache.store(i, slot, start, k[0], v[0])
            keys, values = cache.prefix(i, slot, end)
            attn = F.scaled_dot_product_attention(
                q.reshape(1, w.heads, c, w.head_dim),
                keys.repeat_interleave(per_group, dim=1),
                values.repeat_interleave(per_group, dim=1),
                attn_mask=mask,
                is_causal=mask is None,
            )  # [1, heads, C, D]
            h = _mlp_and_proj(h, attn.transpose(1, 2).reshape(1, c, -1), lw, w)


def decode_logits(
    w: DecoderWeights, cache, tokens: torch.Tensor, positions: torch.Tensor, attend_len: int, upcast: bool = True
) -> torch.Tensor:
    """One decode step for the first B cache slots: logits of the next token, float32 [B, vocab] (the weights'
    dtype with upcast=False, for a sampler that reads them as they are).

    tokens, positions: [B] on device (slot b's token sits at positions[b]); its key/value are written there
    and it attends to cache positions <= positions[b], all of which lie below `attend_len` (a static bound, so
    the work per step scales with the longest live sequence, not the cache size; a paged cache's kernel reads
    each sequence's own length instead). No host syncs.
    """
    b = tokens.numel()
    ctx = cache.decode_context(positions, attend_len)
    h = F.embedding(tokens[:, None], w.embedding)  # [B, 1, hidden]
    cos, sin = rope_tables(positions[:, None], w.inv_freq, h.dtype)
    if getattr(cache, "fused_residual", False):  # a paged kernel cache with EngineOptions.fused_norms
        logits = _decode_fused_norms(w, cache, ctx, h, cos.view(b, -1), sin.view(b, -1))
        return logits.float() if upcast else logits
    takes_qkv = getattr(cache, "takes_qkv", False)  # a paged cache's fused RoPE + append (same bits)
    for i, lw in enumerate(w.layers):
        if takes_qkv:
            qkv = F.linear(rms_norm(h, lw.attn_norm, w.eps), lw.qkv, lw.qkv_bias)  # [B, 1, (heads + 2G) D]
            attn = cache.decode_attention_qkv(i, ctx, qkv[:, 0], cos.view(b, -1), sin.view(b, -1))
        else:
            q, k, v = _qkv(h, lw, w, cos, sin)  # q [B, G, per, 1, D]; k, v [B, G, 1, D]
            attn = cache.decode_attention(i, ctx, q[:, :, :, 0], k[:, :, 0], v[:, :, 0])  # [B, G, per, D]
        h = _mlp_and_proj(h, attn.reshape(b, 1, -1), lw, w)
    last = rms_norm(h[:, 0], w.final_norm, w.eps)
    logits = F.linear(last, w.lm_head)
    return logits.float() if upcast else logits


# Sequences up to which the decode step multiplies by the 8-bit copies (EngineOptions.weights8); larger batches
# keep the weights' dtype in cuBLAS. H200, bench/bench_skinny.py (a step's four projections a layer and the head,
# ms): at 8 rows cuBLAS 1.240, int8 1.085 (1.048 with PDL); at 16 1.254, 1.081; at 32 cuBLAS 1.275 and int8
# 1.486 (the kernel's 32-row tile loses to cuBLAS there), so the copies stop at 16. An H100 since
# (w8_skinny_h100.json): at 16 rows cuBLAS 1.528, int8 1.221; at 32 both 1.57.
WEIGHTS8_MAX_ROWS = 16


def _decode_fused_norms(
    w: DecoderWeights, cache, ctx: dict, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """`decode_logits`' layers with the residual stream in Triton kernels (model/triton_kernels.py): each
    residual add and the RMSNorm after it are one launch (`add_rmsnorm`: the add's bits as torch's, the norm's
    as the trainer's fused RMSNorm), SwiGLU is one (`swiglu_forward`), the final norm rides on the last add.
    About three launches a layer fewer than the torch ops, on a step that is launch-bound at a rollout's tail.
    With the cache's `skinny_gemm` the projections go through `skinny_linear` (cuBLAS past 32 rows); with the
    weights' 8-bit copies `w8` (EngineOptions.weights8) the layers' four projections at up to WEIGHTS8_MAX_ROWS
    sequences go through `skinny_linear` on those (the output head stays in the weights' dtype). With the
    cache's `pdl` every Triton kernel of the step is a programmatic dependent launch (pdl_enter).
    h [B, 1, hidden]; cos, sin [B, D / 2] -> logits [B, vocab] in the weights' dtype."""
    from questa_nemo.model.triton_kernels import (
        add_rmsnorm,
        rmsnorm_forward,
        skinny_linear,
        swiglu_forward,
    )

    pdl = getattr(cache, "pdl", False)  # EngineOptions.pdl: programmatic dependent launches of these kernels
    skinny = getattr(cache, "skinny_gemm", False)
    b = h.size(0)
    w8 = w.w8 if w.w8 is not None and b <= WEIGHTS8_MAX_ROWS else None

    def project(i: int, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if w8 is not None:
            q, scale = w8[i][name]
            return skinny_linear(x, q, bias, scale=scale, pdl=pdl)
        return skinny_linear(x, weight, bias, pdl=pdl) if skinny else F.linear(x, weight, bias)

    x = rmsnorm_forward(h, w.layers[0].attn_norm, w.eps, pdl=pdl)[0]
    for i, lw in enumerate(w.layers):
        qkv = project(i, "qkv", x, lw.qkv, lw.qkv_bias)  # [B, 1, (heads + 2G) D]
        attn = cache.decode_attention_qkv(i, ctx, qkv[:, 0], cos, sin)  # [B, G, per, D]
        out = project(i, "proj", attn.reshape(b, 1, -1), lw.proj, lw.proj_bias)
        h, x = add_rmsnorm(out, h, lw.mlp_norm, w.eps, pdl=pdl)
        up = swiglu_forward(project(i, "fc1", x, lw.fc1, lw.fc1_bias), pdl=pdl)
        mlp = project(i, "fc2", up, lw.fc2, lw.fc2_bias)
        after = w.layers[i + 1].attn_norm if i + 1 < len(w.layers) else w.final_norm
        h, x = add_rmsnorm(mlp, h, after, w.eps, pdl=pdl)
    return skinny_linear(x[:, 0], w.lm_head) if skinny else F.linear(x[:, 0], w.lm_head)
