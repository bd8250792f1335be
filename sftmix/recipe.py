"""The SFTMix recipe, top to bottom: what `sftmix run` does, in order (the other commands run one stage of it).

    from sftmix import recipe
    from sftmix.config import parse_config
    cfg = parse_config(["--config", "configs/smoke.yaml", "--output_dir", "runs/smoke"])
    recipe.main(cfg)                      # sftmix run
    recipe.run(cfg, "train", "ntp")       # sftmix train --recipe ntp (also "dynamics", "eval", "report")

Each stage (sftmix.run.stages) skips itself when its output is done and current, so a killed or repeated command
resumes where it stopped; the run directory's files are named in sftmix.rundir.RunDir.
"""

from __future__ import annotations

import logging
import time

from sftmix.report.report import print_comparison
from sftmix.run.context import state, train_records
from sftmix.run.examples import check_split_halves
from sftmix.run.session import session
from sftmix.run.stages import report_is_stale, stage_data, stage_dynamics, stage_eval, stage_report, stage_train
from sftmix.run.validation import check_step_counts
from sftmix.rundir import RunDir

log = logging.getLogger("sftmix")


def main(cfg) -> int:
    """`sftmix run`: data -> step 1 -> steps 2-3 per recipe -> evaluation -> report."""
    t0 = time.perf_counter()
    with session(cfg, "run"):                      # settings checked, DIR locked, DIR/config.yaml written
        data(cfg)                                  # DIR/data/: the training split and the held-out set
        check_steps(cfg)                           # the step counts the data's size allows, before any training
        if needs_step1(cfg):
            stage_dynamics(cfg)                    # step 1: reference run, confidence per example, the split
        train(cfg, cfg.run.recipes)                # steps 2-3: one target run per recipe (sftmix, ntp)
        stage_eval(cfg)                            # the start model and each recipe's: held-out NLL, tasks
        summary = stage_report(cfg, force=report_is_stale(cfg))  # DIR/report.{md,json,html}
    if summary is not None:
        print_comparison(summary)
        log.info("[sftmix] done in %.1fs: %s", time.perf_counter() - t0, RunDir(cfg.run_dir).report("html"))
    return 0


def data(cfg) -> None:
    with state().main_process_first():  # the main process writes the split; the others then read it
        stage_data(cfg)


def needs_step1(cfg) -> bool:
    """Whether the recipes need step 1's split (reference=self: the sftmix run takes its own split)."""
    return "sftmix" in cfg.run.recipes and cfg.train.split_source == "dynamics" and cfg.run.reference == "separate"


def check_steps(cfg) -> None:
    check_step_counts(cfg, len(train_records(cfg)))  # needs the data's size; still before any training


def train(cfg, recipes) -> None:
    if "sftmix" in recipes:
        check_split_halves(cfg)  # before any training: a lopsided selection fails now, not after the NTP run
    for r in recipes:
        stage_train(cfg, r)


def run(cfg, command: str, recipe: str | None = None) -> int:
    """One command of the `sftmix` CLI on cfg.run_dir (run, dynamics, train, eval, report); returns the exit code."""
    if command == "run":
        return main(cfg)
    with session(cfg, command):
        if command == "report":
            print_comparison(stage_report(cfg))
            return 0
        data(cfg)
        if command == "dynamics":
            stage_dynamics(cfg)
        elif command == "train":
            check_steps(cfg)
            train(cfg, [recipe] if recipe else cfg.run.recipes)
        elif command == "eval":
            stage_eval(cfg)
    return 0
