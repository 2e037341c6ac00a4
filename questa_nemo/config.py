"""Config schemas for every recipe stage, and their validation.

The YAML files under conf/ are commented examples of these schemas; Hydra composes them and command-line
overrides (`train.steps=10`) apply on top. `load_config` merges the composed YAML into the dataclasses below
(OmegaConf rejects unknown keys and wrong types, naming the key) and `validate` runs each section's own
`validate()` and the relations between sections before any process group or GPU is touched. Nothing here reads
a file at load: the checks against the model's config.json (TP must divide the heads, ...) run at build time,
in `validate_model_shapes`, called where config.json is read to build the model.

Every knob of the reference recipe (docs/recipe.md) keeps its meaning here; the comment on each field
names its reference counterpart where there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _at_least(section: str, obj: Any, keys: tuple[str, ...], low: int) -> None:
    """Raise ConfigError naming the first of `keys` (fields of `obj`, the `section` config) below `low`."""
    for key in keys:
        if getattr(obj, key) < low:
            raise ConfigError(f"{section}.{key}", f"must be >= {low}")


# --------------------------------------------------------------------------------------------- data
@dataclass
class DifficultyFilterConfig:
    pass_rate_file: str | None = None  # JSONL written by `questa-nemo eval mode=profile`; None = no filter
    min_pass_rate: float = 0.0  # keep problems with min <= pass rate <= max
    max_pass_rate: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.min_pass_rate <= self.max_pass_rate <= 1:
            raise ConfigError(
                "data.difficulty.min_pass_rate", "need 0 <= min_pass_rate <= max_pass_rate <= 1"
            )


@dataclass
class DataConfig:
    """`questa-nemo data build`: raw problems -> hinted prompts, one split per hint ratio."""

    inputs: list[str] = field(default_factory=list)  # parquet / jsonl files, or datasets save_to_disk folders
    input_format: str = "auto"  # auto | openr1 | reference_jsonl
    output_dir: str = "outputs/data"
    hint_ratios: list[float] = field(default_factory=lambda: [50.0, 25.0])  # p in "first p% of the solution"
    cut_mode: str = "char"  # char (reference parity) | token | sentence | step
    tokenizer: str | None = None  # HF tokenizer folder, needed by cut_mode=token and by chat templates
    min_hint_chars: int = 10  # reference: a hint under 10 characters is left out
    prompt_separator: str = "\n\n"  # reference: problem + "\n\n" + "## Hint." + hint
    hint_prefix: str = "## Hint."  # opens the hint section of the prompt
    hint_slot_chars: int = 0  # > 0: pad every prompt's hint to this width with "_" (small world); 0 = reference
    answer_leak: str = "keep"  # keep (reference) | drop | recut: hints that already contain the final answer
    test_size: int = 0  # rows held out into the `test` split (reference DatasetDict has train/test)
    output_formats: list[str] = field(default_factory=lambda: ["hf_disk"])  # hf_disk | jsonl | parquet
    # row id "<source_id>@p<ratio>" (unique over all ratios); false: the source id, the same in every ratio's
    # split, which is how algo.hints.splits matches one problem's prompts across ratios (the small worlds)
    id_with_ratio: bool = True
    difficulty: DifficultyFilterConfig = field(default_factory=DifficultyFilterConfig)
    seed: int = 1
    field_map: dict[str, str] = field(default_factory=dict)  # e.g. {problem: question} for other readers
    max_rows: int | None = None  # read at most this many input rows (smoke runs)

    def validate(self) -> None:
        for r in self.hint_ratios:
            if not 0 <= r <= 100:
                raise ConfigError("data.hint_ratios", f"ratio {r} is outside [0, 100]")
        if self.cut_mode == "token" and not self.tokenizer:
            raise ConfigError("data.tokenizer", "cut_mode=token needs a tokenizer folder")
        self.difficulty.validate()


@dataclass
class WorldConfig:
    """The embedded default's small world: procedural multi-step arithmetic mod 100."""

    max_ops: int = 8  # N: longest chain
    modulus: int = 100
    hard_min_ops: int = 7  # the "hard" range RL trains and evaluates on
    warmup_examples: int = 20000
    # longest chain in the supervised warm-up (None: max_ops, every length). Below hard_min_ops, the warm-up
    # never shows a whole hard chain: unhinted hard problems stay hard at the RL start while a hint that gives
    # their first steps leaves a continuation as long as the chains the warm-up taught
    warmup_max_ops: int | None = None
    rl_problems: int = 4000
    eval_problems: int = 500
    calib_problems_per_length: int = 100  # no-hint problems per chain length 1..max_ops (calibration set)
    # RL sets written; p50 holds the first floor((n + 1) / 2) of a solution's n + 1 lines
    hint_ratios: list[float] = field(default_factory=lambda: [50.0, 0.0])
    output_dir: str = "outputs/world"  # `questa-nemo world` writes raw/, rl/, eval/, calib/, warmup.jsonl here
    seed: int = 1

    @property
    def warmup_ops(self) -> int:
        """The longest chain the warm-up draws."""
        return self.warmup_max_ops or self.max_ops

    def validate(self) -> None:
        if not 1 <= self.hard_min_ops <= self.max_ops:
            raise ConfigError("world.hard_min_ops", f"need 1 <= hard_min_ops <= max_ops={self.max_ops}")
        if self.warmup_max_ops is not None and not 1 <= self.warmup_max_ops <= self.max_ops:
            raise ConfigError("world.warmup_max_ops", f"need 1 <= warmup_max_ops <= max_ops={self.max_ops} or null")


