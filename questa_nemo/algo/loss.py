"""The policy loss: PPO clip with the decoupled off-policy correction, optional KL to a reference model.

Three policies meet in an asynchronous step (AReaL's decoupled PPO):
- behaviour: the weights that sampled the tokens in the rollout engine, possibly a few versions old;
- proximal: the trainer's weights at the start of the update, log-probs recomputed before it (no grad);
- current: the weights being optimised (grad flows through these log-probs).
The PPO ratio current/proximal is clipped as usual; each token's clipped loss is then multiplied by the behaviour
importance weight exp(proximal - behaviour), which corrects for sampling with stale weights. Tokens whose weight
exceeds the cap are masked out (weight 0), not clamped: such tokens were rarely sampled by the behaviour policy
but are now likely under the proximal one, so their estimate is unreliable and a clamped weight would still push
on them. Masked tokens still count in the normaliser, as in the reference.
Without proximal log-probs the behaviour ones stand in and the weight is 1: plain PPO.

Aggregation (config `algo.loss_agg`); `normaliser` is always the quantity summed over the WHOLE step (every
micro-batch on every data-parallel rank), computed up front with `step_normaliser`:
- token: sum of token losses / number of completion tokens in the step (reference: token mean over the batch);
- sequence: sum over sequences of their token mean / number of sequences in the step;
- sequence_sum: sum of token losses / (number of sequences x a constant, e.g. max_new_tokens) (Dr. GRPO: no
  length normalisation).
Dividing each micro-batch's sum by the step total (not by its own count) makes the micro-batch losses add up to
the step's loss, so gradient accumulation gives the full-batch gradient however the tokens were packed; a
micro-batch's own mean would give short micro-batches' tokens more weight. Across DP ranks the gradients must
then be SUMMED; a data-parallel wrapper that averages them needs the loss multiplied by the DP size.

Shapes: N sequences in the micro-batch, T padded length; masks are bool. Token aggregation also accepts packed
rows ([1, T] holding several sequences); `sequence` aggregation and `step_normaliser`'s sequence counts need one
row per sequence (for packed rows, count the sequences from the packing metadata instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from questa_nemo.config import AlgoConfig

_ALGO = AlgoConfig()  # the schema's defaults: the only place they are written (config.py)


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss knobs of config `algo`; each default is the schema's (config.AlgoConfig, reference values)."""

    clip_eps: float = _ALGO.clip_eps  # lower clip: ratio >= 1 - clip_eps
    clip_eps_high: float | None = _ALGO.clip_eps_high  # upper clip 1 + clip_eps_high; None = symmetric
    # tokens with exp(proximal - behaviour) above it get weight 0
    behave_imp_weight_cap: float | None = _ALGO.behave_imp_weight_cap
    kl_coef: float = _ALGO.kl_coef  # 0 = no KL term and no reference log-probs needed
    kl_type: str = _ALGO.kl_type  # k1: log(pi/ref); k3: ref/pi - log(ref/pi) - 1 (unbiased, non-negative)
    agg: str = _ALGO.loss_agg  # token | sequence | sequence_sum (config key algo.loss_agg)


def loss_config_from(algo: AlgoConfig) -> PolicyLossConfig:
    """The loss knobs of a validated `algo` config section."""
    return PolicyLossConfig(
        clip_eps=algo.clip_eps,
        clip_eps_high=algo.clip_eps_high,
        behave_imp_weight_cap=algo.behave_imp_weight_cap,
        kl_coef=algo.kl_coef,
        kl_type=algo.kl_type,
        agg=algo.loss_agg,
    )


@dataclass
class LossStats:
    """Sums over the micro-batch's completion tokens (0-dim detached tensors); merge micro-batches with `+`.

    Sums rather than means so that micro-batches and DP ranks combine exactly; `metrics()` turns them into means.
    The field names are the keys of the trainer's loss-callback dict: a field ending in `_max` is merged with max.
    """

    tokens: torch.Tensor  # completion tokens in the loss mask
    loss: torch.Tensor  # sum of the per-token policy loss (before aggregation), for logging
    clipped: torch.Tensor  # tokens where the clipped branch of PPO was taken
    capped: torch.Tensor  # tokens masked out because the behaviour weight exceeded the cap
    ratio: torch.Tensor  # sum of current/proximal ratios
    behave_weight: torch.Tensor  # sum of exp(proximal - behaviour) over tokens kept by the cap
    behave_weight_max: torch.Tensor  # largest behaviour weight seen (before the cap); merged with max
    behave_kl_k1: torch.Tensor  # sum of behaviour - proximal: KL(behaviour || proximal) estimate, k1
    behave_kl_k3: torch.Tensor  # sum of w - 1 - log w: the same KL, k3 (non-negative per token)
    entropy: torch.Tensor  # sum of token entropies (0 when none were given)
    ref_kl: torch.Tensor  # sum of the KL-to-reference term (0 when kl_coef = 0)

    def __add__(self, other: LossStats) -> LossStats:
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        merged["behave_weight_max"] = torch.maximum(self.behave_weight_max, other.behave_weight_max)
        return LossStats(**merged)

    @classmethod
    def from_sums(cls, sums: Mapping[str, float]) -> LossStats:
        """The stats of a whole step out of the trainer's merged callback dict (model/policy.merge_stats: every
        field summed over micro-batches and DP ranks, `behave_weight_max` maxed); a missing field is 0."""
        return cls(**{f.name: torch.tensor(float(sums.get(f.name, 0.0))) for f in fields(cls)})

    def metrics(self) -> dict[str, float]:
        """Per-token means for the logs, under the names the trainer logs (it adds the `actor/` prefix)."""
        n = max(float(self.tokens), 1.0)
        kept = max(n - float(self.capped), 1.0)
        return {
            "loss_tokens": float(self.tokens),
            "loss_token_mean": float(self.loss) / n,  # the per-token loss before aggregation (actor/loss is after)
            "clip_fraction": float(self.clipped) / n,
            "capped_fraction": float(self.capped) / n,
            "ratio_mean": float(self.ratio) / n,
            "behave_weight_mean": float(self.behave_weight) / kept,
            "behave_weight_max": float(self.behave_weight_max),
            "behave_kl_k1": float(self.behave_kl_k1) / n,
            # k3 (non-negative): the train/rollout mismatch; large values mean the engines disagree or samples
            # are stale
            "behave_kl": float(self.behave_kl_k3) / n,
            "entropy": float(self.entropy) / n,
            "ref_kl": float(self.ref_kl) / n,
        }


