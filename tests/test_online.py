"""Online per-example records (sftmix.confidence.online, sftmix.mixup.capture.record_online) are exact under every
layout: each training example recorded once per NTP epoch, at the optimizer step that trained on it, whatever the
gradient accumulation, data size, number of NTP epochs and processes; and the same rows at the same steps give the
same records.

The layouts run through tests/dist_online.py (one process, and two under torchrun with gloo)."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from helpers import tiny_records

from sftmix.confidence.online import OnlineRecords, epoch_index
from sftmix.confidence.reference import run_reference
from sftmix.data import tokenize_records
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))


def test_online_records_keep_one_record_per_epoch_and_example():
    recs = OnlineRecords([{"example_idx": 1, "global_step": 0, "epoch": 0.0}])
    assert recs.add({"example_idx": 2, "global_step": 0, "epoch": 0.0})
    assert not recs.add({"example_idx": 1, "global_step": 3, "epoch": 0.75})  # a filler of the epoch's last batch
    assert recs.add({"example_idx": 1, "global_step": 4, "epoch": 1.0})  # the next epoch: (e-1) + s/s is exactly e
    assert [(r["example_idx"], r["global_step"]) for r in recs] == [(1, 0), (2, 0), (1, 4)]
    assert [epoch_index(r) for r in recs] == [0, 0, 1]
    recs.clear()
    assert recs == [] and recs.add({"example_idx": 1, "global_step": 0, "epoch": 0.0})


def layouts(tmp_path, nproc):
    out = tmp_path / "online.json"
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable])
    proc = subprocess.run(cmd + [os.path.join(HERE, "dist_online.py"), "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {tuple(int(x) for x in key.split("/")): res for key, res in json.loads(out.read_text()).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(processes, examples, per-device batch, accumulation, NTP epochs): what the run recorded}."""
    found = {}
    for nproc in (1, 2):
        for case, res in layouts(tmp_path_factory.mktemp(f"p{nproc}"), nproc).items():
            assert res["world_size"] == nproc
            found[(nproc, *case)] = res
    return found


def test_every_example_is_recorded_once_per_ntp_epoch_at_the_step_that_trained_it(runs):
    assert len(runs) == 32  # 16 layouts x {1, 2} processes
    for (nproc, n, per_device, ga, ntp_epochs), res in runs.items():
        where = f"{nproc} process(es), {n} examples, batch {per_device} x accumulation {ga}, {ntp_epochs} NTP epochs"
        global_batch = per_device * ga * nproc
        want = {}
        for epoch, order in enumerate(res["orders"]):
            assert len(order) % (per_device * nproc) == 0 and len(order) >= n, where  # the sampler fills whole batches
            first = {}
            for pos, i in enumerate(order):
                first.setdefault(i, pos)
            assert sorted(first) == list(range(n)), where
            for i, pos in first.items():  # the step of the window that holds the example's first row of the epoch
                want[(epoch, i)] = epoch * res["steps_per_epoch"] + pos // global_batch
        got = {(epoch_index(r), r["example_idx"]): r["global_step"] for r in res["records"]}
        assert len(res["records"]) == len(got) == n * ntp_epochs, where  # once per epoch and example, no more
        assert got == want, where
        conf = res["confidence"]
        assert len(conf) == n and sum(r["confident"] for r in conf) == n // 2, where  # every example, median split
        assert all(r[f"ppl_{e + 1}"] is not None for r in conf for e in range(ntp_epochs)), where


