"""The SFTMix settings that any trainer's arguments take on (steps 2-3), and their checks.

    from sftmix.mixup.args import MixupArguments
    @dataclass
    class MyArgs(MixupArguments, TrainingArguments):     # = sftmix.mixup.hf.SFTMixTrainingArguments
        def __post_init__(self):
            super().__post_init__()
            self.validate_mixup_args()                   # one-line SFTMixError naming the setting

MixupArguments is the one home of the Mixup fields, their defaults and help texts: sftmix.mixup.trainer.SFTMixConfig
(trl.SFTConfig + these), sftmix.mixup.hf.SFTMixTrainingArguments and the axolotl plugin (its `sftmix_*` YAML keys)
all take them from here. The one-run rules it applies (self_reference_epochs) are sftmix.confidence.split's
one_run_problem, which step 1's callback and the command line's checks (sftmix.run.validation) word the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sftmix.confidence.split import one_run_problem
from sftmix.utils import SFTMixError

MIXUP_ROLES = ("regularizer", "loss", "only")
NTP_SUBSETS = ("all", "confident", "unconfident")
PAIRINGS = ("random", "nearest")
SPLIT_SOURCES = ("dynamics", "column")
SELECTIONS = ("none", "long", "score", "random")
WEIGHT_SCHEDULES = ("constant", "linear_warmup", "linear_decay", "cosine")


@dataclass
class MixupArguments:
    r"""The SFTMix fields, added to a trainer's own arguments (`SFTMixConfig` = trl.SFTConfig + these,
    `SFTMixTrainingArguments` = transformers.TrainingArguments + these, axolotl's training args + these).

    Paper defaults (Xiao et al.): AdamW, learning_rate 2e-6, weight_decay 0.1, cosine schedule, warmup 0.1,
    global batch 32, mixup_alpha 0.5, mixup_weight 0.2.
    """

    mixup_alpha: float = field(
        default=0.5,
        metadata={"help": "Concentration of the Beta(alpha, alpha) distribution each pair draws its mixing coefficient "
                          "`lam` from. 0.5 (the paper's value) puts most mass near 0 and 1."},
    )
    mixup_weight: float = field(
        default=0.2,
        metadata={"help": "mu in loss = L_NTP + mu * L_Mixup (role `regularizer`). 0 turns SFTMix into plain NTP, "
                          "identical to trl.SFTTrainer."},
    )
    mixup_role: str = field(
        default="regularizer",
        metadata={"help": "Role of the Mixup term (paper §5.3): `regularizer` = L_NTP + mu*L_Mixup, `loss` = L_NTP + "
                          "L_Mixup, `only` = L_Mixup alone (no NTP gradient).", "choices": list(MIXUP_ROLES)},
    )
    ntp_subset: str = field(
        default="all",
        metadata={"help": "Rows that carry the NTP loss (paper §5.4): `all`, `confident` or `unconfident`. With Mixup "
                          "the other half takes part through Mixup only; without (mixup_weight=0) it is plain NTP on "
                          "that half alone (the other half is left out: ordinary sampler, the configured batch).",
                  "choices": list(NTP_SUBSETS)},
    )
    pairing: str = field(
        default="random",
        metadata={"help": "How confident and unconfident examples are paired: `random` (the paper) or `nearest` "
                          "(each confident example with its nearest unconfident one in the reference's hidden space; "
                          "needs a `pairing_embedding` column).", "choices": list(PAIRINGS)},
    )
    split_source: str = field(
        default="dynamics",
        metadata={"help": "Where the confident/unconfident split comes from (paper §5.2): `dynamics` (the reference "
                          "model's training dynamics, or a ready `confident`/`confidence` column) or `column` (a user "
                          "column named by `split_column`, e.g. a known quality label).",
                  "choices": list(SPLIT_SOURCES)},
    )
    split_column: str | None = field(
        default=None,
        metadata={"help": "With split_source=column: the column holding the known split (bool, number or label)."},
    )
    split_confident_values: list[str] | None = field(
        default=None,
        metadata={"help": "With split_source=column and a label column: the values that mean confident "
                          "(e.g. ['High']). Numbers are split at the median instead."},
    )
    selection: str = field(
        default="none",
        metadata={"help": "Data selection before training (paper §5.5): `none`, `long` (the selection_k examples with "
                          "the longest responses), `score` (examples whose `selection_score_column` is at least "
                          "`selection_threshold`, AlpaGasus-style) or `random` (selection_k examples).",
                  "choices": list(SELECTIONS)},
    )
    selection_k: int | None = field(default=None, metadata={"help": "Examples kept by selection `long` or `random`."})
    selection_score_column: str = field(
        default="score", metadata={"help": "Column with user-supplied quality scores for selection `score`."}
    )
    selection_threshold: float | None = field(
        default=None, metadata={"help": "Minimum score kept by selection `score`."}
    )
    mixup_weight_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of mixup_weight over training: `constant`, `linear_warmup` (0 -> mu), "
                          "`linear_decay` (mu -> 0) or `cosine` (mu -> 0).", "choices": list(WEIGHT_SCHEDULES)},
    )
    mixup_chunk_tokens: int | None = field(
        default=None,
        metadata={"help": "Mixed tokens per cross-entropy chunk (memory bound of the Mixup loss). Default: 2**23 // "
                          "vocab size."},
    )
    record_online_dynamics: bool = field(
        default=False,
        metadata={"help": "Record each example's mean response NLL from the training forward passes into "
                          "`trainer.online_records` (needs an int `example_idx` column). Used by the `online` "
                          "confidence mode: no extra scoring passes."},
    )
    self_reference_epochs: int = field(
        default=0,
        metadata={"help": "One-run SFTMix (reference=self): the first N epochs train with plain NTP (ordinary random "
                          "order, no Mixup) while a sftmix.confidence.callback.SelfReferenceCallback scores the "
                          "training data; at the end of epoch N the median split is taken and the same run (one "
                          "optimizer, one LR schedule) continues with Mixup on balanced pairs. 0: the split comes "
                          "from the data (step 1 of the two-run recipe)."},
    )


    def validate_mixup_args(self, prefix: str = "") -> None:
        """Refuse inconsistent SFTMix settings with one line each (called by every arguments class and trainer).
        prefix: how the user's config names the Mixup fields (the axolotl YAML's `sftmix_`)."""
        for name, allowed in (("mixup_role", MIXUP_ROLES), ("ntp_subset", NTP_SUBSETS), ("pairing", PAIRINGS),
                              ("split_source", SPLIT_SOURCES), ("selection", SELECTIONS),
                              ("mixup_weight_schedule", WEIGHT_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise SFTMixError(f"{prefix}{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        # NaN passes `<= 0`, and inf makes lam NaN or the loss infinite, found only at the first Mixup step
        if not (_finite(self.mixup_alpha) and self.mixup_alpha > 0):
            raise SFTMixError(f"{prefix}mixup_alpha must be a finite number > 0 (Beta(alpha, alpha)); got "
                              f"{self.mixup_alpha!r}.")
        if not (_finite(self.mixup_weight) and self.mixup_weight >= 0):
            raise SFTMixError(f"{prefix}mixup_weight must be a finite number >= 0; got {self.mixup_weight!r}.")
        chunk = self.mixup_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise SFTMixError(f"{prefix}mixup_chunk_tokens must be a whole number >= 1 (or unset: 2**23 // vocab "
                              f"size); got {chunk!r}.")
        if self.split_source == "column" and not self.split_column:
            raise SFTMixError("split_source=column needs split_column: the name of the column holding the split.")
        if self.selection in ("long", "random") and not self.selection_k:
            raise SFTMixError(f"selection={self.selection} needs selection_k: how many examples to keep.")
        if self.selection == "score" and self.selection_threshold is None:
            raise SFTMixError("selection=score needs selection_threshold: the minimum score to keep.")
        if self.self_reference_epochs < 0:
            raise SFTMixError(f"self_reference_epochs must be >= 0; got {self.self_reference_epochs}.")
        if self.self_reference_epochs:
            problem = one_run_problem(self.self_reference_epochs, mixup_enabled=self.mixup_enabled,
                                      pairing=self.pairing, split_source=self.split_source, ntp_subset=self.ntp_subset)
            if problem:
                raise SFTMixError(problem)

    @property
    def mixup_enabled(self) -> bool:
        """Whether the Mixup term is on (balanced pairs, Mixup loss); otherwise the trainer is exactly its base
        trainer, on one half of the data when ntp_subset is not `all` (§5.4 without Mixup)."""
        return self.mixup_weight > 0 or self.mixup_role != "regularizer"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mixup_weight_at(args: MixupArguments, step: int, max_steps: int) -> float:
    """mu at optimizer step `step` of `max_steps` (mixup_weight_schedule); 1 for the roles `loss` and `only`."""
    mu = args.mixup_weight if args.mixup_role == "regularizer" else 1.0
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if args.mixup_weight_schedule == "linear_warmup":
        return mu * frac
    if args.mixup_weight_schedule == "linear_decay":
        return mu * (1.0 - frac)
    if args.mixup_weight_schedule == "cosine":
        return mu * 0.5 * (1.0 + math.cos(math.pi * frac))
    return mu
