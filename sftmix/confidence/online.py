"""Online per-example records: each example's response NLL from the NTP training forward itself (no scoring pass).

    from sftmix.confidence.online import OnlineRecords, epoch_index
    records = OnlineRecords()   # trainer.online_records (SFTMixConfig(record_online_dynamics=True))
    records.add({"example_idx": 3, "global_step": 0, "epoch": 0.0, "nll_mean": 2.1, "n_tokens": 9})  # -> True
    records.add({"example_idx": 3, "global_step": 1, "epoch": 0.5, "nll_mean": 2.0, "n_tokens": 9})  # -> False

A record is kept once per (epoch, example): the first time the example is trained on in that epoch, with the
optimizer step it was seen at (`global_step`, the steps done before it). A second visit in the same epoch is a
filler of the epoch's last batch (a sampler rounding the epoch up to whole batches of all processes, or accelerate
repeating the first rows so that every process gets a full batch), not a new observation of the example.
"""

from __future__ import annotations

import math


def epoch_index(record) -> int:
    """The epoch a record was taken in. `epoch` is the Trainer's fractional epoch before the record's optimizer step:
    in [e, e+1) during epoch e (exactly e at its first step: (e-1) + s/s)."""
    return math.floor(float(record["epoch"]) + 1e-9)


class OnlineRecords(list):
    """The records of a run, in the order they were taken; `add` keeps one per (epoch, example). A list (JSONL
    writes it as it is), filled only through `add`, `extend` and `clear`, which keep the (epoch, example) index."""

    def __init__(self, records=()):
        super().__init__()
        self._seen: set[tuple[int, int]] = set()
        self.extend(records)

    def add(self, record: dict) -> bool:
        """Keep `record` unless its example already has one in the same epoch; say whether it was kept."""
        key = (epoch_index(record), int(record["example_idx"]))
        if key in self._seen:
            return False
        self._seen.add(key)
        super().append(record)
        return True

    append = add

    def extend(self, records) -> None:
        for r in records:
            self.add(r)

    def clear(self) -> None:
        super().clear()
        self._seen.clear()
