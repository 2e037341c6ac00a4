"""Readers: OpenR1-shaped rows (and the reference's intermediate JSONL) from JSONL, parquet or `datasets`
save_to_disk folders, checked field by field, plus the pass-rate file of the difficulty filter.

Every problem with a row is either an error naming file, row and field (the file is not what we expect) or a
`Drop` with a reason the build counts (the recipe, or plain sense, says the row cannot become a prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from questa_nemo.data.hints import reference_solution
from questa_nemo.errors import JSONL_SUFFIXES, InputError, one_line, where

# Reasons a source row is dropped before any hint is cut (counted in the manifest).
NO_CORRECT_GENERATION = "no_correct_generation"  # no generation judged correct
EMPTY_ANSWER = "empty_answer"  # the reference would emit "\boxed{}"
EMPTY_SOLUTION = "empty_solution"  # nothing left after quote stripping and the last </think>
ANSWER_NOT_IN_SOLUTION = "answer_not_in_solution"  # the recipe's own drop
NO_PASS_RATE = "no_pass_rate"  # the difficulty filter has no pass rate for this id
PASS_RATE_OUT_OF_RANGE = "pass_rate_out_of_range"  # the difficulty filter's range excludes it

FIX_ROW = "fix or remove that row"


class DataError(InputError):
    """A malformed input: the message names the file, the row (1-based: the line number for JSONL, else the
    row), the field, and what to do (`fix`)."""

    def __init__(self, file: str, row: int | None, field: str | None, message: str, fix: str | None = None):
        text = (
            f"{where(file, row)}: {message}"
            if field is None
            else f"{where(file, row)}: field {field!r}: {message}"
        )
        fix = fix if fix is not None else (FIX_ROW if row is not None else "")
        super().__init__(f"{text}; {fix}" if fix else text)
        self.file, self.row, self.field = file, row, field


@dataclass(frozen=True)
class RowRef:
    file: str  # input file (a split of a save_to_disk folder reads as "<folder>[<split>]")
    row: int  # 0-based row index (line index for JSONL: the reference's query_id); messages show `number`

    @property
    def number(self) -> int:
        """The row as errors show it: 1-based (the line number for JSONL)."""
        return self.row + 1


@dataclass(frozen=True)
class SourceRow:
    """One problem with the solution its hints are cut from."""

    source_id: str  # OpenR1 uuid; the line index for the reference's JSONL (its query_id)
    problem: str
    solution: str  # after quote stripping and the last </think>
    answer: str  # raw final answer
    ref: RowRef


@dataclass(frozen=True)
class Drop:
    reason: str
    ref: RowRef


# ----------------------------------------------------------------------------------- raw records
def _jsonl_records(path: Path) -> Iterator[tuple[RowRef, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue  # a blank line holds no row; the index still counts it, as the reference's does
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    str(path), i + 1, None, f"not valid JSON ({e.msg} at column {e.colno})", "fix the line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    str(path), i + 1, None, f"a JSON object is expected, got {type(record).__name__}"
                )
            yield RowRef(str(path), i), record


def _parquet_records(path: Path) -> Iterator[tuple[RowRef, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield RowRef(str(path), row), record
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            str(path),
            None,
            None,
            f"not a readable parquet file ({one_line(e)})",
            "check the file (re-copy it)",
        ) from None


def _disk_records(folder: Path) -> Iterator[tuple[RowRef, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(
            str(folder), None, None, f"not a readable datasets save_to_disk folder ({one_line(e)})"
        ) from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        name = str(folder) if split is None else f"{folder}[{split}]"
        for i, record in enumerate(dataset):
            yield RowRef(name, i), record


def is_disk_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def input_files(path: Path) -> list[Path]:
    """The files one input stands for: itself, a save_to_disk folder's files, or a folder's parquet/JSONL."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(str(path), None, None, "no such file or folder", "check the path in data.inputs")
    if is_disk_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", *JSONL_SUFFIXES))
    if not found:
        raise DataError(
            str(path), None, None, "folder holds no parquet or JSONL files", "check the path in data.inputs"
        )
    return found


