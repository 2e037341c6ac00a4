"""Bad inputs for every CLI command, with the one line and exit code each must give (issue 16).

Shared by tests/test_cli_errors.py (which asserts them) and bench/bad_inputs_table.py (which prints the table
of what each printed). `make(tmp)` writes the input files and returns the argv after `questa-nemo`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "data" / "world"  # the small world's tokenizer and 256-position model config
GOOD_ROW = {
    "uuid": "u1",
    "problem": "What is 1+1?",
    "answer": "2",
    "generations": ["<think>easy</think>It is \\boxed{2}."],
    "correctness_math_verify": [True],
}


@dataclass(frozen=True)
class Case:
    name: str  # what is wrong, as the table says it
    make: Callable[[Path], list[str]]
    expect: tuple[str, ...]  # substrings of the one line on stderr
    code: int  # exit code


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _jsonl(path: Path, rows: list) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _data(tmp: Path, *args: str) -> list[str]:
    return ["data", *args, f"data.output_dir={tmp / 'out'}", "data.hint_ratios=[50]"]


def _eval(tmp: Path, bench: str, *extra: str) -> list[str]:
    return [
        "eval",
        f"model.tokenizer={WORLD / 'tokenizer'}",
        f"model.hf_config={WORLD / 'config.json'}",
        "reward.kind=world",
        "eval.checkpoints=[/absent/checkpoint]",
        "eval.n_samples=2",
        "eval.ks=[1]",
        "eval.max_new_tokens=32",
        f"eval.output_dir={tmp / 'eval'}",
        f"eval.benchmarks=[{{name:b,path:'{bench}'}}]",
        *extra,
    ]


ROWS = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "What is 4 + 4?", "answer": "8"}]

CASES: list[Case] = [
    # usage
    Case("no command", lambda t: [], ("questa-nemo: usage error:", "--help"), 2),
    Case("unknown command", lambda t: ["frobnicate"], ("usage error: argument command", "frobnicate"), 2),
    Case(
        "unknown option", lambda t: ["eval", "--bogus"], ("usage error: unrecognized arguments: --bogus",), 2
    ),
    # config
    Case(
        "unknown config key",
        lambda t: ["train", "train.bogus=1"],
        ("config error: train.bogus", "check the spelling"),
        2,
    ),
    Case(
        "bad config value",
        lambda t: ["world", "world.modulus=1"],
        ("config error: world.modulus: must be >= 2",),
        2,
    ),
    Case(
        "positional argument to train",
        lambda t: ["train", "extra"],
        ("config error: train: takes no positional",),
        2,
    ),
    Case(
        "unknown config file",
        lambda t: ["train", "-c", "nope"],
        ("config error: nope", "config names are the files under conf/"),
        2,
    ),
    # data
    Case(
        "data: no such input",
        lambda t: _data(t, str(t / "absent.jsonl")),
        ("absent.jsonl: no such file or folder; check the path in data.inputs",),
        2,
    ),
    Case(
        "data: empty JSONL",
        lambda t: _data(t, _write(t / "empty.jsonl", "")),
        ("empty.jsonl: no rows (the input is empty)",),
        2,
    ),
    Case(
        "data: blank-lines-only JSONL",
        lambda t: _data(t, _write(t / "blank.jsonl", "\n\n")),
        ("blank.jsonl: no rows",),
        2,
    ),
    Case(
        "data: malformed line 2",
        lambda t: _data(t, _write(t / "bad.jsonl", json.dumps(GOOD_ROW) + "\n{oops\n")),
        ("bad.jsonl line 2: not valid JSON", "fix the line"),
        2,
    ),
    Case(
        "data: missing field on line 1",
        lambda t: _data(
            t, _jsonl(t / "nofield.jsonl", [{k: v for k, v in GOOD_ROW.items() if k != "answer"}])
        ),
        (
            "nofield.jsonl line 1: field 'answer': missing; add it, or name the field holding it with data.field_map.answer=<field>",
        ),
        2,
    ),
    Case(
        "data: wrong type on line 2",
        lambda t: _data(t, _jsonl(t / "type.jsonl", [GOOD_ROW, {**GOOD_ROW, "uuid": "u2", "answer": 2}])),
        ("type.jsonl line 2: field 'answer': a string is expected, got int; fix or remove that row",),
        2,
    ),
    Case(
        "data: repeated id",
        lambda t: _data(t, _jsonl(t / "twice.jsonl", [GOOD_ROW, GOOD_ROW])),
        ("twice.jsonl line 2: field 'id': 'u1' repeats", "twice.jsonl line 1; remove one"),
        2,
    ),
    Case(
        "data: empty problem in parquet row 2",
        lambda t: _data(t, _parquet(t / "rows.parquet", [GOOD_ROW, {**GOOD_ROW, "uuid": "u2", "problem": " "}])),
        ("rows.parquet row 2: field 'problem': empty; fix or remove that row",),
        2,
    ),
    Case(
        "data: .csv input",
        lambda t: _data(t, _write(t / "rows.csv", "problem,answer\n1+1,2\n")),
        ("rows.csv: unknown format; give a .parquet, .jsonl or a datasets save_to_disk folder",),
        2,
    ),
    Case(
        "data: broken parquet",
        lambda t: _data(t, _write(t / "bad.parquet", "PAR1 not really")),
        ("bad.parquet: not a readable parquet file", "re-copy"),
        2,
    ),
    Case(
        "data: every row dropped",
        lambda t: _data(t, _jsonl(t / "wrong.jsonl", [{**GOOD_ROW, "correctness_math_verify": [False]}])),
        ("none of the 1 rows read can become a prompt (dropped: no_correct_generation 1)",),
        2,
    ),
    Case(
        "data: no inputs",
        lambda t: ["data", "data.inputs=[]"],
        ("config error: data.inputs: no input files given",),
        2,
    ),
    # eval
    Case(
        "eval: no such benchmark",
        lambda t: _eval(t, str(t / "absent.jsonl")),
        ("absent.jsonl: no such file or folder; check eval.benchmarks[i].path",),
        2,
    ),
    Case(
        "eval: empty benchmark",
        lambda t: _eval(t, _write(t / "empty.jsonl", "")),
        ("empty.jsonl: no rows (the file is empty)",),
        2,
    ),
    Case(
        "eval: malformed line 2",
        lambda t: _eval(t, _write(t / "bad.jsonl", json.dumps(ROWS[0]) + "\n{oops\n")),
        ("bad.jsonl line 2: not valid JSON", "fix or remove the line"),
        2,
    ),
    Case(
        "eval: missing field on line 2",
        lambda t: _eval(t, _jsonl(t / "nofield.jsonl", [ROWS[0], {"problem": "x"}])),
        ("nofield.jsonl line 2: no field 'answer' (answer)", "set eval.benchmarks[i].problem_field"),
        2,
    ),
    Case(
        "eval: empty answer in parquet row 2",
        lambda t: _eval(t, _parquet(t / "b.parquet", [ROWS[0], {"problem": "x", "answer": None}])),
        ("b.parquet row 2: field 'answer' (answer) is empty",),
        2,
    ),
    Case(
        "eval: empty answer on line 1",
        lambda t: _eval(t, _jsonl(t / "blank.jsonl", [{"problem": "x", "answer": " "}])),
        ("blank.jsonl line 1: field 'answer' (answer) is empty",),
        2,
    ),
    Case(
        "eval: not a JSON object",
        lambda t: _eval(t, _write(t / "list.jsonl", "[1, 2]\n")),
        ("list.jsonl line 1: expected a JSON object, got list; fix or remove the row",),
        2,
    ),
    Case(
        "eval: .csv benchmark",
        lambda t: _eval(t, _write(t / "bench.csv", "problem,answer\n1+1,2\n")),
        ("bench.csv: unknown format '.csv'",),
        2,
    ),
    Case(
        "eval: .txt benchmark",
        lambda t: _eval(t, _write(t / "bench.txt", json.dumps(ROWS[0]) + "\n")),
        ("bench.txt: unknown format '.txt'",),
        2,
    ),
    Case(
        "eval: .json that is not a list",
        lambda t: _eval(t, _write(t / "obj.json", json.dumps(ROWS[0]))),
        ("obj.json: a .json benchmark must hold a list of rows",),
        2,
    ),
    Case(
        "eval: prompt + max_new_tokens over the context",
        lambda t: _eval(
            t,
            _jsonl(
                t / "long.jsonl",
                [ROWS[0], {"problem": "What is " + " + ".join(["1"] * 60) + "?", "answer": "60"}],
            ),
            "eval.max_new_tokens=200",
        ),
        (
            "1 of 2 prompts of",
            "do not fit the model's context: prompt + eval.max_new_tokens 200 > 256 positions (first: id '2',",
            "set eval.overlong_prompts=truncate",
        ),
        2,
    ),
    Case(
        "eval: max_new_tokens >= context",
        lambda t: _eval(t, _jsonl(t / "ok.jsonl", ROWS), "eval.max_new_tokens=300"),
        ("config error: eval.max_new_tokens: 300 new tokens leave no room", "256 positions"),
        2,
    ),
    Case(
        "eval: bad overlong_prompts",
        lambda t: _eval(t, _jsonl(t / "ok.jsonl", ROWS), "eval.overlong_prompts=cut"),
        ("config error: eval.overlong_prompts: 'cut' is not one of error, truncate",),
        2,
    ),
    Case(
        "eval: no checkpoint",
        lambda t: ["eval", f"eval.benchmarks=[{{path:'{_jsonl(t / 'ok.jsonl', ROWS)}'}}]"],
        ("config error: eval.checkpoints: no checkpoint given", "set eval.checkpoints="),
        2,
    ),
    Case(
        "eval: no tokenizer folder",
        lambda t: [*_eval(t, _jsonl(t / "ok.jsonl", ROWS)), f"model.tokenizer={t / 'notok'}"],
        ("config error: model.tokenizer:", "notok: no such file or folder"),
        2,
    ),
    Case(
        "eval: results from other settings",
        lambda t: _stale(t),
        (
            "input error:",
            "earlier results were made with other settings (",
            "temperature",
            "use another eval.output_dir",
        ),
        2,
    ),
    # export / import
    Case(
        "export: no such source",
        lambda t: ["export", str(t / "absent"), str(t / "out")],
        ("absent: no such file or folder",),
        2,
    ),
    Case(
        "import: not a model",
        lambda t: ["import", _write(t / "x.nemo", "not a tar"), str(t / "out")],
        ("x.nemo",),
        2,
    ),
    Case("export: missing OUT", lambda t: ["export", str(t)], ("usage: questa-nemo export SRC OUT",), 2),
]


def _stale(tmp: Path) -> list[str]:
    """Results of an earlier run at another temperature sit in eval.output_dir."""
    argv = _eval(tmp, _jsonl(tmp / "ok.jsonl", ROWS))
    meta = tmp / "eval" / "checkpoint" / "b.meta.json"  # label: the checkpoint folder name
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"temperature": 1.5}))
    return argv
