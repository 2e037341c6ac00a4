"""`questa-nemo data`: OpenR1-shaped rows -> hinted prompt sets, one DatasetDict per hint ratio, and a manifest.

read (readers.py: checks, counted drops) -> difficulty filter (pass-rate file) -> per ratio: cut the hint
(hints.py), handle hints that leak the answer, render the prompt, hold out the test split -> write (outputs.py).
Every input row ends up kept or counted under a drop reason in manifest.json. Imports no torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from questa_nemo.config import ConfigError, DataConfig
from questa_nemo.data import hints
from questa_nemo.data.outputs import (
    OUTPUT_FORMATS,
    HintedRow,
    atomic_folder,
    ratio_name,
    write_manifest,
    write_splits,
)
from questa_nemo.data.readers import (
    NO_PASS_RATE,
    PASS_RATE_OUT_OF_RANGE,
    DataError,
    Drop,
    SourceRow,
    input_files,
    read_pass_rates,
    read_records,
    sha256_file,
    to_source_row,
)
from questa_nemo.errors import where

ANSWER_LEAK = "answer_leak"  # per-ratio drop reason (answer_leak=drop)


@dataclass
class RatioReport:
    """What happened to the source rows at one hint ratio."""

    train: int = 0
    test: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    answer_leaks: int = 0  # hints that contained the final answer as cut (counted whatever answer_leak says)
    recut: int = 0  # of those, hints cut back to before the answer (answer_leak=recut)
    hints_not_shown: int = 0  # hints under min_hint_chars: the prompt carries none (reference rule)


@dataclass
class BuildReport:
    rows_read: int = 0
    source_kept: int = 0
    source_dropped: Counter = field(default_factory=Counter)  # reason -> rows, before any hint is cut
    ratios: dict[str, RatioReport] = field(default_factory=dict)  # "p50" -> report


def check_config(cfg: DataConfig) -> None:
    """Keys of the data section that config.validate leaves to the data stage."""
    if not cfg.inputs:
        raise ConfigError("data.inputs", "no input files given")
    if not cfg.hint_ratios:
        raise ConfigError("data.hint_ratios", "at least one ratio is needed")
    if len({ratio_name(r) for r in cfg.hint_ratios}) != len(cfg.hint_ratios):
        raise ConfigError("data.hint_ratios", f"{cfg.hint_ratios} repeats a ratio")
    for fmt in cfg.output_formats:
        if fmt not in OUTPUT_FORMATS:
            raise ConfigError("data.output_formats", f"{fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    for key in ("min_hint_chars", "hint_slot_chars", "test_size"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"data.{key}", "must be >= 0")
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ConfigError("data.max_rows", "must be >= 1 or null")


def prompt_format(cfg: DataConfig) -> hints.PromptFormat:
    return hints.PromptFormat(
        separator=cfg.prompt_separator,
        hint_prefix=cfg.hint_prefix,
        min_hint_chars=cfg.min_hint_chars,
        hint_slot_chars=cfg.hint_slot_chars,
    )


def token_offsets(tokenizer_dir: str) -> hints.TokenOffsets:
    """Token spans from a Hugging Face tokenizer folder's tokenizer.json (the `tokenizers` library: no torch)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError("data.tokenizer", f"no tokenizer.json at {tokenizer_dir}")
    tokenizer = Tokenizer.from_file(str(path))

    def offsets(text: str) -> list[tuple[int, int]]:
        return list(tokenizer.encode(text, add_special_tokens=False).offsets)

    return offsets


# ----------------------------------------------------------------------------------------- reading
def read_sources(cfg: DataConfig, report: BuildReport) -> list[SourceRow]:
    """Every input row checked: kept SourceRows returned, drops counted in report; malformed rows raise."""
    sources: list[SourceRow] = []
    seen: dict[str, SourceRow] = {}
    for name in cfg.inputs:
        rows_before = report.rows_read
        for ref, record in read_records(Path(name)):
            if cfg.max_rows is not None and report.rows_read >= cfg.max_rows:
                return sources
            report.rows_read += 1
            outcome = to_source_row(record, ref, cfg.input_format, dict(cfg.field_map))
            if isinstance(outcome, Drop):
                report.source_dropped[outcome.reason] += 1
                continue
            first = seen.get(outcome.source_id)
            if first is not None:
                raise DataError(
                    ref.file,
                    ref.number,
                    "id",
                    f"{outcome.source_id!r} repeats {where(first.ref.file, first.ref.number)}",
                    "remove one of the two rows",
                )
            seen[outcome.source_id] = outcome
            sources.append(outcome)
        if report.rows_read == rows_before:
            raise DataError(name, None, None, "no rows (the input is empty)", "check the path in data.inputs")
    return sources


def filter_difficulty(sources: list[SourceRow], cfg: DataConfig, report: BuildReport) -> list[SourceRow]:
    """Keep problems whose pass rate lies in [min_pass_rate, max_pass_rate]; ids without a rate are dropped."""
    spec = cfg.difficulty
    if spec.pass_rate_file is None:
        return sources
    rates = read_pass_rates(spec.pass_rate_file)
    kept = []
    for source in sources:
        rate = rates.get(source.source_id)
        if rate is None:
            report.source_dropped[NO_PASS_RATE] += 1
        elif not spec.min_pass_rate <= rate <= spec.max_pass_rate:
            report.source_dropped[PASS_RATE_OUT_OF_RANGE] += 1
        else:
            kept.append(source)
    return kept


