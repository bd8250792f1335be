"""The whole `sftmix run` on several processes, as users launch it: torchrun with 2 processes (gloo, CPU) gives the
confidence, weights and report metrics of one process with the same global batch; a kill -9 of one rank, then the
same command again, resumes; two nodes simulated on loopback share one run directory, and node-local ones are
refused in one line. Every file of the run directory is written by the global main process alone. How and what:
docs/distributed.md ("The whole run on several processes and nodes").

Each multi-process run goes through tests/dist_run.py (sftmix.cli under torchrun, recording which process opened
which file for writing). The smoke config: 40 training examples, per-device batch 4 on 2 processes against batch 8
on one process, 5 steps per epoch, 2 epochs, checkpoints every 5 steps.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
DIST_RUN = str(ROOT / "tests" / "dist_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # this checkout first, then what was there
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir, writes, *launch, extra=(), env=None, cwd=None, check=True, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launch or ("--standalone", "--nproc_per_node", "2")),
           DIST_RUN, str(writes), "run", "--config", SMOKE, "--output_dir", str(run_dir), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**ENV, **(env or {})}, cwd=cwd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})}, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    proc = subprocess.run([sys.executable, "-m", "sftmix.cli", "run", "--config", SMOKE, "--output_dir", str(run_dir),
                           "--per_device_train_batch_size", "8"], capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    torchrun(tmp / "run", tmp / "writes")
    return tmp


def confidence(run_dir) -> dict:
    return {r["guid"]: r for r in map(json.loads, (Path(run_dir) / "confidence.jsonl").read_text().splitlines())}


def assert_same_run(got_dir, want_dir):
    """confidence.jsonl, both trained models and the report's metrics of two runs, within fp32 tolerance."""
    got, want = confidence(got_dir), confidence(want_dir)
    assert list(got) == list(want)  # same examples, same order
    assert [r["confident"] for r in got.values()] == [r["confident"] for r in want.values()]
    for key in ("confidence", "variability"):
        # fp32 sums in another order; observed <= 2.3e-5 absolute on confidences of -100..-300 (1e-7 relative)
        np.testing.assert_allclose([r[key] for r in got.values()], [r[key] for r in want.values()], rtol=1e-5,
                                   err_msg=key)
    for recipe in ("sftmix", "ntp"):
        a = load_file(Path(got_dir) / recipe / "model" / "model.safetensors")
        b = load_file(Path(want_dir) / recipe / "model" / "model.safetensors")
        assert sorted(a) == sorted(b)
        for name in a:  # observed <= 1.9e-7 relative to the tensor's largest entry
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5 * float(np.abs(b[name]).max()),
                                       err_msg=f"{recipe}: {name}")
    rows = {r["model"]: r for r in json.loads((Path(got_dir) / "report.json").read_text())["comparison"]}
    ref = {r["model"]: r for r in json.loads((Path(want_dir) / "report.json").read_text())["comparison"]}
    assert sorted(rows) == sorted(ref) == ["ntp", "sftmix", "start"]
    for model, r in ref.items():
        for key in ("heldout_nll", "heldout_ppl", "heldout_ppl_example_mean", "delta_nll_vs_start", "train_ntp_loss"):
            if r[key] is None:
                assert rows[model][key] is None
            else:  # observed <= 2e-8 relative
                assert rows[model][key] == pytest.approx(r[key], rel=1e-6, abs=1e-6), (model, key)
        assert rows[model]["n_tokens"] == r["n_tokens"]


