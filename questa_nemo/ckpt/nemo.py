"""`.nemo` archives as NeMo's Megatron GPT tools (MegatronGPTModel + NLPSaveRestoreConnector) read them.

Layout, an uncompressed tar with members named `./...` as NeMo writes them:
- `model_config.yaml`: the MegatronGPTModel settings (`mcore_gpt: true`, architecture, RoPE, RMSNorm,
  fast-swiglu, tokenizer section, precision, parallel sizes, `dist_ckpt_format: torch_dist`).
- `model_weights/`: a megatron distributed checkpoint (torch_dist: `metadata.json`, `common.pt`, `.metadata`,
  `__*.distcp`) with NeMo's key names, `model.` + megatron's (`model.decoder.layers.self_attention...` with
  layers stacked, `model.embedding.word_embeddings.weight` unpadded), plus an empty `_extra_state` per
  Transformer Engine module, which NeMo's strict load asks for.
- tokenizer artifacts `<hash>_<file>` at the top, referenced as `nemo:<hash>_<file>` from the tokenizer section
  (NeMo's artifact convention): `vocab_file`/`merge_file` (BPE) or `model` (SentencePiece) for NeMo, and every
  other Hugging Face tokenizer file (tokenizer.json, tokenizer_config.json with the chat template, ...) so an
  import gets the whole tokenizer back.
- `hf_config.json` and `generation_config.json`: ours, ignored by NeMo; an import prefers them to rebuilding
  config.json from model_config.yaml (which it does for archives NeMo wrote).

What NeMo 1.x (nemo_toolkit <= 2.4.1) needs from model_config.yaml to restore the archive, beyond the
architecture (tests/test_nemo_restore_replay.py replays its reads, with the upstream file and line of each):
- an `optim` section (MegatronBaseModel reads `cfg.optim.get('name')` before anything else; we write the
  recipe's optimizer, AdamW without a schedule, which a NeMo fine-tune overrides anyway);
- `tokenizer.type`: NeMo hands it to `transformers.AutoTokenizer.from_pretrained`, so it must be a hub id or a
  tokenizer folder readable where NeMo runs. The archive's own tokenizer files cannot stand in for it (NeMo
  resolves `nemo:` references only for `model`, `vocab_file` and `merge_file`, and never reads a tokenizer.json
  from the archive). We record the hub id the source names (`_name_or_path`), else the absolute path of the
  source's tokenizer folder, else what `nemo.tokenizer_type=` says; on another machine, override it at restore
  (`override_config_path`) with a folder extracted from the archive's `<hash>_tokenizer*` artifacts;
- `precision` (bf16 / 16 / 32, the stored dtype), `transformer_engine: true` with an empty `_extra_state`
  per TE module (Transformer Engine's `set_extra_state(None)` is a no-op), `mcore_gpt: true`,
  `dist_ckpt_format`, batch sizes (NeMo divides them at construction) and the activation-checkpointing keys
  its generation path reads without defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from questa_nemo.atomic import atomic_path
from questa_nemo.ckpt import dist_layout
from questa_nemo.ckpt.hf import TOKENIZER_FILES, HFModel, tokenizer_files
from questa_nemo.model import nemo_io
from questa_nemo.model.convert import ModelShape

MODEL_CONFIG = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
HF_CONFIG = "hf_config.json"
GENERATION_CONFIG = "generation_config.json"
KEY_PREFIX = "model."  # NeMo's MegatronGPTModel holds the GPTModel as `self.model`
NEMO_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
_ARTIFACT = re.compile(r"^[0-9a-f]{32}_(.+)$")
_PRECISION = {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", what from_pretrained fetches from the hub
# NeMo's MegatronBaseModel reads cfg.optim at construction (the section must exist); a fine-tune in NeMo
# replaces it. AdamW is torch's (nemo/core/optim/optimizers.py registers it as "adamw"), no apex needed.
OPTIM = {"name": "adamw", "lr": 1e-6, "weight_decay": 0.01, "betas": [0.9, 0.999], "sched": None}


class NemoFormatError(ValueError):
    """The file is not a readable .nemo archive of a Megatron GPT model; the message names the file."""


def _vocab_divisor(vocab: int) -> int:
    """Largest power of two <= 128 dividing the vocabulary, so NeMo pads nothing at TP=1 (as its converters do)."""
    base = 128
    while vocab % base:
        base //= 2
    return base


def nemo_model_config(hf: dict, tokenizer: dict, dtype: torch.dtype, tp: int = 1, pp: int = 1) -> dict:
    """model_config.yaml contents for an HF Qwen2 / Llama / Mistral config.json."""
    from questa_nemo.model.megatron import rope_theta

    shape = ModelShape.from_hf(hf)
    seq = int(hf.get("max_position_embeddings", 4096))
    return {
        "target": NEMO_TARGET,
        "mcore_gpt": True,
        "transformer_engine": True,
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": seq,
        "max_position_embeddings": seq,
        "num_layers": shape.layers,
        "hidden_size": shape.hidden,
        "ffn_hidden_size": shape.ffn,
        "num_attention_heads": shape.heads,
        "num_query_groups": shape.groups,
        "kv_channels": shape.head_dim,
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "apply_query_key_layer_scaling": False,
        "normalization": "rmsnorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": _vocab_divisor(shape.vocab),
        "override_vocab_size": shape.vocab,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": False,
        "qkv_bias": shape.qkv_bias,  # the key NeMo's megatron_qwen2_config.yaml uses
        "add_qkv_bias": shape.qkv_bias,  # megatron's TransformerConfig name
        "activation": "fast-swiglu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "rotary_base": rope_theta(hf),
        "seq_len_interpolation_factor": None,
        "attention_type": "multihead",
        "share_embeddings_and_output_weights": shape.tied,
        "tokenizer": tokenizer,
        "precision": _PRECISION[dtype],
        "megatron_amp_O2": False,
        "fp8": False,
        "sequence_parallel": False,
        "use_cpu_initialization": False,
        "dist_ckpt_format": "torch_dist",
        "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None,
        "activations_checkpoint_num_layers": None,
        "activations_checkpoint_layers_per_pipeline": None,
        "optim": dict(OPTIM),
    }


def _artifact_name(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    return f"{digest}_{path.name}"


def tokenizer_type(model: HFModel, folder_persists: bool) -> str | None:
    """What NeMo's `tokenizer.type` should say for `model`: a hub id or a tokenizer folder, or None if unknown.

    The hub id the config names (`_name_or_path` as "org/name", not a path on this machine) is portable; else
    the tokenizer folder itself, when it outlives the export (`folder_persists`: an HF folder or a checkpoint
    of ours, not the temporary folder a .nemo or GGUF source is unpacked into).
    """
    name = str(model.config.get("_name_or_path") or "")
    if _HUB_ID.match(name) and not Path(name).exists():
        return name
    if folder_persists and model.tokenizer_dir is not None:
        return str(Path(model.tokenizer_dir).resolve())
    return name if name and Path(name).is_dir() else None


def _tokenizer_section(type_: str | None, artifacts: dict[str, str]) -> dict:
    """The tokenizer section NeMo's `get_nmt_tokenizer` reads; `artifacts` maps file name -> archive name."""

    def ref(name: str) -> str | None:
        return f"nemo:{artifacts[name]}" if name in artifacts else None

    return {
        "library": "huggingface",
        "type": type_,
        "model": ref("tokenizer.model"),
        "vocab_file": ref("vocab.json"),
        "merge_file": ref("merges.txt"),
        "delimiter": None,
        "use_fast": True,
        "sentencepiece_legacy": False,
    }


