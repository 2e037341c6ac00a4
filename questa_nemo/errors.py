"""Error kinds the CLI maps to exit codes (cli.py): a user's input file that cannot be used is an InputError.

config.ConfigError (a wrong key or value) and InputError exit with 2 after one line that names the file, the
row (1-based: the line number for JSONL, the row for parquet and datasets folders) and what to do; anything
else is a runtime failure, exit 1. Nothing here imports anything, so every layer may raise these.
"""

from __future__ import annotations

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def where(file: str, row: int | None, unit: str | None = None) -> str:
    """'<file> line <n>' for JSONL files (the line an editor shows), '<file> row <n>' otherwise; n from 1."""
    if row is None:
        return file
    unit = unit or ("line" if file.endswith(JSONL_SUFFIXES) else "row")
    return f"{file} {unit} {row}"


def one_line(text: object) -> str:
    """A message on one line: its lines joined with ' | ', blank ones dropped."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


class InputError(ValueError):
    """An input file is missing, empty, malformed or of an unknown format; exit code 2."""
