"""Each default is written once, in the config schema (config.py): the component configs built from a section
(loss, rollout engines, math reward) take the schema's values, and lists of choices are the schema's lists.
A default restated with another value in a component fails here."""

from __future__ import annotations

import inspect

import pytest

from questa_nemo.algo.loss import PolicyLossConfig, loss_config_from
from questa_nemo.config import CHOICES, AlgoConfig, RewardConfig, RolloutConfig
from questa_nemo.data import hints
from questa_nemo.reward import math as math_reward
from questa_nemo.reward.pool import JudgePool
from questa_nemo.rollout.base import SamplingParams
from questa_nemo.rollout.megatron_engine import EngineOptions
from questa_nemo.rollout.trtllm import TRTLLMOptions


def test_loss_defaults_are_the_algo_sections():
    assert PolicyLossConfig() == loss_config_from(AlgoConfig())
    changed = AlgoConfig(clip_eps=0.1, clip_eps_high=0.3, behave_imp_weight_cap=None, loss_agg="sequence")
    assert loss_config_from(changed) == PolicyLossConfig(
        clip_eps=0.1, clip_eps_high=0.3, behave_imp_weight_cap=None, agg="sequence"
    )


@pytest.mark.parametrize("options", [EngineOptions, TRTLLMOptions])
def test_engine_defaults_are_the_rollout_sections(options):
    assert options() == options.from_config(RolloutConfig())


def test_engine_options_follow_every_key_they_read():
    cfg = RolloutConfig(max_batch_sequences=3, cuda_graphs=False, kv_cache_memory_fraction=0.25,
                        prefill_chunk_tokens=7, max_prompt_tokens=11, max_new_tokens=13)
    megatron = EngineOptions.from_config(cfg)
    assert (megatron.max_batch_sequences, megatron.cuda_graphs) == (3, False)
    assert (megatron.kv_cache_memory_fraction, megatron.prefill_chunk_tokens) == (0.25, 7)
    trt = TRTLLMOptions.from_config(cfg)
    assert (trt.max_input_len, trt.max_seq_len, trt.max_batch_sequences) == (11, 24, 3)


def test_math_reward_takes_the_reward_section():
    """MathReward and its pool state no numbers of their own; score_in_process defaults to the schema's."""
    init = inspect.signature(math_reward.MathReward.__init__).parameters
    assert set(init) == {"self", "cfg", "test_faults"} and init["cfg"].default is None
    assert all(p.default is inspect.Parameter.empty for n, p in inspect.signature(JudgePool).parameters.items()
               if n != "test_faults")
    in_process = inspect.signature(math_reward.score_in_process).parameters
    reward = RewardConfig()
    assert in_process["timeout_s"].default == reward.timeout_s
    assert in_process["max_answer_chars"].default == reward.max_answer_chars


def test_choice_lists_are_the_schemas():
    assert hints.CUT_MODES is CHOICES["data.cut_mode"]


def test_sampling_params_need_max_new_tokens():
    """No silent 256-token cap: every caller passes its config's max_new_tokens."""
    with pytest.raises(TypeError, match="max_new_tokens"):
        SamplingParams()
    assert SamplingParams(max_new_tokens=5).max_new_tokens == 5
