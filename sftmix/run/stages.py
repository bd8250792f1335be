"""The stages of a run, each resumable on the same run directory; sftmix.recipe calls them in order.

    from sftmix.run import stages
    stages.stage_data(cfg)              # DIR/data/{train,heldout}.jsonl, DIR/data/stats.json
    stages.stage_dynamics(cfg)          # step 1: DIR/confidence.jsonl, DIR/dynamics/split.json, DIR/plots/
    stages.stage_train(cfg, "sftmix")   # steps 2-3: DIR/sftmix/model/, DIR/sftmix/train_result.json
    stages.stage_eval(cfg)              # DIR/eval/{start,R...}.json (details in DIR/eval/<name>/)
    stages.stage_report(cfg)            # DIR/report.{md,json,html}

Each stage's done marker (the last file above; names in sftmix.rundir.RunDir) is written last, atomically; a rerun
skips a done stage, and one whose inputs changed (sftmix.run.fingerprints) runs again. An interrupted training run
resumes from its newest complete Trainer checkpoint (sftmix.utils.resume_checkpoint); the reference run resumes the
same way inside sftmix.confidence.reference.
"""

from __future__ import annotations

import json
import logging
import shutil

from sftmix import tracking
from sftmix.confidence.callback import SelfReferenceCallback, restore_self_confidence
from sftmix.confidence.reference import run_reference
from sftmix.config import settings_of
from sftmix.data import duplicate_stats, is_sharegpt_package, load_records_with_stats, save_records_jsonl, split_heldout
from sftmix.eval.evaluate import run_eval
from sftmix.mixup.trainer import SFTMixTrainer
from sftmix.report import report
from sftmix.report.plots import write_dynamics_plots
from sftmix.run import examples
from sftmix.run import fingerprints as fpr
from sftmix.run.clock import TrainingClock, whole_run_metrics
from sftmix.run.context import is_main, load_model, stage, state, tokenize, train_records, training_config
from sftmix.run.publish import lora_config, publish_model, reuse_reference_as_ntp
from sftmix.rundir import RunDir, read_train_result, write_train_result
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, resume_checkpoint

log = logging.getLogger("sftmix")


# ----------------------------------------------------------------------------------------------------------------
# data


def stage_data(cfg) -> None:
    """Load the data, apply the turn / prompt-length filters, split off the held-out set, write them as JSONL."""
    d = RunDir(cfg.run_dir)
    fpr.fresh(cfg, "data", d.data_stats, fpr.data_inputs(cfg), [d.data])
    with stage(cfg, "data", d.data_stats) as todo:
        if not todo:
            return
        run = cfg.run
        pinned = {e["id"]: e["sha"] for e in cfg.sources.get("data", [])}
        records, stats = load_records_with_stats(run.data, limit=run.data_limit,
                                                 on_bad="skip" if is_sharegpt_package(run.data) else
                                                 run.data_on_bad, dataset_config=run.dataset_config,
                                                 dataset_split=run.dataset_train_split, revisions=pinned)
        filtered = {}
        if run.max_turn is not None:
            kept = [r for r in records if int(r.get("turn") or 1) <= run.max_turn]
            filtered[f"turn > {run.max_turn}"] = len(records) - len(kept)
            records = kept
        if run.max_prompt_chars is not None:
            kept = [r for r in records if sum(len(m["content"]) for m in r["prompt"]) <= run.max_prompt_chars]
            filtered[f"prompt > {run.max_prompt_chars} chars"] = len(records) - len(kept)
            records = kept
        if len(records) < 4:
            raise SFTMixError(f"data {run.data}: only {len(records)} examples left after the filters {filtered}; "
                              f"relax max_turn / max_prompt_chars or give more data.")
        train, held = split_heldout(records, run.n_heldout, seed=cfg.train.seed)
        if len(train) < 4 or (not held and run.heldout):  # heldout: 0 holds none out on purpose
            raise SFTMixError(f"data {run.data}: {len(records)} examples split into {len(train)} train and "
                              f"{len(held)} held-out; adjust heldout (a count or a fraction) or give more data.")
        save_records_jsonl(d.train, train)
        save_records_jsonl(d.heldout, held)
        stats.update(filtered=filtered, n_after_filters=len(records), n_train=len(train), n_heldout=len(held),
                     heldout=run.heldout)
        stats["duplicates"] = _log_duplicates(train, held)
        atomic_write_json(d.data_stats, stats)
        log.info("data: %d train + %d held-out examples (%s)", len(train), len(held),
                 ", ".join(f"{n} dropped for {k}" for k, n in filtered.items()) or "no filter")


def _log_duplicates(train, held) -> dict:
    dup = duplicate_stats(train, held)
    if dup["n_duplicate_copies"]:
        log.info("data: %d exact duplicate copies of %d examples, each example's copies on one side: %d in train, "
                 "%d in held-out", dup["n_duplicate_copies"], dup["n_duplicated_examples"],
                 dup["duplicate_copies_in_train"], dup["duplicate_copies_in_heldout"])
    return dup


# ----------------------------------------------------------------------------------------------------------------
# step 1


