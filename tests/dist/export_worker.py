"""torchrun worker for the export tests: a tiny model on a TP / PP layout saves, or loads and checks, our checkpoint.

    torchrun --nproc-per-node 2 tests/dist/export_worker.py --hf SRC --tp 2 --save DIR
        build the model from the HF folder SRC, save it with `checkpoint.save_model_checkpoint` (model only)
    torchrun --nproc-per-node 2 tests/dist/export_worker.py --hf SRC --tp 2 --load DIR
        build the model, load DIR (written by `questa-nemo import`), require every tensor to equal SRC's
Exits non-zero (with the error on stderr) when anything differs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from questa_nemo.config import ModelConfig
from questa_nemo.model.checkpoint import load_model_checkpoint, save_model_checkpoint
from questa_nemo.model.convert import ModelShape, hf_to_megatron
from questa_nemo.model.hf_io import HFCheckpoint
from questa_nemo.model.megatron import build_model, load_hf_weights, shard_layout
from questa_nemo.model.parallel import destroy_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--save")
    parser.add_argument("--load")
    args = parser.parse_args()

    cfg = ModelConfig(
        params_dtype="fp32",
        recompute="none",
        attention="sdpa",
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
    )
    init_distributed(cfg)
    hf = json.loads((Path(args.hf) / "config.json").read_text())
    weights = HFCheckpoint(args.hf)
    model = build_model(hf, cfg)
    if args.save:
        load_hf_weights(model, weights, hf, cfg)
        save_model_checkpoint([model], args.save, hf_config=hf)
    if args.load:
        load_model_checkpoint([model], args.load)
        expected = hf_to_megatron(weights, ModelShape.from_hf(hf), shard_layout())
        actual = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if sorted(actual) != sorted(expected):
            raise SystemExit(f"names differ: {sorted(set(actual) ^ set(expected))[:5]}")
        for name, tensor in expected.items():
            if not torch.equal(actual[name], tensor):
                raise SystemExit(f"{name} differs after loading {args.load}")
    torch.distributed.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
