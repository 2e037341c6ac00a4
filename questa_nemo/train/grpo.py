"""One GRPO step, top to bottom, each phase a call into its own module and timed by name:

    generate -> score -> filter -> advantages -> log-probs -> loss / optimizer step -> update rollout weights

The loop around it (resume, checkpoints, logs) is loop.py; nothing here knows about files or megatron.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from questa_nemo.algo.advantages import compute_advantages, group_ids_for, shape_rewards
from questa_nemo.algo.filtering import FilledStep, Share, fill_step, handle_overlong
from questa_nemo.algo.hint_levels import (
    affordable_groups,
    level_metrics,
    outcomes_from,
    plan_retries,
    unhinted_count,
    unhinted_weight,
    update_levels,
)
from questa_nemo.algo.loss import LossStats, PolicyLossConfig, loss_config_from, policy_loss, step_normaliser
from questa_nemo.config import Config
from questa_nemo.model.packing import PackedMicroBatch, TokenSequence
from questa_nemo.model.parallel import Reduce
from questa_nemo.reward.types import RewardHandle, RewardResult
from questa_nemo.rollout import sampling_params
from questa_nemo.rollout.base import Completion, GenerationBackend, SamplingParams
from questa_nemo.train.hints import HintRuntime
from questa_nemo.train.metrics import PhaseTimer
from questa_nemo.train.prompts import PromptRow, PromptSource, problem_id
from questa_nemo.train.protocols import Policy, Rollouts

# (completion texts [N], the prompt row of each [N]) -> a handle whose .result() gives [N] RewardResults, so
# scoring of one chunk runs in the reward workers while the next chunk generates.
Scorer = Callable[[list[str], list[PromptRow]], RewardHandle]


@dataclass
class Group:
    """One prompt and its G sampled completions, scored."""

    prompt: PromptRow
    completions: list[Completion]  # [G]
    results: list[RewardResult]  # [G]
    texts: list[str]  # [G] decoded completions (for logs and samples)
    # [G] each sample's prompt when they differ (mixed groups: unhinted samples first); None = `prompt` for all
    sample_prompts: list[PromptRow] | None = None
    unhinted: PromptRow | None = None  # the problem without a hint (algo.hints.unhinted_correction)

    def prompts(self) -> list[PromptRow]:
        return self.sample_prompts or [self.prompt] * len(self.completions)


@dataclass
class StepData:
    """What the optimizer step trains on; N = kept groups x G, sequences in group-major order."""

    groups: list[Group]
    sequences: list[TokenSequence]  # [N] prompt + completion with per-token mask, advantages, behaviour log-probs
    correct: torch.Tensor  # [N] raw correctness 0/1
    truncated: torch.Tensor  # [N] bool: finished by length, not by a stop token
    hinted: torch.Tensor  # [N] bool: the prompt carried a hint
    completion_lengths: torch.Tensor  # [N] generated tokens
    stale: torch.Tensor  # [N] policy versions behind the trainer when sampled


def step_seed(seed: int, step: int, attempt: int) -> int:
    """Sampling seed of a prompt batch: a pure function of (seed, step, attempt), so a resumed run redraws
    exactly the samples the uninterrupted run drew."""
    return (seed * 1_000_003 + step * 1_009 + attempt) % (2**31 - 1)


def retry_seed(seed: int, step: int, attempt: int, round_: int) -> int:
    """Sampling seed of in-step retry round `round_` (1-based) of prompt batch `attempt`: a pure function of the
    four, apart from every step_seed of the run's first million steps (attempts < 1009, rounds < 1000)."""
    return (step_seed(seed, step, attempt) + 7_919 * round_ + 104_729) % (2**31 - 1)


def mixed_seed(seed: int) -> int:
    """Seed of a mixed group's unhinted samples, drawn by their own generate call (the hinted ones keep `seed`)."""
    return (seed * 31 + 17) % (2**31 - 1)


