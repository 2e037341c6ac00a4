"""Print the table of bad CLI inputs (tests/cli_bad_inputs.py): what each printed and its exit code (issue 16).

    PYTHONPATH=$PWD python bench/bad_inputs_table.py > /tmp/bad_inputs.md

Runs `questa_nemo.cli.main` in this process (the tests check the same at the process level); temporary files
are shown as <tmp>/name.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cli_bad_inputs import CASES  # noqa: E402

from questa_nemo.cli import main  # noqa: E402


def run(case) -> tuple[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        here = os.getcwd()
        os.chdir(tmp)
        err = io.StringIO()
        try:
            argv = case.make(Path(tmp))
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = int(e.code)
        finally:
            os.chdir(here)
        lines = [x for x in err.getvalue().splitlines() if x.strip() and not x.startswith("eval: ")]
        text = " / ".join(lines).replace(tmp, "<tmp>")
        return text, code


def main_table() -> int:
    print("| bad input | what it printed (stderr) | exit code |")
    print("|---|---|---|")
    bad = 0
    for case in CASES:
        text, code = run(case)
        ok = code == case.code and all(p in text for p in case.expect)
        bad += not ok
        print(f"| {case.name} | `{text.replace('|', '/')}` | {code}{'' if ok else ' (UNEXPECTED)'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_table())
