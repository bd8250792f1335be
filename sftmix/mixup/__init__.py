"""Steps 2-3: Mixup on balanced confident x unconfident pairs, as a regulariser of NTP.

Read in this order: args (the settings), sampling (which rows train together), capture (the hidden states of the NTP
forward), loss (the Mixup term), guard (what is refused, the non-finite guard), mixin (SFTMixMixin: NTP + mu * Mixup
on any transformers.Trainer), then the trainers: trainer (SFTMixTrainer, on trl.SFTTrainer) and hf (SFTMixHFTrainer,
on transformers.Trainer).
"""
