"""sftmix.confidence.callback: ConfidenceCallback on a plain transformers.Trainer; one-run SFTMix (switch, balance,
resume)."""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, interrupt_at, sigkill_script
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from sftmix.confidence.callback import ConfidenceCallback
from sftmix.confidence.scoring import score_examples
from sftmix.data import tokenize_records
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl


def make_records(n=16, seed=0):
    rng = random.Random(seed)
    words = ["fix", "the", "grammar", "write", "a", "poem", "about", "rain", "list", "three", "colors", "why"]
    return [
        {"guid": f"g{i:03d}",
         "prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}],
         "completion": [{"role": "assistant",
                         "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))}]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok_ds():
    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(make_records(16), tok)
    return tok, ds


def test_confidence_callback_on_a_plain_trainer_equals_score_examples_on_the_checkpoint(tmp_path, tok_ds):
    tok, ds = tok_ds
    cb = ConfidenceCallback(ds, tmp_path / "map", steps=[2, 4], batch_size=5)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=3e-3, save_strategy="steps", save_steps=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    train = ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")])
    trainer = Trainer(model=build_tiny_model(tok, seed=0), args=args, train_dataset=train, callbacks=[cb],
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    trainer.train()
    assert cb.scored == [1, 2]
    from transformers import AutoModelForCausalLM

    for k, step in ((1, 2), (2, 4)):
        rows = read_jsonl(tmp_path / "map" / "dynamics" / f"ckpt_{k}.jsonl")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"checkpoint-{step}", dtype=torch.float32)
        want = score_examples(model, ds, batch_size=3, show_progress=False)  # another batching: same numbers
        assert [r["guid"] for r in rows] == [r["guid"] for r in want] == list(ds["guid"])
        assert [r["n_tokens"] for r in rows] == [r["n_tokens"] for r in want]
        for got, exp in zip(rows, want):
            assert got["nll_mean"] == pytest.approx(exp["nll_mean"], abs=1e-5)
            assert got["ppl"] == pytest.approx(exp["ppl"], rel=1e-5)
    r1 = read_jsonl(tmp_path / "map" / "dynamics" / "ckpt_1.jsonl")
    r2 = read_jsonl(tmp_path / "map" / "dynamics" / "ckpt_2.jsonl")
    assert any(a["nll_mean"] != pytest.approx(b["nll_mean"], abs=1e-4) for a, b in zip(r1, r2))  # it trained



def map_run(tok, ds, out, map_dir, steps, seed=0, lr=3e-3, resume=None, **kw):
    """A 4-step plain Trainer run with a ConfidenceCallback into map_dir; returns the callback."""
    cb = ConfidenceCallback(ds, map_dir, steps=steps, batch_size=5)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=lr,
                             save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True,
                             seed=seed, **kw)
    train = ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")])
    Trainer(model=build_tiny_model(tok, seed=seed), args=args, train_dataset=train, callbacks=[cb],
            data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)).train(resume_from_checkpoint=resume)
    return cb


def test_another_run_into_the_same_folder_rescores_or_is_refused(tmp_path, tok_ds):
    """The data map's files belong to one run (its fingerprint in dynamics/schedule.json): a second training run
    into the folder rescores everything from step 0, and one resumed past a file of the other run is refused."""
    import json

    tok, ds = tok_ds
    dyn = tmp_path / "map" / "dynamics"
    map_run(tok, ds, tmp_path / "a", tmp_path / "map", [1, 2, 4], seed=0)
    first = [read_jsonl(dyn / f"ckpt_{k}.jsonl") for k in (1, 2, 3)]
    cb = map_run(tok, ds, tmp_path / "fresh", tmp_path / "fresh_map", [2, 4], seed=1)  # the same run alone
    alone = [read_jsonl(tmp_path / "fresh_map" / "dynamics" / f"ckpt_{k}.jsonl") for k in (1, 2)]
    assert cb.scored == [1, 2]

    # another seed, the same steps: before the fingerprint it scored nothing and kept the first run's files
    map_run(tok, ds, tmp_path / "b", tmp_path / "map", [1, 2, 4], seed=1)
    second = [read_jsonl(dyn / f"ckpt_{k}.jsonl") for k in (1, 2, 3)]
    assert all(a["nll_mean"] != b["nll_mean"] for a, b in zip(first[2], second[2]))
    # another schedule (2 checkpoints): rescored, and the old run's ckpt_3.jsonl is gone, not left to be mixed in
    cb = map_run(tok, ds, tmp_path / "c", tmp_path / "map", [2, 4], seed=1)
    assert cb.scored == [1, 2] and sorted(p.name for p in dyn.glob("ckpt_*")) == ["ckpt_1.jsonl", "ckpt_2.jsonl"]
    for k in (1, 2):
        got = read_jsonl(dyn / f"ckpt_{k}.jsonl")
        assert [r["guid"] for r in got] == list(ds["guid"])
        for g, w in zip(got, alone[k - 1]):
            assert g["nll_mean"] == pytest.approx(w["nll_mean"], abs=1e-5)
    sched = json.loads((dyn / "schedule.json").read_text())
    assert sched["steps"] == [2, 4] and sched["run"]["seed"] == 1 and sorted(sched["scoring"]) == ["1", "2"]
    assert len(sched["run"]["score_data_sha256"]) == 64

    # the same run resumed from its Trainer checkpoint keeps its files and scores nothing again
    cb = map_run(tok, ds, tmp_path / "c", tmp_path / "map", [2, 4], seed=1,
                 resume=str(tmp_path / "c" / "checkpoint-2"))
    assert cb.scored == []
    # resumed with another learning rate after ckpt_1 (step 2) of the other run: it cannot rescore that one
    kept = {p.name: p.read_bytes() for p in dyn.iterdir()}
    with pytest.raises(SFTMixError, match=r"another run \(learning_rate 0.003 -> 0.001\).*resumes at step 2, "
                                          r"after ckpt_1.jsonl"):
        map_run(tok, ds, tmp_path / "c", tmp_path / "map", [2, 4], seed=1, lr=1e-3,
                resume=str(tmp_path / "c" / "checkpoint-2"))
    assert {p.name: p.read_bytes() for p in dyn.iterdir()} == kept  # refused before touching anything


def test_confidence_callback_arguments_are_checked(tok_ds):
    with pytest.raises(SFTMixError, match="either steps"):
        ConfidenceCallback(tok_ds[1], "x")
    with pytest.raises(SFTMixError, match="increasing"):
        ConfidenceCallback(tok_ds[1], "x", steps=[3, 2])


def test_confidence_callback_steps_counts_and_score_data_are_checked_when_made(tmp_path, tok_ds):
    """Integral numpy / float steps are taken exactly; everything else is refused at construction in one line,
    not at the first scoring step (hours into a run)."""
    import numpy as np

    ds = tok_ds[1]
    for steps in (np.array([2, 4]), [np.int64(2), np.int32(4)], [2.0, 4.0], (2, np.float64(4.0))):
        cb = ConfidenceCallback(ds, tmp_path, steps=steps)
        assert cb.fixed_steps == [2, 4] and all(type(s) is int for s in cb.fixed_steps)
    assert ConfidenceCallback(ds, tmp_path, num_checkpoints=np.int64(3), batch_size=np.int64(4)).num_checkpoints == 3
    bad = [dict(steps=[2.5]), dict(steps=[2, float("nan")]), dict(steps=[0, 2]), dict(steps="24"), dict(steps=[True]),
           dict(steps=np.array([2.5, 4.0])), dict(num_checkpoints=0), dict(num_checkpoints=2.5),
           dict(num_checkpoints="3"), dict(steps=[2], batch_size=0), dict(steps=[2], batch_size=1.5)]
    for kw in bad:
        with pytest.raises(SFTMixError, match=r"ConfidenceCallback (steps|num_checkpoints|batch_size)") as e:
            ConfidenceCallback(ds, tmp_path, **kw)
        assert "\n" not in str(e.value), kw

    with pytest.raises(SFTMixError, match=r"score_dataset has no guid column"):
        ConfidenceCallback(ds.remove_columns("guid"), tmp_path, steps=[2])
    with pytest.raises(SFTMixError, match=r"score_dataset has no labels column"):
        ConfidenceCallback([{"input_ids": [1, 2], "guid": "a"}], tmp_path, steps=[2])
    with pytest.raises(SFTMixError, match="score_dataset has no rows"):
        ConfidenceCallback(ds.select([]), tmp_path, steps=[2])
    dup = ds.map(lambda r, i: {"guid": "g003" if i == 9 else r["guid"]}, with_indices=True)
    with pytest.raises(SFTMixError, match=r"guid 'g003' is in rows 3 and 9"):
        ConfidenceCallback(dup, tmp_path, steps=[2])
    no_resp = ds.map(lambda r, i: {"labels": [-100] * len(r["labels"]) if i == 5 else r["labels"]},
                     with_indices=True)
    with pytest.raises(SFTMixError, match=r"1 row\(s\) have no response token.*row 5 \(guid 'g005'\)"):
        ConfidenceCallback(no_resp, tmp_path, steps=[2])
    with pytest.raises(SFTMixError, match=r"1 row\(s\) have no response token.*row 0"):
        ConfidenceCallback([{"input_ids": [1], "labels": [-100], "guid": "a"}], tmp_path, steps=[2])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SFTMixError, match="ConfidenceCallback hidden_at must be None, 'last_response' or "):
        ConfidenceCallback(ds, tmp_path, steps=[2], hidden_at="first")
    with pytest.raises(SFTMixError, match="is a file, not a folder"):
        ConfidenceCallback(ds, tmp_path / "file", steps=[2])


# -- one-run SFTMix ----------------------------------------------------------------------------------------------------

ONE_RUN = dict(per_device_train_batch_size=4, num_train_epochs=3, self_reference_epochs=1, learning_rate=3e-3,
               report_to=[], logging_steps=1, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
               max_length=None)


def one_run_trainer(tok, ds, out, extra_callbacks=(), confidence="checkpoints", **kw):
    from sftmix import SFTMixConfig, SFTMixTrainer
    from sftmix.confidence.callback import SelfReferenceCallback

    online = confidence != "checkpoints"
    args = SFTMixConfig(output_dir=str(out / "sftmix"), **{**ONE_RUN, "record_online_dynamics": online, **kw})
    cb = SelfReferenceCallback(ds, out, num_checkpoints=2, batch_size=8, confidence=confidence)
    return SFTMixTrainer(model=build_tiny_model(tok, seed=0), args=args, train_dataset=ds, processing_class=tok,
                         self_reference=cb, callbacks=list(extra_callbacks)), cb


def step_logs(trainer):
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h}