# -------------------------------------------------------------------------------------------- model
# Why model.context_parallel > 1 is refused (by validate and by `questa-nemo doctor`).
CONTEXT_PARALLEL_UNSUPPORTED = (
    "context parallelism is not supported: our SDPA core attention (model/attention.py) has no CP, and "
    "packed micro-batches are not split over CP ranks; use 1"
)


@dataclass
class ModelConfig:
    """The policy: a megatron-core GPTModel built from a Hugging Face config.json."""

    hf_config: str | None = None  # config.json, or a folder holding one (Qwen2 / Llama / Mistral)
    checkpoint: str | None = None  # weights to start from: HF folder, .nemo, GGUF, or one of our checkpoints
    tokenizer: str | None = None  # HF tokenizer folder; defaults to the hf_config folder
    params_dtype: str = "bf16"  # bf16 | fp32 (CPU runs use fp32)
    # auto (TE if importable, else sdpa) | te | sdpa | local | fa4 (FlashAttention 4's kernels, pip flash-attn-4:
    # Hopper / Blackwell GPUs; model/flash4.py)
    attention: str = "auto"
    # how SDPA core attention attends packed micro-batches: sdpa = per-segment / batched SDPA calls; varlen = all
    # segments in one call of torch's flash variable-length kernel (GPU, bf16 / fp16, torch >= 2.10; not with
    # TE or local attention); auto = varlen where usable, else sdpa (model/megatron.py packed_varlen_on). auto:
    # on an H100 the trainer's packed rows ran 1.79x faster through varlen, the GRPO step 1.27x (README)
    packed_attention: str = "auto"
    recompute: str = "full"  # none | full | selective  (reference: activation checkpointing on)
    # recompute=selective: megatron submodules recomputed in backward (core_attn | mlp | layernorm)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn", "mlp"])
    # recompute=full: recompute only the first N layers of each pipeline stage (None = all of them)
    recompute_num_layers: int | None = None
    # recompute=full by megatron's reentrant checkpoint (megatron) or torch's non-reentrant one per layer (torch:
    # stops early, so the MLP down projection's forward is not rerun; model/recompute.py)
    recompute_impl: str = "megatron"
    # recompute_impl=torch: keep each layer's SDPA attention output instead of recomputing attention in backward
    # (about s x hidden x 2 bytes more a layer; not with TE attention)
    recompute_keep_attention: bool = False
    # recompute_impl=torch: keep each layer's SwiGLU output instead of rerunning it in backward (s x ffn x 2 bytes
    # more a layer: 587 MB at 32K on the 1.5B shape; needs our fused SwiGLU: fusions on a GPU, not with TE)
    recompute_keep_swiglu: bool = False
    fusions: bool = True  # fused RoPE, SwiGLU and RMSNorm kernels (model/fused.py; GPU only, ignored on CPU)
    compile: bool = False  # torch.compile every decoder layer (GPU only, ignored on CPU; not with TE attention)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    # tokens per chunk of the log-prob head (vocab-parallel logits); the last chunk's logits are kept
    logprob_chunk_tokens: int = 8192
    seed: int = 1

    def validate(self) -> None:
        """Relations between this section's keys; the model's shapes are checked at build time
        (`validate_model_shapes`), where its config.json is read anyway."""
        _at_least("model", self, ("tensor_parallel", "pipeline_parallel", "context_parallel"), 1)
        if self.context_parallel > 1:
            raise ConfigError("model.context_parallel", CONTEXT_PARALLEL_UNSUPPORTED)
        n = self.recompute_num_layers
        if n is not None and (self.recompute != "full" or n < 1):
            raise ConfigError("model.recompute_num_layers", "needs recompute=full and a value >= 1")
        if self.recompute_impl != "megatron" and self.recompute != "full":
            raise ConfigError("model.recompute_impl", "needs recompute=full")
        if self.recompute_keep_attention and (self.recompute != "full" or self.recompute_impl != "torch"):
            raise ConfigError("model.recompute_keep_attention", "needs recompute=full and recompute_impl=torch")
        if self.recompute_keep_swiglu and (self.recompute != "full" or self.recompute_impl != "torch"):
            raise ConfigError("model.recompute_keep_swiglu", "needs recompute=full and recompute_impl=torch")
        if self.attention == "fa4" and self.params_dtype != "bf16":
            raise ConfigError("model.params_dtype", "attention=fa4 needs bf16 (FlashAttention 4's kernels are bf16)")
        if self.virtual_pipeline is not None and self.pipeline_parallel < 2:
            raise ConfigError("model.virtual_pipeline", "needs pipeline_parallel >= 2")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ConfigError("model.sequence_parallel", "needs tensor_parallel >= 2")


