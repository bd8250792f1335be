"""A target run's training metrics for the whole run, across resumes (the Trainer's cover only the resumed part).

    clock = TrainingClock()
    trainer = SFTMixTrainer(..., callbacks=[clock])
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = whole_run_metrics(trainer, result.metrics, resume)
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class TrainingClock(TrainerCallback, ExportableState):
    """Counts the training seconds of the steps the weights hold, across resumes: its count is saved in each
    checkpoint's trainer state (transformers' ExportableState) and read back from it."""

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


def whole_run_metrics(trainer, metrics: dict, resume: str | None) -> dict:
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
    clocks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingClock)]
    if clocks:
        out["train_runtime"] = round(clocks[0].seconds, 4)
    return out
