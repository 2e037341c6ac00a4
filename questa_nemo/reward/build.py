"""The one place the reward is chosen (training, in-run validation and eval all call `build_reward`)."""

from __future__ import annotations

import contextlib

from questa_nemo.config import RewardConfig
from questa_nemo.reward.math import MathReward
from questa_nemo.reward.types import Reward
from questa_nemo.reward.world import WorldReward


def build_reward(cfg: RewardConfig, resources: contextlib.ExitStack) -> Reward:
    """The reward `reward.kind` names: the small world's exact check (inline), or math-verify in a pool of
    worker processes, entered into `resources` so that it is closed with them."""
    if cfg.kind == "world":
        return WorldReward()
    return resources.enter_context(MathReward(cfg))
