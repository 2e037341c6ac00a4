"""`questa-nemo eval`: pass@k of one or more checkpoints on benchmarks, or pass-rate profiles of training problems.

The core, `evaluate`, takes any GenerationBackend, tokenizer and scorer, so it is tested with small doubles and
run with the real engines; `main` only builds those from the config and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from questa_nemo.ckpt.runs import resolve_checkpoint
from questa_nemo.config import Config, ConfigError, EvalConfig, load_config
from questa_nemo.eval.benchmarks import BenchmarkRow, benchmark_key, load_benchmark
from questa_nemo.eval.passk import majority_vote
from questa_nemo.eval.report import build_report, format_table, plot_pass_at_k, write_pass_rates
from questa_nemo.eval.store import ProblemResult, ResultStore, pooled, write_json_atomic
from questa_nemo.reward.build import build_reward
from questa_nemo.reward.types import Reward, RewardResult
from questa_nemo.rollout.base import GenerationBackend, SamplingParams


class BenchmarkScorer(Protocol):
    """Scores completions, each against the row of the problem it answers: one RewardResult per completion.

    `benchmark_scorer` adapts a reward (reward.build.build_reward) to it.
    """

    def __call__(self, completions: list[str], rows: list[BenchmarkRow]) -> list[RewardResult]: ...


def benchmark_scorer(reward: Reward) -> BenchmarkScorer:
    """Score against each row's answer, handing the reward the row's problem too (the small world's reward reads
    its number of steps there)."""

    def score(completions: list[str], rows: list[BenchmarkRow]) -> list[RewardResult]:
        return reward.submit(completions, [r.answer for r in rows], [r.problem for r in rows]).result()

    return score


def chat_prompt_ids(tokenizer: Any, problem: str, template: str) -> list[int]:
    """The problem alone (no hint) as one user message through the tokenizer's chat template."""
    messages = [{"role": "user", "content": template.replace("{problem}", problem)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _check_shape(completions: Sequence[Sequence[Any]], prompts: int, n: int) -> None:
    if len(completions) != prompts or any(len(c) != n for c in completions):
        got = [len(c) for c in completions]
        raise RuntimeError(f"generation backend returned {got} completions for {prompts} prompts x n={n}")


def evaluate(
    backend: GenerationBackend | None,
    tokenizer: Any,
    rows: Sequence[BenchmarkRow],
    sampling: SamplingParams,
    scorer: BenchmarkScorer,
    extract_answer: Callable[[str], str | None],
    prompt_template: str = "{problem}",
    problems_per_batch: int = 16,
    store: ResultStore | None = None,
    prompt_limit: int | None = None,
) -> list[ProblemResult]:
    """Sample `sampling.n` completions per problem, score them, and return one result per row, in row order.

    Rows go to the backend in fixed batches of `problems_per_batch`; batch i samples with seed sampling.seed + i
    whatever was finished before, so a resumed run draws what an uninterrupted one would. With a store, finished
    problems are read back and skipped and each batch is appended as soon as it is scored. `backend` may be
    None when the store already holds every row. With `prompt_limit`, a longer prompt keeps its last
    `prompt_limit` tokens (the end of the chat template stays intact) and its result counts the tokens cut.
    """
    finished = store.load() if store is not None else {}
    by_id: dict[str, ProblemResult] = {r.id: finished[r.id] for r in rows if r.id in finished}
    for batch_index, start in enumerate(range(0, len(rows), problems_per_batch)):
        todo = [r for r in rows[start : start + problems_per_batch] if r.id not in by_id]
        if not todo:
            continue
        if backend is None:
            raise ValueError("evaluate: problems are left to run but no backend was given")
        params = dataclasses.replace(sampling, seed=sampling.seed + batch_index)
        prompts = [chat_prompt_ids(tokenizer, r.problem, prompt_template) for r in todo]
        cut = [max(0, len(p) - prompt_limit) if prompt_limit is not None else 0 for p in prompts]
        prompts = [p[c:] for p, c in zip(prompts, cut)]
        generated = backend.generate(prompts, params).completions
        _check_shape(generated, len(prompts), sampling.n)
        texts = [
            [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group] for group in generated
        ]
        flat_texts = [t for group in texts for t in group]
        scores = scorer(flat_texts, [r for r in todo for _ in range(sampling.n)])
        if len(scores) != len(flat_texts):
            raise RuntimeError(f"scorer returned {len(scores)} results for {len(flat_texts)} completions")
        batch: list[ProblemResult] = []
        for i, row in enumerate(todo):
            group_scores = scores[i * sampling.n : (i + 1) * sampling.n]
            correct = [s.reward > 0 for s in group_scores]
            answers = [extract_answer(t) for t in texts[i]]
            batch.append(
                ProblemResult(
                    id=row.id,
                    n=sampling.n,
                    correct=sum(correct),
                    majority_correct=majority_vote(answers, correct),
                    answers=answers,
                    reasons=dict(Counter(s.reason for s in group_scores)),
                    mean_tokens=sum(len(c.token_ids) for c in generated[i]) / sampling.n,
                    truncated=sum(c.finish_reason == "length" for c in generated[i]),
                    prompt_cut=cut[i],
                )
            )
        if store is not None:
            store.append(batch)
        by_id.update((r.id, r) for r in batch)
    return [by_id[r.id] for r in rows]


def eval_sampling(e: EvalConfig, stop_token_ids: tuple[int, ...], n: int | None = None) -> SamplingParams:
    """The eval section's sampling (n: eval.n_samples unless given, e.g. in-run validation's fewer samples)."""
    return SamplingParams(
        n=e.n_samples if n is None else n,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        seed=e.seed,
    )


def sampling_from(cfg: Config, tokenizer: Any) -> SamplingParams:
    """The eval section's sampling, stopping at the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    return eval_sampling(cfg.eval, (eos,) if eos is not None else ())


def model_labels(checkpoints: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Report names: the given labels, else folder names made unique and safe as folder names themselves."""
    names = list(labels) or [Path(c.rstrip("/")).name or "model" for c in checkpoints]
    safe = [re.sub(r"[^A-Za-z0-9_.+-]", "_", n) for n in names]
    seen: Counter[str] = Counter()
    unique = []
    for name in safe:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def run_settings(
    cfg: Config, checkpoint: str, benchmark_path: str, seed: int | None = None
) -> dict[str, Any]:
    """What the per-problem results depend on; a resumed run must match it. `checkpoint` is the one the
    results come from: evaluate_all passes a run folder's newest (resolve_checkpoint), so results of an older
    step are not taken for a newer step's (a SmolLM2 arm resumed after an out-of-memory death was once
    "evaluated" from the cache of its earlier step)."""
    e = cfg.eval
    return {
        "preset": e.preset,
        "checkpoint": checkpoint,
        "benchmark": benchmark_path,
        "n_samples": e.n_samples,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
        "prompt_template": e.prompt_template,
        "problems_per_batch": e.problems_per_batch,
        "seed": e.seed if seed is None else seed,
        "overlong_prompts": e.overlong_prompts,
        "rollout_backend": cfg.rollout.backend,  # engines sample differently even with the same seed
    }


SEED_STRIDE = (
    1_000_003  # run seed s samples its batches with seeds s * SEED_STRIDE + i: disjoint across seeds
)


def benchmark_seeds(cfg: Config, seeds: Sequence[int] | None) -> tuple[list[int], bool]:
    """(seeds, seeded): a benchmark's own seeds, else eval.seeds, else [eval.seed] (seeded=False: one run whose
    batches use eval.seed + i, stored as <key>.jsonl as before seeds existed)."""
    chosen = list(seeds) if seeds is not None else list(cfg.eval.seeds)
    return (chosen, True) if chosen else ([cfg.eval.seed], False)


def check_prompts_fit(
    tokenizer: Any,
    rows: Sequence[BenchmarkRow],
    cfg: Config,
    context: int,
    where: str,
) -> tuple[int | None, int]:
    """(prompt_limit, overlong): every prompt + eval.max_new_tokens must fit the model's `context` positions.

    An overlong prompt is an error naming the first one, unless eval.overlong_prompts=truncate: then the limit
    (context - max_new_tokens) goes to `evaluate`, which cuts them, and `overlong` counts them.
    """
    e = cfg.eval
    limit = context - e.max_new_tokens
    if limit < 1:
        raise ConfigError(
            "eval.max_new_tokens",
            f"{e.max_new_tokens} new tokens leave no room for a prompt of {where}: the model has {context} "
            "positions (max_position_embeddings); lower eval.max_new_tokens",
        )
    lengths = [len(chat_prompt_ids(tokenizer, r.problem, e.prompt_template)) for r in rows]
    over = [(r, n) for r, n in zip(rows, lengths) if n > limit]
    if over and e.overlong_prompts == "error":
        row, n = over[0]
        raise ConfigError(
            "eval.overlong_prompts",
            f"{len(over)} of {len(rows)} prompts of {where} do not fit the model's context: prompt + "
            f"eval.max_new_tokens {e.max_new_tokens} > {context} positions (first: id {row.id!r}, {n} prompt "
            "tokens); lower eval.max_new_tokens, or set eval.overlong_prompts=truncate",
        )
    return (limit if over else None), len(over)


def _load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    folder = cfg.model.tokenizer or cfg.model.hf_config
    if not folder:
        raise ConfigError("model.tokenizer", "evaluation needs a tokenizer folder (or model.hf_config)")
    path = Path(folder)
    if not path.exists():
        key = "model.tokenizer" if cfg.model.tokenizer else "model.hf_config"
        raise ConfigError(key, f"{folder}: no such file or folder")
    return AutoTokenizer.from_pretrained(str(path.parent if path.is_file() else path))


Benchmark = tuple  # (key, path, rows) or (key, path, rows, seeds | None)
Results = dict[str, dict[str, dict[int, list[ProblemResult]]]]  # label -> benchmark key -> seed -> problems


def evaluate_all(
    cfg: Config,
    checkpoints: Sequence[str],
    labels: Sequence[str],
    benchmarks: Sequence[Benchmark],
    tokenizer: Any,
    scorer: BenchmarkScorer,
    extract_answer: Callable[[str], str | None],
    backend_for: Callable[[Config, str], GenerationBackend],
    context_of: Callable[[Config, str], int] | None = None,
) -> Results:
    """Every checkpoint on every benchmark and seed, resuming from <output_dir>/<label>/<key>[.seed<S>].jsonl.

    `context_of(cfg, checkpoint)` gives the model's positions; every prompt is checked against it before any
    generation (check_prompts_fit). A checkpoint's backend is built only when one of its problems is still
    unfinished, and put to sleep after.
    """
    e = cfg.eval
    out = Path(e.output_dir)
    sampling = sampling_from(cfg, tokenizer)
    results: Results = {}
    for label, checkpoint in zip(labels, checkpoints):
        # a run folder stands for its newest checkpoint: resolved once, so the results are recorded under the
        # step the backend loads even if the run saves another meanwhile
        checkpoint = resolve_checkpoint(checkpoint)
        context = context_of(cfg, checkpoint) if context_of is not None else None
        limits = {}
        for key, path, rows, *_ in benchmarks:
            limit, overlong = (None, 0)
            if context is not None:
                limit, overlong = check_prompts_fit(tokenizer, rows, cfg, context, f"{path} (model {label})")
            if overlong:
                print(
                    f"eval: {label} on {key}: {overlong} of {len(rows)} prompts cut to their last {limit} tokens "
                    f"to fit the context of {context} (eval.overlong_prompts=truncate)",
                    file=sys.stderr,
                )
            limits[key] = limit
        backend: GenerationBackend | None = None
        results[label] = {}
        for key, path, rows, *rest in benchmarks:
            seeds, seeded = benchmark_seeds(cfg, rest[0] if rest else None)
            results[label][key] = {}
            for seed in seeds:
                stem = f"{key}.seed{seed}" if seeded else key
                store = ResultStore(out / label / f"{stem}.jsonl", run_settings(cfg, checkpoint, path, seed))
                finished = store.load()
                pending = sum(r.id not in finished for r in rows)
                name = f"{key} seed {seed}" if seeded else key
                print(f"eval: {label} on {name}: {pending} of {len(rows)} problems to run", file=sys.stderr)
                if backend is None and pending:
                    backend = backend_for(cfg, checkpoint)
                run_sampling = dataclasses.replace(sampling, seed=seed * SEED_STRIDE) if seeded else sampling
                results[label][key][seed] = evaluate(
                    backend,
                    tokenizer,
                    rows,
                    run_sampling,
                    scorer,
                    extract_answer,
                    e.prompt_template,
                    e.problems_per_batch,
                    store,
                    limits[key],
                )
            if e.mode == "profile":
                write_pass_rates(out / label / f"{key}.pass_rates.jsonl", pooled(results[label][key]))
        if backend is not None:
            backend.sleep()
    return results


def write_report(cfg: Config, results: Results, checkpoints: dict[str, str]) -> None:
    """results.json, the table on stdout and passk.png under eval.output_dir; both name the preset."""
    from questa_nemo.eval.protocols import deviations

    out = Path(cfg.eval.output_dir)
    settings = run_settings(cfg, "", "") | {
        "seeds": list(cfg.eval.seeds),
        "preset_deviations": deviations(cfg.eval),
    }
    report = build_report(results, checkpoints, settings, cfg.eval.ks)
    write_json_atomic(out / "results.json", report)
    print(format_table(report, cfg.eval.ks))
    plot_pass_at_k(report, out / "passk.png")
    print(f"eval: wrote {out / 'results.json'} and {out / 'passk.png'}", file=sys.stderr)


def main(config_name: str, overrides: list[str], positional: list[str]) -> int:
    """Evaluate every checkpoint on every benchmark (resuming finished problems), then report."""
    # The checkpoint -> GenerationBackend factory (eval/backend.py) builds a model; imported here so that everything
    # above depends on the GenerationBackend protocol only.
    from questa_nemo.eval import backend as backends
    from questa_nemo.model.parallel import cuda_allocator_defaults
    from questa_nemo.reward.extract import extract_answer

    cfg = load_config(config_name, overrides)
    cuda_allocator_defaults(cfg.rollout.backend)  # before anything starts CUDA
    e = cfg.eval
    if positional:
        raise ConfigError(
            "eval", f"takes no positional arguments, got {positional} (use eval.checkpoints=[..])"
        )
    if not e.benchmarks:
        raise ConfigError(
            "eval.benchmarks", "no benchmark given; set eval.benchmarks=[{path:/path/to/bench.jsonl}]"
        )
    checkpoints = list(e.checkpoints) or ([cfg.model.checkpoint] if cfg.model.checkpoint else [])
    if not checkpoints:
        raise ConfigError(
            "eval.checkpoints",
            "no checkpoint given (nor model.checkpoint); set eval.checkpoints=[/path/to/model]",
        )
    keys = [benchmark_key(b) for b in e.benchmarks]
    repeated = sorted(k for k, c in Counter(keys).items() if c > 1)
    if repeated:
        raise ConfigError("eval.benchmarks", f"two benchmarks share a name: {repeated} (set their `name`)")
    benchmarks = [(key, b.path, load_benchmark(b), b.seeds) for key, b in zip(keys, e.benchmarks)]
    labels = model_labels(checkpoints, e.labels)
    tokenizer = _load_tokenizer(cfg)
    from questa_nemo.eval.protocols import deviations

    differs = deviations(e)
    if differs:
        print(
            f"eval: preset {e.preset!r} with other values: {differs} (recorded in results.json)",
            file=sys.stderr,
        )

    def answer_of(text: str) -> str | None:
        return extract_answer(text, cfg.reward.max_answer_chars).answer or None

    with contextlib.ExitStack() as resources:
        scorer = benchmark_scorer(build_reward(cfg.reward, resources))
        results = evaluate_all(
            cfg,
            checkpoints,
            labels,
            benchmarks,
            tokenizer,
            scorer,
            answer_of,
            backends.backend_for_checkpoint,
            backends.model_context,
        )
    write_report(cfg, results, dict(zip(labels, checkpoints)))
    return 0
