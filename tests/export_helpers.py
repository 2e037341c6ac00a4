"""Shared helpers of the export / import tests: tiny HF folders on disk and exact tensor comparisons."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from tiny_hf import tiny_hf_model  # noqa: E402

from questa_nemo.ckpt.hf import HFModel, write_hf_folder  # noqa: E402


def tiny_hf_folder(kind: str, out: Path, layers: int = 4) -> tuple[torch.nn.Module, Path]:
    """A tiny random Qwen2 / Llama written as an HF folder (no tokenizer); returns (reference model, folder)."""
    ref, hf = tiny_hf_model(kind, layers=layers)
    tensors = {name: t.detach().clone() for name, t in ref.state_dict().items()}
    write_hf_folder(HFModel(config=hf, tensors=tensors, tokenizer_dir=None), out)
    return ref, out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits."""
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
