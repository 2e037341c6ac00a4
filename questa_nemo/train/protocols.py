"""What the GRPO step is handed, as small protocols (torchtune's recipe interface, NeMo-RL's PolicyInterface):
the policy it trains and the rollouts it trains on. Implementations: model/policy.MegatronPolicy;
train/grpo.SyncRollouts (generate when asked) and train/async_rollouts.AsyncRollouts (a producer thread
samples ahead); tests hand in doubles. Nothing here imports megatron."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from questa_nemo.algo.filtering import FilledStep
    from questa_nemo.model.packing import PackedMicroBatch, TokenSequence
    from questa_nemo.model.policy import LossFn, MicroBatchLogprobs, StepStats
    from questa_nemo.train.grpo import Group


class Policy(Protocol):
    """The trained model as the step sees it: pack sequences, recompute log-probs, take an optimizer step.

    Every method is collective over the DP and model-parallel groups: all ranks call them together."""

    def eval(self) -> None:
        """Dropout off (rollouts and the log-prob pass)."""
        ...

    def pack(self, sequences: list[TokenSequence]) -> list[PackedMicroBatch]: ...

    def logprobs(self, micro_batches: list[PackedMicroBatch], temperature: float = 1.0) -> MicroBatchLogprobs:
        """Per-token log-probs and entropy without grad (the proximal policy of the decoupled loss)."""
        ...

    def train_step(
        self, micro_batches: list[PackedMicroBatch], loss_fn: LossFn, normaliser: float, temperature: float = 1.0
    ) -> StepStats:
        """Forward-backward over every micro-batch, then one optimizer update unless the gradient is non-finite."""
        ...


class Rollouts(Protocol):
    """Scored groups for each step, in order; where the prompt stream stands for a resume."""

    def next(self, step: int) -> FilledStep[Group]:
        """This rank's groups of step `step` (1-based), kept by dynamic filtering."""
        ...

    def source_state(self) -> dict:
        """Prompt-stream position after the last step handed out (what a resumed run restores)."""
        ...
