"""Trainer callbacks: a data map for any SFT run, and the confidence of one-run SFTMix.

    from sftmix.callbacks import ConfidenceCallback, SelfReferenceCallback
    cb = ConfidenceCallback(tokenized_ds, "out", num_checkpoints=3, batch_size=16)   # or steps=[10, 20, 30]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])  # any Trainer
    trainer.train()          # -> out/dynamics/ckpt_{1..3}.jsonl (guid, nll_mean, n_tokens, ppl), schedule.json
    rows = sftmix.dynamics.build_confidence("out", 3)   # -> out/confidence.jsonl (confidence, variability, split)

    # one-run SFTMix: NTP for self_reference_epochs while this scores the data, then Mixup on its split
    cb = SelfReferenceCallback(tokenized_ds, "out", num_checkpoints=2)
    trainer = SFTMixTrainer(model=m, args=SFTMixConfig(..., self_reference_epochs=1), train_dataset=ds, callbacks=[cb])

`score_dataset` is tokenized with labels (-100 outside the response) and a guid column (sftmix.data.tokenize_records).
Scoring is sftmix.scoring.run_scoring (the scorer of step 1) at the end of the chosen optimizer steps, on the model
as it is after that step's update; every process takes part (each scores a share), the main process writes, each
file atomically. A checkpoint whose file exists is not scored again, so a resumed run only scores what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from sftmix.core import one_run_problem
from sftmix.dynamics import build_confidence, online_confidence_rows, saved_online_records, scoring_steps
from sftmix.scoring import run_scoring
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


class ConfidenceCallback(TrainerCallback):
    """Per-example response perplexity of `score_dataset` at chosen optimizer steps, into
    `out_dir/dynamics/ckpt_{k}.jsonl` (the guid-keyed rows of step 1: guid, nll_mean, n_tokens, ppl).

    Give the steps (`steps=[...]`, 1-based optimizer steps) or `num_checkpoints=C`: checkpoint k at the end of step
    ceil(k*T/C) of the run's T steps (as step 1 schedules them). dynamics/schedule.json records the steps; a run
    directory scored with another schedule is refused rather than mixed."""

    def __init__(self, score_dataset, out_dir, steps: list[int] | None = None, num_checkpoints: int | None = None,
                 batch_size: int = 16, show_progress: bool = False):
        if (steps is None) == (num_checkpoints is None):
            raise SFTMixError("ConfidenceCallback needs either steps=[...] or num_checkpoints=C (not both).")
        if steps is not None and (not steps or any(int(s) < 1 for s in steps) or sorted(set(steps)) != list(steps)):
            raise SFTMixError(f"ConfidenceCallback steps must be increasing optimizer steps >= 1; got {steps}.")
        self.score_dataset = score_dataset
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "dynamics"
        self.fixed_steps = None if steps is None else [int(s) for s in steps]
        self.num_checkpoints = num_checkpoints
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.steps: list[int] = []
        self.schedule: dict = {}
        self.scored: list[int] = []  # checkpoints scored by this process (k), for tests and logs

    def ckpt_path(self, k: int) -> Path:
        return self.dir / f"ckpt_{k}.jsonl"

    def schedule_steps(self, args, state) -> list[int]:
        """The optimizer steps to score at (called at the start of training, when max_steps is known)."""
        if self.fixed_steps is not None:
            return self.fixed_steps
        return scoring_steps(state.max_steps, self.num_checkpoints)

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = self.schedule_steps(args, state)
        if self.steps[-1] > state.max_steps:
            raise SFTMixError(f"ConfidenceCallback: scoring step {self.steps[-1]} is past the run's last step "
                              f"({state.max_steps}); choose steps <= {state.max_steps}.")
        sched = {"steps": self.steps, "num_checkpoints": len(self.steps), "num_examples": len(self.score_dataset)}
        path = self.dir / "schedule.json"
        if path.exists():
            old = json.loads(path.read_text())
            if any(old.get(key) != val for key, val in sched.items()):
                raise SFTMixError(f"{path}: these dynamics were scored with another schedule "
                                  f"({ {k: old.get(k) for k in sched} }) than this run ({sched}); use the same "
                                  f"settings, or delete {self.dir} to rescore.")
            sched = {**old, **sched}
        lost = [k for k, s in enumerate(self.steps, 1) if s <= state.global_step and not self.ckpt_path(k).exists()]
        if lost:  # the weights of those steps are gone: resuming would silently leave holes in the data map
            raise SFTMixError(f"{self.dir}: checkpoint(s) {lost} (step(s) {[self.steps[k - 1] for k in lost]}) were "
                              f"never scored and training resumes after them (step {state.global_step}); resume from "
                              f"an earlier Trainer checkpoint, or delete {self.dir} and train from the start.")
        self.schedule = sched
        if state.is_world_process_zero:
            atomic_write_json(path, sched)

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


class SelfReferenceCallback(ConfidenceCallback):
    """One-run SFTMix's confidence, from the first `args.self_reference_epochs` epochs of the target's own NTP
    training; at the switch to Mixup, `self_split` writes out_dir/confidence.jsonl (paper eq. 1 and the median split
    of sftmix.split) and then the marker dynamics/self_split.json. A resumed run reloads that split.

    confidence="online" (free; needs record_online_dynamics=True in the training arguments): each example's response
    NLL from the training forward of those epochs (the trainer's `online_records`), relative to the mean of its
    optimizer step (sftmix.dynamics.online_confidence(relative=True)); the records are written to
    dynamics/online_records.jsonl before each Trainer checkpoint and restored on resume.
    confidence="checkpoints": C scoring passes spread over those epochs (checkpoint k at step ceil(k*T_E/C), T_E the
    last step of those epochs), as ConfidenceCallback scores, then sftmix.dynamics.build_confidence.

    SFTMixMixin finds this callback among the trainer's callbacks when self_reference_epochs > 0 and binds itself
    as `callback.trainer`."""

    def __init__(self, score_dataset, out_dir, num_checkpoints: int = 2, batch_size: int = 16,
                 show_progress: bool = False, confidence: str = "online"):
        if confidence not in ("online", "checkpoints"):
            raise SFTMixError(f"SelfReferenceCallback confidence must be 'online' or 'checkpoints'; got "
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
        # the same rules (and words) as sftmix.validation checks before a `sftmix run` starts
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
        self.trainer.online_records.clear()
        done = min(state.global_step, self.ntp_steps)
        if done and not self.marker.exists():  # resumed inside the NTP epochs: their records so far are needed
            kept = saved_online_records(self.records_path, done)  # steps 1..done recorded global_step 0..done-1
            missing = sorted(set(range(done)) - {r["global_step"] for r in kept})
            if missing:
                raise SFTMixError(f"{self.records_path}: the online records of optimizer step(s) {missing[:5]} are "
                                  f"missing, and training resumes after them (step {state.global_step}); delete "
                                  f"{args.output_dir} and {self.dir} and train from the start.")
            self.trainer.online_records.extend(kept)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.confidence == "checkpoints":
            return super().on_step_end(args, state, control, model=model, **kwargs)
        self._save_records_before_checkpoint(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.confidence == "online":  # save_strategy="epoch" decides to save here
            self._save_records_before_checkpoint(state, control)

    def _save_records_before_checkpoint(self, state, control):
        # The Trainer's flow callback (first in the list) has decided whether a checkpoint is saved now: write the
        # records before it is, so that every checkpoint has the records of the steps it holds.
        if (control.should_save and state.global_step <= self.ntp_steps and not self.marker.exists()
                and state.is_world_process_zero):
            write_jsonl(self.records_path, self.trainer.online_records)

    def self_split(self, guids, write: bool = True) -> np.ndarray:
        """The confident flags of `guids` (the training rows, in order) from the NTP epochs."""
        conf = self.out_dir / "confidence.jsonl"
        if self.marker.exists() and conf.exists():
            rows = read_jsonl(conf)
        else:
            if self.confidence == "online":
                records = self.trainer.online_records
                rows = online_confidence_rows(records, guids, relative=True)
                if write:
                    write_jsonl(self.records_path, records)
                    write_jsonl(conf, rows)
                marker = {"confidence_source": "self", "self_confidence": "online", "steps": self.ntp_steps,
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
