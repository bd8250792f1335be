"""The confident/unconfident split of recipe step 1, as plain functions of plain arrays (no model, no Trainer).

    from sftmix.confidence.split import confidence, split_confident
    conf = confidence(ppl)                       # ppl [C scoring steps, N examples] -> -(1/C) sum_c ppl_c
    flags = split_confident(conf, guids)         # True for the floor(N/2) most confident examples

    flags = confident_flags(train_dataset, args)  # from `confident`, `confidence` or the column args.split_source names
    kept, desc = select_examples(train_dataset, args)   # paper §5.5: long / score / random
    c, u = nearest_partners(embeddings, flags)   # pairing=nearest
    problem = one_run_problem(1, num_train_epochs=2)   # None, or why one-run SFTMix cannot split with these settings

`sftmix.confidence.callback` (build_confidence, from the ppl of the scoring steps; one-run SFTMix's switch) and
`sftmix.mixup.sampling` (the rows the sampler pairs into halves) both read the rule from here, so the split has one
definition; so do the rules of one-run SFTMix, whose split comes from its own NTP epochs (`one_run_problem`, also
checked by sftmix.run.validation before a run). `args` is any object with the Mixup fields
(sftmix.mixup.args.MixupArguments).
"""

from __future__ import annotations

import math

import numpy as np

from sftmix.utils import SFTMixError


def confidence(ppl) -> np.ndarray:
    """ppl [C, N] (scoring steps x examples) -> confidence [N] = -(1/C) sum_c ppl_c (the paper's eq. 1)."""
    ppl = _as_ppl_matrix(ppl)
    return -ppl.mean(axis=0)


def variability(ppl) -> np.ndarray:
    """ppl [C, N] -> std of ppl over the scoring steps (dataset cartography's variability)."""
    return _as_ppl_matrix(ppl).std(axis=0)


def _as_ppl_matrix(ppl) -> np.ndarray:
    ppl = np.asarray(ppl, dtype=np.float64)
    if ppl.ndim != 2 or ppl.shape[0] < 1 or ppl.shape[1] < 1:
        raise SFTMixError(f"ppl must be a [scoring steps, examples] array, got shape {ppl.shape}.")
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
        raise SFTMixError(f"confidence of example {guids[i]!r} is {conf[i]}; re-score the reference's scoring steps.")
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


# ----------------------------------------------------------------------------------------------------------------
# The split of a training dataset (the Mixup trainers' input), data selection and nearest pairing


def median_split(values, guids=None) -> np.ndarray:
    """Boolean mask, True for the higher half of `values` (exactly floor(N/2) True; the median of an odd N goes to the
    lower half; ties broken by guid, else by index). The one rule of the project:
    sftmix.confidence.split.split_confident."""
    return split_confident(values, guids if guids is not None else [f"{i:012d}" for i in range(len(values))])


def confident_flags(dataset, args) -> np.ndarray:
    """The `confident` flags of a dataset, from the column the config names (see split_source)."""
    cols = dataset.column_names
    guids = dataset["guid"] if "guid" in cols else None
    if args.split_source == "column":
        if args.split_column not in cols:
            raise SFTMixError(f"split_column {args.split_column!r} is not a column of the training data (columns: "
                              f"{', '.join(cols)}).")
        values = dataset[args.split_column]
        if args.split_confident_values:
            wanted = {str(v) for v in args.split_confident_values}
            return np.array([str(v) in wanted for v in values], dtype=bool)
        if all(isinstance(v, bool) for v in values):
            return np.array(values, dtype=bool)
        try:
            return median_split([float(v) for v in values], guids)
        except (TypeError, ValueError):
            raise SFTMixError(f"split_column {args.split_column!r} holds labels ({sorted({str(v) for v in values})[:5]}"
                              "...): set split_confident_values to the labels that mean confident.") from None
    if "confident" in cols:
        return np.array(dataset["confident"], dtype=bool)
    if "confidence" in cols:
        return median_split(dataset["confidence"], guids)
    raise SFTMixError(
        "SFTMix needs to know which examples are confident: the training data has neither a boolean `confident` "
        "column nor a float `confidence` column. Run step 1 (`sftmix dynamics`) and join its confidence.jsonl by guid, "
        "set split_source=column with split_column=<your column>, or set mixup_weight=0 for plain NTP."
    )


