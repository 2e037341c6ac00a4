"""Build this rank's model chunks and fill them from any checkpoint we read (HF folder, .nemo, GGUF, ours)."""

from __future__ import annotations

from questa_nemo.config import ModelConfig


def load_chunks(model_cfg: ModelConfig, hf: dict, source: str | None) -> list:
    """GPTModel chunks for this rank (a list: one per virtual pipeline stage), weights from `source` (None =
    random init). Only the tensors of this rank's shard are materialised from lazily-read sources."""
    from questa_nemo.ckpt.export import ExportOptions, open_model
    from questa_nemo.model.checkpoint import is_complete, load_model_checkpoint
    from questa_nemo.model.megatron import build_model, load_hf_weights

    built = build_model(hf, model_cfg)
    chunks = built if isinstance(built, list) else [built]
    if source is not None and is_complete(source):  # one of ours: load the shards directly, any TP / PP
        load_model_checkpoint(chunks, source)
    elif source is not None:
        options = ExportOptions(hf_config=model_cfg.hf_config)
        with open_model(source, options) as model:
            for vp_stage, chunk in enumerate(chunks):
                load_hf_weights(chunk, model.tensors, hf, model_cfg, vp_stage if len(chunks) > 1 else None)
    return chunks