@pytest.mark.parametrize("confidence", ["checkpoints", "online"])
def test_one_run_switches_to_balanced_mixup_at_the_configured_epoch(tmp_path, tok_ds, monkeypatch, confidence):
    from sftmix.mixup.sampling import OneRunSampler

    tok, ds = tok_ds  # 16 examples, batch 4: 4 steps per epoch, 12 in all; NTP epoch = steps 1..4, scored at 2 and 4
    tr, cb = one_run_trainer(tok, ds, tmp_path, confidence=confidence, save_strategy="no")
    seen = []
    real = OneRunSampler.confident_of

    def spy(self, example_idx):
        flags = real(self, example_idx)
        seen.append((self.epoch, example_idx.tolist(), None if flags is None else flags.tolist()))
        return flags

    monkeypatch.setattr(OneRunSampler, "confident_of", spy)
    tr.train()
    if confidence == "checkpoints":
        assert cb.steps == [2, 4] and cb.scored == [1, 2]
    else:  # no scoring pass: the NTP epoch's own forward, each row once, recorded at steps 0..3 (before the update)
        assert cb.scored == [] and not list((tmp_path / "dynamics").glob("ckpt_*"))
        recs = read_jsonl(tmp_path / "dynamics" / "online_records.jsonl")
        assert sorted(r["example_idx"] for r in recs) == list(range(16))
        assert sorted({r["global_step"] for r in recs}) == [0, 1, 2, 3]
        assert recs == tr.online_records  # nothing recorded after the switch
    logs = step_logs(tr)
    assert sorted(logs) == list(range(1, 13))
    assert all("mixup_loss" not in logs[s] for s in range(1, 5))  # NTP epoch: no Mixup term
    assert all("mixup_loss" in logs[s] for s in range(5, 13))
    rows = read_jsonl(tmp_path / "confidence.jsonl")
    assert len(rows) == 16 and sum(r["confident"] for r in rows) == 8
    assert ("ppl_2" in rows[0]) == (confidence == "checkpoints")  # online: one NTP epoch, ppl_1 only
    assert (tmp_path / "dynamics" / "self_split.json").exists()
    by_guid = {r["guid"]: r["confident"] for r in rows}
    guids = list(ds["guid"])
    ntp = [s for s in seen if s[0] == 0]
    assert len(ntp) == 4 and all(f is None for *_, f in ntp)
    assert sorted(i for _, idx, _ in ntp for i in idx) == list(range(16))  # an ordinary epoch: each row once
    mix = [s for s in seen if s[0] >= 1]
    assert len(mix) == 8
    for _, idx, flags in mix:  # [c, c, u, u]: the i-th confident row paired with the i-th unconfident one
        assert flags == [True, True, False, False]
        assert [by_guid[guids[i]] for i in idx] == flags


