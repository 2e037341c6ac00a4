"""Plain Hugging Face transformers generation: the reference the other backends are tested against.

Simple on purpose: one left-padded `generate` call per chunk of prompts, each prompt repeated n times
(transformers' greedy search rejects num_return_sequences > 1). Log-probs
are log_softmax(logits / temperature) of each chosen token (raw logits at temperature 0), the same quantity the
Megatron backend returns; a logits processor records them one step behind, so no [B, steps, vocab] tensor is
ever kept. Sampling draws from torch's global RNG seeded with `params.seed` (transformers takes no generator),
so a seeded call is reproducible but the samples differ from other backends'. With `params.prompt_keys` the
seed is mixed with the first prompt's key, so calls for different prompts (another chunk, another DP rank)
draw different streams; unlike the megatron engine's, hf's samples still depend on how prompts are batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from questa_nemo.config import RolloutConfig
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams
from questa_nemo.rollout.sampling import sequence_key


def build(cfg: RolloutConfig, ctx: RolloutContext) -> HFBackend:
    """The registry's constructor: a transformers model of the policy's config.json (dtype and device of the
    trainer's chunks), loaded with the trainer's weights gathered from every shard, refreshed on each update."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if ctx.hf_config is None:
        raise ValueError("rollout.backend=hf needs the model's config.json (RolloutContext.hf_config)")
    like = next(ctx.chunks[0].parameters())
    config = AutoConfig.for_model(**dict(ctx.hf_config))
    model = AutoModelForCausalLM.from_config(config, dtype=like.dtype).to(like.device)
    backend = HFBackend(model, ctx.pad_token_id, cfg.max_batch_sequences, ctx.hf_weights)
    backend.update_weights(ctx.version)
    return backend


class _LogprobRecorder(LogitsProcessor):
    """Sees the raw logits before temperature/top-p warpers; gathers step t's token log-prob at step t+1."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not yet known
        self.taken: list[torch.Tensor] = []  # per step [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        logits = scores.float()
        self.previous = (logits / self.temperature if self.temperature > 0 else logits).log_softmax(-1)
        return scores

    def take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, tokens[:, None])[:, 0])
            self.previous = None


class HFBackend:
    """GenerationBackend over a transformers causal LM; `weights_fn` supplies HF-named tensors on update."""

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int = 0,
        batch_sequences: int = 64,
        weights_fn: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        version: int = 0,
    ):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.batch_sequences = batch_sequences  # sequences per generate call
        self.weights_fn = weights_fn
        self.version = version

    def update_weights(self, version: int) -> None:
        """Load `weights_fn`'s tensors (every one the model has; a tied head may be left out)."""
        if self.weights_fn is not None:
            missing, unexpected = self.model.load_state_dict(dict(self.weights_fn()), strict=False)
            tied = getattr(self.model.config, "tie_word_embeddings", False)
            missing = [name for name in missing if not (tied and name == "lm_head.weight")]
            if missing or unexpected:
                raise ValueError(f"hf backend: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.version = version

    def sleep(self) -> None:
        """transformers keeps no cache between calls; nothing to release."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        started = time.perf_counter()
        torch.manual_seed(sequence_key(params.seed, params.prompt_keys[0], 0) if params.prompt_keys else params.seed)
        per_call = max(1, self.batch_sequences // params.n)
        completions: list[list[Completion]] = []
        for start in range(0, len(prompts), per_call):
            completions += self._generate_chunk(prompts[start : start + per_call], params)
        seconds = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        return GenerationResult(
            completions, {"tokens": float(tokens), "seconds": seconds, "tokens_per_second": tokens / seconds}
        )

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(params.n)]  # row i * n + j: sample j of prompt i
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        stops = [] if params.ignore_eos else list(params.stop_token_ids)
        sample = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            eos_token_id=stops or None,
            pad_token_id=self.pad_token_id,
        )
        recorder = _LogprobRecorder(params.temperature)
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        generated = out[:, width:]  # [B * n, steps]
        recorder.take(generated[:, -1])
        logprobs = torch.stack(recorder.taken, dim=1).cpu()  # [B * n, steps]
        outputs = generated.cpu().tolist()
        result: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(params.n):
                row = outputs[i * params.n + j]
                end = next((k + 1 for k, tok in enumerate(row) if tok in stops), None)
                reason = "stop" if end is not None else "length"
                end = end or len(row)
                group.append(
                    Completion(row[:end], logprobs[i * params.n + j, :end].tolist(), reason, self.version)
                )
            result.append(group)
        return result