def stage_dynamics(cfg) -> None:
    """Step 1: NTP-train the reference, score it at C scoring steps, confidence.jsonl, split, plots."""
    d = RunDir(cfg.run_dir)
    fpr.fresh(cfg, "dynamics", d.split, fpr.dynamics_inputs(cfg), [d.reference, d.dynamics, d.confidence, d.plots])
    examples.restore_confidence(cfg)
    with stage(cfg, "dynamics", d.split) as todo:
        if not todo:
            return
        run, train = cfg.run, cfg.train
        records = train_records(cfg)
        records, selection = examples.step1_records(cfg, records)  # §5.5: step 1 on the selected examples
        spec = run.reference_model or run.model
        model, tok = load_model(cfg, spec)
        ds = tokenize(cfg, records, tok, "reference")
        # The reference is plain NTP on all the data: none of the Mixup / selection fields; its own epochs and lr.
        # Checkpoints: as configured for the target runs (scoring_checkpoints=trainer), or only at each scoring step.
        drop = (*settings_of("mixup", "selection"), "output_dir", "num_train_epochs", "max_steps", "learning_rate",
                "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "save_strategy", "save_steps",
                "save_total_limit", "max_length")  # the last ones: given to run_reference explicitly below
        extra = {k: v for k, v in cfg.train_values.items() if k not in drop}
        if run.scoring_checkpoints == "trainer":  # the effective values (a default one is not in train_values)
            extra.update(save_strategy=train.save_strategy, save_steps=train.save_steps,
                         save_total_limit=train.save_total_limit)
        with tracking.stage_env(cfg, "reference") as names:  # report_to: the reference's own tracker run
            rows = run_reference(
                model, tok, ds, cfg.run_dir, num_checkpoints=run.num_checkpoints,
                num_train_epochs=run.reference_epochs, per_device_train_batch_size=train.per_device_train_batch_size,
                gradient_accumulation_steps=train.gradient_accumulation_steps,
                learning_rate=run.reference_learning_rate or train.learning_rate, seed=train.seed,
                score_batch_size=run.score_batch_size, scoring_checkpoints=run.scoring_checkpoints,
                confidence=run.confidence_mode, show_progress=not train.disable_tqdm, **{**extra, **names})
        n_conf = sum(bool(r["confident"]) for r in rows)
        if is_main():  # step 1 imports nothing from the report: its plots are drawn here
            write_dynamics_plots(cfg.run_dir, rows, records=records, dataset=ds, tokenizer=tok)
        if is_main():  # step 1's scoring points and split, in the same tracker run
            tracking.log_points(cfg, "reference", tracking.step1_points(cfg.run_dir))
            atomic_write_json(d.split, {"confidence_mode": run.confidence_mode, "reference_model": spec,
                                        "n_examples": len(rows), "n_confident": n_conf,
                                        "n_unconfident": len(rows) - n_conf, "selection": selection})
        state().wait_for_everyone()  # the target runs of every process read the split the main one has written
        log.info("dynamics: %d confident / %d unconfident examples (%s confidence)", n_conf, len(rows) - n_conf,
                 run.confidence_mode)


# ----------------------------------------------------------------------------------------------------------------
# steps 2-3: one target run per recipe


def stage_train(cfg, recipe: str) -> None:
    """One target run from the start model: `sftmix` (NTP + Mixup) or `ntp` (mixup_weight=0: trl.SFTTrainer)."""
    d = RunDir(cfg.run_dir)
    one_run = recipe == "sftmix" and cfg.run.reference == "self"
    if recipe == "sftmix" and not one_run and cfg.train.split_source == "dynamics":
        examples.restore_confidence(cfg)  # before its hash is taken: a deleted confidence.jsonl is rebuilt
        fpr.check_step1_current(cfg)
    marker = d.train_result(recipe)
    fpr.fresh(cfg, f"train:{recipe}", marker, fpr.train_inputs(cfg, recipe),
              [d.recipe(recipe)] + ([d.dynamics, d.confidence, d.plots] if one_run else []))
    with stage(cfg, f"train:{recipe}", marker) as todo:
        if not todo:
            if one_run and not d.confidence.exists() and is_main():
                ds, _ = examples.selected_target_dataset(cfg, train_records(cfg))  # the training rows, in order
                restore_self_confidence(cfg.run_dir, list(ds["guid"]))
            return
        if recipe == "ntp" and reuse_reference_as_ntp(cfg):
            if is_main():  # no Trainer ran: the reference's curves become the ntp tracker run's
                tracking.log_points(cfg, "ntp", tracking.history_points(read_train_result(marker)["log_history"]))
            return
        _train(cfg, recipe, one_run)


