"""The stages of `sftmix run`, each resumable on the same run directory (see sftmix.cli for the command line).

    from sftmix.config import parse_config
    from sftmix.run import pipeline
    cfg = parse_config(["--config", "configs/smoke.yaml", "--output_dir", "runs/smoke"])
    pipeline.run(cfg, "run")          # or "dynamics", "train" (recipe=...), "eval", "report"

Stages and the output that marks each one done (written last, atomically; a rerun skips a done stage):
    data        DIR/data/{train,heldout}.jsonl, DIR/data/stats.json           load, filter, held-out split
    dynamics    DIR/confidence.jsonl, DIR/dynamics/split.json, DIR/plots/      step 1
    (sftmix.confidence.reference.run_reference)
    train:R     DIR/R/model/, DIR/R/train_result.json                         one target run, R in recipes
    eval        DIR/eval/{start,R...}.json (details in DIR/eval/<name>/)      sftmix.eval.evaluate.run_eval per model
    report      DIR/report.{md,json,html}                                    sftmix.report.report
An interrupted target run resumes from its newest complete Trainer checkpoint (DIR/R/checkpoint-*; see
sftmix.utils.checkpoint_problem: weights whole, optimizer, scheduler, trainer state and RNG readable; newer torn ones
are named and removed); the reference run resumes the same way inside sftmix.confidence.reference. DIR/timings.json
holds each
stage's wall time. Before any stage: sftmix.run.validation checks every setting and input; DIR/.lock admits one command
at a time; DIR/fingerprints.json holds the content hashes each stage read, and a stage whose inputs changed reruns (see
sftmix.rundir).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from sftmix import tracking
from sftmix.config import RECIPES, settings_of, unaffected_settings
from sftmix.utils import SFTMixError, atomic_write_json, atomic_write_text, read_jsonl, resume_checkpoint

log = logging.getLogger("sftmix")

# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _state():
    from accelerate import PartialState

    cpu_launch()
    return PartialState()


def cpu_launch() -> None:
    """Under `torchrun` (or `srun`) on machines without an accelerator, tell accelerate to run on the CPU.

    Why: `accelerate launch --cpu` sets ACCELERATE_USE_CPU, torchrun does not, and without it accelerate picks no
    backend on a CPU-only machine: every process would believe it is the only one (each taking the run lock and
    training on all the data), and the Trainer's TrainingArguments would reset the state the same way. With it, both
    set up gloo as under `accelerate launch --cpu`. Called before the first PartialState or training config of the
    process (sftmix.cli does so before parsing the config, which builds one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    import torch

    if not (torch.cuda.is_available() or getattr(torch, "accelerator", None) and torch.accelerator.is_available()):
        os.environ["ACCELERATE_USE_CPU"] = "true"


@contextlib.contextmanager
def _stage(cfg, name: str, done_marker: Path | None, force: bool = False):
    """Run the body unless `done_marker` exists; log and record the stage's wall time. Yields True to run."""
    main = _state().is_main_process
    say = log.info if main else log.debug  # one progress line per stage, not one per process
    if done_marker is not None and done_marker.exists() and not force:
        say("[sftmix] %-12s done already (%s): skipped", name, done_marker)
        yield False
        return
    say("[sftmix] %-12s running", name)
    t0 = time.perf_counter()
    yield True
    seconds = time.perf_counter() - t0
    say("[sftmix] %-12s finished in %.1fs", name, seconds)
    if main:
        path = cfg.run_dir / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[name] = {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(path, timings)


def _device(cfg) -> str:
    """The device to load a model on; under `accelerate launch` each process uses its own GPU (or the CPU for
    FSDP / DeepSpeed, which place and shard the weights themselves)."""
    state = _state()
    if cfg.run.device != "auto" or state.num_processes == 1:
        return cfg.run.device
    from accelerate import DistributedType

    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return "cpu"
    return str(state.device)


def load_model(cfg, spec: str):
    from sftmix.hub import pinned_revision
    from sftmix.models import load_model_and_tokenizer

    if os.path.isdir(spec):  # a damaged weights file is one line naming it, not a loader traceback
        from sftmix.run.validation import check_weights

        check_weights("model", spec, Path(spec))
    t0 = time.perf_counter()
    run = cfg.run
    revision = pinned_revision(cfg.sources, "models", spec) or (  # the sha recorded at the start of the run
        run.reference_model_revision if spec == run.reference_model != run.model else run.model_revision)
    model, tok = load_model_and_tokenizer(spec, dtype=cfg.run.dtype, device=_device(cfg),
                                          chat_template=cfg.run.chat_template, cache_dir=cfg.run.model_cache_dir,
                                          revision=revision, trust_remote_code=cfg.train.trust_remote_code,
                                          attn_implementation=run.attn_implementation)
    log.info("loaded model %s (%s, %s) in %.1fs", spec, next(model.parameters()).dtype,
             next(model.parameters()).device, time.perf_counter() - t0)
    return model, tok


def training_config(cfg, output_dir: Path, drop=(), **forced):
    """An SFTMixConfig for one stage: the run's training values (minus `drop`), then `forced`."""
    from sftmix.mixup.trainer import SFTMixConfig

    values = {k: v for k, v in cfg.train_values.items() if k not in drop}
    values.update(output_dir=str(output_dir), **forced)
    try:
        return SFTMixConfig(**values)
    except SFTMixError:
        raise
    except ValueError as e:
        raise SFTMixError(f"invalid training config for {output_dir}: {e}") from e


def train_records(cfg) -> list[dict]:
    from sftmix.data import load_records

    path = cfg.run_dir / "data" / "train.jsonl"
    if not path.exists():
        raise SFTMixError(f"{path} is missing: run the data stage first (`sftmix run`).")
    return load_records(path)


def tokenize(cfg, records, tokenizer, name: str):
    """Tokenize for training (truncation and dropped examples as in TRL) and record the stats for the report."""
    from sftmix.data import tokenize_records

    ds, stats = tokenize_records(records, tokenizer, max_length=cfg.train.max_length,
                                 max_dropped_fraction=cfg.run.max_dropped_fraction,
                                 source=f"{cfg.run.data} ({name} tokenizer)")
    if _state().is_main_process:
        atomic_write_json(cfg.run_dir / "data" / f"tokenize_{name}.json", stats)
    return ds


# ----------------------------------------------------------------------------------------------------------------
# config.yaml


def write_config(cfg) -> None:
    """Write DIR/config.yaml (the resolved config) first; refuse a run directory made with a different config."""
    import yaml

    path = cfg.run_dir / "config.yaml"
    new = _plain(cfg.flat())
    if path.exists():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if old == new:
            return  # unchanged: keep the file (and its mtime, which tells the report whether it is stale)
        # a field absent from one file (an older version wrote fewer keys) has its default there
        defaults, unaffected = _config_defaults(), unaffected_settings("run")
        old, new = {**defaults, **old}, {**defaults, **new}
        changed = sorted(k for k in set(old) | set(new) if k not in unaffected
                         and old.get(k) != new.get(k) and k != "output_dir")
        if changed and not any((cfg.run_dir / r).exists() for r in RECIPES):
            # no target run has started: what only they read may still change (a setting refused after the data
            # stage, e.g. by validation.check_step_counts, is corrected on the same directory)
            changed = [k for k in changed if k not in unaffected_settings("dynamics", cfg)]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
            more = f" and {len(changed) - 3} more ({', '.join(changed[3:])})" if len(changed) > 3 else ""
            raise SFTMixError(f"{cfg.run_dir} holds a run made with another config ({diff}{more}); use another "
                              f"--output_dir, or delete that directory to start over.")
    if not _state().is_main_process:
        return
    from sftmix.hub import sources_comment

    text = (f"# Resolved sftmix config (from {cfg.source}); rerun with:\n"
            f"#   sftmix run --config {path}\n" + sources_comment(cfg.sources) +
            yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    atomic_write_text(path, text)


def _resolve_sources(cfg) -> dict:
    """The commit sha of every Hub model and dataset of the run (sftmix.hub.run_sources); DIR/sources.json's when it
    has them (a resumed run loads what it started with)."""
    from sftmix.hub import run_sources

    path = cfg.run_dir / "sources.json"
    return run_sources(cfg.run, json.loads(path.read_text()) if path.exists() else None)


def _save_sources(cfg) -> None:
    """DIR/sources.json, written once write_config has accepted the run directory."""
    if _state().is_main_process and (cfg.sources.get("models") or cfg.sources.get("data")):
        atomic_write_json(cfg.run_dir / "sources.json", cfg.sources)


def _config_defaults() -> dict:
    """Every field's default as the parser sets it (run, training with the pipeline's defaults, evaluation)."""
    from sftmix.config import RUN_TRAINING_DEFAULTS, RunConfig, _eval_args_class, _field_defaults
    from sftmix.mixup.trainer import SFTMixConfig

    return _plain({**_field_defaults(SFTMixConfig), **RUN_TRAINING_DEFAULTS, **_field_defaults(RunConfig),
                   **_field_defaults(_eval_args_class())})


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):  # enums
        return obj.value
    return obj


# ----------------------------------------------------------------------------------------------------------------
# fingerprints: what each stage read, by content (sftmix.rundir.Fingerprints)


def _fingerprints(cfg):
    from sftmix.rundir import Fingerprints

    return Fingerprints(cfg.run_dir, write=_state().is_main_process)


def _fresh(cfg, stage: str, marker: Path, inputs: dict, clear: list, force_reason: str | None = None) -> None:
    """Rerun `stage` (its outputs `clear` removed) when what it read changed since it ran; see rundir.refresh."""
    state = _state()
    if state.is_main_process:
        _fingerprints(cfg).refresh(stage, marker, inputs, clear=clear, force_reason=force_reason)
    state.wait_for_everyone()  # the other processes see the done marker only once it is known to be current


def _rel(cfg, path) -> str:
    """A path as fingerprints name it: relative to the run directory when inside it, so a moved run directory is
    not a changed input."""
    try:
        return str(Path(path).resolve().relative_to(cfg.run_dir.resolve()))
    except ValueError:
        return str(path)


def _template_inputs(fp, template: str | None, label: str = "chat template") -> dict:
    return {f"{label} file {template}": fp.digest(template)} if template and os.path.isfile(template) else {}


def _data_inputs(cfg) -> dict:
    """Each data source by content: a local file or folder by its hash, a Hub dataset by the commit sha recorded in
    sources.json (a new commit is a change), `sharegpt:N` by the package's file."""
    fp, out = _fingerprints(cfg), {}
    from sftmix.hub import pinned_revision

    for data in cfg.run.data if isinstance(cfg.run.data, list) else [cfg.run.data]:
        if os.path.exists(data):
            out[f"data file {data}"] = fp.digest(data)
        elif data.startswith("sharegpt:"):
            from sftmix.data import sharegpt_package_file

            try:
                out[f"data {data}"] = fp.digest(sharegpt_package_file())
            except (SFTMixError, OSError):
                out[f"data {data}"] = data
        else:
            from sftmix.hub import dataset_spec

            repo_id = (dataset_spec(data) or (data,))[0]  # ID[:CONFIG[:SPLIT]]: the id's commit
            out[f"data {data}"] = pinned_revision(getattr(cfg, "sources", None), "data", repo_id) or data
    return out


def _split_input(fp, cfg) -> dict:
    path = cfg.run_dir / "data" / "train.jsonl"
    return {f"training split {_rel(cfg, path)}": fp.digest(path)} if path.exists() else {}


def _dynamics_inputs(cfg) -> dict:
    fp = _fingerprints(cfg)
    spec = cfg.run.reference_model or cfg.run.model
    return {**_split_input(fp, cfg), f"reference model {spec}": fp.model_digest(spec, cfg.run.model_cache_dir),
            **_template_inputs(fp, cfg.run.chat_template)}


def _train_inputs(cfg, recipe: str) -> dict:
    fp, d = _fingerprints(cfg), cfg.run_dir
    out = {**_split_input(fp, cfg), f"start model {cfg.run.model}": fp.model_digest(cfg.run.model,
                                                                                     cfg.run.model_cache_dir),
           **_template_inputs(fp, cfg.run.chat_template)}
    if recipe == "sftmix" and cfg.run.reference == "self":
        return out  # one run: confidence.jsonl is this stage's output, not its input
    if recipe == "sftmix" and cfg.train.split_source == "dynamics":
        _restore_confidence(cfg, d / "dynamics" / "split.json")
        _check_step1_current(cfg, fp)
        for path in (d / "confidence.jsonl", d / "dynamics" / "hidden_final.npz"):
            if path.exists() and (path.suffix == ".jsonl" or cfg.train.pairing == "nearest"):
                out[f"step 1's {_rel(cfg, path)}"] = fp.digest(path)
    return out


def _check_step1_current(cfg, fp) -> None:
    """The Mixup recipe trains on step 1's split: refuse one computed on another training split (the data changed
    and only `sftmix train` ran since), rather than mix by stale confidence."""
    done = fp.stages.get("dynamics") or {}
    now = _split_input(fp, cfg)
    if (cfg.run_dir / "dynamics" / "split.json").exists() and done and any(done.get(k) != v for k, v in now.items()):
        raise SFTMixError(f"step 1 ({cfg.run_dir / 'confidence.jsonl'}) was computed on another training split (the "
                          f"data changed since): run `sftmix dynamics --output_dir {cfg.run_dir}` (or `sftmix run`) "
                          f"first.")


def _eval_inputs(cfg, name: str, spec: str, ecfg) -> dict:
    """The weights evaluated (by content, not by path), every evaluation file and every evaluation setting."""
    import dataclasses

    fp = _fingerprints(cfg)
    if name == "start":
        out = {f"start model {spec}": fp.model_digest(spec, cfg.run.model_cache_dir)}
    else:
        out = {f"weights of {_rel(cfg, spec)}": fp.digest(spec) if os.path.isdir(spec) else None}
    for f in dataclasses.fields(ecfg):
        value = getattr(ecfg, f.name)
        if f.name in ("overwrite", "judge_api_key", "judge_cache_file", "judge_retry_failed"):
            continue
        if f.name.endswith("_file") and value and os.path.isfile(value):
            out[f"{f.name} {_rel(cfg, value)}"] = fp.digest(value)
        else:
            out[f"setting {f.name}"] = value
    out.update(_template_inputs(fp, ecfg.chat_template, "eval chat template"))
    return out


def _failed_judgments(marker: Path, retry_failed: bool = False) -> str | None:
    """A reason to rerun an evaluation whose judge failed on some requests (successful judgments are cached)."""
    if not marker.exists():
        return None
    try:
        results = json.loads(marker.read_text(encoding="utf-8")).get("results") or {}
    except (OSError, ValueError):
        return None
    # deterministic failures stay failed (judge_retry_failed asks them again, sftmix.eval.judge): only the transient
    # ones (or every one, in a result written before failures had kinds) make the evaluation run again
    from sftmix.eval.evaluate import _judgments_to_retry

    failed = {t: n for t, m in results.items() if isinstance(m, dict) and (n := _judgments_to_retry(m, retry_failed))}
    if not failed:
        return None
    return "judgments failed in " + ", ".join(f"{t} ({n})" for t, n in failed.items()) + ": retrying them"


def _restore_confidence(cfg, marker: Path) -> None:
    """confidence.jsonl deleted after step 1: rebuild it from dynamics/ckpt_*.jsonl, or mark step 1 to run again
    (it resumes from its checkpoints and skips scored ones), so that no command waits on another."""
    conf = cfg.run_dir / "confidence.jsonl"
    if not marker.exists() or conf.exists() or not _state().is_main_process:
        return
    if cfg.run.confidence_mode == "checkpoints":
        from sftmix.confidence.reference import build_confidence

        try:
            build_confidence(cfg.run_dir, cfg.run.num_checkpoints)
            log.warning("[sftmix] %s was missing: rebuilt from %s/ckpt_*.jsonl", conf, cfg.run_dir / "dynamics")
            return
        except SFTMixError as e:
            log.warning("[sftmix] %s is missing and cannot be rebuilt (%s): rerunning step 1", conf, e)
    else:
        log.warning("[sftmix] %s is missing: rerunning step 1", conf)
    marker.unlink()


# ----------------------------------------------------------------------------------------------------------------
# stages


def stage_data(cfg) -> None:
    """Load the data, apply the turn / prompt-length filters, split off the held-out set, write them as JSONL."""
    from sftmix.data import (
        is_sharegpt_package,
        load_records_with_stats,
        save_records_jsonl,
        split_heldout,
    )

    out = cfg.run_dir / "data"
    _fresh(cfg, "data", out / "stats.json", _data_inputs(cfg), [out])
    with _stage(cfg, "data", out / "stats.json") as todo:
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
        save_records_jsonl(out / "train.jsonl", train)
        save_records_jsonl(out / "heldout.jsonl", held)
        stats.update(filtered=filtered, n_after_filters=len(records), n_train=len(train), n_heldout=len(held),
                     heldout=run.heldout)
        stats["duplicates"] = _log_duplicates(train, held)
        atomic_write_json(out / "stats.json", stats)
        log.info("data: %d train + %d held-out examples (%s)", len(train), len(held),
                 ", ".join(f"{n} dropped for {k}" for k, n in filtered.items()) or "no filter")


def _log_duplicates(train, held) -> dict:
    from sftmix.data import duplicate_stats

    dup = duplicate_stats(train, held)
    if dup["n_duplicate_copies"]:
        log.info("data: %d exact duplicate copies of %d examples, each example's copies on one side: %d in train, "
                 "%d in held-out", dup["n_duplicate_copies"], dup["n_duplicated_examples"],
                 dup["duplicate_copies_in_train"], dup["duplicate_copies_in_heldout"])
    return dup


def stage_dynamics(cfg) -> None:
    """Step 1: NTP-train the reference, score it at C checkpoints, confidence.jsonl, split, plots."""
    from sftmix.confidence.reference import run_reference

    marker = cfg.run_dir / "dynamics" / "split.json"
    d = cfg.run_dir
    _fresh(cfg, "dynamics", marker, _dynamics_inputs(cfg),
           [d / "reference", d / "dynamics", d / "confidence.jsonl", d / "plots"])
    _restore_confidence(cfg, marker)
    with _stage(cfg, "dynamics", marker) as todo:
        if not todo:
            return
        run, train = cfg.run, cfg.train
        records = train_records(cfg)
        records, selection = _step1_records(cfg, records)  # §5.5: the paper runs step 1 on the selected examples
        spec = run.reference_model or run.model
        model, tok = load_model(cfg, spec)
        ds = tokenize(cfg, records, tok, "reference")
        online = run.confidence_mode == "online"
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
                score_batch_size=run.score_batch_size, scoring_checkpoints=run.scoring_checkpoints, online=online,
                online_split=online, records=records, show_progress=not train.disable_tqdm, **{**extra, **names})
        if _state().is_main_process:  # step 1's scoring points and split, in the same tracker run
            tracking.log_points(cfg, "reference", tracking.step1_points(cfg.run_dir))
        n_conf = sum(bool(r["confident"]) for r in rows)
        if _state().is_main_process:
            atomic_write_json(marker, {"confidence_mode": run.confidence_mode, "reference_model": spec,
                                       "n_examples": len(rows), "n_confident": n_conf,
                                       "n_unconfident": len(rows) - n_conf, "selection": selection})
        _state().wait_for_everyone()  # the target runs of every process read the split the main one has written
        log.info("dynamics: %d confident / %d unconfident examples (%s confidence)", n_conf, len(rows) - n_conf,
                 run.confidence_mode)


def stage_train(cfg, recipe: str) -> None:
    """One target run from the start model: `sftmix` (NTP + Mixup) or `ntp` (mixup_weight=0: trl.SFTTrainer)."""
    from sftmix.mixup.trainer import SFTMixTrainer

    out = cfg.run_dir / recipe
    one_run = recipe == "sftmix" and cfg.run.reference == "self"
    d = cfg.run_dir
    _fresh(cfg, f"train:{recipe}", out / "train_result.json", _train_inputs(cfg, recipe),
           [out] + ([d / "dynamics", d / "confidence.jsonl", d / "plots"] if one_run else []))
    with _stage(cfg, f"train:{recipe}", out / "train_result.json") as todo:
        if not todo:
            if one_run and not (d / "confidence.jsonl").exists() and _state().is_main_process:
                from sftmix.confidence.callback import restore_self_confidence

                ds, _ = _selected_target_dataset(cfg, train_records(cfg))  # the training rows, in order
                restore_self_confidence(d, list(ds["guid"]))
            return
        state = _state()
        if recipe == "ntp" and _reuse_reference_as_ntp(cfg, out):
            if state.is_main_process:  # no Trainer ran: the reference's curves become the ntp tracker run's
                history = json.loads((out / "train_result.json").read_text())["log_history"]
                tracking.log_points(cfg, "ntp", tracking.history_points(history))
            return
        records = train_records(cfg)
        model, tok = load_model(cfg, cfg.run.model)
        ds = tokenize(cfg, records, tok, "target")
        # Selected before the split is joined (step 1 may have scored the selected examples only), so the trainer
        # gets the subset and selects nothing more.
        ds, selection = select_target_examples(cfg, ds)
        callbacks, self_reference = [], None
        if one_run:  # the split comes from this run's own NTP epochs (sftmix.confidence.callback.SelfReferenceCallback)
            from sftmix.confidence.callback import SelfReferenceCallback

            online = cfg.run.self_confidence != "checkpoints"  # any online mode (online, online_raw, online_linear)
            args = training_config(cfg, out, selection="none", self_reference_epochs=cfg.run.self_ntp_epochs,
                                   record_online_dynamics=online)
            self_reference = SelfReferenceCallback(ds, cfg.run_dir, num_checkpoints=cfg.run.self_num_checkpoints,
                                                   batch_size=cfg.run.score_batch_size,
                                                   show_progress=not cfg.train.disable_tqdm,
                                                   confidence=cfg.run.self_confidence)
        elif recipe == "sftmix":
            ds = _with_split(cfg, ds)
            args = training_config(cfg, out, selection="none")
            if not args.mixup_enabled and args.ntp_subset == "all":
                log.warning("recipe sftmix with mixup_weight=0 and no analysis option: this is plain NTP")
        else:
            args = training_config(cfg, out, drop=settings_of("mixup"), mixup_weight=0.0, selection="none")
        callbacks.append(_training_clock()())
        resume = resume_checkpoint(out, f"train:{recipe}")
        with tracking.stage_env(cfg, recipe) as names:  # report_to: one tracker run per recipe
            for key, value in names.items():  # run_name (and trackio's project): set on the built config
                setattr(args, key, value)
            trainer = SFTMixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                    peft_config=lora_config(cfg.run), callbacks=callbacks,
                                    self_reference=self_reference)
            result = trainer.train(resume_from_checkpoint=resume)
        metrics = _whole_run_metrics(trainer, result.metrics, resume)
        if one_run and state.is_main_process:
            from sftmix.report.plots import write_dynamics_plots

            write_dynamics_plots(cfg.run_dir, read_jsonl(cfg.run_dir / "confidence.jsonl"), records=records,
                                 dataset=ds, tokenizer=tok)
        final, tmp = out / "model", out / "model.tmp"
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        state.wait_for_everyone()
        trainer.save_model(str(tmp))  # every process: FSDP / ZeRO-3 gather the weights for the save
        if state.is_main_process:
            tok.save_pretrained(str(tmp))
            if cfg.run.use_peft:
                _merge_lora(cfg, tmp, out / "adapter", tok)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            sampler = getattr(trainer, "pair_sampler", None)
            atomic_write_json(out / "train_result.json", {
                "recipe": recipe, "metrics": metrics, "global_step": trainer.state.global_step,
                "resumed_from": resume, "n_train_examples": len(trainer.train_dataset),
                "selection": selection or trainer.selection_description,
                "duplicates_per_epoch": getattr(sampler, "duplicates_per_epoch", None),
                "mixup_enabled": args.mixup_enabled, "mixup_weight": args.mixup_weight,
                "confidence_source": ("self" if one_run else "separate") if recipe == "sftmix" else None,
                "self_confidence": cfg.run.self_confidence if one_run else None,
                "use_peft": cfg.run.use_peft,
                "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "log_history": trainer.state.log_history,
            })
            if not cfg.run.keep_checkpoints:
                for ckpt in out.glob("checkpoint-*"):
                    shutil.rmtree(ckpt, ignore_errors=True)
        state.wait_for_everyone()