def draw_groups(
    backend: GenerationBackend,
    rows: list[PromptRow],
    unhinted: list[PromptRow] | None,
    share: float,
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    scorer: Scorer,
    chunk_prompts: int,
    keys: list[int] | None = None,
) -> list[Group]:
    """Groups of `rows` (each at its hint, sampling keys `keys` as in generate_groups); with `unhinted` (the
    same problems without a hint) the first unhinted_count(G, share) samples of every group come from the
    unhinted prompt, and each group carries its unhinted row (the importance correction's second log-prob
    pass)."""
    k = unhinted_count(params.n, share) if unhinted is not None else 0
    if k == 0:
        groups = generate_groups(backend, rows, params, decode, scorer, chunk_prompts, keys)
    elif k == params.n:
        groups = generate_groups(backend, unhinted, params, decode, scorer, chunk_prompts, keys)
    else:
        plain = generate_groups(backend, unhinted, replace(params, n=k, seed=mixed_seed(params.seed)), decode,
                                scorer, chunk_prompts, keys)
        hinted = generate_groups(backend, rows, replace(params, n=params.n - k), decode, scorer, chunk_prompts, keys)
        groups = [
            Group(h.prompt, u.completions + h.completions, u.results + h.results, u.texts + h.texts,
                  sample_prompts=[u.prompt] * k + [h.prompt] * (params.n - k))
            for u, h in zip(plain, hinted)
        ]
    if unhinted is not None:
        for g, u in zip(groups, unhinted):
            g.unhinted = u
    return groups


def group_tokens(groups: list[Group]) -> int:
    """Completion tokens generated for these groups (every one, whatever the filter then does)."""
    return sum(len(c.token_ids) for g in groups for c in g.completions)


def success_rate(group: Group) -> float:
    return sum(float(r.reward > 0) for r in group.results) / max(len(group.results), 1)


@dataclass
class HintTally:
    """One step's hint bookkeeping on this rank, summed over the DP ranks at the step's end."""

    tokens: int = 0
    retry_tokens: int = 0
    retry_groups: int = 0
    groups: int = 0  # final groups drawn (after retries), kept or dropped
    zero_signal: int = 0  # of them, groups whose samples all scored alike
    reliance_sum: float = 0.0  # mixed groups: hinted success rate - unhinted success rate, summed
    reliance_groups: int = 0
    # per prompt batch: (the whole batch's problem ids, {position in the batch: (success rate, level used)})
    batches: list[tuple[list[str], dict[int, tuple[float, int]]]] = field(default_factory=list)

    def add_groups(self, groups: list[Group]) -> None:
        for g in groups:
            self.groups += 1
            rewards = [r.reward for r in g.results]
            self.zero_signal += int(all(x == rewards[0] for x in rewards))
            if g.sample_prompts is not None:
                h = [(float(r.reward > 0), p.hinted) for r, p in zip(g.results, g.sample_prompts)]
                with_hint = [c for c, hinted in h if hinted]
                without = [c for c, hinted in h if not hinted]
                if with_hint and without:
                    self.reliance_sum += sum(with_hint) / len(with_hint) - sum(without) / len(without)
                    self.reliance_groups += 1


def generate_groups(
    backend: GenerationBackend,
    prompts: list[PromptRow],
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    scorer: Scorer,
    chunk_prompts: int,
    keys: list[int] | None = None,
) -> list[Group]:
    """Generate in chunks and hand each chunk to the reward workers as soon as it is done (overlapping
    scoring with the next chunk's generation); then wait for all scores. `keys`: each prompt's sampling key
    (SamplingParams.prompt_keys; default its index), so the chunking never changes the samples."""
    keys = list(range(len(prompts))) if keys is None else keys
    pending = []
    for start in range(0, len(prompts), chunk_prompts):
        chunk = prompts[start : start + chunk_prompts]
        chunk_params = replace(params, prompt_keys=tuple(keys[start : start + chunk_prompts]))
        result = backend.generate([p.prompt_ids for p in chunk], chunk_params)
        texts = [[decode(c.token_ids) for c in completions] for completions in result.completions]
        flat_texts = [t for ts in texts for t in ts]
        flat_rows = [p for p, ts in zip(chunk, texts) for _ in ts]
        pending.append((chunk, result.completions, texts, scorer(flat_texts, flat_rows)))
    groups = []
    for chunk, completions, texts, handle in pending:
        results = handle.result()
        g = params.n
        for i, prompt in enumerate(chunk):
            groups.append(Group(prompt, completions[i], results[i * g : (i + 1) * g], texts[i]))
    return groups


