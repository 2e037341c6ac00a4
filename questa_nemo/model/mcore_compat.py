"""megatron-core's API differences between the versions we support (0.14 .. 0.19), guarded here and only here.

What differs, read from each release's source (pip download --no-deps megatron-core==X):
- `TransformerConfig.use_te_activation_func` and `MLPSubmodules.activation_func` (the MLP's activation as a
  submodule built from the layer spec) appear in 0.15. Before, the MLP always calls `config.activation_func`;
  our fused SwiGLU (model/fused.py) then cannot be plugged in, and megatron's own SwiGLU fusion
  (`bias_activation_fusion`) is used instead.
- The local layer spec's `mlp` is a `ModuleSpec` up to 0.17 and a `functools.partial(MLP.as_mlp_submodule,
  submodules=MLPSubmodules(...))` from 0.18; the submodules live in `.submodules` or `.keywords["submodules"]`.
- Core attention is built with `model_comm_pgs=` up to 0.14 and `pg_collection=` from 0.15
  (model/attention.py's SDPACoreAttention takes both).
- The checkpoint writer's results queue: `filesystem_async._get_write_results_queue()` up to 0.16, public
  `get_write_results_queue()` from 0.17.
- 0.17 and later require Python >= 3.12 (their wheels and metadata say so).
The tested range is pyproject.toml's `megatron-core` pin; docs/install.md has the table, bench/megatron_versions.sh
the check that fills it.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib.metadata import PackageNotFoundError, version

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
    """TransformerConfig kwargs that switch the activation submodule on or off (none before 0.15)."""
    if not HAS_ACTIVATION_SUBMODULE:
        if use:
            raise ValueError(f"megatron-core {MCORE_VERSION} has no activation submodule (0.15+)")
        return {}
    return {"use_te_activation_func": use}


def mlp_submodules(layer_spec) -> MLPSubmodules:
    """The MLPSubmodules of a decoder-layer spec, whether its `mlp` is a ModuleSpec (<= 0.17) or a partial."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):
        return mlp.keywords["submodules"]
    return mlp.submodules


def start_write_results_queue() -> None:
    """Start the checkpoint writer's results Manager now (model/checkpoint.py shields it from signals):
    `_get_write_results_queue()` up to 0.16, public `get_write_results_queue()` from 0.17."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    getter = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    getter()
