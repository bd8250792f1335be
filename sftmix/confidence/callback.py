"""Trainer callbacks: a data map for any SFT run, and the confidence of one-run SFTMix.

    from sftmix.confidence.callback import ConfidenceCallback, SelfReferenceCallback
    cb = ConfidenceCallback(tokenized_ds, "out", num_checkpoints=3, batch_size=16)   # or steps=[10, 20, 30]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])  # any Trainer
    trainer.train()          # -> out/dynamics/ckpt_{1..3}.jsonl (guid, nll_mean, n_tokens, ppl), schedule.json
    rows = sftmix.confidence.reference.build_confidence("out", 3)  # -> out/confidence.jsonl (confidence, split)

    # one-run SFTMix: NTP for self_reference_epochs while this scores the data, then Mixup on its split
    cb = SelfReferenceCallback(tokenized_ds, "out", num_checkpoints=2)
    trainer = SFTMixTrainer(model=m, args=SFTMixConfig(..., self_reference_epochs=1), train_dataset=ds,
                            self_reference=cb)

`score_dataset` is tokenized with labels (-100 outside the response) and a guid column (sftmix.data.tokenize_records).
Scoring is sftmix.confidence.scoring.run_scoring (the scorer of step 1) at the end of the chosen optimizer steps, on
the model
as it is after that step's update; every process takes part (each scores a share), the main process writes, each
file atomically. A checkpoint whose file exists is not scored again, so a resumed run only scores what is missing.

Which run the files are of: dynamics/schedule.json holds the run's fingerprint (the score data's guids in order as a
sha256, the seed, the batch, learning rate, epochs and steps, the scoring steps, the model's name). A later training
run into the same folder with another fingerprint rescores from scratch (the old run's ckpt_*.jsonl are removed, with
a warning) when it starts at step 0; resumed from a Trainer checkpoint past files of the old run, which it cannot
rescore, it is refused in one line. The arguments and the score data (columns, duplicate guids, rows without a
response token) are checked when the callback is made, not at the first scoring step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from sftmix.confidence.reference import (
    build_confidence,
    online_confidence_rows,
    save_online_records,
    saved_online_records,
    scoring_steps,
)
from sftmix.confidence.scoring import run_scoring
from sftmix.mixup.args import one_run_problem
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


class ConfidenceCallback(TrainerCallback):
    """Per-example response perplexity of `score_dataset` at chosen optimizer steps, into
    `out_dir/dynamics/ckpt_{k}.jsonl` (the guid-keyed rows of step 1: guid, nll_mean, n_tokens, ppl).

    Give the steps (`steps=[...]`, 1-based optimizer steps) or `num_checkpoints=C`: checkpoint k at the end of step
    ceil(k*T/C) of the run's T steps (as step 1 schedules them). dynamics/schedule.json records the steps and the
    run's fingerprint: another run into the same folder rescores from step 0, or is refused when it resumes past a
    file of the other run; the two are never mixed (see the module docstring)."""

    def __init__(self, score_dataset, out_dir, steps: list[int] | None = None, num_checkpoints: int | None = None,
                 batch_size: int = 16, show_progress: bool = False):
        if (steps is None) == (num_checkpoints is None):
            raise SFTMixError("ConfidenceCallback needs either steps=[...] or num_checkpoints=C (not both).")
        name = type(self).__name__
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
                raise SFTMixError(f"{name} steps must be a list of optimizer steps, e.g. steps=[10, 20]; got "
                                  f"{steps!r}.")
            steps = [_whole(f"{name} steps", s) for s in steps]
            if not steps or sorted(set(steps)) != steps:
                raise SFTMixError(f"{name} steps must be increasing optimizer steps >= 1; got {steps}.")
        if num_checkpoints is not None:
            num_checkpoints = _whole(f"{name} num_checkpoints", num_checkpoints)
        self.score_dataset = score_dataset
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "dynamics"
        self.fixed_steps = steps
        self.num_checkpoints = num_checkpoints
        self.batch_size = _whole(f"{name} batch_size", batch_size)
        self.show_progress = show_progress
        self.steps: list[int] = []
        self.schedule: dict = {}
        self.scored: list[int] = []  # checkpoints scored by this process (k), for tests and logs
        for path in (self.out_dir, self.dir):
            if path.exists() and not path.is_dir():
                raise SFTMixError(f"{name}: {path} is a file, not a folder; give another out_dir.")
        self.data_sha256 = _check_score_dataset(score_dataset, name)

    def ckpt_path(self, k: int) -> Path:
        return self.dir / f"ckpt_{k}.jsonl"

    def schedule_steps(self, args, state) -> list[int]:
        """The optimizer steps to score at (called at the start of training, when max_steps is known)."""
        if self.fixed_steps is not None:
            return self.fixed_steps
        return scoring_steps(state.max_steps, self.num_checkpoints)

    def fingerprint(self, args, state, model) -> dict:
        """What makes two runs the same for this data map: the score data, the training run, the scoring steps."""
        return {"score_data_sha256": self.data_sha256, "num_examples": len(self.score_dataset),
                "model": getattr(getattr(model, "config", None), "_name_or_path", None), "seed": args.seed,
                "data_seed": args.data_seed, "learning_rate": args.learning_rate,
                "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
                * args.world_size, "num_train_epochs": args.num_train_epochs, "max_steps": state.max_steps,
                "steps": self.steps}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = self.schedule_steps(args, state)
        if self.steps[-1] > state.max_steps:
            raise SFTMixError(f"ConfidenceCallback: scoring step {self.steps[-1]} is past the run's last step "
                              f"({state.max_steps}); choose steps <= {state.max_steps}.")
        run = self.fingerprint(args, state, model)
        sched = {"steps": self.steps, "num_checkpoints": len(self.steps), "num_examples": len(self.score_dataset),
                 "run": run}
        path = self.dir / "schedule.json"
        old = self._check_run(run, state)
        if old.get("run") == run:
            sched = {**old, **sched}  # the same run, resumed or restarted: keep what it scored
        lost = [k for k, s in enumerate(self.steps, 1) if s <= state.global_step and not self.ckpt_path(k).exists()]
        if lost:  # the weights of those steps are gone: resuming would silently leave holes in the data map
            raise SFTMixError(f"{self.dir}: checkpoint(s) {lost} (step(s) {[self.steps[k - 1] for k in lost]}) were "
                              f"never scored and training resumes after them (step {state.global_step}); resume from "
                              f"an earlier Trainer checkpoint, or delete {self.dir} and train from the start.")
        self.schedule = sched
        if state.is_world_process_zero:
            atomic_write_json(path, sched)

    def _check_run(self, run: dict, state) -> dict:
        """The schedule.json of dynamics/; files of another run (or without a fingerprint) are never kept beside
        this run's (_replace_other_run)."""
        path = self.dir / "schedule.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("run") != run:
            self._replace_other_run(old, run, state.global_step, state.is_world_process_zero)
        return old

    def _replace_other_run(self, old: dict, run: dict, step: int, main: bool) -> None:
        """dynamics/ holds files of another run: remove them to rescore, unless this run resumes past one of them
        (its weights are gone, so it could only be kept, mixing the two runs)."""
        old_run = old.get("run") or {}
        diff = ", ".join(f"{k} {old_run.get(k)!r} -> {v!r}" for k, v in run.items() if old_run.get(k) != v)
        old_steps = old.get("steps") or []
        records = self.dir / "online_records.jsonl"  # one-run SFTMix's online records: never re-recorded either
        files = sorted(self.dir.glob("ckpt_*.jsonl")) + ([records] if records.exists() else [])
        stuck = [p.name for p in files if step > 0 and (p == records or _ckpt_step(p, old_steps) <= step)]
        if stuck:
            raise SFTMixError(f"{self.dir} holds the data map of another run ({diff or 'no fingerprint'}), and this "
                              f"one resumes at step {step}, after {', '.join(stuck)}, which it cannot rescore: resume "
                              f"with that run's settings, or use another out_dir (or delete {self.dir} and train from "
                              f"the start).")
        stale = files + [p for p in (self.dir / "self_split.json",) if p.exists()]
        if stale:
            logger.warning("%s holds the data map of another run (%s): removing its %s and rescoring", self.dir,
                           diff or "no fingerprint", ", ".join(p.name for p in stale))
        if main:
            for p in stale:
                p.unlink(missing_ok=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        k = self.steps.index(state.global_step) + 1
        if self.ckpt_path(k).exists():
            return  # scored before an interruption
        res = run_scoring(model, self.score_dataset, batch_size=self.batch_size,
                          desc=f"scoring checkpoint {k}/{len(self.steps)}", show_progress=self.show_progress)
        self.scored.append(k)
        if state.is_world_process_zero:
            write_jsonl(self.ckpt_path(k), res.rows)
            self.schedule.setdefault("scoring", {})[str(k)] = {"step": state.global_step, **res.stats}
            atomic_write_json(self.dir / "schedule.json", self.schedule)


def _whole(name: str, value) -> int:
    """A whole number >= 1 from an int, a numpy integer or an integral float (2.0); anything else is refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:
        raise SFTMixError(f"{name}: {value!r} is not a whole number >= 1; give optimizer steps / counts as integers.")
    return int(value)


def _ckpt_step(path: Path, steps: list) -> float:
    """The optimizer step a ckpt_{k}.jsonl of a schedule was scored at (inf when the schedule does not say)."""
    k = path.stem.split("_")[1]
    return steps[int(k) - 1] if k.isdigit() and 1 <= int(k) <= len(steps) else math.inf


def _check_score_dataset(ds, name: str) -> str:
    """Refuse a score dataset the scorer would stop on hours later (missing columns, no rows, duplicated guids, rows
    without a response token); return the sha256 of its guids in order (the data part of the run's fingerprint)."""
    from sftmix.confidence.scoring import check_score_columns

    check_score_columns(ds, f"{name} score_dataset")
    if len(ds) == 0:
        raise SFTMixError(f"{name} score_dataset has no rows; give the tokenized training examples.")
    guids = list(ds["guid"]) if hasattr(ds, "column_names") else [r["guid"] for r in ds]
    first: dict = {}
    for i, g in enumerate(guids):
        if g in first:
            raise SFTMixError(f"{name} score_dataset: guid {g!r} is in rows {first[g]} and {i}; each example needs "
                              f"its own guid (sftmix.data.load_records suffixes repeated examples) - deduplicate it.")
        first[g] = i
    empty = _rows_without_response(ds)
    if empty:
        raise SFTMixError(f"{name} score_dataset: {len(empty)} row(s) have no response token (all labels -100), e.g. "
                          f"row {empty[0]} (guid {guids[empty[0]]!r}); drop them (sftmix.data.tokenize_records does).")
    return hashlib.sha256("\n".join(map(str, guids)).encode()).hexdigest()


def _rows_without_response(ds) -> list[int]:
    if not hasattr(ds, "select_columns"):
        return [i for i, r in enumerate(ds) if all(t == -100 for t in r["labels"])]
    import pyarrow.compute as pc  # datasets.Dataset: through Arrow, batch by batch (no Python list of all labels)

    out, start = [], 0
    for tbl in ds.select_columns(["labels"]).with_format("arrow").iter(batch_size=4096):
        col = tbl["labels"].combine_chunks()
        keep = pc.not_equal(pc.list_flatten(col), -100).to_numpy(zero_copy_only=False)
        n_resp = np.bincount(pc.list_parent_indices(col).to_numpy()[keep], minlength=len(col))
        out.extend(int(i) + start for i in np.flatnonzero(n_resp == 0))
        start += len(col)
    return out


# self_confidence's online modes -> what sftmix.confidence.reference.online_confidence subtracts from each record's NLL
ONLINE_DETREND = {"online": "step", "online_raw": False, "online_linear": "linear"}


class SelfReferenceCallback(ConfidenceCallback):
    """One-run SFTMix's confidence, from the first `args.self_reference_epochs` epochs of the target's own NTP
    training; at the switch to Mixup, `self_split` writes out_dir/confidence.jsonl (paper eq. 1 and the median split
    of sftmix.confidence.split) and then the marker dynamics/self_split.json. A resumed run reloads that split.

    confidence="online" (free; needs record_online_dynamics=True in the training arguments): each example's response
    NLL from the training forward of those epochs (the trainer's `online_records`), relative to the mean of its
    optimizer step (sftmix.confidence.reference.online_confidence(relative=True)); the records are written to
    dynamics/online_records.jsonl before each Trainer checkpoint and restored on resume. confidence="online_raw":
    the same records without the step-relative correction; "online_linear": less a line fitted over the steps
    instead of each step's mean (variants, compared in benchmarks/quality_parts.py).
    confidence="checkpoints": C scoring passes spread over those epochs (checkpoint k at step ceil(k*T_E/C), T_E the
    last step of those epochs), as ConfidenceCallback scores, then sftmix.confidence.reference.build_confidence.

    The SFTMix trainer is given this callback as `self_reference=` (sftmix.mixup.mixin.SFTMixMixin): it adds it to its
    callbacks and binds itself as `callback.trainer`."""

    def __init__(self, score_dataset, out_dir, num_checkpoints: int = 2, batch_size: int = 16,
                 show_progress: bool = False, confidence: str = "online"):
        if confidence not in ("checkpoints", *ONLINE_DETREND):
            raise SFTMixError(f"SelfReferenceCallback confidence must be one of checkpoints, "
                              f"{', '.join(ONLINE_DETREND)}; got "
                              f"{confidence!r}.")
        super().__init__(score_dataset, out_dir, num_checkpoints=num_checkpoints, batch_size=batch_size,
                         show_progress=show_progress)
        self.confidence = confidence
        self.trainer = None  # set by SFTMixMixin: its online_records are the online mode's input
        self.ntp_steps = 0

    @property
    def marker(self) -> Path:
        return self.dir / "self_split.json"

    @property
    def records_path(self) -> Path:
        return self.dir / "online_records.jsonl"

    def _ntp_steps(self, args, state) -> int:
        epochs = getattr(args, "self_reference_epochs", 0) or 0
        # the same rules (and words) as sftmix.run.validation checks before a `sftmix run` starts
        problem = one_run_problem(epochs, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
                                  what="SelfReferenceCallback (one-run SFTMix)")
        if problem:
            raise SFTMixError(problem)
        # integral epochs: the Trainer's max_steps is epochs * (optimizer steps per epoch) exactly
        return state.max_steps * int(epochs) // int(args.num_train_epochs)

    def schedule_steps(self, args, state) -> list[int]:
        return scoring_steps(self._ntp_steps(args, state), self.num_checkpoints)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.confidence == "checkpoints":
            return super().on_train_begin(args, state, control, **kwargs)
        self.ntp_steps = self._ntp_steps(args, state)
        if not getattr(args, "record_online_dynamics", False):
            raise SFTMixError("SelfReferenceCallback(confidence='online') reads the NTP epochs' own per-example NLL: "
                              "set record_online_dynamics=True in the training arguments (or use "
                              "confidence='checkpoints').")
        if self.trainer is None:
            raise SFTMixError("SelfReferenceCallback(confidence='online') needs the trainer's online records: use it "
                              "with an SFTMix trainer (SFTMixTrainer), which binds itself as `callback.trainer`.")
        self.steps = []  # no scoring step: the fingerprint says so
        run = {**self.fingerprint(args, state, kwargs.get("model")), "self_confidence": "online"}
        self._check_run(run, state)
        if state.is_world_process_zero:
            atomic_write_json(self.dir / "schedule.json", {"run": run})
        self.trainer.online_records.clear()
        done = min(state.global_step, self.ntp_steps)
        if done and not self.marker.exists():  # resumed inside the NTP epochs: their records so far are needed
            self.trainer.online_records.extend(saved_online_records(
                self.records_path, done, f"delete {args.output_dir} and {self.dir} and train from the start."))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.confidence == "checkpoints":
            return super().on_step_end(args, state, control, model=model, **kwargs)
        self._save_records_before_checkpoint(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.confidence != "checkpoints":  # save_strategy="epoch" decides to save here
            self._save_records_before_checkpoint(state, control)

    def _save_records_before_checkpoint(self, state, control):
        if state.global_step <= self.ntp_steps and not self.marker.exists():  # the NTP epochs' records only
            save_online_records(self.records_path, self.trainer.online_records, state, control)

    def self_split(self, guids, write: bool = True) -> np.ndarray:
        """The confident flags of `guids` (the training rows, in order) from the NTP epochs."""
        conf = self.out_dir / "confidence.jsonl"
        if self.marker.exists():  # the split was taken (a resumed run): read it, or rebuild it from what was kept
            rows = read_jsonl(conf) if conf.exists() else restore_self_confidence(self.out_dir, guids, write=write)
        else:
            if self.confidence != "checkpoints":
                records = self.trainer.online_records
                rows = online_confidence_rows(records, guids, relative=ONLINE_DETREND[self.confidence])
                if write:
                    write_jsonl(self.records_path, records)
                    write_jsonl(conf, rows)
                marker = {"confidence_source": "self", "self_confidence": self.confidence, "steps": self.ntp_steps,
                          "n_records": len(records)}
            else:
                rows = build_confidence(self.out_dir, len(self.steps) or self.num_checkpoints, write=write)
                marker = {"confidence_source": "self", "self_confidence": "checkpoints", "steps": self.steps}
            if write:  # after confidence.jsonl: the marker says the split of this run is final
                atomic_write_json(self.marker, {**marker, "n_examples": len(rows),
                                                "n_confident": sum(bool(r["confident"]) for r in rows)})
        by_guid = {r["guid"]: bool(r["confident"]) for r in rows}
        missing = [g for g in guids if g not in by_guid]
        if missing:
            raise SFTMixError(f"{conf}: {len(missing)} training examples have no confidence row (e.g. guid "
                              f"{missing[0]!r}): score_dataset must hold the training examples; delete {self.dir} "
                              f"and {conf} and train again.")
        flags = np.array([by_guid[g] for g in guids], dtype=bool)
        logger.info("one-run SFTMix: switching to Mixup with %d confident / %d unconfident examples (%s)",
                    int(flags.sum()), int((~flags).sum()), conf)
        return flags


def restore_self_confidence(out_dir, guids, write: bool = True) -> list[dict]:
    """confidence.jsonl of a one-run directory whose split was taken (dynamics/self_split.json) but whose
    confidence.jsonl is gone, rebuilt from what the switch kept (dynamics/online_records.jsonl, or ckpt_*.jsonl) and
    written again; `guids` are the training rows in order. The same rows as the switch wrote: the records are the
    whole NTP epochs'."""
    out_dir = Path(out_dir)
    ddir = out_dir / "dynamics"
    marker = json.loads((ddir / "self_split.json").read_text())
    if marker.get("self_confidence") == "checkpoints":
        rows = build_confidence(out_dir, len(marker["steps"]), write=write)
    else:
        path = ddir / "online_records.jsonl"
        if not path.exists():
            raise SFTMixError(f"{out_dir / 'confidence.jsonl'} and {path} are both missing, so the split of this "
                              f"one-run SFTMix cannot be rebuilt; delete {out_dir / 'sftmix'} and {ddir} and train the "
                              f"recipe again.")
        rows = online_confidence_rows(read_jsonl(path), guids,
                                      relative=ONLINE_DETREND[marker.get("self_confidence") or "online"])
        if write:
            write_jsonl(out_dir / "confidence.jsonl", rows)
    source = "ckpt_*.jsonl" if marker.get("self_confidence") == "checkpoints" else "online_records.jsonl"
    logger.warning("%s was missing: rebuilt from %s", out_dir / "confidence.jsonl", ddir / source)
    return rows
