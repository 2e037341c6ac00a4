"""`questa-nemo doctor`: what this environment can run, and why not where it cannot.

Prints the versions of the stack (Python, torch, CUDA, megatron-core, Transformer Engine, TensorRT-LLM,
math-verify, transformers), the GPUs this process sees, and which attention specs, rollout backends and
parallel sizes work here. `check_config` runs the same probes against one config; the trainer calls it at start
so that a config this machine cannot run fails with one clear line instead of a traceback deep in a rank.

Nothing here imports megatron internals or builds a model: optional packages are probed by importing them
(an installed package that fails to import, e.g. Transformer Engine without CUDA, counts as unavailable).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import platform
import warnings
from dataclasses import dataclass

from questa_nemo.config import (
    CONTEXT_PARALLEL_UNSUPPORTED,
    ROLLOUT_BACKENDS,
    Config,
    load_config,
)


@dataclass(frozen=True)
class Component:
    """One package of the stack: its installed version and whether its module imports here."""

    label: str  # what users call it: "Transformer Engine"
    distributions: tuple[str, ...]  # pip names to read the version from, first found wins
    module: str  # what importing it means for us (TE: its PyTorch extension)


COMPONENTS = {
    "torch": Component("torch", ("torch",), "torch"),
    "megatron": Component("megatron-core", ("megatron-core", "megatron_core"), "megatron.core"),
    "te": Component(
        "Transformer Engine", ("transformer-engine", "transformer_engine"), "transformer_engine.pytorch"
    ),
    "trtllm": Component("TensorRT-LLM", ("tensorrt-llm", "tensorrt_llm"), "tensorrt_llm"),
    "math_verify": Component("math-verify", ("math-verify", "math_verify"), "math_verify"),
    "transformers": Component("transformers", ("transformers",), "transformers"),
    "fa4": Component("FlashAttention 4", ("flash-attn-4",), "flash_attn.cute"),  # model.attention=fa4
}


@dataclass(frozen=True)
class Availability:
    """A backend, spec or size this environment can or cannot run; `reason` says why not."""

    key: str  # config key and value, e.g. "rollout.backend=trtllm"
    ok: bool
    reason: str = ""


def installed_version(component: Component) -> str | None:
    for dist in component.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def import_error(module: str) -> str | None:
    """None when `module` imports, else the error in one line (cached: some imports take seconds)."""
    try:
        with warnings.catch_warnings():  # megatron-core warns at import when TE and Apex are absent
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as e:  # an optional package can fail in any way (missing CUDA, ABI mismatch)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def not_importable(name: str, key: str) -> str | None:
    """The reason `key` cannot run when component `name` does not import, or None when it imports.

    E.g. "TensorRT-LLM not importable: rollout.backend=trtllm unavailable (ModuleNotFoundError: ...)".
    """
    component = COMPONENTS[name]
    error = import_error(component.module)
    return None if error is None else f"{component.label} not importable: {key} unavailable ({error})"


@dataclass(frozen=True)
class Gpus:
    """The accelerators this process sees (CUDA_VISIBLE_DEVICES applies)."""

    names: tuple[str, ...]
    bf16: bool  # every visible GPU computes in bf16 (compute capability 8.0 or newer)
    nodes: int  # nodes of the job under torchrun (WORLD_SIZE / LOCAL_WORLD_SIZE), else 1

    @property
    def count(self) -> int:
        return len(self.names)


def visible_gpus() -> Gpus:
    import torch

    if not torch.cuda.is_available():
        return Gpus((), bf16=False, nodes=1)
    names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Gpus(names, bf16=torch.cuda.is_bf16_supported(), nodes=max(1, world // max(1, local)))


def gpu_description(index: int) -> str:
    """Name, compute capability and memory of one visible GPU: "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB"."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB"


