"""Training throughput of the policy model: our megatron-core GPTModel vs Hugging Face transformers.

One process, one device. Each run builds a randomly initialised model of the given shape (default: the
Qwen2.5-1.5B / OpenMath-Nemotron-1.5B shape), trains a few steps on one packed micro-batch of `seq` tokens
(a single sequence, causal) with the same loss and optimizer for both implementations, and records
tokens/s, MFU against the card's dense bf16 peak, and peak memory. Runs are written to a JSON file naming
the card.

Loss (both): -mean(advantage * log p(target)) with random +-1 advantages, a stand-in for the policy-gradient
loss. Our head is `chunked_logprobs` on the final hidden states (no full logits); transformers' head is its
own full logits followed by an fp32 log-softmax, as its causal-LM loss does. Optimizer (both): torch AdamW
(fused on CUDA) directly on the bf16 parameters.

A run is `SEQ/IMPL:key=value,...`, IMPL in {mcore, hf}; keys:
  recompute=none|full|selective  activation recompute (hf: none|full = gradient checkpointing per layer)
  layers=N                        mcore, recompute=full: recompute only the first N layers
  fusions=0|1                     mcore: fused RoPE and SwiGLU (model/fused.py; default 1)
  rope=megatron                   mcore, fusions=1: megatron's unfused RoPE instead of ours
  swiglu=megatron                 mcore, fusions=1: megatron's torch.compile'd SwiGLU instead of ours
  compile=0|1                     torch.compile every decoder layer (both impls)
  cgraph=1                        with compile=1: mode="reduce-overhead" (each compiled layer's forward and
                                  backward replayed as CUDA graphs, torch's cudagraph trees; a step marked as
                                  each micro-batch begins)
  newstuff=0|1                    mcore: 0 = the layers as before the Triton RMSNorm (torch's RMSNorm; default 1)
  vcontig=1                       mcore: attention's value made contiguous (it is a view into the fused qkv output)
  headmajor=1                     mcore: query, key and value copied head-major ([b, heads, s, d] storage) for SDPA
  ckpt=megatron|torch             mcore, recompute=full: megatron's reentrant checkpoint or torch's (model.recompute_impl)
  keepattn=0|1                    recompute=full: keep each layer's attention output instead of recomputing it
                                  (mcore: model.recompute_keep_attention, implies ckpt=torch; hf: the same policy)
  keepswiglu=1                    mcore, keepattn=1: also keep each layer's SwiGLU output through recompute
                                  (model.recompute_keep_swiglu)
  sdpa=auto|flash|cudnn|efficient SDPA backend for the run
  attn=fa4                        FlashAttention 4 (pip flash-attn-4) for attention: mcore model.attention=fa4,
                                  hf attn_implementation="flash_attention_4" (its own FA4 integration)
  fa4direct=0|1                   mcore, attn=fa4: 1 = dense forwards call FA4's compiled kernel directly after
                                  their first call (flash4.FAST_FORWARD; default 0, FA4's own path every call)
  chunk=N                         mcore: tokens per log-prob chunk (default: ModelConfig's)
  docs=N|r1                       mcore: pack N equal causal sequences into the micro-batch (THD, default 1);
                                  r1: the rows the GRPO trainer packs from NeMo-RL-shaped lengths, in turn
                                  (tok/s counts their sequences' tokens, not the row's padding)
  segplan=0|1                     mcore, docs>1: 0 = every layer reads the segments back from the GPU (a host
                                  sync per layer, as before model/attention.py kept one plan per micro-batch)
  varlen=0|1                      mcore, docs>1: 1 = packed attention in one call of torch's flash
                                  variable-length kernel (model.packed_attention=varlen); 0 (default) = sdpa
  accum=N                         N micro-batches (gradients accumulated) per optimizer step (default 1)
  optim=megatron                  mcore: the trainer's gradients and optimizer instead of torch AdamW on bf16
                                  weights (model/policy.py's MegatronPolicy: megatron DDP's fp32 main-grad
                                  buffer, megatron's distributed Adam on fp32 master weights, grad clip 1.0)
  lpk=compile|triton              mcore: the log-prob head's per-chunk kernels on CUDA (model/logprobs.py
                                  CUDA_KERNELS): compile (default: torch.compile'd torch) or triton (one
                                  read of the logits forward, 64-bit offsets)
  qkvrope=0|1                     mcore, fusions=1, unpacked rows: 1 = megatron's fused QKV split + RoPE path
                                  on our kernels (model/fused.py FUSED_QKV_ROPE); 0 (default) = the split path
  wgrad=0|1                       mcore, optim=megatron: 1 = weight gradients added into the fp32 main grad by
                                  the GEMM (model/linear.py WGRAD_INTO_MAIN_GRAD, the default); 0 = autograd's
                                  bf16 gradient, then DDP's add

GPU:  python bench/bench_train.py --device cuda --preset gpu --out bench/results/train_h200.json
      add --profile DIR for each run's kernel-time breakdown (one profiled step after the timed ones)
CPU smoke test (tiny shapes): python bench/bench_train.py --device cpu --tiny --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA initialises

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shapes import QWEN25_1P5B, TINY_QWEN2, drawn_lengths  # noqa: E402

QWEN25_15B = QWEN25_1P5B
TINY = {**TINY_QWEN2, "vocab_size": 1000}

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched on torch.cuda.get_device_name().
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0)]

PRESETS: dict[str, list[str]] = {
    "none": [],
    "gpu": [  # the README table: transformers and ours side by side, then what each of our parts is worth
        "8192/hf:recompute=none",
        "8192/mcore:recompute=none",
        "8192/hf:recompute=none,compile=1",
        "8192/mcore:recompute=none,fusions=0",
        "8192/mcore:recompute=none,rope=megatron",
        "8192/mcore:recompute=none,swiglu=megatron",
        "8192/mcore:recompute=none,chunk=4096",
        "8192/hf:recompute=none,accum=4",
        "8192/mcore:recompute=none,accum=4",
        "8192/hf:recompute=full",
        "8192/mcore:recompute=full",
        "8192/mcore:recompute=selective",
        "32768/hf:recompute=full",
        "32768/mcore:recompute=full",
        "32768/mcore:recompute=full,layers=20",
        "8192/mcore:recompute=none,docs=8",
    ],
    "trainspeed": [  # issue 21's training rows, before (newstuff=0: main's layers) and after, by priority
        "8192/hf:recompute=none,compile=1",
        "8192/mcore:recompute=none,newstuff=0",
        "8192/mcore:recompute=none",
        "32768/hf:recompute=full",
        "32768/mcore:recompute=full,newstuff=0",
        "32768/mcore:recompute=full",
        "32768/mcore:recompute=full,ckpt=torch",
        "32768/mcore:recompute=full,keepattn=1",
        "8192/mcore:recompute=none,compile=1",
    ],
    "trainspeed_extra": [  # a second call: compile without our RMSNorm, an attention layout, 32K fairness check
        "8192/hf:recompute=none,compile=1",
        "8192/mcore:recompute=none",
        "8192/mcore:recompute=none,vcontig=1",
        "8192/mcore:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1,newstuff=0",
        "32768/mcore:recompute=full,keepattn=1",
        "32768/hf:recompute=full,keepattn=1",  # the same attention-keeping policy for transformers
    ],
    "layout": [  # issue 21's 8K goal against compiled transformers: our attention 7% slower on the same cuDNN
        # kernels (profile_h100_compile), q / k / v strided views of the fused QKV; vcontig copies v contiguous
        "8192/hf:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1,vcontig=1",
    ],
    "long": [  # issue 21's 32K goal (full recompute, 1.25x transformers): recompute with attention kept
        "32768/hf:recompute=full",
        "32768/mcore:recompute=full",
        "32768/mcore:recompute=full,keepattn=1",
        "32768/hf:recompute=full,keepattn=1",
    ],
    "long_ckpt": [  # 32K full recompute by torch's checkpoint (as transformers' gradient checkpointing runs) and
        # what one forward saves for backward, by site with --saved-sites (docs/benchmarks.md (σ))
        "32768/hf:recompute=full",
        "32768/mcore:recompute=full",
        "32768/mcore:recompute=full,ckpt=torch",
        "32768/mcore:recompute=full,keepattn=1",
        "32768/hf:recompute=full,keepattn=1",
    ],
    "long_compile": [  # the 32K rows with every decoder layer compiled (the checkpoint, and with keepattn its
        # selective policy, inside the compiled region), each against transformers eager and compiled
        "32768/hf:recompute=full",
        "32768/mcore:recompute=full,keepattn=1,compile=1",
        "32768/hf:recompute=full,keepattn=1",
        "32768/mcore:recompute=full,keepattn=1,compile=1,headmajor=1",
        "32768/hf:recompute=full,keepattn=1,compile=1",
        "32768/hf:recompute=full,compile=1",
        "32768/mcore:recompute=full,keepattn=1",
        "32768/mcore:recompute=full,compile=1",
    ],
    "fa4": [  # FlashAttention 4 against cuDNN's SDPA, each side's strongest: 8K compiled; 32K full recompute
        # compiled on transformers' side (its stock and with our keep-attention policy), torch's checkpoint and
        # keeping attention on ours; with --clocks each row's SM clock and power
        "8192/hf:recompute=none,compile=1",
        "8192/hf:recompute=none,compile=1,attn=fa4",
        "8192/mcore:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1,attn=fa4",
        "32768/hf:recompute=full,compile=1",
        "32768/hf:recompute=full,compile=1,attn=fa4",
        "32768/hf:recompute=full,compile=1,keepattn=1",
        "32768/mcore:recompute=full,ckpt=torch,attn=fa4",
        "32768/mcore:recompute=full,keepattn=1,attn=fa4",
    ],
    "headmajor": [  # our SDPA inputs head-major, as transformers' are: the same cuDNN kernels ran 5% slower on ours
        "8192/hf:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1",
        "8192/mcore:recompute=none,compile=1,headmajor=1",
    ],
    "packed": [  # packed (THD) micro-batches: the varlen kernel / one plan (SDPA) / segments read back per layer
        "8192/mcore:recompute=none,docs=r1",
        "8192/mcore:recompute=none,docs=r1,varlen=1",
        "8192/mcore:recompute=none,docs=8",
        "8192/mcore:recompute=none,docs=8,varlen=1",
        "8192/mcore:recompute=none",
        "8192/mcore:recompute=none,docs=r1,segplan=0",
        "8192/mcore:recompute=none,docs=8,segplan=0",
    ],
    "tiny": [
        "64/hf:recompute=none",
        "64/mcore:recompute=none",
        "64/hf:recompute=full",
        "64/mcore:recompute=full",
        "64/mcore:recompute=selective",
        "64/mcore:recompute=full,layers=1,chunk=16",
        "64/mcore:recompute=none,docs=4",
        "64/mcore:recompute=full,keepattn=1",
        "64/mcore:recompute=full,ckpt=torch",
        "64/hf:recompute=full,keepattn=1",
        "64/mcore:recompute=none,newstuff=0,vcontig=1",
    ],
}


@dataclass
class Run:
    seq: int
    impl: str  # mcore | hf
    options: dict[str, str]
    status: str = "pending"  # ok | oom | error: ... | skipped: ...
    tokens_per_s: float | None = None  # from the mean step time
    tokens_per_s_median: float | None = None  # from the median step time (robust to one slow step)
    mfu: float | None = None
    step_s: list[float] = field(default_factory=list)
    host_ms: dict[str, float] = field(default_factory=dict)  # host time to issue each phase of one step
    peak_mem_gib: float | None = None
    saved_gib: float | None = None  # left allocated by one forward for its backward (activations, checkpoints)
    saved_sites: list = field(default_factory=list)  # --saved-sites: the largest of them by allocating frames
    build_s: float | None = None
    attended: int | None = None  # attention length of the MFU count (packed: token-weighted mean segment)
    real_fraction: float = 1.0  # share of the row's tokens that are sequences (docs=r1: the rest is padding)
    varlen: bool = False  # varlen=1 and the packed rows took the kernel (where it cannot run the row fails)
    clocks: dict = field(default_factory=dict)  # --clocks: SM clock, power and clock-limit reasons while timed
    syncs: list = field(default_factory=list)  # --sync-debug: host-synchronizing torch calls in one step, by site

    @property
    def label(self) -> str:
        return f"{self.seq}/{self.impl}:" + ",".join(f"{k}={v}" for k, v in self.options.items())


def parse_run(text: str) -> Run:
    seq, _, rest = text.partition("/")
    impl, _, opts = rest.partition(":")
    if impl not in ("mcore", "hf"):
        raise SystemExit(f"run {text!r}: implementation must be mcore or hf")
    options = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    known = {"fa4direct", "recompute", "layers", "fusions", "rope", "swiglu", "compile", "sdpa", "chunk", "docs", "accum",
             "newstuff", "keepattn", "vcontig", "headmajor", "ckpt", "segplan", "varlen", "attn", "optim",
             "wgrad", "cgraph", "lpk", "qkvrope", "keepswiglu"}  # fmt: skip
    if set(options) - known:
        raise SystemExit(f"run {text!r}: unknown keys {sorted(set(options) - known)}")
    if impl == "hf" and {"optim", "wgrad", "lpk", "qkvrope", "keepswiglu"} & set(options):
        raise SystemExit(f"run {text!r}: optim, wgrad, lpk, qkvrope and keepswiglu are ours (mcore) only")
    if options.get("lpk", "compile") not in ("triton", "compile"):
        raise SystemExit(f"run {text!r}: lpk must be compile or triton")
    return Run(int(seq), impl, options)


def cgraph(run: Run) -> bool:
    return run.options.get("cgraph") == "1"


def flops_per_token(hf: dict, seq: int) -> float:
    """Model FLOPs of one trained token (forward + backward, no recompute): 6 x matmul parameters (LM head
    included, embedding lookup not) + causal attention 6 x seq x (heads x head_dim) per layer, where seq is
    the length of the sequence the token attends within."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    head_dim = h // hf["num_attention_heads"]
    q_dim, kv_dim = hf["num_attention_heads"] * head_dim, hf["num_key_value_heads"] * head_dim
    per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * hf["intermediate_size"]
    matmul_params = layers * per_layer + h * hf["vocab_size"]
    return 6.0 * matmul_params + 6.0 * layers * seq * q_dim


