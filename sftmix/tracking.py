"""Experiment trackers (`report_to`: tensorboard, wandb, trackio, ...) for every stage of a run, one tracker run each.

    sftmix run --config smoke --output_dir runs/smoke --report_to tensorboard
    tensorboard --logdir runs/smoke     # runs reference/tensorboard, sftmix/..., ntp/..., eval/start/tensorboard

Each Trainer (the reference of step 1, each recipe) reports through transformers' own integration callbacks; this
module only names the runs and adds what no Trainer logs: step 1's scoring points and split, and the evaluation
results, through the same integrations (so whatever `report_to` names receives them).

Stable names, one run per stage, grouped per run directory:
- run name `<run_name or DIR name>/<stage>` (stage: reference, sftmix, ntp, start); trackio project (unless
  `project` is set) and W&B group: the same prefix
  (WANDB_RUN_GROUP, unless set) and a run id derived from the run directory and stage, so the evaluation results join
  the recipe's own run (resumed) instead of opening a new one;
- TensorBoard: DIR/<stage>/tensorboard (cleared with the stage's outputs when it reruns);
- metrics (as the integrations name them; `train/` is their prefix for anything not `eval_`): the Trainer's
  `train/loss`, `train/ntp_loss`, `train/mixup_loss`, `train/mixup_weight` (TRL's and sftmix.mixup.mixin's names);
  `train/step1_mean_ppl` and `train/step1_median_ppl` at each scoring step of the reference, then
  `train/step1_n_confident`, `train/step1_n_unconfident`, `train/step1_confidence_median`; `eval/<task>_<metric>`
  (e.g. `eval/heldout_nll`) at the recipe's last step (step 0 for the start model's run).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from sftmix.rundir import RunDir

log = logging.getLogger("sftmix")


def trackers(train_args) -> list[str]:
    """The integrations `report_to` names (transformers normalises "none" to an empty list)."""
    value = getattr(train_args, "report_to", None) or []
    value = [value] if isinstance(value, str) else list(value)
    return [v for v in value if v not in ("none", None)]


def run_name(cfg, stage: str) -> str:
    prefix = cfg.train_values.get("run_name") or cfg.run_dir.resolve().name
    return f"{prefix}/{stage}"


def stage_dir(cfg, stage: str) -> Path:
    """Where a stage's tracker files live (TensorBoard's event files): inside the stage's own output folder."""
    return cfg.run_dir / ("eval/start" if stage == "start" else stage) / "tensorboard"


@contextlib.contextmanager
def stage_env(cfg, stage: str):
    """The environment the integrations read their run's identity from, for one stage (restored afterwards)."""
    names = trackers(cfg.train)
    env = {}
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = str(stage_dir(cfg, stage))
    if "wandb" in names:
        key = f"{cfg.run_dir.resolve()}/{stage}"
        env.update(WANDB_RUN_ID=hashlib.sha256(key.encode()).hexdigest()[:16], WANDB_RESUME="allow")
        env["WANDB_RUN_GROUP"] = os.environ.get("WANDB_RUN_GROUP") or run_name(cfg, "").rstrip("/")
    forced = {"run_name": run_name(cfg, stage)}
    if "trackio" in names and "project" not in cfg.train_values:  # trackio groups runs by project
        forced["project"] = run_name(cfg, "").rstrip("/")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield forced
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_points(cfg, stage: str, points: list[tuple[int, dict]]) -> None:
    """Log `points` ((step, {name: number})) to every tracker of `report_to`, in the tracker run of `stage`.

    Through transformers' integration callbacks, called as a Trainer would (train begin, one log per point, end), so
    each tracker gets them under the same run as the stage's Trainer."""
    names = trackers(cfg.train)
    points = [(s, {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
              for s, m in points]
    points = [(s, m) for s, m in points if m]
    if not names or not points:
        return
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import get_reporting_integration_callbacks

    with stage_env(cfg, stage) as forced:
        args = TrainingArguments(output_dir=str(cfg.run_dir / stage), report_to=names, **forced)
        state, control = TrainerState(), TrainerControl()
        callbacks = [cls() for cls in get_reporting_integration_callbacks(names)]
        for cb in callbacks:
            cb.on_train_begin(args, state, control)
        for step, metrics in sorted(points, key=lambda p: p[0]):
            state.global_step = step
            for cb in callbacks:
                # a copy each: integrations rewrite the dict (TensorBoard prefixes `train/` to unprefixed names)
                cb.on_log(args, state, control, logs=dict(metrics))
        for cb in callbacks:
            cb.on_train_end(args, state, control)


def step1_points(run_dir: Path) -> list[tuple[int, dict]]:
    """Step 1's scoring points (mean perplexity of the training examples at each scoring step) and its split."""
    import json

    import numpy as np

    from sftmix.utils import read_jsonl

    d = RunDir(run_dir)
    schedule = d.schedule
    if not schedule.is_file():
        return []
    sched = json.loads(schedule.read_text())
    points = []
    for k, step in enumerate(sched.get("steps") or [], start=1):
        ckpt = d.scores(k)
        if ckpt.is_file():
            ppl = [r["ppl"] for r in read_jsonl(ckpt) if r.get("ppl") is not None]
            if ppl:
                points.append((int(step), {"step1_mean_ppl": float(np.mean(ppl)),
                                           "step1_median_ppl": float(np.median(ppl))}))
    conf = d.confidence
    if conf.is_file() and points:
        rows = read_jsonl(conf)
        n_conf = sum(bool(r.get("confident")) for r in rows)
        points.append((points[-1][0], {"step1_n_confident": n_conf, "step1_n_unconfident": len(rows) - n_conf,
                                       "step1_confidence_median": float(np.median([r["confidence"] for r in rows]))}))
    return points


def eval_points(results: dict, step: int) -> list[tuple[int, dict]]:
    """The evaluation's numbers as `eval_<task>_<metric>` at `step` (the recipe's last training step; 0: start)."""
    metrics = {}
    for task, res in (results or {}).items():
        if isinstance(res, dict):
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seconds", "max_length"):
                    metrics[f"eval_{task}_{k}"] = v
    return [(step, metrics)]


def history_points(log_history: list[dict]) -> list[tuple[int, dict]]:
    """A Trainer's log_history as tracker points (for the NTP run that reuses the reference's: no Trainer ran)."""
    return [(int(h["step"]), {k: v for k, v in h.items() if k not in ("step", "epoch")}) for h in log_history
            if "step" in h and "train_runtime" not in h]
