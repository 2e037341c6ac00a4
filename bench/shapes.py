"""Model shapes the GPU benchmarks build with random weights, and the result file they all write.

QWEN25_1P5B is the Qwen2.5 1.5B shape of the reference policy (OpenMath-Nemotron-1.5B): GQA 12 / 2 heads, q/k/v
bias, SwiGLU 8960, 28 layers, vocab 151,936, RoPE theta 1e6, untied embeddings as issue 3 states. It is a
benchmark stand-in only: a real run reads every dimension from the model's own config.json.
"""

QWEN25_1P5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}

TINY_QWEN2 = {
    **QWEN25_1P5B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
}


def drawn_lengths(count: int, mean: float, sigma: float, longest: int, seed: int) -> list[int]:
    """Completion lengths like R1-style traces: lognormal with the given mean (median mean * exp(-sigma^2 / 2))
    clipped to [1, longest], and the longest draw set to `longest` so the tail reaches the maximum."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor(mean).log() - sigma**2 / 2
    draws = (mu + sigma * torch.randn(count, generator=g)).exp().round().clamp(1, longest).long()
    draws[draws.argmax()] = longest
    return draws.tolist()


def row_draw(name: str, sequences: int, samples: int, mean: float, sigma: float, longest: int) -> list[list[int]]:
    """bench_rollout.py's completion lengths [prompt][sample] for its drawn row `name` (realistic, recipe):
    `drawn_lengths` seeded by the row's name, `samples` a prompt. bench/roofline.py rebuilds a recorded row
    through this too."""
    flat = drawn_lengths(sequences, mean, sigma, longest, seed=len(name))
    return [flat[i : i + samples] for i in range(0, sequences, samples)]


def write_result(path: str, bench: str, tiny: bool, settings: dict, **payload) -> None:
    """bench/results JSON: which benchmark, on which card (or CPU), at which shape and settings, then the data."""
    import json
    import platform
    from pathlib import Path

    import torch

    on_gpu = torch.cuda.is_available() and settings.get("device", "cuda") == "cuda"
    result = {
        "bench": bench,
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "shape": "tiny" if tiny else "qwen2.5-1.5b",
        "settings": settings,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        **payload,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def add_grpo_step_arguments(p, *, new_tokens: int, steps: int) -> None:
    """The GRPO-step sizes shared by bench_grpo_step.py and bench_async.py (defaults differ per bench)."""
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke run)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--recompute", default="full", choices=("none", "full", "selective"))
    p.add_argument("--steps", type=int, default=steps, help="GRPO steps; the first is a warm-up (graph capture)")


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo on Linux), recorded beside CPU-bound results."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
