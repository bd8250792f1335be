"""Step 1 as one Trainer callback: each example's response perplexity at chosen optimizer steps (the scoring steps),
for the reference run of the recipe, a data map of any SFT run, and one-run SFTMix.

    from sftmix.confidence.callback import ConfidenceCallback, SelfReferenceCallback, build_confidence
    cb = ConfidenceCallback(tokenized_ds, "out", num_checkpoints=3, batch_size=16)   # or steps=[10, 20, 30]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])  # any Trainer
    trainer.train()          # -> out/dynamics/ckpt_{1..3}.jsonl (guid, nll_mean, n_tokens, ppl), schedule.json
    rows = build_confidence("out", 3)   # -> out/confidence.jsonl (confidence, variability, ppl_k, confident)

    # one-run SFTMix: NTP for self_reference_epochs while this scores the data, then Mixup on its split
    cb = SelfReferenceCallback(tokenized_ds, "out", num_checkpoints=2)
    trainer = SFTMixTrainer(model=m, args=SFTMixConfig(..., self_reference_epochs=1), train_dataset=ds,
                            self_reference=cb)

`score_dataset` is tokenized with labels (-100 outside the response) and a guid column (sftmix.data.tokenize_records).
Scoring is sftmix.confidence.scoring.run_scoring at the end of each scoring step, on the model as it is after that
step's update. Every process takes part: each scores its share of the examples (balanced by tokens) and the rows are
gathered, so N processes cost what one does, and the files are those of one process; the main process writes them,
each atomically. A scoring step whose file exists is not scored again, so a resumed run only scores what is missing
(the file names keep the word of their first version: dynamics/ckpt_{k}.jsonl is scoring step k).

Which run the files are of: dynamics/schedule.json holds the run's fingerprint (the score data's guids in order as a
sha256, the seed, the batch, learning rate, epochs and steps, the scoring steps, the model's name). A later training
run into the same folder with another fingerprint rescores from scratch (the old run's ckpt_*.jsonl are removed, with
a warning) when it starts at step 0; resumed from a Trainer checkpoint past files of the old run, which it cannot
rescore, it is refused in one line. The reference run of `sftmix run` (sftmix.confidence.reference.run_reference)
passes fingerprint=False: its stage fingerprint (sftmix.run.fingerprints) already clears dynamics/ when an
input changes, and schedule.json keeps the schedule only (another schedule in the folder is refused). The arguments
and the score data (columns, duplicate guids, rows without a response token) are checked when the callback is made,
not at the first scoring step.
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

from sftmix.confidence.online import online_confidence_rows, save_online_records, saved_online_records
from sftmix.confidence.scoring import check_score_columns, run_scoring
from sftmix.confidence.split import confidence, one_run_problem, split_confident, variability
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, atomic_open, atomic_write_json, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

SCORING_CHECKPOINTS = ("trainer", "always")  # RunConfig.scoring_checkpoints / ConfidenceCallback(save_checkpoints=)


def scoring_steps(max_steps: int, num_checkpoints: int) -> list[int]:
    """Scoring step k = 1..C is the end of optimizer step ceil(k*T/C) of T; the last one is step T."""
    if num_checkpoints < 1:
        raise SFTMixError(f"num_checkpoints must be >= 1, got {num_checkpoints}.")
    if max_steps < num_checkpoints:
        raise SFTMixError(
            f"the training run has only {max_steps} optimizer steps, fewer than num_checkpoints={num_checkpoints}; "
            f"lower num_checkpoints, lower the batch size, or train for more epochs."
        )
    return [math.ceil(k * max_steps / num_checkpoints) for k in range(1, num_checkpoints + 1)]


class ConfidenceCallback(TrainerCallback):
    """Per-example response perplexity of `score_dataset` at the scoring steps, into
    `out_dir/dynamics/ckpt_{k}.jsonl` (the guid-keyed rows of step 1: guid, nll_mean, n_tokens, ppl).

    Give the steps (`steps=[...]`, 1-based optimizer steps) or `num_checkpoints=C`: scoring step k at the end of
    optimizer step ceil(k*T/C) of the run's T steps. dynamics/schedule.json records the steps and the run's
    fingerprint (fingerprint=False: the schedule only; see the module docstring).

    hidden_at="last_response" also keeps, at the last scoring step, each example's hidden state there
    (dynamics/hidden_final.npz, for the 2-D map). save_checkpoints="always" asks the Trainer to save a checkpoint at
    each scoring step (whatever save_strategy says), so that a resumed run restarts from the last scored one;
    "trainer" (the default) saves only as the Trainer is configured, and a run resumed from an earlier checkpoint (or
    from scratch) retrains up to each missing scoring step and scores there (one log line says what it redoes).
    score=False scores nothing (the online-only reference: with "always" it still saves at those steps). With
    `callback.trainer` set to a trainer recording online dynamics (SFTMixConfig(record_online_dynamics=True)), its
    records are saved before every Trainer checkpoint and at the end (dynamics/online_records.jsonl) and restored on
    resume."""

    def __init__(self, score_dataset, out_dir, steps: list[int] | None = None, num_checkpoints: int | None = None,
                 batch_size: int = 16, show_progress: bool = False, hidden_at: str | None = None,
                 save_checkpoints: str = "trainer", score: bool = True, fingerprint: bool = True):
        name = type(self).__name__
        if (steps is None) == (num_checkpoints is None):
            raise SFTMixError(f"{name} needs either steps=[...] or num_checkpoints=C (not both).")
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
                raise SFTMixError(f"{name} steps must be a list of optimizer steps, e.g. steps=[10, 20]; got "
                                  f"{steps!r}.")
            steps = [_whole(f"{name} steps", s) for s in steps]
            if not steps or sorted(set(steps)) != steps:
                raise SFTMixError(f"{name} steps must be increasing optimizer steps >= 1; got {steps}.")
        if num_checkpoints is not None:
            num_checkpoints = _whole(f"{name} num_checkpoints", num_checkpoints)
        if hidden_at not in (None, "last_response", "last_prompt"):  # refused now, not at the last scoring step
            raise SFTMixError(f"{name} hidden_at must be None, 'last_response' or 'last_prompt', got {hidden_at!r}.")
        if save_checkpoints not in SCORING_CHECKPOINTS:
            raise SFTMixError(f"scoring_checkpoints must be one of {', '.join(SCORING_CHECKPOINTS)}, got "
                              f"{save_checkpoints!r}.")
        self.score_dataset = score_dataset
        self.out_dir = Path(out_dir)
        self.paths = RunDir(self.out_dir)  # the files it writes, named in one place
        self.dir = self.paths.dynamics
        self.fixed_steps = steps
        self.num_checkpoints = num_checkpoints
        self.batch_size = _whole(f"{name} batch_size", batch_size)
        self.show_progress = show_progress
        self.hidden_at = hidden_at
        self.save_checkpoints = save_checkpoints
        self.score = score
        self.use_fingerprint = fingerprint
        self.trainer = None  # a trainer with `online_records` to save and restore (set after the trainer is made)
        self.steps: list[int] = []
        self.schedule: dict = {}
        self.scored: list[int] = []  # scoring steps scored by this process (k), for tests and logs
        for path in (self.out_dir, self.dir):
            if path.exists() and not path.is_dir():
                raise SFTMixError(f"{name}: {path} is a file, not a folder; give another out_dir.")
        self.data_sha256 = _check_score_dataset(score_dataset, name)

    def scoring_path(self, k: int) -> Path:
        return self.paths.scores(k)

    @property
    def hidden_path(self) -> Path:
        return self.paths.hidden_final

    @property
    def records_path(self) -> Path:
        return self.paths.online_records

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

    def schedule_record(self, args, state, model) -> dict:
        """What schedule.json starts with: the steps and the run's fingerprint, or (fingerprint=False) the schedule
        alone, as the reference run has always written it."""
        if not self.use_fingerprint:
            return {"num_checkpoints": len(self.steps), "max_steps": state.max_steps, "steps": self.steps,
                    "num_examples": len(self.score_dataset), "score": self.score}
        return {"steps": self.steps, "num_checkpoints": len(self.steps), "num_examples": len(self.score_dataset),
                "run": self.fingerprint(args, state, model)}

    # -- the callback's events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = self.schedule_steps(args, state)
        if self.steps and self.steps[-1] > state.max_steps:
            raise SFTMixError(f"{type(self).__name__}: scoring step {self.steps[-1]} is past the run's last step "
                              f"({state.max_steps}); choose steps <= {state.max_steps}.")
        self.schedule = self._same_run_schedule(self.schedule_record(args, state, model), state)
        lost = [k for k, s in enumerate(self.steps, 1) if s <= state.global_step and not self.scoring_path(k).exists()]
        if lost and self.score:  # the weights of those steps are gone: resuming would silently leave holes
            raise SFTMixError(f"{self.dir}: scoring step(s) {lost} (optimizer step(s) "
                              f"{[self.steps[k - 1] for k in lost]}) were never scored and training resumes after "
                              f"them (step {state.global_step}); resume from an earlier Trainer checkpoint, or delete "
                              f"{args.output_dir} and {self.dir} and train from the start.")
        if state.is_world_process_zero:
            atomic_write_json(self.paths.schedule, self.schedule)
        self._restore_records(args, state)
        self._log_resume(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and self.save_checkpoints == "always":
            control.should_save = True  # a resumed run restarts from here at the latest
        self._save_records(state, control)
        if state.global_step not in self.steps or not self.score:
            return
        k = self.steps.index(state.global_step) + 1
        final = k == len(self.steps) and self.hidden_at is not None
        if self.scoring_path(k).exists() and (not final or self.hidden_path.exists()):
            logger.info("scoring step %d/%d (step %d) already scored: %s", k, len(self.steps), state.global_step,
                        self.scoring_path(k))
            return
        res = run_scoring(model, self.score_dataset, batch_size=self.batch_size,
                          desc=f"scoring step {k}/{len(self.steps)}", hidden_at=self.hidden_at if final else None,
                          show_progress=self.show_progress, distributed=True)  # every process is in on_step_end
        self.scored.append(k)
        if state.is_world_process_zero:
            if final:  # written before ckpt_C.jsonl: if that exists, so does this
                with atomic_open(self.hidden_path, "wb", encoding=None) as f:
                    np.savez(f, hidden=res.hidden, guid=np.array([r["guid"] for r in res.rows]),
                             hidden_at=np.array(self.hidden_at))
            write_jsonl(self.scoring_path(k), res.rows)
            self.schedule.setdefault("scoring", {})[str(k)] = {"step": state.global_step, **res.stats}
            atomic_write_json(self.paths.schedule, self.schedule)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_records(state, control)  # save_strategy="epoch" decides to save here

    def on_train_end(self, args, state, control, **kwargs):
        self._save_records(state, control, now=True)  # the whole run's, also when no checkpoint was saved

    # -- which run the folder holds -----------------------------------------------------------------------------------
    def _same_run_schedule(self, record: dict, state) -> dict:
        """The schedule to write: `record`, with what an earlier start of the same run scored; files of another run
        are removed to rescore (or refused, see `_replace_other_run`)."""
        path = self.paths.schedule
        old = json.loads(path.read_text()) if path.exists() else {}
        if not self.use_fingerprint:
            if old and any(old.get(key) != val for key, val in record.items()):
                raise SFTMixError(
                    f"{path}: these dynamics were scored with another schedule ({ {k: old.get(k) for k in record} }) "
                    f"than this run ({record}); use the same reference settings, or delete {self.dir} to rescore.")
            return old or record
        if old.get("run") != record["run"]:
            self._replace_other_run(old, record["run"], state.global_step, state.is_world_process_zero)
            return record
        return {**old, **record}  # the same run, resumed or restarted: keep what it scored

    def _replace_other_run(self, old: dict, run: dict, step: int, main: bool) -> None:
        """dynamics/ holds files of another run (or files without a fingerprint): remove them to rescore, unless this
        run resumes past one of them (its weights are gone, so it could only be kept, mixing the two runs)."""
        old_run = old.get("run") or {}
        diff = ", ".join(f"{k} {old_run.get(k)!r} -> {v!r}" for k, v in run.items() if old_run.get(k) != v)
        old_steps = old.get("steps") or []
        records = self.records_path  # one-run SFTMix's online records: never re-recorded either
        files = sorted(self.dir.glob("ckpt_*.jsonl")) + ([records] if records.exists() else [])
        stuck = [p.name for p in files if step > 0 and (p == records or _scored_at(p, old_steps) <= step)]
        if stuck:
            raise SFTMixError(f"{self.dir} holds the data map of another run ({diff or 'no fingerprint'}), and this "
                              f"one resumes at step {step}, after {', '.join(stuck)}, which it cannot rescore: resume "
                              f"with that run's settings, or use another out_dir (or delete {self.dir} and train from "
                              f"the start).")
        stale = files + [p for p in (self.paths.self_split,) if p.exists()]
        if stale:
            logger.warning("%s holds the data map of another run (%s): removing its %s and rescoring", self.dir,
                           diff or "no fingerprint", ", ".join(p.name for p in stale))
        if main:
            for p in stale:
                p.unlink(missing_ok=True)

    def _log_resume(self, step: int):
        """One line on what a resumed run redoes: the training steps past its checkpoint up to the last scored step,
        and which scoring steps it (re)scores."""
        if not self.score or not self.steps:
            return
        ks = range(1, len(self.steps) + 1)
        done = [k for k in ks if self.scoring_path(k).exists()]
        if step == 0 and not done:
            return  # a fresh run
        todo = [k for k in ks if k not in done]
        last_done = max((self.steps[k - 1] for k in done), default=0)
        redo = (f"retraining steps {step + 1}..{last_done} (done before the interruption, past the last saved "
                f"checkpoint)" if last_done > step else "retraining nothing already done")
        logger.info("resuming at step %d: %s; scoring step(s) %s already scored (kept), scoring step(s) %s at "
                    "optimizer step(s) %s", step, redo, done or "none", todo or "none",
                    [self.steps[k - 1] for k in todo] or "none")

    # -- online records (a trainer recording online dynamics) ---------------------------------------------------------
    def _online_records(self):
        """The trainer's online records this callback saves and restores, or None."""
        return getattr(self.trainer, "online_records", None)

    def _records_kept_until(self, step: int) -> int:
        """How many optimizer steps of records this callback keeps when training is at `step`: all of them."""
        return step

    def _save_records(self, state, control, now: bool = False):
        records = self._online_records()
        if records is not None and self._records_kept_until(state.global_step) == state.global_step:
            save_online_records(self.records_path, records, state, control, now=now)

    def _restore_records(self, args, state):
        records = self._online_records()
        if records is None:
            return
        records.clear()  # the steps after the one resumed from are trained (and recorded) again
        done = self._records_kept_until(state.global_step)
        if done:
            records.extend(saved_online_records(self.records_path, done, f"delete {args.output_dir} and {self.dir} "
                                                                         f"and train from the start."))


