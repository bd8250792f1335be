"""What SFTMix refuses before training, and the non-finite guard that stops training before a bad update.

    from sftmix.mixup.guard import NonFiniteGuard, check_model_config, check_supported

    class MyTrainer(NonFiniteGuard, AnyTrainer):   # any transformers.Trainer subclass, SFTMix or not
        pass                                       # a non-finite gradient norm or weight stops it, one line
    check_supported(args)                          # odd batch, packing: before the data is prepared
    check_model_config("Gemma-2", text_config)     # soft-capped or scaled logits: also from config.json alone

The guard on any Trainer: before every optimizer step the Trainer computes the global gradient norm; NonFiniteGuard
raises an SFTMixError there when it is not finite (a non-finite loss makes it so), and refuses to save a checkpoint
with non-finite weights. The message says where, the learning rate, which checkpoint is intact and what to try
(_nonfinite_message). sftmix.mixup.mixin.SFTMixMixin builds on it and checks its two loss terms before backward().
The checks take the arguments (check_supported), the trainer (check_parallelism) or the model (check_lm_head,
check_model_config), so sftmix.run.validation runs them before anything trains.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from sftmix.confidence.scoring import LOGIT_SCALE_ATTRS
from sftmix.utils import SFTMixError, last_complete_checkpoint


def check_supported(args) -> None:
    """Refuse the batch layouts that cannot hold balanced pairs: an odd per-device batch, packing."""
    if args.per_device_train_batch_size % 2:
        raise SFTMixError(
            f"per_device_train_batch_size={args.per_device_train_batch_size} is odd: SFTMix batches hold equally "
            "many confident and unconfident examples. Use an even per-device batch size (e.g. "
            f"{args.per_device_train_batch_size + 1}), with gradient_accumulation_steps for the global batch."
        )
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise SFTMixError(
            "packing and padding_free are not supported by SFTMix: Mixup pairs whole examples (row c with row u "
            "of a batch), which packing mixes into shared rows. Set packing=False and padding_free=False."
        )
    if getattr(args, "sample_packing", False):  # axolotl's name for packing
        raise SFTMixError(
            "sample_packing is not supported by SFTMix: Mixup pairs whole examples (row c with row u of a batch), "
            "which packing mixes into shared rows. Set sample_packing: false."
        )


def check_parallelism(trainer) -> None:
    """Refuse the layouts in which no process holds whole examples (to pair) and the whole LM head.

    Data parallelism is supported: DDP, FSDP2 (accelerate or transformers' distributed_config with
    fsdp_size/dp_replicate_size), DeepSpeed ZeRO-1/2/3; see docs/distributed.md for what was tested and how.
    """
    dc = getattr(trainer.model.config, "distributed_config", None)

    def size(name):
        getter = getattr(trainer, name, None)
        return getter() if callable(getter) else 1

    sizes = {"tensor": size("get_tp_size"), "context": size("get_cp_size"), "sequence": size("get_sp_size"),
             "pipeline": getattr(dc, "pp_size", None) or 1, "expert": getattr(dc, "ep_size", None) or 1}
    used = {k: v for k, v in sizes.items() if v and v > 1}
    if used:
        raise SFTMixError(
            "SFTMix does not support "
            f"{', '.join(f'{k} parallelism ({k[:1]}p_size={v})' for k, v in used.items())}: "
            "it splits each sequence (context/sequence), the LM head's vocabulary (tensor) or the model (pipeline, "
            "expert) across processes, so no process holds whole confident/unconfident examples to pair and the "
            "whole LM head to score their mixed states. Use data parallelism only (DDP, FSDP2 or DeepSpeed ZeRO), "
            "or mixup_weight=0 for plain NTP.")
    if getattr(trainer.accelerator, "split_batches", False):
        raise SFTMixError(
            "accelerator_config.split_batches=True cuts each batch into per-process slices, which separates "
            "confident rows from their unconfident partners; leave it False (per_device_train_batch_size is then "
            "the per-process batch, balanced on every process).")


def check_lm_head(causal_lm) -> None:
    """Refuse an LM head the Mixup loss does not reproduce (a bias, soft-capped or scaled logits)."""
    head = causal_lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise SFTMixError(f"{type(causal_lm).__name__} has an LM head with a bias, which the Mixup loss does not "
                          "model; use a model without it or set mixup_weight=0.")
    check_model_config(type(causal_lm).__name__, causal_lm.config.get_text_config())


def check_model_config(name: str, cfg) -> None:
    """What a model's (text) config says the Mixup loss cannot reproduce: also checked by sftmix.run.validation on
    the target's config.json, before step 1 trains."""
    if getattr(cfg, "final_logit_softcapping", None):
        raise SFTMixError(f"{name} uses final logit soft-capping (e.g. Gemma-2), which the Mixup loss does not "
                          "apply; use another target model or set mixup_weight=0. (A soft-capped model can still "
                          "be the *reference* of step 1.)")
    for attr in LOGIT_SCALE_ATTRS:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise SFTMixError(f"{name} scales its logits ({attr}={getattr(cfg, attr)}), which the Mixup loss does "
                              "not apply; use another model or set mixup_weight=0.")


