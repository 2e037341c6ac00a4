"""The Triton kernels of model/triton_kernels.py on the CPU, through Triton's interpreter.

CI's CPU image has no Triton (it ships with CUDA builds of torch), so there this module is skipped and the
kernels are checked on the GPU by every `bench/bench_train.py` run (`fused_kernel_check`). Locally:
`pip install --no-deps triton==3.6.0` and run this file.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors
pytest.importorskip("triton")

from megatron.core.models.common.embeddings import rope_utils  # noqa: E402

from questa_nemo.model import fused, triton_kernels  # noqa: E402


def test_swiglu_kernels_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    y, up = torch.randn(6, 80, generator=g), torch.randn(6, 40, generator=g)
    torch.testing.assert_close(triton_kernels.swiglu_forward(y), fused.swiglu_reference(y))
    torch.testing.assert_close(triton_kernels.swiglu_backward(up, y), fused.swiglu_reference_backward(up, y))


@pytest.mark.parametrize("layout", ["query", "key"])
def test_rope_kernel_equals_megatron_and_inverts(layout):
    """query: contiguous [s, b, heads, d]; key: a strided view into a fused projection, as megatron's is."""
    g = torch.Generator().manual_seed(1)
    dim = 16
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(10).float(), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :]
    if layout == "query":
        t = torch.randn(10, 2, 5, dim, generator=g)  # 5 heads: a partly masked head block
    else:
        t = torch.randn(10, 2, 3, 4 * dim, generator=g)[..., dim : 2 * dim]
    cos, sin = freqs.cos(), freqs.sin()
    out = triton_kernels.rope(t, cos, sin)
    torch.testing.assert_close(out, rope_utils._apply_rotary_pos_emb_bshd(t, freqs))
    torch.testing.assert_close(triton_kernels.rope(out, cos, sin, inverse=True), t)
    leaf, upstream = t.clone().requires_grad_(), torch.randn(t.shape, generator=g)
    (grad,) = torch.autograd.grad(rope_utils._apply_rotary_pos_emb_bshd(leaf, freqs), leaf, upstream)
    torch.testing.assert_close(triton_kernels.rope(upstream, cos, sin, inverse=True), grad)


def test_qkv_rope_kernels_equal_the_split_path():
    """The fused QKV split + RoPE kernels against the split path (model/fused.py's eager branch: megatron's
    split, the query reshaped, RoPE on each): a strided fused projection (a view of a wider one), 3 query heads
    a group (a partly masked head block), strided upstream gradients."""
    g = torch.Generator().manual_seed(8)
    dim, q_per_group, groups = 16, 3, 2
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(10).float(), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :]
    wide = torch.randn(10, 2, groups, (q_per_group + 3) * dim, generator=g)
    qkv = wide[..., dim:].requires_grad_()  # leaf view: strides of the wider tensor
    split = [q_per_group * dim, dim, dim]
    cos, sin = freqs.cos(), freqs.sin()
    query, key = triton_kernels.qkv_rope(qkv.detach(), cos, sin, q_per_group)
    expected = fused.fused_qkv_rope(qkv, freqs, freqs, split)  # eager on CPU tensors
    torch.testing.assert_close(query, expected[0])
    torch.testing.assert_close(key, expected[1])
    upstream = [torch.randn(t.shape[:-1] + (2 * dim,), generator=g)[..., :dim] for t in expected]  # strided
    (grad,) = torch.autograd.grad(expected, qkv, upstream)
    got = triton_kernels.qkv_rope_backward(*upstream, cos, sin)
    assert got.is_contiguous() and got.shape == qkv.shape
    torch.testing.assert_close(got, grad)


