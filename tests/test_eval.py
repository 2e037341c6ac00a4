"""Evaluation: the core loop with scripted doubles, resumption, bad benchmark files, reports (eval/)."""

import json
import math
import re

import pytest

from questa_nemo.config import BenchmarkConfig
from questa_nemo.eval.benchmarks import BenchmarkError, benchmark_key, load_benchmark
from questa_nemo.eval.report import build_report, format_table, plot_pass_at_k, write_pass_rates
from questa_nemo.eval.run import chat_prompt_ids, evaluate, model_labels
from questa_nemo.eval.store import ProblemResult, ResultStore, StoreError
from questa_nemo.reward.types import RewardResult
from questa_nemo.rollout.base import Completion, GenerationResult, SamplingParams

EOS = 0


class CharTokenizer:
    """Test double: one token per character (code point + 1), EOS = 0, a visible chat template."""

    eos_token_id = EOS

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [ord(c) + 1 for c in text]

    def decode(self, ids, skip_special_tokens):
        return "".join(chr(i - 1) for i in ids if not (skip_special_tokens and i == EOS))

    def encode(self, text):
        return [ord(c) + 1 for c in text]


TOK = CharTokenizer()


class ScriptedBackend:
    """Test double: answers each problem with fixed completion texts; records every call."""

    version = 0

    def __init__(self, script, fail_on_call=None):
        self.script = script  # problem text -> list of (completion text, finish_reason)
        self.calls = []
        self.fail_on_call = fail_on_call

    def generate(self, prompts, params):
        self.calls.append(([TOK.decode(p, True) for p in prompts], params))
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt("killed mid-evaluation")
        out = []
        for p in prompts:
            problem = re.search(r"<user>(.*)<assistant>", TOK.decode(p, True)).group(1)
            group = self.script[problem][: params.n]
            out.append([Completion(TOK.encode(t) + [EOS], [0.0] * (len(t) + 1), fr, 0) for t, fr in group])
        return GenerationResult(out)

    def update_weights(self, version):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


class ExactScorer:
    """Test double: correct when the last \\boxed{...} equals the reference."""

    def __call__(self, completions, rows):
        out = []
        for text, ref in zip(completions, [r.answer for r in rows]):
            found = boxed(text)
            out.append(
                RewardResult(1.0, "correct")
                if found == ref
                else RewardResult(0.0, "wrong" if found else "no_answer")
            )
        return out


def boxed(text):
    found = re.findall(r"\\boxed\{([^}]*)\}", text)
    return found[-1] if found else None


ROWS_FILE = [
    {"id": "p1", "problem": "1+1", "answer": "2"},
    {"id": "p2", "problem": "2+2", "answer": 4},
    {"id": "p3", "problem": "3+3", "answer": "6"},
]
SCRIPT = {
    "1+1": [("so \\boxed{2}", "stop"), ("\\boxed{3}", "stop"), ("\\boxed{2}", "stop"), ("hmm", "length")],
    "2+2": [("\\boxed{5}", "stop"), ("\\boxed{5}", "stop"), ("\\boxed{4}", "stop"), ("\\boxed{ 5 }", "stop")],
    "3+3": [("\\boxed{7}", "stop")] * 4,
}
SAMPLING = SamplingParams(n=4, temperature=0.6, top_p=0.95, max_new_tokens=64, stop_token_ids=(EOS,), seed=10)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, backend, store=None, per_batch=2):
    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )
    return evaluate(backend, TOK, rows, SAMPLING, ExactScorer(), boxed, "Q: {problem}", per_batch, store)


def test_evaluate_counts_and_majority(tmp_path):
    backend = ScriptedBackend({"Q: " + k: v for k, v in SCRIPT.items()})
    results = run(tmp_path, backend)
    assert [r.id for r in results] == ["p1", "p2", "p3"]
    assert [r.correct for r in results] == [2, 1, 0]
    assert [r.majority_correct for r in results] == [True, False, False]  # p2: "5" and " 5 " outvote "4"
    p1 = results[0]
    assert p1.reasons == {"correct": 2, "wrong": 1, "no_answer": 1}
    assert p1.truncated == 1 and p1.answers == ["2", "3", "2", None]
    assert p1.mean_tokens == pytest.approx((12 + 9 + 9 + 3 + 4) / 4)
    # prompts: the template around the bare problem, through the chat template; seeds advance per batch
    assert backend.calls[0][0] == ["<user>Q: 1+1<assistant>", "<user>Q: 2+2<assistant>"]
    assert [c[1].seed for c in backend.calls] == [10, 11]
    assert chat_prompt_ids(TOK, "x", "{problem}") == TOK.encode("<user>x<assistant>")