@functools.cache
def _training_clock():
    """The class of a Trainer callback that counts the training seconds of the steps the weights hold, across
    resumes: its count is saved in each checkpoint's trainer state (transformers' ExportableState) and read back
    from it. (Built on first use: this module does not import transformers at import time.)"""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TrainingClock(TrainerCallback, ExportableState):
        def __init__(self, seconds_before: float = 0.0):
            self.seconds_before, self.t0 = float(seconds_before), None

        def on_train_begin(self, args, state, control, **kwargs):
            # a resumed run's state is the checkpoint's, with this count as saved there (read here: transformers
            # restores callback states only with restore_callback_states_from_checkpoint)
            saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
            if isinstance(saved, list):
                saved = saved[0] if saved else None
            if saved:
                self.seconds_before = float(saved.get("args", {}).get("seconds_before", 0.0))
            self.t0 = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.seconds_before + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)

        def state(self) -> dict:
            return {"args": {"seconds_before": self.seconds}, "attributes": {}}

    return TrainingClock


def _whole_run_metrics(trainer, metrics: dict, resume: str | None) -> dict:
    """The Trainer's train metrics, for the whole run: after a resume, its train_loss sums only the resumed steps
    (divided by all of them) and train_runtime is the resumed part's. Then the loss is the mean of the logged losses
    of the whole run (the log history is restored with the checkpoint), weighted by the steps each covers, and the
    runtime the training clock's (saved in the checkpoints); the resumed part's own values are kept beside them."""
    if not resume:
        return dict(metrics)
    out = {**metrics, "resumed_part": {k: metrics.get(k) for k in ("train_loss", "train_runtime")}}
    logged, prev, total, steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h], 0, 0.0, 0
    for h in logged:
        n = h["step"] - prev
        if n > 0:
            total, steps, prev = total + h["loss"] * n, steps + n, h["step"]
    if steps:
        out["train_loss"] = total / steps
    clocks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _training_clock())]
    if clocks:
        out["train_runtime"] = round(clocks[0].seconds, 4)
    return out


