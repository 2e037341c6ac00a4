"""Hugging Face <-> Megatron weights for Qwen2 / Llama / Mistral, one (TP, PP, VP) shard at a time.

Pure tensor code: no megatron import, so export and import tools run without process groups.

Megatron's layout, per decoder layer (local spec names; the TE spec differs only in where the two norms live,
see `te_norm_names`):
- `self_attention.linear_qkv.weight` [(heads + 2 * groups) * d / tp, hidden]: for each query group, its
  heads/groups query heads, then its key head, then its value head; TP ranks hold contiguous query groups.
- `mlp.linear_fc1.weight` [2 * ffn / tp, hidden]: this rank's slice of gate_proj, then of up_proj.
- `linear_proj` / `linear_fc2` split their input dimension over TP; embeddings and the output layer split
  the (padded) vocabulary. Layer indices in a shard's state dict are local to its pipeline chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from questa_nemo.config import ConfigError

VOCAB_DIVISOR = (
    128  # megatron's make_vocab_size_divisible_by; the padded vocabulary is a multiple of 128 x TP
)


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Hugging Face config.json that conversion and the model build need."""

    layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads (query groups)
    head_dim: int
    ffn: int
    vocab: int
    tied: bool  # lm_head shares the input embedding
    qkv_bias: bool

    @classmethod
    def from_hf(cls, hf: Mapping) -> ModelShape:
        """Read a Qwen2 / Llama / Mistral config dict; a missing key raises ConfigError naming it."""
        for key in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        ):
            if key not in hf:
                raise ConfigError(f"model.hf_config.{key}", "missing from config.json")
        heads = hf["num_attention_heads"]
        model_type = hf.get("model_type", "llama")
        return cls(
            layers=hf["num_hidden_layers"],
            hidden=hf["hidden_size"],
            heads=heads,
            groups=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn=hf["intermediate_size"],
            vocab=hf["vocab_size"],
            tied=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        )

    def padded_vocab(self, tp_size: int) -> int:
        multiple = VOCAB_DIVISOR * tp_size
        return -(-self.vocab // multiple) * multiple


class ShardLayout(NamedTuple):
    """One model shard: tensor-parallel rank, pipeline stage, and virtual-pipeline chunk (None: no VP)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    vp_stage: int | None = None
    vp_size: int | None = None

    def layer_range(self, num_layers: int) -> range:
        """Global (0-based) layer indices this chunk holds; megatron interleaves VP chunks across stages."""
        chunks = self.pp_size * (self.vp_size or 1)
        per_chunk = num_layers // chunks
        chunk = (self.vp_stage or 0) * self.pp_size + self.pp_rank
        return range(chunk * per_chunk, (chunk + 1) * per_chunk)

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0 and (self.vp_stage or 0) == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1 and (self.vp_stage or 0) == (self.vp_size or 1) - 1


def te_norm_names(name: str) -> str:
    """Local-spec name -> Transformer Engine spec name (TE fuses the pre-norms into the next linear)."""
    return name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
        "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
    )


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def hf_names_for_shard(shape: ModelShape, layout: ShardLayout) -> list[str]:
    """The Hugging Face tensor names one shard is built from (so a rank reads only those)."""
    names = []
    if layout.is_first:
        names.append("model.embed_tokens.weight")
    for i in layout.layer_range(shape.layers):
        p = _hf_layer(i)
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if shape.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if layout.is_last:
        names.append("model.norm.weight")
        names.append("model.embed_tokens.weight" if shape.tied else "lm_head.weight")
    return sorted(set(names))


def _split(t: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    return t.chunk(layout.tp_size, dim=dim)[layout.tp_rank].clone()


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """[V, h] -> [padded, h] with zero rows."""
    return torch.cat([t, t.new_zeros(padded - t.size(0), t.size(1))]) if padded > t.size(0) else t


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> megatron's per-group interleaving [(heads+2g)*d, ...]."""
    g, d = shape.groups, shape.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, (shape.heads // g) * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_from_megatron(
    qkv: torch.Tensor, shape: ModelShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `_qkv_to_megatron` for the full (TP-gathered) tensor."""
    g, d = shape.groups, shape.head_dim
    per_group_q = (shape.heads // g) * d
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, per_group_q + 2 * d, *rest)
    q, k, v = grouped.split([per_group_q, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    shape: ModelShape,
    layout: ShardLayout,
) -> dict[str, torch.Tensor]:
    """Megatron state dict (local-spec names) of one shard, from HF tensors (a mapping or a getter by name).

    Only the tensors named by `hf_names_for_shard` are read. Padded vocabulary rows are zero.
    """
    get = hf.__getitem__ if isinstance(hf, Mapping) else hf
    vocab = shape.padded_vocab(layout.tp_size)
    out: dict[str, torch.Tensor] = {}
    if layout.is_first:
        out["embedding.word_embeddings.weight"] = _split(
            _pad_vocab(get("model.embed_tokens.weight"), vocab), 0, layout
        )
    for local, i in enumerate(layout.layer_range(shape.layers)):
        h, m = _hf_layer(i), f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight").clone()
        out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight").clone()
        q, k, v = (get(h + f"self_attn.{x}_proj.weight") for x in "qkv")
        out[m + "self_attention.linear_qkv.weight"] = _split(_qkv_to_megatron(q, k, v, shape), 0, layout)
        if shape.qkv_bias:
            qb, kb, vb = (get(h + f"self_attn.{x}_proj.bias") for x in "qkv")
            out[m + "self_attention.linear_qkv.bias"] = _split(_qkv_to_megatron(qb, kb, vb, shape), 0, layout)
        out[m + "self_attention.linear_proj.weight"] = _split(get(h + "self_attn.o_proj.weight"), 1, layout)
        gate = _split(get(h + "mlp.gate_proj.weight"), 0, layout)
        up = _split(get(h + "mlp.up_proj.weight"), 0, layout)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[m + "mlp.linear_fc2.weight"] = _split(get(h + "mlp.down_proj.weight"), 1, layout)
    if layout.is_last:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
        head = get("model.embed_tokens.weight" if shape.tied else "lm_head.weight")
        # Tied at PP=1 there is no separate output layer; the embedding above serves both.
        if not (shape.tied and layout.is_first):
            out["output_layer.weight"] = _split(_pad_vocab(head, vocab), 0, layout)
    return out


def megatron_to_hf(
    shards: Mapping[ShardLayout, Mapping[str, torch.Tensor]], shape: ModelShape
) -> dict[str, torch.Tensor]:
    """Full HF state dict from every shard of one model (all TP ranks of all PP stages / VP chunks).

    Accepts local-spec or TE-spec names; strips the vocabulary padding. Exact inverse of `hf_to_megatron`.
    """
    by_chunk: dict[tuple[int, int], list[tuple[int, Mapping[str, torch.Tensor]]]] = {}
    any_layout = next(iter(shards))
    for layout, sd in shards.items():
        local_names = {_local_name(n): t for n, t in sd.items() if not n.endswith("_extra_state")}
        by_chunk.setdefault((layout.pp_rank, layout.vp_stage or 0), []).append((layout.tp_rank, local_names))
    tp_size = any_layout.tp_size
    out: dict[str, torch.Tensor] = {}
    for (pp_rank, vp_stage), ranks in by_chunk.items():
        if len(ranks) != tp_size:
            raise ValueError(
                f"megatron_to_hf: chunk pp={pp_rank} vp={vp_stage} has {len(ranks)} of {tp_size} TP shards"
            )
        ranks.sort(key=lambda r: r[0])
        sds = [sd for _, sd in ranks]
        layout = any_layout._replace(
            tp_rank=0, pp_rank=pp_rank, vp_stage=vp_stage if any_layout.vp_size else None
        )
        _chunk_to_hf(sds, shape, layout, out)
    return out


def _local_name(name: str) -> str:
    """TE-spec name -> local-spec name (inverse of `te_norm_names`); a local name is returned unchanged."""
    return name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight").replace(
        "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
    )


def _chunk_to_hf(
    sds: list[Mapping[str, torch.Tensor]],
    shape: ModelShape,
    layout: ShardLayout,
    out: dict[str, torch.Tensor],
) -> None:
    """Gather one pipeline chunk's TP shards (in rank order) into HF tensors, written into `out`."""

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([sd[name] for sd in sds], dim=dim)

    if "embedding.word_embeddings.weight" in sds[0]:
        out["model.embed_tokens.weight"] = cat("embedding.word_embeddings.weight", 0)[: shape.vocab].clone()
    for local, i in enumerate(layout.layer_range(shape.layers)):
        h, m = _hf_layer(i), f"decoder.layers.{local}."
        out[h + "input_layernorm.weight"] = sds[0][m + "input_layernorm.weight"].clone()
        out[h + "post_attention_layernorm.weight"] = sds[0][m + "pre_mlp_layernorm.weight"].clone()
        q, k, v = _qkv_from_megatron(cat(m + "self_attention.linear_qkv.weight", 0), shape)
        out.update(
            {
                h + "self_attn.q_proj.weight": q,
                h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v,
            }
        )
        if shape.qkv_bias:
            qb, kb, vb = _qkv_from_megatron(cat(m + "self_attention.linear_qkv.bias", 0), shape)
            out.update(
                {
                    h + "self_attn.q_proj.bias": qb,
                    h + "self_attn.k_proj.bias": kb,
                    h + "self_attn.v_proj.bias": vb,
                }
            )
        out[h + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", 1)
        halves = [sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0) for sd in sds]
        out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
        out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
        out[h + "mlp.down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", 1)
    if "decoder.final_layernorm.weight" in sds[0]:
        out["model.norm.weight"] = sds[0]["decoder.final_layernorm.weight"].clone()
        if not shape.tied:
            out["lm_head.weight"] = cat("output_layer.weight", 0)[: shape.vocab].clone()
