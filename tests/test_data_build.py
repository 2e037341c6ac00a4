"""The data build: reference parity, every drop reason, every input kind, the difficulty filter, outputs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from questa_nemo.config import ConfigError, DataConfig, load_config
from questa_nemo.data import hints
from questa_nemo.data.build import build
from questa_nemo.data.readers import DataError, read_pass_rates

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "openr1_sample.jsonl"
COLUMNS = ["id", "source_id", "messages", "prompt", "answer", "answer_text", "hint_ratio", "hint"]

datasets.disable_progress_bars()


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load_split(folder: Path, split: str = "train") -> list[dict]:
    return datasets.load_from_disk(str(folder))[split].to_list()


def config(tmp_path: Path, inputs: list[Path], **kw) -> DataConfig:
    kw.setdefault("output_dir", str(tmp_path / "out"))
    return DataConfig(inputs=[str(p) for p in inputs], **kw)


# ------------------------------------------------------------------------------------------- parity
def reference_jsonl(tmp_path: Path) -> Path:
    """The reference's intermediate file from our sample: problem, one chosen generation, answer; a blank line in
    the middle (the reference's line index still counts it). The empty-answer row is left out: the reference
    would emit "\\boxed{}" where we drop it."""
    lines = []
    for row in sample_rows():
        if not row["answer"]:
            continue
        judged = [row["correctness_math_verify"], row["correctness_llama"] or []]
        chosen = next((g for verdicts in judged for g, ok in zip(row["generations"], verdicts) if ok), None)
        if chosen is not None:
            lines.append(
                json.dumps({"problem": row["problem"], "generation": chosen, "answer": row["answer"]})
            )
    # Edge rows: hints of exactly 10 and 9 characters at 50% and 25%, a quoted generation, an answer at the end.
    for length in (19, 20, 21, 39, 40, 41):
        solution = ("abcdefghij" * 5)[: length - 1] + "7"
        lines.append(
            json.dumps(
                {"problem": f"Edge {length}?", "generation": f'"<think>t</think>{solution}"', "answer": "7"}
            )
        )
    lines.insert(5, "")
    path = tmp_path / "reference.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reference_steps(path: Path, ratio: float) -> list[str]:
    """The reference's add_prefix + process steps, restated on their own: one JSON line per output row."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = d["generation"]
            if text[0] == '"':
                text = text[1:]
                text = text[:-1]
            solution = text.split("</think>")[-1]
            prefix = solution[: int(len(solution) * ratio)]
            if len(prefix) < 10:
                prompt = d["problem"] + "\n\n"
            else:
                prompt = d["problem"] + "\n\n" + "## Hint." + prefix
            if d["answer"] not in solution:
                continue
            row = {"query_id": f"{i}", "prompt": prompt, "solutions": ["\\boxed{" + d["answer"] + "}"]}
            out.append(json.dumps(row, ensure_ascii=False))
    return out


@pytest.mark.parametrize("ratio, fraction", [(50, 0.5), (25, 0.25)])
def test_char_mode_equals_the_reference_byte_for_byte(tmp_path, ratio, fraction):
    ref = reference_jsonl(tmp_path)
    expected = reference_steps(ref, fraction)
    assert len(expected) >= 20

    build(config(tmp_path, [ref], hint_ratios=[ratio], input_format="reference_jsonl"))
    ours = [
        json.dumps(
            {"query_id": r["source_id"], "prompt": r["prompt"], "solutions": [r["answer"]]},
            ensure_ascii=False,
        )
        for r in load_split(tmp_path / "out" / f"p{ratio}")
    ]
    assert [s.encode() for s in ours] == [s.encode() for s in expected]

    # The OpenR1 rows themselves give the same prompts and answers (ids are uuids there; no edge rows).
    build(config(tmp_path, [SAMPLE], hint_ratios=[ratio], output_dir=str(tmp_path / "openr1")))
    from_openr1 = load_split(tmp_path / "openr1" / f"p{ratio}")
    from_reference = [json.loads(s) for s in expected if not json.loads(s)["prompt"].startswith("Edge")]
    assert [(r["prompt"], r["answer"]) for r in from_openr1] == [
        (r["prompt"], r["solutions"][0]) for r in from_reference
    ]


# ------------------------------------------------------------------------------------------- sample
def test_sample_build_counts_every_drop_reason_and_writes_every_format(tmp_path):
    cfg = config(tmp_path, [SAMPLE], output_formats=["hf_disk", "jsonl", "parquet"], test_size=3)
    report = build(cfg)
    assert report.rows_read == 32
    assert dict(report.source_dropped) == {
        "no_correct_generation": 1,
        "answer_not_in_solution": 1,
        "empty_solution": 1,
        "empty_answer": 1,
    }
    assert report.source_kept == 28
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] == __import__("hashlib").sha256(SAMPLE.read_bytes()).hexdigest()
    assert manifest["config"]["hint_ratios"] == [50.0, 25.0]
    held_out = None
    for name in ("p50", "p25"):
        r = manifest["ratios"][name]
        assert r["train"] + r["test"] + sum(r["dropped"].values()) == manifest["source_kept"]
        assert r["hints_not_shown"] >= 1  # the "$\boxed{2}$" solution
        dd = datasets.load_from_disk(str(out / name))
        assert list(dd["train"].features) == COLUMNS
        assert (dd["train"].num_rows, dd["test"].num_rows) == (25, 3)
        test_ids = {row["source_id"] for row in dd["test"]}
        held_out = held_out or test_ids
        assert test_ids == held_out  # the same problems held out at every ratio
        jsonl = [json.loads(x) for x in (out / name / "train.jsonl").read_text().splitlines()]
        assert jsonl == dd["train"].to_list()
        assert datasets.Dataset.from_parquet(str(out / name / "train.parquet")).to_list() == jsonl
        for row in jsonl:
            assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
            assert row["answer"] == "\\boxed{" + row["answer_text"] + "}"
            assert row["id"] == f"{row['source_id']}@{name}"
            assert row["hint_ratio"] == float(name[1:])


