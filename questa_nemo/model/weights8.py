"""8-bit copies of weights for the rollout's decode step (EngineOptions.weights8): pure torch, no kernels. The
skinny matmul (model/triton_kernels.skinny_linear with `scale`) multiplies by them.

Two formats, one float32 scale per output row each (scale = the row's largest magnitude / the format's largest
value, 1 for an all-zero row):
- "int8": round(weight / scale) in -127..127, a uniform grid: every weight within half a step, scale / 2, of
  its value (2^-8 of the row's largest magnitude).
- "fp8": float8 e4m3, a 3-bit mantissa: every weight within 1/16 of its own magnitude (coarser than int8 for
  the larger weights of a row, finer for the smallest).
SmolLM2-135M-Instruct's next-token distributions move about 4x less under int8 than under fp8
(bench/weights8_kl.py)."""

from __future__ import annotations

import torch

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # name -> (dtype, largest value)
FP8_MAX = FORMATS["fp8"][1]  # the largest finite float8 e4m3 (torch.float8_e4m3fn)


@torch.no_grad()
def quantize_rows(
    weight: torch.Tensor,
    fmt: str,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] in the 8-bit format `fmt` (FORMATS) with one float32 scale per row (output feature):
    (q, scale) with q * scale the weight the 8-bit projection multiplies by. out: (q, scale) buffers to
    overwrite in place (a captured graph keeps their addresses); rows converted `chunk_rows` at a time (the
    float32 temporaries stay small)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_rows: format {fmt!r} is not one of {sorted(FORMATS)}")
    dtype, largest = FORMATS[fmt]
    n, k = weight.shape
    q, scale = out if out is not None else (
        torch.empty(n, k, dtype=dtype, device=weight.device),
        torch.empty(n, dtype=torch.float32, device=weight.device),
    )  # fmt: skip
    if q.shape != (n, k) or q.dtype != dtype or scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"quantize_rows: buffers {tuple(q.shape)} {q.dtype}, {tuple(scale.shape)} "
                         f"{scale.dtype} do not fit a [{n}, {k}] weight in {fmt}")  # fmt: skip
    for start in range(0, n, chunk_rows):
        rows = weight[start : start + chunk_rows].float()
        s = rows.abs().amax(dim=1) / largest
        s = torch.where(s > 0, s, torch.ones_like(s))
        scale[start : start + chunk_rows] = s
        scaled = (rows / s[:, None]).clamp(-largest, largest)
        q[start : start + chunk_rows] = (scaled.round() if fmt == "int8" else scaled).to(dtype)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an 8-bit copy stands for: q * scale, a row at a time."""
    return q.float() * scale[:, None]
