"""Per-step metrics: named phase timers (verl-style), one JSONL line per step, TensorBoard scalars, and the
terminal progress bar. Metric names are namespaced by phase (rollout/, reward/, actor/, perf/, ...)."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


class PhaseTimer:
    """`with timer("rollout"): ...` accumulates seconds per phase for the current step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = {f"time/{k}_s": v for k, v in self.seconds.items()}, {}
        return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/inf; keep it visible rather than dropping the key
    return value


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a per-step JSONL file whose "step" is past `step` (what a resumed run will redo)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def sample_records(step: int, groups, decode, limit: int) -> list[dict]:
    """One record per group, for the first `limit` groups (train/grpo.py Group): the prompt as text, the
    reference answer, and each completion's text, reward, reason, length and finish reason."""
    records = []
    for group in groups[:limit]:
        prompts = group.prompts()
        records.append(
            {
                "step": step,
                "id": group.prompt.id,
                "prompt": decode(group.prompt.prompt_ids),
                "answer": group.prompt.answer,
                "samples": [
                    {
                        "text": text,
                        "reward": result.reward,
                        "reason": result.reason,
                        "tokens": len(completion.token_ids),
                        "finish": completion.finish_reason,
                        "hinted": prompt.hinted,
                    }
                    for prompt, completion, result, text in zip(prompts, group.completions, group.results, group.texts)
                ],
            }
        )
    return records


class SampleLogger:
    """Writes `<run_dir>/samples.jsonl`: a few of each step's groups as text (sample_records); a resumed run
    truncates lines past its resume step, as MetricsLogger does."""

    def __init__(self, run_dir: str | Path, limit: int, resume_step: int = 0):
        self.path, self.limit = Path(run_dir) / "samples.jsonl", limit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)

    def log(self, step: int, groups, decode) -> None:
        records = sample_records(step, groups, decode, self.limit)
        if records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


class MetricsLogger:
    """Writes `<run_dir>/metrics.jsonl` (appending; a resumed run truncates lines past its resume step so the
    file never holds a step twice) and TensorBoard event files under `<run_dir>/tb`."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