@pytest.mark.parametrize("rows, programs", [(9, 4), (8, 1), (5, 16), (130, 1)])
def test_rmsnorm_kernels_equal_the_reference(rows, programs):
    """Hidden size 24 (a partly masked block); row blocks with a ragged last one, one program, more programs
    than rows, the 64-row cap. dx and the summed partial weight gradients against autograd on the fp32
    reference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 24, generator=g) * 3
    weight, upstream = torch.randn(24, generator=g), torch.randn(rows, 24, generator=g)
    y, rstd = triton_kernels.rmsnorm_forward(x, weight, 1e-6)
    torch.testing.assert_close(y, fused.rmsnorm_reference(x, weight, 1e-6))
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))
    leaf, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.autograd.grad(fused.rmsnorm_reference(leaf, w, 1e-6), (leaf, w), upstream)
    got = triton_kernels.rmsnorm_backward(upstream, x, weight, rstd, programs=programs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_is_the_add_then_the_norm_kernel(dtype):
    """The decode step's fused residual add + RMSNorm (EngineOptions.fused_norms): in fp32 the sum has torch's
    add's bits and the norm `rmsnorm_forward`'s bits on that sum (hidden 24: a partly masked block; [B, 1,
    hidden] as the decode step passes it). In bf16 the interpreter rounds its float32 -> bf16 casts differently
    from the GPU (which rounds to nearest, as torch): within one bf16 step here; the GPU's bits are checked by
    bench_rollout's self-check (`add_rmsnorm`)."""
    g = torch.Generator().manual_seed(3)
    x, residual = torch.randn(5, 1, 24, generator=g).to(dtype), (torch.randn(5, 1, 24, generator=g) * 4).to(dtype)
    weight = torch.randn(24, generator=g).to(dtype)
    h, y = triton_kernels.add_rmsnorm(x, residual, weight, 1e-6)
    assert h.shape == y.shape == residual.shape and h.dtype == y.dtype == dtype
    reference = fused.rmsnorm_reference(residual + x, weight, 1e-6)
    if dtype == torch.float32:
        assert torch.equal(h, residual + x)
        assert torch.equal(y, triton_kernels.rmsnorm_forward(residual + x, weight, 1e-6)[0])
        torch.testing.assert_close(y, reference)
    else:
        torch.testing.assert_close(h, residual + x, atol=0.07, rtol=2**-7)  # |sum| < 16: one step is 2^-4
        torch.testing.assert_close(y, reference, atol=0.05, rtol=2**-6)


def test_model_on_the_triton_kernels_equals_the_unfused_model(monkeypatch):
    """The tiny Qwen2 with every fused op on its Triton kernel (RMSNorm, RoPE, SwiGLU; interpreted) and full
    recompute keeping attention: the unfused model's log-probs and gradients (fp32)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from tiny_hf import VOCAB, tiny_hf_model

    from questa_nemo.config import ModelConfig
    from questa_nemo.model import megatron as mg
    from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    class SwiGLUOnTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            ctx.save_for_backward(y)
            return triton_kernels.swiglu_forward(y)

        @staticmethod
        def backward(ctx, g):
            return triton_kernels.swiglu_backward(g, ctx.saved_tensors[0])

    init_distributed(ModelConfig(params_dtype="fp32"))
    ref, hf = tiny_hf_model("qwen2")
    cfg = ModelConfig(
        params_dtype="fp32",
        attention="sdpa",
        recompute="full",
        recompute_impl="torch",
        recompute_keep_attention=True,
    )
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))

    def run(fusions: bool):
        monkeypatch.setattr(mg, "fusions_on", lambda cfg: fusions)
        model = mg.build_model(hf, cfg)
        mg.load_hf_weights(model, ref.state_dict(), hf, cfg)
        hidden = final_hidden_states(model, ids, torch.arange(12)[None])
        out = chunked_logprobs(hidden, output_weight(model), ids.t(), vocab_size=VOCAB)
        out.logprobs.sum().backward()
        return out.logprobs.detach(), {n: p.grad for n, p in model.named_parameters()}

    try:
        expected, expected_grads = run(fusions=False)
        # the CUDA-only branches taken on CPU tensors: every op on its kernel
        monkeypatch.setattr(
            fused.RMSNorm, "forward", lambda self, x: fused._RMSNormFunction.apply(x, self.weight, self.eps)
        )
        monkeypatch.setattr(fused, "_rotate", lambda t, cos, sin: fused._RopeFunction.apply(t, cos, sin))
        monkeypatch.setattr(fused.SwiGLU, "forward", lambda self, y: SwiGLUOnTriton.apply(y))
        monkeypatch.setattr(fused, "_qkv_kernel_usable", lambda qkv, cos, half: True)
        monkeypatch.setattr(fused, "FUSED_QKV_ROPE", True)
        qkv_calls = []
        original = fused._QKVRopeFunction.apply
        monkeypatch.setattr(fused._QKVRopeFunction, "apply", lambda *a: qkv_calls.append(1) or original(*a))
        got, got_grads = run(fusions=True)
        assert len(qkv_calls) == 2 * hf["num_hidden_layers"]  # forward and recompute (megatron-core 0.16+)
    finally:
        rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb_thd = None
        from megatron.core.transformer import attention as mcore_attention

        mcore_attention.HAVE_FUSED_QKV_ROPE = False
        mcore_attention.__dict__.pop("apply_fused_qkv_rotary_pos_emb", None)
        destroy_distributed()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


ADD_RMSNORM_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.model import triton_kernels as tk

signature = {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16",
             "n": "i32", "eps": "fp32", "BLOCK": "constexpr", "PDL": "constexpr"}
source = ASTSource(fn=tk._add_rmsnorm_kernel, signature=signature, constexprs={"BLOCK": 2048, "PDL": False})
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
assert kernel.asm["cubin"] and "cvt.rn.bf16.f32" in kernel.asm["ptx"]
print("compiled")
"""


