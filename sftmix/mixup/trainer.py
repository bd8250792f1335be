"""SFTMixTrainer: trl.SFTTrainer plus the Mixup regularizer of SFTMix (recipe steps 2-3).

    from sftmix import SFTMixConfig, SFTMixTrainer
    args = SFTMixConfig(output_dir="out", per_device_train_batch_size=8, mixup_alpha=0.5, mixup_weight=0.2)
    trainer = SFTMixTrainer(model=model, args=args, train_dataset=ds)  # ds: prompt/completion (or tokens) + `confident`
    trainer.train()

What changes relative to SFTTrainer, and nothing else:
- the sampler: every micro-batch holds equally many confident and unconfident rows, the i-th confident row of a batch
  paired with its i-th unconfident row (pairs are random because both halves are shuffled independently each epoch);
- the collator passes the `confident` flags (and `example_idx` for online dynamics) through to the loss;
- compute_loss: TRL's own NTP loss (its fused LM head, unchanged), plus mixup_weight * L_Mixup computed from the
  backbone's last hidden states, which a forward hook keeps from the same forward pass: no second transformer pass and
  no full-vocabulary logits (see sftmix.mixup.loss);
- log: `ntp_loss` and `mixup_loss` are logged separately;
- online dynamics (`record_online_dynamics=True`): each example's mean response NLL from TRL's per-token log-probs of
  the training forward passes, into `trainer.online_records` (only this trainer has those log-probs).
With Mixup off (`mixup_weight=0`, `mixup_role="regularizer"`, `ntp_subset="all"`) it *is* SFTTrainer: same sampler, same
loss, same numbers step by step. That is the NTP baseline of every comparison.
Everything but TRL's fused head lives in the TRL-free component sftmix.mixup.mixin (SFTMixMixin), which also gives
transformers.Trainer (sftmix.mixup.hf.SFTMixHFTrainer) and axolotl (sftmix.integrations.axolotl) the same Mixup term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from sftmix.mixup.args import MixupArguments
from sftmix.mixup.mixin import SFTMixMixin
from sftmix.utils import SFTMixError

if Version(trl.__version__) < Version("1.16"):  # the [axolotl] extra allows TRL 1.9; SFTMixTrainer needs 1.16's head
    raise ImportError(f"sftmix.mixup.trainer (SFTMixTrainer) needs trl>=1.16 (its fused LM head); this environment has "
                      f"{trl.__version__}. With another TRL use sftmix.mixup.hf.SFTMixHFTrainer or "
                      "sftmix.mixup.mixin.SFTMixMixin.")


@dataclass
class SFTMixConfig(MixupArguments, SFTConfig):
    r"""Configuration of [`SFTMixTrainer`]: every field of `trl.SFTConfig`, plus the SFTMix ones of
    [`sftmix.mixup.args.MixupArguments`] (mixup_alpha, mixup_weight, mixup_role, ntp_subset, pairing, ...).

    Paper defaults (Xiao et al.): AdamW, learning_rate 2e-6, weight_decay 0.1, cosine schedule, warmup 0.1,
    global batch 32, mixup_alpha 0.5, mixup_weight 0.2.
    """

    def __post_init__(self):
        # TRL turns bf16 on by default, which TrainingArguments refuses on a machine without a GPU: there the default
        # is fp32 (bf16 stays the default on GPUs; an explicit value is kept).
        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16 = False
        super().__post_init__()
        self.validate_mixup_args()


class SFTMixTrainer(SFTMixMixin, SFTTrainer):
    """trl.SFTTrainer with the SFTMix Mixup regularizer. See the module docstring and [`SFTMixConfig`]."""

    _tag_names = ["trl", "sft", "sftmix"]
    mixup_after_forward = False  # the Mixup term runs inside TRL's fused-head forward (see _missing_mixup_message)

    def __init__(self, model=None, args: SFTMixConfig | None = None, train_dataset=None, eval_dataset=None, **kwargs):
        if args is None:
            args = SFTMixConfig(output_dir="sftmix-output")
        elif not isinstance(args, SFTMixConfig):
            raise SFTMixError("SFTMixTrainer needs an SFTMixConfig (it extends trl.SFTConfig with the Mixup fields).")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    # -- TRL's fused LM head: the NTP forward, a gathered ZeRO-3 head -------------------------------------------------
    def _is_loss_forward(self, forward_kwargs: dict) -> bool:
        return bool(forward_kwargs.get("fused_lm_head"))

    def _lm_head_gathered(self, weight):
        # imported here, not at the top: there an older TRL would fail before the version check says why
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        return maybe_gather_lm_head_ctx(weight)

    def _missing_mixup_message(self) -> str:
        return ("the Mixup loss was not computed: SFTMix computes it in TRL's fused LM-head forward, which "
                "label_smoothing_factor > 0 and compute_loss_func replace; unset them or set mixup_weight=0.")
