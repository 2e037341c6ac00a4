"""The multi-GPU suite: the CPU CI's multi-rank workers (tests/dist/) rerun over NCCL on GPUs, compared with
single-rank runs of the same workers, all written to one JSON. `bash bench/multi_gpu.sh` runs it.

Parts, by the GPUs visible (CUDA_VISIBLE_DEVICES applies):
  1 GPU   NCCL with one rank: policy train step, rollouts (megatron engine with CUDA graphs, hf) before and after
          a train step + refit, 3 GRPO steps of the tiny world model through `questa-nemo train` (megatron
          backend, then hf)
  2 GPUs  + train-step parity (loss, grad norm, updated weights) at TP=2, PP=2, DP=2, PP=2 x VP=2; rollout tokens
          at TP=2, PP=2 and PP=2 x VP=2; 3 GRPO steps at TP=2, PP=2, DP=2 against one rank; the TP=2 run's checkpoint loaded
          at TP=1 (that comparison of final weights is how the GRPO runs are checked)
  4+ GPUs + TP=2 x DP=2 (train step and GRPO)
DP=2 GRPO is judged like TP=2: sampling noise is keyed per sequence and filtering takes the first kept groups
in the batch's global order, so DP=2 samples and keeps what one rank does (tests/test_dp_parity.py on CPU). On
GPUs the DP ranks decode smaller batches than one rank, so GEMMs may round differently: a flipped sample is
possible in principle (rare: it needs the noise to land within rounding of a decision boundary) and would show
as a mismatch here.

Usage: python bench/multi_gpu.py [--out FILE]   (default: $OUT/multi_gpu.json, else bench/results/)
       python bench/multi_gpu.py --cpu-ranks 2 --only rollout train_step   (the suite's own check, on CPU/gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "dist"), str(REPO)]  # the CPU tests' workers; no pytest needed

import torch  # noqa: E402
from launch import torchrun  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # the CPU tests' tolerances for a train step; diffs are recorded either way


def max_diffs(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference and largest difference beyond the tolerance, over all tensors."""
    worst_abs, worst_excess = 0.0, 0.0
    for name, r in ref.items():
        d = (ours[name].double().cpu() - r.double().cpu()).abs()
        worst_abs = max(worst_abs, float(d.max()))
        allowed = ATOL + RTOL * r.double().cpu().abs()
        worst_excess = max(worst_excess, float((d - allowed).max()))
    return {"max_abs_diff": worst_abs, "max_excess_over_tolerance": worst_excess}