# ------------------------------------------------------------------------------------------ rollout
@dataclass
class RolloutConfig:
    backend: str = "megatron"  # a name in ROLLOUT_BACKENDS: megatron | hf | trtllm
    n_samples: int = 16  # group size (reference: 16)
    temperature: float = 1.0
    top_p: float = 1.0  # reference training: no top-p
    max_new_tokens: int = 24000
    max_prompt_tokens: int = 4096  # 2048 in stage 2; longer prompts are counted and skipped
    max_batch_sequences: int = 512  # sequences decoded at once by the engine
    cuda_graphs: bool = True  # capture the decode step on GPU
    kv_cache_memory_fraction: float = 0.5  # megatron, trtllm: share of free GPU memory for the KV cache
    prefill_chunk_tokens: int = 2048  # megatron: prompt tokens per prefill forward (bounds activation memory)
    # megatron: KV-cache layout. paged: blocks allocated by actual length, each sequence reading only its own
    # (H100, 1.5B shape: 1.23x the contiguous cache at 256 x (1K + 2K), 1.57x with R1-like lengths up to 8K,
    # bench/results/rollout_paged_h100.json); contiguous: one max-length row per slot; auto: paged on GPU,
    # contiguous on CPU (the same tokens either way; the paged CPU path is a reference gather, not faster)
    kv_cache: str = "auto"
    tensor_parallel: int = 1  # trtllm: engine TP = model.tensor_parallel x model.pipeline_parallel
    trtllm_refit_bucket_mb: int = 1024  # trtllm: weights per update_weights RPC (each rank's GPU holds one)
    trtllm_release_weights: bool = False  # trtllm: sleep also drops the engine's weights (the refit refills)
    max_staleness: int = 0  # 0 = synchronous; async: samples at most this many policy versions old (ref: 4)
    # async on GPU: the producer decodes on a CUDA stream of its own, so its kernels run concurrently with the
    # trainer's (the same tokens; off: both threads queue on the default stream and the GPU runs one at a time)
    producer_stream: bool = False
    seed: int = 1

    def validate(self) -> None:
        if self.backend not in ROLLOUT_BACKENDS:  # the registry, defined below
            raise ConfigError("rollout.backend", f"{self.backend!r} is not one of {', '.join(ROLLOUT_BACKENDS)}")
        if self.n_samples < 1:
            raise ConfigError("rollout.n_samples", "must be >= 1")
        if self.temperature < 0:
            raise ConfigError("rollout.temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p", "must be in (0, 1]")
        if self.max_staleness < 0:
            raise ConfigError("rollout.max_staleness", "must be >= 0")
        keys = ("max_batch_sequences", "prefill_chunk_tokens", "max_new_tokens", "tensor_parallel")
        _at_least("rollout", self, keys, 1)
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError("rollout.kv_cache_memory_fraction", "must be in (0, 1]")
        if self.backend == "trtllm" and self.trtllm_refit_bucket_mb < 1:
            raise ConfigError("rollout.trtllm_refit_bucket_mb", "must be >= 1")


# ------------------------------------------------------------------------------------------- reward
@dataclass
class RewardConfig:
    kind: str = "math"  # math (math-verify, worker processes) | world (exact integer answer)
    scaling: float = 5.0  # reference reward_scaling
    bias: float = 0.0  # reference reward_bias
    clip: float = 20.0  # reference max_reward_clip
    num_workers: int = 4  # math: worker processes running math-verify (about one per spare CPU core)
    timeout_s: float = 5.0  # math: soft limit per completion in the worker (SIGALRM); past it: 0, timeout
    kill_grace_s: float = 1.0  # math: a worker still busy timeout_s + this later is killed and replaced
    max_answer_chars: int = 1000  # math: longer extracted answers score 0 (parse_error) before any parsing
    memory_limit_mb: int = 4096  # math: heap cap of each worker (RLIMIT_DATA); 0 = no cap
    start_method: str = "spawn"  # math: spawn | forkserver (never fork: the trainer holds torch threads)
    overlong: str = "none"  # none | mask (drop truncated completions from the loss) | penalty
    overlong_penalty: float = 0.0  # reward given to a truncated completion when overlong=penalty

    def validate(self) -> None:
        _at_least("reward", self, ("num_workers", "max_answer_chars"), 1)
        if self.timeout_s <= 0:
            raise ConfigError("reward.timeout_s", "must be > 0")
        _at_least("reward", self, ("kill_grace_s", "memory_limit_mb"), 0)


# ------------------------------------------------------------------------------------ adaptive hints
HINT_MODES: tuple[str, ...] = ("fixed", "adaptive")
HINT_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "stages")  # algo/hint_levels.py SCHEDULES


def split_ratio(key: str) -> float:
    """Hint ratio (percent) of an algo.hints.splits key: "50" or "p50" (data/outputs.py's folder name)."""
    return float(key[1:] if key.startswith("p") else key)


@dataclass
class HintLevelsConfig:
    """Per-problem hint levels (algo/hint_levels.py HintLevels): level k shows min(k * ratio_per_level, 100)
    percent of the reference solution."""

    min: int = 0
    max: int = 4
    step: int = 1  # levels moved per update (all wrong: up, all right: down)
    initial: int = 2  # level of a problem not seen yet
    ratio_per_level: float = 25.0


@dataclass
class HintScheduleConfig:
    kind: str = "constant"  # constant | linear | cosine (anneal to 0 at `end`) | stages (QuestA's 50 then 25)
    end: float = 1.0  # training progress at which linear / cosine reach 0
    boundaries: list[float] = field(default_factory=list)  # stages: progress where each stage ends, e.g. [0.5, 1]
    ratios: list[float] = field(default_factory=list)  # stages: hint ratio (percent) per stage, e.g. [50, 25]


