"""Step-1 scoring shared across processes: wall time of run_scoring on 2 processes against 1, same data and model.

    python benchmarks/scoring_dist.py                 # SmolLM2-135M (real weights), 96 Alpaca examples, 1 thread each
    python benchmarks/scoring_dist.py --quick         # the tiny random model (seconds; a smoke check)
    python benchmarks/scoring_dist.py --examples 200 --nproc 2 --out scoring_dist.json

Each configuration runs in its own processes (1: `python`, N: `torchrun --standalone --nproc_per_node N`, gloo on
CPU), each process with torch.set_num_threads(1) so that N processes use N cores. A worker loads the model, tokenizes
the sample (a seeded random subset of ../shared/data/alpaca_4500.json, capped at --max_length tokens), scores two
examples to warm up, waits at a barrier, and then times sftmix.confidence.scoring.run_scoring on the whole sample (its
shares
and the gather included: the time until every process holds all rows). Printed: both wall times, their ratio, each
process's share of the tokens, whether the rows of N processes equal those of one, and the machine's load average
(`os.getloadavg()`) before and after: on a shared machine the ratio is only as good as the cores were free.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ALPACA = os.path.join(ROOT, "..", "shared", "data", "alpaca_4500.json")


def worker(a) -> None:
    import random

    import torch

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    from sftmix.confidence.scoring import run_scoring
    from sftmix.data import ensure_chat_template, load_records, tokenize_records
    from sftmix.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-random" if a.quick else "smollm2", dtype="float32", device="cpu")
    ensure_chat_template(tok, "auto")
    records = load_records(a.data, on_bad="skip")  # the file has a few empty responses
    records = random.Random(0).sample(records, min(a.examples, len(records)))
    ds, _ = tokenize_records(records, tok, max_length=a.max_length)
    run_scoring(model, ds.select(range(2)), batch_size=2, show_progress=False)  # warm-up (allocator, kernels)
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    res = run_scoring(model, ds, batch_size=a.batch_size, show_progress=False, distributed=True)
    wall = time.perf_counter() - t0
    if world > 1:
        walls = [None] * world
        torch.distributed.all_gather_object(walls, wall)
        wall = max(walls)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(a.worker_out, "w") as f:
            json.dump({"wall_s": wall, "stats": res.stats, "rows": res.rows}, f)
    if world > 1:
        torch.distributed.destroy_process_group()


def launch(a, nproc: int, out: str) -> dict:
    args = [os.path.abspath(__file__), "--worker", "--worker_out", out, "--examples", str(a.examples), "--batch_size",
            str(a.batch_size), "--max_length", str(a.max_length), "--data", a.data] + (["--quick"] if a.quick else [])
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=96, help="examples scored")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--data", default=ALPACA)
    p.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2-135M")
    p.add_argument("--out", help="also write the summary JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(a, 1, os.path.join(tmp, "one.json"))
        many = launch(a, a.nproc, os.path.join(tmp, "many.json"))
    load_after = os.getloadavg()
    same = one["rows"] == many["rows"]
    summary = {
        "model": "tiny-random" if a.quick else "SmolLM2-135M-Instruct", "examples": one["stats"]["examples"],
        "tokens": one["stats"]["tokens"], "response_tokens": one["stats"]["response_tokens"],
        "batch_size": a.batch_size, "threads_per_process": 1, "nproc": a.nproc,
        "wall_s_1": round(one["wall_s"], 3), f"wall_s_{a.nproc}": round(many["wall_s"], 3),
        "ratio": round(many["wall_s"] / one["wall_s"], 3), "speedup": round(one["wall_s"] / many["wall_s"], 3),
        "tokens_per_s_1": round(one["stats"]["tokens"] / one["wall_s"], 1),
        f"tokens_per_s_{a.nproc}": round(many["stats"]["tokens"] / many["wall_s"], 1),
        "share_tokens": [p["tokens"] for p in many["stats"]["per_process"]],
        "share_response_tokens": [p["response_tokens"] for p in many["stats"]["per_process"]],
        "share_seconds": [round(p["seconds"], 3) for p in many["stats"]["per_process"]],
        "rows_identical": same, "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count(),
    }
    print(f"step-1 scoring, {summary['model']}, {summary['examples']} examples ({summary['tokens']} tokens), "
          f"batch {a.batch_size}, 1 thread per process")
    print(f"  1 process:  {one['wall_s']:.2f} s ({summary['tokens_per_s_1']:.0f} tokens/s)")
    print(f"  {a.nproc} processes: {many['wall_s']:.2f} s ({summary[f'tokens_per_s_{a.nproc}']:.0f} tokens/s), shares "
          f"{summary['share_tokens']} tokens / {summary['share_response_tokens']} response tokens")
    print(f"  ratio {a.nproc}/1 = {summary['ratio']:.3f} (speedup {summary['speedup']:.2f}x); rows identical: {same}")
    print(f"  load average before {summary['loadavg_before']}, after {summary['loadavg_after']} on {os.cpu_count()} "
          f"CPUs")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("scoring_dist"):
        main()
