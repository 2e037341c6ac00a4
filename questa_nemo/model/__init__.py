"""The policy on megatron-core: model build, parallel state, checkpoints, log-probs, conversion.

megatron-core prints notices at import and model build that ask nothing of the user here; they are filtered
before any module of this package imports megatron (every megatron import of questa-nemo goes through it):
- "Apex is not installed. Falling back to Torch Norm", "Transformer Engine and Apex are not installed. Falling
  back to Torch optimizers / local multi_tensor_*": megatron then uses torch's norms and optimizers, which is
  what questa-nemo expects without TE (`questa-nemo doctor` says whether Transformer Engine is there and which
  attention that gives).
- "full scope is deprecated. Use empty cuda_graph_scope": TransformerConfig's own default value (0.16+)
  triggers it; we never set cuda_graph_scope.
- torch's "Please use DTensor instead and we are deprecating ShardedTensor" and "`load_state_dict` is
  deprecated": megatron's dist_checkpointing still builds ShardedTensors and calls torch's older checkpoint
  API; nothing to do for the user.
"""

import warnings

MEGATRON_NOTICES = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`load_state_dict` is deprecated and will be removed",
)
for _message in MEGATRON_NOTICES:
    warnings.filterwarnings("ignore", message=_message)
