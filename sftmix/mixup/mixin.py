"""The trainer-agnostic SFTMix component: balanced pairs, the `confident` collator, hidden-state capture, Mixup term.

Any `transformers.Trainer` subclass gets SFTMix by putting `SFTMixMixin` first; its own NTP loss (the model's loss,
a chunked cross-entropy, TRL's fused head, axolotl's) is kept as it is, and the Mixup term is added to it:

    from sftmix.mixup.mixin import SFTMixMixin, SFTMixHFTrainer, SFTMixTrainingArguments, prepare_train_dataset

    args = SFTMixTrainingArguments(output_dir="out", per_device_train_batch_size=8, mixup_weight=0.2)
    trainer = SFTMixHFTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)  # = Trainer + the core
    trainer.train()                                                        # logs ntp_loss and mixup_loss

    class MyTrainer(SFTMixMixin, SomeTrainer):   # any other Trainer subclass (its args need the MixupArguments fields)
        def __init__(self, *a, args=None, train_dataset=None, **kw):
            train_dataset, _ = prepare_train_dataset(train_dataset, args)  # adds `confident` and `example_idx`
            super().__init__(*a, args=args, train_dataset=train_dataset, **kw)
            self.setup_sftmix()                  # wraps the collator, hooks the backbone, checks the model

`ds` holds tokenized rows (`input_ids`, `labels` with -100 outside the response) and a boolean `confident` or a float
`confidence` column (step 1, `sftmix dynamics`, writes confidence.jsonl, joined by guid). What the component does:
- `_get_train_sampler`: a BalancedPairSampler, each micro-batch half confident and half unconfident rows, the i-th
  confident row paired with the i-th unconfident one;
- the collator (SFTMixCollator around the trainer's own) turns `confident` and `example_idx` into tensors;
- a forward hook on the backbone keeps its last hidden states (the LM head's input) from the NTP forward itself, and
  the Mixup loss (sftmix.mixup.loss.mixup_loss) is computed from them inside the model's forward (or right after an NTP
  loss that runs the backbone itself): one backbone pass per step, no full-vocabulary logits for the mixed states;
- compute_loss returns NTP + mu * Mixup (normalised like the Trainer normalises the NTP loss under gradient
  accumulation), logs `ntp_loss` and `mixup_loss`, and stops on a non-finite loss, gradient or weight before the update.
- one-run SFTMix (`self_reference_epochs=N` and a sftmix.confidence.callback.SelfReferenceCallback): `OneRunSampler`
gives
  random order (plain NTP, no Mixup term) for N epochs, then balanced pairs on the split the callback takes then.
This module imports only torch and transformers (no TRL): it runs next to any TRL version, e.g. axolotl's pin.
`sftmix.mixup.trainer.SFTMixTrainer` is trl.SFTTrainer on the same component.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainingArguments

from sftmix.confidence.online import OnlineRecords
from sftmix.confidence.scoring import LOGIT_SCALE_ATTRS
from sftmix.confidence.split import confident_flags, nearest_partners, one_run_problem, select_examples
from sftmix.mixup.loss import mixup_loss
from sftmix.utils import SFTMixError, last_complete_checkpoint

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


# ----------------------------------------------------------------------------------------------------------------
# Split, selection and pairing: pure functions of the dataset columns


class BalancedPairSampler(Sampler[int]):
    """Yields indices so that each consecutive block of `batch_size` holds batch_size/2 confident rows followed by
    batch_size/2 unconfident rows; the i-th confident row of a block is paired with its i-th unconfident row.

    Per epoch, both halves are permuted independently (random pairing) with a generator seeded by (seed, epoch), so
    the order is deterministic and the Trainer's resume (which skips already-seen batches) sees the same batches. Every
    example appears at least once per epoch: the smaller half is cycled to match the larger one, and the pair count is
    rounded up to whole batches of all `num_replicas` processes (accelerate deals batch k to process k % num_replicas):
    every batch is full and balanced, and N processes with batch b see exactly the pairs of one process with batch N*b.
    `duplicates_per_epoch` counts the repeated rows this costs.
    """

    def __init__(self, confident, batch_size: int, seed: int = 0, pairs: tuple[np.ndarray, np.ndarray] | None = None,
                 num_replicas: int = 1):
        if batch_size % 2:
            raise SFTMixError("per_device_train_batch_size must be even for SFTMix (half confident, half "
                              "unconfident); "
                              f"got {batch_size}.")
        self.confident = np.asarray(confident, dtype=bool)
        self.half = batch_size // 2
        self.seed = seed
        self.epoch = 0
        self.fixed_pairs = pairs  # nearest-neighbour pairing: fixed pairs, shuffled each epoch
        self.c_idx = np.flatnonzero(self.confident)
        self.u_idx = np.flatnonzero(~self.confident)
        for name, idx in (("confident", self.c_idx), ("unconfident", self.u_idx)):
            if len(idx) < 2:
                raise SFTMixError(f"the {name} half has {len(idx)} example(s); SFTMix needs at least 2 in each half. "
                                  "Use more data or check the split column.")
        base = len(pairs[0]) if pairs is not None else max(len(self.c_idx), len(self.u_idx))
        per_step = self.half * max(int(num_replicas), 1)  # pairs in one batch of every process
        self.num_pairs = math.ceil(base / per_step) * per_step
        self.duplicates_per_epoch = 2 * self.num_pairs - len(self.confident)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _cycled_permutation(self, rng, idx: np.ndarray) -> np.ndarray:
        reps = math.ceil(self.num_pairs / len(idx))
        return np.concatenate([rng.permutation(idx) for _ in range(reps)])[: self.num_pairs]

    def epoch_pairs(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(confident indices, unconfident indices) of the pairs of an epoch, in batch order."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.fixed_pairs is not None:
            c, u = self.fixed_pairs
            order = self._cycled_permutation(rng, np.arange(len(c)))
            return c[order], u[order]
        return self._cycled_permutation(rng, self.c_idx), self._cycled_permutation(rng, self.u_idx)

    def __iter__(self):
        c, u = self.epoch_pairs()
        for s in range(0, self.num_pairs, self.half):
            yield from c[s:s + self.half].tolist()
            yield from u[s:s + self.half].tolist()

    def __len__(self) -> int:
        return 2 * self.num_pairs


class OneRunSampler(Sampler[int]):
    """One-run SFTMix's sampler: epochs 0..ntp_epochs-1 in random order (plain NTP), later epochs balanced pairs
    (BalancedPairSampler) on the split that `split_fn()` returns when the first Mixup epoch starts.

    Both phases yield 2 * num_pairs rows per epoch, num_pairs as the BalancedPairSampler of a median split has it
    (ceil(N/2) rounded up to whole batches of all processes), so the Trainer's len(dataloader), max_steps and LR
    schedule, computed up front, hold for every epoch; the NTP epochs see every example once plus the
    `duplicates_per_epoch` repeats (from a second permutation) that fill the last batch, as the Mixup epochs do.
    Orders are seeded by (seed, epoch), so a resumed run (which skips the batches it has seen) gets the same ones."""

    def __init__(self, n: int, batch_size: int, seed: int, ntp_epochs: int, split_fn, num_replicas: int = 1):
        if batch_size % 2:
            raise SFTMixError(f"per_device_train_batch_size must be even for SFTMix (half confident, half "
                              f"unconfident); got {batch_size}.")
        self.n, self.batch_size, self.seed, self.ntp_epochs = n, batch_size, seed, int(ntp_epochs)
        self.split_fn, self.num_replicas = split_fn, num_replicas
        per_step = batch_size // 2 * max(int(num_replicas), 1)
        self.num_pairs = math.ceil(math.ceil(n / 2) / per_step) * per_step
        self.duplicates_per_epoch = 2 * self.num_pairs - n
        self.epoch = 0
        self.confident: np.ndarray | None = None  # set at the switch
        self.balanced: BalancedPairSampler | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def mixup_phase(self) -> bool:
        return self.epoch >= self.ntp_epochs

    def confident_of(self, example_idx):
        """The batch's `confident` flags in a Mixup epoch, None in an NTP epoch (the Mixup term is off there)."""
        if not self.mixup_phase or self.confident is None or example_idx is None:
            return None
        return torch.from_numpy(self.confident)[example_idx.cpu()]

    def __iter__(self):
        if not self.mixup_phase:
            rng = np.random.default_rng([self.seed, self.epoch])
            reps = math.ceil(2 * self.num_pairs / self.n)
            yield from np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: 2 * self.num_pairs].tolist()
            return
        if self.balanced is None:
            self.confident = np.asarray(self.split_fn(), dtype=bool)
            self.balanced = BalancedPairSampler(self.confident, self.batch_size, seed=self.seed,
                                                num_replicas=self.num_replicas)
            if self.balanced.num_pairs != self.num_pairs:
                raise SFTMixError(f"one-run SFTMix: the split has {int(self.confident.sum())} confident of {self.n} "
                                  f"examples, not the median split the epoch length was planned for.")
        self.balanced.set_epoch(self.epoch)
        yield from self.balanced

    def __len__(self) -> int:
        return 2 * self.num_pairs


