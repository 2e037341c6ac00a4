"""Writing a built data set: one DatasetDict (train/test) per hint ratio, optional JSONL / parquet copies, and the
manifest, all into a temporary folder that replaces the output folder only once everything is written."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from questa_nemo.atomic import atomic_dir

OUTPUT_FORMATS = ("hf_disk", "jsonl", "parquet")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class HintedRow:
    """One prompt of a built data set (the columns of every split)."""

    id: str  # unique: "<source_id>@p<ratio>"
    source_id: str  # the problem's id in the input (OpenR1 uuid; the line index for the reference's JSONL)
    messages: list[dict[str, str]]  # [{"role": "user", "content": prompt}]: ready for a chat template
    prompt: str  # problem + separator (+ hint prefix + hint)
    answer: str  # "\\boxed{" + answer_text + "}" (the reference's `solutions[0]`)
    answer_text: str  # the raw final answer
    hint_ratio: float  # p of "the first p% of the solution"
    hint: str  # the hint shown in the prompt ("" when none)


def _features():
    from datasets import Features, Value

    text = Value("string")
    return Features(
        {
            "id": text,
            "source_id": text,
            "messages": [{"role": text, "content": text}],
            "prompt": text,
            "answer": text,
            "answer_text": text,
            "hint_ratio": Value("float64"),
            "hint": text,
        }
    )


def ratio_name(ratio: float) -> str:
    """Folder name of a ratio: 50.0 -> "p50", 12.5 -> "p12.5"."""
    return f"p{ratio:g}"


def write_splits(folder: Path, splits: dict[str, list[HintedRow]], formats: list[str]) -> None:
    """save_to_disk a DatasetDict of `splits` under folder/ (hf_disk), plus folder/<split>.jsonl / .parquet.
    JSONL alone needs no `datasets` (GPU images may lack it).

    Each split's fingerprint is the sha256 of its rows, given to `datasets` rather than computed by it: its own
    fingerprint pickles the whole Arrow table with dill, which fails on some images (Python 3.12.3 with
    datasets 5.2 / pyarrow 26 on our H100 image: "Can't pickle <class 'MonthDayNano'>"), and ours is the same
    for the same rows on every machine.
    """
    rows_json = {split: [json.dumps(asdict(row), ensure_ascii=False) for row in rows] for split, rows in splits.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if "hf_disk" in formats or "parquet" in formats:
        from datasets import Dataset, DatasetDict, DatasetInfo
        from datasets.table import InMemoryTable

        features = _features()

        def dataset(split: str, rows: list[HintedRow]) -> Dataset:
            columns = features.encode_batch({name: [getattr(row, name) for row in rows] for name in features})
            table = InMemoryTable.from_pydict(columns, schema=features.arrow_schema)
            digest = hashlib.sha256("\n".join(rows_json[split]).encode()).hexdigest()[:16]
            return Dataset(table, info=DatasetInfo(features=features), split=split, fingerprint=digest)

        data = DatasetDict({split: dataset(split, rows) for split, rows in splits.items()})
    if "hf_disk" in formats:
        # One shard per split: an empty split saved with zero shards cannot be loaded back.
        data.save_to_disk(str(folder), num_shards={split: 1 for split in splits})
    for split in splits:
        if "jsonl" in formats:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in rows_json[split])
        if "parquet" in formats:
            data[split].to_parquet(str(folder / f"{split}.parquet"))


def write_manifest(folder: Path, manifest: dict) -> None:
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it takes `final`'s place (an older build there is
    removed after the swap), on failure it is deleted and `final` is untouched. A non-empty `final` that holds no
    manifest is not ours and is never replaced."""
    final = final.resolve()
    if final.exists() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise FileExistsError(f"data.output_dir: {final} exists, is not empty and holds no {MANIFEST}")
    with atomic_dir(final, overwrite=True) as tmp:
        yield tmp
