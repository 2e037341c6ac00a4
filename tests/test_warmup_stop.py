"""The warm-up's stop by calibration (validation.StopRule) on hand-made check sequences: no model needed."""

import pytest

from questa_nemo.train.validation import StopRule

RULE = StopRule(target=0.15, ceiling=0.06, every=50, every_near=10)


def run(rule, trajectory):
    """Feed `trajectory` {step: (hinted, no_hint)} to the rule as a warm-up would (asked every ask_every
    steps, measured only when due); returns (checked steps, kept step or None)."""
    checks = {}
    for step in range(rule.ask_every, max(trajectory) + 1, rule.ask_every):
        if not rule.due(step, checks):
            continue
        hinted, no_hint = trajectory[step]
        checks[step] = {"hinted": hinted, "no_hint": no_hint}
        kept = rule.decide(checks)
        if kept is not None:
            return sorted(checks), kept
    return sorted(checks), None


def linear(points):
    """Piecewise-linear trajectory through {step: (hinted, no_hint)}, defined at every multiple of 10."""
    steps = sorted(points)
    out = {}
    for a, b in zip(steps, steps[1:]):
        for step in range(a, b + 1, 10):
            f = (step - a) / (b - a)
            out[step] = tuple(round(x + f * (y - x), 4) for x, y in zip(points[a], points[b]))
    return out


def test_the_fresh_machine_jump_is_caught_by_the_near_checks():
    # The run, checked every 50 steps: 0.06 at 1050, 0.14 at 1100, 0.31 at 1150 (no-hint 0.20 there),
    # and the old rule stopped at 1150. Once 0.06 >= 0.05 checks come every 10 steps; at 1110 (0.174 / 0.08)
    # the no-hint rate is past the ceiling, and 1100 (0.14 / 0.05, 0.01 short) is closer to the band.
    traj = linear({0: (0.0, 0.0), 1000: (0.03, 0.01), 1050: (0.06, 0.015), 1100: (0.14, 0.05), 1150: (0.31, 0.20)})
    checks, kept = run(RULE, traj)
    assert checks[:3] == [50, 100, 150] and 1040 not in checks
    assert checks[-7:] == [1050, 1060, 1070, 1080, 1090, 1100, 1110]
    assert traj[1110] == (0.174, 0.08) and kept == 1100


def test_the_old_rule_on_the_same_run_stops_past_the_band():
    old = StopRule(target=0.15, every=50)
    traj = linear({0: (0.0, 0.0), 1000: (0.03, 0.01), 1050: (0.06, 0.015), 1100: (0.14, 0.05), 1150: (0.31, 0.20)})
    assert run(old, traj) == (list(range(50, 1151, 50)), 1150)


def test_a_jump_between_checks_keeps_the_check_closer_to_the_band():
    # Coarse checks only: 0.06 -> 0.14 -> 0.31 / 0.20. The stop at 1150 is far above the no-hint ceiling
    # (distance 0.14); 1100 is 0.01 short of the target: its weights are kept.
    rule = StopRule(target=0.15, ceiling=0.06, every=50)
    checks = {1050: {"hinted": 0.06, "no_hint": 0.02}, 1100: {"hinted": 0.14, "no_hint": 0.05}}
    assert rule.decide(checks) is None
    checks[1150] = {"hinted": 0.31, "no_hint": 0.20}
    assert rule.distance(checks[1150]) == pytest.approx(0.14)
    assert rule.decide(checks) == 1100


def test_a_stop_inside_the_band_keeps_itself():
    checks = {850: {"hinted": 0.10, "no_hint": 0.02}, 860: {"hinted": 0.152, "no_hint": 0.033}}
    assert RULE.decide(checks) == 860


def test_no_hint_above_the_ceiling_stops_before_the_hinted_target():
    checks = {500: {"hinted": 0.11, "no_hint": 0.05}, 510: {"hinted": 0.12, "no_hint": 0.08}}
    assert RULE.decide(checks) == 500  # 0.04 short against 0.03 short + 0.02 over
    checks[510] = {"hinted": 0.14, "no_hint": 0.065}
    assert RULE.decide(checks) == 510  # 0.01 + 0.005 against 0.04


def test_a_tie_keeps_the_earlier_check_and_a_lone_first_check_keeps_itself():
    checks = {10: {"hinted": 0.14, "no_hint": 0.0}, 20: {"hinted": 0.40, "no_hint": 0.07}}
    assert RULE.decide(checks) == 10  # 0.01 against 0.01
    assert RULE.decide({50: {"hinted": 0.5, "no_hint": 0.3}}) == 50


def test_format_guesses_do_not_stop_it_and_near_checks_wait_for_the_turn():
    # Before any arithmetic is learned, format-right guesses solve 2-3% with or without hints.
    checks = {50: {"hinted": 0.03, "no_hint": 0.025}}
    assert RULE.decide(checks) is None
    assert not RULE.due(60, checks) and RULE.due(100, checks)
    checks[100] = {"hinted": 0.05, "no_hint": 0.02}
    assert RULE.due(110, checks) and not RULE.due(115, checks)


def test_without_a_ceiling_or_near_interval_it_is_the_old_stop():
    old = StopRule(target=0.15, every=50)
    assert old.ask_every == 50 and not old.due(60, {50: {"hinted": 0.14, "no_hint": 0.0}})
    assert old.decide({50: {"hinted": 0.14, "no_hint": 0.0}, 100: {"hinted": 0.9, "no_hint": 0.9}}) == 100


def test_the_stopper_puts_back_the_kept_checks_weights():
    from types import SimpleNamespace

    import torch

    from questa_nemo.train.validation import WarmupStopper

    model = torch.nn.Linear(2, 2)
    reloaded = []
    policy = SimpleNamespace(model_chunks=[model], optimizer=SimpleNamespace(reload_model_params=lambda: reloaded.append(1)))
    rates = {50: (0.06, 0.02), 100: (0.14, 0.05), 150: (0.31, 0.20)}
    checks = {}
    stopper = WarmupStopper(StopRule(0.15, 0.06, every=50), policy, lambda step: dict(zip(("hinted", "no_hint"),
                            rates[step])), checks, log=lambda m: None)
    for step in range(1, 151):
        with torch.no_grad():
            model.weight.fill_(step)  # a "training step"
        if step % stopper.rule.ask_every == 0 and stopper(step):
            break
    assert step == 150 and sorted(checks) == [50, 100, 150] and stopper.kept_step == 100
    assert torch.all(model.weight == 100) and reloaded == [1]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.warmup.check_every_near=0", "train.warmup.check_every_near"),
        ("train.warmup.max_no_hint_pass1=1.5", "train.warmup.max_no_hint_pass1"),
        ("train.warmup.max_no_hint_pass1=0", "train.warmup.max_no_hint_pass1"),
    ],
)
def test_stop_config_errors_name_the_key(override, key):
    from questa_nemo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("default", [override])


def test_the_default_config_builds_the_documented_rule():
    from questa_nemo.config import load_config
    from questa_nemo.train.validation import stop_rule

    rule = stop_rule(load_config("default", []).train.warmup)
    assert rule == StopRule(target=0.15, ceiling=0.06, every=50, every_near=10) and rule.ask_every == 10