def test_the_same_rows_at_the_same_steps_give_the_same_records_with_or_without_accumulation(runs):
    # 31 examples fill 32 rows per epoch under every layout: runs of one global batch train the same rows at the same
    # steps, so accumulation (and a second process) must not change what is recorded, nor the split.
    groups = defaultdict(list)
    for (nproc, n, per_device, ga, ntp_epochs), res in runs.items():
        if n == 31:
            groups[(per_device * ga * nproc, ntp_epochs)].append(((nproc, per_device, ga), res))
    assert sorted(len(g) for g in groups.values()) == [2, 2, 3, 3, 5, 5]  # global batch 4, 16 and 8; 1 and 2 epochs
    for (global_batch, ntp_epochs), members in groups.items():
        (ref_layout, ref), *others = members
        key = [(r["example_idx"], r["global_step"], epoch_index(r)) for r in ref["records"]]
        for layout, res in others:
            where = f"global batch {global_batch}, {ntp_epochs} NTP epochs: {layout} vs {ref_layout}"
            assert sorted(key) == sorted((r["example_idx"], r["global_step"], epoch_index(r))
                                         for r in res["records"]), where
            got = {(r["example_idx"], epoch_index(r)): r["nll_mean"] for r in res["records"]}
            want = {(r["example_idx"], epoch_index(r)): r["nll_mean"] for r in ref["records"]}
            np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=1e-4,
                                       err_msg=where)  # fp32 sums in another order
            assert [r["guid"] for r in res["confidence"]] == [r["guid"] for r in ref["confidence"]], where
            assert [r["confident"] for r in res["confidence"]] == [r["confident"] for r in ref["confidence"]], where
            np.testing.assert_allclose([r["confidence"] for r in res["confidence"]],
                                       [r["confidence"] for r in ref["confidence"]], rtol=1e-4, err_msg=where)


def test_two_run_online_reference_under_gradient_accumulation_records_every_example(tmp_path):
    # step 1's online-only mode (the two-run recipe's confidence_mode: online): 14 examples, batch 4 x accumulation
    # 2, 2 epochs: the last window of each epoch is a micro-batch of 4 rows and one of 2, fetched together
    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(tiny_records(14, seed=5, with_confidence=False), tok)
    rows = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path, confidence="online_only",
                         num_train_epochs=2, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, num_checkpoints=4, learning_rate=3e-3, show_progress=False,
                         seed=1)
    assert [r["guid"] for r in rows] == list(ds["guid"])
    recs = read_jsonl(tmp_path / "dynamics" / "online_records.jsonl")
    assert sorted((epoch_index(r), r["example_idx"]) for r in recs) == [(e, i) for e in (0, 1) for i in range(14)]
    # 4 micro-batches per epoch -> optimizer steps of 8 and 6 rows
    assert sorted(np.bincount([r["global_step"] for r in recs]).tolist()) == [6, 6, 8, 8]


def test_a_resumed_online_reference_has_the_records_of_its_checkpoint_or_refuses(tmp_path):
    from helpers import Interrupt, interrupt_at

    from sftmix.utils import SFTMixError

    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(tiny_records(12, seed=6, with_confidence=False), tok)
    kw = dict(confidence="online_only", num_train_epochs=2, per_device_train_batch_size=4,
              num_checkpoints=2, learning_rate=3e-3, show_progress=False, seed=1, save_strategy="steps", save_steps=2)
    want = run_reference(build_tiny_model(tok, seed=0), tok, ds, tmp_path / "whole", **kw)
    # 3 steps per epoch; killed at the end of step 4 after its records were written, before checkpoint-4 was saved:
    # the rerun resumes from checkpoint-2 and trains (and records) steps 3 and 4 again
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_reference(build_tiny_model(tok, seed=0), tok, ds, run, callbacks=[interrupt_at(4)], **kw)
    assert {r["global_step"] for r in read_jsonl(run / "dynamics" / "online_records.jsonl")} == {0, 1, 2, 3}
    got = run_reference(build_tiny_model(tok, seed=0), tok, ds, run, **kw)
    assert [r["confident"] for r in got] == [r["confident"] for r in want]
    np.testing.assert_allclose([r["confidence"] for r in got], [r["confidence"] for r in want], rtol=1e-5)

    lost = tmp_path / "lost"  # the records of a checkpoint gone: one line, not a split on part of the data
    with pytest.raises(Interrupt):
        run_reference(build_tiny_model(tok, seed=0), tok, ds, lost, callbacks=[interrupt_at(4)], **kw)
    (lost / "dynamics" / "online_records.jsonl").unlink()
    with pytest.raises(SFTMixError, match=r"online records of optimizer step\(s\) \[0, 1\] are missing.*\(step 2\)"):
        run_reference(build_tiny_model(tok, seed=0), tok, ds, lost, **kw)
