"""Recipe step 1: the reference run, the confidence it gives each example, and its join to the target's data.

    from sftmix.confidence.reference import run_reference, join_confidence
    rows = run_reference(ref_model, ref_tok, ref_ds, "run/")    # train + score C steps -> run/confidence.jsonl
    target_ds = join_confidence(target_ds, rows)                # adds `confident`, `confidence` by guid

The parts are in the modules below this one: the scorer (sftmix.confidence.scoring: score_examples, run_scoring),
the scoring callback and the confidence file (sftmix.confidence.callback: ConfidenceCallback, scoring_steps,
build_confidence), the rule (sftmix.confidence.split: confidence, variability, split_confident) and the online mode
(sftmix.confidence.online). The caller draws the plots (sftmix.report.plots.write_dynamics_plots), so that step 1
imports nothing from the report.

Outputs in the run directory (names fixed; README.md lists the whole run directory):
    reference/                  the reference run's Trainer checkpoints (as save_strategy says; with
                                scoring_checkpoints="always" also at every scoring step)
    dynamics/ckpt_{k}.jsonl     guid, nll_mean, n_tokens, ppl at scoring step k = 1..C
    dynamics/schedule.json      the scoring steps and each one's scoring throughput / padding fraction
    dynamics/hidden_final.npz   last-response-token hidden states at the last scoring step (for the 2-D map)
    confidence.jsonl            guid, n_tokens, confidence, variability, ppl_1..ppl_C, confident

Scoring steps: with T optimizer steps and C scoring steps, step k is the end of optimizer step ceil(k*T/C) (k = 1..C,
so the last one is the end of training). Scoring happens in-process at those steps; a resumed run skips the scored
ones. With scoring_checkpoints="always" the callback also forces a Trainer save there, so a resumed run restarts from
(at latest) the last scored step; with "trainer" (the default: no forced ~100 GB saves of a large full fine-tune) it
restarts from the last checkpoint the Trainer saved (or from step 0) and retrains up to each missing scoring step.
Under several processes each scores a share of the examples and the rows are gathered: the files are those of one
process.

Split rule (sftmix.confidence.split): examples are ranked by confidence (highest first), ties broken by guid (so the
split does not depend on the input order); the first floor(N/2) are `confident`. For odd N the median example goes
to the unconfident half. If every example has the same confidence, the split would be arbitrary: an SFTMixError.

Where the confidence comes from (`run_reference(confidence=...)`, one choice):
    "checkpoints"            C scoring passes (the paper)
    "checkpoints_vs_online"  the same, and each example's NLL from the training forward passes too (free), compared
                             in dynamics/online_summary.json (Spearman); confidence.jsonl stays the scored one
    "online"                 both, confidence.jsonl split by the online records, each row keeping its scored values
                             as checkpoint_confidence / checkpoint_confident (`sftmix run`'s confidence_mode=online)
    "online_only"            no scoring pass at all: confidence.jsonl from the online records (ppl_e = the mean ppl
                             in epoch e), and no hidden-state map, which needs a pass
Caveat of the online records: with one epoch each example is seen once, at a different point of training, so its
online confidence is confounded with *when* it was visited (sftmix.confidence.online).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from sftmix.confidence.callback import ConfidenceCallback, build_confidence
from sftmix.confidence.online import (
    online_confidence,
    online_confidence_rows,
    online_split_rows,
    write_online_summary,
)
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, resume_checkpoint, write_jsonl

logger = logging.getLogger(__name__)

REFERENCE_CONFIDENCE = ("checkpoints", "checkpoints_vs_online", "online", "online_only")  # run_reference(confidence=)
ReferenceConfidence = Literal["checkpoints", "checkpoints_vs_online", "online", "online_only"]


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
    confidence: ReferenceConfidence = "checkpoints",
    scoring_checkpoints: str = "trainer",
    show_progress: bool = True,
    callbacks: list | None = None,
    **training_args: Any,
) -> list[dict]:
    """Train the reference with plain NTP, score it at C scoring steps, write confidence.jsonl; return its rows.

    `train_dataset` is tokenized with the *reference's* tokenizer (sftmix.data.tokenize_records) and has a guid
    column. Every part is skipped when its output exists, and training resumes from reference/checkpoint-*.
    The reference trains with SFTMixTrainer(mixup_weight=0), i.e. plain NTP. `confidence`: where the confidence comes
    from (the module docstring lists the four choices; the online ones also record each example's NLL from the
    training forward passes and write dynamics/online_summary.json). Trainer checkpoints: as save_strategy configures
    them (scoring_checkpoints="trainer"; the default here is save_strategy="no", so a killed run retrains from step 0
    and keeps what it scored), or also at each of the C scoring steps (scoring_checkpoints="always"). Further keyword
    arguments go to the SFTMixConfig (e.g. bf16=True, report_to="tensorboard", lr_scheduler_type="cosine"); the
    keywords of the earlier flag combination (online, online_split, score_checkpoints) are still read."""
    from accelerate import PartialState

    confidence = _legacy_confidence(training_args) or confidence
    if confidence not in REFERENCE_CONFIDENCE:
        raise SFTMixError(f"run_reference confidence must be one of {', '.join(REFERENCE_CONFIDENCE)}; got "
                          f"{confidence!r}.")
    online, score = confidence != "checkpoints", confidence != "online_only"
    out_dir = Path(out_dir)
    conf_path = out_dir / "confidence.jsonl"
    main = PartialState().is_main_process  # several processes: each computes the rows, the main one writes the files
    if conf_path.exists():
        logger.info("%s exists: reference step already done", conf_path)
        return read_jsonl(conf_path)
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
    # fingerprint=False: the stage fingerprint of `sftmix run` clears dynamics/ when an input changes, and
    # schedule.json keeps the reference's schema (its max_steps tells sftmix.run.publish the final checkpoint)
    callback = ConfidenceCallback(train_dataset, out_dir, num_checkpoints=num_checkpoints,
                                  batch_size=score_batch_size, show_progress=show_progress,
                                  hidden_at="last_response", save_checkpoints=scoring_checkpoints, score=score,
                                  fingerprint=False)
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
    if not score:
        n_tok = train_dataset["n_response_tokens"] if "n_response_tokens" in train_dataset.column_names else None
        rows = online_confidence_rows(trainer.online_records, guids, n_tok)
        if main:
            write_online_summary(out_dir, trainer.online_records, guids)
            write_jsonl(conf_path, rows)
        return rows
    rows = build_confidence(out_dir, num_checkpoints, write=main and confidence != "online")
    if online and main:
        write_online_summary(out_dir, trainer.online_records, guids, rows)
    if confidence == "online":
        rows = online_split_rows(rows, online_confidence(trainer.online_records, guids)["confidence"], guids)
        if main:
            write_jsonl(conf_path, rows)
    return rows


def _legacy_confidence(training_args: dict) -> str | None:
    """The choice the keywords online / online_split / score_checkpoints made before `confidence` (popped from
    training_args), or None when none is given."""
    old = {k: training_args.pop(k) for k in ("online", "online_split", "score_checkpoints") if k in training_args}
    if not old:
        return None
    online, split, score = old.get("online", False), old.get("online_split", False), old.get("score_checkpoints", True)
    if not score and not online:
        raise SFTMixError("score_checkpoints=False needs online=True: without scoring steps the confidence can only "
                          "come from the online records (or give confidence='online_only').")
    if not score:
        return "online_only"
    return ("online" if split else "checkpoints_vs_online") if online else "checkpoints"


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
