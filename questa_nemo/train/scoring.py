"""The training loop's view of the reward: (completion texts, their prompt rows) -> a handle whose `.result()`
gives one RewardResult per completion. The math reward scores in worker processes while the next chunk of
rollouts generates; the small world's exact check is cheap and runs inline."""

from __future__ import annotations

import contextlib

from questa_nemo.config import RewardConfig
from questa_nemo.reward.build import build_reward
from questa_nemo.reward.types import RewardHandle
from questa_nemo.train.prompts import PromptRow


def make_train_scorer(cfg: RewardConfig, resources: contextlib.ExitStack):
    """The reward of `cfg` (reward.build.build_reward) over prompt rows: each row's reference answer, and its
    prompt text (the `prompt` column of `questa-nemo data` / `world` rows) for the small world's step count."""
    reward = build_reward(cfg, resources)

    def score(texts: list[str], rows: list[PromptRow]) -> RewardHandle:
        return reward.submit(texts, [r.answer for r in rows], [r.meta.get("prompt", "") for r in rows])

    return score
