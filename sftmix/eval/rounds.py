"""Evaluation rounds: one evaluation repeated with its own seed per round, every round's value kept, mean +- sd.

    from sftmix.eval.rounds import run_rounds
    out = run_rounds(3, seed=0, run_one=lambda r, s: {"accuracy": ...}, store=Path("eval/rounds/pubmedqa"),
                     fingerprint=settings, key="accuracy")
    out["mean"], out["sd"], out["values"], out["rounds"]   # rounds: what run_one returned, plus round and seed

Generic on purpose: the multiple-choice tasks (mc_protocol=biomistral: a new shot set per question each round) use
it, and so can the judged evaluations (a sampled answer per round). Round r's seed is seed + r, so a run with 3 rounds
repeats the first 3 rounds of a run with 5. A round is the unit of resume: each finished round is written atomically
to STORE/round_<r>.json with the fingerprint of what it depends on; on the next call a stored round with the same
fingerprint and seed is read back, not run again, so a killed evaluation starts again at the round it was in.
sd is the population standard deviation (statistics.pstdev), as BioMistral's own aggregation
(Evaluation/FewShot/EvaluateFewShot-Ensemble.py) reports its ± over its three few-shot sets.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from sftmix.utils import SFTMixError, atomic_write_json

log = logging.getLogger(__name__)


def round_seed(seed: int, r: int) -> int:
    return int(seed) + r


def summarize(values: list[float]) -> dict:
    """{mean, sd, values}: sd is the population standard deviation (0 for one round)."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "sd": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "values": vals}


def run_rounds(n_rounds: int, seed: int, run_one: Callable[[int, int], dict], store: Path | None,
               fingerprint: dict, key: str) -> dict:
    """Run (or read back) rounds 0..n_rounds-1; run_one(r, seed_r) returns the round's metrics, `key` names the
    value that is averaged. Returns {"rounds": [...], "mean", "sd", "values", "n_rounds", "seeds", "n_reused"}."""
    if n_rounds < 1:
        raise SFTMixError(f"eval_rounds={n_rounds}: at least one round is needed; set eval_rounds to 1 or more")
    rounds, reused = [], 0
    for r in range(n_rounds):
        s = round_seed(seed, r)
        path = Path(store) / f"round_{r}.json" if store is not None else None
        if path is not None and path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") == fingerprint and old.get("seed") == s:
                log.info("round %d (seed %d): reusing %s", r, s, path)
                rounds.append(old["metrics"])
                reused += 1
                continue
        metrics = {**run_one(r, s), "round": r, "seed": s}
        if key not in metrics:
            raise SFTMixError(f"round {r} returned no {key!r}")  # a programming error, named anyway
        if path is not None:
            atomic_write_json(path, {"fingerprint": fingerprint, "seed": s, "metrics": metrics})
        rounds.append(metrics)
    out = summarize([m[key] for m in rounds])
    return {"rounds": rounds, **out, "n_rounds": n_rounds, "seeds": [m["seed"] for m in rounds], "n_reused": reused}