def lora_config(run):
    """The peft.LoraConfig of a run (paper §5.6; TRL's own get_peft_config on the same fields), None without LoRA."""
    if not run.use_peft:
        return None
    from trl import ModelConfig, get_peft_config

    modules = run.lora_target_modules
    peft_config = get_peft_config(ModelConfig(use_peft=True, lora_r=run.lora_r, lora_alpha=run.lora_alpha,
                                              lora_dropout=run.lora_dropout, lora_target_modules=modules))
    if modules and list(modules) != ["all-linear"]:
        # ModelConfig turns a list of one into its string, which PEFT reads as a regex of the full module name
        # (`q_proj` then matches no module): PEFT's list form matches module names by their last part
        peft_config.target_modules = set(modules)
    return peft_config


def _merge_lora(cfg, folder: Path, adapter_dir: Path, tok) -> None:
    """`folder` holds a LoRA adapter (what save_model writes for a PEFT model): move it to `adapter_dir` and write the
    start model with the adapter merged into `folder` instead, so that evaluation (and users) load a plain model. The
    start model is loaded afresh, so this works however training was sharded."""
    from peft import PeftModel

    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(folder, adapter_dir)
    base, _ = load_model(cfg, cfg.run.model)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def _reference_ntp_checkpoint(cfg) -> Path | None:
    """The reference's final checkpoint when the reference run *is* the NTP baseline, else None.

    Step 1 trains the reference with plain NTP (SFTMixTrainer with mixup_weight=0) from the same start, on the same
    training split, with the same seed, batch and optimizer settings. When its model, epochs and learning rate are
    also the target's (and no selection, LoRA, max_steps or online recording changes the run), the NTP baseline
    would repeat it step for step: its final checkpoint is reused instead of training the same model twice."""
    run, tr = cfg.run, cfg.train
    same = ((run.reference_model or run.model) == run.model and not run.use_peft and run.reference == "separate"
            and run.confidence_mode == "checkpoints" and run.reference_epochs == tr.num_train_epochs
            and (run.reference_learning_rate or tr.learning_rate) == tr.learning_rate
            and tr.max_steps <= 0 and tr.selection == "none" and _state().num_processes == 1)
    schedule = cfg.run_dir / "dynamics" / "schedule.json"
    if not same or not schedule.exists():
        return None
    ckpt = cfg.run_dir / "reference" / f"checkpoint-{json.loads(schedule.read_text())['max_steps']}"
    complete = (ckpt / "config.json").exists() and (ckpt / "trainer_state.json").exists() and any(
        ckpt.glob("model*.safetensors"))
    return ckpt if complete else None