def _train(cfg, recipe: str, one_run: bool) -> None:
    d = RunDir(cfg.run_dir)
    out = d.recipe(recipe)
    records = train_records(cfg)
    model, tok = load_model(cfg, cfg.run.model)
    ds = tokenize(cfg, records, tok, "target")
    # Selected before the split is joined (step 1 may have scored the selected examples only), so the trainer gets
    # the subset and selects nothing more.
    ds, selection = examples.select_target_examples(cfg, ds)
    callbacks, self_reference = [], None
    if one_run:  # the split comes from this run's own NTP epochs (sftmix.confidence.callback.SelfReferenceCallback)
        online = cfg.run.self_confidence != "checkpoints"  # any online mode (online, online_raw, online_linear)
        args = training_config(cfg, out, selection="none", self_reference_epochs=cfg.run.self_ntp_epochs,
                               record_online_dynamics=online)
        self_reference = SelfReferenceCallback(ds, cfg.run_dir, num_checkpoints=cfg.run.self_num_checkpoints,
                                               batch_size=cfg.run.score_batch_size,
                                               show_progress=not cfg.train.disable_tqdm,
                                               confidence=cfg.run.self_confidence)
    elif recipe == "sftmix":
        ds = examples.with_split(cfg, ds)
        args = training_config(cfg, out, selection="none")
        if not args.mixup_enabled and args.ntp_subset == "all":
            log.warning("recipe sftmix with mixup_weight=0 and no analysis option: this is plain NTP")
    else:
        args = training_config(cfg, out, drop=settings_of("mixup"), mixup_weight=0.0, selection="none")
    callbacks.append(TrainingClock())
    resume = resume_checkpoint(out, f"train:{recipe}")
    with tracking.stage_env(cfg, recipe) as names:  # report_to: one tracker run per recipe
        for key, value in names.items():  # run_name (and trackio's project): set on the built config
            setattr(args, key, value)
        trainer = SFTMixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                peft_config=lora_config(cfg.run), callbacks=callbacks, self_reference=self_reference)
        result = trainer.train(resume_from_checkpoint=resume)
    metrics = whole_run_metrics(trainer, result.metrics, resume)
    if one_run and is_main():
        write_dynamics_plots(cfg.run_dir, read_jsonl(d.confidence), records=records, dataset=ds, tokenizer=tok)
    publish_model(cfg, trainer, tok, recipe)
    if is_main():
        sampler = getattr(trainer, "pair_sampler", None)
        write_train_result(
            d.train_result(recipe), recipe=recipe, metrics=metrics, global_step=trainer.state.global_step,
            log_history=trainer.state.log_history, resumed_from=resume, n_train_examples=len(trainer.train_dataset),
            selection=selection or trainer.selection_description,
            duplicates_per_epoch=getattr(sampler, "duplicates_per_epoch", None),
            mixup_enabled=args.mixup_enabled, mixup_weight=args.mixup_weight,
            confidence_source=("self" if one_run else "separate") if recipe == "sftmix" else None,
            self_confidence=cfg.run.self_confidence if one_run else None, use_peft=cfg.run.use_peft,
            trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
        if not cfg.run.keep_checkpoints:
            for ckpt in out.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    state().wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# evaluation and report


def eval_targets(cfg) -> list[tuple[str, str]]:
    """(name, model spec) of every model to evaluate: the untrained start and each trained recipe."""
    d = RunDir(cfg.run_dir)
    return [("start", cfg.run.model)] + [(r, str(d.model(r))) for r in cfg.run.recipes]


def stage_eval(cfg) -> None:
    """Held-out NLL (and any configured multiple-choice / judge task) of the start model and each recipe."""
    d, ecfg = RunDir(cfg.run_dir), cfg.eval_config()
    for name, spec in eval_targets(cfg):
        marker = d.eval_result(name)
        fpr.fresh(cfg, f"eval:{name}", marker, fpr.eval_inputs(cfg, name, spec, ecfg), [marker],
                  force_reason=fpr.failed_judgments(marker, ecfg.judge_retry_failed))
        with stage(cfg, f"eval:{name}", marker) as todo:
            if not todo or not is_main():
                continue
            trained = read_train_result(d.train_result(name)) if name != "start" else None
            if name != "start" and trained is None:
                raise SFTMixError(f"{d.recipe(name)} has no finished training: run `sftmix train --recipe {name} "
                                  f"--output_dir {cfg.run_dir}` first.")
            model, tok = load_model(cfg, spec)
            results = run_eval(model, tok, ecfg, d.eval_details(name))
            atomic_write_json(marker, {"model": name, "spec": spec, "results": results})
            # the results join the recipe's tracker run at its last step (the start model: a run of its own, step 0)
            step = 0 if name == "start" else trained["global_step"] or 0
            tracking.log_points(cfg, name, tracking.eval_points(results, step))
            del model
    state().wait_for_everyone()


def stage_report(cfg, force: bool = True) -> dict | None:
    """DIR/report.{md,json,html} (main process); the summary, None on the other processes."""
    if not is_main():
        return None
    path = RunDir(cfg.run_dir).report("json")
    with stage(cfg, "report", None if force else path) as todo:
        if todo:
            return report.write_report(cfg)
    return json.loads(path.read_text())


def report_is_stale(cfg) -> bool:
    """Whether the report is older than what it reads (the config, step 1's confidence, an evaluation)."""
    d = RunDir(cfg.run_dir)
    stamp = d.report("json").stat().st_mtime if d.report("json").exists() else 0
    inputs = [d.config, d.confidence, *d.eval.glob("*.json")]
    return any(p.exists() and p.stat().st_mtime > stamp for p in inputs)