@pytest.mark.parametrize("confidence,relative", [("online_raw", False), ("online_linear", "linear")])
def test_one_run_online_variants_split_on_their_own_detrend(tmp_path, tok_ds, confidence, relative):
    """self_confidence=online_raw / online_linear (issue 27's variants): the same training-forward records as
    `online`, the split from their raw or linearly de-trended PPL; a lost confidence.jsonl is rebuilt the same way,
    not step-relative."""
    from sftmix.confidence.callback import ONLINE_DETREND, restore_self_confidence
    from sftmix.confidence.online import online_confidence_rows
    from sftmix.config import SELF_CONFIDENCE_MODES

    assert set(SELF_CONFIDENCE_MODES) == {"checkpoints", *ONLINE_DETREND}  # the setting's values, all handled
    tok, ds = tok_ds
    tr, _ = one_run_trainer(tok, ds, tmp_path, confidence=confidence, save_strategy="no")
    tr.train()
    recs = read_jsonl(tmp_path / "dynamics" / "online_records.jsonl")
    guids = list(ds["guid"])
    rows = read_jsonl(tmp_path / "confidence.jsonl")
    want = online_confidence_rows(recs, guids, relative=relative)
    rel = online_confidence_rows(recs, guids, relative=True)
    assert [r["confidence"] for r in rows] == pytest.approx([r["confidence"] for r in want])
    assert [r["confidence"] for r in rows] != pytest.approx([r["confidence"] for r in rel])  # a different ranking input
    assert [r["confident"] for r in rows] == [r["confident"] for r in want] and sum(r["confident"] for r in rows) == 8
    marker = json.loads((tmp_path / "dynamics" / "self_split.json").read_text())
    assert marker["self_confidence"] == confidence
    (tmp_path / "confidence.jsonl").unlink()
    assert restore_self_confidence(tmp_path, guids) == rows


