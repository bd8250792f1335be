"""What the user sees: one line per stage on the console, the library bars that say nothing kept quiet, and the
libraries' full output in the run's log file.

    from sftmix.console import setup_logging, log_to_file
    setup_logging(); log_to_file(RunDir(run_dir).log_file)   # DIR/logs/sftmix.log
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging() -> None:
    import warnings

    # deprecation notices about the libraries' own defaults (e.g. TRL's gradient_checkpointing=True) are not
    # something a user of this command can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|accelerate)\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|trl|accelerate)\.")
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "urllib3", "matplotlib", "PIL"):  # httpx2: huggingface_hub's HTTP client
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_library_bars()


def _quiet_library_bars() -> None:
    """Turn off the per-step library bars ("Loading weights", datasets' map/filter bars such as "Tokenizing ..." and
    TRL's "Truncating train dataset"): they say nothing a user can act on. Kept: sftmix's line per stage, the Trainer's
    training bar (with its ETA), and huggingface_hub's download bars (transformers' switch turns those off too)."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off = are_progress_bars_disabled()  # e.g. HF_HUB_DISABLE_PROGRESS_BARS=1: leave it so
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if not hub_bars_off:
        enable_progress_bars()


def log_to_file(path: Path) -> Path:
    """Copy everything sftmix and the libraries log (transformers, datasets, huggingface_hub, TRL, ...) to `path`
    (a run's DIR/logs/sftmix.log, sftmix.rundir.RunDir.log_file), with time stamps and logger names, appending across
    reruns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.sftmix_run_log = True
    # the root logger, and the library loggers that do not propagate to it (they print through their own handler);
    # a previous run's file in the same process (tests, sweeps) is detached first
    for lg in [logging.getLogger()] + [logging.getLogger(n) for n in ("transformers", "datasets", "huggingface_hub",
                                                                       "trl", "accelerate", "peft")]:
        for old in [h for h in lg.handlers if getattr(h, "sftmix_run_log", False)]:
            lg.removeHandler(old)
            old.close()
        if lg is logging.getLogger() or not lg.propagate:
            lg.addHandler(handler)
    return path
