"""Evaluation inside a run: the warm-up's stop (hard calibration problems with and without hints), the
calibration table after the warm-up (no-hint pass rate per chain length, which should fall off smoothly; a
cliff means a format problem) and periodic validation during GRPO on the first eval benchmark, without hints.
Calibration works on both small worlds: the character world (reward.kind=world) and the word world of the
real-model recipe (math reward), whose chain length is read from the problem text."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from questa_nemo.data.outputs import ratio_name
from questa_nemo.data.word_world import count_steps
from questa_nemo.eval.benchmarks import BenchmarkRow, load_benchmark, read_records
from questa_nemo.eval.passk import pass_at_k_over_problems
from questa_nemo.eval.run import benchmark_scorer, eval_sampling, evaluate
from questa_nemo.reward.build import build_reward
from questa_nemo.reward.world import count_ops


def eval_scorer(s, resources):
    """The eval-side scorer (texts, BenchmarkRows) -> results, sharing one reward (math worker pool) per run."""
    reward = getattr(s, "_reward", None)
    if reward is None:
        reward = s._reward = build_reward(s.cfg.reward, resources)
    return benchmark_scorer(reward)


def answer_extractor(s) -> Callable[[str], str | None]:
    from questa_nemo.reward.extract import extract_answer

    limit = s.cfg.reward.max_answer_chars
    return lambda text: extract_answer(text, limit).answer or None


def pass_metrics(results, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    counts = [(r.n, r.correct) for r in results]
    out = {}
    for k in ks:
        if k <= min(n for n, _ in counts):
            est = pass_at_k_over_problems(counts, k)
            out[f"{prefix}pass@{k}"] = est.mean
            out[f"{prefix}pass@{k}_stderr"] = est.stderr
    return out


def make_validator(s, backend, resources) -> Callable[[int], dict[str, float]] | None:
    """pass@1 (and pass@n) of the current policy on the first eval benchmark's first validation problems."""
    t, e = s.cfg.train, s.cfg.eval
    if not e.benchmarks or t.validation_samples < 1:
        return None
    rows = load_benchmark(e.benchmarks[0])
    if t.validation_problems > 0:
        rows = rows[: t.validation_problems]
    scorer, extract = eval_scorer(s, resources), answer_extractor(s)

    def validate(step: int) -> dict[str, float]:
        params = eval_sampling(e, s.stop_token_ids, t.validation_samples)
        results = evaluate(backend, s.tokenizer, rows, params, scorer, extract, e.prompt_template,
                           e.problems_per_batch)
        return pass_metrics(results, "eval/", (1, t.validation_samples))

    return validate


def calibration_rows(s, hint_ratio: float = 0.0) -> list[BenchmarkRow]:
    """The small world's calibration set (calib_problems_per_length per chain length), with a hint of
    `hint_ratio` percent (0: none); [] when the run has no small world or no such set."""
    folder = Path(s.cfg.world.output_dir) / "calib" / ratio_name(hint_ratio)
    if not folder.exists():
        return []
    jsonl = folder / "train.jsonl"  # the JSONL copy, where written, reads without `datasets` (GPU images)
    records = read_records(jsonl if jsonl.exists() else folder, "train")
    return [BenchmarkRow(str(r["id"]), r["prompt"], r["answer"]) for r in records]


def chain_length(s) -> Callable[[str], int]:
    """n of a calibration problem: the character world's op count, else the word world's step count."""
    return count_ops if s.cfg.reward.kind == "world" else count_steps


def pass_by_length(s, backend, rows: list[BenchmarkRow], scorer) -> dict[int, float]:
    """pass@1 per chain length of `rows` (train.validation_samples samples each)."""
    params = eval_sampling(s.cfg.eval, s.stop_token_ids, s.cfg.train.validation_samples)
    results = evaluate(backend, s.tokenizer, rows, params, scorer, answer_extractor(s),
                       s.cfg.eval.prompt_template, s.cfg.eval.problems_per_batch)
    length = chain_length(s)
    by_length: dict[int, list] = {}
    for row, result in zip(rows, results):
        by_length.setdefault(length(row.problem), []).append(result)
    return {n: pass_metrics(rs, "", (1,))["pass@1"] for n, rs in sorted(by_length.items())}