class SFTMixCollator:
    """Wraps the trainer's collator (TRL's, DataCollatorForSeq2Seq, axolotl's): moves `confident` (and `example_idx`)
    into tensors, and, when NTP is restricted to one half, masks the other half's NTP labels while keeping the full
    labels for Mixup in `mixup_labels`."""

    def __init__(self, base, ntp_subset: str = "all"):
        self.base = base
        self.ntp_subset = ntp_subset

    def __call__(self, examples):
        examples = [dict(e) for e in examples]
        for e in examples:
            e.pop("pairing_embedding", None)  # read by the sampler, not by the model
        extra = {}
        for key, dtype in (("confident", torch.bool), ("example_idx", torch.long)):
            if key in examples[0]:
                extra[key] = torch.tensor([e.pop(key) for e in examples], dtype=dtype)
        batch = self.base(examples)
        batch.update(extra)
        if self.ntp_subset != "all" and "confident" in batch:
            batch["mixup_labels"] = batch["labels"].clone()
            drop = ~batch["confident"] if self.ntp_subset == "confident" else batch["confident"]
            batch["labels"][drop] = -100
        return batch


def _mixup_weight_at(args: MixupArguments, step: int, max_steps: int) -> float:
    mu = args.mixup_weight if args.mixup_role == "regularizer" else 1.0
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if args.mixup_weight_schedule == "linear_warmup":
        return mu * frac
    if args.mixup_weight_schedule == "linear_decay":
        return mu * (1.0 - frac)
    if args.mixup_weight_schedule == "cosine":
        return mu * 0.5 * (1.0 + math.cos(math.pi * frac))
    return mu



