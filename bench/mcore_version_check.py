"""One megatron-core version, end to end on the tiny world model (data/world/config.json), CPU or GPU.

Builds the GPTModel (our layer spec: SDPA attention, single-rank linears, fusions where they apply), runs three
training steps, saves a full checkpoint (model, optimizer, RNG) with dist_checkpointing, loads it into a freshly
built policy and checks that the weights match bit for bit and that the next step's loss is the same on both; then one step
under torch's checkpoint keeping attention must leave no autograd graph on any layer, and a checkpoint as our
.nemo holds must carry the `common.pt` older megatron-core (NeMo's) opens first.
Prints one line `PASS megatron-core X (...)` or `FAIL megatron-core X: <stage>: <error>` and, with --json,
writes {"version", "python", "torch", "status", "stage", "error", "seconds"}. Run by bench/megatron_versions.sh in
a venv per version; exit code 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sequences(vocab: int, count: int = 6, seed: int = 0):
    import torch

    from questa_nemo.model.packing import TokenSequence

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(8, 40, (1,), generator=g))
        mask = torch.ones(n)
        mask[:4] = 0
        out.append(TokenSequence(token_ids=torch.randint(0, vocab, (n,), generator=g), loss_mask=mask,
                                 advantages=torch.randn(n, generator=g), behaviour_logprobs=torch.zeros(n)))
    return out


def nll(logprobs, entropy, mb):
    mask = mb.loss_mask.to(logprobs.device)
    return -(logprobs * mask).sum(), {"tokens": mask.sum(), "entropy_sum": (entropy * mask).sum()}


def make_policy(hf, cfg, optim):
    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.policy import MegatronPolicy

    chunks = build_model(hf, cfg)
    return MegatronPolicy([chunks], cfg, optim, 10, 256, vocab_size=hf["vocab_size"])


def step(policy, seqs) -> float:
    tokens = sum(float(s.loss_mask.sum()) for s in seqs)
    out = policy.train_step(policy.pack(seqs), nll, tokens)
    return float(out["actor/loss"]) if isinstance(out, dict) and "actor/loss" in out else float("nan")


def weights(policy) -> dict:
    return {k: v.detach().cpu().clone() for k, v in policy.modules[0].state_dict().items()
            if not k.endswith("_extra_state")}


def run(stage: list[str]) -> str:
    import torch

    from questa_nemo.config import ModelConfig, OptimConfig
    from questa_nemo.model.checkpoint import load_checkpoint, save_checkpoint
    from questa_nemo.model.parallel import init_distributed

    hf = json.loads((ROOT / "data" / "world" / "config.json").read_text())
    cfg = ModelConfig(params_dtype="bf16" if torch.cuda.is_available() else "fp32", attention="sdpa",
                      recompute="none", seed=7)
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, grad_clip=1.0, distributed=False)
    stage[0] = "init"
    init_distributed(cfg)
    stage[0] = "build"
    policy = make_policy(hf, cfg, optim)
    stage[0] = "train"
    seqs = sequences(hf["vocab_size"])
    before = weights(policy)
    for _ in range(3):
        step(policy, seqs)
    after = weights(policy)
    if all(torch.equal(before[k], after[k]) for k in before):
        raise AssertionError("three training steps left every weight unchanged")
    with tempfile.TemporaryDirectory() as tmp:
        stage[0] = "save"
        save_checkpoint(policy, Path(tmp) / "ckpt", step=3, hf_config=hf)
        stage[0] = "load"
        fresh = make_policy(hf, cfg, optim)
        meta = load_checkpoint(fresh, Path(tmp) / "ckpt")
        loaded = weights(fresh)
        bad = [k for k in after if not torch.equal(after[k], loaded[k])]
        if bad or not meta.optimizer_restored:
            raise AssertionError(f"loaded weights differ ({bad[:3]}) or optimizer not restored")
        stage[0] = "resume"
        next_a, next_b = weights_after_step(policy, seqs), weights_after_step(fresh, seqs)
        diff = [k for k in next_a if not torch.equal(next_a[k], next_b[k])]
        if diff:
            raise AssertionError(f"the step after loading differs from the uninterrupted one: {diff[:3]}")
    stage[0] = "recompute"
    check_recompute_leaves_nothing(hf, optim, seqs)
    stage[0] = "nemo_common"
    check_nemo_weights_carry_common_pt()
    return (f"built {sum(v.numel() for v in after.values())} parameters, 3 steps, saved, loaded, resumed exactly,"
            " recompute left no graph, .nemo weights carry common.pt")


def graph_stashes(modules) -> list[str]:
    """Attributes of any submodule that hold a tensor with an autograd graph, directly or one object deep (as
    megatron-core 0.19's TransformerLayer.mlp_norm_manager holds its hidden states). After a training step there
    should be none: such a tensor keeps its whole graph, saved activations included, until it is replaced."""
    import torch

    found = []
    for chunk in modules:
        for name, module in chunk.named_modules():
            for attr, value in vars(module).items():
                if attr.startswith("_"):  # torch's own: _parameters, _buffers, _modules, hooks
                    continue
                inner = [(attr, value)]
                if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type)):
                    inner += [(f"{attr}.{k}", v) for k, v in vars(value).items()]
                found += [f"{name}.{a}" for a, v in inner if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    return found


def check_recompute_leaves_nothing(hf, optim, seqs) -> None:
    """One step under torch's checkpoint keeping attention (model.recompute_impl: torch): its early-stopped
    recompute must leave no graph on any layer (model/recompute.py `_drop_stash`)."""
    from questa_nemo.config import ModelConfig

    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="full", recompute_impl="torch",
                      recompute_keep_attention=True, seed=7)
    policy = make_policy(hf, cfg, optim)
    step(policy, seqs)
    stashed = graph_stashes(policy.modules)
    if stashed:
        raise AssertionError(f"after a step under torch's checkpoint these still hold a graph: {stashed[:4]}")


def check_nemo_weights_carry_common_pt() -> None:
    """The torch_dist checkpoint inside our .nemo must hold `common.pt`: megatron-core before 0.17 (NeMo 25.09
    ships 0.14) opens it first, and 0.17+ no longer writes it (model/nemo_io.py `write_legacy_common`)."""
    import torch

    from questa_nemo.model import nemo_io

    with tempfile.TemporaryDirectory() as tmp:
        nemo_io.save_layer_stacked(tmp, {"w": torch.arange(4.0)}, {"layers.x": [torch.ones(3), torch.zeros(3)]},
                                   num_layers=2)
        if not (Path(tmp) / nemo_io.COMMON_FILE).exists():
            raise AssertionError(f"no {nemo_io.COMMON_FILE} in the saved checkpoint: {sorted(Path(tmp).iterdir())}")
        back = nemo_io.load_tensors(tmp, ["w", "layers.x"])
        if not (torch.equal(back["w"], torch.arange(4.0)) and back["layers.x"].shape == (2, 3)):
            raise AssertionError("the checkpoint with common.pt does not read back the tensors saved")


def weights_after_step(policy, seqs) -> dict:
    step(policy, seqs)
    return weights(policy)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from importlib.metadata import version

    mcore = version("megatron-core")
    torch_v = version("torch")
    record = {"version": mcore, "python": platform.python_version(), "torch": torch_v}
    stage = ["import"]
    start = time.perf_counter()
    try:
        detail = run(stage)
        record.update(status="PASS", stage="done", error=None)
        line = f"PASS megatron-core {mcore} (Python {record['python']}, torch {torch_v}): {detail}"
    except Exception as e:  # the point is to report any failure as one line
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        record.update(status="FAIL", stage=stage[0], error=msg)
        line = f"FAIL megatron-core {mcore} (Python {record['python']}, torch {torch_v}): {stage[0]}: {msg}"
    record["seconds"] = round(time.perf_counter() - start, 1)
    print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if record["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
