"""Benchmark problems from local files (JSONL, parquet, a `datasets` folder), with presets for the field names.

Nothing is downloaded: the user points `eval.benchmarks[i].path` at a copy of the benchmark. Errors name the
file, the row (counted from 1; the line number for JSONL) and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from questa_nemo.config import BenchmarkConfig
from questa_nemo.errors import InputError, one_line, where


@dataclass(frozen=True)
class BenchmarkRow:
    id: str  # unique within the benchmark; the key of per-problem results and of pass-rate profiles
    problem: str  # the question alone: evaluation prompts carry no hint
    answer: str  # the reference final answer, handed to the reward as it is


@dataclass(frozen=True)
class Preset:
    title: str  # as the QuestA paper's tables name it
    problem_field: str
    answer_field: str
    id_field: str | None


# Field names of the usual Hugging Face copies (AIME: HuggingFaceH4/aime_2024, math-ai/aime25; HMMT and BRUMO:
# MathArena; OlympiadBench: the English maths text-only split, whose final_answer is a one-element list).
PRESETS: dict[str, Preset] = {
    "aime24": Preset("AIME 2024", "problem", "answer", "id"),
    "aime25": Preset("AIME 2025", "problem", "answer", "id"),
    "hmmt_feb25": Preset("HMMT Feb 2025", "problem", "answer", "problem_idx"),
    "olympiadbench": Preset("OlympiadBench", "question", "final_answer", "id"),
    "brumo25": Preset("BRUMO 2025", "problem", "answer", "problem_idx"),
    # The leaderboard's others (field names of HuggingFaceH4/MATH-500, math-ai/amc23, math-ai/minervamath;
    # another copy may name them otherwise: set problem_field / answer_field / id_field)
    "amc23": Preset("AMC 2023", "question", "answer", "id"),
    "math500": Preset("MATH500", "problem", "answer", "unique_id"),
    "minerva": Preset("Minerva Math", "question", "answer", None),
}


class BenchmarkError(InputError):
    """A benchmark file or row is unusable; the message names the file, row and field, and what to do."""


FIX_FIELDS = "set eval.benchmarks[i].problem_field / answer_field / id_field, or a preset"
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")  # and a `datasets` save_to_disk folder


def resolve_fields(cfg: BenchmarkConfig) -> tuple[str, str, str | None]:
    """(problem, answer, id) field names: explicit config first, then the preset, then problem/answer/no id."""
    preset = PRESETS.get(cfg.preset) if cfg.preset else None
    if cfg.preset and preset is None:
        raise BenchmarkError(
            f"eval.benchmarks[{cfg.name}].preset: {cfg.preset!r} is not one of {', '.join(PRESETS)}"
        )
    problem = cfg.problem_field or (preset.problem_field if preset else "problem")
    answer = cfg.answer_field or (preset.answer_field if preset else "answer")
    id_field = cfg.id_field or (preset.id_field if preset else None)
    return problem, answer, id_field


def _read_folder(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise BenchmarkError(
            f"{path}: not a readable datasets save_to_disk folder ({one_line(e)}); give a .jsonl, .json, "
            ".parquet file or such a folder"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("test" if "test" in ds else next(iter(ds)))
        if name not in ds:
            raise BenchmarkError(f"{path}: has splits {list(ds)}, not {name!r}; set eval.benchmarks[i].split")
        ds = ds[name]
    return ds.to_list()


def read_records(path: Path, split: str | None) -> list[dict[str, Any]]:
    """Raw rows of a JSONL / JSON-list / parquet file or a `datasets` save_to_disk folder.

    Each row carries "__row__", its 1-based number (the line number for JSONL), and "__unit__" ("line"/"row").
    """
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file or folder; check eval.benchmarks[i].path")
    if path.is_dir():
        return [{"__row__": i, "__unit__": "row", **r} for i, r in enumerate(_read_folder(path, split), 1)]
    if path.suffix not in SUFFIXES:
        raise BenchmarkError(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; give a .jsonl, .json (a list of rows), "
            ".parquet file or a datasets save_to_disk folder"
        )
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise BenchmarkError(f"{path}: not a readable parquet file ({one_line(e)}); re-copy it") from None
        return [{"__row__": i, "__unit__": "row", **r} for i, r in enumerate(table, 1)]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise BenchmarkError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a text file"
        ) from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise BenchmarkError(
                f"{path} line {e.lineno}: not valid JSON ({e.msg}); a .json benchmark holds one list of rows "
                "(use .jsonl for one row per line)"
            ) from None
        if not isinstance(rows, list):
            raise BenchmarkError(f"{path}: a .json benchmark must hold a list of rows (or use .jsonl)")
        return [
            {"__row__": i, "__unit__": "row", **r} if isinstance(r, dict) else {"__row__": i, "__bad__": r}
            for i, r in enumerate(rows, 1)
        ]
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(
                f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None
        # JSONL rows keep their line numbers so errors point at the line an editor shows
        records.append(
            {"__row__": line_no, "__unit__": "line", **record}
            if isinstance(record, dict)
            else {"__row__": line_no, "__unit__": "line", "__bad__": record}
        )
    return records


def _text(value: Any) -> str | None:
    """A field as text; numbers become strings (AIME answers are ints), one-element lists are unwrapped."""
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else ", ".join(str(v) for v in value) if value else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def load_benchmark(cfg: BenchmarkConfig) -> list[BenchmarkRow]:
    """The benchmark's rows, checked: every row has a problem and an answer, ids are unique, the file is not empty."""
    path = Path(cfg.path)
    problem_field, answer_field, id_field = resolve_fields(cfg)
    records = read_records(path, cfg.split)
    if not records:
        raise BenchmarkError(f"{path}: no rows (the file is empty); check eval.benchmarks[i].path")
    rows: list[BenchmarkRow] = []
    first_row_of: dict[str, int] = {}
    for index, record in enumerate(records, start=1):
        row_no = record.pop("__row__", index)
        unit = record.pop("__unit__", "row")
        at = where(str(path), row_no, unit)
        if "__bad__" in record:
            raise BenchmarkError(
                f"{at}: expected a JSON object, got {type(record['__bad__']).__name__}; fix or remove the row"
            )
        fields = {}
        for role, name in (("problem", problem_field), ("answer", answer_field)):
            if name not in record:
                raise BenchmarkError(
                    f"{at}: no field {name!r} ({role}); fields are {sorted(record)}; {FIX_FIELDS}"
                )
            fields[role] = _text(record[name])
            if fields[role] is None:
                raise BenchmarkError(f"{at}: field {name!r} ({role}) is empty; fix or remove the row")
        if id_field is not None:
            if id_field not in record or _text(record[id_field]) is None:
                raise BenchmarkError(f"{at}: no value in id field {id_field!r}; {FIX_FIELDS}")
            row_id = _text(record[id_field])
        else:
            row_id = str(row_no)
        assert row_id is not None
        if row_id in first_row_of:
            raise BenchmarkError(
                f"{at}: id {row_id!r} duplicates {unit} {first_row_of[row_id]} (field {id_field!r}); "
                "make the ids unique or set another id_field"
            )
        first_row_of[row_id] = row_no
        rows.append(BenchmarkRow(id=row_id, problem=fields["problem"], answer=fields["answer"]))
        if cfg.limit is not None and len(rows) == cfg.limit:
            break
    return rows


def benchmark_key(cfg: BenchmarkConfig) -> str:
    """The benchmark's name in result files and reports: eval.benchmarks[i].name, else the preset, else the stem."""
    name = cfg.name or cfg.preset or Path(cfg.path.rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def benchmark_title(key: str) -> str:
    """The title shown on plots: the paper's name for a preset key, else the key."""
    return PRESETS[key].title if key in PRESETS else key
