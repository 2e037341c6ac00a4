"""Shared by the policy / checkpoint tests and their torchrun workers: a tiny Qwen2, a fixed batch, a loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from questa_nemo.config import ModelConfig, OptimConfig
from questa_nemo.model.packing import TokenSequence

# A tiny Qwen2: GQA (4 heads, 2 groups), q/k/v bias, untied head; 4 layers so PP=2 holds 2 per stage.
TINY_HF = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    num_hidden_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=96,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    torch_dtype="float32",
)
MICRO_BATCH_TOKENS = 48
OPTIM = OptimConfig(lr=1e-2, warmup_ratio=0.0, weight_decay=0.0, grad_clip=1.0, distributed=False)


def model_config(tp: int = 1, pp: int = 1, vp: int | None = None) -> ModelConfig:
    return ModelConfig(
        params_dtype="fp32",
        attention="sdpa",
        recompute="none",
        tensor_parallel=tp,
        pipeline_parallel=pp,
        virtual_pipeline=vp,
        seed=7,
    )


def hf_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised HF Qwen2 state dict (the common starting point of every layout)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in TINY_HF.items() if k != "architectures"}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fixed_sequences(seed: int = 0, count: int = 7) -> list[TokenSequence]:
    """Sequences of 5..24 tokens; the first 3 tokens are the prompt (out of the loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(5, 25, (1,), generator=g))
        mask = torch.ones(n)
        mask[:3] = 0
        out.append(
            TokenSequence(
                token_ids=torch.randint(0, TINY_HF["vocab_size"], (n,), generator=g),
                loss_mask=mask,
                advantages=torch.randn(n, generator=g),
                behaviour_logprobs=torch.zeros(n),
            )
        )
    return out


def nll_loss(
    logprobs: torch.Tensor, entropy: torch.Tensor, mb
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed negative log-likelihood of the loss tokens (lowers on a fixed batch)."""
    mask = mb.loss_mask.to(logprobs.device)
    return -(logprobs * mask).sum(), {"tokens": mask.sum(), "entropy_sum": (entropy * mask).sum()}


def nan_loss(logprobs, entropy, mb):
    loss, stats = nll_loss(logprobs, entropy, mb)
    return loss * float("nan"), stats


def write_hf_folder(folder: Path) -> Path:
    """config.json + model.safetensors of `hf_weights()`: what workers load (no transformers import there)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_HF))
    save_file({k: v.contiguous() for k, v in hf_weights().items()}, str(folder / "model.safetensors"))
    return folder


def build_policy(
    tp: int = 1,
    pp: int = 1,
    weights: dict[str, torch.Tensor] | Path | None = None,
    total_steps: int = 10,
    optim: OptimConfig = OPTIM,
    vp: int | None = None,
):
    """init_distributed + build_model + HF weights (a state dict or an HF folder) + MegatronPolicy."""
    from questa_nemo.model.checkpoint import load_hf_checkpoint
    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.parallel import init_distributed
    from questa_nemo.model.policy import MegatronPolicy

    cfg = model_config(tp, pp, vp)
    init_distributed(cfg)
    chunks = build_model(TINY_HF, cfg)
    chunks = chunks if isinstance(chunks, list) else [chunks]
    if isinstance(weights, Path):
        load_hf_checkpoint(chunks, weights, TINY_HF, cfg)
    else:
        from questa_nemo.model.megatron import load_hf_weights

        weights = weights if weights is not None else hf_weights()
        for vp_stage, chunk in enumerate(chunks):
            load_hf_weights(chunk, weights, TINY_HF, cfg, vp_stage=vp_stage if len(chunks) > 1 else None)
    return MegatronPolicy(
        chunks, cfg, optim, total_steps, MICRO_BATCH_TOKENS, vocab_size=TINY_HF["vocab_size"]
    )


# ------------------------------------------------------------------------------ test-side helpers
WORKER = Path(__file__).parent / "policy_worker.py"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc: int, *args: str, timeout: int = 120) -> None:
    """torchrun policy_worker.py with `nproc` processes; assert success, showing its output when not."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(WORKER), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "QUESTA_NCCL_STRICT": os.environ.get("QUESTA_NCCL_STRICT", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    """The chunks a worker wrote (one DP replica, every TP / PP rank) gathered into one HF state dict."""
    from safetensors.torch import load_file

    from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf

    shards = {}
    for meta in sorted(out.glob("rank*_chunk*.json")):
        layout = ShardLayout(**json.loads(meta.read_text()))
        shards[layout] = load_file(str(meta.with_suffix(".safetensors")))
    return megatron_to_hf(shards, ModelShape.from_hf(TINY_HF))
