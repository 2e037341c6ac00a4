"""Hugging Face safetensors checkpoints: read single or sharded (with the index json) tensor by tensor; write.

Reading is lazy: `HFCheckpoint.get(name)` opens only the shard holding `name`, so a pipeline stage or TP rank
reads just the tensors `convert.hf_names_for_shard` lists. Never pickle: safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from questa_nemo.atomic import atomic_path, write_text_atomic

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFCheckpoint(Mapping):
    """A read-only name -> tensor mapping over a folder's safetensors files (loaded on access)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            self._file_of: dict[str, str] = dict(weight_map)
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(self.folder / SINGLE_NAME, framework="pt") as f:
                self._file_of = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.folder}: tensor {name!r} is in no safetensors file")
        path = self.folder / self._file_of[name]
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise KeyError(f"{self.folder}: tensor {name!r} is in no safetensors file")
            by_file.setdefault(self._file_of[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in wanted})
        return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write `tensors` as HF does: one model.safetensors, or shards plus model.safetensors.index.json.

    Each file is written to a temporary name and renamed; the index is written last. Returns the files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = folder / SINGLE_NAME
        _atomic_save(shards[0], path)
        return [path]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, path)
        files.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / INDEX_NAME
    write_text_atomic(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*files, index]
