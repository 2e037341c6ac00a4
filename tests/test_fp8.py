"""model/fp8.py: the float8 copies of the decode step's weights (EngineOptions.fp8_weights), pure torch."""

from __future__ import annotations

import pytest
import torch

from questa_nemo.model.fp8 import FP8_MAX, quantize_fp8_rows


def test_quantize_fp8_rows_error_bound_and_scales():
    """One scale a row (its largest magnitude maps to FP8_MAX); every weight within e4m3's rounding: half a unit
    in the last of 3 mantissa bits (2^-4 relative) for normal values, 2^-10 of the scale below (subnormals).
    An all-zero row gets scale 1; a row's extremes come back exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 300, generator=g) * torch.logspace(-4, 2, 37)[:, None]  # rows over six decades
    w[5] = 0.0
    w8, scale = quantize_fp8_rows(w, chunk_rows=8)  # several chunks, the last ragged
    assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (37,)
    assert scale[5] == 1.0 and not w8[5].float().any()
    back = w8.float() * scale[:, None]
    bound = w.abs() * 2**-4 + scale[:, None] * 2**-10
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    rows = [i for i in range(37) if i != 5]
    torch.testing.assert_close(scale[rows], w[rows].abs().amax(dim=1) / FP8_MAX)
    extremes = w[rows].abs().argmax(dim=1)
    picked = back[rows].gather(1, extremes[:, None])[:, 0]
    torch.testing.assert_close(picked, w[rows].gather(1, extremes[:, None])[:, 0], rtol=1e-6, atol=0)


def test_quantize_fp8_rows_in_place_and_bf16():
    """Into given buffers (their addresses kept: a captured graph reads them), from bf16 weights as the engine's;
    buffers of the wrong shape or dtype are refused, naming both."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    buffers = (torch.empty(16, 64, dtype=torch.float8_e4m3fn), torch.empty(16))
    ptrs = tuple(t.data_ptr() for t in buffers)
    w8, scale = quantize_fp8_rows(w, buffers)
    assert tuple(t.data_ptr() for t in (w8, scale)) == ptrs
    assert torch.equal(w8.float(), quantize_fp8_rows(w.float())[0].float())
    with pytest.raises(ValueError, match=r"do not fit a \[16, 32\] weight"):
        quantize_fp8_rows(w[:, :32], buffers)
    with pytest.raises(ValueError, match=r"buffers \(16, 64\) torch.float32"):
        quantize_fp8_rows(w, (torch.empty(16, 64), torch.empty(16)))