@dataclass
class HintsConfig:
    """Which hint each drawn problem is shown (docs: issue 20). Defaults = the prompts as the data set was
    built (QuestA's fixed ratio), bit for bit."""

    mode: str = "fixed"  # fixed: the data set's / schedule's ratio | adaptive: per-problem level, moved by outcome
    # hint ratio in percent as a string ("0", "25", ... or the data build's folder names "p0", "p25", ...; on the
    # command line only the p form parses: algo.hints.splits={p0: path, p50: path}) -> data set built with that
    # ratio (rows matched by id);
    # needed by adaptive, schedules other than constant, unhinted_share > 0 and unhinted_correction ("0")
    splits: dict[str, str] = field(default_factory=dict)
    levels: HintLevelsConfig = field(default_factory=HintLevelsConfig)
    max_retries: int = 0  # in-step retries of an all-fail group with a longer hint (adaptive; 0 = off)
    unhinted_share: float = 0.0  # share of each group's samples drawn from the prompt without a hint
    schedule: HintScheduleConfig = field(default_factory=HintScheduleConfig)
    unhinted_correction: bool = False  # weight hinted samples by p(completion | no hint) / p(.. | hint)
    correction_cap: float = 5.0  # tokens whose correction weight exceeds this are masked out

    def split_ratios(self) -> list[float]:
        return sorted(split_ratio(k) for k in self.splits)

    def needs_splits(self) -> bool:
        return (self.mode == "adaptive" or self.schedule.kind != "constant" or self.unhinted_share > 0
                or self.unhinted_correction)

    def validate(self, key: str = "algo.hints") -> None:
        if self.mode not in HINT_MODES:
            raise ConfigError(f"{key}.mode", f"{self.mode!r} is not one of {', '.join(HINT_MODES)}")
        for name, path in self.splits.items():
            try:
                ratio = split_ratio(name)
            except ValueError:
                raise ConfigError(f"{key}.splits", f"key {name!r} is not a hint ratio in percent") from None
            if not 0 <= ratio <= 100:
                raise ConfigError(f"{key}.splits", f"ratio {name} is outside [0, 100]")
            if not path:
                raise ConfigError(f"{key}.splits.{name}", "is empty")
        lv = self.levels
        if not 0 <= lv.min <= lv.max:
            raise ConfigError(f"{key}.levels.min", f"need 0 <= min <= max, got {lv.min}, {lv.max}")
        if not lv.min <= lv.initial <= lv.max:
            raise ConfigError(f"{key}.levels.initial", f"{lv.initial} is outside [{lv.min}, {lv.max}]")
        if lv.step < 1:
            raise ConfigError(f"{key}.levels.step", "must be >= 1")
        if not lv.ratio_per_level > 0:
            raise ConfigError(f"{key}.levels.ratio_per_level", "must be > 0")
        if self.max_retries < 0:
            raise ConfigError(f"{key}.max_retries", "must be >= 0")
        if self.max_retries > 0 and self.mode != "adaptive":
            raise ConfigError(f"{key}.max_retries", "retries move the per-problem level: need mode=adaptive")
        if not 0 <= self.unhinted_share <= 1:
            raise ConfigError(f"{key}.unhinted_share", "must be in [0, 1]")
        if self.correction_cap <= 0:
            raise ConfigError(f"{key}.correction_cap", "must be > 0")
        sc = self.schedule
        if sc.kind not in HINT_SCHEDULES:
            raise ConfigError(f"{key}.schedule.kind", f"{sc.kind!r} is not one of {', '.join(HINT_SCHEDULES)}")
        if not 0 < sc.end <= 1:
            raise ConfigError(f"{key}.schedule.end", "must be in (0, 1]")
        if sc.kind == "stages":
            if not sc.ratios or len(sc.ratios) != len(sc.boundaries):
                raise ConfigError(f"{key}.schedule.ratios", "stages need one ratio per boundary (and at least one)")
            if any(b <= a for a, b in zip(sc.boundaries, sc.boundaries[1:])) or sc.boundaries[-1] < 1:
                raise ConfigError(f"{key}.schedule.boundaries", "must increase and end at >= 1")
            if self.mode != "fixed":
                raise ConfigError(f"{key}.schedule.kind", "stages give the ratio itself: need mode=fixed")
        if self.needs_splits() and not self.splits:
            raise ConfigError(f"{key}.splits", "mode=adaptive, a schedule other than constant, unhinted_share > 0 "
                              "and unhinted_correction need the data sets of each hint ratio")
        ratios = self.split_ratios()
        top = min(lv.max * lv.ratio_per_level, 100.0)
        if self.mode == "adaptive" and ratios and top > ratios[-1] + 1e-9:
            raise ConfigError(f"{key}.levels.max", f"level {lv.max} shows {top:g}% but the largest split is "
                              f"{ratios[-1]:g}%: it would serve the same prompt as a lower level (and retry to it)")
        if (self.unhinted_share > 0 or self.unhinted_correction) and 0.0 not in ratios:
            raise ConfigError(f"{key}.splits", "unhinted_share / unhinted_correction need the unhinted split \"0\"")
        if sc.kind == "stages":
            for r in sc.ratios:
                if not any(abs(r - x) < 1e-9 for x in ratios):
                    raise ConfigError(f"{key}.schedule.ratios", f"ratio {r} has no split in {key}.splits")