def collect_step(
    cfg: Config,
    step: int,
    source: PromptSource,
    backend: GenerationBackend,
    scorer: Scorer,
    decode: Callable[[list[int]], str],
    stop_token_ids: tuple[int, ...],
    dp_rank: int = 0,
    dp_size: int = 1,
    agree: Reduce | None = None,
    hints: HintRuntime | None = None,
) -> FilledStep[Group]:
    """Draw prompt batches until `prompts_per_step` groups (over all DP ranks) pass dynamic filtering.

    Every DP rank draws the same prompt batches (the source is seeded identically) and keeps its own slice, so
    the ranks' data never overlap and a resumed run sees the same prompts. A prompt's samples are keyed by its
    position in the batch (SamplingParams.prompt_keys) under one seed for all ranks, and filtering takes the
    first kept groups in that global order (`agree`: sums over the DP group), so the step trains on the same
    groups at any DP size; all ranks draw the same batches, so their prompt cursors stay equal.

    `hints` (train/hints.py): each drawn problem is served at its hint, all-fail groups are retried with a
    longer one, every generated token is charged to the budget and, after filtering, the per-problem levels move
    by the final group outcomes, identically on every DP rank (one `agree` sum). None: the prompts as drawn.
    """
    per_step = cfg.train.prompts_per_step
    attempt = 0
    tally = HintTally()
    h = cfg.algo.hints
    serve = hints is not None and hints.active
    progress = hints.progress(step) if hints is not None else 0.0
    levels = hints.levels if hints is not None else None  # moved by this step's retries (rank-local)
    retries_used: dict[str, int] = {}

    def draw() -> list[Group]:
        nonlocal attempt, levels, retries_used
        whole = source.next(per_step)
        batch = whole[dp_rank::dp_size]
        params = sampling_params(cfg.rollout, stop_token_ids, step_seed(cfg.train.seed, step, attempt))
        this_attempt = attempt
        attempt += 1
        # several waves per call: the engine refills finished slots from the queue (continuous batching)
        chunk = max(1, 4 * cfg.rollout.max_batch_sequences // cfg.rollout.n_samples)
        keys = list(range(dp_rank, per_step, dp_size))  # the prompts' positions in the whole batch
        if hints is None:
            return generate_groups(backend, batch, params, decode, scorer, chunk, keys)
        if not serve:
            groups = generate_groups(backend, batch, params, decode, scorer, chunk, keys)
            tally.tokens += group_tokens(groups)
        else:
            plain = [hints.unhinted_row(r) for r in batch] if h.unhinted_share > 0 or h.unhinted_correction else None

            def at_hint(rows: list[PromptRow]) -> list[PromptRow]:
                return [hints.row_for(r, progress, levels) for r in rows]

            groups = draw_groups(
                backend, at_hint(batch), plain, h.unhinted_share, params, decode, scorer, chunk, keys
            )
            tally.tokens += group_tokens(groups)
            for round_ in range(1, h.max_retries + 1):
                spent = hints.budget.charge(tally.tokens * dp_size)  # this step's so far, as if every rank's
                cap = affordable_groups(spent, cfg.rollout.n_samples * cfg.rollout.max_new_tokens)
                rates = torch.tensor([success_rate(g) for g in groups])
                plan = plan_retries([problem_id(r.id) for r in batch], rates, levels, retries_used, h.max_retries, cap)
                if not plan.retry:
                    break
                levels, retries_used = plan.levels, plan.retries_used
                again = [batch[i] for i in plan.retry]
                seed = retry_seed(cfg.train.seed, step, this_attempt, round_)
                redrawn = draw_groups(backend, at_hint(again), [plain[i] for i in plan.retry] if plain else None,
                                      h.unhinted_share, replace(params, seed=seed), decode, scorer, chunk,
                                      [keys[i] for i in plan.retry])
                tally.retry_tokens += group_tokens(redrawn)
                tally.tokens += group_tokens(redrawn)
                tally.retry_groups += len(redrawn)
                for i, g in zip(plan.retry, redrawn):
                    groups[i] = g
        tally.add_groups(groups)
        tally.batches.append(([problem_id(r.id) for r in whole], {
            key: (success_rate(g), levels.level(problem_id(r.id))) for key, r, g in zip(keys, batch, groups)
        }))
        return groups

    a = cfg.algo
    filled = fill_step(
        draw,
        lambda group: [r.reward for r in group.results],
        target_groups=per_step,
        max_prompt_batches=a.max_prompt_batches,
        lower=a.filter_min_success,
        upper=a.filter_max_success,
        enabled=a.filter_enabled,
        share=Share(dp_rank, dp_size, per_step, (agree or Reduce()).sum),
    )
    if hints is not None:
        finish_hints(hints, step, tally, agree or Reduce(), cfg.train.prompts_per_step)
    return filled


def finish_hints(hints: HintRuntime, step: int, tally: HintTally, reduce: Reduce, prompts_per_step: int) -> None:
    """The step's hint state, the same on every DP rank: one sum of [batches x prompts x (present, success rate,
    level used)] and the tallies; then charge the tokens, move the levels (adaptive) by each drawn problem's final
    group outcome (kept or dropped), and record the step's snapshot and metrics."""
    n = len(tally.batches)
    dense = torch.zeros((n, prompts_per_step, 3), dtype=torch.float64)
    for b, (_, local) in enumerate(tally.batches):
        for j, (rate, level) in local.items():
            dense[b, j] = torch.tensor([1.0, rate, float(level)], dtype=torch.float64)
    counts = [tally.tokens, tally.retry_tokens, tally.retry_groups, tally.groups, tally.zero_signal,
              tally.reliance_sum, tally.reliance_groups]
    summed = reduce.sum(torch.cat([dense.reshape(-1), torch.tensor(counts, dtype=torch.float64)]))
    dense = summed[: dense.numel()].reshape(dense.shape)
    tokens, retry_tokens, retry_groups, groups, zero, rel_sum, rel_groups = summed[dense.numel():].tolist()
    hints.budget = hints.budget.charge(int(tokens - retry_tokens)).charge(int(retry_tokens), retry=True)
    if hints.adaptive:
        ids, rates, used = [], [], {}
        for b, (whole, _) in enumerate(tally.batches):
            for j, pid in enumerate(whole):
                present, rate, level = dense[b, j].tolist()
                if present > 0:
                    ids.append(pid)
                    rates.append(rate / present)
                    used[pid] = max(used.get(pid, 0), int(round(level / present)))
        start = hints.levels.with_levels({**hints.levels.levels, **used})
        hints.levels = update_levels(start, outcomes_from(ids, torch.tensor(rates, dtype=torch.float64)),
                                     hints.filter_min, hints.filter_max)
    metrics = {
        "hints/zero_signal_share": zero / groups if groups else 0.0,
        "hints/tokens_used": float(hints.budget.used),
        "hints/retry_groups": retry_groups,
        "hints/retry_tokens": retry_tokens,
        "hints/retry_tokens_total": float(hints.budget.retry_used),
        "hints/progress": hints.progress(step + 1),
    }
    if rel_groups:
        metrics["hints/reliance"] = rel_sum / rel_groups
    if hints.adaptive:
        metrics.update({f"hints/{k}": v for k, v in level_metrics(hints.levels).items()})
    hints.record(step, metrics)


def build_step_data(cfg: Config, groups: list[Group], trainer_version: int, all_reduce=None) -> StepData:
    """Rewards -> overlong handling -> shaped rewards -> per-token advantages -> training sequences."""
    completions = [c for g in groups for c in g.completions]
    n_samples = len(groups[0].completions) if groups else 1
    correct = torch.tensor([r.reward for g in groups for r in g.results], dtype=torch.float32)
    truncated = torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.bool)
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.long)
    overlong = handle_overlong(correct, truncated, cfg.reward.overlong, cfg.reward.overlong_penalty)
    shaped = shape_rewards(overlong.rewards, cfg.reward.scaling, cfg.reward.bias, cfg.reward.clip)

    width = int(lengths.max()) if len(completions) else 0
    mask = (torch.arange(width)[None, :] < lengths[:, None]) & overlong.sequence_mask[:, None]  # [N, T]
    group_ids = group_ids_for(len(completions), n_samples)  # [N]: G adjacent samples a group
    a = cfg.algo
    advantages = compute_advantages(
        a.advantage, shaped, mask, group_ids, adv_norm=a.adv_norm, group_std=a.group_std, eps=a.eps,
        all_reduce=all_reduce or Reduce(),
    )  # [N, T]

    sequences = []
    prompts = [p for g in groups for p in g.prompts()]  # each sample's prompt (mixed groups differ)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, t = len(prompt.prompt_ids), len(completion.token_ids)
        zeros = torch.zeros(p + t, dtype=torch.float32)
        loss_mask, adv, behaviour = zeros.clone(), zeros.clone(), zeros.clone()
        loss_mask[p:] = mask[i, :t].float()
        adv[p:] = advantages[i, :t]
        behaviour[p:] = torch.tensor(completion.logprobs, dtype=torch.float32)
        ids = torch.tensor(prompt.prompt_ids + completion.token_ids, dtype=torch.long)
        sequences.append(TokenSequence(ids, loss_mask, adv, behaviour))

    return StepData(
        groups=groups,
        sequences=sequences,
        correct=correct,
        truncated=truncated,
        hinted=torch.tensor([p.hinted for p in prompts], dtype=torch.bool),
        completion_lengths=lengths,
        stale=torch.tensor([trainer_version - c.version for c in completions], dtype=torch.long),
    )