def attention_availability(choice: str, gpus: Gpus) -> Availability:
    key = f"model.attention={choice}"
    if choice == "te":
        problem = not_importable("te", key)
        if problem is None and not gpus.count:
            problem = f"Transformer Engine needs a CUDA GPU: {key} unavailable on CPU"
        return Availability(key, problem is None, problem or "")
    if choice == "fa4":
        from questa_nemo.model.flash4 import fa4_problem

        problem = fa4_problem("cuda" if gpus.count else "cpu")
        return Availability(key, problem is None, "" if problem is None else f"{key} unavailable: {problem}")
    return Availability(key, True)  # sdpa and local are plain torch, on CPU and GPU


def resolves_to_te(attention: str) -> bool:
    """Whether model.attention resolves to Transformer Engine's here (auto: where it imports)."""
    return attention == "te" or (attention == "auto" and import_error(COMPONENTS["te"].module) is None)


def packed_varlen_availability(gpus: Gpus, attention: str = "sdpa") -> Availability:
    """Whether model.packed_attention=varlen can run here with `attention` (model.attention): the model
    build's own check (model/varlen.py, megatron-free), with the GPUs seen here."""
    from questa_nemo.model.varlen import varlen_problem

    key = "model.packed_attention=varlen"
    problem = varlen_problem(resolves_to_te(attention), attention, "cuda" if gpus.count else "cpu")
    return Availability(key, problem is None, "" if problem is None else f"{key} unavailable: {problem}")


def rollout_availability(backend: str, gpus: Gpus) -> Availability:
    """Whether rollout backend `backend` (a name in config.ROLLOUT_BACKENDS) can run here."""
    key = f"rollout.backend={backend}"
    info = ROLLOUT_BACKENDS[backend]
    component = next((c for c in COMPONENTS.values() if c.module == info.requires), None)
    error = import_error(info.requires)
    problem = None
    if error is not None:
        label = component.label if component else info.requires
        problem = f"{label} not importable: {key} unavailable ({error})"
    if problem is None:
        check = getattr(importlib.import_module(info.module), "check_environment", None)
        try:
            if check is not None:
                check()  # e.g. trtllm: the installed version is in the supported range
        except ImportError as e:
            problem = f"{e}: {key} unavailable"
    if problem is None and info.gpu_only and not gpus.count:
        problem = f"{key} needs a CUDA GPU: unavailable on CPU"
    return Availability(key, problem is None, problem or "")


def check_config(cfg: Config, gpus: Gpus | None = None) -> list[str]:
    """Blocking problems of running `cfg` in this environment, one line each; empty when it can run.

    Checks what the config asks for against what imports and what hardware is visible: the attention spec,
    the packed attention kernel, the rollout backend, bf16 support, and that TP x PP x CP (and the
    TensorRT-LLM rollout's TP) fit the GPUs of the job. Config-internal relations are `config.validate`'s
    job, not this one's.
    """
    gpus = gpus or visible_gpus()
    problems = []
    availabilities = [
        attention_availability(cfg.model.attention, gpus),
        rollout_availability(cfg.rollout.backend, gpus),
    ]
    if cfg.model.packed_attention == "varlen":  # auto falls back to sdpa where varlen cannot run
        availabilities.append(packed_varlen_availability(gpus, cfg.model.attention))
    for availability in availabilities:
        if not availability.ok:
            problems.append(availability.reason)
    if cfg.model.context_parallel > 1:
        problems.append(f"model.context_parallel={cfg.model.context_parallel}: {CONTEXT_PARALLEL_UNSUPPORTED}")
    te = resolves_to_te(cfg.model.attention)
    if cfg.model.compile and gpus.count and te:
        problems.append("model.compile: not supported with Transformer Engine attention (use attention=sdpa)")
    if cfg.model.recompute_keep_swiglu:  # the build's check (model/megatron.py), but for megatron's version
        if not cfg.model.fusions or not gpus.count:
            problems.append("model.recompute_keep_swiglu: needs our fused SwiGLU (model.fusions on a GPU)")
        elif te:
            problems.append("model.recompute_keep_swiglu: not with Transformer Engine (its MLP has its own activation)")
    if gpus.count:
        m = cfg.model
        model_parallel = m.tensor_parallel * m.pipeline_parallel * m.context_parallel
        total = gpus.count * gpus.nodes
        if model_parallel > total:
            problems.append(
                f"model.tensor_parallel x pipeline_parallel x context_parallel = {model_parallel} is larger than "
                f"the {total} GPUs visible to this job"
            )
        if cfg.rollout.backend == "trtllm" and cfg.rollout.tensor_parallel > gpus.count:
            problems.append(
                f"rollout.tensor_parallel={cfg.rollout.tensor_parallel} is larger than the {gpus.count} GPUs "
                "of one node"
            )
        if m.params_dtype == "bf16" and not gpus.bf16:
            problems.append(f"model.params_dtype=bf16 unavailable: {gpus.names[0]} has no bf16 support")
    return problems


