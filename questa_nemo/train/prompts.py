"""RL prompts: a built data set, tokenised once through the chat template, iterated in a seeded order that a
recovery state can restore exactly (epoch + cursor)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from questa_nemo.config import ConfigError, split_ratio


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt_ids: list[int]  # chat-templated prompt, generation prompt appended
    answer: str  # reference answer as "\\boxed{...}"
    hinted: bool  # the prompt carries a hint (hint_ratio > 0 and a hint was long enough to keep)
    meta: dict  # extra columns (n_ops for the small world, hint_ratio, ...)


def read_rows(path: str | Path, split: str = "train") -> list[dict]:
    """Rows of a `questa-nemo data` output: a DatasetDict folder, one split folder, or a JSONL file."""
    p = Path(path)
    if p.suffix == ".jsonl":
        with open(p) as f:
            return [json.loads(line) for line in f if line.strip()]
    if not p.exists():
        raise FileNotFoundError(f"train.dataset: {p} does not exist (build it with `questa-nemo data`)")
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"train.split: {p} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return ds.to_list()


def tokenize_rows(rows: list[dict], tokenizer, max_prompt_tokens: int, source: str) -> tuple[list[PromptRow], int]:
    """Chat-template every row; rows longer than max_prompt_tokens are counted and skipped (the recipe's limit)."""
    out, too_long = [], 0
    for i, row in enumerate(rows):
        for key in ("messages", "answer"):
            if key not in row:
                raise KeyError(f"{source} row {i}: missing field {key!r}")
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        meta = {k: v for k, v in row.items() if k not in ("messages", "answer", "id")}
        hinted = bool(row.get("hint")) and float(row.get("hint_ratio", 0) or 0) > 0
        out.append(PromptRow(str(row.get("id", i)), list(ids), row["answer"], hinted, meta))
    return out, too_long


HintPrompts = dict[float, dict[str, PromptRow]]  # hint ratio (percent) -> problem id -> prompt row


def problem_id(row_id: str) -> str:
    """The problem behind a row id: `questa-nemo data` writes "<source id>@p<ratio>" (one row per hint ratio);
    other ids are their own problem."""
    head, sep, tail = row_id.rpartition("@p")
    if sep and head:
        try:
            float(tail)
            return head
        except ValueError:
            pass
    return row_id


def check_split_ids(ids: Mapping[str, list[str]], files: Mapping[str, str]) -> None:
    """Every split must hold the same problem ids: `ids` ratio key -> ids of its rows, `files` -> its path.
    Raises ConfigError naming the split's key, its file and the first id that does not match."""
    keys = sorted(ids, key=split_ratio)
    if not keys:
        return
    first = keys[0]
    ref = set(ids[first])
    for key in keys[1:]:
        have = set(ids[key])
        for pid in ids[key]:
            if pid not in ref:
                raise ConfigError(f"algo.hints.splits.{key}", f"{files[key]}: row id {pid!r} is not in "
                                  f"{files[first]} (splits must hold the same problems)")
        for pid in ids[first]:
            if pid not in have:
                raise ConfigError(f"algo.hints.splits.{key}", f"{files[key]}: no row with id {pid!r} "
                                  f"(present in {files[first]})")


def load_hint_prompts(splits: Mapping[str, str], tokenizer, max_prompt_tokens: int, split: str = "train"
                      ) -> HintPrompts:
    """algo.hints.splits (ratio key -> data set) tokenised: ratio -> problem id -> PromptRow. The splits must
    hold the same problems (ids up to their "@p<ratio>" suffix) (ConfigError naming the file and the id); prompts over max_prompt_tokens are skipped as in
    training (HintRuntime.row_at then falls to a lower ratio)."""
    raw = {key: read_rows(path, split) for key, path in splits.items()}
    check_split_ids({k: [problem_id(str(r.get("id", i))) for i, r in enumerate(rows)] for k, rows in raw.items()},
                    splits)
    out: HintPrompts = {}
    for key, rows in raw.items():
        tokenized, _ = tokenize_rows(rows, tokenizer, max_prompt_tokens, splits[key])
        out[split_ratio(key)] = {problem_id(r.id): r for r in tokenized}
    return out


class PromptSource:
    """Endless, epoch-wise shuffled prompt stream; `state_dict()` / `load_state_dict()` make resume exact."""

    def __init__(self, rows: list[PromptRow], seed: int):
        if not rows:
            raise ValueError("train.dataset: no usable prompts (all rows empty or longer than max_prompt_tokens)")
        self.rows, self.seed = rows, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next(self, n: int) -> list[PromptRow]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.rows[self._order[self.cursor]])
            self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