@dataclass(frozen=True)
class StopRule:
    """When the warm-up checks its calibration and where it stops (pure: no model; unit-tested on hand-made
    check sequences). A check is {"hinted": pass@1 of hard problems with the RL hint, "no_hint": without}.

    The RL start QuestA needs is a band: hinted >= `target` (hinted problems learnable) while no_hint <=
    `ceiling` (unhinted ones still sparse). The small world's learning turns sharply, and where it turns
    depends on the seed and on the machine's float rounding: one fresh machine went 0.06 -> 0.14 -> 0.31
    hinted in two 50-step checks and stopped at 0.31 with no-hint 0.20, where hints no longer pay. So:
    1. checks come every `every` steps, and every `every_near` steps once the newest check's hinted rate has
       reached `near` x target (the turn has begun);
    2. the warm-up stops at the first check with hinted >= target or no_hint > ceiling;
    3. it keeps the weights of that check or of the check before it (kept in memory: the weights at every
       check, the newest two), whichever is closer to the band; distance = (target - hinted, if positive) +
       (no_hint - ceiling, if positive); a tie keeps the earlier. A stop inside the band keeps itself.
    A threshold on the no-hint rate alone was fooled before learning began (format-right guesses solve 2-3%
    of problems of every length); one on one-step problems stopped where the hinted rate was still 3% and the
    hint arm hardly moved (both seen here)."""

    target: float
    ceiling: float | None = None
    every: int = 50
    every_near: int | None = None
    near: float = 1 / 3

    @property
    def ask_every(self) -> int:
        """How often the training loop offers a check (the stop itself decides whether one is due)."""
        return min(self.every, self.every_near or self.every)

    def due(self, step: int, checks: dict[int, dict[str, float]]) -> bool:
        if step % self.every == 0:
            return True
        if not self.every_near or not checks or step % self.every_near:
            return False
        return checks[max(checks)]["hinted"] >= self.near * self.target

    def distance(self, check: dict[str, float]) -> float:
        over = check["no_hint"] - self.ceiling if self.ceiling is not None else 0.0
        return max(0.0, self.target - check["hinted"]) + max(0.0, over)

    def decide(self, checks: dict[int, dict[str, float]]) -> int | None:
        """None: go on; else the step whose weights to keep (the newest check or the one before it)."""
        steps = sorted(checks)
        last = checks[steps[-1]]
        over = self.ceiling is not None and last["no_hint"] > self.ceiling
        if last["hinted"] < self.target and not over:
            return None
        candidates = steps[-2:]  # the previous check first: it wins ties
        return min(candidates, key=lambda step: self.distance(checks[step]))


def stop_rule(w) -> StopRule:
    """The StopRule of a train.warmup config."""
    return StopRule(w.stop_at_pass1, w.max_no_hint_pass1, w.check_every, w.check_every_near)