def test_resume_skips_finished_problems_and_matches_a_whole_run(tmp_path):
    script = {"Q: " + k: v for k, v in SCRIPT.items()}
    whole = run(tmp_path, ScriptedBackend(script))
    store = ResultStore(tmp_path / "out" / "bench.jsonl", {"n": 4})
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ScriptedBackend(script, fail_on_call=2), store)
    assert len(store.load()) == 2  # the first batch was saved before the kill
    with open(store.path, "a") as f:
        f.write('{"id": "p3", "n": 4, "corr')  # a line torn by the kill
    backend = ScriptedBackend(script)
    resumed = run(tmp_path, backend, store)
    assert resumed == whole
    assert len(backend.calls) == 1 and backend.calls[0][0] == ["<user>Q: 3+3<assistant>"]
    assert backend.calls[0][1].seed == 11  # batch 1's seed, as in the whole run
    assert len(store.path.read_text().splitlines()) == 3
    again = ScriptedBackend(script)
    assert run(tmp_path, again, store) == whole and again.calls == []


def test_resume_refuses_other_settings_and_names_bad_lines(tmp_path):
    path = tmp_path / "bench.jsonl"
    ResultStore(path, {"temperature": 0.6}).load()
    with pytest.raises(StoreError, match="temperature"):
        ResultStore(path, {"temperature": 1.0}).load()
    path.write_text("not json\n")
    with pytest.raises(StoreError, match="line 1"):
        ResultStore(path, {"temperature": 0.6}).load()


def test_backend_returning_wrong_shape_is_an_error(tmp_path):
    short = {"Q: " + k: v[:2] for k, v in SCRIPT.items()}
    with pytest.raises(RuntimeError, match="n=4"):
        run(tmp_path, ScriptedBackend(short))


@pytest.mark.parametrize(
    "rows,match",
    [
        (
            [{"id": "a", "problem": "x", "answer": "1"}, {"id": "b", "problem": "y"}],
            r"bad.jsonl line 2: no field 'answer'",
        ),
        ([{"id": "a", "problem": "x", "answer": ""}], r"line 1: field 'answer' \(answer\) is empty"),
        (
            [{"id": "a", "problem": "x", "answer": "1"}, {"id": "a", "problem": "y", "answer": "2"}],
            "line 2: id 'a' duplicates line 1",
        ),
        ([{"problem": "x", "answer": "1"}], "line 1: no value in id field 'id'"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BenchmarkError, match=match) as err:
        load_benchmark(BenchmarkConfig(path=str(path), id_field="id"))
    assert str(path) in str(err.value)


def test_empty_and_broken_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match="empty.jsonl: no rows"):
        load_benchmark(BenchmarkConfig(path=str(empty)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(BenchmarkError, match="broken.jsonl line 2: not valid JSON"):
        load_benchmark(BenchmarkConfig(path=str(broken)))
    with pytest.raises(BenchmarkError, match="no such file"):
        load_benchmark(BenchmarkConfig(path=str(tmp_path / "missing.jsonl")))


def test_presets_parquet_datasets_folder_and_limit(tmp_path):
    import datasets

    rows = [
        {"id": 7, "question": "q1", "final_answer": ["$\\frac12$"]},
        {"id": 8, "question": "q2", "final_answer": ["3"]},
    ]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "olymp"))
    cfg = BenchmarkConfig(path=str(tmp_path / "olymp"), preset="olympiadbench")
    loaded = load_benchmark(cfg)
    assert [(r.id, r.problem, r.answer) for r in loaded] == [("7", "q1", "$\\frac12$"), ("8", "q2", "3")]
    assert benchmark_key(cfg) == "olympiadbench"
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "o.parquet"))
    limited = load_benchmark(
        BenchmarkConfig(path=str(tmp_path / "o.parquet"), preset="olympiadbench", limit=1)
    )
    assert [r.id for r in limited] == ["7"]
    plain = write_jsonl(tmp_path / "aime.jsonl", [{"Problem": "p", "Answer": 12}])
    got = load_benchmark(BenchmarkConfig(path=str(plain), problem_field="Problem", answer_field="Answer"))
    assert got[0].id == "1" and got[0].answer == "12"


def result(id_, n, correct, majority=False):
    return ProblemResult(id_, n, correct, majority, [None] * n, {"correct": correct}, 10.0, 0)


