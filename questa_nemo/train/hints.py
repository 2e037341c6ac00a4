"""Adaptive hints in the trainer (issue 20): which prompt each drawn problem is shown, the per-problem levels and
the token budget, kept across steps and in the checkpoint. The math is algo/hint_levels.py; this holds the state.

The prompt source yields a problem (a row of the arm's data set); `HintRuntime.row_for` swaps it for the row of
the same id in the split of the hint ratio it should see now:

    fixed, constant schedule       the row as drawn (today's behaviour, bit for bit)
    fixed, stages                  the stage's ratio (QuestA's 50 then 25 as one run)
    fixed, linear / cosine         the row's own ratio x anneal factor
    adaptive                       the problem's level ratio x anneal factor (constant: 1)

snapped DOWN to a ratio that has a split (algo.hints.splits). Progress is tokens used / train.token_budget when
a budget is set, else (step - 1) / train.steps.

State per step: `snapshot(step)` is (levels, budget, metrics) right after the rollouts of `step` were collected,
which is what the loop writes into RunState for the step it trained (async rollouts run ahead; the snapshot of
the trained step, not the newest, is what a resumed run must restart from).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from questa_nemo.algo.hint_levels import (
    HintLevels,
    TokenBudget,
    anneal_factor,
    stage_ratio,
    training_progress,
)
from questa_nemo.config import Config, ConfigError, HintsConfig
from questa_nemo.train.prompts import HintPrompts, PromptRow, problem_id


def snap_down(ratio: float, available: list[float]) -> float:
    """The largest available ratio <= `ratio` (the smallest one when none is)."""
    below = [r for r in available if r <= ratio + 1e-9]
    return max(below) if below else min(available)


@dataclass
class HintRuntime:
    """Hint state of one GRPO stage; see the module docstring."""

    cfg: HintsConfig
    prompts: HintPrompts
    levels: HintLevels
    budget: TokenBudget
    filter_min: float
    filter_max: float
    total_steps: int
    snapshots: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, prompts: HintPrompts | None = None) -> HintRuntime:
        h, lv = cfg.algo.hints, cfg.algo.hints.levels
        prompts = prompts or {}
        if h.needs_splits() and not prompts:
            raise ConfigError("algo.hints.splits", "no hint splits were loaded (train/prompts.py load_hint_prompts)")
        levels = HintLevels(lv.min, lv.max, lv.step, lv.initial, lv.ratio_per_level)
        return cls(h, prompts, levels, TokenBudget(cfg.train.token_budget), cfg.algo.filter_min_success,
                   cfg.algo.filter_max_success, cfg.train.steps)

    # ------------------------------------------------------------------------------------------ modes
    @property
    def adaptive(self) -> bool:
        return self.cfg.mode == "adaptive"

    @property
    def active(self) -> bool:
        """Prompts differ from the data set as drawn (else collect_step takes today's path)."""
        return self.cfg.needs_splits()

    @property
    def ratios(self) -> list[float]:
        return sorted(self.prompts)

    def check_rows(self, rows: list[PromptRow], source: str) -> None:
        """Every problem the source can draw must have a prompt in the splits."""
        if not self.prompts:
            return
        known = set().union(*(set(p) for p in self.prompts.values()))
        for row in rows:
            if problem_id(row.id) not in known:
                raise ConfigError("algo.hints.splits", f"{source}: row id {row.id!r} is in none of the hint splits")

    # --------------------------------------------------------------------------------------- progress
    def progress(self, step: int) -> float:
        """Training progress in [0, 1] before step `step` (1-based) samples."""
        if self.budget.limit is not None:
            return training_progress(self.budget.used, self.budget.limit)
        return training_progress(step - 1, self.total_steps)

    def target_ratio(self, row: PromptRow, progress: float, levels: HintLevels | None = None) -> float | None:
        """Hint ratio (percent) the problem should see now, before snapping; None = the row as drawn."""
        sc = self.cfg.schedule
        if self.adaptive:
            factor = anneal_factor(progress, sc.kind, sc.end)
            return (levels or self.levels).ratio(problem_id(row.id)) * factor
        if sc.kind == "constant":
            return None
        if sc.kind == "stages":
            return stage_ratio(progress, sc.boundaries, sc.ratios)
        own = float(row.meta.get("hint_ratio", 0.0) or 0.0)
        return own * anneal_factor(progress, sc.kind, sc.end)

    def row_at(self, row: PromptRow, ratio: float) -> PromptRow:
        """The problem's row in the split of `ratio` snapped down; a ratio whose prompt was too long (skipped at
        tokenisation) falls to the next lower one, and to the row as drawn when none has it."""
        for r in sorted((x for x in self.ratios if x <= snap_down(ratio, self.ratios) + 1e-9), reverse=True):
            found = self.prompts[r].get(problem_id(row.id))
            if found is not None:
                return found
        return row

    def row_for(self, row: PromptRow, progress: float, levels: HintLevels | None = None) -> PromptRow:
        ratio = self.target_ratio(row, progress, levels)
        return row if ratio is None else self.row_at(row, ratio)

    def unhinted_row(self, row: PromptRow) -> PromptRow:
        return self.row_at(row, 0.0)

    # ------------------------------------------------------------------------------------------ state
    def record(self, step: int, metrics: dict[str, float]) -> None:
        """After collecting step `step`'s rollouts: keep its state for the checkpoint of that step."""
        self.snapshots[step] = {"levels": self.levels.state_dict(), "budget": self.budget.state_dict(),
                                "metrics": dict(metrics)}
        for old in [s for s in self.snapshots if s < step - 64]:  # async runs ahead by a few steps only
            del self.snapshots[old]

    def snapshot(self, step: int) -> dict | None:
        return self.snapshots.get(step)

    def state_dict(self, step: int) -> tuple[dict, dict]:
        """(hint_levels, token_budget) as of step `step` (RunState fields)."""
        snap = self.snapshots.get(step)
        if snap is None:
            return self.levels.state_dict(), self.budget.state_dict()
        return snap["levels"], snap["budget"]

    def load_state_dict(self, levels: dict | None, budget: dict | None) -> None:
        if levels is not None:
            self.levels = HintLevels.from_state_dict(levels)
        if budget is not None:
            restored = TokenBudget.from_state_dict(budget)
            # the limit is this run's config (an arm may raise it); what was used is the checkpoint's
            self.budget = TokenBudget(self.budget.limit, restored.used, restored.retry_used)

    def exhausted(self, step: int) -> bool:
        """The token budget was spent by the rollouts up to step `step`."""
        snap = self.snapshots.get(step)
        budget = TokenBudget.from_state_dict(snap["budget"]) if snap else self.budget
        return self.budget.limit is not None and budget.used >= self.budget.limit

