"""The confident/unconfident split of recipe step 1, as plain functions of plain arrays (no model, no Trainer).

    from sftmix.split import confidence, split_confident
    conf = confidence(ppl)                       # ppl [C checkpoints, N examples] -> -(1/C) sum_c ppl_c
    flags = split_confident(conf, guids)         # True for the floor(N/2) most confident examples

`sftmix.dynamics` (the reference run that measures ppl) and `sftmix.core` (the sampler that pairs the halves) both
read the rule from here, so the split has one definition.
"""

from __future__ import annotations

import numpy as np

from sftmix.utils import SFTMixError


def confidence(ppl) -> np.ndarray:
    """ppl [C, N] (checkpoints x examples) -> confidence [N] = -(1/C) sum_c ppl_c (the paper's eq. 1)."""
    ppl = _as_ppl_matrix(ppl)
    return -ppl.mean(axis=0)


def variability(ppl) -> np.ndarray:
    """ppl [C, N] -> std of ppl over the checkpoints (dataset cartography's variability)."""
    return _as_ppl_matrix(ppl).std(axis=0)


def _as_ppl_matrix(ppl) -> np.ndarray:
    ppl = np.asarray(ppl, dtype=np.float64)
    if ppl.ndim != 2 or ppl.shape[0] < 1 or ppl.shape[1] < 1:
        raise SFTMixError(f"ppl must be a [checkpoints, examples] array, got shape {ppl.shape}.")
    return ppl


def split_confident(confidence, guids) -> np.ndarray:
    """Bool [N]: True for the floor(N/2) most confident examples (ties broken by guid: order-independent).

    For odd N the median example goes to the unconfident half. All-identical confidence is an SFTMixError."""
    conf = np.asarray(confidence, dtype=np.float64)
    guids = [str(g) for g in guids]
    if conf.ndim != 1 or len(conf) != len(guids):
        raise SFTMixError(f"confidence ({conf.shape}) and guids ({len(guids)}) must be 1-D and of the same length.")
    if len(conf) < 2:
        raise SFTMixError(f"the split needs at least 2 examples, got {len(conf)}.")
    if not np.all(np.isfinite(conf)):
        i = int(np.flatnonzero(~np.isfinite(conf))[0])
        raise SFTMixError(f"confidence of example {guids[i]!r} is {conf[i]}; re-score the reference checkpoints.")
    if conf.max() == conf.min():
        raise SFTMixError(
            f"all {len(conf)} examples have the same confidence ({conf[0]:.6g}), so a confident/unconfident split "
            f"would be arbitrary; train the reference longer (more epochs or a higher learning rate) or use a "
            f"stronger reference model."
        )
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], guids[i]))
    confident = np.zeros(len(conf), dtype=bool)
    confident[order[: len(conf) // 2]] = True
    return confident


def split_threshold(confidence, confident) -> float:
    """The confidence value between the two halves (midway between the least confident `confident` example and the
    most confident other one); the median when one half is empty. For plots and reports: the split itself is
    `split_confident`'s ranking."""
    confidence, confident = np.asarray(confidence, float), np.asarray(confident, bool)
    if confident.any() and (~confident).any():
        return float((confidence[confident].min() + confidence[~confident].max()) / 2)
    return float(np.median(confidence))