def test_report_table_plot_and_pass_rates(tmp_path):
    base = [result("a", 4, 0), result("b", 4, 2, True)]
    trained = [result("a", 4, 1), result("b", 4, 4, True)]
    report = build_report(
        {"base": {"aime24": base}, "trained": {"aime24": trained}},
        {"base": "/ckpt/base", "trained": "/ckpt/trained"},
        {"n_samples": 4, "checkpoint": "", "benchmark": ""},
        [1, 2, 4],
    )
    s = report["models"]["trained"]["benchmarks"]["aime24"]
    assert s["title"] == "AIME 2024" and s["problems"] == 2
    assert s["pass_at_k"]["1"]["mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass_at_k"]["4"]["mean"] == 1.0 and set(s["pass_at_k"]) == {"1", "2", "3", "4"}
    assert report["models"]["base"]["benchmarks"]["aime24"]["majority"]["mean"] == 0.5
    assert "checkpoint" not in report["settings"]
    table = format_table(report, [1, 2, 4])
    assert "pass@4" in table.splitlines()[0]
    assert re.search(r"aime24\s+trained\s+2\s+62\.50 \+- 37\.50", table)
    # trained minus base per problem: 1/4 and 2/4 -> +37.5 points, paired stderr 12.5 (the sd of .25 and .5 / sqrt 2)
    gap = report["paired"]["aime24"]
    assert gap["against"] == "base" and gap["pass@1"]["trained"]["problems"] == 2
    assert gap["pass@1"]["trained"]["mean"] == pytest.approx(0.375)
    assert gap["pass@1"]["trained"]["stderr"] == pytest.approx(0.125)
    assert "aime24: pass@1 minus base's, paired over problems: trained +37.50 +- 12.50" in table
    # seeds pool per problem; one model alone has nothing to pair with
    seeded = build_report({"base": {"x": {1: base, 2: base}}, "trained": {"x": {1: trained, 2: base}}}, {}, {}, [1])
    assert seeded["paired"]["x"]["pass@1"]["trained"]["mean"] == pytest.approx((1 / 8 + 2 / 8) / 2)
    assert "paired" not in build_report({"base": {"aime24": base}}, {}, {}, [1])
    plot_pass_at_k(report, tmp_path / "passk.png")
    assert (tmp_path / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_pass_rates(tmp_path / "rates.jsonl", base)
    lines = [json.loads(line) for line in (tmp_path / "rates.jsonl").read_text().splitlines()]
    assert lines == [
        {"id": "a", "pass_rate": 0.0, "n": 4, "correct": 0},
        {"id": "b", "pass_rate": 0.5, "n": 4, "correct": 2},
    ]


def test_model_labels():
    assert model_labels(["/x/base/", "/y/base", "/z/step 50"], []) == ["base", "base-2", "step_50"]
    assert model_labels(["/a", "/b"], ["before", "after"]) == ["before", "after"]


def eval_config(tmp_path, *extra):
    from questa_nemo.config import load_config

    return load_config(
        "eval_default",
        [
            f"eval.output_dir={tmp_path / 'out'}",
            "eval.n_samples=4",
            "eval.ks=[1,2,4]",
            "eval.problems_per_batch=2",
            "eval.seed=10",
            "eval.prompt_template='Q: {problem}'",
            *extra,
        ],
    )


def test_two_checkpoints_compared_resumed_and_reported(tmp_path, capsys):
    from questa_nemo.eval.run import evaluate_all, write_report

    cfg = eval_config(tmp_path)
    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )
    good = {"Q: " + k: [(f"\\boxed{{{int(k[0]) * 2}}}", "stop")] * 4 for k in SCRIPT}
    scripts = {"/ck/base": {"Q: " + k: v for k, v in SCRIPT.items()}, "/ck/trained": good}
    built = []

    def backend_for(cfg_, checkpoint):
        built.append(checkpoint)
        return ScriptedBackend(scripts[checkpoint])

    args = (
        ["/ck/base", "/ck/trained"],
        ["base", "trained"],
        [("mini", "b.jsonl", rows)],
        TOK,
        ExactScorer(),
        boxed,
    )
    results = evaluate_all(cfg, *args, backend_for)
    assert [r.correct for r in results["base"]["mini"][10]] == [2, 1, 0]  # one run, seeded with eval.seed
    assert [r.correct for r in results["trained"]["mini"][10]] == [4, 4, 4]
    assert built == ["/ck/base", "/ck/trained"]
    assert (
        evaluate_all(cfg, *args, backend_for) == results and len(built) == 2
    )  # all finished: no backend built
    write_report(cfg, results, {"base": "/ck/base", "trained": "/ck/trained"})
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["models"]["trained"]["benchmarks"]["mini"]["pass_at_k"]["1"]["mean"] == 1.0
    assert report["settings"]["n_samples"] == 4
    assert (tmp_path / "out" / "passk.png").exists()
    assert "trained" in capsys.readouterr().out
    # another temperature must not reuse these results
    hotter = eval_config(tmp_path, "eval.temperature=1.0")
    with pytest.raises(StoreError, match="temperature"):
        evaluate_all(hotter, *args, backend_for)


