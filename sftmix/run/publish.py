"""A target run's model as DIR/R/model (written whole or not at all), its LoRA config, the NTP run reused from step 1.

    from sftmix.run import publish
    trainer = SFTMixTrainer(..., peft_config=publish.lora_config(cfg.run))
    publish.publish_model(cfg, trainer, tok, "sftmix")      # DIR/sftmix/model (LoRA: merged, adapter beside it)
    if publish.reuse_reference_as_ntp(cfg): ...             # DIR/ntp is step 1's reference run: nothing to train
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peft import PeftModel
from trl import ModelConfig, get_peft_config

from sftmix.run.context import is_main, load_model, state
from sftmix.rundir import RunDir, read_train_result, write_train_result
from sftmix.utils import atomic_dir

log = logging.getLogger("sftmix")


def lora_config(run):
    """The peft.LoraConfig of a run (paper §5.6; TRL's own get_peft_config on the same fields), None without LoRA."""
    if not run.use_peft:
        return None
    modules = run.lora_target_modules
    peft_config = get_peft_config(ModelConfig(use_peft=True, lora_r=run.lora_r, lora_alpha=run.lora_alpha,
                                              lora_dropout=run.lora_dropout, lora_target_modules=modules))
    if modules and list(modules) != ["all-linear"]:
        # ModelConfig turns a list of one into its string, which PEFT reads as a regex of the full module name
        # (`q_proj` then matches no module): PEFT's list form matches module names by their last part
        peft_config.target_modules = set(modules)
    return peft_config


def publish_model(cfg, trainer, tok, recipe: str) -> None:
    """Save the trained model and its tokenizer as DIR/R/model, atomically (a killed save leaves no half model).
    Collective: every process calls it (FSDP / ZeRO-3 gather the weights for the save); the main one publishes."""
    d, main = RunDir(cfg.run_dir), is_main()
    with atomic_dir(d.model(recipe), publish=main) as tmp:
        state().wait_for_everyone()  # the main process has emptied the folder the others save into
        trainer.save_model(str(tmp))
        if main:
            tok.save_pretrained(str(tmp))
            if cfg.run.use_peft:
                merge_lora(cfg, tmp, d.adapter(recipe), tok)


def merge_lora(cfg, folder: Path, adapter_dir: Path, tok) -> None:
    """`folder` holds a LoRA adapter (what save_model writes for a PEFT model): move it to `adapter_dir` and write the
    start model with the adapter merged into `folder` instead, so that evaluation (and users) load a plain model. The
    start model is loaded afresh, so this works however training was sharded."""
    shutil.rmtree(adapter_dir, ignore_errors=True)
    folder.replace(adapter_dir)
    base, _ = load_model(cfg, cfg.run.model)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def reference_ntp_checkpoint(cfg) -> Path | None:
    """The reference's final checkpoint when the reference run *is* the NTP baseline, else None.

    Step 1 trains the reference with plain NTP (SFTMixTrainer with mixup_weight=0) from the same start, on the same
    training split, with the same seed, batch and optimizer settings. When its model, epochs and learning rate are
    also the target's (and no selection, LoRA, max_steps or online recording changes the run), the NTP baseline
    would repeat it step for step: its final checkpoint is reused instead of training the same model twice."""
    run, tr, d = cfg.run, cfg.train, RunDir(cfg.run_dir)
    same = ((run.reference_model or run.model) == run.model and not run.use_peft and run.reference == "separate"
            and run.confidence_mode == "checkpoints" and run.reference_epochs == tr.num_train_epochs
            and (run.reference_learning_rate or tr.learning_rate) == tr.learning_rate
            and tr.max_steps <= 0 and tr.selection == "none" and state().num_processes == 1)
    if not same or not d.schedule.exists():
        return None
    ckpt = d.reference / f"checkpoint-{json.loads(d.schedule.read_text())['max_steps']}"
    complete = (ckpt / "config.json").exists() and (ckpt / "trainer_state.json").exists() and any(
        ckpt.glob("model*.safetensors"))
    return ckpt if complete else None


def reuse_reference_as_ntp(cfg) -> bool:
    """DIR/ntp from step 1's identical reference run (reference_ntp_checkpoint): its weights as DIR/ntp/model, its
    training metrics and log history as DIR/ntp/train_result.json. False when the runs differ."""
    ckpt = reference_ntp_checkpoint(cfg)
    if ckpt is None:
        return False
    log.info("train:ntp: the reference run of step 1 is this NTP run (same start, data, seed and settings): "
             "reusing its final checkpoint %s", ckpt)
    d = RunDir(cfg.run_dir)
    skip = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")
    with atomic_dir(d.model("ntp")) as tmp:
        for f in ckpt.iterdir():
            if f.is_file() and not f.name.startswith(skip):
                shutil.copy2(f, tmp / f.name)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    # The reference run's own training metrics (train_loss, runtime) and example count are this run's.
    ref = read_train_result(d.train_result("reference")) or {}
    write_train_result(d.train_result("ntp"), recipe="ntp", metrics=ref.get("metrics") or {},
                       global_step=trainer_state["global_step"], log_history=trainer_state["log_history"],
                       resumed_from=None, reused_reference_checkpoint=str(ckpt),
                       n_train_examples=ref.get("n_train_examples"), selection="all examples",
                       duplicates_per_epoch=None, mixup_enabled=False, mixup_weight=0.0, use_peft=False,
                       trainable_parameters=ref.get("trainable_parameters"))
    return True
