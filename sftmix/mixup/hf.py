"""SFTMixHFTrainer: transformers.Trainer with the SFTMix Mixup regularizer (no TRL), and its arguments.

    from sftmix import SFTMixHFTrainer, SFTMixTrainingArguments
    args = SFTMixTrainingArguments(output_dir="out", per_device_train_batch_size=8, mixup_weight=0.2)
    trainer = SFTMixHFTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()                                        # logs ntp_loss and mixup_loss

The NTP loss is the model's own (`model(**inputs)` with `labels`); `ds` holds tokenized rows (`input_ids`, `labels`)
with `confident` or `confidence`. Everything SFTMix adds is sftmix.mixup.mixin.SFTMixMixin.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from sftmix.mixup.args import MixupArguments
from sftmix.mixup.mixin import SFTMixMixin
from sftmix.utils import SFTMixError


@dataclass
class SFTMixTrainingArguments(MixupArguments, TrainingArguments):
    r"""Configuration of [`SFTMixHFTrainer`]: every field of `transformers.TrainingArguments`, plus the SFTMix ones."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_mixup_args()


class SFTMixHFTrainer(SFTMixMixin, Trainer):
    """`transformers.Trainer` with the SFTMix Mixup regularizer; see the module docstring.
    Without a `data_collator`, rows are padded by DataCollatorForSeq2Seq (labels with -100)."""

    def __init__(self, model=None, args: SFTMixTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 data_collator=None, processing_class=None, **kwargs):
        if args is None:
            args = SFTMixTrainingArguments(output_dir="sftmix-output")
        elif not isinstance(args, MixupArguments):
            raise SFTMixError("SFTMixHFTrainer needs SFTMixTrainingArguments (transformers.TrainingArguments with the "
                              "Mixup fields).")
        if args.record_online_dynamics:
            raise SFTMixError("record_online_dynamics reads TRL's per-token log-probabilities: use SFTMixTrainer.")
        if data_collator is None and processing_class is not None and hasattr(processing_class, "pad"):
            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=-100)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, processing_class=processing_class, **kwargs)