def test_the_generation_is_chosen_by_the_verdicts(tmp_path):
    build(config(tmp_path, [SAMPLE], hint_ratios=[100]))
    by_problem = {r["prompt"].split("\n\n")[0]: r["hint"] for r in load_split(tmp_path / "out" / "p100")}
    # The second generation, the first judged right.
    assert "385" in by_problem["Compute $\\displaystyle \\sum_{k=1}^{10} k^2$."]
    assert "8\\sqrt{2}" in by_problem["Simplify $\\sqrt{50} + \\sqrt{18}$."]  # the LLM judge's verdict


@pytest.mark.parametrize("mode", ["sentence", "step", "token"])
def test_boundary_modes_build_safe_prefix_hints(tmp_path, mode):
    from questa_nemo.data.world_assets import asset_dir

    tokenizer = str(asset_dir() / "tokenizer") if mode == "token" else None
    build(config(tmp_path, [SAMPLE], cut_mode=mode, tokenizer=tokenizer, min_hint_chars=0))
    for name in ("p50", "p25"):
        rows = load_split(tmp_path / "out" / name)
        assert len(rows) == 28
        shown = 0
        for row in rows:
            solution = hints.reference_solution(_chosen(row["source_id"]))
            assert solution.startswith(row["hint"])
            assert not hints.blocked_positions(solution)[len(row["hint"])]
            shown += bool(row["hint"])
        assert shown > 10 or name == "p25"  # 25% of a 3-paragraph solution is no whole step


def _chosen(uuid: str) -> str:
    row = next(r for r in sample_rows() if r["uuid"] == uuid)
    judged = [row["correctness_math_verify"], row["correctness_llama"] or []]
    return next(g for verdicts in judged for g, ok in zip(row["generations"], verdicts) if ok)


@pytest.mark.parametrize("policy", ["keep", "drop", "recut"])
def test_answer_leaks_are_counted_and_handled(tmp_path, policy):
    report = build(config(tmp_path, [SAMPLE], answer_leak=policy, hint_ratios=[50]))
    r = report.ratios["p50"]
    assert r.answer_leaks >= 3  # e.g. "The answer is $42$." opens a solution
    rows = load_split(tmp_path / "out" / "p50")
    answers = {row["source_id"]: row["answer_text"] for row in rows}
    leaking = [
        row for row in rows if hints.first_answer_in(row["hint"], answers[row["source_id"]], 10**9) >= 0
    ]
    if policy == "keep":
        assert len(leaking) == r.answer_leaks and r.recut == 0
    elif policy == "drop":
        assert r.dropped["answer_leak"] == r.answer_leaks and not leaking
        assert len(rows) == 28 - r.answer_leaks
    else:
        assert r.recut == r.answer_leaks and not leaking and len(rows) == 28


