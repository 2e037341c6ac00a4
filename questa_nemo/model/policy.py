"""The trainable policy: megatron model chunks, optimizer and lr schedule behind a few calls the GRPO loop makes.

The loop never touches megatron. It packs its sequences (`pack`), asks for the proximal log-probs
(`logprobs`, forward only) and runs one update (`train_step`) with the per-token loss it supplies as a
callback. Both passes go through megatron's `get_forward_backward_func()`, so the same code runs 1F1B (or
interleaved) pipelines, tensor parallelism and plain single-process runs.

A step whose loss or gradient norm is not finite on any rank is skipped: gradients are zeroed, the optimizer,
its state and the lr schedule are left as they were, and the skip is counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from questa_nemo.config import CONTEXT_PARALLEL_UNSUPPORTED, ConfigError, ModelConfig, OptimConfig
from questa_nemo.model.attention import SDPACoreAttention, register_segment_plan
from questa_nemo.model.logprobs import chunked_logprobs, final_hidden_states, output_weight
from questa_nemo.model.packing import PackedMicroBatch, TokenSequence, assign_first_fit_decreasing, pack

# (logprobs [1, T], entropy [1, T], micro-batch) -> (summed loss over the micro-batch's tokens, stats): each stat
# 0-dim, merged over micro-batches and DP ranks by `merge_stats` (summed; a name ending in `_max` maxed)
LossFn = Callable[
    [torch.Tensor, torch.Tensor, PackedMicroBatch], tuple[torch.Tensor, Mapping[str, torch.Tensor]]
]


def merge_stats(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Loss-callback stats of several micro-batches or DP ranks as one dict: summed, except names ending in
    `_max`, which take the largest value (so a maximum survives the merge instead of being dropped or summed)."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            value = float(value)
            if key not in total:
                total[key] = value
            elif key.endswith("_max"):
                total[key] = max(total[key], value)
            else:
                total[key] += value
    return total


class MicroBatchLogprobs(NamedTuple):
    """Per micro-batch results of the forward-only pass, aligned with each micro-batch's tokens."""

    logprobs: list[torch.Tensor]  # [1, T] fp32 per micro-batch; 0 at segment starts
    entropy: list[torch.Tensor]  # [1, T] fp32 per micro-batch


@dataclass
class StepStats:
    loss: float  # sum over micro-batches and DP ranks of loss_sum / normaliser (the step's token-mean loss)
    grad_norm: float  # global L2 norm before clipping; nan or inf on a skipped step
    lr: float  # learning rate of this update (of the last update when skipped)
    skipped: bool  # True when the step was non-finite and never reached the weights
    skipped_total: int  # non-finite steps skipped so far by this policy
    num_micro_batches: int
    metrics: dict[str, float] = field(default_factory=dict)  # the loss callback's stats, merge_stats'd like `loss`


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _packed_params(mb: PackedMicroBatch, device: torch.device, plan: bool = True) -> PackedSeqParams:
    """THD params in the padded layout: the row's tail of padding belongs to the last sequence's padded extent
    (`*_padded`, where RoPE and the layout find each sequence) but not to its length (`cu_seqlens_q/kv`, what
    attention attends), so no attention is spent on it. It can be most of a micro-batch: every micro-batch of
    a step is as long as the fullest one. A micro-batch of padding alone keeps it as a segment of its own.
    `plan`: register SDPA core attention's plan of the micro-batch (off when the model has none: TE's or
    megatron's local attention read the params themselves)."""
    cu = mb.cu_seqlens.to(torch.int32)
    n = len(mb.sequence_ids)
    real = cu[: n + 1] if n else cu
    padded = real.clone()
    padded[-1] = cu[-1]
    max_seqlen = int(padded.diff().max())
    host_real, host_padded = real.tolist(), padded.tolist()
    real, padded = real.to(device), padded.to(device)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=real,
        cu_seqlens_kv=real,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
    if plan:  # the attention's per-micro-batch plan from these host ints: no layer syncs to read cu_seqlens back
        lengths = [b - a for a, b in zip(host_real[:-1], host_real[1:])]
        register_segment_plan(params, host_padded[:-1], lengths)
    return params


def needs_segment_plans(model_chunks: Iterable[torch.nn.Module]) -> bool:
    """Whether packed micro-batches need SDPA core attention's plan (model/attention.py): not with TE's or
    megatron's local attention, which read the packed params themselves."""
    return any(isinstance(m, SDPACoreAttention) for chunk in model_chunks for m in chunk.modules())


def align_to_tokens(next_token_values: torch.Tensor, segment_starts: torch.Tensor) -> torch.Tensor:
    """Shift values computed at position i for token i + 1 onto token i + 1; segment starts get 0.

    next_token_values: [1, T]; segment_starts: [T] bool. Returns [1, T].
    """
    shifted = torch.roll(next_token_values, shifts=1, dims=1)
    return torch.where(segment_starts.to(shifted.device).unsqueeze(0), torch.zeros_like(shifted), shifted)


