"""The arms of an equal-compute comparison (issue 20): each entry of train.arms becomes its own copy of the
config, and after training each arm's generated tokens and zero-signal share are read back from its metrics.

    train.arms.<name> = "<path>"                                  a data set, the run's algo.hints as they are
    train.arms.<name> = {dataset: <path>, hints: {...}, token_budget: N}
        hints: algo.hints keys merged over algo.hints for this arm (e.g. {mode: adaptive, max_retries: 1});
        token_budget: generated tokens the arm's GRPO stage may spend (train.token_budget of its copy)

A build without the algo.hints schema (or without train.token_budget) still runs the arms it can: hint keys
that only choose a fixed-ratio run are dropped with a note (the arm's data set decides), and an arm that asks
for anything else (mode adaptive, retries, mixed groups, ...) is skipped with the reason. Pure: no torch, no
process groups; the recipe logs the notes.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from questa_nemo.config import ArmSpec, Config, ConfigError, arm_spec

# Hint keys whose value, when the schema lacks algo.hints, leaves the arm a fixed-ratio run on its data set.
FIXED_RUN_KEYS = ("schedule", "splits")


@dataclass
class Arm:
    """One arm ready to run: its name, data set and config copy; `skipped` says why it cannot run here."""

    name: str
    dataset: str
    cfg: Config
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


def _schema_keys(obj: Any) -> set[str]:
    return {f.name for f in fields(obj)} if is_dataclass(obj) else set()


def merged_hints(base: Any, partial: dict[str, Any], key: str) -> Any:
    """`partial` (a mapping of HintsConfig keys, nested ones too) merged over the dataclass `base`; unknown keys
    and wrong types raise ConfigError naming `key`.<field>."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), partial)
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        inner = getattr(e, "full_key", None)
        raise ConfigError(f"{key}.{inner}" if inner else key, str(e).splitlines()[0]) from None
    validate = getattr(out, "validate", None)
    if callable(validate):
        if "key" in inspect.signature(validate).parameters:  # HintsConfig.validate(key) names the arm's keys
            validate(key=key)
        else:
            try:
                validate()
            except ConfigError as e:
                raise ConfigError(f"{key} ({e.key})", str(e).split(": ", 1)[-1]) from None
    return out


def arm_config(cfg: Config, spec: ArmSpec) -> Arm:
    """The arm's own deep copy of `cfg`: algo.hints = algo.hints merged with spec.hints, train.token_budget =
    spec.token_budget when given. Errors name train.arms.<name>.<key>."""
    c = copy.deepcopy(cfg)
    arm = Arm(spec.name, spec.dataset, c)
    key = f"train.arms.{spec.name}"
    if spec.hints:
        if hasattr(c.algo, "hints"):
            c.algo.hints = merged_hints(c.algo.hints, spec.hints, f"{key}.hints")
        else:
            fixed = set(spec.hints) <= set(FIXED_RUN_KEYS) | {"mode"} and spec.hints.get("mode", "fixed") == "fixed"
            if not fixed:
                arm.skipped = f"{key}.hints sets {', '.join(sorted(spec.hints))}: needs algo.hints, which this build lacks"
            else:
                arm.notes.append(f"{key}.hints {sorted(spec.hints)} dropped: this build has no algo.hints, so the "
                                 f"arm runs on {spec.dataset} as built (a fixed hint ratio)")
    if spec.token_budget is not None:
        if "token_budget" in _schema_keys(c.train):
            c.train.token_budget = spec.token_budget
        else:
            arm.notes.append(f"{key}.token_budget={spec.token_budget} ignored: this build has no "
                             f"train.token_budget, so the arm runs train.steps={c.train.steps} steps")
    return arm


def plan_arms(cfg: Config) -> list[Arm]:
    """Every arm this process trains, in train.arms order (train.run_arms selects), each validated up front;
    no arms: one run on train.dataset (name "")."""
    if not cfg.train.arms:
        if cfg.train.run_arms is not None:
            raise ConfigError("train.run_arms", "selects arms, but train.arms is empty")
        if not cfg.train.dataset:
            raise ConfigError("train.dataset", "no RL data set given (build one with `questa-nemo data`)")
        return [Arm("", cfg.train.dataset, cfg)]
    chosen = cfg.train.run_arms
    specs = [arm_spec(name, value) for name, value in cfg.train.arms.items()]
    return [arm_config(cfg, spec) for spec in specs if chosen is None or spec.name in chosen]


def summary_name(cfg: Config) -> str:
    """summary.json for a whole run; summary_<arm+arm> (or summary_initial) for a selection of arms."""
    chosen = cfg.train.run_arms
    if chosen is None:
        return "summary.json"
    return f"summary_{'+'.join(chosen) or 'initial'}.json"


def training_record(run_dir: Path, arm: Arm) -> dict:
    """What an arm spent and how much of its batch taught anything, from its metrics.jsonl:
    generated_tokens (hints/tokens_used where the trainer counts it, else the sum over steps of rollout
    tokens/s x rollout seconds, this rank's), steps, zero_signal_share (mean over steps of
    hints/zero_signal_share; null where the trainer does not log it), the budget asked and any skip."""
    from questa_nemo.train.metrics import read_metrics

    rows = read_metrics(run_dir)
    budget = getattr(arm.cfg.train, "token_budget", None)
    record: dict[str, Any] = {"dataset": arm.dataset, "token_budget": budget, "steps": len(rows)}
    if arm.skipped:
        record["skipped"] = arm.skipped
    if arm.notes:
        record["notes"] = arm.notes
    used = [m["hints/tokens_used"] for m in rows if isinstance(m.get("hints/tokens_used"), int | float)]
    if used:
        record["generated_tokens"] = float(max(used))  # a running total
        record["generated_tokens_source"] = "hints/tokens_used"
    elif rows:
        record["generated_tokens"] = float(round(sum(
            m.get("perf/rollout_tokens_per_s", 0.0) * m.get("time/rollout_s", 0.0) for m in rows
        )))
        record["generated_tokens_source"] = "perf/rollout_tokens_per_s x time/rollout_s"
    shares = [m["hints/zero_signal_share"] for m in rows
              if isinstance(m.get("hints/zero_signal_share"), int | float) and math.isfinite(m["hints/zero_signal_share"])]
    record["zero_signal_share"] = sum(shares) / len(shares) if shares else None
    return record
