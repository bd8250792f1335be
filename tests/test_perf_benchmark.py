"""benchmarks/perf.py: the quick run prints a table then a parseable JSON line; its naive (c) loss is SFTMix's loss."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from helpers import naive_mixup_loss

from sftmix.mixup.loss import mixup_loss

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf.py"
REQUIRED = ("step_time_ratio", "peak_memory_ratio", "scoring_vs_training_throughput", "padding_fraction",
            "naive_step_time_ratio", "ideal_step_time_ratio_flops")


def load_perf():
    spec = importlib.util.spec_from_file_location("perf_benchmark", PERF)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_prints_table_and_json_last_line():
    proc = subprocess.run([sys.executable, str(PERF), "--quick"], capture_output=True, text=True, timeout=120,
                          cwd=PERF.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("sftmix ") for line in lines[:-1]), proc.stdout  # the table's SFTMix row
    result = json.loads(lines[-1])
    for key in REQUIRED:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] >= 0, (key, result[key])
    for key in REQUIRED[:3] + REQUIRED[4:]:
        assert result[key] > 0, key
    assert 0 <= result["padding_fraction"] < 1
    assert result["ideal_step_time_ratio_flops"] > 1  # Mixup adds LM-head work
    assert result["batch"] == 4 and result["seq_len"] == 128 and result["reps"] == 3
    assert result["mixed_tokens"] > 0 and "cpu" in result["device"] and result["model"]
    # every variant was timed reps times, and its peak includes its own weights and optimizer state
    assert all(len(v["all"]) == 3 for v in result["step_time_s"].values())
    assert all(result["peak_memory_bytes"][k] > result["step_extra_bytes"][k] > 0 for k in ("ntp", "sftmix", "naive"))


def test_naive_reference_loss_matches_mixup_loss_and_its_gradients():
    perf = load_perf()
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 6, 12, 8, 50
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, start in enumerate([2, 5, 3, 9, 1, 7]):  # varied prompt lengths; row 4 also has padding at the end
        labels[b, :start] = -100
    labels[4, 8:] = -100
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lam = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)

    losses, grads = [], []
    for fn in (perf.naive_batched_mixup_loss, mixup_loss, naive_mixup_loss):
        loss = fn(hidden, labels, weight, pairs, lam)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, (hidden, weight)))
    for other, other_grads in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(losses[0], other)
        for a, b in zip(grads[0], other_grads):
            torch.testing.assert_close(a, b)
