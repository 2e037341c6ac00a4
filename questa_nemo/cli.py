"""`questa-nemo <command> [--config-name NAME] [key=value ...]`: parse, build, run. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="questa-nemo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, default_cfg) in COMMANDS.items():
        p = sub.add_parser(name, help=HELP[name])
        p.add_argument("--config-name", "-c", default=default_cfg, help=f"a file under conf/ (default {default_cfg})")
        if name in ("export", "import", "data"):
            p.add_argument("args", nargs="*", help="positional arguments, then key=value overrides")
        else:
            p.add_argument("args", nargs="*", help="Hydra overrides, key=value")
    ns = parser.parse_args(argv)
    module, func, _ = COMMANDS[ns.command]
    positional = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    from questa_nemo.config import ConfigError

    try:
        fn = getattr(importlib.import_module(module), func)
        return int(fn(config_name=ns.config_name, overrides=overrides, positional=positional) or 0)
    except ConfigError as e:
        print(f"questa-nemo {ns.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
