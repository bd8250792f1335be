"""`sftmix ...` as a torchrun worker that also records which process opened which file for writing (tests only).

    torchrun --nproc_per_node 2 tests/dist_run.py WRITES_DIR run --config configs/smoke.yaml --output_dir DIR

Each process appends (global rank, path) of every file it opens for writing or creates by rename to
WRITES_DIR/writes-<rank>.jsonl (a Python audit hook: open() with a write mode, os.rename / os.replace targets), then
runs sftmix.cli.main with the rest of the arguments. tests/test_multiprocess_run.py checks from these files that each
file of the run directory was written by the global main process only.

SFTMIX_TEST_KILL=STAGE:STEP:RANK (e.g. sftmix:7:1): process RANK kills itself with SIGKILL at the end of training step
STEP of the target run DIR/STAGE (a kill -9 of one rank at a known point, after the checkpoint of step 5 is whole).
"""

import json
import os
import sys


def main() -> None:
    writes_dir, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(writes_dir, exist_ok=True)
    log = open(os.path.join(writes_dir, f"writes-{rank}.jsonl"), "a", buffering=1)  # opened before the hook

    def hook(event, args):
        path = None
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = args[0]
        elif event in ("os.rename", "os.replace"):
            path = args[1]
        if path is not None and not isinstance(path, int):
            log.write(json.dumps({"rank": rank, "event": event, "path": os.path.abspath(os.fsdecode(path))}) + "\n")

    sys.addaudithook(hook)
    if os.environ.get("SFTMIX_TEST_KILL"):
        _kill_at(*os.environ["SFTMIX_TEST_KILL"].split(":"), rank=rank)
    from sftmix.cli import main as cli_main

    sys.argv = ["sftmix", *argv]
    cli_main(argv)


def _kill_at(stage: str, step: str, kill_rank: str, rank: int) -> None:
    import signal

    from transformers import TrainerCallback

    from sftmix.mixup.trainer import SFTMixTrainer

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if rank == int(kill_rank) and state.global_step == int(step) and os.path.basename(args.output_dir) == stage:
                os.kill(os.getpid(), signal.SIGKILL)

    init = SFTMixTrainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KillAt())

    SFTMixTrainer.__init__ = patched


if __name__ == "__main__":
    main()