class Suite:
    def __init__(self, work: Path):
        self.work, self.results = work, []
        self.hf_folder = None
        self.only: list[str] = []

    def case(self, name: str, fn, *args) -> None:
        """Run one comparison; a failure is recorded with its error and the suite goes on."""
        if self.only and not any(name.startswith(prefix) for prefix in self.only):
            return
        started = time.perf_counter()
        try:
            details = fn(*args)
            ok = bool(details.pop("ok", True))
            entry = {"name": name, "ok": ok, **details}
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the next case still runs
            entry = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-4000:],
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"})[:600], flush=True)
        self.results.append(entry)

    # ---------------------------------------------------------------------------------- train step
    def policy_step(self, tp: int, pp: int, dp: int, vp: int | None = None) -> dict:
        from policy_common import merged_weights, write_hf_folder

        if self.hf_folder is None:
            self.hf_folder = write_hf_folder(self.work / "hf")
        out = self.work / f"policy_tp{tp}_pp{pp}_dp{dp}_vp{vp}"
        out.mkdir(parents=True, exist_ok=True)
        flags = [f"--vp={vp}"] if vp else []
        torchrun("policy_worker.py", "train", f"--tp={tp}", f"--pp={pp}", f"--out={out}",
                 f"--hf-folder={self.hf_folder}", *flags, nproc=tp * pp * dp, timeout=600)
        return {"stats": json.loads((out / "stats.json").read_text()), "weights": merged_weights(out)}

    def policy_parity(self, tp: int, pp: int, dp: int, vp: int | None, ref: dict) -> dict:
        got = self.policy_step(tp, pp, dp, vp)
        s, r = got["stats"], ref["stats"]
        loss_rel = abs(s["loss"] - r["loss"]) / abs(r["loss"])
        norm_rel = abs(s["grad_norm"] - r["grad_norm"]) / abs(r["grad_norm"])
        diffs = max_diffs(got["weights"], ref["weights"])
        ok = loss_rel <= 1e-5 and norm_rel <= 1e-4 and diffs["max_excess_over_tolerance"] <= 0
        return {"ok": ok, "loss": s["loss"], "loss_rel_diff": loss_rel, "grad_norm_rel_diff": norm_rel, **diffs}

    # ---------------------------------------------------------------------------------- rollouts
    def rollouts(self, tp: int, pp: int, vp: int | None = None) -> list[dict]:
        from rollout_worker import write_scaled_hf_folder

        folder = self.work / "hf_scaled"
        if not (folder / "config.json").exists():
            write_scaled_hf_folder(folder)
        out = self.work / f"rollout_tp{tp}_pp{pp}_vp{vp}"
        out.mkdir(parents=True, exist_ok=True)
        flags = [f"--vp={vp}"] if vp else []
        torchrun("rollout_worker.py", f"--tp={tp}", f"--pp={pp}", f"--out={out}", f"--hf-folder={folder}",
                 "--cuda-graphs", *flags, nproc=tp * pp, timeout=600)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp * pp)]

    def rollout_single(self) -> dict:
        ref = self.rollouts(1, 1)[0]
        self.rollout_ref = ref
        same = all(ref["hf"][p]["greedy"] == ref["megatron"][p]["greedy"] for p in ("before", "after"))
        moved = ref["megatron"]["before"]["greedy_logprobs"] != ref["megatron"]["after"]["greedy_logprobs"]
        return {"ok": same and moved, "hf_greedy_equals_megatron": same, "refit_changed_logprobs": moved}

    def rollout_parity(self, tp: int, pp: int, vp: int | None = None) -> dict:
        ranks = self.rollouts(tp, pp, vp)
        got, ref = ranks[0], self.rollout_ref
        out = {"ranks_agree": all(r == got for r in ranks)}
        worst = 0.0
        for backend in ("megatron", "hf"):
            for phase in ("before", "after"):
                for kind in ("greedy", "sampled"):
                    out[f"{backend}_{phase}_{kind}_tokens_equal"] = got[backend][phase][kind] == ref[backend][phase][kind]
                for a_group, b_group in zip(got[backend][phase]["greedy_logprobs"], ref[backend][phase]["greedy_logprobs"]):
                    for a, b in zip(a_group, b_group):
                        if len(a) == len(b) and a:
                            worst = max(worst, float((torch.tensor(a) - torch.tensor(b)).abs().max()))
        out["greedy_logprob_max_abs_diff"] = worst
        out["ok"] = all(v for k, v in out.items() if k.endswith("_equal") or k == "ranks_agree")
        return out

    # ---------------------------------------------------------------------------------- GRPO
    def grpo_reference(self) -> dict:
        import grpo_common as g

        root = self.work / "grpo"
        self.grpo_hf = g.world_model_config(root / "model")
        self.grpo_data = root / "data"
        self.grpo_ref_dir = root / "tp1"
        self.grpo_ref = g.train(self.grpo_ref_dir, self.grpo_data, self.grpo_hf, *g.WARMUP, nproc=1)
        self.grpo_start = [f"model.checkpoint={self.grpo_ref_dir / 'warmup' / 'checkpoint'}", "train.warmup.steps=0"]
        return {"steps": self.grpo_ref}

    def grpo_run(self, name: str, overrides: list[str], nproc: int, judged: bool) -> dict:
        import grpo_common as g

        run_dir = self.work / "grpo" / name
        metrics = g.train(run_dir, self.grpo_data, self.grpo_hf, *self.grpo_start, *overrides, nproc=nproc)
        mismatches = []
        for ours, ref in zip(metrics, self.grpo_ref):
            for key, value in ref.items():
                if key.startswith(g.EXACT) and ours.get(key) != value:
                    mismatches.append((ours["step"], key, ours.get(key), value))
                elif key in g.CLOSE and (key not in ours or abs(ours[key] - value) > 1e-4 * abs(value) + 1e-7):
                    mismatches.append((ours["step"], key, ours.get(key), value))
        diffs = max_diffs(g.final_weights(run_dir, self.grpo_hf), g.final_weights(self.grpo_ref_dir, self.grpo_hf))
        ok = (not mismatches and diffs["max_excess_over_tolerance"] <= 0) if judged else True
        return {"ok": ok, "judged": judged, "mismatches": mismatches[:20], "final_weights_vs_tp1": diffs,
                "steps": metrics}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--only", nargs="*", default=[], help="run the cases whose names start with these")
    parser.add_argument("--cpu-ranks", type=int, default=0, help="no GPU: run as if there were this many (gloo)")
    args = parser.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "multi_gpu.json" if os.environ.get("OUT")
                       else REPO / "bench" / "results" / "multi_gpu.json")
    gpus = torch.cuda.device_count() or args.cpu_ranks
    if gpus < 1:
        print("bench/multi_gpu.py: no CUDA GPU visible (--cpu-ranks N checks the suite on CPU)", file=sys.stderr)
        return 2
    args.work = args.work or Path(tempfile.mkdtemp(prefix="questa_multi_gpu_"))
    args.work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.work)
    suite.only = args.only

    ref: dict = {}
    if any(n.startswith("train_step") for n in args.only) or not args.only:  # the reference the others need
        ref.update(suite.policy_step(1, 1, 1))
        suite.results.append({"name": "train_step_1gpu", "ok": True, "stats": ref["stats"]})
    if any(n.startswith("rollout") for n in args.only) and "rollout_1gpu" not in args.only:
        args.only.append("rollout_1gpu")
    if any(n.startswith("grpo") for n in args.only) and "grpo_tp1_megatron" not in args.only:
        args.only.append("grpo_tp1_megatron")
    suite.case("rollout_1gpu", suite.rollout_single)
    suite.case("grpo_tp1_megatron", suite.grpo_reference)
    suite.case("grpo_tp1_hf", lambda: {"steps": __import__("grpo_common").train(
        args.work / "grpo" / "hf", suite.grpo_data, suite.grpo_hf, *suite.grpo_start, "rollout=hf", nproc=1)})
    if gpus >= 2:
        for tp, pp, dp, vp in ((2, 1, 1, None), (1, 2, 1, None), (1, 1, 2, None), (1, 2, 1, 2)):
            suite.case(f"train_step_tp{tp}_pp{pp}_dp{dp}_vp{vp}", suite.policy_parity, tp, pp, dp, vp, ref)
        suite.case("rollout_tp2", suite.rollout_parity, 2, 1)
        suite.case("rollout_pp2", suite.rollout_parity, 1, 2)
        suite.case("rollout_pp2_vp2", suite.rollout_parity, 1, 2, 2)
        suite.case("grpo_tp2_ckpt_loaded_at_tp1", suite.grpo_run, "tp2", ["model.tensor_parallel=2"], 2, True)
        suite.case("grpo_pp2", suite.grpo_run, "pp2", ["model.pipeline_parallel=2"], 2, True)
        suite.case("grpo_dp2", suite.grpo_run, "dp2", [], 2, True)
    if gpus >= 4:
        suite.case("train_step_tp2_dp2", suite.policy_parity, 2, 1, 2, None, ref)
        suite.case("grpo_tp2_dp2", suite.grpo_run, "tp2_dp2", ["model.tensor_parallel=2"], 4, True)

    report = {
        "gpus": gpus,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "passed": sum(r["ok"] for r in suite.results),
        "failed": [r["name"] for r in suite.results if not r["ok"]],
        "results": suite.results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"bench/multi_gpu.py: {report['passed']} passed, failed: {report['failed']}; wrote {out}", flush=True)
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