# --------------------------------------------------------------------------------------- algorithm
@dataclass
class AlgoConfig:
    advantage: str = "reference"  # reference (batch token norm) | grpo (group mean/std) | drgrpo (group mean)
    adv_norm: bool = True  # reference: normalise over all completion tokens of the batch
    group_std: bool = True  # grpo: divide by the group std
    eps: float = 1e-5  # reference advantage-normalisation eps
    clip_eps: float = 0.2  # PPO clip
    clip_eps_high: float | None = None  # clip-higher (DAPO); None = symmetric
    # token (reference: token mean over the step) | sequence (mean of per-sequence means) | sequence_sum
    # (Dr. GRPO: token sum / (sequences x rollout.max_new_tokens), no length normalisation)
    loss_agg: str = "token"
    behave_imp_weight_cap: float | None = 5.0  # decoupled loss: tokens above the cap are masked out
    kl_coef: float = 0.0  # reference kl_ctl 0: no reference model is built
    kl_type: str = "k3"  # k1 | k3
    filter_min_success: float = 0.05  # dynamic filtering: keep groups with success rate in [min, max]
    filter_max_success: float = 0.95
    filter_enabled: bool = True
    max_prompt_batches: int = 4  # bound on extra prompt batches drawn to refill a filtered step
    # The decoupled loss's proximal log-probs. recompute: a no-grad forward over the step's tokens before the
    # update. train_forward: the update's own forward, detached, and no extra pass; the same loss and gradient
    # (up to the rounding between two forwards): the step makes ONE optimizer update from the weights that
    # pass would read, so the PPO ratio is 1 in value, whatever the samples' staleness (the behaviour weights
    # exp(proximal - behaviour) are kept). Not with hints.unhinted_correction (it reweights the advantages by
    # the proximal log-probs before the update).
    proximal_logprobs: str = "recompute"
    hints: HintsConfig = field(default_factory=HintsConfig)  # adaptive hints (issue 20); defaults = none

    def validate(self) -> None:
        self.hints.validate()
        if not 0 <= self.filter_min_success <= self.filter_max_success <= 1:
            raise ConfigError(
                "algo.filter_min_success", "need 0 <= filter_min_success <= filter_max_success <= 1"
            )
        if self.clip_eps <= 0:
            raise ConfigError("algo.clip_eps", "must be > 0")
        if self.behave_imp_weight_cap is not None and self.behave_imp_weight_cap <= 0:
            raise ConfigError("algo.behave_imp_weight_cap", "must be > 0 or null")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError("algo.clip_eps_high", "must be > 0 or null")
        if self.advantage == "drgrpo" and self.loss_agg != "sequence_sum":
            raise ConfigError(
                "algo.loss_agg", "advantage=drgrpo needs sequence_sum (no length normalisation)"
            )
        if self.kl_coef < 0:
            raise ConfigError("algo.kl_coef", "must be >= 0")
        if self.kl_coef > 0:
            raise ConfigError(
                "algo.kl_coef", f"{self.kl_coef} needs a frozen reference model, which the trainer does not build; "
                "use 0 (the QuestA / AReaL recipe trains without a KL term)",
            )
        if self.max_prompt_batches < 0:
            raise ConfigError("algo.max_prompt_batches", "must be >= 0")
        if self.proximal_logprobs == "train_forward" and self.hints.unhinted_correction:
            raise ConfigError(
                "algo.proximal_logprobs", "train_forward has no log-probs before the update, which "
                "algo.hints.unhinted_correction reweights the advantages with; use recompute",
            )


# ---------------------------------------------------------------------------------------- optimizer
@dataclass
class OptimConfig:
    """megatron Adam (decoupled weight decay) + constant lr after a linear warm-up; see model/policy.py."""

    lr: float = 2e-5  # reference: constant 2e-5
    warmup_ratio: float = 0.001  # reference: 0.1% of steps; warm-up steps = ceil(ratio x train.steps)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    weight_decay: float = 0.05  # not applied to biases and norm weights
    grad_clip: float = 1.0  # max global L2 norm of the gradient (0 = no clipping)
    distributed: bool = True  # megatron distributed optimizer (state sharded over DP); GPU only

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr", "must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("optim.warmup_ratio", "must be in [0, 1)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}", "must be in [0, 1)")
        if self.adam_eps <= 0:
            raise ConfigError("optim.adam_eps", "must be > 0")
        _at_least("optim", self, ("weight_decay", "grad_clip"), 0)


# -------------------------------------------------------------------------------------------- train
@dataclass
class WarmupConfig:
    """Supervised warm-up before RL (the embedded default needs one; the reference recipe does not)."""

    steps: int = 0  # at most this many updates (all of them when stop_at_pass1 is null)
    batch_size: int = 64
    lr: float = 2e-3
    hint_fraction: float = 0.4
    # Stop once the pass@1 of the calibration set's hard problems with the RL hint reaches this, checked every
    # check_every steps: the small world's learning turns sharply, so the RL start is picked by calibration,
    # not by a step count (docs/world.md). null: run `steps`.
    stop_at_pass1: float | None = None
    check_every: int = 100
    # Once the hinted rate reaches a third of stop_at_pass1 the turn has begun: check every check_every_near
    # steps instead (null: check_every throughout). The stop also ends the warm-up once the no-hint rate
    # passes max_no_hint_pass1, and keeps the checked weights closest to the band (validation.StopRule).
    check_every_near: int | None = None
    max_no_hint_pass1: float | None = None

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("train.warmup.steps", "must be >= 0")
        if self.stop_at_pass1 is not None:
            if not 0 < self.stop_at_pass1 <= 1:
                raise ConfigError("train.warmup.stop_at_pass1", "must be in (0, 1] or null")
            if self.check_every < 1:
                raise ConfigError("train.warmup.check_every", "must be >= 1")
            if self.check_every_near is not None and self.check_every_near < 1:
                raise ConfigError("train.warmup.check_every_near", "must be >= 1 or null")
            if self.max_no_hint_pass1 is not None and not 0 < self.max_no_hint_pass1 <= 1:
                raise ConfigError("train.warmup.max_no_hint_pass1", "must be in (0, 1] or null")


ARM_KEYS = ("dataset", "hints", "token_budget")


@dataclass(frozen=True)
class ArmSpec:
    """One entry of train.arms, parsed: its data set, the algo.hints keys it sets, its generated-token budget."""

    name: str
    dataset: str
    hints: dict[str, Any] = field(default_factory=dict)
    token_budget: int | None = None


