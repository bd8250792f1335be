"""What every stage of a run needs: the process it runs in, its timing, the model loader, its training config.

    from sftmix.run.context import is_main, stage, load_model, training_config, train_records, tokenize
    with stage(cfg, "train:ntp", RunDir(cfg.run_dir).train_result("ntp")) as todo:   # skipped when done
        if todo:
            model, tok = load_model(cfg, cfg.run.model)
            args = training_config(cfg, out, mixup_weight=0.0)

A stage's done marker is written last (atomically): `stage` skips a stage whose marker exists, logs one progress line
per stage (on the main process only) and records its wall time in DIR/timings.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import DistributedType, PartialState

from sftmix.data import load_records, tokenize_records
from sftmix.hub import pinned_revision
from sftmix.mixup.trainer import SFTMixConfig
from sftmix.models import load_model_and_tokenizer
from sftmix.run.validation import check_weights
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, atomic_write_json

log = logging.getLogger("sftmix")


def cpu_launch() -> None:
    """Under `torchrun` (or `srun`) on machines without an accelerator, tell accelerate to run on the CPU.

    Why: `accelerate launch --cpu` sets ACCELERATE_USE_CPU, torchrun does not, and without it accelerate picks no
    backend on a CPU-only machine: every process would believe it is the only one (each taking the run lock and
    training on all the data), and the Trainer's TrainingArguments would reset the state the same way. With it, both
    set up gloo as under `accelerate launch --cpu`. Called before the first PartialState or training config of the
    process (sftmix.cli does so before parsing the config, which builds one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    if not (torch.cuda.is_available() or getattr(torch, "accelerator", None) and torch.accelerator.is_available()):
        os.environ["ACCELERATE_USE_CPU"] = "true"


def state() -> PartialState:
    """This process's place in the launch (one process, or one of `accelerate launch` / torchrun's)."""
    cpu_launch()
    return PartialState()


def is_main() -> bool:
    return state().is_main_process


@contextlib.contextmanager
def stage(cfg, name: str, done_marker: Path | None, force: bool = False):
    """Run the body unless `done_marker` exists; log and record the stage's wall time. Yields True to run."""
    main = is_main()
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
        path = RunDir(cfg.run_dir).timings
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[name] = {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(path, timings)


def device(cfg) -> str:
    """The device to load a model on; under `accelerate launch` each process uses its own GPU (or the CPU for
    FSDP / DeepSpeed, which place and shard the weights themselves)."""
    st = state()
    if cfg.run.device != "auto" or st.num_processes == 1:
        return cfg.run.device
    if st.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return "cpu"
    return str(st.device)


def load_model(cfg, spec: str):
    if os.path.isdir(spec):  # a damaged weights file is one line naming it, not a loader traceback
        check_weights("model", spec, Path(spec))
    t0 = time.perf_counter()
    run = cfg.run
    revision = pinned_revision(cfg.sources, "models", spec) or (  # the sha recorded at the start of the run
        run.reference_model_revision if spec == run.reference_model != run.model else run.model_revision)
    model, tok = load_model_and_tokenizer(spec, dtype=cfg.run.dtype, device=device(cfg),
                                          chat_template=cfg.run.chat_template, cache_dir=cfg.run.model_cache_dir,
                                          revision=revision, trust_remote_code=cfg.train.trust_remote_code,
                                          attn_implementation=run.attn_implementation)
    log.info("loaded model %s (%s, %s) in %.1fs", spec, next(model.parameters()).dtype,
             next(model.parameters()).device, time.perf_counter() - t0)
    return model, tok


def training_config(cfg, output_dir: Path, drop=(), **forced) -> SFTMixConfig:
    """An SFTMixConfig for one stage: the run's training values (minus `drop`), then `forced`."""
    values = {k: v for k, v in cfg.train_values.items() if k not in drop}
    values.update(output_dir=str(output_dir), **forced)
    try:
        return SFTMixConfig(**values)
    except SFTMixError:
        raise
    except ValueError as e:
        raise SFTMixError(f"invalid training config for {output_dir}: {e}") from e


def train_records(cfg) -> list[dict]:
    path = RunDir(cfg.run_dir).train
    if not path.exists():
        raise SFTMixError(f"{path} is missing: run the data stage first (`sftmix run`).")
    return load_records(path)


def tokenize(cfg, records, tokenizer, name: str):
    """Tokenize for training (truncation and dropped examples as in TRL) and record the stats for the report."""
    ds, stats = tokenize_records(records, tokenizer, max_length=cfg.train.max_length,
                                 max_dropped_fraction=cfg.run.max_dropped_fraction,
                                 source=f"{cfg.run.data} ({name} tokenizer)")
    if is_main():
        atomic_write_json(RunDir(cfg.run_dir).tokenize_stats(name), stats)
    return ds
