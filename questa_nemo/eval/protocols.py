"""The evaluation protocols the field reports with (docs/evaluation.md), by name.

`eval.preset` names one; conf/eval/<file>.yaml sets its values. Every results.json records the preset and the
keys of the run that differ from it (`preset_deviations`), so a number is never shown under a protocol it did
not follow (a smoke run with eval.n_samples=2 under `questa` says so).

- questa: QuestA's own numbers, from AReaL's evaluation script: 32 samples per problem, temperature 0.6, top-p
  0.95, top-k off, 32,768 new tokens; avg@32 (= pass@1 over the 32 samples) and pass@8/16/32.
- leaderboard: the independent leaderboard (sober-reasoning: lighteval + vLLM): one sample per problem and
  seed, temperature 0.8, top-p 0.9, 32,768 new tokens, chat template; pass@1 mean +- std over 10 seeds for AIME
  and AMC, 3 seeds for MATH500 / Minerva / OlympiadBench.
- validation: the reference's validation inside training: 16 samples, temperature 0.7, top-p 0.95, 30,720.
"""

from __future__ import annotations

from typing import Any

from questa_nemo.config import EvalConfig

PROTOCOLS: dict[str, dict[str, Any]] = {
    "questa": {"n_samples": 32, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seeds": []},
    "leaderboard": {"n_samples": 1, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 32768},
    "validation": {"n_samples": 16, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 30720},
}
# The leaderboard's seed counts per benchmark (benchmark preset -> seeds); others get eval.seeds.
LEADERBOARD_SEEDS = {"aime24": 10, "aime25": 10, "amc23": 10, "math500": 3, "minerva": 3, "olympiadbench": 3}


def deviations(e: EvalConfig) -> dict[str, Any]:
    """Keys of the run whose values differ from its preset's (key -> the run's value); {} for custom/profile."""
    spec = dict(PROTOCOLS.get(e.preset, {}))
    out = {key: getattr(e, key) for key, value in spec.items() if getattr(e, key) != value}
    if e.preset == "leaderboard":
        for i, b in enumerate(e.benchmarks):
            want = LEADERBOARD_SEEDS.get(b.preset or "")
            got = len(b.seeds if b.seeds is not None else e.seeds or [e.seed])
            if want is not None and got != want:
                out[f"benchmarks[{i}].seeds"] = got
    return out