def test_add_rmsnorm_kernel_compiles_for_hopper():
    """Ahead of time, no GPU: the decode step's add + RMSNorm kernel as launched at hidden 1536 in bf16 (block
    2048, 8 warps) lowers to PTX and assembles for sm_90, and its float32 -> bf16 casts round to nearest (as
    torch's add does; the interpreter above does not model that rounding)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(ADD_RMSNORM_AOT, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    "rows, n, k, bias, config",
    [
        (1, 40, 48, False, None),  # one row; n and k not multiples of the blocks
        (8, 96, 300, True, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "num_warps": 4,
                            "num_stages": 1}),  # split K, the last split ragged, with bias
        (20, 64, 256, True, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 8, "num_warps": 4,
                             "num_stages": 1}),
        (33, 16, 16, True, None),  # past SKINNY_MAX_ROWS: F.linear
    ],
)  # fmt: skip
def test_skinny_linear_equals_f_linear(rows, n, k, bias, config):
    """The decode step's skinny matmul (EngineOptions.skinny_gemm) in fp32 against F.linear, with and without
    split K; run twice, as a captured graph replays it: the split tickets are left at zero."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(rows, 1, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    for _ in range(2):
        got = triton_kernels.skinny_linear(x, w, b, config=config)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert all(int(count.abs().sum()) == 0 for _, count in triton_kernels._WORKSPACE.values())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize(
    "rows, n, k, bias, config",
    [
        (1, 40, 48, False, None),
        (8, 96, 600, True, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "num_warps": 4,
                            "num_stages": 1}),  # split K (the scale on the summed partials), with bias
        (32, 64, 520, True, None),  # SKINNY_MAX_ROWS; the 8-bit deeper K tile, the last one ragged
    ],
)  # fmt: skip
def test_skinny_linear_8bit_equals_dequantized_weight(rows, n, k, bias, config, fmt):
    """EngineOptions.weights8's matmul: int8 or float8 weights with a scale a row (model/weights8.quantize_rows)
    equal F.linear on the dequantized weight (q * scale) up to float32 rounding, with and without split K,
    twice (the tickets left at zero); more rows than SKINNY_MAX_ROWS are refused (the caller keeps unquantized
    weights), as are a wrong scale and a weight that is not 8-bit."""
    from questa_nemo.model.weights8 import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(rows, 1, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    q, scale = quantize_rows(w, fmt)
    want = torch.nn.functional.linear(x, dequantize_rows(q, scale), b)
    for _ in range(2):
        got = triton_kernels.skinny_linear(x, q, b, config=config, scale=scale)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(int(count.abs().sum()) == 0 for _, count in triton_kernels._WORKSPACE.values())
    with pytest.raises(ValueError, match="8-bit weights take 1..32 rows"):
        triton_kernels.skinny_linear(torch.randn(33, k), q, b, scale=scale)
    with pytest.raises(ValueError, match=rf"scale float32 \[{n}\], got {q.dtype} and torch.float64"):
        triton_kernels.skinny_linear(x, q, b, scale=scale.double())
    with pytest.raises(ValueError, match="must be int8 or float8_e4m3fn"):
        triton_kernels.skinny_linear(x, w, b, scale=scale)  # an unquantized weight with a scale


SKINNY_AOT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.model import triton_kernels as tk

for wtype in ("bf16", "fp8e4nv", "i8"):
    eight = wtype != "bf16"
    signature = {"x_ptr": "*bf16", "w_ptr": "*" + wtype, "s_ptr": "*fp32", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                 "K_PER": "constexpr", "HAS_SCALE": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLIT_K": "constexpr", "PDL": "constexpr"}
    shapes = ((2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)) + (() if eight else ((151936, 1536),))
    for n, k in shapes:
        for rows in (8, 32):
            cfg = tk.skinny_config(rows, n, k, 132, eight_bit=eight)
            k_per = triton.cdiv(triton.cdiv(k, cfg["SPLIT_K"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
            cfg["SPLIT_K"] = triton.cdiv(k, k_per)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            constexprs = {"K_PER": k_per, "HAS_SCALE": eight, "HAS_BIAS": n == 2048, "PDL": False, **cfg}
            source = ASTSource(fn=tk._skinny_kernel, signature=signature, constexprs=constexprs)
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            ptx = kernel.asm["ptx"]
            assert kernel.asm["cubin"] and "mma" in ptx, (n, k, rows)
            assert cfg["SPLIT_K"] == 1 or "atom.global.gpu.acq_rel.add" in ptx, (n, k, cfg)
            assert wtype != "fp8e4nv" or "cvt.rn.bf16x2.e4m3x2" in ptx or "e4m3" in ptx, (n, k, rows)  # widened
            # int8: the weight loaded as bytes, widened with byte permutes (no float8 conversion)
            bytes_loaded = re.search(r"ld\\.(global|shared)(\\.v[24])?\\.b8", ptx)
            assert wtype != "i8" or bytes_loaded and "prmt.b32" in ptx and "e4m3" not in ptx, (n, k, rows)
            print(n, k, rows, cfg["SPLIT_K"], wtype, "compiled")
print("all compiled")
"""


def test_skinny_kernel_compiles_for_hopper():
    """Ahead of time, no GPU: the skinny matmul at the Qwen2.5-1.5B decode step's five projections (qkv with its
    bias, the attention's output, the MLP's two, the output head; the four projections with int8 and float8 weights too)
    at 8 and 32 rows with `skinny_config`'s tiles
    lowers to PTX with tensor-core instructions and assembles for sm_90; the split-K tiles take their ticket
    with an acquire-release atomic (the last program's sum must see the others' partials)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(SKINNY_AOT, timeout=600)
    assert done.returncode == 0 and "all compiled" in done.stdout, done.stderr[-2000:]


def test_logprob_stats_kernel_equals_the_reference():
    """A vocabulary of 5,000 (three column blocks, the last ragged), rows strided inside a wider tensor,
    temperature != 1, a target on another rank (-1): max, sums and target logit against float64."""
    from questa_nemo.model.logprobs import logprob_stats_reference

    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 5003, generator=g) * 4
    logits, target = wide[:, :5000], torch.tensor([0, 4999, 2048, -1])
    got = triton_kernels.logprob_stats(logits, target, 0.7)
    mine = target >= 0
    expected = logprob_stats_reference(logits.double(), target.clamp(min=0), mine, 0.7)
    for name, a, b in zip(("max", "sum", "weighted", "picked"), got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


def test_logprob_grad_kernel_equals_autograd():
    """d(g_lp logp_target + g_h H) / d logits against autograd through the full log-softmax, bf16 logits."""
    from questa_nemo.model.logprobs import naive_logprobs

    g = torch.Generator().manual_seed(6)
    n, v, temperature = 5, 4500, 1.3
    logits = (torch.randn(n, v, generator=g) * 3).to(torch.bfloat16)
    target = torch.tensor([3, 4499, 2047, 2048, -1])
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    leaf = logits.double().requires_grad_()
    ref = naive_logprobs(leaf, target.clamp(min=0), temperature)
    # a target on another rank (-1): logp_target = (its logit there) - log Z, and only log Z is this rank's
    lp = torch.where(target >= 0, ref.logprobs, -torch.logsumexp(leaf / temperature, -1))
    (lp @ g_lp.double() + ref.entropy @ g_h.double()).backward()
    log_z = torch.logsumexp(logits.double() / temperature, -1)
    got = triton_kernels.logprob_grad(logits, log_z.float(), ref.entropy.detach().float(), g_lp, g_h, target,
                                      temperature)  # fmt: skip
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), leaf.grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [4, 16])
def test_chunked_logprobs_on_the_triton_kernels_equal_eager(monkeypatch, chunk_tokens):
    """The log-prob head with its CUDA kernels (mode "triton") on the CPU through the interpreter: values and
    gradients as the eager path gives them, over several chunks (the last one kept) and one."""
    from questa_nemo.model import logprobs

    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(11, 8, generator=g), torch.randn(3000, 8, generator=g)
    targets = torch.randint(0, 2990, (11,), generator=g)
    coef = torch.randn(2, 11, generator=g)

    def run(mode):
        monkeypatch.setattr(logprobs, "_kernel_mode", lambda hidden, compiled: mode)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = logprobs.chunked_logprobs(h, w, targets, 0.8, vocab_size=2990, chunk_tokens=chunk_tokens)
        (out.logprobs @ coef[0] + out.entropy @ coef[1]).backward()
        return out.logprobs.detach(), out.entropy.detach(), h.grad, w.grad

    for got, expected in zip(run("triton"), run("eager")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


LOGPROB_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.model import triton_kernels as tk

common = {"v": "i32", "stride": "i64", "temperature": "fp32", "BLOCK": "constexpr"}
stats = {"logits_ptr": "*bf16", "target_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
         "weighted_ptr": "*fp32", "picked_ptr": "*fp32", **common}
grad = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "log_z_ptr": "*fp32", "entropy_ptr": "*fp32",
        "g_lp_ptr": "*fp32", "g_h_ptr": "*fp32", "target_ptr": "*i64", **common}
for fn, signature in ((tk._logprob_stats_kernel, stats), (tk._logprob_grad_kernel, grad)):
    # what Triton's launcher specializes on when the pointers, the vocabulary and the row stride are multiples of
    # 16 (151,936 and 49,152 are): the logits then load 8 bf16 at a time
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
               if name.endswith("_ptr") or name in ("v", "stride")}
    source = ASTSource(fn=fn, signature=signature, constexprs={"BLOCK": tk.LOGPROB_BLOCK}, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"] and "ld.global.v4" in kernel.asm["ptx"], fn
print("compiled")
"""


QKV_ROPE_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from questa_nemo.model import triton_kernels as tk

const = {"QPG": 6, "BLOCK_Q": 8, "HALF": 64}  # Qwen2.5-1.5B: 12 query heads in 2 groups, head dim 128
forward = {"qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_ptr": "*bf16", "k_ptr": "*bf16",
           "batch": "i32", "groups": "i32", "stride_s": "i64", "stride_b": "i32", "stride_g": "i32"}
backward = {"dq_ptr": "*bf16", "dk_ptr": "*bf16", "dv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "dqkv_ptr": "*bf16", "batch": "i32", "groups": "i32",
            **{f"{t}_{dim}": "i32" for t in ("dq", "dk", "dv") for dim in "sbh"}}
for fn, signature in ((tk._qkv_rope_kernel, forward), (tk._qkv_rope_backward_kernel, backward)):
    signature = {**signature, **{name: "constexpr" for name in const}}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"], fn
print("compiled")
"""


def test_qkv_rope_kernels_compile_for_hopper():
    """Ahead of time, no GPU: the fused QKV split + RoPE kernels at the 1.5B model's head layout assemble for
    sm_90."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(QKV_ROPE_AOT, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]


def test_logprob_kernels_compile_for_hopper():
    """Ahead of time, no GPU: the log-prob head's two kernels as launched on bf16 logits (block 2,048, 8 warps,
    a 64-bit row stride) lower to PTX and assemble for sm_90 (the interpreter accepts code the compiler does not),
    and with aligned arguments read the logits in 16-byte loads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_models import compile_for_hopper

    done = compile_for_hopper(LOGPROB_AOT, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