class MegatronPolicy:
    """Owns this rank's model chunks (in megatron DDP), the megatron optimizer and the lr schedule."""

    def __init__(
        self,
        model_chunks: list[torch.nn.Module],
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        total_steps: int,
        micro_batch_tokens: int,
        vocab_size: int,
    ):
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size  # the tokenizer's; the output layer has padding rows past it
        self.micro_batch_tokens = micro_batch_tokens
        if model_cfg.context_parallel > 1:
            raise ConfigError("model.context_parallel", CONTEXT_PARALLEL_UNSUPPORTED)
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        config = _unwrap(model_chunks[0]).config
        # megatron's DistributedOptimizer accepts only CUDA parameters: CPU runs take the plain Adam path
        self.distributed_optimizer = optim_cfg.distributed and on_gpu
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.distributed_optimizer,
        )
        self.model_chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
            for chunk in model_chunks
        ]
        for chunk in self.model_chunks:
            chunk.broadcast_params()  # DP replicas start from the same weights
        self.segment_plans = needs_segment_plans(model_chunks)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [chunk.no_sync for chunk in self.model_chunks]
        if len(self.model_chunks) == 1:
            config.no_sync_func = config.no_sync_func[0]
        self.optimizer: MegatronOptimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim_cfg.lr,
                min_lr=optim_cfg.lr,
                weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1,
                adam_beta2=optim_cfg.adam_beta2,
                adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.grad_clip,
                bf16=config.bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=self.distributed_optimizer,
            ),
            self.model_chunks,
        )
        self.clip_grad = optim_cfg.grad_clip
        warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=optim_cfg.lr,
            min_lr=optim_cfg.lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(total_steps, warmup + 1),
            lr_decay_style="constant",
            start_wd=optim_cfg.weight_decay,
            end_wd=optim_cfg.weight_decay,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        self.skipped_total = 0

    # ------------------------------------------------------------------------------------------ packing
    def pack(self, sequences: list[TokenSequence]) -> list[PackedMicroBatch]:
        """`packing.pack` under `micro_batch_tokens`, with the micro-batch count agreed over DP ranks.

        Every DP rank must call it (with no sequences, it returns all-padding micro-batches). The interleaved
        pipeline schedule needs a multiple of PP micro-batches; empty ones fill up to it.
        """
        bins = assign_first_fit_decreasing([len(s) for s in sequences], self.micro_batch_tokens)
        count = torch.tensor([max(len(bins), 1)], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(
            count, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_data_parallel_group()
        )
        needed = int(count.item())
        if self.model_cfg.virtual_pipeline is not None:
            pp = self.model_cfg.pipeline_parallel
            needed = -(-needed // pp) * pp
        pad_multiple = self.model_cfg.tensor_parallel if self.model_cfg.sequence_parallel else 1
        return pack(sequences, self.micro_batch_tokens, pad_multiple, min_micro_batches=needed)

    # ------------------------------------------------------------------------------------------ passes
    def _run(self, micro_batches: list[PackedMicroBatch], loss_func: Callable, forward_only: bool) -> list:
        """One pass of megatron's schedule; returns what `loss_func` reduced (last stage only, else [])."""

        def forward_step(data_iterator: Iterator[PackedMicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            output = final_hidden_states(
                _unwrap(model),
                mb.tokens.to(self.device),
                mb.position_ids.to(self.device),
                packed_seq_params=_packed_params(mb, self.device, self.segment_plans),
            )
            return output, partial(loss_func, mb, _unwrap(model))

        lengths = {mb.tokens.size(1) for mb in micro_batches}
        if len(lengths) > 1 and len(self.model_chunks) > 1:
            raise ValueError(
                f"the interleaved pipeline schedule needs micro-batches of one length, got {sorted(lengths)} "
                "(MegatronPolicy.pack makes them so)"
            )
        # Stages exchange activation shapes before every transfer only when lengths differ; megatron's
        # interleaved schedule deadlocks with that exchange on, and equal lengths never need it.
        for chunk in self.modules:
            chunk.config.variable_seq_lengths = len(lengths) > 1
        iterators = [iter(micro_batches) for _ in self.model_chunks]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model_chunks,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].tokens.size(1),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _token_logprobs(
        self, mb: PackedMicroBatch, model: torch.nn.Module, hidden: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of each token of `mb` given its prefix: ([1, T], [1, T]) fp32.

        hidden: [T, 1, H], the final hidden states of the packed row; position i predicts token i + 1.
        """
        next_token = chunked_logprobs(
            hidden,
            output_weight(model),
            mb.labels.to(self.device).t(),  # [T, 1], megatron's s-major layout like `hidden`
            temperature,
            vocab_size=self.vocab_size,
            chunk_tokens=self.model_cfg.logprob_chunk_tokens,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
        starts = mb.segment_starts
        logprobs = align_to_tokens(next_token.logprobs.t(), starts)
        return logprobs, align_to_tokens(next_token.entropy.t(), starts)

    @torch.no_grad()
    def logprobs(self, micro_batches: list[PackedMicroBatch], temperature: float = 1.0) -> MicroBatchLogprobs:
        """Per-token log-probs and entropy without grad (the proximal policy), on every rank."""

        def collect(mb, model, hidden):
            both = torch.stack(self._token_logprobs(mb, model, hidden, temperature))  # [2, 1, T]
            return torch.zeros((), device=self.device), both

        was_training = self.model_chunks[0].training
        self.eval()
        outputs = self._run(micro_batches, collect, forward_only=True)
        if was_training:
            self.train()
        # The last stage holds [2, 1, T_i] per micro-batch; one [2, sum T_i] tensor goes to every stage.
        lengths = [mb.tokens.size(1) for mb in micro_batches]
        if outputs:
            flat = torch.cat([out[:, 0] for out in outputs], dim=1)
        else:
            flat = torch.empty((2, sum(lengths)), device=self.device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                flat,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        per_mb = flat.float().cpu().split(lengths, dim=1)
        return MicroBatchLogprobs(logprobs=[x[0:1] for x in per_mb], entropy=[x[1:2] for x in per_mb])

    def train_step(
        self,
        micro_batches: list[PackedMicroBatch],
        loss_fn: LossFn,
        normaliser: float,
        temperature: float = 1.0,
    ) -> StepStats:
        """Forward-backward over all micro-batches, then one optimizer update unless non-finite.

        `normaliser` is what the summed per-token loss is divided by over the whole step and every DP rank
        (e.g. the step's count of loss tokens): the update follows sum(loss_sum) / normaliser.
        """
        n = len(micro_batches)
        dp = parallel_state.get_data_parallel_world_size()

        def loss_func(mb, model, hidden):
            logprobs, entropy = self._token_logprobs(mb, model, hidden, temperature)
            loss_sum, stats = loss_fn(logprobs, entropy, mb)
            # megatron divides by the micro-batch count (and multiplies by CP); DDP averages over DP x CP
            scaled = loss_sum * (n * dp / normaliser)
            return scaled, (loss_sum.detach(), {k: v.detach() for k, v in stats.items()})

        self.train()
        self.zero_grads()
        outputs = self._run(micro_batches, loss_func, forward_only=False)

        loss, metrics = self._reduce_outputs(outputs, normaliser)
        grad_norm, skipped = self.apply_gradients(loss)
        return StepStats(
            loss=loss,
            grad_norm=grad_norm,
            lr=self.lr,
            skipped=skipped,
            skipped_total=self.skipped_total,
            num_micro_batches=n,
            metrics=metrics,
        )

    def zero_grads(self) -> None:
        """Clear DDP's main-grad buffers and the optimizer's gradients."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def apply_gradients(self, loss: float) -> tuple[float, bool]:
        """The update after a step's backward passes (and DDP's gradient sync): the gradients into the
        optimizer, their global norm, then one clipped update, or none on every rank where any rank saw a
        non-finite gradient or `loss` (the gradients are dropped). Returns (grad norm, skipped)."""
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        flag = torch.tensor(
            [float(found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm))], device=self.device
        )
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        skipped = bool(flag.item())
        if skipped:
            self.zero_grads()
            self.skipped_total += 1
        else:
            self.scheduler.step(increment=1)  # the lr of update k is the schedule at step k (k >= 1)
            self._clip(grad_norm)
            self.optimizer.step_with_ready_grads()
        return grad_norm, skipped

    def _clip(self, grad_norm: float) -> None:
        """Scale the optimizer's (main) gradients so their global norm is at most `clip_grad`.

        megatron's `clip_grad_by_total_norm_fp32` does the same but insists on CUDA tensors.
        """
        coefficient = self.clip_grad / (grad_norm + 1e-6)
        if self.clip_grad <= 0 or coefficient >= 1.0:
            return
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coefficient)

    def _reduce_outputs(self, outputs: list, normaliser: float) -> tuple[float, dict[str, float]]:
        """The step's loss and stats summed over micro-batches and DP ranks, known on every rank.

        Only one rank per DP replica contributes (last pipeline stage, TP and CP rank 0): the others hold
        either nothing or copies of the same values.
        """
        contributes = (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
        )
        local: tuple[float, dict[str, float]] | None = None
        if contributes:  # the loss apart from the callback's stats, which may have a "loss" of their own
            stats = merge_stats(micro_batch_stats for _, micro_batch_stats in outputs)
            local = (sum(float(loss_sum) for loss_sum, _ in outputs) / normaliser, stats)
        gathered: list[tuple[float, dict[str, float]] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        parts = [part for part in gathered if part is not None]
        total = merge_stats(stats for _, stats in parts)
        loss = sum(loss for loss, _ in parts) if parts else float("nan")
        return loss, total

    # ------------------------------------------------------------------------------------------ state
    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        for chunk in self.model_chunks:
            chunk.train()

    def eval(self) -> None:
        for chunk in self.model_chunks:
            chunk.eval()

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The bare GPTModel chunks (no DDP wrapper), e.g. for the rollout engine and checkpoint code."""
        return [_unwrap(chunk) for chunk in self.model_chunks]