def _whole(name: str, value) -> int:
    """A whole number >= 1 from an int, a numpy integer or an integral float (2.0); anything else is refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:
        raise SFTMixError(f"{name}: {value!r} is not a whole number >= 1; give optimizer steps / counts as integers.")
    return int(value)


def _scored_at(path: Path, steps: list) -> float:
    """The optimizer step a ckpt_{k}.jsonl (scoring step k) of a schedule was scored at (inf when it does not say)."""
    k = path.stem.split("_")[1]
    return steps[int(k) - 1] if k.isdigit() and 1 <= int(k) <= len(steps) else math.inf


def _check_score_dataset(ds, name: str) -> str:
    """Refuse a score dataset the scorer would stop on hours later (missing columns, no rows, duplicated guids, rows
    without a response token); return the sha256 of its guids in order (the data part of the run's fingerprint)."""
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


def build_confidence(run_dir, num_checkpoints: int | None = None, write: bool = True) -> list[dict]:
    """Read run_dir/dynamics/ckpt_{1..C}.jsonl (the C scoring steps) and write run_dir/confidence.jsonl (atomically);
    return its rows (in ckpt_1 order): guid, n_tokens, confidence, variability, ppl_1..ppl_C, confident."""
    d = RunDir(run_dir)
    ddir = d.dynamics
    if num_checkpoints is None:
        found = sorted(int(p.stem.split("_")[1]) for p in ddir.glob("ckpt_*.jsonl") if p.stem.split("_")[1].isdigit())
        num_checkpoints = len(found)
        if not found:
            raise SFTMixError(f"{ddir}: no ckpt_*.jsonl files; run the reference step (sftmix dynamics) first.")
    missing = [k for k in range(1, num_checkpoints + 1) if not d.scores(k).exists()]
    if missing:
        raise SFTMixError(
            f"{ddir}: scoring file(s) {', '.join(d.scores(k).name for k in missing)} missing; run the reference "
            f"step again (scored steps are skipped; if its training had finished, delete {d.reference} "
            f"too) or set num_checkpoints to what was scored."
        )
    per_step = [read_jsonl(d.scores(k)) for k in range(1, num_checkpoints + 1)]
    guids = [r["guid"] for r in per_step[0]]
    if len(set(guids)) != len(guids):
        dup = next(g for g in guids if guids.count(g) > 1)
        raise SFTMixError(f"{d.scores(1)}: guid {dup!r} appears more than once; deduplicate the data.")
    pos = {g: i for i, g in enumerate(guids)}
    ppl = np.zeros((num_checkpoints, len(guids)))
    for k, rows in enumerate(per_step, start=1):
        if len(rows) != len(guids) or any(r["guid"] not in pos for r in rows):
            raise SFTMixError(
                f"{d.scores(k)} scores other examples than {d.scores(1).name} ({len(rows)} vs {len(guids)}); "
                f"the data changed between scoring steps: delete {ddir} and run the reference step again."
            )
        for r in rows:
            ppl[k - 1, pos[r["guid"]]] = r["ppl"]
    conf, var = confidence(ppl), variability(ppl)
    confident = split_confident(conf, guids)
    out = []
    for i, g in enumerate(guids):
        row = {"guid": g, "n_tokens": per_step[0][i]["n_tokens"], "confidence": float(conf[i]),
               "variability": float(var[i])}
        row.update({f"ppl_{k}": float(ppl[k - 1, i]) for k in range(1, num_checkpoints + 1)})
        row["confident"] = bool(confident[i])
        out.append(row)
    if write:
        write_jsonl(d.confidence, out)
    return out


# self_confidence's online modes -> what sftmix.confidence.online.online_confidence subtracts from each record's NLL
ONLINE_DETREND = {"online": "step", "online_raw": False, "online_linear": "linear"}


class SelfReferenceCallback(ConfidenceCallback):
    """One-run SFTMix's confidence, from the first `args.self_reference_epochs` epochs of the target's own NTP
    training; at the switch to Mixup, `self_split` writes out_dir/confidence.jsonl (paper eq. 1 and the median split
    of sftmix.confidence.split) and then the marker dynamics/self_split.json. A resumed run reloads that split.

    confidence="online" (free; needs record_online_dynamics=True in the training arguments): each example's response
    NLL from the training forward of those epochs (the trainer's `online_records`), relative to the mean of its
    optimizer step (sftmix.confidence.online.online_confidence(relative=True)); the records are written to
    dynamics/online_records.jsonl before each Trainer checkpoint and restored on resume. confidence="online_raw":
    the same records without the step-relative correction; "online_linear": less a line fitted over the steps
    instead of each step's mean (variants, compared in benchmarks/quality_parts.py).
    confidence="checkpoints": C scoring steps spread over those epochs (scoring step k at optimizer step
    ceil(k*T_E/C), T_E the last step of those epochs), scored as ConfidenceCallback scores, then `build_confidence`.

    The one-run switch is all this subclass adds to ConfidenceCallback: the scoring steps (or the online records)
    end with the NTP epochs, and `self_split` turns them into the split. The SFTMix trainer is given this callback as
    `self_reference=` (sftmix.mixup.mixin.SFTMixMixin): it adds it to its callbacks and binds itself as
    `callback.trainer`."""

    def __init__(self, score_dataset, out_dir, num_checkpoints: int = 2, batch_size: int = 16,
                 show_progress: bool = False, confidence: str = "online"):
        if confidence not in ("checkpoints", *ONLINE_DETREND):
            raise SFTMixError(f"SelfReferenceCallback confidence must be one of checkpoints, "
                              f"{', '.join(ONLINE_DETREND)}; got {confidence!r}.")
        super().__init__(score_dataset, out_dir, num_checkpoints=num_checkpoints, batch_size=batch_size,
                         show_progress=show_progress)
        self.confidence = confidence
        self.ntp_steps = 0

    @property
    def marker(self) -> Path:
        return self.paths.self_split

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
        if self.confidence != "checkpoints":
            return []  # no scoring step: the fingerprint says so
        return scoring_steps(self.ntp_steps, self.num_checkpoints)

    def fingerprint(self, args, state, model) -> dict:
        run = super().fingerprint(args, state, model)
        return run if self.confidence == "checkpoints" else {**run, "self_confidence": "online"}

    def schedule_record(self, args, state, model) -> dict:
        if self.confidence == "checkpoints":
            return super().schedule_record(args, state, model)
        return {"run": self.fingerprint(args, state, model)}

    def on_train_begin(self, args, state, control, **kwargs):
        self.ntp_steps = self._ntp_steps(args, state)
        if self.confidence != "checkpoints":
            if not getattr(args, "record_online_dynamics", False):
                raise SFTMixError("SelfReferenceCallback(confidence='online') reads the NTP epochs' own per-example "
                                  "NLL: set record_online_dynamics=True in the training arguments (or use "
                                  "confidence='checkpoints').")
            if self.trainer is None:
                raise SFTMixError("SelfReferenceCallback(confidence='online') needs the trainer's online records: give "
                                  "it to an SFTMix trainer as SFTMixTrainer(..., self_reference=callback), which "
                                  "binds itself as `callback.trainer`.")
        return super().on_train_begin(args, state, control, **kwargs)

    def _online_records(self):
        return None if self.confidence == "checkpoints" else self.trainer.online_records

    def _records_kept_until(self, step: int) -> int:
        """The NTP epochs' records only, and none once the split is taken (a run resumed after the switch)."""
        return 0 if self.marker.exists() else min(step, self.ntp_steps)

    def self_split(self, guids, write: bool = True) -> np.ndarray:
        """The confident flags of `guids` (the training rows, in order) from the NTP epochs."""
        conf = self.paths.confidence
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
    d = RunDir(out_dir)
    ddir = d.dynamics
    marker = json.loads(d.self_split.read_text())
    if marker.get("self_confidence") == "checkpoints":
        rows = build_confidence(out_dir, len(marker["steps"]), write=write)
    else:
        path = d.online_records
        if not path.exists():
            raise SFTMixError(f"{d.confidence} and {path} are both missing, so the split of this "
                              f"one-run SFTMix cannot be rebuilt; delete {d.recipe('sftmix')} and {ddir} and train the "
                              f"recipe again.")
        rows = online_confidence_rows(read_jsonl(path), guids,
                                      relative=ONLINE_DETREND[marker.get("self_confidence") or "online"])
        if write:
            write_jsonl(d.confidence, rows)
    source = ddir / "ckpt_*.jsonl" if marker.get("self_confidence") == "checkpoints" else d.online_records
    logger.warning("%s was missing: rebuilt from %s", d.confidence, source)
    return rows
