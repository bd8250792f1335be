"""Which rows train together: the training rows prepared for SFTMix, the balanced-pair samplers, the collator.

    from sftmix.mixup.sampling import SFTMixCollator, batch_pairs, prepare_train_dataset, train_sampler
    ds, description = prepare_train_dataset(ds, args)     # selection, a bool `confident` column, `example_idx`
    sampler = train_sampler(ds, args)                     # BalancedPairSampler (or OneRunSampler(split_fn=...))
    collator = SFTMixCollator(base_collator, args.ntp_subset)  # `confident`, `example_idx` as tensors
    pairs, lam = batch_pairs(batch["confident"], batch["example_idx"], args, epoch=0, device="cpu")  # in the loss

Each micro-batch of the sampler holds batch_size/2 confident rows followed by their batch_size/2 unconfident
partners; the collator passes the flags through to the loss (sftmix.mixup.mixin). Pure functions of the dataset's
columns and the arguments (MixupArguments + the Trainer's batch, seed and world size): no model, no trainer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler

from sftmix.confidence.split import confident_flags, nearest_partners, select_examples
from sftmix.mixup.guard import check_supported
from sftmix.utils import SFTMixError


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


def prepare_train_dataset(train_dataset, args):
    """The training rows as the SFTMix sampler and loss read them: `args.selection` applied, a boolean `confident`
    column (from the column `args.split_source` names) and `example_idx` (the row index: it seeds each pair's lam and
    identifies examples in online dynamics). Returns (dataset, description of the selection). SFTMix's trainers call
    it themselves; a dataset it prepared for these same `args` is returned as it is (code written when a subclass had
    to call it before the Trainer's __init__ still selects once)."""
    prepared = getattr(train_dataset, "_sftmix_prepared", None)
    if prepared is not None and prepared[0] is args:
        return train_dataset, prepared[1]
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
        check_supported(args)  # one-run SFTMix: the split is taken mid-run (OneRunSampler)
        if "confident" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("confident")
    elif args.mixup_enabled:
        check_supported(args)
        flags = confident_flags(train_dataset, args)
        if "confident" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("confident")
        train_dataset = train_dataset.add_column("confident", flags.tolist())
    if args.mixup_enabled or args.record_online_dynamics:
        if "example_idx" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("example_idx")
        train_dataset = train_dataset.add_column("example_idx", list(range(len(train_dataset))))
    train_dataset._sftmix_prepared = (args, description)
    return train_dataset, description


def pair_lam(pair_rows: torch.Tensor, args, epoch: int, device) -> torch.Tensor:
    """lam ~ Beta(mixup_alpha, mixup_alpha) for each (confident, unconfident) row pair, from a generator seeded by
    (seed, epoch, confident example, unconfident example). A pair gets the same lam however the batch is split: across
    gradient accumulation, across processes, and after a resume."""
    alpha = args.mixup_alpha
    lam = [np.random.default_rng([args.seed, epoch, int(c), int(u)]).beta(alpha, alpha) for c, u in pair_rows.tolist()]
    return torch.tensor(lam, dtype=torch.float32, device=device)


def batch_pairs(confident: torch.Tensor, example_idx, args, epoch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of a balanced micro-batch, the i-th confident row with the i-th unconfident row ([P, 2] row indices
    on `device`), and each pair's lam (pair_lam of the rows' `example_idx`, or of the row indices without it)."""
    c_rows = torch.nonzero(confident).flatten()
    u_rows = torch.nonzero(~confident).flatten()
    if len(c_rows) != len(u_rows) or len(c_rows) == 0:
        raise RuntimeError(f"unbalanced SFTMix batch ({len(c_rows)} confident, {len(u_rows)} unconfident); "
                           "the BalancedPairSampler should make this impossible")
    pairs = torch.stack([c_rows, u_rows], dim=1).to(device)
    rows = example_idx[pairs.cpu()] if example_idx is not None else pairs.cpu()
    return pairs, pair_lam(rows, args, epoch, device)


def train_sampler(dataset, args, split_fn=None):
    """The sampler of an SFTMix run with Mixup on: one-run SFTMix (`self_reference_epochs`) gets a OneRunSampler
    whose split comes from `split_fn()` at the switch; otherwise balanced pairs on the `confident` column (random
    pairs, or fixed nearest-neighbour pairs from `pairing_embedding` with pairing=nearest)."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    if getattr(args, "self_reference_epochs", 0):
        return OneRunSampler(len(dataset), args.per_device_train_batch_size, seed, args.self_reference_epochs,
                             split_fn, num_replicas=args.world_size)
    confident = np.asarray(dataset["confident"], dtype=bool)
    pairs = None
    if args.pairing == "nearest":
        if "pairing_embedding" not in dataset.column_names:
            raise SFTMixError("pairing=nearest needs a `pairing_embedding` column (the reference model's hidden "
                              "state of each example, written by `sftmix dynamics`); use pairing=random otherwise.")
        pairs = nearest_partners(np.asarray(dataset["pairing_embedding"]), confident)
    return BalancedPairSampler(confident, args.per_device_train_batch_size, seed=seed, pairs=pairs,
                               num_replicas=args.world_size)
