"""Writing a built data set: one DatasetDict (train/test) per hint ratio, optional JSONL / parquet copies, and the
manifest, all into a temporary folder that replaces the output folder only once everything is written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

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
    JSONL alone needs no `datasets` (GPU images lack it)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = None
    if {"hf_disk", "parquet"} & set(formats):
        from datasets import Dataset, DatasetDict

        features = _features()
        columns = {
            split: {name: [getattr(row, name) for row in rows] for name in features}
            for split, rows in splits.items()
        }
        dataset = DatasetDict(
            {split: Dataset.from_dict(cols, features=features) for split, cols in columns.items()}
        )
    if "hf_disk" in formats:
        # One shard per split: an empty split saved with zero shards cannot be loaded back.
        dataset.save_to_disk(str(folder), num_shards={split: 1 for split in splits})
    for split, rows in splits.items():
        if "jsonl" in formats:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
        if "parquet" in formats:
            dataset[split].to_parquet(str(folder / f"{split}.parquet"))


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
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
