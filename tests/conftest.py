"""Every test process, and every process a test starts (torchrun ranks inherit the environment), runs under
the NCCL-strict guard: model/parallel.py's `init_distributed` wraps torch.distributed's tensor collectives so
that one NCCL would reject (a CPU tensor not placed on the communication device) fails on CPU too, while gloo
still does the arithmetic. QUESTA_NCCL_STRICT=0 in the environment turns it off."""

import os

os.environ.setdefault("QUESTA_NCCL_STRICT", "1")
