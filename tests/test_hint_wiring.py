"""Adaptive hints wired into the GRPO trainer (issue 20), on hand-built groups with hand-computed results:
config validation, the hint splits, which prompt a drawn problem gets, the level update after filtering, the
in-step retry, mixed groups, the importance correction, the token budget and the hint metrics.

The fake world: problem i at hint ratio r has the prompt [i, r] (r in percent). The scripted backend answers
sample s of a group with the token (r, s); a sample is correct when r >= NEED[problem] or s < EASY[problem]
(a few samples succeed without enough hint), so every group's outcome is known in advance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from questa_nemo.algo.hint_levels import HintLevels
from questa_nemo.config import Config, ConfigError, HintsConfig, load_config
from questa_nemo.model.packing import pack
from questa_nemo.reward.types import Done, RewardResult
from questa_nemo.rollout.base import Completion, GenerationResult, SamplingParams
from questa_nemo.train.grpo import (
    SyncRollouts,
    build_step_data,
    collect_step,
    completion_logprobs,
    mixed_seed,
    retry_seed,
    step_seed,
    unhinted_correction,
)
from questa_nemo.train.hints import HintRuntime, snap_down
from questa_nemo.train.prompts import PromptRow, PromptSource, check_split_ids, load_hint_prompts, problem_id

RATIOS = (0.0, 25.0, 50.0, 75.0, 100.0)


def row(i: int, ratio: float) -> PromptRow:
    return PromptRow(f"q{i}", [i, int(ratio)], "", ratio > 0, {"hint_ratio": ratio})


def splits(n: int, ratios=RATIOS) -> dict[float, dict[str, PromptRow]]:
    return {r: {f"q{i}": row(i, r) for i in range(n)} for r in ratios}


class Scripted:
    """Sample s of a prompt [i, r] is the completion [r, s] (two tokens; log-prob -0.5 each). Records calls."""

    def __init__(self):
        self.version = 0
        self.calls: list[tuple[list[list[int]], int, int]] = []  # (prompts, n, seed)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        self.calls.append(([list(p) for p in prompts], params.n, params.seed))
        return GenerationResult([[Completion([p[1], s], [-0.5, -0.5], "stop", self.version) for s in range(params.n)]
                                 for p in prompts])

    def update_weights(self, version: int) -> None:
        self.version = version


def scorer(need: dict[int, float], easy: dict[int, int] | None = None):
    easy = easy or {}

    def score(texts: list[str], rows: list[PromptRow]) -> Done:
        out = []
        for text, r in zip(texts, rows):
            ratio, s = (int(x) for x in text.split())
            i = r.prompt_ids[0]
            ok = ratio >= need.get(i, 0) or s < easy.get(i, 0)
            out.append(RewardResult(float(ok), "correct" if ok else "wrong"))
        return Done(out)

    return score


def decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def config(*overrides: str, n_samples: int = 4, prompts: int = 4) -> Config:
    return load_config("default", [
        f"rollout.n_samples={n_samples}", "rollout.max_new_tokens=2", f"train.prompts_per_step={prompts}",
        "train.steps=10", "algo.filter_enabled=true", "algo.max_prompt_batches=0",
        "algo.filter_min_success=0.25", "algo.filter_max_success=0.75", *overrides,
    ])  # fmt: skip


ADAPTIVE_SPLITS = "algo.hints.splits={p0: a, p25: b, p50: c, p75: d, p100: e}"


def runtime(cfg: Config, n: int = 4) -> HintRuntime:
    return HintRuntime.from_config(cfg, splits(n))


def source(n: int = 4, ratio: float = 50.0) -> PromptSource:
    s = PromptSource([row(i, ratio) for i in range(n)], seed=1)
    s._order = list(range(n))  # draw q0, q1, ... in order (the hand computations below follow it)
    return s


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    ("algo.hints.mode=smart", "algo.hints.mode"),
    ("algo.hints.mode=adaptive", "algo.hints.splits"),
    ("algo.hints.max_retries=1", "algo.hints.max_retries"),
    ("algo.hints.unhinted_share=1.5", "algo.hints.unhinted_share"),
    ("algo.hints.levels.initial=9", "algo.hints.levels.initial"),
    ("algo.hints.levels.step=0", "algo.hints.levels.step"),
    ("algo.hints.levels.ratio_per_level=0", "algo.hints.levels.ratio_per_level"),
    ("algo.hints.schedule.kind=exp", "algo.hints.schedule.kind"),
    ("algo.hints.schedule.end=0", "algo.hints.schedule.end"),
    ("algo.hints.correction_cap=0", "algo.hints.correction_cap"),
    ("train.token_budget=0", "train.token_budget"),
    ("algo.hints.splits={x: a}", "algo.hints.splits"),
])  # fmt: skip
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("default", [override])
    assert e.value.key == key


def test_config_relations_name_the_key():
    with pytest.raises(ConfigError, match="largest split is 50%") as e:
        load_config("default", ["algo.hints.mode=adaptive", "algo.hints.splits={p0: a, p50: b}"])
    assert e.value.key == "algo.hints.levels.max"
    with pytest.raises(ConfigError, match="unhinted split") as e:
        load_config("default", ["algo.hints.unhinted_share=0.25", "algo.hints.splits={p50: a}"])
    assert e.value.key == "algo.hints.splits"
    with pytest.raises(ConfigError) as e:
        load_config("default", ["algo.hints.schedule.kind=stages", "algo.hints.schedule.boundaries=[0.5,1.0]",
                                "algo.hints.schedule.ratios=[50,30]", "algo.hints.splits={p50: a, p25: b}"])
    assert e.value.key == "algo.hints.schedule.ratios"
    cfg = load_config("default", ["algo.hints.schedule.kind=stages", "algo.hints.schedule.boundaries=[0.5,1.0]",
                                  "algo.hints.schedule.ratios=[50,25]", "algo.hints.splits={p50: a, p25: b}"])
    assert cfg.algo.hints.schedule.ratios == [50.0, 25.0]
    assert HintsConfig().needs_splits() is False  # the default serves prompts as built


def test_default_config_has_no_hint_machinery():
    cfg = load_config("default")
    assert cfg.algo.hints == HintsConfig() and cfg.train.token_budget is None
    assert HintRuntime.from_config(cfg).active is False


# ------------------------------------------------------------------------------------------- splits
class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [ord(c) for c in messages[-1]["content"]]


def write_split(path, ids, ratio):
    with open(path, "w") as f:
        for pid in ids:
            f.write(json.dumps({"id": pid, "messages": [{"role": "user", "content": f"{pid}|{ratio}"}],
                                "answer": "\\boxed{1}", "hint": "h" if ratio else "", "hint_ratio": ratio}) + "\n")


def test_splits_load_by_ratio_and_id(tmp_path):
    write_split(tmp_path / "p0.jsonl", ["a", "b"], 0)
    write_split(tmp_path / "p50.jsonl", ["b", "a"], 50)
    got = load_hint_prompts({"0": str(tmp_path / "p0.jsonl"), "50": str(tmp_path / "p50.jsonl")}, FakeTokenizer(),
                            100)
    assert sorted(got) == [0.0, 50.0]
    assert got[50.0]["a"].prompt_ids == [ord(c) for c in "a|50"] and got[50.0]["a"].hinted
    assert not got[0.0]["b"].hinted


def test_rows_match_by_problem_across_the_ratio_suffix(tmp_path):
    """`questa-nemo data` ids are "<source id>@p<ratio>": the splits match on the part before it."""
    assert problem_id("world-rl-000001@p25") == "world-rl-000001"
    assert problem_id("a@b@p12.5") == "a@b" and problem_id("q7") == "q7" and problem_id("x@pz") == "x@pz"
    write_split(tmp_path / "p0.jsonl", ["a@p0", "b@p0"], 0)
    write_split(tmp_path / "p50.jsonl", ["b@p50", "a@p50"], 50)
    got = load_hint_prompts({"p0": str(tmp_path / "p0.jsonl"), "p50": str(tmp_path / "p50.jsonl")},
                            FakeTokenizer(), 100)
    assert sorted(got[50.0]) == ["a", "b"] and got[50.0]["a"].id == "a@p50"
    cfg = config("algo.hints.mode=adaptive", "algo.hints.splits={p0: x, p50: y}", "algo.hints.levels.max=2")
    hints = HintRuntime.from_config(cfg, got)
    drawn = PromptRow("a@p0", [1], "", False, {})
    hints.check_rows([drawn], "rl/p0")
    assert hints.row_for(drawn, 0.0).id == "a@p50"  # initial level 2 x 25 = 50


def test_split_id_mismatch_is_one_line_naming_file_and_id(tmp_path):
    write_split(tmp_path / "p0.jsonl", ["a", "b"], 0)
    write_split(tmp_path / "p50.jsonl", ["a", "c"], 50)
    files = {"0": str(tmp_path / "p0.jsonl"), "50": str(tmp_path / "p50.jsonl")}
    with pytest.raises(ConfigError) as e:
        load_hint_prompts(files, FakeTokenizer(), 100)
    message = str(e.value)
    assert "\n" not in message and "p50.jsonl" in message and "'c'" in message
    assert e.value.key == "algo.hints.splits.50"
    with pytest.raises(ConfigError, match="no row with id 'b'"):
        check_split_ids({"0": ["a", "b"], "50": ["a"]}, files)


def test_a_source_row_missing_from_the_splits_is_named():
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    with pytest.raises(ConfigError, match="'q9'"):
        runtime(cfg).check_rows([row(9, 50)], "rl/p50")


# --------------------------------------------------------------------------------------- which prompt
def test_snap_down_to_an_existing_split():
    assert snap_down(60.0, [0.0, 25.0, 50.0]) == 50.0
    assert snap_down(50.0, [0.0, 25.0, 50.0]) == 50.0
    assert snap_down(24.9, [0.0, 25.0, 50.0]) == 0.0
    assert snap_down(10.0, [25.0, 50.0]) == 25.0  # nothing below: the smallest


def test_fixed_constant_serves_the_row_as_drawn():
    cfg = config()
    hints = HintRuntime.from_config(cfg, splits(2))
    drawn = row(1, 50)
    assert hints.row_for(drawn, 0.7) is drawn


def test_questa_stages_as_one_schedule():
    """boundaries [0.5, 1], ratios [50, 25] over 10 steps: steps 1-5 at 50 %, steps 6-10 at 25 %."""
    cfg = config("algo.hints.schedule.kind=stages", "algo.hints.schedule.boundaries=[0.5,1.0]",
                 "algo.hints.schedule.ratios=[50,25]", "algo.hints.splits={p50: a, p25: b}")
    hints = HintRuntime.from_config(cfg, splits(2, (25.0, 50.0)))
    got = [hints.row_for(row(1, 0), hints.progress(step)).prompt_ids[1] for step in range(1, 11)]
    assert got == [50] * 5 + [25] * 5


def test_token_budget_drives_progress():
    cfg = config("algo.hints.schedule.kind=stages", "algo.hints.schedule.boundaries=[0.5,1.0]",
                 "algo.hints.schedule.ratios=[50,25]", "algo.hints.splits={p50: a, p25: b}",
                 "train.token_budget=100")
    hints = HintRuntime.from_config(cfg, splits(2, (25.0, 50.0)))
    assert hints.progress(7) == 0.0  # no token used yet, whatever the step
    hints.budget = hints.budget.charge(60)
    assert hints.progress(1) == 0.6 and hints.row_for(row(0, 0), hints.progress(1)).prompt_ids[1] == 25
    assert not hints.exhausted(0)
    hints.budget = hints.budget.charge(40)
    assert hints.exhausted(0)


def test_linear_anneal_in_fixed_mode_snaps_the_rows_own_ratio_down():
    """Row at 50 %, linear to 0 at end 1: progress .2 -> 40 % -> the 25 split; .6 -> 20 % -> 0."""
    cfg = config("algo.hints.schedule.kind=linear", "algo.hints.splits={p0: a, p25: b, p50: c}")
    hints = HintRuntime.from_config(cfg, splits(2, (0.0, 25.0, 50.0)))
    assert [hints.row_for(row(1, 50), p).prompt_ids[1] for p in (0.0, 0.2, 0.6, 1.0)] == [50, 25, 0, 0]


def test_adaptive_serves_the_level_ratio_times_the_anneal():
    """Levels of 25 %: q0 at level 3 (75 %), q1 unseen (initial 2: 50 %); cosine at progress .5 halves them:
    37.5 -> 25, 25 -> 25."""
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    hints = runtime(cfg)
    hints.levels = hints.levels.with_levels({"q0": 3})
    assert hints.row_for(row(0, 0), 0.3).prompt_ids[1] == 75
    assert hints.row_for(row(1, 0), 0.3).prompt_ids[1] == 50
    hints.cfg.schedule.kind = "cosine"
    assert [hints.row_for(row(i, 0), 0.5).prompt_ids[1] for i in (0, 1)] == [25, 25]


def test_a_prompt_skipped_as_too_long_falls_to_the_next_lower_split():
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    prompts = splits(2)
    del prompts[50.0]["q1"]
    hints = HintRuntime.from_config(cfg, prompts)
    assert hints.row_for(row(1, 0), 0.0).prompt_ids[1] == 25


# ------------------------------------------------------------------------------------ the level update
def test_levels_move_by_each_drawn_problems_group_after_filtering():
    """Initial level 2 (50 %), G = 4, band [.25, .75]:
    q0 needs 0   -> all right (rate 1)  -> level 1
    q1 needs 100 -> all wrong (rate 0)  -> level 3
    q2 needs 100, 2 easy samples -> rate .5, kept -> level 2
    q3 needs 75, 1 easy sample  -> rate .25, kept -> level 2
    Dropped groups move as much as kept ones; tokens: 4 groups x 4 samples x 2 tokens = 32."""
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    hints = runtime(cfg)
    backend = Scripted()
    filled = collect_step(cfg, 1, source(), backend, scorer({1: 100, 2: 100, 3: 75}, {2: 2, 3: 1}), decode, (),
                          hints=hints)
    assert [g.prompt.id for g in filled.groups] == ["q2", "q3"]
    assert hints.levels.levels == {"q0": 1, "q1": 3, "q2": 2, "q3": 2}
    assert [p for p, _, _ in backend.calls][0] == [[0, 50], [1, 50], [2, 50], [3, 50]]
    assert hints.budget.used == 32 and hints.budget.retry_used == 0
    m = hints.snapshot(1)["metrics"]
    assert m["hints/zero_signal_share"] == 0.5  # q0 and q1 of 4 groups
    assert m["hints/tokens_used"] == 32.0 and m["hints/retry_groups"] == 0.0
    assert (m["hints/level_1"], m["hints/level_2"], m["hints/level_3"]) == (1.0, 2.0, 1.0)
    assert m["hints/level_mean"] == 2.0 and m["hints/at_max_share"] == 0.0
    # the next step serves the moved levels: q0 at 25 %, q1 at 75 %
    collect_step(cfg, 2, source(), backend, scorer({1: 100, 2: 100, 3: 75}, {2: 2, 3: 1}), decode, (), hints=hints)
    assert backend.calls[-1][0] == [[0, 25], [1, 75], [2, 50], [3, 50]]
    assert hints.levels.levels == {"q0": 0, "q1": 4, "q2": 2, "q3": 2}


class HalfReduce:
    """Two DP ranks in one process: the k-th `sum` adds the other rank's k-th contribution (recorded by running
    that rank beforehand; the filter's keep-flag sums come first, the hint state's last)."""

    def __init__(self):
        self.other: list[torch.Tensor] | None = None
        self.mine: list[torch.Tensor] = []

    def sum(self, x):
        self.mine.append(x.clone())
        if self.other is None:
            return x
        return x + self.other[len(self.mine) - 1]

    def max(self, x):
        return x

    def any(self, flag: bool) -> bool:
        return flag


def test_levels_are_the_same_on_every_dp_rank():
    """DP = 2: rank 0 draws q0, q2; rank 1 q1, q3. Summing the dense per-position vector gives both ranks the
    update the single-rank run makes."""
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    args = (scorer({1: 100, 2: 100, 3: 75}, {2: 2, 3: 1}), decode, ())
    r0, r1 = HalfReduce(), HalfReduce()
    h0, h1 = runtime(cfg), runtime(cfg)
    collect_step(cfg, 1, source(), Scripted(), *args, dp_rank=1, dp_size=2, agree=r1, hints=runtime(cfg))
    r0.other = r1.mine  # rank 1's contributions, then rank 0's for rank 1
    collect_step(cfg, 1, source(), Scripted(), *args, dp_rank=0, dp_size=2, agree=r0, hints=h0)
    r1.other, r1.mine = r0.mine, []
    collect_step(cfg, 1, source(), Scripted(), *args, dp_rank=1, dp_size=2, agree=r1, hints=h1)
    assert h0.levels.levels == h1.levels.levels == {"q0": 1, "q1": 3, "q2": 2, "q3": 2}
    assert h0.budget == h1.budget and h0.budget.used == 32


# -------------------------------------------------------------------------------------------- retries
def test_an_all_fail_group_is_retried_at_once_with_a_longer_hint():
    """q1 needs 75: at 50 % all wrong -> retried at level 3 (75 %) with retry_seed(seed, 1, 0, 1): all right.
    Its final outcome (rate 1 at level 3) moves it back to 2. q3 needs 100: fails at 50, 75 and 100 (rounds 1, 2),
    then max_retries=2 is used up; final rate 0 at level 4 -> stays at 4 (the maximum). Tokens: 16 groups' worth
    in the first try (4 x 4 x 2 = 32), retries 3 groups x 8 = 24. (q3 needs 101: no hint is enough.)"""
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS, "algo.hints.max_retries=2")
    hints = runtime(cfg)
    backend = Scripted()
    filled = collect_step(cfg, 1, source(), backend, scorer({1: 75, 2: 0, 3: 101}), decode, (),
                          hints=hints)
    seeds = [seed for _, _, seed in backend.calls]
    assert seeds == [step_seed(cfg.train.seed, 1, 0), retry_seed(cfg.train.seed, 1, 0, 1),
                     retry_seed(cfg.train.seed, 1, 0, 2)]
    assert [p for p, _, _ in backend.calls][1:] == [[[1, 75], [3, 75]], [[3, 100]]]
    assert filled.counts.all_wrong == 1 and filled.counts.all_correct == 3  # q0, q1 (after retry), q2
    assert hints.levels.levels == {"q0": 1, "q1": 2, "q2": 1, "q3": 4}
    assert hints.budget.used == 56 and hints.budget.retry_used == 24
    m = hints.snapshot(1)["metrics"]
    assert m["hints/retry_groups"] == 3.0 and m["hints/retry_tokens"] == 24.0


def test_retry_seeds_are_a_pure_function_and_apart_from_step_seeds():
    assert retry_seed(1, 5, 2, 1) == retry_seed(1, 5, 2, 1)
    firsts = {step_seed(1, s, a) for s in range(1, 200) for a in range(5)}
    retries = {retry_seed(1, s, a, r) for s in range(1, 200) for a in range(5) for r in (1, 2, 3)}
    assert not firsts & retries


def test_retries_stop_at_the_token_budget():
    """Budget 40 with 32 spent by the first try: a group may cost 4 x 2 = 8 tokens: one retry group fits."""
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS, "algo.hints.max_retries=1", "train.token_budget=40")
    hints = runtime(cfg)
    backend = Scripted()
    collect_step(cfg, 1, source(), backend, scorer({0: 75, 1: 75, 2: 75, 3: 75}), decode, (), hints=hints)
    assert [p for p, _, _ in backend.calls][1:] == [[[0, 75]]]
    assert hints.budget.used == 40 and hints.exhausted(1)


# -------------------------------------------------------------------------------------- mixed groups
def test_mixed_groups_draw_the_first_samples_without_a_hint():
    """G = 4, share .5: 2 samples from [i, 0] (seed mixed_seed), 2 from [i, 50]; q0 needs 50: hinted samples right,
    unhinted wrong -> rate .5, reliance 1; q1 needs 0: all right, reliance 0. Mean reliance .5."""
    cfg = config("algo.hints.unhinted_share=0.5", "algo.hints.splits={p0: a, p50: b}", prompts=2)
    hints = HintRuntime.from_config(cfg, splits(2, (0.0, 50.0)))
    assert hints.active
    backend = Scripted()
    filled = collect_step(cfg, 1, source(2), backend, scorer({0: 50}), decode, (), hints=hints)
    seed = step_seed(cfg.train.seed, 1, 0)
    assert backend.calls == [([[0, 0], [1, 0]], 2, mixed_seed(seed)), ([[0, 50], [1, 50]], 2, seed)]
    data = build_step_data(cfg, filled.groups, 0)
    assert data.hinted.tolist() == [False, False, True, True]  # q0 kept (rate .5); q1 dropped (rate 1)
    assert [s.token_ids[:2].tolist() for s in data.sequences] == [[0, 0], [0, 0], [0, 50], [0, 50]]
    assert data.correct.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert hints.snapshot(1)["metrics"]["hints/reliance"] == 0.5


def test_all_unhinted_share_serves_the_unhinted_prompt_only():
    cfg = config("algo.hints.unhinted_share=1.0", "algo.hints.splits={p0: a, p50: b}", prompts=2)
    hints = HintRuntime.from_config(cfg, splits(2, (0.0, 50.0)))
    backend = Scripted()
    collect_step(cfg, 1, source(2), backend, scorer({}), decode, (), hints=hints)
    assert backend.calls == [([[0, 0], [1, 0]], 4, step_seed(cfg.train.seed, 1, 0))]


# -------------------------------------------------------------------------------- importance correction
class PositionPolicy:
    """log p(token at position i of its sequence) = -0.1 * i: a completion after a prompt 2 tokens longer
    gets log-probs 0.2 lower, so the unhinted/hinted weight is exp(0.2) on every hinted completion token."""

    def pack(self, sequences):
        return pack(sequences, 64)

    def logprobs(self, micro_batches, temperature=1.0):
        out = []
        for mb in micro_batches:
            lp = torch.zeros_like(mb.tokens, dtype=torch.float32)
            cu = mb.cu_seqlens.tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                lp[0, a:b] = -0.1 * torch.arange(b - a, dtype=torch.float32)
            out.append(lp)
        return type("L", (), {"logprobs": out})()


def correction_data(cap: float):
    cfg = config("algo.hints.unhinted_correction=true", f"algo.hints.correction_cap={cap}",
                 "algo.hints.unhinted_share=0.5", "algo.hints.mode=adaptive", "algo.hints.levels.max=2", "algo.hints.splits={p0: a, p50: b}", "algo.filter_enabled=false",
                 prompts=1)
    hints = HintRuntime.from_config(cfg, splits(1, (0.0, 50.0)))
    hints.prompts[50.0]["q0"] = PromptRow("q0", [0, 50, 7, 7], "", True, {})  # hinted prompt 2 tokens longer
    filled = collect_step(cfg, 1, source(1), Scripted(), scorer({0: 50}), decode, (), hints=hints)
    data = build_step_data(cfg, filled.groups, 0)
    return cfg, data


def test_completion_logprobs_come_out_of_packed_rows():
    policy = PositionPolicy()
    _, data = correction_data(5.0)
    mbs = policy.pack(data.sequences)
    lp = completion_logprobs(mbs, policy.logprobs(mbs).logprobs, [2, 2, 2, 2])
    torch.testing.assert_close(lp, torch.tensor([[-0.2, -0.3], [-0.2, -0.3], [-0.4, -0.5], [-0.4, -0.5]]))


def test_correction_weights_hinted_advantages_by_the_unhinted_ratio():
    """Unhinted samples keep their advantages; hinted ones are multiplied by exp(0.2) = 1.2214."""
    cfg, data = correction_data(5.0)
    policy = PositionPolicy()
    before = [s.advantages.clone() for s in data.sequences]
    mbs = policy.pack(data.sequences)
    packed_before = [mb.advantages.clone() for mb in mbs]
    m = unhinted_correction(cfg, policy, data, mbs, policy.logprobs(mbs).logprobs, 1.0, HalfReduce())
    w = math.exp(0.2)
    for i, (s, b) in enumerate(zip(data.sequences, before)):
        torch.testing.assert_close(s.advantages, b * (w if data.hinted[i] else 1.0))
    assert any(b.abs().sum() > 0 for b in before)
    total_before = sum(float(p.sum()) for p in packed_before)
    total_after = sum(float(mb.advantages.sum()) for mb in mbs)
    hinted_sum = sum(float(b.sum()) for b, h in zip(before, data.hinted) if h)
    assert total_after == pytest.approx(total_before + (w - 1) * hinted_sum, rel=1e-5)
    assert m["hints/correction_capped_fraction"] == 0.0
    assert m["hints/correction_weight_max"] == pytest.approx(w, rel=1e-5)
    assert m["hints/correction_weight_mean"] == pytest.approx(w, rel=1e-5)


def test_correction_over_the_cap_masks_the_tokens():
    cfg, data = correction_data(1.1)
    policy = PositionPolicy()
    mbs = policy.pack(data.sequences)
    m = unhinted_correction(cfg, policy, data, mbs, policy.logprobs(mbs).logprobs, 1.0, HalfReduce())
    assert m["hints/correction_capped_fraction"] == 1.0
    for s, h in zip(data.sequences, data.hinted):
        if h:
            assert float(s.advantages.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------ bit-identical
def test_default_hint_runtime_draws_exactly_what_no_runtime_draws():
    """The default config (fixed, constant, no splits): the same calls, groups and filter result as without a
    runtime; only the budget and the hint metrics are added."""
    cfg = config()
    a, b = Scripted(), Scripted()
    sc = scorer({1: 100, 2: 100}, {2: 2})
    plain = collect_step(cfg, 3, source(ratio=50), a, sc, decode, ())
    hints = HintRuntime.from_config(cfg)
    with_rt = collect_step(cfg, 3, source(ratio=50), b, sc, decode, (), hints=hints)
    assert a.calls == b.calls
    assert [(g.prompt, g.completions, g.results) for g in plain.groups] == [
        (g.prompt, g.completions, g.results) for g in with_rt.groups]
    assert hints.budget.used == 32 and hints.levels == HintLevels(0, 4, 1, 2, 25.0)


def test_sync_rollouts_carry_the_runtime():
    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS)
    hints = runtime(cfg)
    rollouts = SyncRollouts(cfg, source(), Scripted(), scorer({}), decode, (), hints=hints)
    rollouts.next(1)
    assert hints.snapshot(1) is not None and hints.levels.levels == {f"q{i}": 1 for i in range(4)}
    levels, budget = hints.state_dict(1)
    restored = HintRuntime.from_config(cfg, splits(4))
    restored.load_state_dict(json.loads(json.dumps(levels)), json.loads(json.dumps(budget)))
    assert restored.levels == hints.levels and restored.budget == hints.budget


def test_async_rollouts_checkpoint_the_trained_steps_levels_not_the_producers():
    """The producer may run a step ahead; the state stored for step 2 is the synchronous run's after step 2."""
    from questa_nemo.train.async_rollouts import AsyncRollouts

    cfg = config("algo.hints.mode=adaptive", ADAPTIVE_SPLITS, "rollout.max_staleness=1")
    sc = scorer({1: 100, 2: 100, 3: 75}, {2: 2, 3: 1})
    sync = runtime(cfg)
    rollouts = SyncRollouts(cfg, source(), Scripted(), sc, decode, (), hints=sync)
    for step in (1, 2):
        rollouts.next(step)
    ahead = runtime(cfg)
    with AsyncRollouts(cfg, source(), Scripted(), sc, decode, (), first_step=1, hints=ahead) as produced:
        produced.next(1)
        produced.next(2)
        assert ahead.state_dict(2) == sync.state_dict(2)
        assert ahead.snapshot(2)["metrics"] == sync.snapshot(2)["metrics"]