def _reuse_reference_as_ntp(cfg, out: Path) -> bool:
    ckpt = _reference_ntp_checkpoint(cfg)
    if ckpt is None:
        return False
    log.info("train:ntp: the reference run of step 1 is this NTP run (same start, data, seed and settings): "
             "reusing its final checkpoint %s", ckpt)
    final, tmp = out / "model", out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skip = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.startswith(skip):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # The reference run's own training metrics (train_loss, runtime) and example count are this run's.
    ref_result = cfg.run_dir / "reference" / "train_result.json"
    ref = json.loads(ref_result.read_text()) if ref_result.exists() else {}
    metrics, n_train = ref.get("metrics", {}), ref.get("n_train_examples")
    atomic_write_json(out / "train_result.json", {
        "recipe": "ntp", "metrics": metrics, "global_step": state["global_step"], "resumed_from": None,
        "reused_reference_checkpoint": str(ckpt), "n_train_examples": n_train, "selection": "all examples",
        "duplicates_per_epoch": None, "mixup_enabled": False, "mixup_weight": 0.0,
        "log_history": state["log_history"],
    })
    return True


def _with_split(cfg, ds):
    """Add the confident/unconfident split (and, for nearest pairing, the reference's hidden states) by guid."""
    import numpy as np

    from sftmix.confidence.reference import join_confidence

    if cfg.train.split_source == "column":
        return ds  # the split column travels with the records
    path = cfg.run_dir / "confidence.jsonl"
    _restore_confidence(cfg, cfg.run_dir / "dynamics" / "split.json")
    if not path.exists():
        raise SFTMixError(f"{path} is missing: run step 1 first (`sftmix dynamics --output_dir {cfg.run_dir}`), or "
                          f"set split_source=column with a split_column.")
    ds = join_confidence(ds, read_jsonl(path))
    if cfg.train.pairing == "nearest":
        hidden = cfg.run_dir / "dynamics" / "hidden_final.npz"
        if not hidden.exists():
            raise SFTMixError(f"pairing=nearest needs {hidden} (written by step 1); rerun `sftmix dynamics`.")
        with np.load(hidden) as z:
            pos = {str(g): i for i, g in enumerate(z["guid"])}
            emb = z["hidden"]
        ds = ds.add_column("pairing_embedding", [emb[pos[g]].tolist() for g in ds["guid"]])
    return ds


