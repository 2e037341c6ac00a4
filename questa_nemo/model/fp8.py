"""Float8 (e4m3) copies of weights for the rollout's decode step (EngineOptions.fp8_weights): pure torch, no
kernels. The skinny matmul (model/triton_kernels.skinny_linear with `scale`) multiplies by them."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # the largest finite float8 e4m3 (torch.float8_e4m3fn)


@torch.no_grad()
def quantize_fp8_rows(
    weight: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None, chunk_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] as float8 e4m3 with one float32 scale per row (output feature): scale = the row's
    largest magnitude / FP8_MAX (1 for an all-zero row), w8 = round(weight / scale). w8 * scale is the weight
    the float8 projection multiplies by. out: (w8, scale) buffers to overwrite in place (a captured graph keeps
    their addresses); rows converted `chunk_rows` at a time (the float32 temporaries stay small)."""
    n, k = weight.shape
    w8, scale = out if out is not None else (
        torch.empty(n, k, dtype=torch.float8_e4m3fn, device=weight.device),
        torch.empty(n, dtype=torch.float32, device=weight.device),
    )  # fmt: skip
    if w8.shape != (n, k) or w8.dtype != torch.float8_e4m3fn or scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"quantize_fp8_rows: buffers {tuple(w8.shape)} {w8.dtype}, {tuple(scale.shape)} "
                         f"{scale.dtype} do not fit a [{n}, {k}] weight")  # fmt: skip
    for start in range(0, n, chunk_rows):
        rows = weight[start : start + chunk_rows].float()
        s = rows.abs().amax(dim=1) / FP8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        scale[start : start + chunk_rows] = s
        w8[start : start + chunk_rows] = (rows / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scale
