"""One command on a run directory: every setting checked, the directory locked and its config written, then the stages.

    from sftmix.run.session import session
    with session(cfg, "train"):          # validate, lock DIR, log to DIR/logs, write DIR/config.yaml
        stages.stage_train(cfg, "ntp")

Before any stage: sftmix.run.validation checks every setting and input; DIR/.lock admits one command at a time (the
main process holds it for all under accelerate launch); every process must see the same DIR (several nodes); the
resolved config is written to DIR/config.yaml (a rerun with another config is refused) and the Hub commits to
DIR/sources.json.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from accelerate import DistributedType

from sftmix.console import log_to_file
from sftmix.run.config_file import resolve_sources, save_sources, write_config
from sftmix.run.context import is_main, state
from sftmix.run.validation import make_run_dir, validate
from sftmix.rundir import RunDir, RunLock, check_shared_run_dir
from sftmix.utils import SFTMixError


@contextlib.contextmanager
def session(cfg, command: str):
    """Everything a command does before its first stage (see the module docstring)."""
    validate(cfg, command)  # every setting and input file, before anything is written or trained
    _check_deepspeed_used(cfg)
    make_run_dir(cfg.run_dir)
    lock = RunLock(cfg.run_dir, " ".join(sys.argv) or command) if is_main() else contextlib.nullcontext()
    with lock:
        check_shared_run_dir(cfg.run_dir)  # several nodes: every process must see what the main one writes
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        if is_main():
            log_to_file(RunDir(cfg.run_dir).log_file)  # the libraries' full output; the console: a line a stage
        if command != "report":  # Hub ids -> commit shas, before anything runs (offline / gated errors come first)
            cfg.sources = resolve_sources(cfg)
        write_config(cfg)
        save_sources(cfg)
        yield


def _check_deepspeed_used(cfg) -> None:
    """Refuse `deepspeed` on several CPU processes: transformers then sets up plain DDP (its CPU branch comes before
    DeepSpeed's) and would drop the setting without a word."""
    st = state()
    if cfg.train.deepspeed and st.num_processes > 1 and st.distributed_type != DistributedType.DEEPSPEED:
        raise SFTMixError(f"deepspeed={cfg.train.deepspeed} would be ignored: these {st.num_processes} processes "
                          f"run on the CPU, where accelerate trains with plain DDP; remove --deepspeed (DDP is what "
                          f"runs), or launch on GPUs (accelerate launch --config_file "
                          f"configs/accelerate/deepspeed_zero3.yaml ...).")
