"""benchmarks/gpu_check.py on CPU: the quick run passes every check and prints a table then a JSON last line; a
deliberately broken mixup_loss, or tolerances of 0, make it report failures (so `correct` can be false)."""

import json
import math
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
KEYS = ("device", "correct", "failures", "step_time_ratio", "peak_memory_ratio", "scoring_vs_training_throughput")


def run(*args, timeout=170):
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--quick", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=CHECK.parents[1])
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return proc, lines, json.loads(lines[-1])


def test_quick_cpu_run_is_correct_and_reports_the_figures():
    proc, lines, result = run()
    assert proc.returncode == 0, (result.get("failures"), proc.stderr[-3000:])
    for key in KEYS:
        assert key in result, key
    assert result["correct"] is True and result["failures"] == []
    assert result["device"].startswith("cpu")
    # every part ran: each check family is in the table and in the JSON, and all passed
    names = [r["check"] for r in result["checks"]]
    for family in ("mixup_loss fp32", "mixup_loss fp32 autocast", "mixup_loss bf16", "sft equivalence fp32",
                   "sftmix: backbone forwards per step", "loss vs full logits fp32", "scoring fp32",
                   "guard: NaN Mixup loss", "guard: inf gradient", "e2e: report.json", "e2e: sftmix model saved"):
        assert any(n.startswith(family) for n in names), family
        assert any(line.startswith(family) for line in lines[:-1]), family
    assert all(r["ok"] for r in result["checks"])
    measured = [r for r in result["checks"] if r["error"] is not None]
    assert len(measured) >= 15 and all(0 <= r["error"] <= r["tolerance"] for r in measured)
    # sane cost figures at the tiny shape (its timings are noisy; only their kind is checked)
    for key in ("step_time_ratio", "peak_memory_ratio", "scoring_vs_training_throughput"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and 0.2 < result[key] < 50, key
    tiny = result["speed"]["tiny"]
    assert tiny["batch"] == 4 and tiny["seq_len"] == 128 and tiny["reps"] == 3
    assert all(len(v["all"]) == 3 for v in tiny["step_time_s"].values())
    assert tiny["peak_memory_bytes"]["sftmix"] > tiny["step_extra_bytes"]["sftmix"] > 0
    assert 1 < tiny["ideal_step_time_ratio_flops"] < 1.5 and tiny["tokens"]["mixed"] > 0
    assert 0 < tiny["ntp_mfu"] and tiny["matmul_tflops"] > 0 and tiny["gradient_checkpointing"] is True
    assert result["e2e"]["exit"] == 0
    # 2 minutes is the budget on an idle machine (docs/results.md); allow for the shared development machine's load
    assert result["wall_s"] < 240


def test_a_broken_mixup_loss_is_reported_as_failures():
    proc, lines, result = run("--skip", "speed,e2e", "--inject-fault", "mixup")
    assert proc.returncode == 1
    assert result["correct"] is False and result["inject_fault"] == "mixup"
    failed = {r["check"] for r in result["checks"] if not r["ok"]}
    # mixup_loss 10% too large: caught against the fp64 reference (value and gradients, every precision) and against
    # the trainer's independent full-logits loss; the checks that do not use it still pass
    for name in ("mixup_loss fp32: loss", "mixup_loss fp32: grad hidden", "mixup_loss bf16: grad W",
                 "loss vs full logits fp32: step loss", "loss vs full logits fp32: logged mixup_loss"):
        assert name in failed, name
    assert any(f.startswith("mixup_loss fp32: loss: error") for f in result["failures"])
    assert not any(n.startswith(("sft equivalence", "scoring", "guard")) for n in failed), failed
    assert any("NO" in line for line in lines[:-1])  # the table shows it too