def select_target_examples(cfg, ds):
    """The data selection of the run (paper §5.5) on a dataset tokenized by the target's tokenizer, as
    sftmix.confidence.split.select_examples ranks it: (dataset, description), or (ds, None) without a selection."""
    from sftmix.confidence.split import select_examples

    if cfg.train.selection == "none":
        return ds, None
    return select_examples(ds, cfg.train)


def _selected_target_dataset(cfg, records):
    """The selected examples as the target runs will see them (target tokenizer only, no weights loaded)."""
    from sftmix.models import load_tokenizer

    tok = load_tokenizer(cfg.run.model, chat_template=cfg.run.chat_template, cache_dir=cfg.run.model_cache_dir)
    return select_target_examples(cfg, tokenize(cfg, records, tok, "target"))


def _step1_records(cfg, records):
    """The records step 1 runs on, and the selection's description: with a selection and selection_split=subset
    (the paper's §5.5: select first, then train NTP / SFTMix on the selection, whose halves come from a reference
    trained on it), only the selected records; otherwise all of them (None)."""
    if cfg.train.selection == "none" or cfg.run.selection_split != "subset":
        return records, None
    ds, desc = _selected_target_dataset(cfg, records)
    keep = set(ds["guid"])
    log.info("dynamics: step 1 on the selected subset (selection_split=subset): %s", desc)
    return [r for r in records if r["guid"] in keep], desc