def segments(row: torch.Tensor, mb: PackedMicroBatch) -> torch.Tensor:
    """A packed row's real sequences as a padded matrix: [1, T] -> [S, L_max] (zeros past each end)."""
    cu = mb.cu_seqlens.tolist()
    spans = [(cu[i], cu[i + 1]) for i in range(len(mb.sequence_ids))]
    if not spans:  # an all-padding micro-batch (a DP rank with nothing to train): empty, still on the graph
        return row[:, :0]
    width = max(b - a for a, b in spans)
    out = row.new_zeros((len(spans), width))
    for i, (a, b) in enumerate(spans):
        out[i, : b - a] = row[0, a:b]
    return out


def make_loss_fn(cfg: Config):
    """The per-micro-batch loss callback MegatronPolicy.train_step calls: (logprobs [1, T], entropy [1, T],
    micro-batch) -> (loss summed over the micro-batch, summed stats). The policy divides by the step
    normaliser, so the callback passes normaliser 1 to policy_loss.

    algo.proximal_logprobs=train_forward: a micro-batch without recomputed proximal log-probs takes the
    update's own log-probs, detached (see `proximal_from_train_forward`)."""
    loss_cfg = loss_config_from(cfg.algo)
    own_proximal = cfg.algo.proximal_logprobs == "train_forward"

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: PackedMicroBatch):
        def view(x: torch.Tensor) -> torch.Tensor:  # [1, T] -> [S, L]: one row per sequence
            return segments(x.to(logprobs.device), mb)

        proximal = view(mb.proximal_logprobs) if mb.proximal_logprobs is not None else None
        if proximal is None and own_proximal:
            proximal = view(logprobs.detach())
        loss, stats = policy_loss(
            view(logprobs), view(mb.advantages), view(mb.loss_mask) > 0, view(mb.behaviour_logprobs),
            normaliser=1.0, cfg=loss_cfg, proximal_logprobs=proximal, entropy=view(entropy),
        )
        # every LossStats field, by name: the policy merges them (merge_stats: summed, behave_weight_max maxed)
        return loss, {f.name: getattr(stats, f.name) for f in fields(stats)}

    return loss_fn, loss_cfg


