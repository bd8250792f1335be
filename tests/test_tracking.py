"""`report_to` on every stage (sftmix.tracking): a smoke run with `--report_to tensorboard`, its event files read back
with TensorBoard's own reader: one run per stage, NTP and Mixup losses per recipe, step 1's points, eval results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _scalars(run_dir: Path) -> dict:
    """{tracker run: {tag: [(step, value)]}} from every event file under run_dir."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir))
    mux.Reload()
    return {run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
            for run, tags in mux.Runs().items()}


@pytest.mark.slow
def test_tensorboard_events_of_a_smoke_run_hold_each_recipes_losses(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sftmix", "run", "--config", "smoke", "--output_dir", str(out),
                           "--report_to", "tensorboard"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _scalars(out)
    # one tracker run per stage, named by its folder in the run directory
    assert set(runs) == {"reference/tensorboard", "sftmix/tensorboard", "ntp/tensorboard", "eval/start/tensorboard"}
    for recipe in ("sftmix", "ntp"):
        history = json.loads((out / recipe / "train_result.json").read_text())["log_history"]
        logged = [(h["step"], h) for h in history if "ntp_loss" in h]
        assert len(logged) >= 2
        # the same numbers the Trainer logged, at the same steps (float32 in the event file)
        assert runs[f"{recipe}/tensorboard"]["train/ntp_loss"] == [
            (s, pytest.approx(h["ntp_loss"], rel=1e-6)) for s, h in logged]
        heldout = json.loads((out / "eval" / f"{recipe}.json").read_text())["results"]["heldout"]
        last = json.loads((out / recipe / "train_result.json").read_text())["global_step"]
        assert runs[f"{recipe}/tensorboard"]["eval/heldout_nll"] == [(last, pytest.approx(heldout["nll"], rel=1e-6))]
    mixup = runs["sftmix/tensorboard"]["train/mixup_loss"]
    assert len(mixup) >= 2 and all(v > 0 for _, v in mixup)
    assert "train/mixup_loss" not in runs["ntp/tensorboard"]  # the NTP baseline has no Mixup term
    # step 1: the mean perplexity at each of the C scoring steps of the reference, then its split
    ref = runs["reference/tensorboard"]
    steps = json.loads((out / "dynamics" / "schedule.json").read_text())["steps"]
    assert [s for s, _ in ref["train/step1_mean_ppl"]] == steps
    assert ref["train/step1_n_confident"] == [(steps[-1], 20.0)] and ref["train/step1_n_unconfident"][0][1] == 20.0
    assert runs["eval/start/tensorboard"]["eval/heldout_nll"][0][0] == 0


@pytest.mark.slow
def test_trackio_offline_gets_one_run_per_stage_with_the_losses(tmp_path):
    """trackio (local, no account) where it is installed: its SQLite file holds a run per stage, the eval results in
    the recipe's own run (resumed by name)."""
    pytest.importorskip("trackio")
    import sqlite3

    out = tmp_path / "trk"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sftmix", "run", "--config", "smoke", "--output_dir", str(out),
                           "--report_to", "trackio"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "trackio" / "trk.db")  # the project: the run directory's name
    logged = {}
    for run, metrics in db.execute("select run_name, metrics from metrics"):
        for key in json.loads(metrics):
            logged.setdefault(run, set()).add(key)
    assert {"trk/reference", "trk/sftmix", "trk/ntp", "trk/start"} <= set(logged)
    assert {"train/ntp_loss", "train/mixup_loss", "eval/heldout_nll"} <= logged["trk/sftmix"]
    assert "train/ntp_loss" in logged["trk/ntp"] and "train/mixup_loss" not in logged["trk/ntp"]
    assert "train/step1_mean_ppl" in logged["trk/reference"] and "eval/heldout_nll" in logged["trk/start"]