def select_examples(dataset, args):
    """Apply `args.selection` (paper §5.5) to a dataset; returns (dataset, description)."""
    if args.selection == "none":
        return dataset, "all examples"
    n = len(dataset)
    if args.selection == "long":
        if "n_response_tokens" in dataset.column_names:
            lengths = np.asarray(dataset["n_response_tokens"])
        elif "labels" in dataset.column_names:
            lengths = np.array([sum(t != -100 for t in row) for row in dataset["labels"]])
        else:
            lengths = np.array([len(c[-1]["content"]) if isinstance(c, list) else len(c)
                                for c in dataset["completion"]])
        keep = np.argsort(-lengths, kind="stable")[: args.selection_k]
        desc = f"the {len(keep)} of {n} examples with the longest responses"
    elif args.selection == "random":
        keep = np.random.default_rng(args.seed).permutation(n)[: args.selection_k]
        desc = f"{len(keep)} of {n} examples at random (seed {args.seed})"
    else:
        col = args.selection_score_column
        if col not in dataset.column_names:
            raise SFTMixError(f"selection=score needs a {col!r} column with your scores; the data has "
                              f"{', '.join(dataset.column_names)}.")
        scores = np.asarray(dataset[col], dtype=np.float64)
        keep = np.flatnonzero(scores >= args.selection_threshold)
        desc = f"{len(keep)} of {n} examples with {col} >= {args.selection_threshold}"
    if len(keep) < 4:
        raise SFTMixError(f"selection={args.selection} keeps only {len(keep)} examples ({desc}); relax it.")
    return dataset.select(np.sort(keep)), desc


def nearest_partners(embeddings: np.ndarray, confident: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (confident_idx, unconfident_idx) covering every example, by cosine nearest neighbour across halves.

    Each confident example is paired with its nearest unconfident one; each unconfident example that nobody chose is
    paired with its nearest confident one. Computed in blocks, so memory stays O(block * N).
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    c_idx, u_idx = np.flatnonzero(confident), np.flatnonzero(~confident)

    def nearest(src, dst):
        out = np.empty(len(src), dtype=np.int64)
        for s in range(0, len(src), 1024):
            sim = emb[src[s:s + 1024]] @ emb[dst].T
            out[s:s + 1024] = dst[sim.argmax(axis=1)]
        return out

    partner_of_c = nearest(c_idx, u_idx)
    unchosen = np.setdiff1d(u_idx, partner_of_c)
    partner_of_u = nearest(unchosen, c_idx) if len(unchosen) else np.empty(0, dtype=np.int64)
    return np.concatenate([c_idx, partner_of_u]), np.concatenate([partner_of_c, unchosen])


def one_run_problem(ntp_epochs, *, num_train_epochs=None, max_steps=-1, mixup_enabled=True, pairing="random",
                    split_source="dynamics", ntp_subset="all", epochs_name="self_reference_epochs",
                    what="one-run SFTMix (self_reference_epochs)") -> str | None:
    """Why one-run SFTMix cannot run with these settings, as one sentence, or None. The one home of these rules:
    MixupArguments and the SelfReferenceCallback (library users, `epochs_name` self_reference_epochs) and
    sftmix.run.validation (the command line, before any stage: `self_ntp_epochs`, `reference=self`) word the same
    checks through it, each in its user's setting names. num_train_epochs=None skips the epoch checks (an arguments
    class is checked before it knows them for sure)."""
    if isinstance(ntp_epochs, bool) or not isinstance(ntp_epochs, (int, float)) or ntp_epochs != int(ntp_epochs) \
            or ntp_epochs < 1:
        return f"{what} needs a whole {epochs_name} >= 1 (the NTP epochs that give the split); got {ntp_epochs!r}."
    n = int(ntp_epochs)
    if not mixup_enabled:
        return (f"{what} continues with Mixup after its {epochs_name}={n} NTP epoch(s), but mixup_weight=0 turns "
                f"Mixup off: give mixup_weight > 0, or train the ntp recipe only.")
    if pairing != "random":
        return (f"{what} needs pairing=random: pairing={pairing} pairs by a separate reference's hidden states "
                f"(step 1); use reference=separate for it.")
    if split_source != "dynamics":
        return (f"{what} takes its split from its own NTP epochs, so split_source={split_source} does not apply: use "
                f"split_source=dynamics, or reference=separate.")
    if ntp_subset != "all":
        return (f"{what} needs ntp_subset=all (its NTP epochs train on every example); got ntp_subset={ntp_subset}: "
                f"use reference=separate for ntp_subset.")
    if num_train_epochs is None:
        return None
    if max_steps is not None and max_steps > 0:
        return (f"{what} splits the data at the end of epoch {epochs_name}={n}, so it counts training in epochs: "
                f"unset max_steps (got max_steps={max_steps}) and give num_train_epochs (e.g. {n + 1}).")
    total = float(num_train_epochs)
    if total != int(total):
        return (f"{what} needs a whole num_train_epochs (the switch to Mixup is at an epoch boundary); got "
                f"num_train_epochs={num_train_epochs}: give e.g. {max(math.ceil(total), n + 1)}.")
    if n >= total:
        return (f"{what} needs num_train_epochs greater than {epochs_name}={n} (the NTP epochs, then at least one "
                f"Mixup epoch); got num_train_epochs={num_train_epochs}: give e.g. num_train_epochs={n + 1}, or a "
                f"smaller {epochs_name}.")
    return None