def normaliser_for(data: StepData, loss_cfg: PolicyLossConfig, max_new_tokens: int) -> float:
    """This rank's share of the loss normaliser (token count, sequence count, or sequences x constant)."""
    total = 0.0
    for s in data.sequences:
        total += step_normaliser(s.loss_mask[None, :] > 0, loss_cfg.agg, float(max_new_tokens))
    return total


def completion_logprobs(micro_batches: list[PackedMicroBatch], logprobs: list[torch.Tensor],
                        lengths: list[int]) -> torch.Tensor:
    """Each sequence's completion log-probs out of packed rows: [N, T_max], zeros past each completion. The
    completion is the last `lengths[i]` tokens of sequence i (prompt first), whatever the prompt's length."""
    out = torch.zeros((len(lengths), max(lengths, default=0)), dtype=torch.float32)
    for mb, lp in zip(micro_batches, logprobs):
        cu = mb.cu_seqlens.tolist()
        for k, sid in enumerate(mb.sequence_ids):
            t = lengths[sid]
            out[sid, :t] = lp[0, cu[k + 1] - t : cu[k + 1]].float()
    return out


def unhinted_sequences(data: StepData) -> list[TokenSequence]:
    """The step's completions after the prompt WITHOUT a hint (a group's `unhinted` row, else its own prompt)."""
    out = []
    for g in data.groups:
        for p, c in zip(g.prompts(), g.completions):
            row = g.unhinted if g.unhinted is not None else p
            ids = torch.tensor(row.prompt_ids + c.token_ids, dtype=torch.long)
            zeros = torch.zeros(len(ids), dtype=torch.float32)
            out.append(TokenSequence(ids, zeros.clone(), zeros.clone(), zeros.clone()))
    return out


