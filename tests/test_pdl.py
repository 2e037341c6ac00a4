"""EngineOptions.pdl: the decode step's Triton kernels as programmatic dependent launches. Without a GPU: each
kernel, lowered to PTX for sm_90 with PDL on, waits for the previous grid (griddepcontrol.wait) before its first
global load, store or atomic (a read of the previous kernel's output, or a write it may still be reading,
before the wait would race), then lets the next grid launch; with PDL off neither instruction is there. The
option itself is refused off the Triton step."""

from __future__ import annotations

import importlib.util
import re

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None

PDL_AOT = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.model import triton_kernels as tk
from questa_nemo.rollout import paged_triton as pt

T = GPUTarget("cuda", 90, 32)
i32 = "i32"
KERNELS = {  # kernel -> (pointer / scalar types in order, constexprs, warps)
    "swiglu": (tk._swiglu_forward_kernel, ["*bf16", "*bf16", i32], {"BLOCK": 1024}, 4),
    "rmsnorm": (tk._rmsnorm_forward_kernel, ["*bf16", "*bf16", "*bf16", "*fp32", i32, "fp32"], {"BLOCK": 2048}, 8),
    "add_rmsnorm": (tk._add_rmsnorm_kernel, ["*bf16"] * 5 + [i32, "fp32"], {"BLOCK": 2048}, 8),
    "skinny": (tk._skinny_kernel, ["*bf16", "*fp8e4nv", "*fp32", "*bf16", "*bf16", "*fp32", "*i32", i32, i32, i32],
               {"K_PER": 512, "HAS_SCALE": True, "HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256,
                "SPLIT_K": 3}, 4),
    "skinny_i8": (tk._skinny_kernel, ["*bf16", "*i8", "*fp32", "*bf16", "*bf16", "*fp32", "*i32", i32, i32, i32],
                  {"K_PER": 512, "HAS_SCALE": True, "HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256,
                   "SPLIT_K": 3}, 4),
    "rope_append": (pt._rope_append_kernel, ["*bf16"] * 3 + ["*i32"] * 2 + ["*bf16"] * 3 + [i32] * 9,
                    {"HALF": 64, "R": 8}, 4),
    "split": (pt._split_kernel, ["*bf16"] * 3 + ["*i32", "*i64", "*fp32", "*fp32", "*bf16", "*i32"] + [i32] * 5
              + ["fp32"] + [i32] * 10, {"BS": 64, "D": 128, "H": 16, "FIXED": True, "DIRECT": False,
              "CASCADE": False}, 4),
    "merge": (pt._merge_kernel, ["*fp32", "*fp32", "*bf16", "*i64", "*i32", "*i32"] + [i32] * 8,
              {"BS": 64, "D": 128, "H": 16, "FIXED": True, "CASCADE": False}, 4),
    "merge_tile": (pt._merge_tile_kernel, ["*fp32", "*fp32", "*bf16", "*i64", "*i32", "*i32"] + [i32] * 8,
                   {"BS": 64, "D": 128, "H": 16, "FIXED": True, "CASCADE": False, "C": 64}, 4),
    "prefix": (pt._prefix_kernel, ["*bf16"] * 3 + ["*i32"] * 3 + ["*fp32"] * 2 + [i32] * 4 + ["fp32"] + [i32] * 8,
               {"BS": 64, "D": 128, "H": 16, "M": 16, "R": 128}, 8),
}
MEMORY = re.compile(r"\\b(ld\\.global|st\\.global|atom\\.|red\\.|cp\\.async)")
for name, (fn, types, consts, warps) in KERNELS.items():
    for pdl in (False, True):
        values = [a for a in fn.arg_names if a not in consts and a != "PDL"]
        assert len(values) == len(types), (name, values)
        signature = {**dict(zip(values, types)), **{k: "constexpr" for k in consts}, "PDL": "constexpr"}
        options = {"num_warps": warps}
        if name == "rope_append":
            options["enable_fp_fusion"] = False
        ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={**consts, "PDL": pdl}), target=T,
                             options=options).asm["ptx"]
        wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
        first = MEMORY.search(ptx)
        if not pdl:
            assert wait < 0 and launch < 0, name
            continue
        assert 0 <= wait < launch, (name, wait, launch)
        assert first is not None and wait < first.start(), (name, first and first.group(0))
        print(name, "waits before", first.group(0))
