"""A generation backend for a checkpoint: build this rank's model chunks, load the weights (any format we read)
and put the rollout engine of `rollout.backend` on them."""

from __future__ import annotations

from pathlib import Path

from questa_nemo.config import Config, ConfigError, read_hf_config, validate_model_shapes
from questa_nemo.rollout.base import GenerationBackend


def model_hf_config(cfg: Config, checkpoint: str) -> dict:
    """model.hf_config when set, else the config.json that travels with the checkpoint."""
    if cfg.model.hf_config:
        return read_hf_config(cfg.model.hf_config)
    if (Path(checkpoint) / "config.json").is_file():
        return read_hf_config(checkpoint)
    raise ConfigError("model.hf_config", f"not set, and {checkpoint} holds no config.json")


def model_context(cfg: Config, checkpoint: str) -> int:
    """The positions the model is built with (model/megatron.py: max_position_embeddings, else 4096)."""
    from questa_nemo.ckpt.runs import resolve_checkpoint

    return int(model_hf_config(cfg, resolve_checkpoint(checkpoint)).get("max_position_embeddings", 4096))


def backend_for_checkpoint(cfg: Config, checkpoint: str, hf: dict | None = None) -> GenerationBackend:
    import torch

    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.ckpt.runs import resolve_checkpoint
    from questa_nemo.model.parallel import init_distributed
    from questa_nemo.rollout import RolloutContext, build_backend

    checkpoint = resolve_checkpoint(checkpoint)  # a run folder stands for its newest checkpoint
    hf = hf or model_hf_config(cfg, checkpoint)
    validate_model_shapes(cfg.model, hf)
    if not torch.distributed.is_initialized():
        init_distributed(cfg.model)
    chunks = load_chunks(cfg.model, hf, checkpoint)
    pad = hf.get("pad_token_id")
    ctx = RolloutContext(chunks, hf["vocab_size"], hf, model_folder(cfg, checkpoint), pad if isinstance(pad, int) else 0)
    return build_backend(cfg.rollout, ctx)


def model_folder(cfg: Config, checkpoint: str) -> str | None:
    """A Hugging Face folder of the model (what trtllm loads first): model.hf_config's, else the checkpoint's."""
    if cfg.model.hf_config:
        path = Path(cfg.model.hf_config)
        return str(path if path.is_dir() else path.parent)
    return checkpoint if (Path(checkpoint) / "config.json").is_file() else None