def versions() -> list[tuple[str, str]]:
    """(component, version) rows; a package that is installed but does not import says so."""
    import torch

    rows = [("Python", platform.python_version())]
    for name, component in COMPONENTS.items():
        version = installed_version(component)
        if version is None:
            rows.append((component.label, "not installed"))
            continue
        error = import_error(component.module) if name in ("te", "trtllm", "megatron") else None
        rows.append((component.label, version if error is None else f"{version} (does not import: {error})"))
        if name == "torch":
            cuda = torch.version.cuda or "none (CPU build)"
            rows.append(("CUDA (torch build)", cuda))
            if torch.cuda.is_available():
                rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    return rows


def capability_rows(gpus: Gpus) -> list[Availability]:
    te_error = import_error(COMPONENTS["te"].module)
    auto = "te" if te_error is None else "sdpa: Transformer Engine not importable"
    rows = [Availability("model.attention=auto", True, f"resolves to {auto}")]
    rows += [attention_availability(a, gpus) for a in ("te", "sdpa", "local", "fa4")]
    varlen = packed_varlen_availability(gpus)  # TE's and megatron's local attention refuse it
    rows.append(Availability(varlen.key, True, "with SDPA core attention") if varlen.ok else varlen)
    rows += [rollout_availability(b, gpus) for b in ROLLOUT_BACKENDS]
    if gpus.count:
        rows.append(
            Availability(f"TP x PP x CP <= {gpus.count * gpus.nodes}", True, "GPUs visible to this job")
        )
    else:
        rows.append(
            Availability("TP x PP x CP", True, "CPU: gloo processes under torchrun, any size that divides")
        )
    rows.append(Availability("context_parallel > 1", False, CONTEXT_PARALLEL_UNSUPPORTED))
    compiled = "torch.compile of every decoder layer, SDPA attention" if gpus.count else "ignored on CPU (eager)"
    rows.append(Availability("model.compile=true", True, compiled))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left.ljust(width)}  {right}" for left, right in rows)


def report(cfg: Config, config_name: str, gpus: Gpus) -> tuple[str, list[str]]:
    """The doctor's text and the blocking problems of `cfg`."""
    gpu_rows = [(f"GPU {i}", gpu_description(i)) for i in range(gpus.count)] or [
        ("GPUs", "none visible (CPU)")
    ]
    capabilities = [
        (a.key, f"ok ({a.reason})" if a.ok and a.reason else "ok" if a.ok else f"no: {a.reason}")
        for a in capability_rows(gpus)
    ]
    problems = check_config(cfg, gpus)
    verdict = [(f"config {config_name}", p) for p in problems] or [(f"config {config_name}", "can run here")]
    sections = [
        ("versions", versions()),
        ("devices", gpu_rows),
        ("what runs here", capabilities),
        ("this config", verdict),
    ]
    return "\n".join(f"{title}\n{_table(rows)}" for title, rows in sections), problems


def main(config_name: str, overrides: list[str], positional: list[str]) -> int:
    """Print the report; exit 0, or 1 when the named config has a blocking problem here."""
    cfg = load_config(config_name, overrides)
    text, problems = report(cfg, config_name, visible_gpus())
    print(text)
    return 1 if problems else 0