def lm_head_weight(causal_lm):
    """The whole LM head weight for the Mixup term, or a one-line refusal when a sharded head's gradient would not
    be reduced across processes."""
    weight = causal_lm.get_output_embeddings().weight
    if not isinstance(weight, DTensor):
        # DDP, ZeRO-3 (gathered by the trainer's _lm_head_gathered), and FSDP2 as accelerate and transformers lay
        # it out: the head shares a unit with the final norm that stays unsharded from forward to backward, so this
        # is the full weight and its gradient goes through FSDP's own reduce-scatter.
        return weight
    if weight.requires_grad:
        # Still sharded after the forward: the head sits in a unit whose forward never runs (TRL's fused head reads
        # the weight directly). DTensor.full_tensor()'s backward hands each rank the slice of its *own* gradient,
        # never reduced across ranks (TRL's NTP head has the same flaw there): refuse rather than train wrongly.
        raise SFTMixError(
            "the LM head weight is still sharded (an FSDP2 DTensor) when the loss reads it: its FSDP unit does not "
            "keep it gathered through the step, and its gradient would not be reduced across processes. Keep "
            "lm_head in one unit with the final norm (the default of transformers' fsdp_plan and of accelerate; "
            "do not wrap it on its own or by size), or freeze it (LoRA), or set mixup_weight=0."
        )
    return weight.full_tensor()  # a frozen head only needs its values


class NonFiniteGuard:
    """Put first in any Trainer subclass: stops on a non-finite gradient norm before the optimizer step, and never
    writes a checkpoint with non-finite weights (see the module docstring)."""

    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer computes the global gradient norm before every optimizer step: a finite loss can still give
        # non-finite gradients, and stepping on them would put NaN into the weights (and into the next checkpoint).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # Under fp16 the loss scaler expects inf gradients now and then: it skips that step and lowers the scale.
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            raise SFTMixError(self._nonfinite_message("gradient", f"gradient norm {float(grad_norm)}"))
        return grad_norm

    def _save_checkpoint(self, model, trial, **kwargs):
        # Last line of defence (e.g. the optimizer itself producing NaN): never write non-finite weights to disk.
        bad = torch.zeros((), device=self.args.device)
        for p in self.model.parameters():
            local = getattr(p, "ds_tensor", None)  # ZeRO-3 partition
            local = local if local is not None else (p.to_local() if hasattr(p, "to_local") else p)
            if local.numel() and not torch.isfinite(local.detach()).all():
                bad += 1
        if self.accelerator.reduce(bad, "sum").item() > 0:
            raise SFTMixError(self._nonfinite_message("weights", "before saving a checkpoint"))
        super()._save_checkpoint(model, trial, **kwargs)

    def _nonfinite_message(self, what: str, values: str, example_idx=None) -> str:
        """One line: what went non-finite, where, the learning rate, what was kept and what to try."""
        args = self.args
        step = self.state.global_step + 1
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else args.learning_rate
        last = last_complete_checkpoint(args.output_dir)
        kept = (f"the last checkpoint, {last}, is intact (resume from it)" if last
                else "no checkpoint was saved before it")
        batch = ""
        if example_idx is not None and "guid" in getattr(self.train_dataset, "column_names", []):
            rows = sorted({int(i) for i in example_idx.tolist()})[:8]
            batch = f" (guids on this process: {', '.join(str(self.train_dataset[i]['guid']) for i in rows)})"
        if args.fp16:
            hint = "fp16 overflow is the usual cause: train with bf16 (or fp32) instead; else lower the learning rate"
        else:
            hint = (f"lower the learning rate (now {lr:.3g}) or keep max_grad_norm > 0 (now "
                    f"{args.max_grad_norm}), "
                    f"and check the examples of this batch{batch}")
        return (f"non-finite {what} at step {step} ({values}; lr={lr:.3g}): training stopped before this update; "
                f"{kept}. Try: {hint}.")