def writers(writes_dir, run_dir) -> dict:
    """{rank: set of paths under run_dir} each process opened for writing (tests/dist_run.py's records)."""
    out = {}
    root = str(Path(run_dir).resolve())
    for f in Path(writes_dir).glob("writes-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["path"].startswith(root + os.sep):
                out.setdefault(rec["rank"], set()).add(rec["path"])
    return out


@pytest.mark.slow
def test_two_processes_equal_one_and_only_the_main_process_writes(two_processes, one_process):
    run_dir = two_processes / "run"
    assert_same_run(run_dir, one_process)
    w = writers(two_processes / "writes", run_dir)
    # On main rank 1 also wrote confidence.jsonl, the plots and reference/train_result.json (the same files twice).
    assert set(w) == {0}, {r: sorted(p)[:10] for r, p in w.items() if r}
    assert str(run_dir.resolve() / "confidence.jsonl") in w[0]
    assert not list(run_dir.glob(".shared-check*")), "the shared-directory check leaves nothing behind"


@pytest.mark.slow
def test_kill9_of_one_rank_then_rerun_on_other_nodes_resumes(two_processes, tmp_path):
    run_dir = tmp_path / "run"
    # rank 1 is SIGKILLed at step 7 of the sftmix run (checkpoint-5 is whole); torchrun then stops rank 0
    proc = torchrun(run_dir, tmp_path / "w1", env={"SFTMIX_TEST_KILL": "sftmix:7:1"}, check=False)
    assert proc.returncode != 0
    assert "Signal 9" in proc.stdout + proc.stderr or "SIGKILL" in proc.stdout + proc.stderr
    assert (run_dir / "sftmix" / "checkpoint-5").is_dir() and not (run_dir / "sftmix" / "model").exists()
    # the job restarts elsewhere: as two nodes of one process each, from other working folders
    for rc, out in nodes([run_dir, run_dir], tmp_path / "w2", tmp_path):
        assert rc == 0, out[-6000:]
    log = (run_dir / "logs" / "sftmix.log").read_text()
    assert "train:sftmix: resuming from" in log and "checkpoint-5" in log
    assert "dynamics     done already" in log
    assert_same_run(run_dir, two_processes / "run")
    assert set(writers(tmp_path / "w2", run_dir)) == {0}


def nodes(run_dirs, writes, tmp_path):
    """Two nodes of one process each, on loopback, each started in its own working folder."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir(exist_ok=True)
        procs.append(torchrun(run_dirs[rank], writes, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
                              "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                              wait=False, cwd=cwd))
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_two_nodes_share_one_run_directory(two_processes, tmp_path):
    run_dir = tmp_path / "shared" / "run"
    results = nodes([run_dir, run_dir], tmp_path / "writes", tmp_path)
    for rc, out in results:
        assert rc == 0, out[-6000:]
    assert_same_run(run_dir, two_processes / "run")
    assert set(writers(tmp_path / "writes", run_dir)) == {0}


@pytest.mark.slow
def test_node_local_run_directories_are_refused_in_one_line(tmp_path):
    # the same relative --output_dir, resolved in each node's own working folder: two different directories
    results = nodes(["run", "run"], tmp_path / "writes", tmp_path)
    for rc, out in results:
        assert rc != 0
        errors = [line for line in out.splitlines() if line.startswith("sftmix: error:")]
        assert len(errors) == 1, out[-4000:]
        assert "--output_dir run is not shared by all processes: process 1" in errors[0]
        assert "node-local run directories are not supported" in errors[0]
    assert not (tmp_path / "node1" / "run" / "data").exists()  # refused before any stage ran


@pytest.mark.slow
def test_deepspeed_on_cpu_processes_is_refused_not_dropped(tmp_path):
    # transformers' CPU branch wins over DeepSpeed's: on main the 2 processes trained as plain DDP without a word
    pytest.importorskip("deepspeed")
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}))
    proc = torchrun(tmp_path / "run", tmp_path / "writes", extra=("--deepspeed", str(ds)), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sftmix: error:")]
    assert errors and all(e == errors[0] for e in errors), proc.stderr[-3000:]
    assert f"deepspeed={ds} would be ignored: these 2 processes run on the CPU" in errors[0]
    assert not (tmp_path / "run" / "data").exists()


PAPER_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem.startswith(("llama", "mistral")))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_first_line_launches_on_one_node_and_on_several(path):
    first = path.read_text().splitlines()[0]
    one, several = first.removeprefix("# 1 node: ").split(" | N nodes: ")
    acc = one.split()[3]
    assert one == (f"accelerate launch --config_file {acc} -m sftmix.cli run --config configs/{path.name} "
                   f"--output_dir runs/{path.stem}")
    assert several == (f"sbatch --nodes N examples/slurm/sftmix.sbatch configs/{path.name} /shared/runs/{path.stem} "
                       f"{acc}")
    assert (ROOT / acc).is_file()


def test_slurm_script_is_valid_bash_and_launches_every_node():
    script = ROOT / "examples" / "slurm" / "sftmix.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needed in ("srun", '--machine_rank "$SLURM_NODEID"', '--num_machines "$SLURM_NNODES"',
                   '--node_rank "$SLURM_NODEID"', '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"', "--requeue"):
        assert needed in text, needed