def prepare_train_dataset(train_dataset, args):
    """The training rows as the SFTMix sampler and loss read them: `args.selection` applied, a boolean `confident`
    column (from the column `args.split_source` names) and `example_idx` (the row index: it seeds each pair's lam and
    identifies examples in online dynamics). Returns (dataset, description of the selection)."""
    if train_dataset is None or not hasattr(train_dataset, "column_names"):
        if (args.mixup_enabled or args.ntp_subset != "all") and train_dataset is not None:
            raise SFTMixError("SFTMix needs a map-style `datasets.Dataset` (an IterableDataset cannot be split into "
                              "balanced confident/unconfident batches).")
        return train_dataset, None
    train_dataset, description = select_examples(train_dataset, args)
    if args.ntp_subset != "all" and not args.mixup_enabled:
        # §5.4 without Mixup: NTP on that half alone, the base trainer on its rows (ceil(N_half/batch) steps)
        half = confident_flags(train_dataset, args) == (args.ntp_subset == "confident")
        if not half.any():
            raise SFTMixError(f"ntp_subset={args.ntp_subset}: the training data has no {args.ntp_subset} example; "
                              "check the split.")
        train_dataset = train_dataset.select(np.flatnonzero(half))
    if args.mixup_enabled and getattr(args, "self_reference_epochs", 0):
        SFTMixMixin._check_supported(args)  # one-run SFTMix: the split is taken mid-run (OneRunSampler)
        if "confident" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("confident")
    elif args.mixup_enabled:
        SFTMixMixin._check_supported(args)
        flags = confident_flags(train_dataset, args)
        if "confident" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("confident")
        train_dataset = train_dataset.add_column("confident", flags.tolist())
    if args.mixup_enabled or args.record_online_dynamics:
        if "example_idx" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("example_idx")
        train_dataset = train_dataset.add_column("example_idx", list(range(len(train_dataset))))
    return train_dataset, description