@pytest.mark.parametrize("confidence,lose_confidence", [("checkpoints", False), ("online", False), ("online", True)])
def test_one_run_resumes_across_the_switch_as_if_uninterrupted(tmp_path, tok_ds, confidence, lose_confidence):
    from sftmix.utils import resume_checkpoint

    tok, ds = tok_ds
    ref, _ = one_run_trainer(tok, ds, tmp_path / "a", confidence=confidence, save_strategy="no")
    ref.train()
    want = {s: h["loss"] for s, h in step_logs(ref).items()}

    out = tmp_path / "b"
    kw = dict(save_strategy="steps", save_steps=1, confidence=confidence)
    tr, _ = one_run_trainer(tok, ds, out, [interrupt_at(3)], **kw)  # killed in the NTP epoch (before step 4's scores)
    with pytest.raises(Interrupt):
        tr.train()
    assert not (out / "confidence.jsonl").exists()
    if confidence == "online":  # written before checkpoint-3 was saved: the records of steps 1..3
        assert {r["global_step"] for r in read_jsonl(out / "dynamics" / "online_records.jsonl")} == {0, 1, 2}
    tr, _ = one_run_trainer(tok, ds, out, [interrupt_at(7)], **kw)  # ... and in the Mixup part
    with pytest.raises(Interrupt):
        tr.train(resume_from_checkpoint=resume_checkpoint(out / "sftmix", "test"))
    assert (out / "dynamics" / "self_split.json").exists()
    if lose_confidence:  # deleted after the switch: rebuilt from the records the switch kept, not "never seen"
        (out / "confidence.jsonl").unlink()
    tr, cb = one_run_trainer(tok, ds, out, **kw)
    tr.train(resume_from_checkpoint=resume_checkpoint(out / "sftmix", "test"))
    assert cb.scored == []  # both checkpoints were scored before (online: none ever); the split is reloaded
    got = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h and "train_runtime" not in h}
    assert sorted(got) == list(range(1, 13))  # steps 1..6 from the checkpoint's history, 7..12 trained now
    for s, v in got.items():
        assert v == pytest.approx(want[s], abs=1e-5), s
    assert read_jsonl(out / "confidence.jsonl") == read_jsonl(tmp_path / "a" / "confidence.jsonl")
    for p, q in zip(ref.model.parameters(), tr.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


@pytest.mark.parametrize("confidence", ["checkpoints", "online"])
def test_one_run_into_a_folder_of_another_run_rescores_and_splits_anew(tmp_path, tok_ds, confidence):
    """SelfReferenceCallback shares ConfidenceCallback's fingerprint in both modes: a second run (another learning
    rate) into the same folder takes its own scores or records and its own split, where it used to keep the first
    run's final split (dynamics/self_split.json); resumed past the other run's files, it is refused."""
    from sftmix.utils import resume_checkpoint

    tok, ds = tok_ds
    kw = dict(save_strategy="no", confidence=confidence)
    first, cb = one_run_trainer(tok, ds, tmp_path, **kw)
    first.train()
    old = read_jsonl(tmp_path / "confidence.jsonl")
    second, cb = one_run_trainer(tok, ds, tmp_path, learning_rate=1e-2, **kw)
    second.train()
    assert cb.scored == ([1, 2] if confidence == "checkpoints" else [])
    alone, _ = one_run_trainer(tok, ds, tmp_path / "alone", learning_rate=1e-2, **kw)
    alone.train()
    new, want = read_jsonl(tmp_path / "confidence.jsonl"), read_jsonl(tmp_path / "alone" / "confidence.jsonl")
    assert [r["guid"] for r in new] == [r["guid"] for r in want]
    for a, b in zip(new, want):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    assert any(a["confidence"] != pytest.approx(b["confidence"], abs=1e-4) for a, b in zip(new, old))

    # another learning rate resumed from the first run's checkpoint cannot redo what it resumes past: refused
    out = tmp_path / "resumed"
    kw = dict(save_strategy="steps", save_steps=1, confidence=confidence)
    tr, _ = one_run_trainer(tok, ds, out, [interrupt_at(3)], **kw)
    with pytest.raises(Interrupt):
        tr.train()
    tr, _ = one_run_trainer(tok, ds, out, learning_rate=1e-2, **kw)
    with pytest.raises(SFTMixError, match=r"holds the data map of another run \(.*learning_rate 0.003 -> 0.01"):
        tr.train(resume_from_checkpoint=resume_checkpoint(out / "sftmix", "test"))


def test_one_run_online_refuses_to_resume_without_the_records(tmp_path, tok_ds):
    """The NTP epoch's online records are part of the checkpoint: resuming without them would split on a part of the
    data only, so it stops with one line saying which steps are missing."""
    from sftmix.utils import resume_checkpoint

    tok, ds = tok_ds
    kw = dict(save_strategy="steps", save_steps=1, confidence="online")
    tr, _ = one_run_trainer(tok, ds, tmp_path, [interrupt_at(3)], **kw)
    with pytest.raises(Interrupt):
        tr.train()
    (tmp_path / "dynamics" / "online_records.jsonl").unlink()
    tr, _ = one_run_trainer(tok, ds, tmp_path, **kw)
    # interrupted in step 3's on_step_end, before its checkpoint was saved: the run resumes from checkpoint-2
    with pytest.raises(SFTMixError, match=r"online records of optimizer step\(s\) \[0, 1\] are missing.*step 2\)"):
        tr.train(resume_from_checkpoint=resume_checkpoint(tmp_path / "sftmix", "test"))
    tr, _ = one_run_trainer(tok, ds, tmp_path / "x", save_strategy="no", confidence="online",
                            record_online_dynamics=False)
    with pytest.raises(SFTMixError, match="record_online_dynamics=True"):
        tr.train()


def test_one_run_settings_are_checked(tmp_path, tok_ds):
    from sftmix import SFTMixConfig

    tok, ds = tok_ds
    with pytest.raises(SFTMixError, match="self_reference_epochs"):
        SFTMixConfig(output_dir=str(tmp_path), self_reference_epochs=1, mixup_weight=0.0, bf16=False)
    tr, _ = one_run_trainer(tok, ds, tmp_path, num_train_epochs=1, save_strategy="no")
    with pytest.raises(SFTMixError, match="num_train_epochs greater than self_reference_epochs=1"):
        tr.train()


SMOKE_ARGS = ["run", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
              "--reference", "self", "--recipes", "sftmix"]


def run_pipeline(out, kill_at=None):
    import os
    import subprocess
    import sys

    cmd = ([sys.executable, "-m", "sftmix"] if kill_at is None
           else [sys.executable, "-c", sigkill_script("sftmix", kill_at)])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd + SMOKE_ARGS + ["--output_dir", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1], env=env)