def test_a_run_folder_resumes_only_its_own_newest_checkpoint(tmp_path):
    from questa_nemo.eval.run import evaluate_all

    cfg = eval_config(tmp_path)
    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )
    run = tmp_path / "run"

    def save(step: int) -> None:
        (run / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step}" / "run_state.json").write_text("{}")

    script = {"Q: " + k: v for k, v in SCRIPT.items()}
    args = ([str(run)], ["arm"], [("mini", "b.jsonl", rows)], TOK, ExactScorer(), boxed)
    save(5)
    first = evaluate_all(cfg, *args, lambda cfg_, ck: ScriptedBackend(script))
    assert evaluate_all(cfg, *args, lambda cfg_, ck: pytest.fail("rebuilt")) == first  # same step: cached
    save(10)  # the run went on: step 10's weights are not step 5's
    with pytest.raises(StoreError, match="checkpoint"):
        evaluate_all(cfg, *args, lambda cfg_, ck: ScriptedBackend(script))


def test_profile_mode_writes_pass_rates(tmp_path):
    from questa_nemo.eval.run import evaluate_all

    cfg = eval_config(tmp_path, "eval=profile")
    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )
    backend = ScriptedBackend({"Q: " + k: v for k, v in SCRIPT.items()})
    evaluate_all(
        cfg, ["/m"], ["m"], [("train", "b.jsonl", rows)], TOK, ExactScorer(), boxed, lambda c, k: backend
    )
    lines = (tmp_path / "out" / "m" / "train.pass_rates.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"id": "p1", "pass_rate": 0.5, "n": 4, "correct": 2},
        {"id": "p2", "pass_rate": 0.25, "n": 4, "correct": 1},
        {"id": "p3", "pass_rate": 0.0, "n": 4, "correct": 0},
    ]


