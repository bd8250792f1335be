"""Capture of the NTP forward: the backbone's last hidden states (the LM head's input) and the model's outputs, taken
from the forward pass the trainer runs for its NTP loss, so the Mixup term needs no second backbone pass.

    from sftmix.mixup.capture import StepCapture, capture_loss_forward
    trainer._captured = StepCapture()
    capture_loss_forward(causal_lm, lambda: trainer._captured, is_loss_forward=lambda kw: True,
                         in_forward=lambda pairs, lam, labels: mixup_term(...))   # once, after Trainer.__init__
    trainer._captured = StepCapture(want_hidden=True)    # each step: before the NTP loss runs the model
    trainer._captured.pending = (pairs, lam, labels)     # -> in_forward runs inside the model's forward
    ... the NTP loss ...                                 # -> _captured.hidden, .outputs, .mix

`causal_lm` is the transformers causal LM itself (under PEFT, `model.get_base_model()`). Used by
sftmix.mixup.mixin.SFTMixMixin; any trainer that calls the model (or its backbone) for its loss can use it.
record_online turns the captured outputs of an NTP step into online-dynamics records (record_online_dynamics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StepCapture:
    """What one compute_loss shares with the backbone's forward hook and the wrapped model forward: compute_loss sets
    `want_hidden` and `pending` (the batch's Mixup pairs, lam and labels); the hook stores the backbone's output (the
    LM head's input) in `hidden`; the wrapped forward stores the NTP `outputs` and, still inside the model's forward,
    turns `pending` into the Mixup term `mix` (the `in_forward` of capture_loss_forward)."""

    want_hidden: bool = False
    pending: tuple | None = None
    hidden: torch.Tensor | None = None
    outputs: object = None
    mix: torch.Tensor | None = None

    def take_pending(self) -> tuple:
        pending, self.pending = self.pending, None
        return pending


def capture_loss_forward(causal_lm, step: Callable[[], StepCapture], is_loss_forward: Callable[[dict], bool],
                         in_forward: Callable[..., torch.Tensor]) -> None:
    """Hook `causal_lm` once: in every forward, the StepCapture that `step()` returns then gets the backbone's last
    hidden states (when it wants them) and, for the loss forward (`is_loss_forward(kwargs)`), the model's outputs and
    `in_forward(*pending)` computed inside that forward."""

    def keep_hidden(module, args, output):
        captured = step()
        if captured.want_hidden:
            captured.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    # The backbone's output is the LM head's input (after the final norm). The NTP forward calls the backbone as a
    # module, so a forward hook sees it without a second pass.
    causal_lm.base_model.register_forward_hook(keep_hidden)
    # PEFT calls `model.forward` directly (no module hooks), so the model's forward is wrapped to see the NTP outputs.
    # functools.wraps: inspect.signature follows __wrapped__ to the model's own signature, from which the Trainer
    # keeps the dataset columns (remove_unused_columns). accelerate's mixed-precision wrapper goes around this one and
    # its unwrap_model(keep_fp32_wrapper=False) stops at it (tests/test_mixup_parts.py).
    model_forward = causal_lm.forward

    @functools.wraps(model_forward)
    def forward_and_capture(*a, **kw):
        out = model_forward(*a, **kw)
        if is_loss_forward(kw):
            captured = step()
            captured.outputs = out
            if captured.pending is not None and torch.is_grad_enabled():
                # Still inside the model's forward: FSDP keeps the LM head gathered here (FSDP1 with use_orig_params
                # exposes only its shard once the forward has returned), and ZeRO-3 reduces the gradients of what
                # runs inside its engine's forward.
                captured.mix = in_forward(*captured.take_pending())
        return out

    causal_lm.forward = forward_and_capture


def record_online(records, outputs, example_idx, acc, state) -> None:
    """Add a micro-batch's per-example response NLL (from the captured `outputs`: TRL's per-token log-probs), from
    every process, to `records` (an OnlineRecords: `trainer.online_records`); `acc` is the trainer's accelerator.

    `gather`, not `gather_for_metrics`: at the end of the dataloader the latter cuts each batch to the dataset's
    remainder, which is wrong for every micro-batch but the last of an accumulation window (the Trainer fetches
    the whole window before the first forward) and for samplers that round the epoch up. OnlineRecords keeps one
    record per (epoch, example), so a row repeated to fill the last batch is not counted twice."""
    nll_sum = -(outputs.log_probs.detach().float()).sum(dim=1)
    n_tok = outputs.label_mask.sum(dim=1)
    idx = example_idx.to(nll_sum.device)
    if acc.num_processes > 1:  # equal shapes for the gather (even_batches=False can leave a short last batch)
        idx = acc.pad_across_processes(idx, pad_index=-1)
        nll_sum, n_tok = acc.pad_across_processes(nll_sum), acc.pad_across_processes(n_tok)
    gathered = acc.gather((idx, nll_sum, n_tok))
    epoch = float(state.epoch or 0.0)
    for i, s, n in zip(*(t.tolist() for t in gathered)):
        if i >= 0 and n > 0:
            records.add({"example_idx": int(i), "global_step": state.global_step,
                         "epoch": epoch, "nll_mean": s / n, "n_tokens": int(n)})