# ------------------------------------------------------------------------------------------- inputs
def test_parquet_and_save_to_disk_inputs_build_the_same_rows(tmp_path):
    build(config(tmp_path, [SAMPLE]))
    expected = load_split(tmp_path / "out" / "p50")
    table = datasets.Dataset.from_list(sample_rows())
    table.to_parquet(str(tmp_path / "sample.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "folder").mkdir()
    table.to_parquet(str(tmp_path / "folder" / "train-00000-of-00001.parquet"))
    for source in ("sample.parquet", "disk", "folder"):
        build(config(tmp_path, [tmp_path / source], output_dir=str(tmp_path / source) + ".out"))
        assert load_split(Path(str(tmp_path / source) + ".out") / "p50") == expected


def test_difficulty_filter_keeps_the_pass_rate_range(tmp_path):
    uuids = [r["uuid"] for r in sample_rows()]
    rates = [{"id": u, "pass_rate": i / 40} for i, u in enumerate(uuids[:-8])]  # the last 8 have no rate
    path = write_jsonl(tmp_path / "rates.jsonl", rates)
    cfg = config(tmp_path, [SAMPLE])
    cfg = replace(
        cfg,
        difficulty=replace(cfg.difficulty, pass_rate_file=str(path), min_pass_rate=0.1, max_pass_rate=0.5),
    )
    report = build(cfg)
    kept = {row["source_id"] for row in load_split(tmp_path / "out" / "p50")}
    assert kept and all(0.1 <= dict(zip(uuids, [i / 40 for i in range(len(uuids))]))[u] <= 0.5 for u in kept)
    assert report.source_dropped["no_pass_rate"] >= 1
    assert report.source_dropped["pass_rate_out_of_range"] >= 1
    assert report.rows_read == report.source_kept + sum(report.source_dropped.values())


@pytest.mark.parametrize(
    "line, field",
    [
        ({"id": "a", "pass_rate": 1.5}, "pass_rate"),
        ({"id": "a", "pass_rate": "high"}, "pass_rate"),
        ({"id": None, "pass_rate": 0.5}, "id"),
        ({"id": "x", "pass_rate": 0.5}, "id"),  # a repeat of the first line
    ],
)
def test_pass_rate_file_errors_name_the_row_and_field(tmp_path, line, field):
    path = write_jsonl(tmp_path / "rates.jsonl", [{"id": "x", "pass_rate": 0.25}, line])
    with pytest.raises(DataError) as e:
        read_pass_rates(path)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 2, field)  # line 2


# ------------------------------------------------------------------------------------------- errors
GOOD = {
    "uuid": "u1",
    "problem": "What is 1+1?",
    "answer": "2",
    "generations": ["<think>easy</think>It is \\boxed{2}."],
    "correctness_math_verify": [True],
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"problem": None}, "problem"),
        ({"problem": "  "}, "problem"),
        ({"answer": 2}, "answer"),
        ({"uuid": 7}, "uuid"),
        ({"generations": "text"}, "generations"),
        ({"generations": [3]}, "generations[0]"),
        ({"correctness_math_verify": [True, False]}, "correctness_math_verify"),
        ({"correctness_math_verify": ["yes"]}, "correctness_math_verify[0]"),
        ({"correctness_llama": [True, True]}, "correctness_llama"),
        ({"correctness_llama": "yes"}, "correctness_llama"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, change, field):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, {**GOOD, "uuid": "u2", **change}])
    with pytest.raises(DataError) as e:
        build(config(tmp_path, [path]))
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 2, field)
    assert f"{path} line 2: field {field!r}" in str(e.value)  # 1-based line numbers, as an editor shows
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_null_verdict_is_no_verdict(tmp_path):
    row = {
        **GOOD,
        "generations": ["It is \\boxed{2}, first.", "It is \\boxed{2}, second."],
        "correctness_math_verify": [None, False],
        "correctness_llama": [None, True],
    }
    build(config(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [row])], hint_ratios=[100]))
    assert load_split(tmp_path / "out" / "p100")[0]["hint"] == "It is \\boxed{2}, second."


