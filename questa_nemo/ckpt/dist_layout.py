"""Megatron's checkpoint layout of a GPT model <-> Hugging Face tensors, with no megatron import.

A megatron distributed checkpoint (ours under `step_<N>/model/`, NeMo's under `model_weights/`) stores each
parameter as one global tensor, whatever TP/PP layout wrote it: decoder parameters stacked into
`[num_layers, ...]` under `<prefix>decoder.layers.<suffix>` with Transformer Engine suffixes (megatron maps the
local spec's norm names onto them), the QKV and fc1 tensors in their TP=1 layout, and the embedding and
output layer padded to the writer's vocabulary multiple. So the TP=1 conversion of `model/convert.py`,
applied one layer at a time, is the whole translation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron, megatron_to_hf, te_norm_names

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYERS = "decoder.layers."
# Transformer Engine modules carry an `_extra_state` object per layer; NeMo's load asks for them.
EXTRA_STATE_SUFFIXES = (
    "self_attention.core_attention._extra_state",
    "self_attention.linear_qkv._extra_state",
    "self_attention.linear_proj._extra_state",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2._extra_state",
)


@dataclass
class GlobalTensors:
    """One model's tensors as a distributed checkpoint stores them (keys without prefix)."""

    whole: dict[str, torch.Tensor]  # EMBEDDING, FINAL_NORM, OUTPUT_LAYER (absent when tied)
    layers: dict[str, list[torch.Tensor]]  # TE-spec suffix under LAYERS -> one tensor per layer, in order


def layer_suffixes(shape: ModelShape) -> list[str]:
    """The per-layer parameter suffixes a checkpoint of `shape` holds (TE-spec names)."""
    suffixes = [
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.layer_norm_weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    return sorted(suffixes + (["self_attention.linear_qkv.bias"] if shape.qkv_bias else []))


# One layer converts through `convert.py` as the middle chunk of a 3-layer, 3-stage model: that chunk holds
# HF layer 1 as its local layer 0, and neither the embedding nor the head.
_ONE_LAYER_STAGE = ShardLayout(tp_rank=0, tp_size=1, pp_rank=1, pp_size=3)
_HF_ONE_LAYER = "model.layers.1."


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])]) if rows > t.size(0) else t


def hf_to_global(hf: Mapping[str, torch.Tensor], shape: ModelShape, vocab_rows: int) -> GlobalTensors:
    """HF tensors -> checkpoint tensors, the embedding / output layer padded with zero rows to `vocab_rows`."""
    layers: dict[str, list[torch.Tensor]] = {}
    three_layers = dataclasses.replace(shape, layers=3)
    for i in range(shape.layers):
        converted = hf_to_megatron(_RenamedLayer(hf, i), three_layers, _ONE_LAYER_STAGE)
        for name, tensor in converted.items():
            layers.setdefault(te_norm_names(name.removeprefix(LAYERS + "0.")), []).append(tensor)
    whole = {
        EMBEDDING: _pad_rows(hf["model.embed_tokens.weight"], vocab_rows),
        FINAL_NORM: hf["model.norm.weight"].clone(),
    }
    if not shape.tied:
        whole[OUTPUT_LAYER] = _pad_rows(hf["lm_head.weight"], vocab_rows)
    return GlobalTensors(whole=whole, layers=layers)


class _RenamedLayer(Mapping):
    """HF layer `index` seen as `_HF_ONE_LAYER`, for converting one layer through `_ONE_LAYER_STAGE`."""

    def __init__(self, hf: Mapping[str, torch.Tensor], index: int):
        self._hf, self._index = hf, index

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._hf[name.replace(_HF_ONE_LAYER, f"model.layers.{self._index}.", 1)]

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def global_to_hf(global_tensors: GlobalTensors, shape: ModelShape) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> HF tensors (vocabulary padding stripped); exact inverse of `hf_to_global`."""
    out: dict[str, torch.Tensor] = {}
    three_layers = dataclasses.replace(shape, layers=3)
    for i in range(shape.layers):
        local = {f"{LAYERS}0.{suffix}": per_layer[i] for suffix, per_layer in global_tensors.layers.items()}
        for name, tensor in megatron_to_hf({_ONE_LAYER_STAGE: local}, three_layers).items():
            out[name.replace(_HF_ONE_LAYER, f"model.layers.{i}.", 1)] = tensor
    whole = global_tensors.whole
    out["model.embed_tokens.weight"] = whole[EMBEDDING][: shape.vocab].clone()
    out["model.norm.weight"] = whole[FINAL_NORM].clone()
    if not shape.tied:
        out["lm_head.weight"] = whole[OUTPUT_LAYER][: shape.vocab].clone()
    return out


def find_prefix(keys: list[str] | set[str]) -> str:
    """The prefix a checkpoint puts before megatron's names ('' for ours, 'model.' for NeMo's)."""
    hits = [k.removesuffix(EMBEDDING) for k in keys if k.endswith(EMBEDDING)]
    if len(hits) != 1:
        raise KeyError(f"expected one '*{EMBEDDING}' tensor, found {len(hits)}: not a GPT model checkpoint")
    return hits[0]


def read_global(
    load: Callable[[list[str]], dict[str, torch.Tensor]], keys: set[str], shape: ModelShape
) -> GlobalTensors:
    """Load a model's tensors from a checkpoint through `load(keys) -> {key: tensor}` (prefix detected)."""
    prefix = find_prefix(keys)
    wanted_whole = [EMBEDDING, FINAL_NORM] + ([] if shape.tied else [OUTPUT_LAYER])
    wanted_layers = layer_suffixes(shape)
    names = [prefix + k for k in wanted_whole] + [prefix + LAYERS + s for s in wanted_layers]
    missing = [n for n in names if n not in keys]
    if missing:
        raise KeyError(f"checkpoint lacks {missing[0]!r} (and {len(missing) - 1} more) for this model config")
    loaded = load(names)
    return GlobalTensors(
        whole={k: loaded[prefix + k] for k in wanted_whole},
        layers={s: list(loaded[prefix + LAYERS + s].unbind(0)) for s in wanted_layers},
    )