def unhinted_correction(cfg: Config, policy, data: StepData, micro_batches: list[PackedMicroBatch],
                        hinted_logprobs: list[torch.Tensor], temperature: float, reduce: Reduce) -> dict[str, float]:
    """algo.hints.unhinted_correction: a second log-prob pass of the completions after the unhinted prompt, and
    the hinted samples' advantages multiplied by w = exp(logp_unhinted - logp_hinted) per token (0 above
    algo.hints.correction_cap; algo/hint_levels.py unhinted_weight), in the packed micro-batches and in
    `data`. The PPO loss is linear in the advantage and w >= 0, so loss.py is unchanged. Every DP rank must call
    it (packing and the log-prob pass are collective)."""
    lengths = [len(c.token_ids) for g in data.groups for c in g.completions]
    plain_batches = policy.pack(unhinted_sequences(data))
    plain = policy.logprobs(plain_batches, temperature=temperature)
    logp_u = completion_logprobs(plain_batches, plain.logprobs, lengths)
    logp_h = completion_logprobs(micro_batches, hinted_logprobs, lengths)
    width = logp_h.shape[1]
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, (seq, t) in enumerate(zip(data.sequences, lengths)):
        mask[i, :t] = seq.loss_mask[len(seq) - t :] > 0
    w = unhinted_weight(logp_u, logp_h, mask, cfg.algo.hints.correction_cap, data.hinted)
    for mb in micro_batches:
        cu = mb.cu_seqlens.tolist()
        for k, sid in enumerate(mb.sequence_ids):
            t = lengths[sid]
            mb.advantages[0, cu[k + 1] - t : cu[k + 1]] *= w.weight[sid, :t].to(mb.advantages.device)
    for i, (seq, t) in enumerate(zip(data.sequences, lengths)):
        seq.advantages[len(seq) - t :] *= w.weight[i, :t]
    rows = data.hinted[:, None] & mask if len(lengths) else mask
    sums = reduce.sum(torch.tensor([float(w.over_cap.sum()), float(rows.sum()), float(w.weight[rows].sum())],
                                   dtype=torch.float64))
    top = reduce.max(torch.tensor(w.weight_max, dtype=torch.float64))
    capped, tokens, weight_sum = sums.tolist()
    return {
        "hints/correction_capped_fraction": capped / tokens if tokens else 0.0,
        "hints/correction_weight_max": float(top),
        "hints/correction_weight_mean": weight_sum / tokens if tokens else 0.0,
    }


