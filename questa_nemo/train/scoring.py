"""The training loop's view of the reward: (completion texts, their prompt rows) -> a handle whose `.result()`
gives one RewardResult per completion. The math reward scores in worker processes while the next chunk of
rollouts generates; the small world's exact check is cheap and runs inline."""

from __future__ import annotations

import contextlib

from questa_nemo.config import RewardConfig
from questa_nemo.reward.types import RewardResult
from questa_nemo.train.prompts import PromptRow


class Done:
    """A handle for results computed on the spot."""

    def __init__(self, results: list[RewardResult]):
        self._results = results

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        return self._results


def make_train_scorer(cfg: RewardConfig, resources: contextlib.ExitStack):
    if cfg.kind == "world":
        from questa_nemo.data.world import count_ops
        from questa_nemo.reward.world import world_rewards

        def score_world(texts: list[str], rows: list[PromptRow]) -> Done:
            steps = [count_ops(r.meta["prompt"]) for r in rows]
            return Done(world_rewards(texts, [r.answer for r in rows], steps))

        return score_world

    from questa_nemo.reward.math import MathReward

    pool = resources.enter_context(MathReward(cfg))

    def score_math(texts: list[str], rows: list[PromptRow]):
        return pool.submit(texts, [r.answer for r in rows])

    return score_math
