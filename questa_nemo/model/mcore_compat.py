"""megatron-core's API differences between the versions we support (0.14 .. 0.19), guarded here and only here.

What differs, read from each release's source (pip download --no-deps megatron-core==X):
- `TransformerConfig.use_te_activation_func` and `MLPSubmodules.activation_func` (the MLP's activation as a
  submodule built from the layer spec) appear in 0.15. Before, the MLP always calls `config.activation_func`;
  our fused SwiGLU (model/fused.py) then cannot be plugged in, and megatron's own SwiGLU fusion
  (`bias_activation_fusion`) is used instead.
- The dense-MLP spec is a `ModuleSpec` up to 0.17 and a `functools.partial(MLP.as_mlp_submodule,
  submodules=MLPSubmodules(...))` from 0.18; megatron's `get_mlp_module_spec_for_backend` builds either from a
  backend spec provider (model/spec.py), and takes `use_te_activation_func` from 0.15.
- The `BackendSpecProvider` protocol: `activation_func()` from 0.15, `layer_norm(..., has_residual)` from 0.19,
  `grouped_mlp_modules`' arguments change (model/spec.py's provider accepts all of them).
- Core attention is built with `model_comm_pgs=` up to 0.14 and `pg_collection=` from 0.15
  (model/attention.py's SDPACoreAttention takes both).
- The checkpoint writer's results queue: `filesystem_async._get_write_results_queue()` up to 0.16, public
  `get_write_results_queue()` from 0.17; both fill the module global `_results_queue`, which we fill ourselves
  (`start_write_results_queue`).
- 0.17 and later require Python >= 3.12 (their wheels and metadata say so).
The tested range is pyproject.toml's `megatron-core` pin; docs/install.md has the table, bench/megatron_versions.sh
the check that fills it.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

try:
    MCORE_VERSION = version("megatron-core")
except PackageNotFoundError:  # a source checkout on PYTHONPATH
    from megatron.core import package_info

    MCORE_VERSION = package_info.__version__

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}

# 0.15+: the MLP's activation can be a submodule from the layer spec (our fused SwiGLU plugs in there)
HAS_ACTIVATION_SUBMODULE = "use_te_activation_func" in _CONFIG_FIELDS and "activation_func" in {
    f.name for f in dataclasses.fields(MLPSubmodules)
}


def activation_submodule_kwargs(use: bool) -> dict:
    """`use_te_activation_func`, TransformerConfig's and `get_mlp_module_spec_for_backend`'s switch of the
    activation submodule (none before 0.15)."""
    if not HAS_ACTIVATION_SUBMODULE:
        if use:
            raise ValueError(f"megatron-core {MCORE_VERSION} has no activation submodule (0.15+)")
        return {}
    return {"use_te_activation_func": use}


def dense_mlp_spec(backend):
    """megatron's dense-MLP spec of `backend`'s modules (`get_mlp_module_spec_for_backend`: a ModuleSpec up to
    0.17, a partial of `MLP.as_mlp_submodule` from 0.18), with `backend.activation_func()` as the activation
    submodule when it gives one (0.15+)."""
    use = backend.activation_func() is not None
    return get_mlp_module_spec_for_backend(backend=backend, **activation_submodule_kwargs(use))


def start_write_results_queue() -> None:
    """Start the checkpoint writer's results Manager now (model/checkpoint.py shields it from signals), as
    megatron's `get_write_results_queue()` (`_get_write_results_queue()` up to 0.16) would: a spawned
    SyncManager's Queue in `filesystem_async._results_queue`, the same global in every supported version.

    Started here rather than by megatron's getter so that the server exits with the process that started it:
    a trainer killed by SIGKILL runs no finalizer to stop it, and it ignores SIGTERM (shielded), so it stayed
    alive, holding the few hundred MB of a spawned Python with torch, seven of them after one day of CI on
    one machine (tests/test_train.py's SIGKILL resume)."""
    import gc
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    enabled = gc.isenabled()
    gc.disable()  # as megatron's getter (0.17+ decorates it with _disable_gc)
    try:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_exit_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # its proxy keeps the manager alive, as megatron's does
    finally:
        if enabled:
            gc.enable()


PARENT_POLL_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """The Manager server's initializer: a daemon thread ends the server once its parent process is gone (it
    is reparented), within PARENT_POLL_S."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
