"""`questa-nemo export SRC OUT [format=hf|nemo|native] [key=value ...]` and `questa-nemo import SRC OUT ...`.

SRC may be any model we read: a Hugging Face folder, a .nemo archive, a GGUF file, or a checkpoint of ours
(a training step folder `<run_dir>/checkpoints/step_<N>/`, or what `import` wrote). OUT is written atomically
(a temporary sibling renamed at the end): a failed or interrupted run leaves no OUT behind.
`export` defaults to format=hf, `import` to format=native (our checkpoint); both read everything on CPU in
one process, so a training checkpoint exports without a GPU. Keys:

  format=hf|nemo|native       what to write
  dtype=auto|bf16|fp16|fp32   tensor dtype of OUT (auto: as stored in SRC)
  overwrite=true              replace an existing OUT (default: refuse)
  shard_gb=2                  largest safetensors shard (format=hf)
  model.hf_config=PATH        config.json of a checkpoint of ours that has none beside it
  model.tokenizer=PATH        tokenizer folder of such a checkpoint
  model.tensor_parallel=N     format=native: pad the vocabulary for N TP ranks; format=nemo: NeMo's TP size
  model.pipeline_parallel=N   format=nemo: NeMo's PP size
  nemo.tokenizer_type=NAME    format=nemo: NeMo's tokenizer.type, a hub id or a tokenizer folder where NeMo
                              runs (default: the hub id the source names, else the source's tokenizer folder)
"""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from questa_nemo.ckpt import gguf, native, nemo
from questa_nemo.ckpt.hf import HFModel, read_hf_folder, write_hf_folder
from questa_nemo.config import ConfigError

FORMATS = ("hf", "nemo", "native")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExportOptions:
    """The key=value settings of export / import (see the module docstring)."""

    format: str = "hf"
    dtype: str = "auto"
    overwrite: bool = False
    shard_gb: float = 2.0
    hf_config: str | None = None  # model.hf_config
    tokenizer: str | None = None  # model.tokenizer
    tensor_parallel: int = 1  # model.tensor_parallel
    pipeline_parallel: int = 1  # model.pipeline_parallel
    tokenizer_type: str | None = None  # nemo.tokenizer_type


_KEYS = {
    "format": "format",
    "dtype": "dtype",
    "overwrite": "overwrite",
    "shard_gb": "shard_gb",
    "model.hf_config": "hf_config",
    "model.tokenizer": "tokenizer",
    "model.tensor_parallel": "tensor_parallel",
    "model.pipeline_parallel": "pipeline_parallel",
    "nemo.tokenizer_type": "tokenizer_type",
}


def parse_options(overrides: list[str], default_format: str) -> ExportOptions:
    """key=value overrides -> ExportOptions; an unknown key or bad value raises ConfigError naming it."""
    options = ExportOptions(format=default_format)
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+")
        if key not in _KEYS:
            raise ConfigError(key, f"unknown key; export/import take {', '.join(_KEYS)}")
        field = _KEYS[key]
        current = getattr(options, field)
        try:
            if isinstance(current, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                parsed: object = value.lower() == "true"
            elif isinstance(current, int):
                parsed = int(value)
            elif isinstance(current, float):
                parsed = float(value)
            else:
                parsed = None if value.lower() in ("null", "none", "") else value
        except ValueError:
            raise ConfigError(key, f"{value!r} is not a valid {type(current).__name__}") from None
        setattr(options, field, parsed)
    if options.format not in FORMATS:
        raise ConfigError("format", f"{options.format!r} is not one of {', '.join(FORMATS)}")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise ConfigError("dtype", f"{options.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    for key in ("model.tensor_parallel", "model.pipeline_parallel"):
        if getattr(options, _KEYS[key]) < 1:
            raise ConfigError(key, "must be >= 1")
    return options


def source_kind(path: str | Path) -> str:
    """What SRC is: gguf, nemo, hf or native; raises FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if gguf.is_gguf(path):
            return "gguf"
        if path.suffix == ".nemo" or tarfile.is_tarfile(path):
            return "nemo"
        raise ValueError(f"{path}: neither a GGUF file nor a .nemo archive")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if native.model_dir(path) is not None:
        return "native"
    raise ValueError(
        f"{path}: not a Hugging Face folder (config.json + safetensors) nor a checkpoint of ours"
    )


@contextmanager
def open_model(path: str | Path, options: ExportOptions | None = None) -> Iterator[HFModel]:
    """Any model we read, as an HFModel, for the duration of the block (temporary files are removed after)."""
    options = options or ExportOptions()
    kind = source_kind(path)
    if kind == "gguf":
        with gguf.open_gguf(path) as model:
            yield model
    elif kind == "nemo":
        with nemo.open_nemo(path) as model:
            yield model
    elif kind == "hf":
        yield read_hf_folder(path)
    else:
        yield native.read_native(path, hf_config=options.hf_config, tokenizer=options.tokenizer)


def _source_dtype(model: HFModel) -> torch.dtype:
    first = next(iter(model.tensors))
    return model.tensors[first].dtype


def convert(src: str | Path, out: str | Path, options: ExportOptions) -> Path:
    """Read SRC, write OUT in `options.format`; returns OUT."""
    with open_model(src, options) as model:
        dtype = DTYPES[options.dtype] if options.dtype != "auto" else None
        if options.format == "hf":
            return write_hf_folder(
                model,
                out,
                dtype=dtype,
                max_shard_bytes=int(options.shard_gb * 2**30),
                overwrite=options.overwrite,
            )
        if options.format == "native":
            return native.write_native(
                model, out, tensor_parallel=options.tensor_parallel, dtype=dtype, overwrite=options.overwrite
            )
        if Path(out).exists() and not options.overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=true to replace it)")
        tokenizer_type = options.tokenizer_type or nemo.tokenizer_type(
            model, folder_persists=source_kind(src) in ("hf", "native")
        )
        if tokenizer_type is None:
            print(
                f"questa-nemo export: warning: {out}: tokenizer.type is empty (no hub id or lasting tokenizer "
                "folder in the source); NeMo's restore_from needs one: pass nemo.tokenizer_type=HUB_ID_OR_FOLDER",
                file=sys.stderr,
            )
        return nemo.write_nemo(
            model,
            out,
            dtype=dtype or _source_dtype(model),
            tp=options.tensor_parallel,
            pp=options.pipeline_parallel,
            tokenizer_type=tokenizer_type,
        )


def _run(command: str, positional: list[str], overrides: list[str], default_format: str) -> int:
    options = parse_options(overrides, default_format)
    if len(positional) != 2:
        print(
            f"usage: questa-nemo {command} SRC OUT [format=hf|nemo|native] [key=value ...]", file=sys.stderr
        )
        return 2
    src, out = positional
    try:
        written = convert(src, out, options)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        from questa_nemo.errors import one_line

        print(f"questa-nemo {command}: {one_line(e)}", file=sys.stderr)
        return 2  # an unusable SRC or an existing OUT: the user's input (cli.py's exit codes)
    print(f"questa-nemo {command}: wrote {written} ({options.format})")
    return 0


def main(config_name: str, overrides: list[str], positional: list[str]) -> int:
    """`questa-nemo export SRC OUT`: default format=hf. config_name is unused (no YAML is composed)."""
    return _run("export", positional, overrides, default_format="hf")


def import_main(config_name: str, overrides: list[str], positional: list[str]) -> int:
    """`questa-nemo import SRC OUT`: default format=native (our checkpoint)."""
    return _run("import", positional, overrides, default_format="native")