def step_metrics(data: StepData, filled: FilledStep[Group], reduce: Reduce | None = None) -> dict[str, float]:
    """Rollout and reward metrics of a step over every DP rank (`reduce`), hinted and unhinted prompts apart."""
    reduce = reduce or Reduce()
    c, hinted = data.correct.double(), data.hinted
    lengths = data.completion_lengths.double()
    counts = filled.counts.metrics()  # the filter's own stats, summed over ranks below and logged as they are
    # one message of sums, one of maxima (-inf where a rank has nothing), one of per-reason counts
    local = [
        c.numel(), c.sum(), hinted.sum(), c[hinted].sum(), (~hinted).sum(), c[~hinted].sum(), lengths.sum(),
        data.truncated.sum(), len(filled.groups), not filled.full, *counts.values(),
    ]  # fmt: skip
    sums = reduce.sum(torch.tensor([float(x) for x in local], dtype=torch.float64))
    empty = torch.tensor(-math.inf, dtype=torch.float64)
    maxima = reduce.max(torch.stack([
        lengths.max() if lengths.numel() else empty, data.stale.double().max() if lengths.numel() else empty,
    ]))  # fmt: skip
    reasons: dict[str, int] = {}
    for part in reduce.gather_objects(_reason_counts(filled)):
        for reason, count in part.items():
            reasons[reason] = reasons.get(reason, 0) + count
    n, correct, n_hinted, correct_hinted, n_unhinted, correct_unhinted, length_sum, truncated = sums[:8].tolist()
    out: dict[str, float] = {}
    out["reward/success"] = correct / n if n else math.nan
    for name, k, ok in (("hinted", n_hinted, correct_hinted), ("unhinted", n_unhinted, correct_unhinted)):
        if k:
            out[f"reward/success_{name}"] = ok / k
    for reason, count in sorted(reasons.items()):
        out[f"reward/reason_{reason}"] = float(count)
    if n:
        out["rollout/length_mean"] = length_sum / n
        out["rollout/length_max"] = float(maxima[0])
        out["rollout/truncated_fraction"] = truncated / n
        out["rollout/staleness_max"] = float(maxima[1])
    kept, short = sums[8:10].tolist()
    out["filter/kept_groups"] = kept  # the groups the step trains on (passed_groups less the surplus)
    out.update({f"filter/{k}": v for k, v in zip(counts, sums[10:].tolist())})
    out["filter/prompt_batches"] = float(filled.prompt_batches)  # the same on every rank (they agree)
    out["filter/full"] = float(short == 0)
    return out


