"""torchrun worker: SmolLM2's Megatron logits at TP=3 against transformers' (saved by tests/test_smollm2.py).

    torchrun --nproc-per-node 3 tests/dist/smollm2_worker.py --hf HF_DIR --expected EXPECTED.safetensors
Rank 0 writes EXPECTED.safetensors.json with the largest absolute logit difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from questa_nemo.config import ModelConfig
from questa_nemo.model.hf_io import HFCheckpoint
from questa_nemo.model.megatron import build_model, load_hf_weights
from questa_nemo.model.parallel import all_gather, destroy_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--expected", required=True)
    args = parser.parse_args()

    cfg = ModelConfig(params_dtype="fp32", recompute="none", attention="sdpa", tensor_parallel=3)
    init_distributed(cfg)
    from megatron.core import parallel_state as ps

    hf = json.loads((Path(args.hf) / "config.json").read_text())
    model = build_model(hf, cfg)
    load_hf_weights(model, HFCheckpoint(args.hf), hf, cfg)
    expected = load_file(args.expected)
    ids = expected["ids"]
    with torch.no_grad():
        local = model.eval()(ids, torch.arange(ids.size(1)).expand_as(ids), None)  # [b, s, V/3]
    logits = torch.cat(all_gather(local, ps.get_tensor_model_parallel_group()), dim=-1)[..., : hf["vocab_size"]]
    if torch.distributed.get_rank() == 0:
        diff = (logits - expected["logits"]).abs().max().item()
        Path(args.expected + ".json").write_text(json.dumps({"max_abs_diff": diff}))
    destroy_distributed()


if __name__ == "__main__":
    main()
