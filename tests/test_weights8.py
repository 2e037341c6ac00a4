"""model/weights8.py: the 8-bit copies of the decode step's weights (EngineOptions.weights8), pure torch."""

from __future__ import annotations

import pytest
import torch

from questa_nemo.model.weights8 import FORMATS, FP8_MAX, dequantize_rows, quantize_rows


def _rows_over_six_decades() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 300, generator=g) * torch.logspace(-4, 2, 37)[:, None]
    w[5] = 0.0
    return w


def _scales_and_extremes(w: torch.Tensor, back: torch.Tensor, scale: torch.Tensor, largest: float) -> None:
    """One scale a row (its largest magnitude maps to the format's largest value); an all-zero row gets scale
    1 and stays zero; a row's extreme comes back exactly."""
    assert scale.dtype == torch.float32 and scale.shape == (w.size(0),)
    assert scale[5] == 1.0 and not back[5].any()
    rows = [i for i in range(w.size(0)) if i != 5]
    torch.testing.assert_close(scale[rows], w[rows].abs().amax(dim=1) / largest)
    extremes = w[rows].abs().argmax(dim=1)
    picked = back[rows].gather(1, extremes[:, None])[:, 0]
    torch.testing.assert_close(picked, w[rows].gather(1, extremes[:, None])[:, 0], rtol=1e-6, atol=0)


def test_quantize_rows_fp8_error_bound_and_scales():
    """e4m3's rounding: half a unit in the last of 3 mantissa bits (2^-4 relative) for normal values, 2^-10 of
    the scale below (subnormals)."""
    w = _rows_over_six_decades()
    w8, scale = quantize_rows(w, "fp8", chunk_rows=8)  # several chunks, the last ragged
    assert w8.dtype == torch.float8_e4m3fn
    back = dequantize_rows(w8, scale)
    bound = w.abs() * 2**-4 + scale[:, None] * 2**-10
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    _scales_and_extremes(w, back, scale, FP8_MAX)


def test_quantize_rows_int8_error_bound_and_scales():
    """int8: round to the nearest of -127..127 steps of the row's scale: every weight within half a step, and
    the grid is used whole (a row's extremes at +-127)."""
    w = _rows_over_six_decades()
    q, scale = quantize_rows(w, "int8", chunk_rows=8)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and q.min() >= -127
    back = dequantize_rows(q, scale)
    assert ((back - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(q, (w / scale[:, None]).round().to(torch.int8))  # round to nearest, not truncation
    _scales_and_extremes(w, back, scale, FORMATS["int8"][1])


def test_int8_is_finer_than_fp8_on_gaussian_rows():
    """Why int8 is the format to try first: on Gaussian rows (a trained projection's bulk) its mean relative
    error is several times below e4m3's."""
    w = torch.randn(64, 1536, generator=torch.Generator().manual_seed(2))
    err = {f: ((dequantize_rows(*quantize_rows(w, f)) - w).norm() / w.norm()).item() for f in FORMATS}
    assert err["int8"] * 2.5 < err["fp8"], err


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_rows_in_place_and_bf16(fmt):
    """Into given buffers (their addresses kept: a captured graph reads them), from bf16 weights as the engine's;
    buffers of the wrong shape or dtype are refused, naming both; an unknown format is refused by name."""
    dtype = FORMATS[fmt][0]
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    buffers = (torch.empty(16, 64, dtype=dtype), torch.empty(16))
    ptrs = tuple(t.data_ptr() for t in buffers)
    q, scale = quantize_rows(w, fmt, buffers)
    assert tuple(t.data_ptr() for t in (q, scale)) == ptrs
    assert torch.equal(q.float(), quantize_rows(w.float(), fmt)[0].float())
    with pytest.raises(ValueError, match=r"do not fit a \[16, 32\] weight"):
        quantize_rows(w[:, :32], fmt, buffers)
    with pytest.raises(ValueError, match=r"buffers \(16, 64\) torch.float32"):
        quantize_rows(w, fmt, (torch.empty(16, 64), torch.empty(16)))
    with pytest.raises(ValueError, match="format 'int4' is not one of"):
        quantize_rows(w, "int4")