def write_nemo(
    model: HFModel,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    tp: int = 1,
    pp: int = 1,
    tokenizer_type: str | None = None,
) -> Path:
    """Write `model` as a .nemo archive at `out` (a temp sibling renamed when complete); returns `out`.

    tokenizer_type: NeMo's `tokenizer.type` (a hub id or a tokenizer folder; see `tokenizer_type()`).
    Holds the model once more in memory (as `dtype`) while the distributed checkpoint is written.
    """
    out = Path(out)
    shape = ModelShape.from_hf(model.config)
    with tempfile.TemporaryDirectory(prefix="questa-nemo-pack-") as staging:
        root = Path(staging)
        artifacts = {}
        for path in tokenizer_files(model.tokenizer_dir) if model.tokenizer_dir else []:
            artifacts[path.name] = _artifact_name(path)
            shutil.copyfile(path, root / artifacts[path.name])
        config = nemo_model_config(model.config, _tokenizer_section(tokenizer_type, artifacts), dtype, tp, pp)
        (root / MODEL_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (root / HF_CONFIG).write_text(json.dumps(model.config, indent=2, sort_keys=True))
        if model.generation_config:
            (root / GENERATION_CONFIG).write_text(
                json.dumps(model.generation_config, indent=2, sort_keys=True)
            )
        tensors = {name: model.tensors[name].to(dtype) for name in model.tensors}
        global_tensors = dist_layout.hf_to_global(tensors, shape, vocab_rows=shape.vocab)
        del tensors
        (root / WEIGHTS_DIR).mkdir()
        nemo_io.save_layer_stacked(
            root / WEIGHTS_DIR,
            tensors={KEY_PREFIX + k: t for k, t in global_tensors.whole.items()},
            layer_tensors={KEY_PREFIX + dist_layout.LAYERS + k: v for k, v in global_tensors.layers.items()},
            empty_layer_objects=[
                KEY_PREFIX + dist_layout.LAYERS + s for s in dist_layout.EXTRA_STATE_SUFFIXES
            ],
            num_layers=shape.layers,
        )
        del global_tensors
        with atomic_path(out) as tmp:
            with tarfile.open(tmp, "w:") as tar:  # uncompressed, as NeMo writes it
                tar.add(root, arcname=".")
    return out


def _unpack(path: Path, into: Path) -> None:
    """Extract a .nemo safely (no absolute or escaping member names), mapping tar errors to NemoFormatError."""
    if not path.is_file():
        raise NemoFormatError(f"{path}: no such file")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {m.name.removeprefix("./") for m in tar.getmembers()}
            if MODEL_CONFIG not in names:
                raise NemoFormatError(f"{path}: no {MODEL_CONFIG} in the archive (not a NeMo model)")
            if f"{WEIGHTS_DIR}/metadata.json" not in names:
                raise NemoFormatError(
                    f"{path}: no {WEIGHTS_DIR}/metadata.json (only distributed-checkpoint .nemo files are read)"
                )
            tar.extractall(into, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise NemoFormatError(f"{path}: not a readable .nemo archive (truncated or foreign): {e}") from None


def hf_config_from_nemo(cfg: dict, vocab: int) -> dict:
    """A Qwen2 / Llama config.json rebuilt from model_config.yaml (for archives without our hf_config.json)."""
    if not cfg.get("mcore_gpt"):
        raise NemoFormatError(f"{MODEL_CONFIG}: mcore_gpt is not true (legacy NeMo GPT layout is not read)")
    if str(cfg.get("normalization", "")).lower() != "rmsnorm" or cfg.get("activation") not in (
        "fast-swiglu",
        "swiglu",
    ):
        raise NemoFormatError(f"{MODEL_CONFIG}: only RMSNorm + SwiGLU models (Qwen2 / Llama) are read")
    heads = int(cfg["num_attention_heads"])
    qkv_bias = bool(cfg.get("qkv_bias", cfg.get("add_qkv_bias", False)))
    return {
        "model_type": "qwen2" if qkv_bias else "llama",
        "num_hidden_layers": int(cfg["num_layers"]),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["ffn_hidden_size"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_query_groups") or heads),
        "head_dim": int(cfg.get("kv_channels") or int(cfg["hidden_size"]) // heads),
        "vocab_size": vocab,
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length")),
        "rms_norm_eps": float(cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(cfg.get("rotary_base", 10000.0)),
        "tie_word_embeddings": bool(cfg.get("share_embeddings_and_output_weights", False)),
        "initializer_range": float(cfg.get("init_method_std", 0.02)),
        "hidden_act": "silu",
        "attention_bias": qkv_bias,
    }


@contextmanager
def open_nemo(path: str | Path) -> Iterator[HFModel]:
    """Unpack a .nemo into a temporary folder and yield it as an HFModel (tensors loaded, tokenizer folder)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="questa-nemo-unpack-") as staging:
        root = Path(staging)
        _unpack(path, root)
        try:
            cfg = yaml.safe_load((root / MODEL_CONFIG).read_text())
        except yaml.YAMLError as e:
            raise NemoFormatError(f"{path}: {MODEL_CONFIG} is not YAML: {e}") from None
        shapes = nemo_io.tensor_shapes(root / WEIGHTS_DIR)
        prefix = dist_layout.find_prefix(set(shapes))
        vocab = int(cfg.get("override_vocab_size") or shapes[prefix + dist_layout.EMBEDDING][0][0])
        rebuilt = hf_config_from_nemo(cfg, vocab)
        hf = json.loads((root / HF_CONFIG).read_text()) if (root / HF_CONFIG).is_file() else rebuilt
        _check_agrees(path, hf, rebuilt)
        source_type = (cfg.get("tokenizer") or {}).get("type")
        if source_type and not hf.get("_name_or_path"):
            hf = {**hf, "_name_or_path": source_type}  # where the tokenizer lives travels on (a re-export)
        shape = ModelShape.from_hf(hf)
        global_tensors = dist_layout.read_global(
            lambda keys: nemo_io.load_tensors(root / WEIGHTS_DIR, keys), set(shapes), shape
        )
        tokenizer_dir = root / "tokenizer"
        tokenizer_dir.mkdir()
        for member in root.iterdir():
            match = _ARTIFACT.match(member.name)
            if match and match.group(1) in TOKENIZER_FILES:
                shutil.copyfile(member, tokenizer_dir / match.group(1))
        gen_path = root / GENERATION_CONFIG
        yield HFModel(
            config=hf,
            tensors=dist_layout.global_to_hf(global_tensors, shape),
            tokenizer_dir=tokenizer_dir if tokenizer_files(tokenizer_dir) else None,
            generation_config=json.loads(gen_path.read_text()) if gen_path.is_file() else None,
        )


def _check_agrees(path: Path, hf: dict, rebuilt: dict) -> None:
    """Our hf_config.json must describe the same architecture as model_config.yaml (an edited archive fails)."""
    ours, theirs = ModelShape.from_hf(hf), ModelShape.from_hf(rebuilt)
    if ours != theirs:
        raise NemoFormatError(f"{path}: {HF_CONFIG} ({ours}) disagrees with {MODEL_CONFIG} ({theirs})")