def read_records(path: Path) -> Iterator[tuple[RowRef, dict]]:
    """Raw rows of one input (file or folder), in order, each with where it came from."""
    if path.is_dir() and is_disk_dataset(path):
        yield from _disk_records(path)
        return
    for file in input_files(path):
        if file.suffix == ".parquet":
            yield from _parquet_records(file)
        elif file.suffix in JSONL_SUFFIXES:
            yield from _jsonl_records(file)
        else:
            raise DataError(
                str(file),
                None,
                None,
                "unknown format",
                "give a .parquet, .jsonl or a datasets save_to_disk folder",
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- field checks
def _field(record: dict, name: str, field_map: dict[str, str], ref: RowRef) -> Any:
    key = field_map.get(name, name)
    if key not in record:
        fix = f"add it, or name the field holding it with data.field_map.{name}=<field>"
        raise DataError(ref.file, ref.number, key, "missing", fix)
    return record[key]


def _string(record: dict, name: str, field_map: dict[str, str], ref: RowRef) -> str:
    value = _field(record, name, field_map, ref)
    if not isinstance(value, str):
        raise DataError(
            ref.file, ref.number, field_map.get(name, name), f"a string is expected, got {_kind(value)}"
        )
    return value


def _list_of(
    record: dict, name: str, kind: type, field_map: dict[str, str], ref: RowRef, nullable: bool = False
) -> list:
    """A list field whose items are all `kind` (or None where `nullable`)."""
    key = field_map.get(name, name)
    value = _field(record, name, field_map, ref)
    if not isinstance(value, list):
        raise DataError(ref.file, ref.number, key, f"a list is expected, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, kind) and not (nullable and item is None):
            raise DataError(
                ref.file, ref.number, f"{key}[{i}]", f"{kind.__name__} expected, got {_kind(item)}"
            )
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_format(record: dict, field_map: dict[str, str], ref: RowRef) -> str:
    if field_map.get("generations", "generations") in record:
        return "openr1"
    if field_map.get("generation", "generation") in record:
        return "reference_jsonl"
    raise DataError(
        ref.file, ref.number, "generations", "missing (neither OpenR1's generations nor generation)"
    )


def _chosen_generation(record: dict, field_map: dict[str, str], ref: RowRef) -> str | None:
    """The first generation math-verify judged correct; else the first the LLM judge did (when the row has
    that judgement); None when no generation was judged correct."""
    generations = _list_of(record, "generations", str, field_map, ref)
    judges = ["correctness_math_verify"]
    if record.get(field_map.get("correctness_llama", "correctness_llama")) is not None:
        judges.append("correctness_llama")  # OpenR1 leaves it null where the LLM judge did not run
    judged = []
    for judge in judges:
        verdicts = _list_of(record, judge, bool, field_map, ref, nullable=True)  # None: no verdict
        if len(verdicts) != len(generations):
            raise DataError(
                ref.file,
                ref.number,
                field_map.get(judge, judge),
                f"{len(verdicts)} verdicts for {len(generations)} generations",
            )
        judged.append(verdicts)
    for verdict_list in judged:
        for generation, correct in zip(generations, verdict_list):
            if correct:
                return generation
    return None


def to_source_row(
    record: dict, ref: RowRef, input_format: str, field_map: dict[str, str]
) -> SourceRow | Drop:
    """Check one raw row and turn it into a SourceRow, or a counted Drop."""
    fmt = detect_format(record, field_map, ref) if input_format == "auto" else input_format
    problem = _string(record, "problem", field_map, ref)
    if not problem.strip():
        raise DataError(ref.file, ref.number, field_map.get("problem", "problem"), "empty")
    answer = _string(record, "answer", field_map, ref)
    if fmt == "openr1":
        source_id = _string(record, "uuid", field_map, ref)
        generation = _chosen_generation(record, field_map, ref)
        if generation is None:
            return Drop(NO_CORRECT_GENERATION, ref)
    elif fmt == "reference_jsonl":
        source_id = str(ref.row)  # the reference's query_id: the line index
        generation = _string(record, "generation", field_map, ref)
    else:
        raise ValueError(f"unknown input format {fmt!r}")
    if not answer:
        return Drop(EMPTY_ANSWER, ref)
    solution = reference_solution(generation)
    if not solution.strip():
        return Drop(EMPTY_SOLUTION, ref)
    if answer not in solution:
        return Drop(ANSWER_NOT_IN_SOLUTION, ref)
    return SourceRow(source_id=source_id, problem=problem, solution=solution, answer=answer, ref=ref)


# ----------------------------------------------------------------------------------- pass rates
def read_pass_rates(path: str | Path) -> dict[str, float]:
    """The difficulty filter's input: JSONL, one {"id": str | int, "pass_rate": float in [0, 1]} per line.

    `id` is the data set's source_id (OpenR1's uuid); `pass_rate` the fraction of samples a model got right.
    Other keys (n_samples, model, ...) are allowed and ignored. A repeated id is an error.
    """
    rates: dict[str, float] = {}
    for ref, record in _jsonl_records(Path(path)):
        source_id = record.get("id")
        if isinstance(source_id, bool) or not isinstance(source_id, str | int):
            raise DataError(
                ref.file, ref.number, "id", f"a string or integer is expected, got {_kind(source_id)}"
            )
        rate = record.get("pass_rate")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise DataError(ref.file, ref.number, "pass_rate", f"a number is expected, got {rate!r}")
        if not 0 <= rate <= 1:
            raise DataError(ref.file, ref.number, "pass_rate", f"{rate} is outside [0, 1]")
        if str(source_id) in rates:
            raise DataError(ref.file, ref.number, "id", f"{source_id!r} appears twice")
        rates[str(source_id)] = float(rate)
    if not rates:
        raise DataError(str(path), None, None, "no rows (the file is empty)", "check data.difficulty.pass_rate_file")
    return rates
