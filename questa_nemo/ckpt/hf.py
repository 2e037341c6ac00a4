"""Hugging Face model folders: config.json, generation_config.json, safetensors shards, tokenizer files.

Every format export and import handle passes through `HFModel` (the config, HF-named tensors, a tokenizer
folder), so each format needs only a reader to it and a writer from it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from questa_nemo.atomic import atomic_dir
from questa_nemo.model.hf_io import HFCheckpoint, write_safetensors

# Files a Hugging Face tokenizer may consist of; whichever exist travel with the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# config.json keys that describe how a checkpoint was stored, not the model: dropped on export.
STORAGE_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")
DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclass
class HFModel:
    """A model in Hugging Face terms, whatever file it came from."""

    config: dict  # config.json contents (vocab_size is the tokenizer's, never megatron's padded size)
    tensors: Mapping[str, torch.Tensor]  # HF parameter name -> whole tensor (may load lazily)
    tokenizer_dir: Path | None  # a folder holding the TOKENIZER_FILES that exist; None = no tokenizer
    generation_config: dict | None = None  # generation_config.json contents, when the source had one


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files present in `folder`."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def clean_config(config: Mapping) -> dict:
    """config.json for a plain (unquantised, unpadded) checkpoint: storage-only keys removed."""
    return {k: v for k, v in config.items() if k not in STORAGE_KEYS}


def default_generation_config(config: Mapping) -> dict:
    """generation_config.json from the token ids in config.json (what transformers derives itself)."""
    out = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
    }
    return out


def read_hf_folder(folder: str | Path) -> HFModel:
    """An HF folder (config.json + safetensors) as an HFModel; tensors are read lazily, shard by shard."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return HFModel(
        config=config,
        tensors=HFCheckpoint(folder),
        tokenizer_dir=folder if tokenizer_files(folder) else None,
        generation_config=generation,
    )


def hf_tensors_to_save(model: HFModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors an HF folder stores: lm_head dropped when tied (transformers re-ties it), cast to dtype."""
    tied = bool(model.config.get("tie_word_embeddings", False))
    out = {}
    for name in model.tensors:
        if tied and name == "lm_head.weight":
            continue
        tensor = model.tensors[name]
        out[name] = tensor.to(dtype) if dtype is not None else tensor
    return out


def write_hf_folder(
    model: HFModel,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face folder at `out`, atomically (a temp sibling renamed at the end)."""
    out = Path(out)
    tensors = hf_tensors_to_save(model, dtype)
    config = clean_config(model.config)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        # transformers 5 keeps the base only under rope_parameters; 4.x readers (NeMo's importers, vLLM pins)
        # read the top-level key and silently fall back to 10,000 without it
        config["rope_theta"] = rope["rope_theta"]
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    config["architectures"] = config.get("architectures") or [_architecture(config)]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = model.generation_config or default_generation_config(config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if model.tokenizer_dir is not None:
            for path in tokenizer_files(model.tokenizer_dir):
                shutil.copyfile(path, tmp / path.name)
    return out


def _architecture(config: Mapping) -> str:
    names = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    model_type = config.get("model_type", "llama")
    if model_type not in names:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {sorted(names)}")
    return names[model_type]
