"""Recipe step 1: the reference model's training dynamics, each example's confidence, and the confident split.

    from sftmix.confidence.reference import run_reference, join_confidence
    from sftmix.confidence.scoring import score_examples
    from sftmix.confidence.split import confidence, split_confident
    rows = score_examples(model, tokenized_ds, batch_size=16)   # [{guid, nll_mean, n_tokens, ppl}] in dataset order
    conf = confidence(ppl)                                      # ppl [C, N] -> -ppl.mean(0)   (paper eq. 1)
    confident = split_confident(conf, guids)                    # bool [N], exactly floor(N/2) True
    rows = run_reference(ref_model, ref_tok, ref_ds, "run/")    # train + score C checkpoints -> run/confidence.jsonl
    target_ds = join_confidence(target_ds, rows)                # adds `confident`, `confidence` by guid

Outputs in the run directory (names fixed; README.md lists the whole run directory):
    reference/                  the reference run's Trainer checkpoints (as save_strategy says; with
                                scoring_checkpoints="always" also at every scoring step)
    dynamics/ckpt_{k}.jsonl     guid, nll_mean, n_tokens, ppl at checkpoint k = 1..C
    dynamics/schedule.json      the scoring steps and each checkpoint's scoring throughput / padding fraction
    dynamics/hidden_final.npz   last-response-token hidden states at the final checkpoint (for the 2-D map)
    confidence.jsonl            guid, n_tokens, confidence, variability, ppl_1..ppl_C, confident

Checkpoint schedule: with T optimizer steps and C checkpoints, checkpoint k is taken at the end of step
ceil(k*T/C) (k = 1..C, so the last one is the end of training). Scoring happens in-process at those steps; a resumed
run skips the scored ones. With scoring_checkpoints="always" the callback also forces a Trainer save there, so a
resumed run restarts from (at latest) the last scored checkpoint; with "trainer" (the default: no forced ~100 GB
saves of a large full fine-tune) it restarts from the last checkpoint the Trainer saved (or from step 0) and retrains
up to each missing scoring step. Under several processes each scores a share of the examples (`share_batches`) and
the rows are gathered: the files are those of one process.

Split rule: examples are ranked by confidence (highest first), ties broken by guid (so the split does not depend on
the input order); the first floor(N/2) are `confident`. For odd N the median example goes to the unconfident half.
If every example has the same confidence, the split would be arbitrary: that is an SFTMixError.

Online mode (beyond the paper): the reference's own training forward passes already give each example's NLL, for
free. `online_confidence` turns the trainer's `online_records` into -mean ppl per example and `compare_online`
reports its Spearman correlation with the checkpoint-based confidence; `run_reference(online=True,
score_checkpoints=False)` skips the scoring passes altogether (confidence.jsonl then comes from the online records,
with ppl_e = the mean ppl in epoch e). Caveat: with one epoch each example is seen
once, at a different point of training, so online confidence is confounded with *when* the example was visited;
over several epochs use `epochs="last"` or the mean.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from sftmix.confidence.online import epoch_index
from sftmix.confidence.scoring import run_scoring
from sftmix.confidence.split import confidence, split_confident, variability
from sftmix.utils import SFTMixError, atomic_open, atomic_write_json, read_jsonl, resume_checkpoint, write_jsonl

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------------
# Reference training: score C checkpoints, then confidence.jsonl


def scoring_steps(max_steps: int, num_checkpoints: int) -> list[int]:
    """Checkpoint k = 1..C is taken at the end of optimizer step ceil(k*T/C); the last one is step T."""
    if num_checkpoints < 1:
        raise SFTMixError(f"num_checkpoints must be >= 1, got {num_checkpoints}.")
    if max_steps < num_checkpoints:
        raise SFTMixError(
            f"the reference run has only {max_steps} optimizer steps, fewer than num_checkpoints={num_checkpoints}; "
            f"lower num_checkpoints, lower the batch size, or train the reference for more epochs."
        )
    return [math.ceil(k * max_steps / num_checkpoints) for k in range(1, num_checkpoints + 1)]


SCORING_CHECKPOINTS = ("trainer", "always")  # RunConfig.scoring_checkpoints / run_reference(scoring_checkpoints=)


class CheckpointScoringCallback(TrainerCallback):
    """Scores `score_dataset` at C checkpoints spread evenly over the run, into `out_dir/dynamics/ckpt_{k}.jsonl`.

    Resumable: a checkpoint whose file exists is not scored again. save_checkpoints="always" asks the Trainer to save
    a checkpoint at each scoring step (whatever save_strategy says) so that a resumed run restarts from the last
    scored one; "trainer" (the default) saves only as the Trainer is configured, and a run resumed from an earlier
    checkpoint (or from scratch) retrains up to each missing scoring step and scores there (one log line says what
    it redoes). Every process takes part: each scores its share of the examples and the rows are gathered (see
    `run_scoring`); only the main process writes. At the final
    checkpoint the last-response-token hidden states are kept too (dynamics/hidden_final.npz) for the 2-D map.
    If the trainer records online dynamics (SFTMixConfig(record_online_dynamics=True)), set `callback.trainer`
    and its records are saved with every checkpoint and restored on resume (dynamics/online_records.jsonl).
    score=False (online-only mode) scores nothing (with "always" it still saves at those steps)."""

    def __init__(self, score_dataset, out_dir, num_checkpoints: int = 5, batch_size: int = 16,
                 hidden_at: str | None = "last_response", show_progress: bool = True, score: bool = True,
                 save_checkpoints: str = "trainer"):
        if save_checkpoints not in SCORING_CHECKPOINTS:
            raise SFTMixError(f"scoring_checkpoints must be one of {', '.join(SCORING_CHECKPOINTS)}, got "
                              f"{save_checkpoints!r}.")
        self.save_checkpoints = save_checkpoints
        self.score_dataset = score_dataset
        self.dir = Path(out_dir) / "dynamics"
        self.num_checkpoints = num_checkpoints
        self.batch_size = batch_size
        self.hidden_at = hidden_at
        self.show_progress = show_progress
        self.score = score  # False (online-only mode): only save Trainer checkpoints (and online records) there
        self.steps: list[int] = []
        self.schedule: dict = {}
        self.scored: list[int] = []  # checkpoints scored by this process (k), for tests and logs
        self.trainer = None

    def ckpt_path(self, k: int) -> Path:
        return self.dir / f"ckpt_{k}.jsonl"

    @property
    def hidden_path(self) -> Path:
        return self.dir / "hidden_final.npz"

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = scoring_steps(state.max_steps, self.num_checkpoints)
        sched = {"num_checkpoints": self.num_checkpoints, "max_steps": state.max_steps, "steps": self.steps,
                 "num_examples": len(self.score_dataset), "score": self.score}
        path = self.dir / "schedule.json"
        if path.exists():
            import json

            old = json.loads(path.read_text())
            if any(old.get(key) != val for key, val in sched.items()):
                raise SFTMixError(
                    f"{path}: these dynamics were scored with another schedule ({ {k: old.get(k) for k in sched} }) "
                    f"than this run ({sched}); use the same reference settings, or delete {self.dir} to rescore."
                )
            sched = old
        self.schedule = sched
        if state.is_world_process_zero:
            atomic_write_json(path, sched)
        if self.trainer is not None and state.global_step > 0:
            self._restore_online(state.global_step)
        self._log_resume(state.global_step)

    def _log_resume(self, step: int):
        """One line on what a resumed run redoes: the training steps past its checkpoint up to the last scored step,
        and which scoring steps it (re)scores."""
        if not self.score:
            return
        done = [k for k in range(1, self.num_checkpoints + 1) if self.ckpt_path(k).exists()]
        if step == 0 and not done:
            return  # a fresh run
        todo = [k for k in range(1, self.num_checkpoints + 1) if k not in done and self.steps[k - 1] > step]
        lost = [k for k in range(1, self.num_checkpoints + 1) if k not in done and self.steps[k - 1] <= step]
        if lost:  # scored steps before the checkpoint cannot be redone without retraining from an earlier one
            raise SFTMixError(
                f"{self.dir}: checkpoint(s) {lost} (step(s) {[self.steps[k - 1] for k in lost]}) were never scored and "
                f"training resumes after them (step {step}); delete the reference's checkpoints "
                f"({self.dir.parent / 'reference'}) to retrain them, or delete {self.dir} to rescore everything."
            )
        last_done = max((self.steps[k - 1] for k in done), default=0)
        redo = (f"retraining steps {step + 1}..{last_done} (done before the interruption, past the last saved "
                f"checkpoint)" if last_done > step else "retraining nothing already done")
        logger.info("resuming the reference at step %d: %s; checkpoint(s) %s already scored (kept), scoring "
                    "checkpoint(s) %s at step(s) %s", step, redo, done or "none", todo or "none",
                    [self.steps[k - 1] for k in todo] or "none")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and self.save_checkpoints == "always":
            control.should_save = True  # a resumed run restarts from here at the latest
        self._save_online_records(state, control)
        if state.global_step not in self.steps or not self.score:
            return
        k = self.steps.index(state.global_step) + 1
        final = k == self.num_checkpoints and self.hidden_at is not None
        if self.ckpt_path(k).exists() and (not final or self.hidden_path.exists()):
            logger.info("checkpoint %d/%d (step %d) already scored: %s", k, self.num_checkpoints, state.global_step,
                        self.ckpt_path(k))
            return
        res = run_scoring(model, self.score_dataset, batch_size=self.batch_size,
                          desc=f"scoring checkpoint {k}/{self.num_checkpoints}",
                          hidden_at=self.hidden_at if final else None, show_progress=self.show_progress,
                          distributed=True)  # every process is in on_step_end
        self.scored.append(k)
        if state.is_world_process_zero:
            if final:  # written before ckpt_C.jsonl: if that exists, so does this
                with atomic_open(self.hidden_path, "wb", encoding=None) as f:
                    np.savez(f, hidden=res.hidden, guid=np.array([r["guid"] for r in res.rows]),
                             hidden_at=np.array(self.hidden_at))
            write_jsonl(self.ckpt_path(k), res.rows)
            self.schedule.setdefault("scoring", {})[str(k)] = {"step": state.global_step, **res.stats}
            atomic_write_json(self.dir / "schedule.json", self.schedule)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_online_records(state, control)  # save_strategy="epoch" decides to save here

    def on_train_end(self, args, state, control, **kwargs):
        self._save_online_records(state, control, now=True)  # the whole run's, also when no checkpoint was saved

    def _save_online_records(self, state, control, now: bool = False):
        records = getattr(self.trainer, "online_records", None)
        if records is not None:
            save_online_records(self.dir / "online_records.jsonl", records, state, control, now=now)

    def _restore_online(self, step: int):
        records = getattr(self.trainer, "online_records", None)
        if records is not None:
            records.clear()  # steps after `step` are trained (and recorded) again
            records.extend(saved_online_records(
                self.dir / "online_records.jsonl", step,
                f"delete the reference's checkpoints ({self.dir.parent / 'reference'}) and {self.dir} and train it "
                f"from the start."))


def save_online_records(path, records, state, control, now: bool = False) -> None:
    """Write the online records (main process) when the Trainer is about to save a checkpoint, or `now`. Called from
    on_step_end / on_epoch_end, where the Trainer's flow callback (first in the list) has already decided whether a
    checkpoint is saved: written before it, every checkpoint has the records of the steps it holds (a kill between
    the two must not leave a checkpoint without them)."""
    if (now or control.should_save) and state.is_world_process_zero:
        write_jsonl(path, records)


def saved_online_records(path, step: int, fix: str) -> list[dict]:
    """The online records of a run resumed after optimizer step `step`, from the file saved with its checkpoints.
    A record's global_step is the step count *before* its optimizer step, so steps 1..`step` (done in the checkpoint
    resumed from) recorded global_step 0..step-1; later ones are recorded again. A step without records (the file
    deleted, or older than the checkpoint) is an error ending in `fix`: the split would rest on part of the data."""
    path = Path(path)
    kept = [r for r in read_jsonl(path) if r["global_step"] < step] if path.exists() else []
    missing = sorted(set(range(step)) - {r["global_step"] for r in kept})
    if missing:
        raise SFTMixError(f"{path}: the online records of optimizer step(s) {missing[:5]} are missing, and training "
                          f"resumes after them (step {step}); {fix}")
    return kept


def build_confidence(run_dir, num_checkpoints: int | None = None, write: bool = True) -> list[dict]:
    """Read run_dir/dynamics/ckpt_{1..C}.jsonl and write run_dir/confidence.jsonl (atomically); return its rows.

    Rows (in ckpt_1 order): guid, n_tokens, confidence, variability, ppl_1..ppl_C, confident."""
    run_dir = Path(run_dir)
    ddir = run_dir / "dynamics"
    if num_checkpoints is None:
        found = sorted(int(p.stem.split("_")[1]) for p in ddir.glob("ckpt_*.jsonl") if p.stem.split("_")[1].isdigit())
        num_checkpoints = len(found)
        if not found:
            raise SFTMixError(f"{ddir}: no ckpt_*.jsonl files; run the reference step (sftmix dynamics) first.")
    missing = [k for k in range(1, num_checkpoints + 1) if not (ddir / f"ckpt_{k}.jsonl").exists()]
    if missing:
        raise SFTMixError(
            f"{ddir}: checkpoint file(s) {', '.join(f'ckpt_{k}.jsonl' for k in missing)} missing; run the reference "
            f"step again (scored checkpoints are skipped; if its training had finished, delete {run_dir / 'reference'} "
            f"too) or set num_checkpoints to what was scored."
        )
    per_ckpt = [read_jsonl(ddir / f"ckpt_{k}.jsonl") for k in range(1, num_checkpoints + 1)]
    guids = [r["guid"] for r in per_ckpt[0]]
    if len(set(guids)) != len(guids):
        dup = next(g for g in guids if guids.count(g) > 1)
        raise SFTMixError(f"{ddir / 'ckpt_1.jsonl'}: guid {dup!r} appears more than once; deduplicate the data.")
    pos = {g: i for i, g in enumerate(guids)}
    ppl = np.zeros((num_checkpoints, len(guids)))
    for k, rows in enumerate(per_ckpt, start=1):
        if len(rows) != len(guids) or any(r["guid"] not in pos for r in rows):
            raise SFTMixError(
                f"{ddir / f'ckpt_{k}.jsonl'} scores other examples than ckpt_1.jsonl ({len(rows)} vs {len(guids)}); "
                f"the data changed between checkpoints: delete {ddir} and run the reference step again."
            )
        for r in rows:
            ppl[k - 1, pos[r["guid"]]] = r["ppl"]
    conf, var = confidence(ppl), variability(ppl)
    confident = split_confident(conf, guids)
    out = []
    for i, g in enumerate(guids):
        row = {"guid": g, "n_tokens": per_ckpt[0][i]["n_tokens"], "confidence": float(conf[i]),
               "variability": float(var[i])}
        row.update({f"ppl_{k}": float(ppl[k - 1, i]) for k in range(1, num_checkpoints + 1)})
        row["confident"] = bool(confident[i])
        out.append(row)
    if write:
        write_jsonl(run_dir / "confidence.jsonl", out)
    return out


def join_confidence(records_or_dataset, confidence_rows, missing: str = "error"):
    """Add `confident` (bool) and `confidence` (float) to each record / dataset row by guid.

    The reference may use another tokenizer than the target: guids are content hashes, so they match across
    tokenizations. Records without a confidence row raise SFTMixError (missing="error") or are dropped and
    counted in the log (missing="drop")."""
    by_guid = {r["guid"]: r for r in confidence_rows}
    is_hf = hasattr(records_or_dataset, "column_names")
    guids = list(records_or_dataset["guid"]) if is_hf else [r["guid"] for r in records_or_dataset]
    absent = [i for i, g in enumerate(guids) if g not in by_guid]
    if absent:
        matched = len(guids) - len(absent)
        if missing != "drop" or matched == 0:
            raise SFTMixError(
                f"only {matched} of {len(guids)} examples have a confidence row (the confidence file has "
                f"{len(by_guid)} rows; first unmatched guid {guids[absent[0]]!r}): the confidence was computed on "
                f"other data. Run step 1 on this data (delete confidence.jsonl and dynamics/ in the run directory)"
                + ("." if matched == 0 else ", or pass missing='drop' to train on the matched examples only.")
            )
        logger.warning("dropping %d of %d examples without a confidence row", len(absent), len(guids))
    keep = [i for i, g in enumerate(guids) if g in by_guid]
    if is_hf:
        ds = records_or_dataset.select(keep) if absent else records_or_dataset
        kept = [guids[i] for i in keep]
        for col in ("confident", "confidence"):
            if col in ds.column_names:
                ds = ds.remove_columns(col)
        ds = ds.add_column("confident", [bool(by_guid[g]["confident"]) for g in kept])
        return ds.add_column("confidence", [float(by_guid[g]["confidence"]) for g in kept])
    return [
        {**records_or_dataset[i], "confident": bool(by_guid[guids[i]]["confident"]),
         "confidence": float(by_guid[guids[i]]["confidence"])}
        for i in keep
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Online mode: NLL from the reference's own training forward passes


def online_confidence(online_records, guids, epochs: str = "all", relative: bool | str = False) -> dict:
    """Trainer `online_records` ({example_idx, global_step, epoch, nll_mean, n_tokens}) -> per-example confidence.

    confidence_i = -mean over example i's occurrences of exp(nll_mean) (epochs="all"), or over its occurrences in
    the last epoch it was seen in (epochs="last"). relative=True replaces nll_mean by nll_mean minus the mean
    nll_mean of all records of the same optimizer step (global_step): every example of a step was scored by the same
    weights, so this removes the drift of the model over the epoch (examples visited early would otherwise look
    unconfident for being early). relative="linear" subtracts a straight line fitted to nll_mean over global_step
    within each epoch instead: the same drift removed, without the noise of a mean over one small batch.
    Returns {"confidence": [N] (nan where never seen), "occurrences": [N] int, "unseen": count}."""
    if epochs not in ("all", "last"):
        raise SFTMixError(f"epochs must be 'all' or 'last', got {epochs!r}.")
    n = len(guids)
    recs = list(online_records)
    bad = [r for r in recs if not 0 <= int(r["example_idx"]) < n]
    if bad:
        raise SFTMixError(
            f"online record example_idx={bad[0]['example_idx']} is outside the {n} examples given; pass the guids of "
            f"the dataset the reference was trained on, in its order."
        )
    if epochs == "last":
        last = {}
        for r in recs:
            i = int(r["example_idx"])
            last[i] = max(last.get(i, -1), epoch_index(r))
        recs = [r for r in recs if epoch_index(r) == last[int(r["example_idx"])]]
    offset = _nll_offsets(recs, relative)
    ppl_sum, count = np.zeros(n), np.zeros(n, dtype=np.int64)
    for r in recs:
        i = int(r["example_idx"])
        ppl_sum[i] += math.exp(float(r["nll_mean"]) - offset.get(r["global_step"], 0.0))
        count[i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, -ppl_sum / np.maximum(count, 1), np.nan)
    return {"confidence": conf, "occurrences": count, "unseen": int((count == 0).sum())}


def _step_mean_nll(records) -> dict:
    """{global_step: mean nll_mean of that step's records}."""
    total: dict = {}
    for r in records:
        t = total.setdefault(r["global_step"], [0.0, 0])
        t[0] += float(r["nll_mean"])
        t[1] += 1
    return {k: s / c for k, (s, c) in total.items()}


def _nll_offsets(records, relative: bool | str) -> dict:
    """{global_step: what online_confidence subtracts}: nothing (False), the step's mean (True or "step"), or a least-
    squares line of nll_mean over global_step, one per epoch ("linear")."""
    if relative in (False, None):
        return {}
    if relative in (True, "step"):
        return _step_mean_nll(records)
    if relative != "linear":
        raise SFTMixError(f"relative must be False, True, 'step' or 'linear'; got {relative!r}.")
    by_epoch: dict = {}
    for r in records:
        by_epoch.setdefault(epoch_index(r), []).append(r)
    out = {}
    for recs in by_epoch.values():
        x = np.array([float(r["global_step"]) for r in recs])
        y = np.array([float(r["nll_mean"]) for r in recs])
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
        out.update({r["global_step"]: float(intercept + slope * float(r["global_step"])) for r in recs})
    return out


def online_confidence_rows(online_records, guids, n_tokens=None, relative: bool | str = False) -> list[dict]:
    """confidence.jsonl rows from online records alone (online-only mode): guid, n_tokens, confidence (-mean ppl
    over all occurrences; relative=True: of the step-relative ppl, see `online_confidence`), variability (std of
    those ppl), ppl_1..ppl_E (mean ppl in epoch e, as recorded), confident."""
    oc = online_confidence(online_records, guids, relative=relative)
    if oc["unseen"]:
        i = int(np.flatnonzero(oc["occurrences"] == 0)[0])
        raise SFTMixError(
            f"online confidence: {oc['unseen']} of {len(guids)} examples were never seen in the reference's training "
            f"(e.g. guid {guids[i]!r}); train the reference for at least one full epoch."
        )
    offset = _nll_offsets(online_records, relative)
    by_example: dict[int, list[tuple[int, float, float]]] = {}
    for r in online_records:
        nll = float(r["nll_mean"])
        by_example.setdefault(int(r["example_idx"]), []).append(
            (epoch_index(r), math.exp(nll), math.exp(nll - offset.get(r["global_step"], 0.0))))
    if n_tokens is None:  # the response tokens each record counted
        seen_tokens = {int(r["example_idx"]): int(r["n_tokens"]) for r in online_records}
        n_tokens = [seen_tokens[i] for i in range(len(guids))]
    n_epochs = 1 + max(e for occ in by_example.values() for e, *_ in occ)
    confident = split_confident(oc["confidence"], guids)
    rows = []
    for i, g in enumerate(guids):
        occ = by_example[i]
        row = {"guid": g, "n_tokens": int(n_tokens[i]), "confidence": float(oc["confidence"][i]),
               "variability": float(np.std([rel if relative else p for _, p, rel in occ]))}
        for e in range(n_epochs):
            ppl_e = [p for ep, p, _ in occ if ep == e]
            row[f"ppl_{e + 1}"] = float(np.mean(ppl_e)) if ppl_e else None
        row["confident"] = bool(confident[i])
        rows.append(row)
    return rows


def compare_online(online_conf, checkpoint_conf, guids) -> dict:
    """Spearman correlation between online and checkpoint-based confidence, and how often the splits agree."""
    from scipy.stats import spearmanr

    online_conf, checkpoint_conf = np.asarray(online_conf, float), np.asarray(checkpoint_conf, float)
    seen = np.isfinite(online_conf)
    if seen.sum() < 3:
        raise SFTMixError(f"only {int(seen.sum())} examples have online records; need at least 3 to compare.")
    rho, p = spearmanr(online_conf[seen], checkpoint_conf[seen])
    g = [str(x) for x, s in zip(guids, seen) if s]
    agree = split_confident(online_conf[seen], g) == split_confident(checkpoint_conf[seen], g)
    return {"spearman": float(rho), "pvalue": float(p), "n": int(seen.sum()), "unseen": int((~seen).sum()),
            "split_agreement": float(agree.mean())}


def _online_split_rows(checkpoint_rows, online_conf, guids) -> list[dict]:
    """confidence.jsonl rows split by online confidence, each keeping its checkpoint values beside."""
    online_conf = np.asarray(online_conf, float)
    if not np.isfinite(online_conf).all():
        i = int(np.flatnonzero(~np.isfinite(online_conf))[0])
        raise SFTMixError(f"online confidence: {int((~np.isfinite(online_conf)).sum())} examples were never seen in "
                          f"the reference's training (e.g. {guids[i]}); train the reference for at least one full "
                          f"epoch.")
    by_guid = dict(zip(guids, online_conf))
    order = [r["guid"] for r in checkpoint_rows]
    conf = [float(by_guid[g]) for g in order]
    confident = split_confident(conf, order)
    return [{**r, "checkpoint_confidence": r["confidence"], "checkpoint_confident": r["confident"],
             "confidence": c, "confident": bool(k)} for r, c, k in zip(checkpoint_rows, conf, confident)]


def write_online_summary(run_dir, online_records, guids, confidence_rows=None, epochs: str = "all") -> dict:
    """Write run_dir/dynamics/online_confidence.jsonl and online_summary.json (with the Spearman correlation against
    the checkpoint-based `confidence_rows` when given)."""
    run_dir = Path(run_dir)
    oc = online_confidence(online_records, guids, epochs=epochs)
    summary = {"epochs": epochs, "records": len(online_records), "n": len(guids), "unseen": oc["unseen"]}
    if confidence_rows is not None:
        by_guid = {r["guid"]: r["confidence"] for r in confidence_rows}
        ckpt = np.array([by_guid.get(g, np.nan) for g in guids])
        summary.update(compare_online(oc["confidence"], ckpt, guids))
    write_jsonl(run_dir / "dynamics" / "online_confidence.jsonl", [
        {"guid": g, "online_confidence": None if np.isnan(c) else float(c), "occurrences": int(o)}
        for g, c, o in zip(guids, oc["confidence"], oc["occurrences"])
    ])
    atomic_write_json(run_dir / "dynamics" / "online_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# The whole step


def run_reference(
    model,
    tokenizer,
    train_dataset,
    out_dir,
    num_checkpoints: int = 5,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 2e-5,
    seed: int = 42,
    score_batch_size: int = 16,
    online: bool = False,
    online_split: bool = False,
    score_checkpoints: bool = True,
    scoring_checkpoints: str = "trainer",
    records: list[dict] | None = None,
    plots: bool = True,
    show_progress: bool = True,
    callbacks: list | None = None,
    **training_args: Any,
) -> list[dict]:
    """Train the reference with plain NTP, score C checkpoints, write confidence.jsonl (+ plots); return its rows.

    `train_dataset` is tokenized with the *reference's* tokenizer (sftmix.data.tokenize_records) and has a guid
    column. Every part is skipped when its output exists, and training resumes from reference/checkpoint-*.
    The reference trains with SFTMixTrainer(mixup_weight=0), i.e. plain NTP; online=True also records each example's
    NLL from the training forward passes and writes dynamics/online_summary.json (Spearman against the checkpoint
    confidence); confidence.jsonl stays checkpoint-based. online=True with score_checkpoints=False is the cheap
    online-only mode: no scoring pass at all, confidence.jsonl from the online records (and no hidden-state map,
    which needs a pass). online_split=True (with the checkpoints scored): confidence.jsonl from the online records,
    each row keeping its checkpoint values as checkpoint_confidence / checkpoint_confident (the `online` confidence
    mode of `sftmix run`). Trainer checkpoints: as save_strategy configures them (scoring_checkpoints="trainer"; the
    default here is save_strategy="no", so a killed run retrains from step 0 and keeps what it scored), or also at
    each of the C scoring steps (scoring_checkpoints="always"). `records` (optional)
    give the instructions for the markdown summary. Further keyword arguments go to the SFTMixConfig (e.g.
    bf16=True, report_to="tensorboard", lr_scheduler_type="cosine")."""
    from accelerate import PartialState

    out_dir = Path(out_dir)
    conf_path = out_dir / "confidence.jsonl"
    main = PartialState().is_main_process  # several processes: each computes the rows, the main one writes the files
    if not score_checkpoints and not online:
        raise SFTMixError("score_checkpoints=False needs online=True: without checkpoint scoring the confidence can "
                          "only come from the online records.")
    if conf_path.exists():
        logger.info("%s exists: reference step already done", conf_path)
        rows = read_jsonl(conf_path)
    else:
        from sftmix.mixup.trainer import SFTMixConfig, SFTMixTrainer

        ref_dir = out_dir / "reference"
        # SFTMixTrainer with mixup_weight=0 is trl.SFTTrainer step for step (plain NTP); it also records online
        # dynamics (adding an `example_idx` column) when asked, so online on/off trains the very same run
        extra = {"mixup_weight": 0.0, "record_online_dynamics": online}
        defaults = dict(
            output_dir=str(ref_dir), num_train_epochs=num_train_epochs,
            per_device_train_batch_size=per_device_train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, seed=seed,
            max_length=None,  # the data is tokenized (and truncated) already; scoring sees the same sequences
            save_strategy="no",  # scoring_checkpoints="always" saves at each scoring step instead
            save_total_limit=1, logging_steps=10, report_to="none", disable_tqdm=not show_progress,
        )
        cfg = SFTMixConfig(**{**defaults, **extra, **training_args})
        callback = CheckpointScoringCallback(train_dataset, out_dir, num_checkpoints=num_checkpoints,
                                             batch_size=score_batch_size, show_progress=show_progress,
                                             score=score_checkpoints, save_checkpoints=scoring_checkpoints)
        trainer = SFTMixTrainer(model=model, args=cfg, train_dataset=train_dataset, processing_class=tokenizer,
                                callbacks=[callback, *(callbacks or [])])
        callback.trainer = trainer if online else None  # its online records are saved and restored
        last = resume_checkpoint(ref_dir, "the reference run")
        result = trainer.train(resume_from_checkpoint=last)
        # The reference's own training metrics: the NTP baseline reuses this run when it is the identical run.
        if main:
            atomic_write_json(ref_dir / "train_result.json", {"metrics": result.metrics,
                                                              "global_step": result.global_step,
                                                              "n_train_examples": len(train_dataset),
                                                              "log_history": trainer.state.log_history})
        guids = list(train_dataset["guid"])
        if score_checkpoints:
            rows = build_confidence(out_dir, num_checkpoints, write=main and not (online and online_split))
            if online and main:
                write_online_summary(out_dir, trainer.online_records, guids, rows)
            if online and online_split:
                rows = _online_split_rows(rows, online_confidence(trainer.online_records, guids)["confidence"], guids)
                if main:
                    write_jsonl(conf_path, rows)
        else:
            n_tok = train_dataset["n_response_tokens"] if "n_response_tokens" in train_dataset.column_names else None
            rows = online_confidence_rows(trainer.online_records, guids, n_tok)
            if main:
                write_online_summary(out_dir, trainer.online_records, guids)
                write_jsonl(conf_path, rows)
    if plots and main:
        from sftmix.report.plots import write_dynamics_plots

        write_dynamics_plots(out_dir, rows, records=records, dataset=train_dataset, tokenizer=tokenizer)
    return rows