def check_split_halves(cfg) -> None:
    """Refuse, before any training, a selection (or label split) that leaves fewer than 2 examples in a half of the
    SFTMix split, which the balanced sampler needs; one line naming the counts and the fix."""
    from sftmix.confidence.reference import join_confidence
    from sftmix.confidence.split import confident_flags

    train = cfg.train
    if (train.selection == "none" and train.split_source != "column") or (
            cfg.run_dir / "sftmix" / "train_result.json").exists() or cfg.run.reference == "self":
        return  # reference=self: the run splits its own (selected) examples at the median
    path = cfg.run_dir / "confidence.jsonl"
    if train.split_source == "dynamics" and not path.exists():
        return  # no split yet (`sftmix train` before step 1): stage_train names the missing file
    ds, desc = _selected_target_dataset(cfg, train_records(cfg))
    if train.split_source == "dynamics":
        ds = join_confidence(ds, read_jsonl(path))
    flags = confident_flags(ds, train)
    n_conf, n_unconf = int(flags.sum()), int((~flags).sum())
    if min(n_conf, n_unconf) >= 2:
        return
    if train.split_source == "column":
        source = f"the split column {train.split_column!r}"
    elif cfg.run.selection_split == "all":
        source = "step 1's split of all the data (selection_split=all)"
    else:
        source = "step 1's split"
    what = f"selection={train.selection} ({desc})" if desc else "the data"
    fix = ("use selection_split=subset (step 1 on the selected examples, equal halves), or relax the selection"
           if train.split_source == "dynamics" and cfg.run.selection_split == "all" else
           "relax the selection or use another split")
    raise SFTMixError(f"{what} leaves {n_conf} confident and {n_unconf} unconfident examples by {source}; SFTMix "
                      f"needs at least 2 in each half: {fix}.")


