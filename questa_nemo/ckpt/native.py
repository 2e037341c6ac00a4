"""Our own model checkpoints: a megatron distributed checkpoint of the GPTModel, readable without a GPU.

A training checkpoint (`<run_dir>/checkpoints/step_<N>/`, see model/checkpoint.py) keeps the model under
`model/`, config.json and the tokenizer files beside it, and `metadata.json` + a `complete` marker.
`questa-nemo import ... format=native` writes the same layout (model only, step 0), so
`checkpoint.load_model_checkpoint` loads an imported model at any TP/PP layout. Keys are those of
`GPTModel.sharded_state_dict()`; only the vocabulary padding depends on the writer's TP
(`convert.ModelShape.padded_vocab`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from questa_nemo.atomic import atomic_dir
from questa_nemo.ckpt import dist_layout
from questa_nemo.ckpt.hf import HFModel, clean_config, default_generation_config, tokenizer_files
from questa_nemo.config import ConfigError
from questa_nemo.model import checkpoint, nemo_io
from questa_nemo.model.convert import ModelShape

MODEL_DIR = "model"


def model_dir(path: str | Path) -> Path | None:
    """The distributed checkpoint inside `path` (`path/model/` or `path` itself), or None."""
    path = Path(path)
    for candidate in (path / MODEL_DIR, path):
        if (candidate / "metadata.json").is_file() and nemo_io.is_dist_checkpoint(candidate):
            return candidate
    return None


def _nearest(path: Path, name: str, levels: int = 4) -> Path | None:
    """`name` in `path` or one of its parents (a step folder, checkpoints/, the run folder)."""
    for folder in [path, *path.parents][:levels]:
        if (folder / name).is_file():
            return folder / name
    return None


def read_native(path: str | Path, hf_config: str | None = None, tokenizer: str | None = None) -> HFModel:
    """A checkpoint of ours as an HFModel: tensors gathered from whatever TP/PP layout wrote them, on CPU.

    config.json comes from `hf_config` (a file or folder; key model.hf_config) or is looked for beside the
    checkpoint and up to three folders above it; the tokenizer likewise (key model.tokenizer).
    """
    path = Path(path)
    weights = model_dir(path)
    if weights is None:
        raise FileNotFoundError(f"{path}: no megatron distributed checkpoint here or in {path / MODEL_DIR}")
    if weights != path:
        checkpoint.read_metadata(path)  # a training checkpoint must be complete (raises, naming the folder)
    config_path = Path(hf_config) if hf_config else _nearest(path, "config.json")
    if config_path is not None and config_path.is_dir():
        config_path = config_path / "config.json"
    if config_path is None or not config_path.is_file():
        raise ConfigError(
            "model.hf_config", f"no config.json beside {path}; pass model.hf_config=<config.json>"
        )
    config = json.loads(config_path.read_text())
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    if tokenizer_dir is None:
        near = _nearest(path, "tokenizer_config.json") or _nearest(
            config_path.parent, "tokenizer_config.json"
        )
        tokenizer_dir = near.parent if near else None
    generation = _nearest(path, "generation_config.json")
    shape = ModelShape.from_hf(config)
    shapes = nemo_io.tensor_shapes(weights)
    global_tensors = dist_layout.read_global(
        lambda keys: nemo_io.load_tensors(weights, keys), set(shapes), shape
    )
    return HFModel(
        config=config,
        tensors=dist_layout.global_to_hf(global_tensors, shape),
        tokenizer_dir=tokenizer_dir,
        generation_config=json.loads(generation.read_text()) if generation else None,
    )


def write_native(
    model: HFModel,
    out: str | Path,
    tensor_parallel: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as our checkpoint folder (`model/` + config.json + tokenizer), atomically.

    The vocabulary is padded as a model built with `tensor_parallel` TP ranks pads it (the one layout
    property a distributed checkpoint keeps).
    """
    out = Path(out)
    shape = ModelShape.from_hf(model.config)
    tensors = {n: model.tensors[n].to(dtype) if dtype else model.tensors[n] for n in model.tensors}
    global_tensors = dist_layout.hf_to_global(tensors, shape, vocab_rows=shape.padded_vocab(tensor_parallel))
    del tensors
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / MODEL_DIR).mkdir()
        nemo_io.save_layer_stacked(
            tmp / MODEL_DIR,
            tensors=global_tensors.whole,
            layer_tensors={dist_layout.LAYERS + k: v for k, v in global_tensors.layers.items()},
            empty_layer_objects=[dist_layout.LAYERS + s for s in dist_layout.EXTRA_STATE_SUFFIXES],
            num_layers=shape.layers,
        )
        layout = checkpoint.CheckpointMetadata(
            step=0,
            tensor_parallel=tensor_parallel,
            pipeline_parallel=1,
            virtual_pipeline=None,
            data_parallel=1,
            world_size=1,
            has_optimizer=False,
        )
        (tmp / "metadata.json").write_text(json.dumps(asdict(layout), indent=2, sort_keys=True))
        config = clean_config(model.config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = model.generation_config or default_generation_config(config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        for file in tokenizer_files(model.tokenizer_dir) if model.tokenizer_dir else []:
            shutil.copyfile(file, tmp / file.name)
        (tmp / checkpoint.COMPLETE_MARKER).write_text("ok\n")
    return out
