"""megatron's tensor-parallel linear layers, with a plain path when there is one tensor-parallel rank.

At TP = 1 megatron's ColumnParallelLinear / RowParallelLinear still route every call through two Python
autograd Functions (an identity "copy to / reduce from the TP region" and
`LinearWithGradAccumulationAndAsyncCommunication`), forward and backward, and add the bias in a kernel of
its own. Four per layer: on an H200 the 1.5B training step at 8K tokens waited on the host launching kernels
(GPU idle 73 of 246 ms in a profiled step; after this change 1 ms). These subclasses compute the same product with one `F.linear` (autograd
in C++, the bias in the GEMM's epilogue) whenever megatron's forward would reduce to it, and defer to it
otherwise. Parameters, state dict and sharded checkpoint layout are megatron's.

Under megatron's DistributedDataParallel (the trainer's policy) every weight has an fp32 `main_grad`, and
DDP's hook adds each micro-batch's bf16 weight gradient into it: one more kernel per weight per micro-batch
(~3.7 ms per 8K-token micro-batch of the 1.5B model on an H100). Megatron's own fusion of that add into the
GEMM (`gradient_accumulation_fusion`) needs apex's CUDA extension; `_LinearIntoMainGrad` does it with torch's
`addmm(..., out_dtype=float32)` where torch has it (probed once per device type: torch 2.11 has it on CUDA,
not on the CPU), telling DDP's hook through megatron's `grad_added_to_main_grad` flag, as megatron's fused path
does. Not in torch.compile'd layers (`keep_autograd_wgrad`: they keep autograd's path); on the CPU bit for bit
autograd's arithmetic (tests/test_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size

WGRAD_INTO_MAIN_GRAD = True  # add weight gradients into DDP's main_grad inside the GEMM (see above)
_out_dtype_addmm: dict[str, bool] = {}  # device type -> whether torch.addmm takes out_dtype there


def _plain(layer) -> bool:
    """What megatron's forward reduces to a single matmul for: one TP rank, no SP, no deferred or fused
    weight-gradient machinery, no activation offloading, no expert communication."""
    return (
        get_pg_size(layer.tp_group) == 1
        and not layer.sequence_parallel
        and not layer.gradient_accumulation_fusion
        and not layer.config.defer_embedding_wgrad_compute
        and layer.config._cpu_offloading_context is None
        and not layer.explicit_expert_comm
    )


def _has_out_dtype_addmm(device: torch.device) -> bool:
    if device.type not in _out_dtype_addmm:
        try:
            one = torch.ones(1, 1, device=device, dtype=torch.bfloat16)
            acc = torch.zeros(1, 1, device=device, dtype=torch.float32)
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            _out_dtype_addmm[device.type] = bool(acc.item() == 1.0)
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_addmm[device.type] = False
    return _out_dtype_addmm[device.type]


def add_weight_grad(main_grad: torch.Tensor, grad_output: torch.Tensor, input_: torch.Tensor) -> None:
    """main_grad += grad_output^T @ input_ (2-D: [tokens, out], [tokens, in]): the GEMM writes the sum itself
    where it can (same dtypes, or fp32 from bf16 through out_dtype); elsewhere the product, then the add
    DDP's hook would have done (autograd's own two kernels, bit for bit)."""
    if main_grad.device.type != "cpu":
        if main_grad.dtype == grad_output.dtype:
            main_grad.addmm_(grad_output.t(), input_)
            return
        if _has_out_dtype_addmm(main_grad.device):
            torch.addmm(main_grad, grad_output.t(), input_, out_dtype=main_grad.dtype, out=main_grad)
            return
    main_grad.add_(grad_output.t().mm(input_))


class _LinearIntoMainGrad(torch.autograd.Function):
    """F.linear whose weight gradient goes straight into `weight.main_grad` (megatron DDP's buffer); the
    weight gradient it returns to autograd is an uninitialised placeholder (torch.autograd.grad on these
    weights would get it: read main_grad instead)."""

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        # the parameter itself: under torch's non-reentrant checkpoint (recompute_impl=torch) the saved weight
        # comes back as a detached alias, without main_grad, and a flag set on it would not reach DDP's hook
        ctx.param = weight
        ctx.has_bias = bias is not None
        return F.linear(input_, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        add_weight_grad(ctx.param.main_grad, grad_2d, input_.reshape(-1, input_.shape[-1]))
        # megatron's protocol: with the flag set, DDP's hook drops the returned placeholder instead of adding
        # it (the placeholder keeps the hook firing, as DDP's overlapped reduce counts on)
        ctx.param.grad_added_to_main_grad = True
        grad_weight = torch.empty_like(weight)
        return grad_input, grad_weight, grad_2d.sum(0) if ctx.has_bias else None


def _linear(layer, input_, bias):
    weight = layer.weight
    if (
        WGRAD_INTO_MAIN_GRAD
        and layer.fuse_wgrad
        and weight.requires_grad
        and hasattr(weight, "main_grad")
        and hasattr(weight, "grad_added_to_main_grad")
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        return _LinearIntoMainGrad.apply(input_, weight, bias)
    return F.linear(input_, weight, bias)


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear; at TP = 1 one F.linear."""

    fuse_wgrad = True  # under DDP, the weight gradient into main_grad (off: keep_autograd_wgrad)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return _linear(self, input_, None), self.bias
        return _linear(self, input_, self.bias), None


class RowLinear(RowParallelLinear):
    """RowParallelLinear; at TP = 1 one F.linear."""

    fuse_wgrad = True  # as ColumnLinear's

    def forward(self, input_):
        if not _plain(self):
            return super().forward(input_)
        if self.skip_bias_add:
            return _linear(self, input_, None), self.bias
        return _linear(self, input_, self.bias), None


def keep_autograd_wgrad(module: torch.nn.Module) -> None:
    """Take `module`'s TP = 1 linear layers off the fused weight gradient for good: for layers that are
    torch.compile'd (build_model does this under model.compile). Once a weight's gradient has gone into
    main_grad in a step, DDP's hook drops every later autograd gradient of it in that step, so a layer must not
    switch paths within a step, as a compiled layer would whenever dynamo ran a call eagerly (a recompile
    limit, a guard it cannot compile)."""
    for layer in module.modules():
        if isinstance(layer, (ColumnLinear, RowLinear)):
            layer.fuse_wgrad = False