def eval_targets(cfg) -> list[tuple[str, str]]:
    """(name, model spec) of every model to evaluate: the untrained start and each trained recipe."""
    return [("start", cfg.run.model)] + [(r, str(cfg.run_dir / r / "model")) for r in cfg.run.recipes]


def stage_eval(cfg) -> None:
    """Held-out NLL (and any configured multiple-choice / judge task) of the start model and each recipe."""
    from sftmix.eval.evaluate import run_eval

    state = _state()
    ecfg = cfg.eval_config()
    for name, spec in eval_targets(cfg):
        marker = cfg.run_dir / "eval" / f"{name}.json"
        _fresh(cfg, f"eval:{name}", marker, _eval_inputs(cfg, name, spec, ecfg), [marker],
               force_reason=_failed_judgments(marker, ecfg.judge_retry_failed))
        with _stage(cfg, f"eval:{name}", marker) as todo:
            if not todo or not state.is_main_process:
                continue
            if name != "start" and not (cfg.run_dir / name / "train_result.json").exists():
                raise SFTMixError(f"{cfg.run_dir / name} has no finished training: run `sftmix train --recipe {name} "
                                  f"--output_dir {cfg.run_dir}` first.")
            model, tok = load_model(cfg, spec)
            results = run_eval(model, tok, ecfg, cfg.run_dir / "eval" / name)
            atomic_write_json(marker, {"model": name, "spec": spec, "results": results})
            # the results join the recipe's tracker run at its last step (the start model: a run of its own, step 0)
            step = 0 if name == "start" else json.loads(
                (cfg.run_dir / name / "train_result.json").read_text()).get("global_step") or 0
            tracking.log_points(cfg, name, tracking.eval_points(results, step))
            del model
    state.wait_for_everyone()