@dataclass
class _StepCapture:
    """What one compute_loss shares with the backbone's forward hook and the wrapped model forward (setup_sftmix):
    compute_loss sets `want_hidden` and `pending` (the batch's Mixup pairs, lam and labels); the hook stores the
    backbone's output (the LM head's input) in `hidden`; the wrapped forward stores the NTP `outputs` and, still
    inside the model's forward, turns `pending` and `hidden` into the Mixup term `mix` (_mixup_term)."""

    want_hidden: bool = False
    pending: tuple | None = None
    hidden: torch.Tensor | None = None
    outputs: object = None
    mix: torch.Tensor | None = None

    def take_pending(self) -> tuple:
        pending, self.pending = self.pending, None
        return pending


class SFTMixMixin:
    """SFTMix for a `transformers.Trainer` subclass: `class T(SFTMixMixin, AnyTrainer)`; see the module docstring.

    The subclass prepares its training data with `prepare_train_dataset` before the Trainer's __init__ and calls
    `setup_sftmix()` after it. Hooks a trainer may override: `_is_loss_forward` (which model forward is the NTP one),
    `_lm_head_gathered` (gather a sharded head for the Mixup term), `_mixup_loss` (the loss function),
    `_missing_mixup_message`.
    """

    def setup_sftmix(self) -> None:
        """After the Trainer's __init__: wrap the collator, check the model and layout, hook the backbone."""
        args = self.args
        if not callable(getattr(args, "validate_mixup_args", None)):
            raise SFTMixError(f"{type(self).__name__} needs training arguments with the SFTMix fields "
                              f"(MixupArguments), got {type(args).__name__}.")
        args.validate_mixup_args()
        if self.data_collator is not None and not isinstance(self.data_collator, SFTMixCollator):
            self.data_collator = SFTMixCollator(self.data_collator, args.ntp_subset)
        if not hasattr(self, "_metrics"):  # TRL's SFTTrainer has this store and logs it; other trainers get ours
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            self._sftmix_logs_metrics = True
        self.online_records = OnlineRecords()
        for cb in self.callback_handler.callbacks:  # one-run SFTMix's online confidence reads self.online_records
            if callable(getattr(cb, "self_split", None)):
                cb.trainer = self
        self._captured = _StepCapture()
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._causal_lm = causal_lm
        if args.mixup_enabled:
            self._check_parallelism()
        if not (args.mixup_enabled or args.record_online_dynamics):
            return
        if args.mixup_enabled:  # online records read the NTP forward's own log-probs (bias, scale, softcap applied)
            self._check_lm_head(causal_lm)
        # The backbone's output is the LM head's input (after the final norm). The NTP forward calls the backbone as
        # a module, so a forward hook sees it without a second pass.
        causal_lm.base_model.register_forward_hook(self._capture_hidden)
        # PEFT calls `model.forward` directly (no module hooks), so wrap the bound forward to see the NTP outputs.
        model_forward = causal_lm.forward

        def forward_and_capture(_self, *a, **kw):
            out = model_forward(*a, **kw)
            if self._is_loss_forward(kw):
                self._captured.outputs = out
                if self._captured.pending is not None and torch.is_grad_enabled():
                    # Still inside the model's forward: FSDP keeps the LM head gathered here (FSDP1 with
                    # use_orig_params exposes only its shard once the forward has returned), and ZeRO-3 reduces the
                    # gradients of what runs inside its engine's forward.
                    self._captured.mix = self._mixup_term(*self._captured.take_pending())
            return out

        # The Trainer keeps the dataset columns the model's forward signature names (remove_unused_columns): keep it.
        forward_and_capture.__signature__ = inspect.signature(type(causal_lm).forward)
        causal_lm.forward = types.MethodType(forward_and_capture, causal_lm)

    # -- hooks a trainer may override -------------------------------------------------------------------------------
    # Whether the Mixup term may be computed after the NTP loss when that loss did not call the model's forward (it
    # called the backbone directly): right for one process and DDP; under FSDP/ZeRO-3 the LM head is gathered only
    # inside the forward, where _lm_head_weight's checks refuse a sharded head with a one-line error.
    mixup_after_forward = True

    def _is_loss_forward(self, forward_kwargs: dict) -> bool:
        """Whether this model forward is the one that computes the NTP loss (the Trainer calls no other one)."""
        return True

    def _lm_head_gathered(self, weight):
        """Context in which `weight` is the whole LM head (TRL's trainer gathers ZeRO-3 partitions here)."""
        return contextlib.nullcontext()

    def _mixup_loss(self, hidden, labels, weight, pairs, lam):
        return mixup_loss(hidden, labels, weight, pairs, lam, self.args.mixup_chunk_tokens)

    def _missing_mixup_message(self) -> str:
        return ("the Mixup loss was not computed: the model's forward did not run the backbone this trainer hooked "
                "(a custom compute_loss that bypasses model(**inputs)?); set mixup_weight=0 or call the model.")

    # -- checks -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_supported(args) -> None:
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

    def _check_parallelism(self) -> None:
        """Refuse the layouts in which no process holds whole examples (to pair) and the whole LM head.

        Data parallelism is supported: DDP, FSDP2 (accelerate or transformers' distributed_config with
        fsdp_size/dp_replicate_size), DeepSpeed ZeRO-1/2/3; see docs/distributed.md for what was tested and how.
        """
        dc = getattr(self.model.config, "distributed_config", None)

        def size(name):
            getter = getattr(self, name, None)
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
        if getattr(self.accelerator, "split_batches", False):
            raise SFTMixError(
                "accelerator_config.split_batches=True cuts each batch into per-process slices, which separates "
                "confident rows from their unconfident partners; leave it False (per_device_train_batch_size is then "
                "the per-process batch, balanced on every process).")

    @staticmethod
    def _check_lm_head(causal_lm) -> None:
        head = causal_lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise SFTMixError(f"{type(causal_lm).__name__} has an LM head with a bias, which the Mixup loss does not "
                              "model; use a model without it or set mixup_weight=0.")
        SFTMixMixin.check_model_config(type(causal_lm).__name__, causal_lm.config.get_text_config())

    @staticmethod
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


    # -- data -------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("confident", "example_idx", "pairing_embedding"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.mixup_enabled:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "self_reference_epochs", 0):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.pair_sampler = OneRunSampler(len(dataset), self.args.per_device_train_batch_size, seed,
                                              self.args.self_reference_epochs, self._one_run_split,
                                              num_replicas=self.args.world_size)
            return self.pair_sampler
        confident = np.asarray(dataset["confident"], dtype=bool)
        pairs = None
        if self.args.pairing == "nearest":
            if "pairing_embedding" not in dataset.column_names:
                raise SFTMixError("pairing=nearest needs a `pairing_embedding` column (the reference model's hidden "
                                  "state of each example, written by `sftmix dynamics`); use pairing=random otherwise.")
            pairs = nearest_partners(np.asarray(dataset["pairing_embedding"]), confident)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = BalancedPairSampler(confident, self.args.per_device_train_batch_size, seed=seed, pairs=pairs,
                                      num_replicas=self.args.world_size)
        self.pair_sampler = sampler
        return sampler

    def _one_run_split(self) -> np.ndarray:
        """The confident flags of the training rows at the switch to Mixup (one-run SFTMix), from the
        SelfReferenceCallback among the trainer's callbacks (sftmix.confidence.callback: this module stays free of step
        1)."""
        found = [cb for cb in self.callback_handler.callbacks if callable(getattr(cb, "self_split", None))]
        if len(found) != 1:
            raise SFTMixError(f"self_reference_epochs={self.args.self_reference_epochs} needs exactly one "
                              f"sftmix.confidence.callback.SelfReferenceCallback in the trainer's callbacks "
                              f"(found {len(found)}).")
        if "guid" not in self.train_dataset.column_names:
            raise SFTMixError("one-run SFTMix joins the split by guid: the training data needs a `guid` column "
                              "(sftmix.data.tokenize_records adds one).")
        self.accelerator.wait_for_everyone()  # the scores of the last NTP step are written by the main process
        flags = found[0].self_split(list(self.train_dataset["guid"]), write=self.is_world_process_zero())
        self.accelerator.wait_for_everyone()
        return flags

    # -- loss -------------------------------------------------------------------------------------------------------
    def _capture_hidden(self, module, args, output):
        if self._captured.want_hidden:
            self._captured.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _draw_lam(self, pair_rows: torch.Tensor, device) -> torch.Tensor:
        """lam ~ Beta(alpha, alpha) for each pair, from a generator seeded by (seed, epoch, confident example,
        unconfident example). A pair gets the same lam however the batch is split: across gradient accumulation,
        across processes, and after a resume."""
        epoch = self.pair_sampler.epoch if getattr(self, "pair_sampler", None) is not None else 0
        alpha = self.args.mixup_alpha
        lam = [np.random.default_rng([self.args.seed, epoch, int(c), int(u)]).beta(alpha, alpha)
               for c, u in pair_rows.tolist()]
        return torch.tensor(lam, dtype=torch.float32, device=device)

    def _lm_head_weight(self):
        from torch.distributed.tensor import DTensor

        weight = self._causal_lm.get_output_embeddings().weight
        if not isinstance(weight, DTensor):
            # DDP, ZeRO-3 (gathered below by maybe_gather_lm_head_ctx), and FSDP2 as accelerate and transformers lay it
            # out: the head shares a unit with the final norm that stays unsharded from forward to backward, so this
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        confident = inputs.pop("confident", None)
        mixup_labels = inputs.pop("mixup_labels", None)
        example_idx = inputs.pop("example_idx", None)
        if confident is None and isinstance(getattr(self, "pair_sampler", None), OneRunSampler):
            confident = self.pair_sampler.confident_of(example_idx)  # None during the NTP epochs
        training = self.model.training
        use_mixup = training and self.args.mixup_enabled and confident is not None
        self._captured = _StepCapture(want_hidden=use_mixup)
        if use_mixup:
            labels = mixup_labels if mixup_labels is not None else inputs["labels"]
            c_rows = torch.nonzero(confident).flatten()
            u_rows = torch.nonzero(~confident).flatten()
            if len(c_rows) != len(u_rows) or len(c_rows) == 0:
                raise RuntimeError(f"unbalanced SFTMix batch ({len(c_rows)} confident, {len(u_rows)} unconfident); "
                                   "the BalancedPairSampler should make this impossible")
            pairs = torch.stack([c_rows, u_rows], dim=1).to(labels.device)
            lam = self._draw_lam(example_idx[pairs.cpu()] if example_idx is not None else pairs.cpu(), labels.device)
            self._captured.pending = (pairs, lam, labels)  # computed by forward_and_capture, see _mixup_term
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        ntp_loss = result[0] if return_outputs else result
        outputs = self._captured.outputs
        if (training and self.args.record_online_dynamics and example_idx is not None
                and getattr(outputs, "log_probs", None) is not None
                and not getattr(getattr(self, "pair_sampler", None), "mixup_phase", False)):  # one-run: NTP epochs
            self._record_online(outputs, example_idx)
        if not use_mixup:
            self._captured = _StepCapture()
            self._log_losses(training, ntp_loss, outputs, None, num_items_in_batch, example_idx)
            return result

        mix = self._captured.mix
        if mix is None and self.mixup_after_forward and self._captured.hidden is not None:
            # The NTP loss ran the backbone itself rather than the model's forward (e.g. a chunked cross-entropy over
            # the label positions): the hidden states were captured all the same; the Mixup term follows it here.
            mix = self._mixup_term(*self._captured.take_pending())
        if mix is None:
            raise SFTMixError(self._missing_mixup_message())
        self._captured = _StepCapture()
        self._log_losses(training, ntp_loss, outputs, mix, num_items_in_batch, example_idx)

        # Match the Trainer's normalisation of the NTP loss: when it is already divided by the tokens of the whole
        # accumulated batch, the Trainer does not divide by the accumulation steps, so the per-micro-batch Mixup mean
        # must be. (Across processes DDP averages gradients, which averages the per-process means.)
        scaled_for_ga = self._ntp_scaled_for_ga(num_items_in_batch)
        mix_term = mix / self.current_gradient_accumulation_steps if scaled_for_ga else mix
        mu = _mixup_weight_at(self.args, self.state.global_step, self.state.max_steps)
        if self.args.mixup_role == "only":  # the NTP loss is still computed (and logged) but gets no gradient
            loss = mu * mix_term
        else:
            loss = ntp_loss + mu * mix_term
        self._metrics["train"]["mixup_weight"].append(mu)
        return (loss, result[1]) if return_outputs else loss

    def _ntp_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer treats the NTP loss as already normalised over the whole accumulated batch."""
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return bool(scaled_for_ga)

    def _mixup_term(self, pairs, lam, labels):
        """L_Mixup of the batch from the hidden states the hook captured; called inside the model's forward."""
        hidden, self._captured.hidden = self._captured.hidden, None
        weight = self._lm_head_weight()
        # ZeRO-3 (TRL's trainer): gathered for this forward only. _MixedCrossEntropy computes its weight gradient here
        # and saves it; backward hands it to lm_head.weight's gradient accumulator, summed with the NTP head's
        # gradient, where ZeRO-3's reduce-scatter hook takes it (tested on CPU, see docs/distributed.md).
        with self._lm_head_gathered(weight):
            if weight.dim() != 2 or weight.shape[-1] != hidden.shape[-1]:
                raise SFTMixError(
                    f"the LM head weight has shape {tuple(weight.shape)} in the forward (hidden size "
                    f"{hidden.shape[-1]}): it is sharded by a wrapper that does not gather it there (e.g. an FSDP unit "
                    "of its own whose forward never runs); keep lm_head in the root or final-norm unit, or set "
                    "mixup_weight=0.")
            return self._mixup_loss(hidden, labels.to(hidden.device), weight, pairs.to(hidden.device),
                                    lam.to(hidden.device))

    # -- logging and the non-finite guard -----------------------------------------------------------------------------
    def _log_losses(self, training, ntp_loss, outputs, mix, num_items_in_batch, example_idx):
        """Log `ntp_loss` and `mixup_loss` with one gather across processes; in training, stop on a non-finite loss.

        `ntp_loss` is the token mean over every process (and, given num_items_in_batch, over the whole accumulated
        batch): the NTP part of the logged `loss`, however the batch is split. `mixup_loss` is the mean over processes
        of each process's pair mean, the quantity whose gradient DDP/FSDP/ZeRO average. The check runs on gathered
        values, so every process raises together (no rank is left waiting in a collective), before backward().
        """
        mode = "train" if training else "eval"
        has_lp = getattr(outputs, "log_probs", None) is not None
        zero = torch.zeros((), dtype=torch.float32, device=ntp_loss.device)
        stats = torch.stack([
            -outputs.log_probs.detach().float().sum() if has_lp else zero,
            outputs.label_mask.sum().float() if has_lp else zero,
            zero + (num_items_in_batch if num_items_in_batch is not None else 0),
            mix.detach().float() if mix is not None else zero,
            ntp_loss.detach().float(),
        ])
        g = self.accelerator.gather(stats[None]).reshape(-1, stats.numel())
        if has_lp:
            if training and num_items_in_batch is not None:
                # Each micro-batch's share of the accumulated token mean, times the steps: the mean of the values
                # logged over one optimizer step is the step's token mean. With average_tokens_across_devices every
                # process holds the global count.
                total = g[:, 2].sum() / (g.shape[0] if self.args.average_tokens_across_devices else 1)
                ntp = g[:, 0].sum() / total.clamp(min=1) * self.current_gradient_accumulation_steps
            else:
                ntp = g[:, 0].sum() / g[:, 1].sum().clamp(min=1)
        else:
            # Another trainer's own NTP loss (e.g. the model's): the mean over processes of the value it returned
            # (the Trainer multiplies it by the process count when it divides by the global token count), times the
            # accumulation steps when it is a share of the accumulated batch's token mean, as above.
            scaled = training and self._ntp_scaled_for_ga(num_items_in_batch)
            ntp = g[:, 4].mean() * (self.current_gradient_accumulation_steps if scaled else 1)
        self._metrics[mode]["ntp_loss"].append(ntp.item())
        if mix is not None:
            self._metrics[mode]["mixup_loss"].append(g[:, 3].mean().item())
        if training:
            bad = [name for name, col in (("NTP", 4), ("Mixup", 3)) if not torch.isfinite(g[:, col]).all()]
            if bad:
                values = f"NTP loss {g[:, 4].tolist()}, Mixup loss {g[:, 3].tolist() if mix is not None else 'off'}"
                raise SFTMixError(self._nonfinite_message(" and ".join(bad) + " loss", values, example_idx))

    def _nonfinite_message(self, what: str, values: str, example_idx=None) -> str:
        """One line: what went non-finite, where, the learning rate, what was kept and what to try."""
        step = self.state.global_step + 1
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.args.learning_rate
        last = last_complete_checkpoint(self.args.output_dir)
        kept = (f"the last checkpoint, {last}, is intact (resume from it)" if last
                else "no checkpoint was saved before it")
        batch = ""
        if example_idx is not None and "guid" in getattr(self.train_dataset, "column_names", []):
            rows = sorted({int(i) for i in example_idx.tolist()})[:8]
            batch = f" (guids on this process: {', '.join(str(self.train_dataset[i]['guid']) for i in rows)})"
        if self.args.fp16:
            hint = "fp16 overflow is the usual cause: train with bf16 (or fp32) instead; else lower the learning rate"
        else:
            hint = (f"lower the learning rate (now {lr:.3g}) or keep max_grad_norm > 0 (now "
                    f"{self.args.max_grad_norm}), "
                    f"and check the examples of this batch{batch}")
        return (f"non-finite {what} at step {step} ({values}; lr={lr:.3g}): training stopped before this update; "
                f"{kept}. Try: {hint}.")

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

    def _record_online(self, outputs, example_idx):
        """Add this micro-batch's per-example response NLL, from every process, to `online_records`.

        `gather`, not `gather_for_metrics`: at the end of the dataloader the latter cuts each batch to the dataset's
        remainder, which is wrong for every micro-batch but the last of an accumulation window (the Trainer fetches
        the whole window before the first forward) and for samplers that round the epoch up. OnlineRecords keeps one
        record per (epoch, example), so a row repeated to fill the last batch is not counted twice."""
        nll_sum = -(outputs.log_probs.detach().float()).sum(dim=1)
        n_tok = outputs.label_mask.sum(dim=1)
        idx = example_idx.to(nll_sum.device)
        acc = self.accelerator
        if acc.num_processes > 1:  # equal shapes for the gather (even_batches=False can leave a short last batch)
            idx = acc.pad_across_processes(idx, pad_index=-1)
            nll_sum, n_tok = acc.pad_across_processes(nll_sum), acc.pad_across_processes(n_tok)
        gathered = acc.gather((idx, nll_sum, n_tok))
        epoch = float(self.state.epoch or 0.0)
        for i, s, n in zip(*(t.tolist() for t in gathered)):
            if i >= 0 and n > 0:
                self.online_records.add({"example_idx": int(i), "global_step": self.state.global_step,
                                         "epoch": epoch, "nll_mean": s / n, "n_tokens": int(n)})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL's SFTTrainer logs self._metrics itself; for other trainers the mean of each metric since the last log
        # joins the Trainer's logs here (as TRL does: `eval_` prefix in evaluation).
        if getattr(self, "_sftmix_logs_metrics", False):
            mode = "train" if self.model.training else "eval"
            metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
            logs.update({f"eval_{k}" if mode == "eval" else k: v for k, v in metrics.items()})
            self._metrics[mode].clear()
        super().log(logs, start_time)


