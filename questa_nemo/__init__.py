"""questa-nemo: QuestA (question-augmented GRPO for math reasoning) on megatron-core."""

__version__ = "0.1.0"