def stage_report(cfg, force: bool = True) -> dict | None:
    from sftmix.report import report

    if not _state().is_main_process:
        return None
    with _stage(cfg, "report", None if force else cfg.run_dir / "report.json") as todo:
        if todo:
            return report.write_report(cfg)
    return json.loads((cfg.run_dir / "report.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# commands


def run(cfg, command: str, recipe: str | None = None) -> int:
    """Run `command` (run, dynamics, train, eval, report) on cfg.run_dir; returns the exit code."""
    from sftmix.run.validation import make_run_dir, validate
    from sftmix.rundir import RunLock, check_shared_run_dir

    t0 = time.perf_counter()
    validate(cfg, command)  # every setting and input file, before anything is written or trained
    _check_deepspeed_used(cfg)
    make_run_dir(cfg.run_dir)
    # one command at a time on a run directory (the main process holds the lock for all under accelerate launch)
    lock = RunLock(cfg.run_dir, " ".join(sys.argv) or command) if _state().is_main_process \
        else contextlib.nullcontext()
    with lock:
        check_shared_run_dir(cfg.run_dir)  # several nodes: every process must see what the main one writes
        return _run(cfg, command, recipe, t0)


def _check_deepspeed_used(cfg) -> None:
    """Refuse `deepspeed` on several CPU processes: transformers then sets up plain DDP (its CPU branch comes before
    DeepSpeed's) and would drop the setting without a word."""
    from accelerate import DistributedType

    state = _state()
    if cfg.train.deepspeed and state.num_processes > 1 and state.distributed_type != DistributedType.DEEPSPEED:
        raise SFTMixError(f"deepspeed={cfg.train.deepspeed} would be ignored: these {state.num_processes} processes "
                          f"run on the CPU, where accelerate trains with plain DDP; remove --deepspeed (DDP is what "
                          f"runs), or launch on GPUs (accelerate launch --config_file "
                          f"configs/accelerate/deepspeed_zero3.yaml ...).")


def _run(cfg, command: str, recipe: str | None, t0: float) -> int:
    from sftmix.report import report

    if cfg.run.num_threads:
        import torch

        torch.set_num_threads(cfg.run.num_threads)
    if _state().is_main_process:
        from sftmix.console import log_to_file

        log_to_file(cfg.run_dir)  # the libraries' full output; the console keeps one line per stage
    if command != "report":  # Hub ids -> commit shas, before anything runs (offline / gated errors come first)
        cfg.sources = _resolve_sources(cfg)
    write_config(cfg)
    _save_sources(cfg)
    state = _state()
    needs_split = ("sftmix" in cfg.run.recipes and cfg.train.split_source == "dynamics"
                   and cfg.run.reference == "separate")  # reference=self: the sftmix run takes its own split
    if command == "report":
        report.print_comparison(stage_report(cfg))
        return 0
    with state.main_process_first():
        stage_data(cfg)
    if command in ("train", "run"):
        from sftmix.run.validation import check_step_counts

        check_step_counts(cfg, len(train_records(cfg)))  # needs the data's size; still before any training
    if command in ("dynamics",) or (command == "run" and needs_split):
        stage_dynamics(cfg)
    if command in ("train", "run"):
        if "sftmix" in ([recipe] if recipe else cfg.run.recipes):
            check_split_halves(cfg)  # before any training: a lopsided selection fails now, not after the NTP run
        for r in [recipe] if recipe else cfg.run.recipes:
            stage_train(cfg, r)
    if command in ("eval", "run"):
        stage_eval(cfg)
    if command == "run":
        stamp = (cfg.run_dir / "report.json").stat().st_mtime if (cfg.run_dir / "report.json").exists() else 0
        inputs = [cfg.run_dir / "config.yaml", cfg.run_dir / "confidence.jsonl",
                  *(cfg.run_dir / "eval").glob("*.json")]
        stale = any(p.exists() and p.stat().st_mtime > stamp for p in inputs)
        summary = stage_report(cfg, force=stale)
        if summary is not None:
            report.print_comparison(summary)
            log.info("[sftmix] done in %.1fs: %s", time.perf_counter() - t0, cfg.run_dir / "report.html")
    return 0

