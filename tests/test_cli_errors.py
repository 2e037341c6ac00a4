"""Every CLI error is one line on stderr naming the file, the row and what to do, with exit code 2 (usage,
config, unusable input) or 1 (runtime); a traceback only with --debug (issue 16). Cases: cli_bad_inputs.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_bad_inputs import CASES, REPO

from questa_nemo.cli import main


def _is_library_warning(line: str) -> bool:
    """Python warnings that libraries print on import (megatron's "Apex is not installed" ...): another part of
    issue 16 filters those; they are not our error line."""
    return "Warning: " in line or line.strip() in ("warnings.warn(", "return module(") or line.startswith(" ")


def _lines(text: str) -> list[str]:
    """The error lines: not eval's progress lines ("eval: ...") nor library warnings."""
    return [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("eval: ") and not _is_library_warning(line)
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs land here
    argv = case.make(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    lines = _lines(err)  # "eval: ..." progress lines on stderr are not errors
    assert code == case.code, err
    assert len(lines) == 1, err
    for part in case.expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert "Traceback" not in err


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "questa_nemo.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_process_exit_codes_and_debug_traceback(tmp_path):
    """The same at the process level; --debug (or QUESTA_DEBUG=1) shows the traceback."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ("data", str(empty), f"data.output_dir={tmp_path / 'out'}")
    done = _cli(*args)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("questa-nemo data: input error: ") and "empty.jsonl: no rows" in done.stderr
    debug = _cli("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert "Traceback" in _cli(*args, env={"QUESTA_DEBUG": "1"}).stderr
    usage = _cli()
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "usage error" in usage.stderr


def test_a_runtime_failure_is_one_line_with_exit_code_1(monkeypatch, capsys):
    """Anything not an input or config error (a dying worker, a full disk, a bug) exits 1 in one line."""
    import questa_nemo.doctor

    def broken(**kwargs):
        raise OSError("No space left on device\nsecond line of detail")

    monkeypatch.setattr(questa_nemo.doctor, "main", broken)
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("questa-nemo doctor: error: OSError: No space left on device (traceback in ")
    saved = err.split("traceback in ")[1].rstrip(")")
    with open(saved) as f:
        assert "Traceback" in f.read()  # kept, so a long run need not be rerun to see it
    os.unlink(saved)
    with pytest.raises(OSError):
        main(["doctor", "--debug"])


def test_data_rows_and_eval_rows_share_one_numbering(tmp_path, capsys):
    """The same broken line 3 is 'line 3' for both commands (data used to say row 2, eval row 3)."""
    import json

    from cli_bad_inputs import GOOD_ROW, _data, _eval, _write

    text = json.dumps(GOOD_ROW) + "\n" + json.dumps({**GOOD_ROW, "uuid": "u2"}) + "\n{oops\n"
    path = _write(tmp_path / "three.jsonl", text)
    assert main(_data(tmp_path, path)) == 2
    assert main(_eval(tmp_path, path)) == 2
    data_err, eval_err = _lines(capsys.readouterr().err)
    assert (
        "three.jsonl line 3: not valid JSON" in data_err and "three.jsonl line 3: not valid JSON" in eval_err
    )