print("pdl ordered", len(KERNELS))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU torch)")
def test_pdl_kernels_wait_before_their_first_memory_access():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(PDL_AOT, timeout=900)
    assert done.returncode == 0 and "pdl ordered 10" in done.stdout, (done.stdout[-2000:], done.stderr[-3000:])
    assert len(re.findall(r"waits before", done.stdout)) == 10


def test_pdl_refused_off_the_triton_step():
    """pdl without fused_norms is refused when the engine is built; on a cache that runs torch's step (CPU, no
    kernel) at the first generate."""
    from rollout_models import VOCAB, hf_model, megatron_twin

    from questa_nemo.rollout.base import SamplingParams
    from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend

    model = megatron_twin(hf_model("qwen2"))
    options = {"max_batch_sequences": 4, "paged_kv": True, "kv_block_size": 16}
    with pytest.raises(ValueError, match="pdl runs in the fused-norms decode step"):
        MegatronBackend(model, VOCAB, EngineOptions(**options, pdl=True, fused_norms=False))
    b = MegatronBackend(model, VOCAB, EngineOptions(**options, pdl=True))
    with pytest.raises(RuntimeError, match="pdl needs the Triton decode step"):
        b.generate([[5, 7]], SamplingParams(n=1, temperature=0.0, max_new_tokens=2, ignore_eos=True))


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the keyword arguments."""

    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, kwargs))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU torch)")
@pytest.mark.parametrize("pdl", [False, True])
def test_every_decode_launch_passes_pdl_to_its_kernel_and_launch(monkeypatch, pdl):
    """Each launcher of the decode step hands `pdl` both to its kernel (PDL, the wait) and to the launch
    (launch_pdl, the attribute that lets the kernel start early): one without the other is a silent loss of
    speed (launch without the option) or a kernel that waits for nothing. Kernels replaced by recorders."""
    import torch

    from questa_nemo.model import triton_kernels as tk
    from questa_nemo.rollout import paged_triton as pt

    calls: list = []
    names = ["_swiglu_forward_kernel", "_rmsnorm_forward_kernel", "_add_rmsnorm_kernel", "_skinny_kernel"]
    for name in names:
        monkeypatch.setattr(tk, name, _Recorder(calls, name))
    for name in ["_rope_append_kernel", "_split_kernel", "_merge_tile_kernel", "_merge_kernel"]:
        monkeypatch.setattr(pt, name, _Recorder(calls, name))
    x = torch.randn(4, 64)
    tk.swiglu_forward(torch.randn(4, 128), pdl=pdl)
    tk.rmsnorm_forward(x, torch.ones(64), 1e-6, pdl=pdl)
    tk.add_rmsnorm(x, x, torch.ones(64), 1e-6, pdl=pdl)
    tk.skinny_linear(x, torch.randn(48, 64), pdl=pdl)
    b, g, per, d, bs = 2, 2, 3, 16, 16
    pool = torch.zeros(9, g, bs, d)
    table = torch.arange(1, 9, dtype=torch.int32).view(2, 4)
    pt.rope_append(torch.randn(b, g * (per + 2) * d), torch.ones(b, d // 2), torch.zeros(b, d // 2), pool, pool,
                   torch.ones(b, dtype=torch.int32), torch.zeros(b, dtype=torch.int32), pdl=pdl)  # fmt: skip
    q = torch.randn(b, g, per, d)
    positions = torch.tensor([20, 40])
    for tile in (True, False):
        pt.paged_decode_attention(q, pool, pool, table, positions, 1, split_len=16, merge_tile=tile, pdl=pdl)
    launched = [name for name, _ in calls]
    assert set(launched) == set(names) | {"_rope_append_kernel", "_split_kernel", "_merge_tile_kernel",
                                          "_merge_kernel"}, launched  # fmt: skip
    for name, kwargs in calls:
        assert kwargs["PDL"] is pdl and kwargs.get("launch_pdl", False) is pdl, (name, kwargs)