@pytest.mark.parametrize(
    "override,key",
    [
        ("eval.ks=[1,64]", "eval.ks"),
        ("eval.labels=[a]", "eval.labels"),
        ("eval.benchmarks=[{preset:aime99,path:x.jsonl}]", "eval.benchmarks[0].preset"),
        ("eval.prompt_template=nothing", "eval.prompt_template"),
        ("+algo=drgrpo algo.loss_agg=token", "algo.loss_agg"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, key):
    from questa_nemo.config import ConfigError

    with pytest.raises(ConfigError) as err:
        eval_config(tmp_path, *override.split())
    assert err.value.key == key


def test_real_hf_tokenizer_renders_the_bare_problem(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from questa_nemo.eval.run import _load_tokenizer, sampling_from

    chars = ["<unk>", "<eos>"] + [chr(i) for i in range(32, 127)]
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(tmp_path / "tok")
    cfg = eval_config(tmp_path, f"model.tokenizer={tmp_path / 'tok'}")
    tokenizer = _load_tokenizer(cfg)
    ids = chat_prompt_ids(tokenizer, "1+1", cfg.eval.prompt_template)
    assert tokenizer.decode(ids) == "<user>Q: 1+1<assistant>"
    params = sampling_from(cfg, tokenizer)
    assert params.stop_token_ids == (1,) and params.n == 4 and params.temperature == 0.6 and params.seed == 10


def test_row_scorer_hands_the_reward_each_rows_reference_and_problem():
    from questa_nemo.eval.benchmarks import BenchmarkRow
    from questa_nemo.eval.run import benchmark_scorer
    from questa_nemo.reward.types import Done

    class RecordingReward:
        def submit(self, completions, references, problems):
            self.seen = (completions, references, problems)
            return Done([RewardResult(0.0, "wrong")] * len(completions))

    reward = RecordingReward()
    rows = [BenchmarkRow("a", "p", "\\boxed{1}"), BenchmarkRow("b", "q", "2")]
    assert len(benchmark_scorer(reward)(["x", "y"], rows)) == 2
    assert reward.seen == (["x", "y"], ["\\boxed{1}", "2"], ["p", "q"])


def test_small_world_end_to_end_with_its_tokenizer_and_reward(tmp_path):
    """The shipped world tokenizer and the world reward through `evaluate`; generation is scripted."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from questa_nemo.data.world import WorldProblem
    from questa_nemo.eval.benchmarks import BenchmarkRow
    from questa_nemo.eval.run import benchmark_scorer
    from questa_nemo.reward.world import WorldReward

    folder = Path(__file__).resolve().parents[1] / "data" / "world" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    problems = [WorldProblem(5, (("+", 3), ("*", 2))), WorldProblem(7, (("-", 9), ("+", 1), ("*", 3)))]
    rows = [BenchmarkRow(str(i), p.text(8) + "|" + "_" * 21, p.answer()) for i, p in enumerate(problems)]
    solutions = {rows[0].problem: problems[0].solution(), rows[1].problem: "98\n99\n96\n\\boxed{96}"}

    class WorldBackend(ScriptedBackend):
        def generate(self, prompts, params):
            self.calls.append(params)
            out = []
            for p in prompts:
                text = tokenizer.decode(p, skip_special_tokens=True)
                ids = tokenizer(solutions[text.removesuffix("?")], add_special_tokens=False)["input_ids"]
                ids = ids + [tokenizer.eos_token_id]
                out.append([Completion(ids, [0.0] * len(ids), "stop", 0)] * params.n)
            return GenerationResult(out)

    sampling = SamplingParams(n=2, max_new_tokens=32, stop_token_ids=(tokenizer.eos_token_id,))
    results = evaluate(WorldBackend({}), tokenizer, rows, sampling, benchmark_scorer(WorldReward()), boxed)
    assert problems[1].answer() == "97"  # 7 - 9 = 98, + 1 = 99, * 3 = 297 = 97 (mod 100): 96 is wrong
    assert [r.correct for r in results] == [2, 0]
    assert results[1].reasons == {"wrong": 2} and results[0].answers == ["16", "16"]


def test_main_runs_the_command_end_to_end(tmp_path, monkeypatch, capsys):
    """`questa-nemo eval` on small-world rows; only the checkpoint -> backend factory is a double."""
    from pathlib import Path

    import questa_nemo.eval.backend
    from questa_nemo.data.world import WorldProblem
    from questa_nemo.eval.run import main

    problem = WorldProblem(5, (("+", 3), ("*", 2)))
    prompt = problem.text(8) + "|" + "_" * 21
    bench = write_jsonl(
        tmp_path / "world.jsonl", [{"id": "w0", "problem": prompt, "answer": problem.answer()}]
    )
    built = []

    def backend_for_checkpoint(cfg, checkpoint):
        from transformers import AutoTokenizer

        built.append(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
        ids = tokenizer(problem.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

        class Fixed(ScriptedBackend):
            def generate(self, prompts, params):
                return GenerationResult(
                    [[Completion(ids, [0.0] * len(ids), "stop", 0)] * params.n] * len(prompts)
                )

        return Fixed({})

    monkeypatch.setattr(questa_nemo.eval.backend, "backend_for_checkpoint", backend_for_checkpoint)
    folder = Path(__file__).resolve().parents[1] / "data" / "world" / "tokenizer"
    overrides = [
        f"model.tokenizer={folder}",
        f"model.hf_config={folder.parent / 'config.json'}",  # the context the prompts are checked against
        "reward.kind=world",
        "eval.checkpoints=[/ck/a]",
        "eval.n_samples=2",
        "eval.ks=[1,2]",
        "eval.max_new_tokens=64",
        f"eval.output_dir={tmp_path / 'out'}",
        f"eval.benchmarks=[{{name:world,path:'{bench}',id_field:id}}]",
    ]
    assert main("eval_default", overrides, []) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["models"]["a"]["benchmarks"]["world"]["pass_at_k"]["2"]["mean"] == 1.0
    assert (tmp_path / "out" / "passk.png").exists() and built == ["/ck/a"]
    assert re.search(r"world\s+a\s+1\s+100\.00", capsys.readouterr().out)
    assert main("eval_default", overrides, []) == 0 and built == [
        "/ck/a"
    ]  # resumed: nothing left to generate


def test_config_knows_every_preset():
    from questa_nemo.config import BENCHMARK_PRESETS
    from questa_nemo.eval.benchmarks import PRESETS

    assert set(BENCHMARK_PRESETS) == set(PRESETS)


@pytest.mark.slow
def test_eval_of_a_tiny_converted_model_on_hand_written_problems(tmp_path):
    """`questa-nemo eval` with nothing replaced: a random tiny Llama saved by transformers (the world's
    tokenizer beside it) is imported, run by our Megatron engine and scored by the math reward pool."""
    import json as _json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    repo = Path(__file__).resolve().parents[1]
    config = _json.loads((repo / "data" / "world" / "config.json").read_text())
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(model_dir)
    for f in (repo / "data" / "world" / "tokenizer").iterdir():
        shutil.copy(f, model_dir / f.name)
    bench = write_jsonl(
        tmp_path / "hand.jsonl",
        [
            {"id": "add", "problem": "What is 12 + 35?", "answer": "47"},
            {"id": "frac", "problem": "Simplify 6/8.", "answer": "\\frac{3}{4}"},
            {"id": "sq", "problem": "What is 9 squared?", "answer": "81"},
        ],
    )
    out = tmp_path / "out"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }

    def cli(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "questa_nemo.cli",
                "eval",
                f"model.hf_config={model_dir}",
                "model.params_dtype=fp32",
                "model.attention=sdpa",
                "rollout.cuda_graphs=false",
                f"eval.checkpoints=[{model_dir}]",
                "eval.labels=[tiny]",
                "eval.max_new_tokens=16",
                "reward.num_workers=1",
                f"eval.benchmarks=[{{name:hand,path:'{bench}',id_field:id}}]",
                *extra,
            ],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    # QuestA's preset (the default) with 2 samples instead of 32
    done = cli("eval.n_samples=2", "eval.ks=[1,2]", f"eval.output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = _json.loads((out / "results.json").read_text())
    hand = report["models"]["tiny"]["benchmarks"]["hand"]
    assert hand["problems"] == 3 and hand["n_samples"] == 2
    assert sum(hand["reasons"].values()) == 6  # every sample scored, with its reason
    assert (out / "passk.png").exists() and (out / "tiny" / "hand.jsonl").exists()
    assert report["preset"] == "questa"
    assert report["settings"]["preset_deviations"] == {"n_samples": 2, "max_new_tokens": 16}
    # the leaderboard's preset with 2 seeds instead of 10: one sample per problem and seed, mean and std
    board = tmp_path / "board"
    done = cli("eval=leaderboard", "eval.seeds=[0,1]", f"eval.output_dir={board}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = _json.loads((board / "results.json").read_text())
    hand = report["models"]["tiny"]["benchmarks"]["hand"]
    assert report["preset"] == "leaderboard" and hand["seeds"] == [0, 1] and hand["n_samples"] == 2  # pooled
    assert hand["over_seeds"]["pass_at_k"]["1"]["seeds"] == 2 and set(hand["per_seed"]) == {"0", "1"}
    assert all((board / "tiny" / f"hand.seed{s}.jsonl").exists() for s in (0, 1))


# ------------------------------------------------------------------------------- context, seeds, presets
def test_prompts_over_the_context_are_refused_or_cut_and_counted(tmp_path):
    from questa_nemo.config import ConfigError
    from questa_nemo.eval.run import evaluate_all

    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )

    class Blind(ScriptedBackend):  # answers 0 to whatever it is sent, cut prompts included
        def generate(self, prompts, params):
            self.calls.append(([TOK.decode(p, True) for p in prompts], params))
            text = TOK.encode("\\boxed{0}") + [EOS]
            return GenerationResult(
                [[Completion(text, [0.0] * len(text), "stop", 0)] * params.n] * len(prompts)
            )

    backend = Blind({})
    # CharTokenizer: "<user>Q: 1+1<assistant>" is 23 tokens; a context of 80 leaves 80 - 64 = 16 for the prompt
    args = (["/m"], ["m"], [("mini", "b.jsonl", rows)], TOK, ExactScorer(), boxed, lambda c, k: backend)
    cfg = eval_config(tmp_path, "eval.max_new_tokens=64")
    with pytest.raises(ConfigError, match=r"3 of 3 prompts .* 64 > 80 positions \(first: id 'p1', 23 prompt"):
        evaluate_all(cfg, *args, context_of=lambda c, k: 80)
    with pytest.raises(ConfigError, match="eval.max_new_tokens: 64 new tokens leave no room"):
        evaluate_all(cfg, *args, context_of=lambda c, k: 64)
    assert backend.calls == []  # refused before any generation
    cut = eval_config(
        tmp_path,
        "eval.max_new_tokens=64",
        "eval.overlong_prompts=truncate",
        "eval.output_dir=" + str(tmp_path / "cut"),
    )
    results = evaluate_all(cut, *args, context_of=lambda c, k: 80)
    sent = backend.calls[0][0]
    assert [len(TOK.encode(p)) for p in sent] == [16, 16]  # the last 16 tokens: the chat template's end stays
    assert all(p.endswith("<assistant>") for p in sent)
    assert [r.prompt_cut for r in results["m"]["mini"][10]] == [7, 7, 7]
    report = build_report(results, {}, {}, [1])
    assert report["models"]["m"]["benchmarks"]["mini"]["prompts_cut"] == 3
    # prompts that fit are sent whole and count nothing
    fits = evaluate_all(
        eval_config(tmp_path, "eval.max_new_tokens=64", "eval.output_dir=" + str(tmp_path / "fit")),
        *args,
        context_of=lambda c, k: 200,
    )
    assert [r.prompt_cut for r in fits["m"]["mini"][10]] == [0, 0, 0]


class SeededBackend(ScriptedBackend):
    """Answers correctly when (sampling seed + problem) is even: every seed gives its own accuracy."""

    def generate(self, prompts, params):
        self.calls.append(([TOK.decode(p, True) for p in prompts], params))
        out = []
        for p in prompts:
            problem = re.search(r"<user>Q: (.*)<assistant>", TOK.decode(p, True)).group(1)
            right = (params.seed // 1_000_003 + int(problem[0])) % 2 == 0
            text = f"\\boxed{{{int(problem[0]) * 2 if right else 0}}}"
            out.append([Completion(TOK.encode(text) + [EOS], [0.0] * (len(text) + 1), "stop", 0)] * params.n)
        return GenerationResult(out)


def test_seeds_run_separately_resume_and_report_mean_and_std(tmp_path, capsys):
    from questa_nemo.eval.run import evaluate_all, write_report

    cfg = eval_config(
        tmp_path,
        "eval=leaderboard",
        "eval.n_samples=1",
        "eval.ks=[1]",
        "eval.seeds=[0,1,2]",
        "eval.max_new_tokens=64",
        "eval.prompt_template='Q: {problem}'",
        "eval.problems_per_batch=2",
    )
    rows = load_benchmark(
        BenchmarkConfig(path=str(write_jsonl(tmp_path / "b.jsonl", ROWS_FILE)), id_field="id")
    )
    backend = SeededBackend({})
    args = (["/m"], ["m"], [("mini", "b.jsonl", rows)], TOK, ExactScorer(), boxed, lambda c, k: backend)
    results = evaluate_all(cfg, *args)
    # problem p is right when seed + p is even: seeds 0 and 2 get 1 of 3, seed 1 gets 2 of 3
    assert {s: [r.correct for r in run] for s, run in results["m"]["mini"].items()} == {
        0: [0, 1, 0],
        1: [1, 0, 1],
        2: [0, 1, 0],
    }
    seeds_used = sorted({params.seed for _, params in backend.calls})
    assert seeds_used == [
        0,
        1,
        1_000_003,
        1_000_004,
        2_000_006,
        2_000_007,
    ]  # seed s, batch i: s * 1000003 + i
    for seed in (0, 1, 2):
        assert (tmp_path / "out" / "m" / f"mini.seed{seed}.jsonl").is_file()
    calls = len(backend.calls)
    assert evaluate_all(cfg, *args) == results and len(backend.calls) == calls  # resumed: nothing to run
    write_report(cfg, results, {"m": "/m"})
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["preset"] == "leaderboard" and report["settings"]["preset"] == "leaderboard"
    mini = report["models"]["m"]["benchmarks"]["mini"]
    p1 = mini["over_seeds"]["pass_at_k"]["1"]
    assert p1["seeds"] == 3 and p1["mean"] == pytest.approx(4 / 9)
    assert p1["std"] == pytest.approx(math.sqrt(((1 / 3 - 4 / 9) ** 2 * 2 + (2 / 3 - 4 / 9) ** 2) / 2))
    assert set(mini["per_seed"]) == {"0", "1", "2"} and mini["seeds"] == [0, 1, 2]
    assert mini["pass_at_k"]["3"]["mean"] == pytest.approx(1.0)  # pooled: 3 samples per problem, k up to 3
    out = capsys.readouterr().out
    assert "44.44 +- 19.25 sd, 3 seeds" in out and "preset: leaderboard" in out


def _world_eval(tmp_path, monkeypatch, preset_overrides):
    """`questa-nemo eval` (main) on small-world rows with the world's tokenizer and 256-position config; the
    backend double writes each problem's correct solution."""
    from pathlib import Path

    import questa_nemo.eval.backend
    from questa_nemo.data.world import WorldProblem
    from questa_nemo.eval.run import main

    problems = [WorldProblem(5, (("+", 3), ("*", 2))), WorldProblem(7, (("+", 1),))]
    rows = [
        {"id": f"w{i}", "problem": p.text(8) + "|" + "_" * 21, "answer": p.answer()}
        for i, p in enumerate(problems)
    ]
    bench = write_jsonl(tmp_path / "world.jsonl", rows)
    solutions = {r["problem"]: p.solution() for r, p in zip(rows, problems)}
    folder = Path(__file__).resolve().parents[1] / "data" / "world"
    calls = []

    def backend_for_checkpoint(cfg, checkpoint):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)

        class World(ScriptedBackend):
            def generate(self, prompts, params):
                calls.append(params)
                out = []
                for p in prompts:
                    text = tokenizer.decode(p, skip_special_tokens=True).removesuffix("?")
                    ids = tokenizer(solutions[text], add_special_tokens=False)["input_ids"] + [
                        tokenizer.eos_token_id
                    ]
                    out.append([Completion(ids, [0.0] * len(ids), "stop", 0)] * params.n)
                return GenerationResult(out)

        return World({})

    monkeypatch.setattr(questa_nemo.eval.backend, "backend_for_checkpoint", backend_for_checkpoint)
    overrides = [
        f"model.tokenizer={folder / 'tokenizer'}",
        f"model.hf_config={folder / 'config.json'}",
        "reward.kind=world",
        "eval.checkpoints=[/ck/world]",
        f"eval.output_dir={tmp_path / 'out'}",
        "eval.max_new_tokens=64",
        *preset_overrides,
        f"eval.benchmarks=[{{name:world,path:'{bench}',id_field:id{',seeds:[3,4]' if 'eval=leaderboard' in preset_overrides else ''}}}]",
    ]
    assert main("eval_default", overrides, []) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text()), calls


def test_questa_preset_end_to_end(tmp_path, monkeypatch, capsys):
    """QuestA's protocol (AReaL's script) with 4 samples instead of 32: recorded as questa with its deviations."""
    report, calls = _world_eval(tmp_path, monkeypatch, ["eval=questa", "eval.n_samples=4", "eval.ks=[1,2,4]"])
    assert report["preset"] == "questa"
    assert report["settings"]["preset_deviations"] == {"n_samples": 4, "max_new_tokens": 64}
    assert {(p.temperature, p.top_p, p.n) for p in calls} == {(0.6, 0.95, 4)}
    world = report["models"]["world"]["benchmarks"]["world"]
    assert set(world["pass_at_k"]) == {"1", "2", "3", "4"}  # pass@k for every k up to the sample count
    assert world["pass_at_k"]["1"]["mean"] == 1.0 and "over_seeds" not in world
    assert "preset: questa (differs: {'n_samples': 4, 'max_new_tokens': 64})" in capsys.readouterr().out


def test_leaderboard_preset_end_to_end(tmp_path, monkeypatch, capsys):
    """The leaderboard's protocol with 2 seeds instead of 10 (one sample per problem and seed)."""
    report, calls = _world_eval(tmp_path, monkeypatch, ["eval=leaderboard"])
    assert report["preset"] == "leaderboard"
    assert report["settings"]["preset_deviations"] == {"max_new_tokens": 64}
    assert {(p.temperature, p.top_p, p.n) for p in calls} == {(0.8, 0.9, 1)}
    assert {p.seed // 1_000_003 for p in calls} == {3, 4}
    world = report["models"]["world"]["benchmarks"]["world"]
    assert world["seeds"] == [3, 4] and world["over_seeds"]["pass_at_k"]["1"] == {
        "mean": 1.0,
        "std": 0.0,
        "seeds": 2,
    }
    assert "100.00 +- 0.00 sd, 2 seeds" in capsys.readouterr().out


def test_leaderboard_seed_counts_are_checked():
    from questa_nemo.config import load_config
    from questa_nemo.eval.protocols import deviations

    e = load_config("eval_default", ["eval=leaderboard"]).eval
    assert deviations(e) == {}
    assert {b.preset: len(b.seeds) for b in e.benchmarks} == {
        "aime24": 10,
        "aime25": 10,
        "amc23": 10,
        "math500": 3,
        "minerva": 3,
        "olympiadbench": 3,
    }
    e = load_config("eval_default", ["eval=leaderboard", "eval.benchmarks.0.seeds=[0,1]"]).eval
    assert deviations(e) == {"benchmarks[0].seeds": 2}