class WarmupStopper:
    """For run_warmup (asked every rule.ask_every steps): checks the policy's live weights when the rule says
    one is due, records step -> {"hinted", "no_hint"} in `checks`, and on a stop puts back the weights the
    rule keeps; `kept_step` is then their step. The weights of the newest check are held in memory (a copy
    of the parameters on their device: 1.4 MB for the embedded default's model)."""

    def __init__(self, rule: StopRule, policy, measure: Callable[[int], dict[str, float]], checks: dict, log):
        self.rule, self.policy, self.measure, self.checks, self.log = rule, policy, measure, checks, log
        self.kept_step: int | None = None
        self._previous: tuple[int, list[torch.Tensor]] | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for chunk in self.policy.model_chunks for p in chunk.parameters()]

    def __call__(self, step: int) -> bool:
        if not self.rule.due(step, self.checks):
            return False
        self.checks[step] = self.measure(step)
        chosen = self.rule.decide(self.checks)
        if chosen is None:
            self._previous = (step, [p.detach().clone() for p in self._params()])
            return False
        if chosen != step:
            with torch.no_grad():
                for p, saved in zip(self._params(), self._previous[1]):
                    p.copy_(saved)
            self.policy.optimizer.reload_model_params()  # main (fp32) copies, where the optimizer keeps them
        self.kept_step = chosen
        c = self.checks[chosen]
        self.log(f"[warm-up] stop at step {step}; keeping the weights of step {chosen} (hard pass@1 with hints "
                 f"{c['hinted']:.3f}, without {c['no_hint']:.3f})")
        return True


def warmup_stopper(s, policy, checks: dict[int, dict[str, float]], scorer) -> WarmupStopper:
    """The stop by calibration of the warm-up (StopRule from train.warmup): pass@1 of the policy's live
    weights on the calibration set's hard problems (n >= hard_min_ops) with the RL hint (the first non-zero
    world.hint_ratios) and without."""
    from questa_nemo.rollout import build_backend
    from questa_nemo.train.recipe import rollout_context

    ratio = next((r for r in s.cfg.world.hint_ratios if r > 0), 0.0)
    length = chain_length(s)
    hard = {
        name: [r for r in calibration_rows(s, hint) if length(r.problem) >= s.cfg.world.hard_min_ops]
        for name, hint in (("hinted", ratio), ("no_hint", 0.0))
    }
    if not ratio or not hard["hinted"]:
        raise ValueError(
            f"train.warmup.stop_at_pass1: no hinted hard calibration problems in {s.cfg.world.output_dir}/calib "
            f"(world.hint_ratios={s.cfg.world.hint_ratios} needs a ratio above 0)"
        )
    backend = build_backend(s.cfg.rollout, rollout_context(s, policy.modules))
    rule = stop_rule(s.cfg.train.warmup)
    ceiling = f", no-hint ceiling {rule.ceiling}" if rule.ceiling is not None else ""

    def measure(step: int) -> dict[str, float]:
        backend.update_weights(step)  # the warm-up stepped the policy: in place a no-op, else a refit
        rates = {}
        for name, rows in hard.items():
            table = pass_by_length(s, backend, rows, scorer)
            rates[name] = sum(table.values()) / len(table)  # every length has as many problems
        s.log(f"[warm-up] step {step}: hard pass@1 with {ratio:g}% hints {rates['hinted']:.3f} (stop at {rule.target}), "
              f"without {rates['no_hint']:.3f}{ceiling}")
        return rates

    return WarmupStopper(rule, policy, measure, checks, s.log)


def calibrate(s, weights: str, scorer) -> dict[str, float]:
    """No-hint pass@1 per chain length on the small world's calibration set; printed and saved beside the
    warm-up checkpoint. Returns {n: pass@1}; empty when the run has no small world."""
    out = Path(s.run_dir) / "warmup" / "calibration.json"
    if out.exists():
        table = json.loads(out.read_text())
        s.log("[calibration] " + " ".join(f"n={n}:{v:.2f}" for n, v in table.items()))
        return table
    rows = calibration_rows(s)
    if not rows:
        return {}
    from questa_nemo.eval.backend import backend_for_checkpoint

    backend = backend_for_checkpoint(s.cfg, weights, s.hf)
    table = {str(n): v for n, v in pass_by_length(s, backend, rows, scorer).items()}
    if s.is_main:
        out.write_text(json.dumps(table, indent=1) + "\n")
    s.log("[calibration] no-hint pass@1 by chain length: " + " ".join(f"n={n}:{v:.2f}" for n, v in table.items()))
    return table
