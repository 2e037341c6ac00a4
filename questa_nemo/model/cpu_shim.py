"""Let megatron-core run on a CPU-only torch (gloo), for unit tests and the embedded default.

megatron-core assumes CUDA in a few places that matter to us; each patch below redirects one of them to the
CPU. `apply()` is called by `init_distributed` only when `torch.cuda.is_available()` is False, and is
idempotent. On a GPU none of this runs; there the one other change to megatron is the spec provider
(model/spec.py) filling the fused-RoPE slots that Transformer Engine leaves empty.

What is patched, and why:
1. `torch.cuda.current_device()` -> "cpu": layers, rotary embeddings and p2p communication allocate on
   `device=torch.cuda.current_device()`; on CPU this places those tensors on the CPU.
2. `torch.cuda.synchronize()` -> no-op: p2p communication calls it after batched send/recv.
3. `torch.cuda.get_rng_state` / `torch.cuda.manual_seed` -> the CPU generator: the RNG tracker
   (`CudaRNGStatesTracker.add`) snapshots and seeds "the CUDA generator" per parallel region. As a
   consequence `model_parallel_cuda_manual_seed(seed)` also seeds torch's CPU generator with `seed`.
4. `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> CPU get/set: the tracker's
   `fork()` and activation recompute swap generator states through these two helpers.
5. `schedules.torch` -> a view of torch whose tensor factories (`zeros(..., device="cuda")`, ...) allocate on
   the CPU: the forward-backward schedules count tokens in a CUDA scalar.
6. `torch.Tensor.cuda` -> identity: with tied embeddings and PP > 1, megatron moves the last stage's copy of
   the embedding with `.cuda()` before all-reducing it from the first stage. Without CUDA that call could
   only raise, so no working code path changes meaning.
7. `torch` of megatron's optimizer, clip_grads, utils and param_and_grad_buffer modules -> the same view: the
   fp32 optimizer keeps its loss scale, the grad-norm helpers (utils.local_multi_tensor_l2_norm) their scratch
   scalars, and the grad buffers their counters in `torch.tensor(..., device="cuda")`. Only requests for a
   CUDA device change, and those could only raise without CUDA.
8. In that view, `torch.cuda.current_stream()` -> a stream that waits for nothing: megatron-core 0.19's
   `finish_grad_sync` takes the current stream to wait on CUDA-graph events (there are none on the CPU).
"""

from __future__ import annotations

import types

import torch

_APPLIED = False


def _cpu_device() -> str:
    return "cpu"


def _get_cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def _stay_on_cpu(self: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return self


class _NoStream:
    def wait_event(self, _event) -> None:
        pass

    def wait_stream(self, _stream) -> None:
        pass


def _cuda_on_cpu() -> types.ModuleType:
    """torch.cuda, but `current_stream()` is a stream that waits for nothing (8)."""
    view = types.ModuleType("torch_cuda_cpu_view")
    view.__getattr__ = lambda name: getattr(torch.cuda, name)
    view.current_stream = lambda *_args, **_kwargs: _NoStream()
    return view


def _torch_on_cpu() -> types.ModuleType:
    """A stand-in for the `torch` module whose tensor factories map device="cuda" to the CPU; all else is torch."""

    def on_cpu(factory):
        def make(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return factory(*args, device=device, **kwargs)

        return make

    view = types.ModuleType("torch_cpu_view")
    view.__getattr__ = lambda name: getattr(torch, name)  # module-level __getattr__ (PEP 562)
    view.cuda = _cuda_on_cpu()
    for name in ("zeros", "ones", "empty", "tensor", "full"):
        setattr(view, name, on_cpu(getattr(torch, name)))
    return view


def apply() -> None:
    """Install the CPU redirections (see the module docstring); a no-op when CUDA exists or when applied."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.distributed import param_and_grad_buffer as mcore_buffer
    from megatron.core.optimizer import clip_grads as mcore_clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_device  # 1
    torch.cuda.synchronize = lambda *_args, **_kwargs: None  # 2
    torch.cuda.get_rng_state = _get_cpu_rng_state  # 3
    torch.cuda.manual_seed = torch.manual_seed  # 3
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state  # 4
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state  # 4
    schedules.torch = _torch_on_cpu()  # 5
    for module in (mcore_optimizer, mcore_clip_grads, mcore_utils, mcore_buffer):  # 7
        module.torch = _torch_on_cpu()
    torch.Tensor.cuda = _stay_on_cpu  # 6
    _APPLIED = True
