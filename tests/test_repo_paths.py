"""Every path a tracked file cites lies inside the repository: a clone is self-contained.

The rule, for every tracked text file (git ls-files) except the recorded outputs under bench/results/:

1. `../` paths: resolved from the citing file's folder, a path with `../` must stay inside the repository and
   name a tracked file or folder. `../shared/RECIPE.md` in the README (outside the clone) fails, and so does
   the same text in questa_nemo/config.py (it would name questa_nemo/../shared/RECIPE.md, which is not here).
   `.../cache` (an ellipsis, as in "some/.../cache") is not a `../` path.
2. Home and work folders: an absolute path under /home, /root, /Users, /work or /scratch names one machine's
   (or one person's) files and fails wherever it appears. `$HOME/...` and `~/...` are fine: they mean the
   reader's own home.
3. The temp folder: `/tmp/NAME...` is allowed only when some tracked file creates /tmp/NAME itself, i.e.
   writes it in a visible write position: a redirect (`> /tmp/x`), an output flag (`--out`, `--out-dir`,
   `--target`, `-o`), `mkdir`/`mktemp`, or a shell default (`${VAR:-/tmp/x}`) of a folder the script then
   creates. A /tmp path nobody in the repository writes is a pointer to one machine's leftovers, and fails. A
   bare `/tmp` (e.g. `TMPDIR=/tmp`) is the folder itself, not a citation.
4. Everything else absolute is a system or container path that is the same on every machine of its kind and
   is allowed: /dev/null, /usr/bin/env, /etc/..., /proc/..., /opt/..., /cache or /models in container mounts
   and examples (placeholders the user replaces), URLs (a path preceded by a host name is not matched).

bench/results/ is excluded: those files are kept verbatim as evidence of past runs (logs, the config as run),
and a path in them says where that run wrote, not where a reader should look.

A line may opt out with the marker `repo-paths: allow` (e.g. a test feeding `../../etc/passwd` to a path
check); the marker makes the exception visible in review.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCLUDED_PREFIXES = ("bench/results/", "tests/test_repo_paths.py")  # this file: its examples break the rule
ALLOW_MARKER = "repo-paths: allow"

# A path must start a token: not preceded by a word character, a dot, a slash or "~" (so URLs, relative paths
# like runs/home/x and ellipses like .../cache do not match).
_START = r"(?<![\w.~/])"
UP_PATH = re.compile(_START + r"((?:\.\./)+[^\s'\"`()\[\]{}<>,;:*]*)")
HOME_WORK = re.compile(_START + r"(/(?:home|root|Users|work|scratch)(?:/[^\s'\"`()\[\]{}<>,;]*)?)(?![\w-])")
TMP_PATH = re.compile(_START + r"/tmp/([\w.+-]+)")
# Write positions that create /tmp/NAME: redirect, output flags, mkdir/mktemp, shell default "${VAR:-/tmp/x}".
TMP_WRITE = re.compile(
    r"(?:>>?|--out(?:-dir)?|--target|-o|mkdir(?:\s+-p)?|mktemp(?:\s+-d)?(?:\s+-p)?|:-)"
    r"[\s=\"']*/tmp/([\w.+-]+)"
)


def tracked_text_files(repo: Path = REPO) -> dict[str, str]:
    """{path relative to the root: text} of every tracked UTF-8 text file outside the excluded folders."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): the rule is about tracked files")
    files = {}
    for rel in filter(None, out.split("\0")):
        if rel.startswith(EXCLUDED_PREFIXES):
            continue
        p = repo / rel
        if not p.is_file():  # deleted in the work tree, not yet committed
            continue
        raw = p.read_bytes()
        if b"\0" in raw:
            continue  # binary
        try:
            files[rel] = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


def tracked_paths(files: list[str]) -> set[str]:
    """Every tracked file and every folder above one, relative to the root ("" is the root)."""
    paths = {""}
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            paths.add("/".join(parts[:i]))
    return paths


def outside_references(files: dict[str, str], all_tracked: list[str] | None = None) -> list[str]:
    """One line per citation that leaves the repository: "file:line: path (why)"."""
    known = tracked_paths(all_tracked if all_tracked is not None else list(files))
    created_tmp = {m.group(1).rstrip(".") for text in files.values() for m in TMP_WRITE.finditer(text)}
    problems = []
    for rel, text in sorted(files.items()):
        folder = os.path.dirname(rel)
        for lineno, line in enumerate(text.splitlines(), 1):
            if ALLOW_MARKER in line:
                continue
            for m in UP_PATH.finditer(line):
                cited = m.group(1).rstrip(".")
                target = os.path.normpath(os.path.join(folder, cited)) if folder else os.path.normpath(cited)
                if target == ".." or target.startswith("../"):
                    problems.append(f"{rel}:{lineno}: {cited} (leaves the repository)")
                elif target.rstrip("/") not in known and target != ".":
                    problems.append(f"{rel}:{lineno}: {cited} (resolves to {target}, which is not tracked)")
            for m in HOME_WORK.finditer(line):
                problems.append(f"{rel}:{lineno}: {m.group(1)} (a home or work folder of one machine)")
            for m in TMP_PATH.finditer(line):
                name = m.group(1).rstrip(".")  # a sentence's full stop is not part of the name
                if name not in created_tmp:
                    problems.append(f"{rel}:{lineno}: /tmp/{name} (a temp path no tracked file creates)")
    return problems


def test_no_tracked_file_cites_a_path_outside_the_repository():
    files = tracked_text_files()
    assert files, "no tracked files found"
    problems = outside_references(files)
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("rel", "text", "fails"),
    [
        ("README.md", "see (../shared/RECIPE.md)", True),  # outside the clone
        ("questa_nemo/config.py", "# the recipe (../shared/RECIPE.md)", True),  # inside, but not tracked
        ("questa_nemo/config.py", "# the recipe (../docs/recipe.md)", False),
        ("conf/optim/x.yaml", "# ../../docs/recipe.md", False),
        ("conf/optim/x.yaml", "# ../../../docs/recipe.md", True),
        ("Dockerfile", "# --mounts .../cache:/cache", False),  # an ellipsis, then a container path
        ("a.sh", "# as /work/shared/SLURM_LOCAL.md says", True),
        ("a.sh", 'COPY=${DETACH_REPO:-/root/questa_nemo_run}', True),
        ("a.sh", 'COPY=${DETACH_REPO:-$HOME/questa_nemo_run}', False),
        ("a.py", '"""format in /home/me/notes.md"""', True),
        ("a.md", "https://example.org/home/work/page", False),  # a URL, not a machine path
        ("a.md", "runs/home/x and /workspace in NGC images", False),
        ("a.sh", "exec /usr/bin/env python3 >/dev/null; ls /opt/nvidia /etc/munge", False),
        ("a.sh", 'DIR="${X:-/tmp/state}"; cat /tmp/state/env', False),  # created by the script's default
        ("a.sh", "pip list > /tmp/keep.txt && pip install -c /tmp/keep.txt .", False),
        ("a.py", "# results of my run: /tmp/run3/log.txt", True),  # nobody here writes it
        ("a.sh", "TMPDIR=/tmp mktemp -d", False),
        ("a.py", 'bad = "../../etc/passwd"  # repo-paths: allow', False),
    ],
)
def test_rule_on_examples(rel, text, fails):
    tracked = ["README.md", "docs/recipe.md", "questa_nemo/config.py", "conf/optim/x.yaml", rel]
    assert bool(outside_references({rel: text}, tracked)) == fails
