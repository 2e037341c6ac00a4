"""Every test process, and every process a test starts (torchrun ranks inherit the environment), runs under
the NCCL-strict guard: model/parallel.py's `init_distributed` wraps torch.distributed's tensor collectives so
that one NCCL would reject (a CPU tensor not placed on the communication device) fails on CPU too, while gloo
still does the arithmetic. QUESTA_NCCL_STRICT=0 in the environment turns it off."""

import os

os.environ.setdefault("QUESTA_NCCL_STRICT", "1")

# Triton decides when a kernel is defined (`triton.jit`) whether it runs through its CPU interpreter: on a
# machine without a GPU the interpreter must be on before any test module imports our kernels, or a module
# that sets it itself (test_triton_kernels.py and the like) comes too late in a run of the whole suite.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