# ----------------------------------------------------------------------------------------- hinting
def hinted_row(
    source: SourceRow,
    ratio: float,
    cfg: DataConfig,
    report: RatioReport,
    offsets: hints.TokenOffsets | None = None,
) -> HintedRow | None:
    """The prompt row of one problem at one ratio; None when answer_leak=drop removes it (counted)."""
    solution = source.solution
    end = hints.hint_end(solution, ratio, cfg.cut_mode, offsets)
    shown_at_all = end >= cfg.min_hint_chars  # a hint too short to show leaks nothing
    leak_at = hints.first_answer_in(solution, source.answer, end) if shown_at_all else -1
    if leak_at >= 0:
        report.answer_leaks += 1
        if cfg.answer_leak == "drop":
            report.dropped[ANSWER_LEAK] += 1
            return None
        if cfg.answer_leak == "recut":
            end = hints.recut_before(solution, leak_at, cfg.cut_mode, offsets)
            report.recut += 1
    try:
        prompt, shown = hints.render_prompt(source.problem, solution[:end], prompt_format(cfg))
    except ValueError as e:
        raise DataError(source.ref.file, source.ref.number, "solution", str(e)) from None
    if len(shown) < end:
        report.hints_not_shown += 1
    return HintedRow(
        id=f"{source.source_id}@{ratio_name(ratio)}" if cfg.id_with_ratio else source.source_id,
        source_id=source.source_id,
        messages=[{"role": "user", "content": prompt}],
        prompt=prompt,
        answer="\\boxed{" + source.answer + "}",
        answer_text=source.answer,
        hint_ratio=float(ratio),
        hint=shown,
    )


def split_train_test(rows: list[HintedRow], test_size: int, seed: int) -> dict[str, list[HintedRow]]:
    """Hold out the test_size rows whose seeded hash of source_id is smallest: the same problems at every ratio,
    whatever the input order. Both splits keep the input order."""

    def rank(row: HintedRow) -> str:
        return hashlib.sha256(f"{seed}:{row.source_id}".encode()).hexdigest()

    held_out = {row.id for row in sorted(rows, key=rank)[:test_size]}
    return {
        "train": [row for row in rows if row.id not in held_out],
        "test": [row for row in rows if row.id in held_out],
    }


# ----------------------------------------------------------------------------------------- build
def build(cfg: DataConfig) -> BuildReport:
    """Read cfg.inputs, write one DatasetDict per ratio and manifest.json under cfg.output_dir (atomically)."""
    check_config(cfg)
    offsets = token_offsets(cfg.tokenizer) if cfg.cut_mode == "token" else None
    report = BuildReport()
    sources = filter_difficulty(read_sources(cfg, report), cfg, report)
    report.source_kept = len(sources)
    if not sources:
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(report.source_dropped.items()))
        raise DataError(
            ", ".join(cfg.inputs),
            None,
            None,
            f"none of the {report.rows_read} rows read can become a prompt (dropped: {dropped or 'none'})",
            "see the drop reasons in the data README, or give other inputs",
        )
    with atomic_folder(Path(cfg.output_dir)) as folder:
        for ratio in cfg.hint_ratios:
            ratio_report = RatioReport()
            rows = [hinted_row(source, ratio, cfg, ratio_report, offsets) for source in sources]
            splits = split_train_test([row for row in rows if row is not None], cfg.test_size, cfg.seed)
            ratio_report.train, ratio_report.test = len(splits["train"]), len(splits["test"])
            report.ratios[ratio_name(ratio)] = ratio_report
            write_splits(folder / ratio_name(ratio), splits, cfg.output_formats)
        write_manifest(folder, manifest(cfg, report))
    return report


def manifest(cfg: DataConfig, report: BuildReport) -> dict:
    inputs = []
    for name in cfg.inputs:
        path = Path(name)
        for file in input_files(path):
            inputs.append({"input": name, "file": str(file), "sha256": sha256_file(file)})
    return {
        "inputs": inputs,
        "config": asdict(cfg),
        "rows_read": report.rows_read,
        "source_kept": report.source_kept,
        "source_dropped": dict(sorted(report.source_dropped.items())),
        "ratios": {
            name: {**asdict(r), "dropped": dict(sorted(r.dropped.items()))}
            for name, r in report.ratios.items()
        },
    }


def summary(cfg: DataConfig, report: BuildReport) -> str:
    lines = [f"read {report.rows_read} rows; kept {report.source_kept} problems"]
    for reason, count in sorted(report.source_dropped.items()):
        lines.append(f"  dropped {count:>7}  {reason}")
    for name, r in report.ratios.items():
        lines.append(
            f"{name}: train {r.train}, test {r.test}, answer in hint {r.answer_leaks}, recut {r.recut}, "
            f"hint not shown {r.hints_not_shown}, dropped {dict(r.dropped) or 0}"
        )
    lines.append(f"wrote {Path(cfg.output_dir).resolve()}")
    return "\n".join(lines)


def main(config_name: str = "data_openr1", overrides: list[str] | None = None, positional=None) -> int:
    """`questa-nemo data [build] [INPUT ...] [key=value ...]`: positional inputs replace data.inputs."""
    import datasets

    from questa_nemo.config import load_config

    datasets.disable_progress_bars()  # the summary below says what was written
    args = list(positional or [])
    if args[:1] == ["build"]:
        args = args[1:]
    cfg = load_config(config_name, overrides).data
    if args:
        cfg = replace(cfg, inputs=args)
    report = build(cfg)  # DataError and FileExistsError: one line and exit code 2 (cli.py)
    print(summary(cfg, report))
    return 0