def step_normaliser(mask: torch.Tensor, agg: str, sequence_constant: float = 1.0) -> float:
    """This micro-batch's share of the step normaliser; sum the shares over micro-batches and DP ranks.

    mask: [N, T] completion tokens. token: their count; sequence: sequences with at least one token;
    sequence_sum: those sequences x `sequence_constant` (max_new_tokens in Dr. GRPO).
    """
    if agg == "token":
        return float(mask.sum())
    sequences = float((mask.sum(dim=-1) > 0).sum())
    if agg == "sequence":
        return sequences
    if agg == "sequence_sum":
        return sequences * sequence_constant
    raise ValueError(f"algo.loss_agg: unknown aggregation {agg!r} (token | sequence | sequence_sum)")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL(current || reference) estimate on samples from the current policy. [N, T] -> [N, T].

    k1 = log pi - log ref (unbiased, can be negative); k3 = exp(ref - pi) - (ref - pi) - 1 (unbiased, >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if kl_type == "k1":
        return -log_ratio
    if kl_type == "k3":
        return log_ratio.exp() - log_ratio - 1.0
    raise ValueError(f"algo.kl_type: unknown estimator {kl_type!r} (k1 | k3)")


def _aggregate(token_loss: torch.Tensor, mask: torch.Tensor, agg: str, normaliser: float) -> torch.Tensor:
    """Masked sum (of per-sequence means for `sequence`) divided by the step normaliser. [N, T] -> scalar."""
    masked = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    if agg == "sequence":
        per_sequence = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_sequence.sum() / normaliser
    return masked.sum() / normaliser


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    normaliser: float,
    cfg: PolicyLossConfig,
    proximal_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The decoupled PPO loss of one micro-batch, scaled so micro-batch losses sum to the step's loss.

    logprobs: [N, T] current policy (with grad); advantages, behaviour_logprobs, proximal_logprobs,
    ref_logprobs, entropy: [N, T] (no grad needed); mask: [N, T] bool. normaliser: see `step_normaliser`.
    ref_logprobs are read only when cfg.kl_coef > 0. Everything is computed in float32 whatever the input
    dtype. Returns (scalar loss, stats of this micro-batch).
    """
    if normaliser <= 0:
        raise ValueError(f"policy_loss: normaliser must be > 0, got {normaliser}")
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("policy_loss: algo.kl_coef != 0 needs reference log-probs")
    mask = mask.bool()
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

    def completion_only(x: torch.Tensor) -> torch.Tensor:
        """float32, and 0 on padding, which may hold -inf or NaN: no NaN can reach the loss or its gradient."""
        return torch.where(mask, x.float(), zeros)

    logprobs = completion_only(logprobs)
    advantages = completion_only(advantages.detach())
    behaviour = completion_only(behaviour_logprobs.detach())
    proximal = behaviour if proximal_logprobs is None else completion_only(proximal_logprobs.detach())

    # PPO clip on current / proximal
    ratio = (logprobs - proximal).exp()
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + high)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    pg_loss = torch.maximum(unclipped_loss, clipped_loss)
    took_clip = (clipped_loss > unclipped_loss) & mask

    # Behaviour importance weight; the cap masks (weight 0), it does not clamp. 1 everywhere without proximal.
    behave_log_w = proximal - behaviour
    behave_w = behave_log_w.exp()
    over_cap = (
        (behave_w > cfg.behave_imp_weight_cap) & mask
        if cfg.behave_imp_weight_cap is not None and proximal_logprobs is not None
        else torch.zeros_like(mask)
    )
    weight = torch.where(mask & ~over_cap, behave_w, zeros)
    token_loss = pg_loss * weight

    ref_kl = zeros
    if cfg.kl_coef != 0.0 and ref_logprobs is not None:  # checked above: present whenever kl_coef != 0
        ref_kl = kl_penalty(logprobs, completion_only(ref_logprobs.detach()), cfg.kl_type)  # 0 on padding
        token_loss = token_loss + cfg.kl_coef * ref_kl

    loss = _aggregate(token_loss, mask, cfg.agg, normaliser)

    with torch.no_grad():
        m = mask.float()
        kept = m * (~over_cap).float()
        nothing = torch.zeros((), dtype=m.dtype, device=m.device)
        stats = LossStats(
            tokens=m.sum(),
            loss=token_loss.detach().sum(),
            clipped=took_clip.float().sum(),
            capped=over_cap.float().sum(),
            ratio=(ratio.detach() * m).sum(),  # padding holds ratio 1: mask it out
            behave_weight=(behave_w * kept).sum(),
            behave_weight_max=(behave_w * m).max() if mask.any() else nothing,
            behave_kl_k1=(-behave_log_w * m).sum(),
            behave_kl_k3=((behave_w - 1.0 - behave_log_w) * m).sum(),
            entropy=completion_only(entropy.detach()).sum() if entropy is not None else nothing,
            ref_kl=(ref_kl.detach() * m).sum(),
        )
    return loss, stats
