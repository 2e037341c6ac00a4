"""bench/gpu_pending.sh (the unmeasured GPU work in one device call) on CPU with stand-in commands: parts run
in order, each under its own bound, chosen by name, and everything comes back in one archive."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

from stand_ins import stand_in_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_pending.sh"


def test_parts_run_by_name_and_come_back_in_one_archive(tmp_path):
    env = stand_in_env(tmp_path, nvidia_smi="echo 'stand-in GPU, 80 GiB'\n",
                       python3='echo "python3 $*"\ncase "$*" in *bench_grpo_nemorl*) exit 3;; esac\n')  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    env["OUT"] = str(out)
    result = subprocess.run(
        ["bash", str(SCRIPT), "200", "sampler_check", "grpo_varlen", "train_long"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("[gpu_pending]")]
    assert [line.split(":")[0] for line in lines[::2]] == [
        "[gpu_pending] sampler_check", "[gpu_pending] grpo_varlen", "[gpu_pending] train_long",
    ]  # fmt: skip
    assert "grpo_varlen: rc=3" in result.stdout  # a failing part is reported and the next one still runs
    assert "--packed-attention varlen" in result.stdout and "--preset long" in result.stdout
    with tarfile.open(out / "pending.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"pending.log", "sampler_check.log", "grpo_varlen.log", "train_long.log"} <= names
    assert "train_packed.log" not in names


def test_parts_that_would_start_past_the_bound_are_skipped(tmp_path):
    env = {**stand_in_env(tmp_path, nvidia_smi="echo gpu\n", python3="echo ran\n"), "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT), "40"], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "train_packed: skipped" in result.stdout and "rc=" not in result.stdout
    assert (tmp_path / "pending.tar.gz").exists()


def test_unmeasured_parts_run_first_by_default(tmp_path):
    """With no PARTS every part runs: the rows not yet run first (the realistic row against both transformers
    baselines at 8K and at 4K, at 2,048 sequences; int8 and float8 projections in bench_skinny, in the decode step at
    8 sequences of 8K and on the realistic row at 512 slots; that row alone), then the rollout rows with fused_norms on
    (fixed and realistic against paged_nofn, the recipe-length row), the fused norms' and the skinny matmul's
    three (profile_decode's new, fn and sk variants at a rollout's tail, bench_skinny, bench_rollout's
    self-check and realistic row at 512 slots with engines paged, paged_fn and paged_fnsk), then the merge's
    two (variants new and loop, engines paged and paged_loop); the training rows last (all measured since)."""
    env = {**stand_in_env(tmp_path, nvidia_smi="echo gpu\n", python3='echo "python3 $*"\n'), "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(SCRIPT), "300"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    started = [line.split(":")[0].split()[-1] for line in result.stdout.splitlines() if ": up to " in line]
    newest = ["ckpt_leftovers", "train_long_ckpt", "rollout_realistic_hf", "rollout_realistic_hf4k", "rollout_rlscale", "rollout_realistic_hf4k_static"]
    newest += ["rollout_realistic_hf_static", "rollout_rlscale_w8", "w8_skinny", "decode_w8", "rollout_w8", "rollout_realistic512"]
    first = ["rollout_fixed_norms", "rollout_recipe", "decode_norms", "skinny", "rollout_norms", "decode_merge"]
    assert started[:19] == [*newest, *first, "rollout_merge"], started
    assert len(started) == 29 and started[-3:] == ["train_layout", "train_headmajor", "train_long_compile"], started
    with tarfile.open(tmp_path / "pending.tar.gz") as archive:
        files = [m for m in archive.getmembers() if m.isfile()]
        logs = {Path(m.name).name: archive.extractfile(m).read().decode() for m in files}
    fixed = logs["rollout_fixed_norms.log"]
    assert "--engines paged_nofn,paged" in fixed and "--recipe-prompts 0" in fixed and "--new-tokens" not in fixed
    recipe = logs["rollout_recipe.log"]
    assert "--new-tokens 0" in recipe and "--realistic-prompts 0" in recipe
    hf = logs["rollout_realistic_hf.log"]
    assert "--realistic-prompts 2 --hf-realistic --hf-static" in hf and "--recipe-prompts 0" in hf
    assert "--realistic-max 4096" in logs["rollout_realistic_hf4k.log"]
    assert "--realistic-prompts 128 --batch 512" in logs["rollout_rlscale.log"]
    static = logs["rollout_realistic_hf4k_static.log"]
    assert "--realistic-max 4096 --hf-realistic --hf-static --hf-skip-plain" in static
    assert "--realistic-prompts 2 --hf-realistic --hf-static --hf-skip-plain" in logs["rollout_realistic_hf_static.log"]
    assert "--engines paged,paged_i8pd" in logs["rollout_rlscale_w8.log"]
    assert "--realistic-prompts 128 --batch 512" in logs["rollout_rlscale_w8.log"]
    assert "bench_skinny.py --no-sweep" in logs["w8_skinny.log"]
    assert "--context 8192 --cases fixed --variants new,sk,pd,skpd,i8,i8pd,f8pd" in logs["decode_w8.log"]
    w8 = logs["rollout_w8.log"]
    assert "--engines paged,paged_skpd,paged_i8pd,paged_fp8pd" in w8 and "--realistic-prompts 32 --batch 512" in w8
    assert "--preset headmajor" in logs["train_headmajor.log"]
    assert "--preset long_compile" in logs["train_long_compile.log"]
    assert "--preset long_ckpt --steps 3 --saved-sites" in logs["train_long_ckpt.log"]
    assert "bench/ckpt_leftovers.py --out" in logs["ckpt_leftovers.log"]
    norms = logs["decode_norms.log"]
    assert "profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed --variants new,fn,sk" in norms
    assert "bench_skinny.py" in logs["skinny.log"]
    rollout = logs["rollout_norms.log"]
    assert "--also-check --engines paged,paged_fn,paged_fnsk" in rollout and "--batch 512" in rollout
    assert all(f"{flag} 0" in rollout for flag in ("--hf-new-tokens", "--new-tokens", "--recipe-prompts"))
    decode = logs["decode_merge.log"]
    assert "profile_decode.py --batch 8 --samples 1 --context 8192 --cases fixed --variants new,loop" in decode
    rollout = logs["rollout_merge.log"]
    assert "--engines paged,paged_loop" in rollout
    assert all(f"{flag} 0" in rollout for flag in ("--hf-new-tokens", "--new-tokens", "--recipe-prompts"))
