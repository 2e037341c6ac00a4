"""Per-problem evaluation results, and the append-only JSONL file that makes an evaluation resumable.

Each finished batch of problems is appended and fsync'ed; on start the file is read back and finished problems
are skipped. A line cut short by a kill is dropped (and the file truncated to the last whole line). A side file
records the settings the results were produced with, so a resumed run never mixes two sampling setups.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from questa_nemo.atomic import write_text_atomic
from questa_nemo.errors import InputError


@dataclass
class ProblemResult:
    id: str
    n: int  # samples drawn
    correct: int  # samples the reward scored correct
    majority_correct: bool  # the most frequent extracted answer was a correct one
    answers: list[str | None]  # extracted final answer of each sample (None: no answer found)
    reasons: dict[str, int]  # reward reasons (correct, wrong, no_answer, ...) and how many samples got each
    mean_tokens: float  # mean completion length in tokens
    truncated: int  # samples cut at max_new_tokens
    prompt_cut: int = 0  # prompt tokens dropped to fit the model's context (eval.overlong_prompts=truncate)

    @property
    def pass_rate(self) -> float:
        return self.correct / self.n

    @staticmethod
    def from_json(record: dict[str, Any]) -> ProblemResult:
        fields = ProblemResult.__dataclass_fields__
        return ProblemResult(**{k: record[k] for k in fields if k in record or k != "prompt_cut"})


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename it over `path`."""
    write_text_atomic(path, json.dumps(payload, indent=1))


class StoreError(InputError):
    """The results file cannot be resumed; the message names the file and line or key."""


class ResultStore:
    """`<stem>.jsonl` (one ProblemResult per line) beside `<stem>.meta.json` (the settings that produced it)."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        self.meta_path = path.with_suffix(".meta.json")
        self.settings = settings

    def load(self) -> dict[str, ProblemResult]:
        """Finished problems by id; checks the settings match and repairs a torn last line."""
        if self.meta_path.exists():
            with open(self.meta_path) as f:
                previous = json.load(f)
            changed = sorted(
                k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k)
            )
            if changed:
                raise StoreError(
                    f"{self.path}: earlier results were made with other settings ({', '.join(changed)}); "
                    "use another eval.output_dir or delete the file to start over"
                )
        else:
            write_json_atomic(self.meta_path, self.settings)
        if not self.path.exists():
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        results: dict[str, ProblemResult] = {}
        lines = data.split(b"\n")
        whole, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
        for line_no, line in enumerate(whole, start=1):
            try:
                result = ProblemResult.from_json(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise StoreError(
                    f"{self.path} line {line_no}: unreadable result ({e}); delete the file to start over, "
                    "or use another eval.output_dir"
                ) from None
            results[result.id] = result
        if tail:  # the run was killed mid-write: drop the partial line so appends start clean
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(tail))
        return results

    def append(self, results: Iterable[ProblemResult]) -> None:
        """Append finished problems and make them durable before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for result in results:
                f.write(json.dumps(asdict(result)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def pooled(runs: dict[int, list[ProblemResult]]) -> list[ProblemResult]:
    """One result per problem over every seed's samples (for pass rates); a single run as it is."""
    if len(runs) == 1:
        return next(iter(runs.values()))
    first = next(iter(runs.values()))
    out = []
    for i, p in enumerate(first):
        group = [run[i] for run in runs.values()]
        n = sum(g.n for g in group)
        out.append(
            replace(
                p,
                n=n,
                correct=sum(g.correct for g in group),
                majority_correct=sum(g.majority_correct for g in group) * 2 > len(group),  # most seeds' vote
                answers=[a for g in group for a in g.answers],
                reasons=dict(sum((Counter(g.reasons) for g in group), Counter())),
                mean_tokens=sum(g.mean_tokens * g.n for g in group) / n,
                truncated=sum(g.truncated for g in group),
                prompt_cut=max(g.prompt_cut for g in group),
            )
        )
    return out