def arm_spec(name: str, value: Any) -> ArmSpec:
    """train.arms.<name> as an ArmSpec: a path string, or a mapping with the keys ARM_KEYS (dataset required).
    ConfigError names the key."""
    key = f"train.arms.{name}"
    if not name or not str(name).isidentifier():
        raise ConfigError(key, "an arm's name must be an identifier (it names the folder run_dir/<arm>)")
    if isinstance(value, str):
        if not value:
            raise ConfigError(key, "empty data set path")
        return ArmSpec(name, value)
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise ConfigError(key, f"give a data set path or a mapping with {', '.join(ARM_KEYS)}; got {value!r}")
    unknown = sorted(set(value) - set(ARM_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (an arm takes {', '.join(ARM_KEYS)})")
    dataset = value.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise ConfigError(f"{key}.dataset", "is required: the arm's RL data set (a path)")
    hints = value.get("hints") or {}
    if not isinstance(hints, dict):
        raise ConfigError(f"{key}.hints", f"must be a mapping of algo.hints keys, got {hints!r}")
    budget = value.get("token_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"{key}.token_budget", f"must be a positive integer (generated tokens) or null, got {budget!r}")
    return ArmSpec(name, dataset, dict(hints), budget)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    dataset: str | None = None  # output of `questa-nemo data build` (a split folder) or a jsonl
    split: str = "train"
    steps: int = 100
    prompts_per_step: int = 128  # reference: 128 prompts x 16 samples
    micro_batch_tokens: int = 32768  # token budget of one packed micro-batch
    save_every: int = 50  # full checkpoint (model + optimizer)
    recovery_every: int = 3  # small recovery state (data position, RNG, step, rollout version)
    eval_every: int = 50
    keep_checkpoints: int = 2
    parent_stage: str | None = None  # run_dir of the stage whose final weights this stage starts from
    seed: int = 1
    log_tensorboard: bool = True
    progress_bar: bool = True
    # kept groups a step (this rank's first ones) whose prompt, completions, rewards and reasons go to
    # run_dir/samples.jsonl, to read what the policy writes; 0 = none
    log_samples: int = 1
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    # Arms trained side by side from the same initial weights and seed, each into run_dir/<arm>. An arm is a
    # data set path, or {dataset: <path>, hints: {<keys of algo.hints, merged over it for this arm>},
    # token_budget: <generated tokens>}: each arm runs with its own copy of the config (train/arms.py).
    # Empty: one run on `dataset` into run_dir.
    arms: dict[str, Any] = field(default_factory=dict)
    # Which arms this process trains (null: all of them, then the final evaluation of the initial weights and
    # every arm); [] trains none (warm-up, calibration and the evaluation of the initial weights only). With a
    # selection the report goes to run_dir/summary_<arms or "initial">.json: processes of one run_dir may
    # then train different arms at once (bench/smollm2_arms.sh), each with its own eval.output_dir.
    run_arms: list[str] | None = None
    build_world_data: bool = False  # generate the small world's data sets under run_dir/data first
    final_eval: bool = True  # after training: evaluate the initial and every arm's final weights (eval section)
    validation_problems: int = 0  # problems of the first eval benchmark used every eval_every steps; 0 = all
    validation_samples: int = 4  # samples per problem in validation and calibration (pass@1 and pass@n)
    # every eval_every steps also: hard calibration problems with the largest world.hint_ratios hint and without,
    # logged as eval/hint_reliance (pass@1 with - without, the same problems); needs the world's calib sets
    validation_reliance: bool = False
    # generated tokens (retries, filtered-out groups and unhinted samples included) after which a GRPO stage
    # stops (equal compute across arms); hint schedules then use progress = used / budget. null: train.steps
    token_budget: int | None = None

    def validate(self) -> None:
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError("train.token_budget", "must be >= 1 or null")
        keys = ("steps", "prompts_per_step", "micro_batch_tokens", "save_every", "recovery_every")
        _at_least("train", self, keys, 1)
        _at_least("train", self, ("log_samples",), 0)
        self.warmup.validate()
        specs = {name: arm_spec(name, value) for name, value in self.arms.items()}
        for name in self.run_arms or []:
            if name not in specs:
                raise ConfigError("train.run_arms", f"{name!r} is not an arm of train.arms ({', '.join(specs)})")


# --------------------------------------------------------------------------------------------- eval
@dataclass
class BenchmarkConfig:
    """One benchmark (or, in profile mode, one training set) read from a local file."""

    name: str = ""  # key of its result files and row in the report; default: the preset, else the file stem
    path: str = ""  # JSONL / JSON list / parquet file, or a datasets save_to_disk folder
    preset: str | None = None  # aime24 | aime25 | hmmt_feb25 | olympiadbench | brumo25: field names and title
    problem_field: str | None = None  # None: the preset's, else "problem"
    answer_field: str | None = None  # None: the preset's, else "answer"
    id_field: str | None = None  # None: the preset's, else the row number (from 1) is the id
    split: str | None = None  # DatasetDict folders: None = "test" when present, else the first split
    limit: int | None = None  # evaluate only the first `limit` problems (smoke runs)
    seeds: list[int] | None = None  # None = eval.seeds; the leaderboard runs AIME/AMC 10 seeds, others 3

    def validate(self, key: str) -> None:
        """`key` is where this entry sits, e.g. "eval.benchmarks[0]"."""
        if not self.path:
            raise ConfigError(f"{key}.path", "is empty")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"{key}.seeds", f"{self.seeds}: give distinct seeds, or null")
        if self.preset is not None and self.preset not in BENCHMARK_PRESETS:
            allowed = ", ".join(BENCHMARK_PRESETS)
            raise ConfigError(f"{key}.preset", f"{self.preset!r} is not one of {allowed}")


@dataclass
class EvalConfig:
    # Evaluation protocol, recorded with every result (results.json settings.preset, with the keys that differ
    # from it): questa (AReaL's script, conf/eval/questa.yaml) | leaderboard (sober-reasoning,
    # conf/eval/leaderboard.yaml) | validation | profile | custom. eval/protocols.py holds their values.
    preset: str = "custom"
    mode: str = "benchmark"  # benchmark | profile (pass rate per training problem, for the data filter)
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)  # models compared ; [] = model.checkpoint
    labels: list[str] = field(default_factory=list)  # names of the checkpoints in reports; [] = folder names
    n_samples: int = 32  # reference evaluation script: 32 (validation inside training: 16)
    temperature: float = 0.6  # reference evaluation script: 0.6 (validation inside training: 0.7)
    top_p: float = 0.95
    max_new_tokens: int = 32768  # reference evaluation script: 32,768 (validation inside training: 30,720)
    prompt_template: str = "{problem}"  # user message; {problem} is replaced; no hint ever
    problems_per_batch: int = 16  # problems per generate call; also the unit of resumption
    seed: int = 1  # sampling seed of batch i is seed + i, so a resumed run draws what a whole run draws
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # pass@k columns of the table
    output_dir: str = "outputs/eval"  # <label>/<benchmark>.jsonl per problem, results.json, passk.png
    # [] = one run seeded with eval.seed; else one run per seed (<label>/<benchmark>.seed<S>.jsonl) and the
    # report gives each metric's mean and std over the seeds (the leaderboard's mean +- std over 10 seeds)
    seeds: list[int] = field(default_factory=list)
    # prompt + max_new_tokens must fit the model's context (config.json max_position_embeddings): error |
    # truncate (keep the prompt's last context - max_new_tokens tokens, as vLLM's truncate_prompt_tokens; counted)
    overlong_prompts: str = "error"

    def validate(self) -> None:
        if self.n_samples < 1:
            raise ConfigError("eval.n_samples", "must be >= 1")
        if any(k < 1 or k > self.n_samples for k in self.ks):
            raise ConfigError("eval.ks", f"every k must be in [1, eval.n_samples={self.n_samples}]")
        if self.temperature < 0:
            raise ConfigError("eval.temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("eval.top_p", "must be in (0, 1]")
        _at_least("eval", self, ("max_new_tokens", "problems_per_batch"), 1)
        if "{problem}" not in self.prompt_template:
            raise ConfigError("eval.prompt_template", "must contain {problem}")
        if self.labels and len(self.labels) != len(self.checkpoints):
            raise ConfigError(
                "eval.labels", f"{len(self.labels)} labels for {len(self.checkpoints)} checkpoints"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("eval.seeds", f"{self.seeds} repeats a seed")
        for i, b in enumerate(self.benchmarks):
            b.validate(f"eval.benchmarks[{i}]")


# -------------------------------------------------------------------------------------------- top
@dataclass
class Config:
    recipe: str = "default"  # name printed in logs; stage name for chaining
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# eval/benchmarks.py holds their field names; kept here too so validation needs no import from above config.
BENCHMARK_PRESETS: tuple[str, ...] = (
    "aime24", "aime25", "hmmt_feb25", "olympiadbench", "brumo25", "amc23", "math500", "minerva"
)
EVAL_PRESETS: tuple[str, ...] = ("questa", "leaderboard", "validation", "profile", "custom")

CHOICES: dict[str, tuple[str, ...]] = {
    "data.input_format": ("auto", "openr1", "reference_jsonl"),
    "rollout.kv_cache": ("auto", "paged", "contiguous"),
    "data.cut_mode": ("char", "token", "sentence", "step"),
    "data.answer_leak": ("keep", "drop", "recut"),
    "model.params_dtype": ("bf16", "fp32"),
    "model.attention": ("auto", "te", "sdpa", "local", "fa4"),
    "model.packed_attention": ("sdpa", "varlen", "auto"),
    "model.recompute": ("none", "full", "selective"),
    "model.recompute_impl": ("megatron", "torch"),
    "reward.kind": ("math", "world"),
    "reward.overlong": ("none", "mask", "penalty"),
    "reward.start_method": ("spawn", "forkserver"),
    "algo.advantage": ("reference", "grpo", "drgrpo"),
    "algo.loss_agg": ("token", "sequence", "sequence_sum"),
    "algo.kl_type": ("k1", "k3"),
    "algo.proximal_logprobs": ("recompute", "train_forward"),
    "eval.mode": ("benchmark", "profile"),
    "eval.preset": EVAL_PRESETS,
    "eval.overlong_prompts": ("error", "truncate"),
}


@dataclass(frozen=True)
class RolloutBackendInfo:
    """A registry entry: `module` defines `build(cfg: RolloutConfig, ctx: RolloutContext) -> GenerationBackend`
    (imported only when that backend is built). Validation, `doctor` and the builder all read this table."""

    module: str
    requires: str  # the module that must import for the backend to run (what doctor probes)
    gpu_only: bool
    summary: str


# Adding a backend: its module (with `build`), one entry here, and conf/rollout/<name>.yaml.
ROLLOUT_BACKENDS: dict[str, RolloutBackendInfo] = {
    "megatron": RolloutBackendInfo(
        "questa_nemo.rollout.megatron_engine", "megatron.core", False,
        "colocated decoder on the trainer's weights (in place at TP = PP = 1, a gathered replica otherwise)",
    ),
    "hf": RolloutBackendInfo(
        "questa_nemo.rollout.hf", "transformers", False, "transformers generate on gathered weights (reference)"
    ),
    "trtllm": RolloutBackendInfo(
        "questa_nemo.rollout.trtllm", "tensorrt_llm", True, "TensorRT-LLM, refit from gathered weights"
    ),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_config(raw: DictConfig | dict) -> Config:
    """Merge composed YAML into the schema; unknown keys and wrong types raise ConfigError naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(str(key), str(e).splitlines()[0]) from None
    assert isinstance(cfg, Config)
    return cfg


def read_hf_config(path: str | Path) -> dict:
    """The Hugging Face config.json a model is built from (a file or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError("model.hf_config", f"no config.json at {path}")
    with open(p) as f:
        return json.load(f)


def check_choice(key: str, value) -> None:
    """ConfigError naming `key` unless `value` is one of CHOICES[key]."""
    allowed = CHOICES[key]
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every key and the relations between sections before anything expensive happens; raise
    ConfigError naming the key. Reads no file: the model's shapes are checked at build time
    (`validate_model_shapes`), so a recipe loads without its model on disk."""
    for key in CHOICES:
        check_choice(key, _get(cfg, key))

    cfg.data.validate()
    cfg.world.validate()
    m = cfg.model
    m.validate()
    if world_size is not None:
        mp = m.tensor_parallel * m.pipeline_parallel * m.context_parallel
        if world_size % mp:
            raise ConfigError(
                "model.tensor_parallel",
                f"TP x PP x CP = {mp} does not divide the world size {world_size}",
            )
    r = cfg.rollout
    r.validate()
    if r.backend == "trtllm":
        replica = cfg.model.tensor_parallel * cfg.model.pipeline_parallel
        if r.tensor_parallel != replica:
            raise ConfigError(
                "rollout.tensor_parallel",
                f"trtllm runs one engine on each data-parallel replica's GPUs: must equal model.tensor_parallel"
                f" x model.pipeline_parallel = {replica}, not {r.tensor_parallel}",
            )
    cfg.reward.validate()
    cfg.algo.validate()
    cfg.optim.validate()

    t = cfg.train
    t.validate()
    if t.warmup.stop_at_pass1 is not None and not t.build_world_data and cfg.reward.kind == "world":
        raise ConfigError("train.warmup.stop_at_pass1", "checks the small world's calibration set: needs "
                          "train.build_world_data=true")
    if t.micro_batch_tokens < r.max_prompt_tokens + r.max_new_tokens:
        raise ConfigError(
            "train.micro_batch_tokens",
            f"{t.micro_batch_tokens} cannot hold one sequence of rollout.max_prompt_tokens + "
            f"rollout.max_new_tokens = {r.max_prompt_tokens + r.max_new_tokens} tokens",
        )
    cfg.eval.validate()


def validate_model_shapes(model: ModelConfig, hf: dict) -> None:
    """Build-time check of the parallel layout against the model's config.json (`hf`, as read_hf_config
    returns it): TP divides the attention and key/value heads, PP x VP divides the layers. Called where the
    model is built and config.json is read anyway, not at config load; raises ConfigError naming the key."""
    heads = hf.get("num_attention_heads")
    groups = hf.get("num_key_value_heads", heads)
    layers = hf.get("num_hidden_layers")
    tp, pp = model.tensor_parallel, model.pipeline_parallel
    if heads % tp:
        raise ConfigError("model.tensor_parallel", f"{tp} does not divide num_attention_heads={heads}")
    if groups % tp:
        raise ConfigError("model.tensor_parallel", f"{tp} does not divide num_key_value_heads={groups}")
    vpp = model.virtual_pipeline or 1
    if layers % (pp * vpp):
        raise ConfigError(
            "model.pipeline_parallel",
            f"pipeline_parallel x virtual_pipeline = {pp * vpp} does not divide num_hidden_layers={layers}",
        )


def conf_dir() -> Path:
    """conf/ of a source checkout, or the copy packed into the wheel."""
    packaged = Path(__file__).parent / "_conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def data_dir() -> Path:
    """data/ of a source checkout, or the copy packed into the wheel (the small world's model and tokenizer)."""
    packaged = Path(__file__).parent / "_data"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "data"


if not OmegaConf.has_resolver("data_dir"):
    # `${data_dir:world/config.json}` in YAML: shipped files, wherever the package is installed
    OmegaConf.register_new_resolver("data_dir", lambda rel="": str(data_dir() / rel))


def load_config(name: str = "default", overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Compose conf/<name>.yaml, merge it into the schema, apply command-line overrides, validate.

    Overrides that pick a config group (`rollout=hf`) go through Hydra's composition; `key=value` overrides
    are applied after the merge with the schema, so every schema key can be set even when no YAML mentions it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    picks = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in groups]
    values = [o for o in overrides if o not in picks]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            raw = compose(config_name=name, overrides=picks)
        parsed = OverridesParser.create().parse_overrides(values)
    except HydraException as e:
        raise ConfigError("overrides" if overrides else name, str(e).splitlines()[0]) from None
    merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
    for o in parsed:
        key = o.key_or_group
        try:
            value = o.value()
            # lists merge (so list-of-dict overrides become typed entries); dicts and scalars replace
            OmegaConf.update(merged, key, value, merge=isinstance(value, list), force_add=False)
        except OmegaConfBaseException as e:
            raise ConfigError(key, str(e).splitlines()[0]) from None
    cfg = to_config(merged)
    validate(cfg, world_size=world_size)
    return cfg
