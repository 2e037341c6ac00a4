"""pyproject.toml's megatron-core pin is what bench/megatron_versions.sh proved: every version that passed is
admitted, every version that failed is not (bench/results/megatron_versions.json, docs/install.md's table)."""

import json
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "megatron_versions.json"


def pin():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "megatron-core")


def test_the_pin_admits_exactly_the_versions_that_passed():
    results = json.loads(RESULTS.read_text())
    spec = pin().specifier
    passed = sorted({r["version"] for r in results if r["status"] == "PASS"})
    failed = sorted({r["version"] for r in results if r["status"] == "FAIL"})
    assert passed, "no version passed"
    assert [v for v in passed if not spec.contains(v, prereleases=True)] == [], f"{spec} rejects a passing version"
    assert [v for v in failed if spec.contains(v, prereleases=True)] == [], f"{spec} admits a failing version"


def test_the_table_in_docs_lists_every_version_tried():
    doc = (REPO / "docs" / "install.md").read_text()
    for r in json.loads(RESULTS.read_text()):
        assert f"| {r['version']} |" in doc and r["status"] in doc


def test_the_installed_version_builds_our_layer_spec():
    from questa_nemo.config import ModelConfig
    from questa_nemo.model import mcore_compat
    from questa_nemo.model.linear import ColumnLinear
    from questa_nemo.model.megatron import layer_spec

    spec = layer_spec(ModelConfig(attention="sdpa", params_dtype="fp32"))
    assert spec.submodules.self_attention.submodules.linear_qkv is ColumnLinear
    assert pin().specifier.contains(mcore_compat.MCORE_VERSION, prereleases=True)
