"""Online confidence: each example's response NLL from the NTP training forward itself (no scoring pass), its records
and what step 1 and one-run SFTMix make of them.

    from sftmix.confidence.online import OnlineRecords, online_confidence, online_confidence_rows
    records = OnlineRecords()   # trainer.online_records (SFTMixConfig(record_online_dynamics=True))
    records.add({"example_idx": 3, "global_step": 0, "epoch": 0.0, "nll_mean": 2.1, "n_tokens": 9})  # -> True
    records.add({"example_idx": 3, "global_step": 1, "epoch": 0.5, "nll_mean": 2.0, "n_tokens": 9})  # -> False
    conf = online_confidence(records, guids, relative=True)["confidence"]   # -mean ppl per example, step-relative
    rows = online_confidence_rows(records, guids)    # confidence.jsonl rows from the records alone
    write_online_summary("run/", records, guids, confidence_rows)   # dynamics/online_*.json(l), Spearman vs scored

A record is kept once per (epoch, example): the first time the example is trained on in that epoch, with the
optimizer step it was seen at (`global_step`, the steps done before it). A second visit in the same epoch is a
filler of the epoch's last batch (a sampler rounding the epoch up to whole batches of all processes, or accelerate
repeating the first rows so that every process gets a full batch), not a new observation of the example.

The records of a run are saved before each Trainer checkpoint (`save_online_records`, called by the scoring callback
of sftmix.confidence.callback) and read back on resume (`saved_online_records`). Caveat of the online mode: with one
epoch each example is seen once, at a different point of training, so its raw NLL is confounded with *when* it was
visited; `relative` removes the model's drift over the steps (see `online_confidence`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sftmix.confidence.split import split_confident
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, write_jsonl


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


def save_online_records(path, records, state, control, now: bool = False) -> None:
    """Write the online records (main process) when the Trainer is about to save a checkpoint, or `now`. Called from
    on_step_end / on_epoch_end, where the Trainer's flow callback (first in the list) has already decided whether a
    checkpoint is saved: written before it, every checkpoint has the records of the steps it holds (a kill between
    the two must not leave a checkpoint without them)."""
    if (now or control.should_save) and state.is_world_process_zero:
        write_jsonl(path, records)


def saved_online_records(path, step: int, fix: str) -> list[dict]:
    """The online records of a run resumed after optimizer step `step`, from the file saved with its checkpoints.
    A record's global_step is the step count *before* its optimizer step, so steps 1..`step` (done in the checkpoint
    resumed from) recorded global_step 0..step-1; later ones are recorded again. A step without records (the file
    deleted, or older than the checkpoint) is an error ending in `fix`: the split would rest on part of the data."""
    path = Path(path)
    kept = [r for r in read_jsonl(path) if r["global_step"] < step] if path.exists() else []
    missing = sorted(set(range(step)) - {r["global_step"] for r in kept})
    if missing:
        raise SFTMixError(f"{path}: the online records of optimizer step(s) {missing[:5]} are missing, and training "
                          f"resumes after them (step {step}); {fix}")
    return kept


def online_confidence(online_records, guids, epochs: str = "all", relative: bool | str = False) -> dict:
    """Trainer `online_records` ({example_idx, global_step, epoch, nll_mean, n_tokens}) -> per-example confidence.

    confidence_i = -mean over example i's occurrences of exp(nll_mean) (epochs="all"), or over its occurrences in
    the last epoch it was seen in (epochs="last"). relative=True replaces nll_mean by nll_mean minus the mean
    nll_mean of all records of the same optimizer step (global_step): every example of a step was scored by the same
    weights, so this removes the drift of the model over the epoch (examples visited early would otherwise look
    unconfident for being early). relative="linear" subtracts a straight line fitted to nll_mean over global_step
    within each epoch instead: the same drift removed, without the noise of a mean over one small batch.
    Returns {"confidence": [N] (nan where never seen), "occurrences": [N] int, "unseen": count}."""
    if epochs not in ("all", "last"):
        raise SFTMixError(f"epochs must be 'all' or 'last', got {epochs!r}.")
    n = len(guids)
    recs = list(online_records)
    bad = [r for r in recs if not 0 <= int(r["example_idx"]) < n]
    if bad:
        raise SFTMixError(
            f"online record example_idx={bad[0]['example_idx']} is outside the {n} examples given; pass the guids of "
            f"the dataset the reference was trained on, in its order."
        )
    if epochs == "last":
        last = {}
        for r in recs:
            i = int(r["example_idx"])
            last[i] = max(last.get(i, -1), epoch_index(r))
        recs = [r for r in recs if epoch_index(r) == last[int(r["example_idx"])]]
    offset = _nll_offsets(recs, relative)
    ppl_sum, count = np.zeros(n), np.zeros(n, dtype=np.int64)
    for r in recs:
        i = int(r["example_idx"])
        ppl_sum[i] += math.exp(float(r["nll_mean"]) - offset.get(r["global_step"], 0.0))
        count[i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, -ppl_sum / np.maximum(count, 1), np.nan)
    return {"confidence": conf, "occurrences": count, "unseen": int((count == 0).sum())}


def _step_mean_nll(records) -> dict:
    """{global_step: mean nll_mean of that step's records}."""
    total: dict = {}
    for r in records:
        t = total.setdefault(r["global_step"], [0.0, 0])
        t[0] += float(r["nll_mean"])
        t[1] += 1
    return {k: s / c for k, (s, c) in total.items()}


def _nll_offsets(records, relative: bool | str) -> dict:
    """{global_step: what online_confidence subtracts}: nothing (False), the step's mean (True or "step"), or a least-
    squares line of nll_mean over global_step, one per epoch ("linear")."""
    if relative in (False, None):
        return {}
    if relative in (True, "step"):
        return _step_mean_nll(records)
    if relative != "linear":
        raise SFTMixError(f"relative must be False, True, 'step' or 'linear'; got {relative!r}.")
    by_epoch: dict = {}
    for r in records:
        by_epoch.setdefault(epoch_index(r), []).append(r)
    out = {}
    for recs in by_epoch.values():
        x = np.array([float(r["global_step"]) for r in recs])
        y = np.array([float(r["nll_mean"]) for r in recs])
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
        out.update({r["global_step"]: float(intercept + slope * float(r["global_step"])) for r in recs})
    return out


def online_confidence_rows(online_records, guids, n_tokens=None, relative: bool | str = False) -> list[dict]:
    """confidence.jsonl rows from online records alone (online-only mode): guid, n_tokens, confidence (-mean ppl
    over all occurrences; relative=True: of the step-relative ppl, see `online_confidence`), variability (std of
    those ppl), ppl_1..ppl_E (mean ppl in epoch e, as recorded), confident."""
    oc = online_confidence(online_records, guids, relative=relative)
    if oc["unseen"]:
        i = int(np.flatnonzero(oc["occurrences"] == 0)[0])
        raise SFTMixError(
            f"online confidence: {oc['unseen']} of {len(guids)} examples were never seen in the reference's training "
            f"(e.g. guid {guids[i]!r}); train the reference for at least one full epoch."
        )
    offset = _nll_offsets(online_records, relative)
    by_example: dict[int, list[tuple[int, float, float]]] = {}
    for r in online_records:
        nll = float(r["nll_mean"])
        by_example.setdefault(int(r["example_idx"]), []).append(
            (epoch_index(r), math.exp(nll), math.exp(nll - offset.get(r["global_step"], 0.0))))
    if n_tokens is None:  # the response tokens each record counted
        seen_tokens = {int(r["example_idx"]): int(r["n_tokens"]) for r in online_records}
        n_tokens = [seen_tokens[i] for i in range(len(guids))]
    n_epochs = 1 + max(e for occ in by_example.values() for e, *_ in occ)
    confident = split_confident(oc["confidence"], guids)
    rows = []
    for i, g in enumerate(guids):
        occ = by_example[i]
        row = {"guid": g, "n_tokens": int(n_tokens[i]), "confidence": float(oc["confidence"][i]),
               "variability": float(np.std([rel if relative else p for _, p, rel in occ]))}
        for e in range(n_epochs):
            ppl_e = [p for ep, p, _ in occ if ep == e]
            row[f"ppl_{e + 1}"] = float(np.mean(ppl_e)) if ppl_e else None
        row["confident"] = bool(confident[i])
        rows.append(row)
    return rows


def compare_online(online_conf, scored_conf, guids) -> dict:
    """Spearman correlation between online confidence and the one from the scoring steps, and how often the splits
    agree."""
    from scipy.stats import spearmanr

    online_conf, scored_conf = np.asarray(online_conf, float), np.asarray(scored_conf, float)
    seen = np.isfinite(online_conf)
    if seen.sum() < 3:
        raise SFTMixError(f"only {int(seen.sum())} examples have online records; need at least 3 to compare.")
    rho, p = spearmanr(online_conf[seen], scored_conf[seen])
    g = [str(x) for x, s in zip(guids, seen) if s]
    agree = split_confident(online_conf[seen], g) == split_confident(scored_conf[seen], g)
    return {"spearman": float(rho), "pvalue": float(p), "n": int(seen.sum()), "unseen": int((~seen).sum()),
            "split_agreement": float(agree.mean())}


def online_split_rows(scored_rows, online_conf, guids) -> list[dict]:
    """confidence.jsonl rows (from the scoring steps) split by online confidence instead, each keeping its scored
    values beside (as checkpoint_confidence / checkpoint_confident: the names of the file)."""
    online_conf = np.asarray(online_conf, float)
    if not np.isfinite(online_conf).all():
        i = int(np.flatnonzero(~np.isfinite(online_conf))[0])
        raise SFTMixError(f"online confidence: {int((~np.isfinite(online_conf)).sum())} examples were never seen in "
                          f"the reference's training (e.g. {guids[i]}); train the reference for at least one full "
                          f"epoch.")
    by_guid = dict(zip(guids, online_conf))
    order = [r["guid"] for r in scored_rows]
    conf = [float(by_guid[g]) for g in order]
    confident = split_confident(conf, order)
    return [{**r, "checkpoint_confidence": r["confidence"], "checkpoint_confident": r["confident"],
             "confidence": c, "confident": bool(k)} for r, c, k in zip(scored_rows, conf, confident)]


def write_online_summary(run_dir, online_records, guids, confidence_rows=None, epochs: str = "all") -> dict:
    """Write run_dir/dynamics/online_confidence.jsonl and online_summary.json (with the Spearman correlation against
    `confidence_rows`, the confidence from the scoring steps, when given)."""
    run_dir = Path(run_dir)
    oc = online_confidence(online_records, guids, epochs=epochs)
    summary = {"epochs": epochs, "records": len(online_records), "n": len(guids), "unseen": oc["unseen"]}
    if confidence_rows is not None:
        by_guid = {r["guid"]: r["confidence"] for r in confidence_rows}
        scored = np.array([by_guid.get(g, np.nan) for g in guids])
        summary.update(compare_online(oc["confidence"], scored, guids))
    write_jsonl(run_dir / "dynamics" / "online_confidence.jsonl", [
        {"guid": g, "online_confidence": None if np.isnan(c) else float(c), "occurrences": int(o)}
        for g, c, o in zip(guids, oc["confidence"], oc["occurrences"])
    ])
    atomic_write_json(run_dir / "dynamics" / "online_summary.json", summary)
    return summary
