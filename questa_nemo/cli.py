"""`questa-nemo <command> [--config-name NAME] [--debug] [key=value ...]`: parse, build, run. Nothing else
lives here but the mapping of errors to one line on stderr and an exit code:

  2  usage and config errors, and input files that cannot be used (missing, empty, malformed, unknown format):
     one line naming the key, or the file and row (1-based; the line number for JSONL), and what to do;
  1  runtime failures (a dying worker, a full disk, a bug): one line naming the exception;
  130 interrupted (Ctrl-C).

No traceback on the terminal unless `--debug` is given (or QUESTA_DEBUG=1 is set, e.g. for torchrun-launched
ranks); a runtime failure's traceback is written to a temporary file that its line names.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, function, default config). Modules are imported lazily so that `questa-nemo doctor`
# works in a broken environment and `data` never imports torch.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("questa_nemo.data.build", "main", "data_openr1"),
    "world": ("questa_nemo.data.world", "main", "default"),
    "train": ("questa_nemo.train.recipe", "main", "default"),
    "eval": ("questa_nemo.eval.run", "main", "eval_default"),
    "export": ("questa_nemo.ckpt.export", "main", "default"),
    "import": ("questa_nemo.ckpt.export", "import_main", "default"),
    "doctor": ("questa_nemo.doctor", "main", "default"),
}

HELP = {
    "data": "build hinted prompt sets from OpenR1-shaped rows (data.inputs=...)",
    "world": "write the embedded default's small-world data set (problems, solutions, answers)",
    "train": "supervised warm-up (optional) and GRPO; resumes from train.run_dir when it holds a checkpoint",
    "eval": "pass@k of one or more checkpoints on benchmarks, or pass-rate profiles for the data filter",
    "export": "write a checkpoint as a Hugging Face folder or a .nemo archive",
    "import": "read a Hugging Face folder, .nemo archive or GGUF file into our checkpoint format",
    "doctor": "report versions, GPUs and which backends and parallel sizes this environment can run",
}

USAGE_ERROR = 2
RUNTIME_ERROR = 1
INTERRUPTED = 130


# What to do, for config errors whose message (from OmegaConf / Hydra) does not say it.
_CONFIG_HINTS = (
    ("not in '", "check the spelling; a section's keys are its dataclass fields in questa_nemo/config.py"),
    ("Cannot find primary config", "config names are the files under conf/, without .yaml"),
    (
        "Could not override",
        "check the spelling; a section's keys are its dataclass fields in questa_nemo/config.py",
    ),
)


def config_hint(message: str) -> str:
    """The message, with what to do appended when it is one of the known bare library messages."""
    for needle, hint in _CONFIG_HINTS:
        if needle in message:
            return f"{message}; {hint}"
    return message


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (not the usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: usage error: {message} (see {self.prog} --help)\n")


def _save_traceback(command: str) -> str | None:
    """Write the current exception's traceback to a temporary file (a long run need not be rerun to see it)."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix=f"questa-nemo-{command}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w") as f:
            f.write(traceback.format_exc())
        return path
    except OSError:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="questa-nemo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, _, default_cfg) in COMMANDS.items():
        p = sub.add_parser(name, help=HELP[name])
        p.add_argument(
            "--config-name", "-c", default=default_cfg, help=f"a file under conf/ (default {default_cfg})"
        )
        # SUPPRESS: `questa-nemo --debug eval` must not be reset by the subcommand's default
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback")
        if name in ("export", "import", "data"):
            p.add_argument("args", nargs="*", help="positional arguments, then key=value overrides")
        else:
            p.add_argument("args", nargs="*", help="Hydra overrides, key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    debug = ns.debug or os.environ.get("QUESTA_DEBUG", "") not in ("", "0")
    module, func, _ = COMMANDS[ns.command]
    positional = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    from questa_nemo.config import ConfigError
    from questa_nemo.errors import InputError, one_line

    prefix = f"questa-nemo {ns.command}"
    try:
        fn = getattr(importlib.import_module(module), func)
        return int(fn(config_name=ns.config_name, overrides=overrides, positional=positional) or 0)
    except ConfigError as e:
        if debug:
            raise
        print(f"{prefix}: config error: {config_hint(one_line(e))}", file=sys.stderr)
        return USAGE_ERROR
    except (InputError, FileExistsError) as e:  # FileExistsError: an output is there; the message says which
        if debug:
            raise
        print(f"{prefix}: input error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # a runtime failure: one line; the traceback goes to a file (printed with --debug)
        if debug:
            raise
        lines = [line for line in str(e).splitlines() if line.strip()]
        detail = f": {lines[0].strip()}" if lines else ""
        saved = _save_traceback(ns.command)
        where = f"traceback in {saved}" if saved else "rerun with --debug for the traceback"
        print(f"{prefix}: error: {type(e).__name__}{detail} ({where})", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