# ----------------------------------------------------------------------------------------------------------------
# transformers.Trainer + the component


@dataclass
class SFTMixTrainingArguments(MixupArguments, TrainingArguments):
    r"""Configuration of [`SFTMixHFTrainer`]: every field of `transformers.TrainingArguments`, plus the SFTMix ones."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_mixup_args()


class SFTMixHFTrainer(SFTMixMixin, Trainer):
    """`transformers.Trainer` with the SFTMix Mixup regularizer; the NTP loss is the model's own (`model(**inputs)`
    with `labels`). `train_dataset`: tokenized rows (`input_ids`, `labels`) with `confident` or `confidence`.
    Without a `data_collator`, rows are padded by DataCollatorForSeq2Seq (labels with -100)."""

    def __init__(self, model=None, args: SFTMixTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 data_collator=None, processing_class=None, **kwargs):
        if args is None:
            args = SFTMixTrainingArguments(output_dir="sftmix-output")
        elif not callable(getattr(args, "validate_mixup_args", None)):
            raise SFTMixError("SFTMixHFTrainer needs SFTMixTrainingArguments (transformers.TrainingArguments with the "
                              "Mixup fields).")
        if args.record_online_dynamics:
            raise SFTMixError("record_online_dynamics reads TRL's per-token log-probabilities: use SFTMixTrainer.")
        train_dataset, self.selection_description = prepare_train_dataset(train_dataset, args)
        if data_collator is None and processing_class is not None and hasattr(processing_class, "pad"):
            from transformers import DataCollatorForSeq2Seq

            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=-100)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, processing_class=processing_class, **kwargs)
        self.setup_sftmix()