@pytest.fixture(scope="module")
def one_run_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_run") / "run"
    proc = run_pipeline(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_one_run_pipeline_writes_confidence_plots_and_a_report(one_run_pipeline):
    import json

    out = one_run_pipeline
    assert not (out / "reference").exists()  # no step 1: no second model
    train = read_jsonl(out / "data" / "train.jsonl")
    conf = read_jsonl(out / "confidence.jsonl")
    assert [r["guid"] for r in conf] == [r["guid"] for r in train] and sum(r["confident"] for r in conf) == 20
    marker = json.loads((out / "dynamics" / "self_split.json").read_text())
    assert marker["self_confidence"] == "online" and marker["steps"] == 10  # the default; 10 steps/epoch
    assert not list((out / "dynamics").glob("ckpt_*")) and marker["n_records"] == 40  # no scoring pass; 4 per step
    result = json.loads((out / "sftmix" / "train_result.json").read_text())
    assert result["confidence_source"] == "self" and result["global_step"] == 20
    logged = [h for h in result["log_history"] if "loss" in h and "train_runtime" not in h]
    assert [("mixup_loss" in h) for h in logged] == [h["step"] > 10 for h in logged] and len(logged) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["confidence"]["confidence_source"] == "self" and report["confidence"]["mode"] == "online"
    assert result["self_confidence"] == "online"
    assert "confidence_source self" in (out / "report.md").read_text()
    assert (out / "plots" / "confidence_hist.png").stat().st_size > 1000


def test_one_run_pipeline_rebuilds_a_deleted_confidence_file_from_its_records(one_run_pipeline, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(one_run_pipeline, out)
    want = read_jsonl(out / "confidence.jsonl")
    (out / "confidence.jsonl").unlink()
    proc = run_pipeline(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{out / 'confidence.jsonl'} was missing: rebuilt from {out / 'dynamics' / 'online_records.jsonl'}" in (
        proc.stderr)
    assert read_jsonl(out / "confidence.jsonl") == want
    assert "train:sftmix done already" in proc.stderr  # nothing retrained


def test_one_run_pipeline_killed_in_each_phase_resumes_to_the_same_result(one_run_pipeline, tmp_path):
    import json

    out = tmp_path / "run"
    killed = run_pipeline(out, kill_at=7)  # NTP part: after checkpoint-5 and the online records of steps 1..5
    assert killed.returncode == -9, killed.stderr[-2000:]
    recorded = {r["global_step"] for r in read_jsonl(out / "dynamics" / "online_records.jsonl")}
    assert recorded == set(range(5)) and not (out / "confidence.jsonl").exists()
    killed = run_pipeline(out, kill_at=13)  # Mixup part: the split was persisted when epoch 2 began
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "dynamics" / "self_split.json").exists()
    proc = run_pipeline(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'sftmix' / 'checkpoint-10'}" in proc.stderr

    def final(run):
        result = json.loads((run / "sftmix" / "train_result.json").read_text())
        nll = json.loads((run / "eval" / "sftmix.json").read_text())["results"]["heldout"]["nll"]
        return [h["loss"] for h in result["log_history"] if "loss" in h], nll, read_jsonl(run / "confidence.jsonl")

    (l_ref, nll_ref, c_ref), (l_res, nll_res, c_res) = final(one_run_pipeline), final(out)
    assert l_res == pytest.approx(l_ref, rel=1e-5, abs=1e-6) and len(l_ref) == 4  # logged at steps 5, 10, 15, 20
    assert nll_res == pytest.approx(nll_ref, rel=1e-5, abs=1e-6)
    assert c_res == c_ref


def test_one_run_never_reuses_a_reference_as_the_ntp_baseline(tmp_path):
    """reference=self writes dynamics/schedule.json too, but there is no reference run to stand in for NTP."""
    from pathlib import Path

    from sftmix.config import parse_config
    from sftmix.run import publish

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    argv = ["--config", smoke, "--output_dir", str(tmp_path), "--reference_epochs", "2"]
    (tmp_path / "dynamics").mkdir()
    (tmp_path / "dynamics" / "schedule.json").write_text('{"steps": [5, 10], "num_checkpoints": 2}')
    # (before the check, this schedule without step 1's max_steps was read as the reference's: a KeyError)
    assert publish.reference_ntp_checkpoint(parse_config(argv + ["--reference", "self"])) is None


def test_step1_alone_is_refused_with_reference_self(tmp_path, capsys):
    from sftmix.cli import main

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    with pytest.raises(SystemExit) as e:
        main(["dynamics", "--config", smoke, "--output_dir", str(tmp_path / "run"), "--reference", "self"])
    assert e.value.code == 2 and "reference=self has no step 1" in capsys.readouterr().err