def _reason_counts(filled: FilledStep[Group]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for g in filled.groups:
        for r in g.results:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return reasons


def proximal_from_train_forward(cfg: Config) -> bool:
    """True when the step skips the proximal log-prob pass (algo.proximal_logprobs=train_forward): the loss
    then takes the update's own log-probs, detached. Exactly what the pass would give up to the rounding
    between two forwards: `policy.train_step` makes ONE optimizer update over all the step's micro-batches,
    from the weights the pass would read, and the model has no dropout, so current == proximal in value (PPO
    ratio 1, never clipped; gradient A x w x grad log p, as with the pass) and the behaviour weights
    exp(proximal - behaviour) are the same whatever the samples' staleness. A step that updated the weights
    several times on these log-probs (minibatches, PPO epochs) would need the pass: the trainer has none.
    hints.unhinted_correction needs the log-probs before the update (refused by validation, checked here)."""
    if cfg.algo.proximal_logprobs != "train_forward":
        return False
    if cfg.algo.hints.unhinted_correction:
        raise ValueError("algo.proximal_logprobs=train_forward cannot serve algo.hints.unhinted_correction")
    return True


class SyncRollouts:
    """Rollouts generated when the step asks for them, with the current weights (the colocated default)."""

    def __init__(self, cfg: Config, source: PromptSource, backend: GenerationBackend, scorer: Scorer,
                 decode: Callable[[list[int]], str], stop_token_ids: tuple[int, ...], dp_rank: int = 0,
                 dp_size: int = 1, agree: Reduce | None = None, hints: HintRuntime | None = None):
        self.cfg, self.source, self.backend, self.scorer = cfg, source, backend, scorer
        self.decode, self.stop_token_ids, self.dp_rank, self.dp_size = decode, stop_token_ids, dp_rank, dp_size
        self.agree, self.hints = agree, hints

    def next(self, step: int) -> FilledStep[Group]:
        return collect_step(self.cfg, step, self.source, self.backend, self.scorer, self.decode,
                            self.stop_token_ids, self.dp_rank, self.dp_size, self.agree, self.hints)

    def source_state(self) -> dict:
        """Prompt-stream position after the last step handed out (what a resumed run restores)."""
        return self.source.state_dict()


def grpo_step(
    cfg: Config,
    step: int,
    policy: Policy,
    backend: GenerationBackend,
    rollouts: Rollouts,
    timer: PhaseTimer,
    reduce: Reduce | None = None,
) -> tuple[dict[str, float], StepData]:
    """Run GRPO step `step` (1-based) on the groups `rollouts` hands out; returns its metrics and data.

    `reduce`: the collectives over the DP group (model/parallel.py; None for one rank): advantage moments,
    the loss normaliser, the sequence count and the step metrics are global.
    """
    reduce = reduce or Reduce()
    temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0

    with timer("rollout"):
        policy.eval()
        filled = rollouts.next(step)
    metrics = {}
    hints = getattr(rollouts, "hints", None)
    snapshot = hints.snapshot(step) if hints is not None else None
    if snapshot is not None:
        metrics.update(snapshot["metrics"])
    with timer("advantages"):
        data = build_step_data(cfg, filled.groups, backend.version, reduce)
    metrics.update(step_metrics(data, filled, reduce))
    # every DP rank must enter the same collectives: skip only when no rank has anything to learn from
    if float(reduce.sum(torch.tensor(float(len(data.sequences)), dtype=torch.float64))) == 0:
        metrics["actor/skipped_empty"] = 1.0
        return metrics, data

    loss_fn, loss_cfg = make_loss_fn(cfg)
    with timer("pack"):
        micro_batches = policy.pack(data.sequences)
    if not proximal_from_train_forward(cfg):
        with timer("logprobs"):
            proximal = policy.logprobs(micro_batches, temperature=temperature)
            for mb, lp in zip(micro_batches, proximal.logprobs):
                mb.proximal_logprobs = lp
    if cfg.algo.hints.unhinted_correction:
        with timer("correction"):
            metrics.update(unhinted_correction(cfg, policy, data, micro_batches, proximal.logprobs, temperature,
                                               reduce))
    with timer("train"):
        normaliser = reduce.sum(torch.tensor(normaliser_for(data, loss_cfg, cfg.rollout.max_new_tokens)))
        stats = policy.train_step(micro_batches, loss_fn, float(normaliser), temperature=temperature)
    with timer("update_weights"):
        backend.update_weights(backend.version + (0 if stats.skipped else 1))

    metrics.update(
        {
            "actor/loss": stats.loss,
            "actor/grad_norm": stats.grad_norm,
            "actor/lr": stats.lr,
            "actor/skipped_nonfinite": float(stats.skipped),
            "actor/skipped_nonfinite_total": float(stats.skipped_total),
            "actor/micro_batches": float(stats.num_micro_batches),
        }
    )
    # the loss's own stats, merged over micro-batches and DP ranks once (by the policy), logged as they are
    metrics.update({f"actor/{k}": v for k, v in LossStats.from_sums(stats.metrics).metrics().items()})
    return metrics, data