def test_missing_fields_malformed_files_and_repeated_ids_are_errors(tmp_path):
    missing = write_jsonl(tmp_path / "missing.jsonl", [{k: v for k, v in GOOD.items() if k != "answer"}])
    with pytest.raises(DataError, match="line 1: field 'answer': missing; add it"):
        build(config(tmp_path, [missing]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        build(config(tmp_path, [broken]))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet"):
        build(config(tmp_path, [tmp_path / "bad.parquet"]))
    twice = write_jsonl(tmp_path / "twice.jsonl", [GOOD, GOOD])
    with pytest.raises(DataError, match="line 2: field 'id'"):
        build(config(tmp_path, [twice]))
    with pytest.raises(DataError, match="no such file"):
        build(config(tmp_path, [tmp_path / "absent.jsonl"]))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.output_formats"):
        build(config(tmp_path, [SAMPLE], output_formats=["csv"]))
    with pytest.raises(ConfigError, match="data.inputs"):
        build(DataConfig(inputs=[], output_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="data.cut_mode"):
        load_config("data_openr1", ["data.cut_mode=words"])


def test_output_folder_is_replaced_whole_or_not_at_all(tmp_path):
    cfg = config(tmp_path, [SAMPLE])
    build(cfg)
    (tmp_path / "out" / "stale.txt").write_text("from an older build")
    build(cfg)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="data.output_dir"):
        build(replace(cfg, output_dir=str(foreign)))
    assert (foreign / "keep.txt").exists()


# ------------------------------------------------------------------------------------------- property
MISSING = "<missing>"
bad_values = st.one_of(
    st.just(MISSING),
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=10),
    st.lists(st.integers(), min_size=1, max_size=2),
)
generation_text = st.one_of(
    st.sampled_from(['"<think>t</think>so 1 x"', "1 and x", "</think>", "\\frac{1}{2} or 42", ""]),
    st.builds(
        lambda q, think, sol: f"{q}<think>{think}</think>{sol}{q}",
        st.sampled_from(['"', ""]),
        st.text(max_size=15),
        st.text(max_size=30),
    ),
)


def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """A good value 29 times in 30, else a wrong type or a missing field."""
    return st.sampled_from([True] * 29 + [False]).flatmap(lambda ok: good if ok else bad_values)


@st.composite
def random_row(draw) -> dict:
    answer = draw(st.sampled_from(["1", "x", "\\frac{1}{2}", "", "42"]))
    with_answer = generation_text.map(lambda text: f"{text} so \\boxed{{{answer}}}")
    judged = draw(st.lists(st.tuples(st.one_of(generation_text, with_answer), st.booleans()), max_size=3))
    row = {
        "uuid": draw(mostly(st.uuids().map(str))),
        "problem": draw(mostly(st.text(min_size=1, max_size=30).filter(str.strip))),
        "answer": draw(mostly(st.just(answer))),
        "generations": draw(mostly(st.just([g for g, _ in judged]))),
        "correctness_math_verify": draw(mostly(st.just([ok for _, ok in judged]))),
    }
    return {key: value for key, value in row.items() if value != MISSING}


random_rows = st.lists(random_row(), min_size=1, max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=random_rows)
def test_random_rows_are_kept_dropped_or_rejected_by_name(tmp_path, rows):
    path = write_jsonl(tmp_path / "random.jsonl", rows)
    try:
        report = build(config(tmp_path, [path], hint_ratios=[50], answer_leak="drop"))
    except DataError as e:
        if e.row is None:  # every row was dropped: an error too (nothing to write)
            event("rejected: no problem left")
            assert "can become a prompt" in str(e)
            return
        event(f"rejected: field {e.field}")
        assert e.file == str(path) and e.row is not None and e.field
        assert f"line {e.row}" in str(e)
        return
    event(f"built: {report.source_kept} kept")
    assert report.rows_read == len(rows) == report.source_kept + sum(report.source_dropped.values())
    r = report.ratios["p50"]
    assert report.source_kept == r.train + r.test + sum(r.dropped.values())
    for row in load_split(tmp_path / "out" / "p50"):
        assert row["answer"] == "\\boxed{" + row["answer_text"] + "}" and row["answer_text"]


# ------------------------------------------------------------------------------------------- entry point
def test_cli_builds_the_sample_without_importing_torch(tmp_path):
    code = (
        "import sys\n"
        "from questa_nemo.cli import main\n"
        f"rc = main(['data', 'build', {str(SAMPLE)!r}, 'data.output_dir={tmp_path / 'cli'}', 'data.hint_ratios=[50]'])\n"
        "assert 'torch' not in sys.modules, 'the data build imported torch'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept 28 problems" in done.stdout
    assert (tmp_path / "cli" / "p50" / "dataset_dict.json").is_file()


def test_writing_never_asks_datasets_to_fingerprint_the_table(tmp_path, monkeypatch):
    """datasets' own fingerprint dill-pickles the Arrow table, which raised on our H100 image (Python 3.12.3,
    datasets 5.2, pyarrow 26: "Can't pickle <class 'MonthDayNano'>"); the writer gives a content hash instead."""
    import datasets.arrow_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("datasets computed a fingerprint")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    build(config(tmp_path, [SAMPLE], output_formats=["hf_disk", "jsonl", "parquet"], test_size=3))
    first = datasets.load_from_disk(str(tmp_path / "out" / "p50"))
    again = tmp_path / "again"
    build(config(again, [SAMPLE], output_formats=["hf_disk"], test_size=3))
    second = datasets.load_from_disk(str(again / "out" / "p50"))
    assert first["train"]._fingerprint == second["train"]._fingerprint  # the same rows, the same fingerprint
    assert first["train"]._fingerprint != first["test"]._fingerprint