def card_peak_tflops(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@contextlib.contextmanager
def sdpa_backend(name: str):
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(
        name, SDPBackend.EFFICIENT_ATTENTION
    )
    with sdpa_kernel([backend]):
        yield


# ------------------------------------------------------------------------------------------ models
def build_mcore(hf: dict, run: Run, device: str):
    """(model, step_loss(ids, targets, adv) -> loss) for our GPTModel."""
    from questa_nemo.config import ModelConfig
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight
    from questa_nemo.model.megatron import build_model, compile_layers
    from questa_nemo.model.policy import _packed_params

    recompute = run.options.get("recompute", "none")
    cfg = ModelConfig(
        params_dtype="bf16" if device == "cuda" else "fp32",
        attention="fa4" if run.options.get("attn") == "fa4" else "sdpa",
        recompute=recompute,
        recompute_num_layers=int(run.options["layers"]) if "layers" in run.options else None,
        fusions=run.options.get("fusions", "1") == "1",
        recompute_impl="torch" if run.options.get("keepattn") == "1" else run.options.get("ckpt", "megatron"),
        recompute_keep_attention=run.options.get("keepattn") == "1",
        recompute_keep_swiglu=run.options.get("keepswiglu") == "1",
        compile=run.options.get("compile") == "1" and not cgraph(run),  # model.compile: every decoder layer
        packed_attention="varlen" if run.options.get("varlen") == "1" else "sdpa",
    )
    from questa_nemo.model import fused

    fused.FUSED_QKV_ROPE = run.options.get("qkvrope", "0") == "1"  # set on every run (model/fused.py's default)
    model = build_model(hf, cfg)
    model.train()
    if run.options.get("compile") == "1" and cgraph(run):
        compile_layers(model, mode="reduce-overhead")  # what build_model does under model.compile, in CUDA graphs
    from questa_nemo.model import flash4

    flash4.FAST_FORWARD = run.options.get("fa4direct") == "1"  # set on every run (off: model/flash4.py's default)
    from questa_nemo.model import linear

    linear.WGRAD_INTO_MAIN_GRAD = run.options.get("wgrad", "1") == "1"  # set on every run (only DDP's weights)
    from questa_nemo.model import logprobs

    logprobs.CUDA_KERNELS = run.options.get("lpk", "compile")  # set on every run (model/logprobs.py's default)
    if run.options.get("newstuff") == "0":
        torch_norms(model)
    from questa_nemo.model import attention

    attention.plans_kept = 0 if run.options.get("segplan") == "0" else attention.PLANS_KEPT  # set on every run
    heads, dim = hf["num_attention_heads"], hf["hidden_size"] // hf["num_attention_heads"]
    probe = torch.empty(0, heads, dim, dtype=next(model.parameters()).dtype, device=device)  # as layers see q
    core = model.decoder.layers[0].self_attention.core_attention  # VarlenCoreAttention with varlen=1
    plan = attention.segment_plan([0], [1], torch.device(device))
    run.varlen = attention.attention_path(probe, plan, varlen=core.varlen) == "varlen"
    for option, relay in ATTENTION_INPUT_LAYOUTS.items():
        if run.options.get(option) == "1":
            for layer in model.decoder.layers:
                core = layer.self_attention.core_attention
                core.forward = relaid_inputs(core.forward, relay)
    if run.options.get("rope") == "megatron":
        model.config.apply_rope_fusion = False
    if run.options.get("swiglu") == "megatron":  # megatron's own fusion, as built without ours
        model.config.use_te_activation_func, model.config.bias_activation_fusion = False, True
        for layer in model.decoder.layers:
            del layer.mlp.activation_func
            layer.mlp.activation_func = torch.nn.functional.silu
    chunk = int(run.options.get("chunk", cfg.logprob_chunk_tokens))
    rows = packed_rows(run)  # the packed micro-batches a run cycles through; none for one unpacked row
    unpacked = torch.arange(run.seq, device=device)[None]
    calls = iter(range(10**9))

    def loss_fn(ids: torch.Tensor, targets: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        packed, positions = None, unpacked
        if rows:  # what the policy does for each micro-batch: its THD params (and attention plan), positions
            mb = rows[next(calls) % len(rows)]
            packed, positions = _packed_params(mb, torch.device(device)), mb.position_ids.to(device)
        hidden = final_hidden_states(model, ids, positions, packed_seq_params=packed)  # [s, 1, h]
        out = chunked_logprobs(
            hidden, output_weight(model), targets.t(), vocab_size=hf["vocab_size"], chunk_tokens=chunk
        )
        return -(out.logprobs * adv.t()).mean()

    return model, loss_fn


def packed_rows(run: Run) -> list:
    """The packed micro-batches a run cycles through (model/packing.py's, as the trainer packs them; every row
    `run.seq` tokens, the length of the benchmark's ids): none for docs=1 (one unpacked row), one row of N equal
    causal sequences for docs=N, or for docs=r1 the rows the GRPO trainer packs (first-fit decreasing under the
    row's tokens) from 256 sequences of NeMo-RL-shaped lengths (prompt 150-400 + R1-like completion, mean ~1.3K,
    at most 4K: bench_grpo_nemorl's; scaled by seq / 8192), those at least 95% full. Sets run.attended and
    run.real_fraction from their sequences."""
    from questa_nemo.model.packing import TokenSequence, pack

    docs = run.options.get("docs", "1")
    if docs == "1":
        return []
    if docs == "r1":
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(150, 401, (256,), generator=g).tolist()
        completions = drawn_lengths(256, 1100.0, 1.0, 4096 - 400, seed=0)
        scale = run.seq / 8192  # the same layouts in miniature at smoke-test lengths
        lengths = [max(1, min(round((p + c) * scale), run.seq)) for p, c in zip(prompts, completions)]
    else:
        lengths = [run.seq // int(docs)] * (int(docs) - 1) + [run.seq - run.seq // int(docs) * (int(docs) - 1)]
    zeros = [torch.zeros(n) for n in lengths]
    sequences = [TokenSequence(torch.zeros(n, dtype=torch.long), z, z, z) for n, z in zip(lengths, zeros)]
    # pad_multiple = seq: every row exactly seq long (no bin holds more), as the benchmark's ids are
    rows = [mb for mb in pack(sequences, run.seq, pad_multiple=run.seq) if mb.num_real_tokens >= 0.95 * run.seq]
    tokens = [lengths[i] for mb in rows for i in mb.sequence_ids]
    run.attended = round(sum(n * n for n in tokens) / sum(tokens))
    run.real_fraction = sum(tokens) / (run.seq * len(rows))
    return rows


def torch_norms(model) -> None:
    """Swap our Triton RMSNorm submodules back to torch.nn.RMSNorm (same weights): the layers as before."""
    from questa_nemo.model import fused

    for layer in model.decoder.layers:
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            ours = getattr(layer, name)
            if isinstance(ours, fused.RMSNorm):
                norm = torch.nn.RMSNorm(ours.weight.numel(), eps=ours.eps)
                norm.to(device=ours.weight.device, dtype=ours.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(ours.weight)
                setattr(layer, name, norm)


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, d] copied to [b, heads, s, d] storage (seen as [s, b, heads, d]): every head's rows back
    to back, as transformers' layout hands them to SDPA, instead of a token's heads back to back."""
    return x.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)


# run option -> how core attention's (query, key, value) are laid out before it sees them
ATTENTION_INPUT_LAYOUTS = {
    "vcontig": lambda q, k, v: (q, k, v.contiguous()),
    "headmajor": lambda q, k, v: (_head_major(q), _head_major(k), _head_major(v)),
}


def relaid_inputs(forward, relay):
    def wrapped(query, key, value, *args, **kwargs):
        return forward(*relay(query, key, value), *args, **kwargs)

    return wrapped


def build_hf(hf: dict, run: Run, device: str):
    """(model, step_loss) for transformers' Qwen2ForCausalLM with SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in hf.items() if k != "model_type"}
    config = Qwen2Config(**fields, use_cache=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        implementation = "flash_attention_4" if run.options.get("attn") == "fa4" else "sdpa"
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation=implementation)
    model.train()
    recompute = run.options.get("recompute", "none")
    if recompute == "full":
        kwargs: dict = {"use_reentrant": False}
        if run.options.get("keepattn") == "1":
            from questa_nemo.model.recompute import keep_attention_contexts

            kwargs["context_fn"] = keep_attention_contexts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif recompute != "none":
        raise SystemExit(f"run {run.label}: transformers has recompute none or full only")
    if run.options.get("compile") == "1":
        # transformers' FlashAttention-4 wrapper guards on each layer's integer layer_idx: at torch's default of 8
        # recompiles, layers 9-28 would run that wrapper uncompiled (a weaker baseline than a user would get)
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 2 * len(model.model.layers)))
        for layer in model.model.layers:
            layer.compile(mode="reduce-overhead" if cgraph(run) else "default")

    def loss_fn(ids: torch.Tensor, targets: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits  # [1, s, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        return -(logprobs * adv).mean()

    return model, loss_fn


# ------------------------------------------------------------------------------------------ profile
KERNEL_KINDS = [  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("compiled", ("triton",)),
    ("copy", ("copy", "cat", "memcpy", "memset", "fill")),
    ("reduce", ("reduce", "softmax", "norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_step(step, label: str, out_dir: Path) -> dict:
    """One step under torch.profiler: GPU time per kernel kind and the top kernels, written to out_dir."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)  # CPU (smoke tests): host ops only, no kernels
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        step()
        sync()
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.events()
    # GPU-side copies of record_function ranges (e.g. Optimizer.step) are annotations, not kernels
    kernels = [
        e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    kernels.sort(key=lambda e: e.time_range.start)
    gaps = []  # GPU idle between consecutive kernels: (us, at ms from the first kernel, after, before, span)
    first = kernels[0].time_range.start if kernels else 0
    busy_until = kernels[0].time_range.end if kernels else 0
    for prev, e in zip(kernels, kernels[1:]):
        if e.time_range.start - busy_until > 20:
            span = (busy_until, e.time_range.start)
            gaps.append((e.time_range.start - busy_until, (busy_until - first) / 1e3, prev.name, e.name, span))
        busy_until = max(busy_until, e.time_range.end)
    host = [e for e in events if e.device_type == DeviceType.CPU]

    def host_during(span) -> list[str]:
        """The host ops that overlapped a GPU gap most (what the host was doing while the GPU waited)."""
        lo, hi = span
        overlaps: dict[str, float] = {}
        for e in host:
            covered = min(hi, e.time_range.end) - max(lo, e.time_range.start)
            if covered > 5:
                overlaps[e.name] = max(overlaps.get(e.name, 0.0), covered)
        return [f"{n[:70]} {us:.0f}us" for n, us in sorted(overlaps.items(), key=lambda kv: -kv[1])[:8]]

    host_ops: dict[str, list] = {}  # host self time per op name: [calls, ms]
    for e in host:
        entry = host_ops.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.self_cpu_time_total / 1e3
    # CUDA runtime calls that can hold the host until the GPU drains (the host then launches into an empty queue);
    # cudaMemcpyAsync blocks only for copies to or from pageable memory
    blocking = ("ynchronize", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaHostAlloc", "cuMemAlloc", "cuMemFree",
                "cuMemMap", "cuMemCreate", "cuModuleLoad", "cuLibraryLoad")  # fmt: skip
    host_blocking = {n: v for n, v in host_ops.items() if any(b in n for b in blocking)}
    gaps_before: dict[str, list] = {}  # GPU gaps over 50 us by the kernel that ended them: [count, ms]
    for g, _, _, before, _ in gaps:
        if g > 50:
            entry = gaps_before.setdefault(before[:80], [0, 0.0])
            entry[0] += 1
            entry[1] += g / 1e3
    span_ms = (busy_until - first) / 1e3
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time / 1e3
        entry = by_name.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]
    summary = {
        "wall_ms": wall_ms,
        "gpu_busy_ms": sum(by_kind.values()),
        "kernels": len(kernels),
        "gpu_span_ms": span_ms,
        "gpu_idle_ms": sum(g[0] for g in gaps) / 1e3,
        "largest_gaps": [
            {"us": g, "at_ms": at, "after": a[:100], "before": b[:100], "host_during": host_during(span)}
            for g, at, a, b, span in sorted(gaps, key=lambda gap: -gap[0])[:15]
        ],
        "host_blocking_calls": {n: {"calls": c, "self_ms": ms} for n, (c, ms) in sorted(host_blocking.items())},
        "gaps_over_50us_by_next_kernel": [
            {"before": n, "gaps": c, "ms": ms} for n, (c, ms) in sorted(gaps_before.items(), key=lambda kv: -kv[1][1])[:15]
        ],
        "host_self_ms_top": [
            {"name": n[:120], "calls": c, "self_ms": ms}
            for n, (c, ms) in sorted(host_ops.items(), key=lambda kv: -kv[1][1])[:40]
        ],
        "ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {"name": n[:160], "calls": c, "ms": ms, "kind": kernel_kind(n)} for n, (c, ms) in top
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = label.replace("/", "_").replace(":", "_").replace(",", "_").replace("=", "-")
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary


class TrainerOptimizer:
    """optim=megatron: the trainer's gradient path and update behind torch's step / zero_grad. The model goes
    into MegatronPolicy (megatron DDP, fp32 main grads; megatron's Adam on fp32 master weights, the recipe's
    betas, weight decay and clip); step() is what the policy's train step does after the backward passes at
    DP = 1: DDP's gradient sync, then its `apply_gradients` (the gradients into the fp32 master weights, their
    norm, the finite check, our clip, megatron's update and the bf16 weights copied back)."""

    def __init__(self, model, hf: dict):
        from questa_nemo.config import ModelConfig, OptimConfig
        from questa_nemo.model.policy import MegatronPolicy

        self.policy = MegatronPolicy(
            [model], ModelConfig(), OptimConfig(lr=1e-6, warmup_ratio=0.0), total_steps=10**6,
            micro_batch_tokens=0, vocab_size=hf["vocab_size"],
        )  # fmt: skip

    def step(self) -> None:
        for chunk in self.policy.model_chunks:
            chunk.finish_grad_sync()
        self.policy.apply_gradients(loss=0.0)  # the step's loss is finite (measure() checks it)

    def zero_grad(self, set_to_none: bool = True) -> None:  # megatron's optimizer sets them to None
        self.policy.zero_grads()


def train_step(forward, optimizer, accum: int, marks: dict[str, float] | None = None) -> torch.Tensor:
    """`accum` forward + backward passes, then one optimizer step; returns the last loss. With `marks`, adds
    the host time each phase took to issue (seconds) under "forward", "backward" and "optimizer"."""

    def lap(phase: str, since: float) -> None:
        if marks is not None:
            marks[phase] = marks.get(phase, 0.0) + time.perf_counter() - since

    for _ in range(accum):
        t = time.perf_counter()
        loss = forward()
        lap("forward", t)
        t = time.perf_counter()
        loss.backward()
        lap("backward", t)
    t = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer", t)
    return loss


SITE_CODE = ("questa_nemo", "megatron", "transformers", "checkpoint.py", "bench_train", "ckpt_leftovers")


def frame_site(frames: list[dict], depth: int = 3) -> str:
    """Where torch's memory history says a block was allocated or freed: its innermost `depth` frames in repo,
    megatron, transformers or torch.utils.checkpoint code, else its innermost frame."""
    named = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
             if any(k in f["filename"] for k in SITE_CODE)][:depth]
    if named or not frames:
        return " < ".join(named) or "?"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']}"


def largest_sites(sized, limit: int) -> list[tuple[object, int, int]]:
    """(site, bytes, blocks) of the `limit` sites holding the most bytes, from (site, block size) pairs."""
    by_site: dict = {}
    for site, size in sized:
        entry = by_site.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    return [(k, v[0], v[1]) for k, v in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:limit]]


def alive_sites(snap: dict, limit: int = 10) -> list[dict]:
    """The largest allocation sites (`frame_site`) among the live blocks of a torch.cuda.memory._snapshot()
    taken with memory history on (blocks without frames were allocated before recording and are left out)."""
    live = ((frame_site(block["frames"]), block["size"]) for segment in snap["segments"]
            for block in segment["blocks"] if block["state"] == "active_allocated" and block.get("frames"))
    return [{"site": site, "gib": size / 2**30, "blocks": n} for site, size, n in largest_sites(live, limit)]


def forward_saved(forward, sites: bool) -> tuple[float, list]:
    """GiB one forward leaves allocated for its backward (saved activations, checkpoint inputs, kept outputs),
    the loss's graph dropped unused after; with `sites`, the 10 largest allocation sites among them (innermost
    Python frames of repo, megatron, transformers or torch.utils.checkpoint code) from torch's memory history."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    if sites:
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=10**6)
    loss = forward()
    torch.cuda.synchronize()
    saved = (torch.cuda.memory_allocated() - before) / 2**30
    top: list = []
    if sites:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        top = alive_sites(snap)
    del loss  # frees the graph and what it saved
    return saved, top


def synchronizing_sites(step, limit: int = 12) -> list[dict]:
    """The calls in one step that make the host wait for the GPU (torch's sync debug mode, warn), by the
    innermost frames of our, megatron's, transformers' or flash-attn's code that made them, with counts. A
    sync inside a step empties the launch queue: the GPU then idles while the host launches the next kernels.
    It sees torch's own synchronizing calls only (not another library's, nor the allocator's), and one made by
    a backward function is reported at `loss.backward()`."""
    import traceback
    import warnings

    sites: dict[str, int] = {}
    code = ("questa_nemo", "megatron", "transformers", "flash_attn", "bench_train")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # other warnings of the step (the debug mode's own notice)
            return
        frames = [f for f in traceback.extract_stack()[:-1] if any(c in f.filename for c in code)][-3:]
        site = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        key = f"{str(message)[:60]} @ {site or f'{filename}:{lineno}'}"
        sites[key] = sites.get(key, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    torch.cuda.synchronize()
    return [{"site": k, "calls": n} for k, n in sorted(sites.items(), key=lambda kv: -kv[1])[:limit]]


def host_timing(forward, optimizer, accum: int) -> dict[str, float]:
    """When the host finished issuing forward, backward and the optimizer step, and when the GPU finished
    (ms from the step's start). A step whose GPU finishes right after the host is bound by the host."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    marks: dict[str, float] = {}
    train_step(forward, optimizer, accum, marks)
    marks["host_done"] = time.perf_counter() - start
    torch.cuda.synchronize()
    marks["gpu_done"] = time.perf_counter() - start
    return {k: v * 1e3 for k, v in marks.items()}


# ------------------------------------------------------------------------------------------ runner
def measure(
    run: Run,
    hf: dict,
    device: str,
    steps: int,
    warmup: int,
    peak: float | None,
    profile_dir: Path | None = None,
    saved_sites: bool = False,
    clocks: bool = False,
    sync_debug: bool = False,
) -> None:
    built_at = time.perf_counter()
    model, loss_fn = (build_mcore if run.impl == "mcore" else build_hf)(hf, run, device)
    if run.options.get("optim") == "megatron":
        optimizer = TrainerOptimizer(model, hf)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.05, fused=device == "cuda"
        )
    run.build_s = time.perf_counter() - built_at
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (1, run.seq), device=device, generator=g)
    targets = ids.roll(-1, dims=1)
    adv = torch.randint(0, 2, (1, run.seq), device=device, generator=g).float() * 2 - 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    accum = int(run.options.get("accum", 1))

    def forward() -> torch.Tensor:
        if cgraph(run):  # the previous micro-batch's graph outputs are dead: its backward ran
            torch.compiler.cudagraph_mark_step_begin()
        return loss_fn(ids, targets, adv)

    def step_once() -> torch.Tensor:
        return train_step(forward, optimizer, accum)

    with sdpa_backend(run.options.get("sdpa", "auto")):
        sampler = None
        for step in range(warmup + steps):
            if step == warmup and clocks and device == "cuda":
                sampler = ClockSampler()
            start = time.perf_counter()
            loss = step_once()
            if device == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()}")
            if step >= warmup:
                run.step_s.append(time.perf_counter() - start)
        if sampler is not None:
            run.clocks = sampler.stop()
        if device == "cuda" and sync_debug:
            run.syncs = synchronizing_sites(step_once)
        if device == "cuda":
            run.host_ms = host_timing(forward, optimizer, accum)
            try:  # a diagnostic: its failure must not cost the run its throughput
                run.saved_gib, run.saved_sites = forward_saved(forward, saved_sites)
            except Exception as e:  # noqa: BLE001
                torch.cuda.memory._record_memory_history(enabled=None)
                run.saved_sites = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
        if profile_dir is not None and device == "cuda":
            summary = profile_step(step_once, run.label, profile_dir)
            kinds = "  ".join(f"{k} {v:.1f}" for k, v in summary["ms_by_kind"].items())
            print(
                f"  profile {run.label}: wall {summary['wall_ms']:.1f} ms, GPU {summary['gpu_busy_ms']:.1f} ms"
                f" (idle {summary['gpu_idle_ms']:.1f} ms in {summary['gpu_span_ms']:.1f}): {kinds}"
            )
    mean_step = sum(run.step_s) / len(run.step_s)
    real = accum * run.seq * run.real_fraction  # tokens of sequences a step (padding not counted)
    run.tokens_per_s = real / mean_step
    run.tokens_per_s_median = real / sorted(run.step_s)[len(run.step_s) // 2]
    if peak is not None:
        run.mfu = run.tokens_per_s * flops_per_token(hf, run.attended or run.seq) / (peak * 1e12)
    if device == "cuda":
        run.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    run.status = "ok"


class ClockSampler:
    """The GPU's SM clock, power draw and clock-limit reasons (NVML, every `period` s on a thread) until
    `stop()`, which returns their means and the share of samples under each limit reason. The same kernels run
    slower where a step holds the card at its power limit at a lower clock; this says whether a row did."""

    REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40,
               "hw_power_brake": 0x80}  # fmt: skip  (nvmlClocksEventReason*; NVML's bit values)

    def __init__(self, period: float = 0.01):
        import threading

        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples: list[tuple[int, float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self.thread.start()

    def _run(self, period: float) -> None:
        nv, h = self.nvml, self.handle
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self.done.wait(period):
            self.samples.append(
                (nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), nv.nvmlDeviceGetPowerUsage(h) / 1000, reasons(h))
            )

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        limit = self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000
        self.nvml.nvmlShutdown()  # each row's nvmlInit is matched (NVML counts them)
        return clock_summary(self.samples, limit)


def clock_summary(samples: list[tuple[int, float, int]], power_limit_w: float) -> dict:
    """(SM MHz, W, clock-limit reason bits) samples -> means, the lowest clock and each reason's share."""
    n = len(samples)
    if not n:
        return {}
    out = {
        "samples": n,
        "sm_mhz_mean": sum(c for c, _, _ in samples) / n,
        "sm_mhz_min": min(c for c, _, _ in samples),
        "power_w_mean": sum(p for _, p, _ in samples) / n,
        "power_limit_w": power_limit_w,
    }
    for name, bit in ClockSampler.REASONS.items():
        out[f"share_{name}"] = sum(1 for _, _, r in samples if r & bit) / n
    return out


def check_fused_kernels(device: str) -> dict:
    """Max |difference| of our GPU kernels (Triton SwiGLU, RoPE, RMSNorm) from the reference maths, bf16."""
    if device != "cuda":
        return {}
    from megatron.core.models.common.embeddings import rope_utils

    from questa_nemo.model import fused

    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(4096, 2 * 8960, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    up = torch.randn(4096, 8960, device="cuda", dtype=torch.bfloat16, generator=g)
    outs, grads = [], []
    for fn in (fused.SwiGLU(), fused.swiglu_reference):  # Triton kernels, eager fp32 autograd
        outs.append(fn(y))
        grads.append(torch.autograd.grad(outs[-1], y, up)[0])
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    angles = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :]
    # megatron's query (contiguous) and key (a view into the fused qkv projection): ours vs fp32 unfused
    mixed = torch.randn(8192, 1, 2, 8 * 128, device="cuda", dtype=torch.bfloat16, generator=g)
    rope = {}
    for name, t in (("query", torch.randn(8192, 1, 12, 128, device="cuda", dtype=torch.bfloat16)),
                    ("key", mixed[..., 6 * 128 : 7 * 128])):  # fmt: skip
        t = t.detach().requires_grad_()
        up = torch.randn(t.shape, device="cuda", dtype=torch.bfloat16, generator=g)
        ours = fused.fused_rope_sbhd(t, freqs)
        (grad_ours,) = torch.autograd.grad(ours, t, up)
        ref_in = t.detach().float().requires_grad_()
        ref = rope_utils._apply_rotary_pos_emb_bshd(ref_in, freqs)
        (grad_ref,) = torch.autograd.grad(ref, ref_in, up.float())
        rope[f"rope_{name}_max_abs_diff"] = (ours.float() - ref).abs().max().item()
        rope[f"rope_{name}_grad_max_abs_diff"] = (grad_ours.float() - grad_ref).abs().max().item()
    rope["rope_megatron_bf16_max_abs_diff"] = (
        (rope_utils._apply_rotary_pos_emb_bshd(t.detach(), freqs).float() - ref).abs().max().item()
    )
    cu = torch.tensor([0, 3000, 8192], device="cuda", dtype=torch.int32)
    packed = torch.randn(8192, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    thd_ref = rope_utils._apply_rotary_pos_emb_thd(
        packed.float(), cu, freqs[:5192], cp_group=torch.distributed.group.WORLD
    )
    rope["rope_thd_max_abs_diff"] = (
        (fused.fused_rope_thd(packed, cu, freqs[:5192]).float() - thd_ref).abs().max().item()
    )
    try:  # the fused QKV split + RoPE (megatron's fused_single_qkv_rope path) vs the fp32 split path
        rope.update(check_qkv_rope(mixed, freqs, g))
    except Exception as e:  # noqa: BLE001
        rope["qkv_rope_check_error"] = repr(e)[:300]
    # RMSNorm at the model's shape: ours (Triton) and torch's (the layers before) vs the fp32 reference
    x = (torch.randn(8192, 1536, device="cuda", generator=g) * 4).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(1536, device="cuda", generator=g)).bfloat16().requires_grad_()
    g_norm = torch.randn(8192, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    norm_ref = fused.rmsnorm_reference(x32, w32, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(norm_ref, (x32, w32), g_norm.float())
    norms = {"ours": lambda: fused._RMSNormFunction.apply(x, w, 1e-6),
             "torch": lambda: torch.nn.functional.rms_norm(x, (1536,), w, 1e-6)}  # fmt: skip
    for name, norm in norms.items():
        normed = norm()
        dx, dw = torch.autograd.grad(normed, (x, w), g_norm)
        rope[f"rmsnorm_{name}_max_abs_diff"] = (normed.float() - norm_ref).abs().max().item()
        rope[f"rmsnorm_{name}_dx_max_abs_diff"] = (dx.float() - dx_ref).abs().max().item()
        rope[f"rmsnorm_{name}_dw_max_rel_diff"] = ((dw.float() - dw_ref).abs().max() / dw_ref.abs().max()).item()
    rope.update(check_varlen(g))
    rope.update(check_wgrad(g))
    try:  # a failing check is a result to read, not a lost run
        rope.update(check_logprob_head(g))
    except Exception as e:  # noqa: BLE001
        rope["logprob_check_error"] = repr(e)[:300]
    return {
        "swiglu_forward_max_abs_diff": (outs[0] - outs[1]).abs().max().item(),
        "swiglu_backward_max_abs_diff": (grads[0] - grads[1]).abs().max().item(),
        **rope,
    }


def check_wgrad(g: torch.Generator) -> dict:
    """model/linear.py's weight gradient added into an fp32 main_grad (the MLP's down projection at 8K tokens,
    two micro-batches) against float64, beside what DDP's hook does without it (a bf16 product, then the add)."""
    from questa_nemo.model import linear

    grad_output = torch.randn(2, 8192, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    input_ = torch.randn(2, 8192, 8960, device="cuda", dtype=torch.bfloat16, generator=g)
    fused, hook = (torch.zeros(1536, 8960, device="cuda") for _ in range(2))
    for mb in range(2):
        linear.add_weight_grad(fused, grad_output[mb], input_[mb])
        hook.add_(grad_output[mb].t().mm(input_[mb]))
    ref = sum(grad_output[mb].double().t().mm(input_[mb].double()) for mb in range(2))
    scale = ref.abs().max().item()
    return {
        "wgrad_out_dtype_addmm": linear._has_out_dtype_addmm(torch.device("cuda")),
        "wgrad_into_main_grad_max_rel_diff": (fused.double() - ref).abs().max().item() / scale,
        "wgrad_hook_add_max_rel_diff": (hook.double() - ref).abs().max().item() / scale,
    }


def check_qkv_rope(mixed: torch.Tensor, freqs: torch.Tensor, g: torch.Generator) -> dict:
    """fused.fused_qkv_rope on the GPU (its Triton kernels) against the same function on an fp32 CPU copy
    (megatron's split, the query reshaped, RoPE on each): query, key, value and the fused projection's
    gradient."""
    from questa_nemo.model import fused

    split = [6 * 128, 128, 128]
    t = mixed.detach().requires_grad_()
    outs = fused.fused_qkv_rope(t, freqs, freqs, split)
    ups = [torch.randn(o.shape, device="cuda", dtype=torch.bfloat16, generator=g) for o in outs]
    (grad,) = torch.autograd.grad(outs, t, ups)
    ref_in = mixed.detach().float().cpu().requires_grad_()
    refs = fused.fused_qkv_rope(ref_in, freqs.cpu(), freqs.cpu(), split)
    (grad_ref,) = torch.autograd.grad(refs, ref_in, [u.float().cpu() for u in ups])
    result = {
        f"qkv_rope_{name}_max_abs_diff": (o.float().cpu() - r).abs().max().item()
        for name, o, r in zip(("query", "key", "value"), outs, refs, strict=True)
    }
    result["qkv_rope_grad_max_abs_diff"] = (grad.float().cpu() - grad_ref).abs().max().item()
    result["qkv_rope_value_is_view"] = outs[2].data_ptr() == t.data_ptr() + 7 * 128 * t.element_size()
    return result


def check_logprob_head(g: torch.Generator) -> dict:
    """The log-prob head at the model's shape (2,048 tokens, 1,536 hidden, 151,936 vocabulary, bf16) on each of
    its CUDA kernels against float64: log-probs, entropy, the hidden states' gradient. Then the Triton kernels
    on one chunk of 14,200 x 151,936 logits (past 2^31 elements, as a 32K chunk is) in its last rows."""
    from questa_nemo.model import logprobs, triton_kernels

    hidden = (torch.randn(2048, 1536, device="cuda", generator=g) * 0.5).bfloat16()
    weight = (torch.randn(151936, 1536, device="cuda", generator=g) * 0.05).bfloat16()
    targets = torch.randint(0, 151936, (2048,), device="cuda", generator=g)
    coef = torch.randn(2, 2048, device="cuda", generator=g)
    h64 = hidden.double().requires_grad_()
    ref = logprobs.naive_logprobs(h64 @ weight.double().t(), targets, 0.9)
    (ref.logprobs @ coef[0].double() + ref.entropy @ coef[1].double()).backward()
    out = {}
    saved = logprobs.CUDA_KERNELS
    try:
        for kernels in ("triton", "compile"):
            logprobs.CUDA_KERNELS = kernels
            h = hidden.clone().requires_grad_()
            got = logprobs.chunked_logprobs(h, weight, targets, 0.9, chunk_tokens=1024)
            (got.logprobs @ coef[0] + got.entropy @ coef[1]).backward()
            out[f"logprob_{kernels}_max_abs_diff"] = (got.logprobs.double() - ref.logprobs).abs().max().item()
            out[f"entropy_{kernels}_max_abs_diff"] = (got.entropy.double() - ref.entropy).abs().max().item()
            out[f"logprob_{kernels}_dhidden_max_rel_diff"] = (
                (h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()
            ).item()
    finally:
        logprobs.CUDA_KERNELS = saved
    del hidden, weight, h64, ref
    rows, vocab = 14200, 151936
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    target = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    row_max, sum_exp, weighted, picked = triton_kernels.logprob_stats(logits, target, 1.0)
    tail = logits[-4:].double()
    log_z = torch.logsumexp(tail, -1)
    p = torch.exp(tail - log_z[:, None])
    entropy = log_z - (p * tail).sum(-1)
    ones = torch.ones(4, device="cuda")
    grad = triton_kernels.logprob_grad(
        logits[-4:], log_z.float(), entropy.float(), ones, ones * 0, target[-4:], 1.0
    )  # fmt: skip
    grad_big = triton_kernels.logprob_grad(
        logits, torch.zeros(rows, device="cuda"), torch.zeros(rows, device="cuda"), torch.ones(rows, device="cuda"),
        torch.zeros(rows, device="cuda"), target, 1.0,
    )[-4:]  # fmt: skip
    onehot = torch.nn.functional.one_hot(target[-4:], vocab).double()
    out["logprob_big_chunk_log_z_max_abs_diff"] = ((row_max + sum_exp.log())[-4:].double() - log_z).abs().max().item()
    out["logprob_big_chunk_picked_max_abs_diff"] = (
        (picked[-4:].double() - tail.gather(1, target[-4:, None]).squeeze(1)).abs().max().item()
    )
    out["logprob_big_chunk_grad_max_abs_diff"] = (grad.double() - (onehot - p)).abs().max().item()
    # log Z = 0, H = 0: d/dl = [v == t] - exp(l), the same kernel on every row of the big chunk (64-bit offsets)
    out["logprob_big_chunk_grad_rows_max_abs_diff"] = (
        (grad_big.double() - (onehot - torch.exp(tail))).abs().max() / torch.exp(tail).abs().max()
    ).item()
    return out


def check_varlen(g: torch.Generator) -> dict:
    """Packed attention at the model's heads: torch's flash variable-length kernel and the SDPA path (bf16)
    against float32 SDPA per segment, output and gradients; empty without torch.nn.attention.varlen."""
    from questa_nemo.model import attention

    if attention.varlen_kernel() is None:
        return {"varlen": "unavailable"}
    lengths = [3000, 1, 700, 1500, 33, 2900]  # 8134 of 8192 rows; the rest padding
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    qkv = [torch.randn(8192, h, 128, device="cuda", dtype=torch.bfloat16, generator=g) for h in (12, 2, 2)]
    up = torch.randn(8192, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    plan = attention.segment_plan(starts, lengths, torch.device("cuda"))
    ref_in = [x.float().requires_grad_() for x in qkv]
    ref = torch.zeros_like(ref_in[0])
    for start, n in zip(starts, lengths):
        q, k, v = (x[start : start + n].transpose(0, 1).unsqueeze(0) for x in ref_in)
        ref[start : start + n] = attention.causal_sdpa(q, k, v, 128**-0.5).squeeze(0).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, ref_in, up.float())
    out = {}
    for name, on in (("varlen", True), ("sdpa", False)):
        inputs = [x.detach().requires_grad_() for x in qkv]
        out[f"packed_{name}_path"] = attention.attention_path(inputs[0], plan, varlen=on)
        got = attention._attend(*inputs, plan, 128**-0.5, varlen=on)
        grads = torch.autograd.grad(got, inputs, up)
        out[f"packed_{name}_max_abs_diff"] = (got.float() - ref).abs().max().item()
        for label, a, b in zip("qkv", grads, ref_grads):
            out[f"packed_{name}_d{label}_max_abs_diff"] = (a.float() - b).abs().max().item()
    return out


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape (CPU smoke test)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument(
        "--runs", nargs="*", default=[], help="SEQ/IMPL:key=value,... (added after the preset)"
    )
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run (compile, allocator)")
    parser.add_argument("--time-budget-s", type=float, default=330.0, help="skip runs that start after this")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--profile", type=Path, default=None, help="write a kernel breakdown per run here")
    parser.add_argument("--saved-sites", action="store_true",
                        help="record where the memory a forward saves for backward was allocated (saved_sites)")
    parser.add_argument("--clocks", action="store_true",
                        help="sample the SM clock, power and clock-limit reasons during the timed steps (NVML)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="one more step under torch's sync debug mode: which calls make the host wait (syncs)")
    args = parser.parse_args(argv)

    hf = TINY if args.tiny else QWEN25_15B
    runs = [parse_run(r) for r in PRESETS.get(args.preset or ("tiny" if args.tiny else "gpu"), [])]
    runs += [parse_run(r) for r in args.runs]

    from questa_nemo.config import ModelConfig
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(ModelConfig())
    card, peak = card_peak_tflops(args.device)
    fused_check = check_fused_kernels(args.device)
    if fused_check:
        print("fused kernels vs reference:", json.dumps(fused_check), flush=True)
    import megatron.core
    import transformers

    from questa_nemo.atomic import write_text_atomic

    def write_result() -> None:  # after every run: a call killed at its time limit keeps what it measured
        result = {
            "card": card,
            "peak_bf16_tflops": peak,
            "torch": torch.__version__,
            "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__,
            "model": hf,
            "flops_per_token": {str(r.seq): flops_per_token(hf, r.seq) for r in runs},
            "fused_kernel_check": fused_check,
            "steps": args.steps,
            "warmup": args.warmup,
            "runs": [{**asdict(r), "label": r.label} for r in runs],
        }
        write_text_atomic(args.out, json.dumps(result, indent=2))

    began = time.perf_counter()
    for run in runs:
        if time.perf_counter() - began > args.time_budget_s:
            run.status = "skipped: time budget"
            continue
        try:
            measure(
                run, hf, args.device, args.steps, args.warmup, peak, args.profile, args.saved_sites, args.clocks,
                args.sync_debug,
            )
        except torch.OutOfMemoryError:
            run.status = "oom"
        except Exception as e:  # one failing variant must not hide the others' numbers
            run.status = f"error: {type(e).__name__}: {str(e)[:300]}"
        free_device(args.device)
        mfu = f"{run.mfu:6.1%}" if run.mfu is not None else "   n/a"
        tps = f"{run.tokens_per_s:9.0f}" if run.tokens_per_s else "      n/a"
        if run.tokens_per_s_median:
            tps += f" (median {run.tokens_per_s_median:.0f})"
        mem = f"{run.peak_mem_gib:5.1f} GiB" if run.peak_mem_gib else "      n/a"
        if run.saved_gib is not None:
            mem += f" (forward saves {run.saved_gib:.2f})"
        host = "  host " + "/".join(f"{v:.0f}" for v in run.host_ms.values()) if run.host_ms else ""
        if run.clocks:
            c = run.clocks
            host += f"  SM {c['sm_mhz_mean']:.0f} MHz (min {c['sm_mhz_min']}) {c['power_w_mean']:.0f} W"
            host += f" power-capped {c['share_sw_power_cap']:.0%}"
        print(f"{run.label:55s} {tps} tok/s  MFU {mfu}  peak {mem}  {run.status}{host}", flush=True)
        write_result()
    destroy_distributed()
    write_result()
    print(f"wrote {args.out} ({card})")
    return 0 if all(r.status in ("ok", "oom") or r.status.startswith("skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
