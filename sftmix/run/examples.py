"""Which examples each run trains on: the data selection (paper §5.5) and step 1's confident / unconfident split.

    from sftmix.run import examples
    records, desc = examples.step1_records(cfg, train_records(cfg))   # step 1: the selected subset, or all
    ds, desc = examples.select_target_examples(cfg, ds)                 # a target run: the same selection
    ds = examples.with_split(cfg, ds)                                   # + confident (and nearest-pairing states)
    examples.check_split_halves(cfg)                                    # before training: 2+ examples per half
"""

from __future__ import annotations

import logging

import numpy as np

from sftmix.confidence.callback import build_confidence
from sftmix.confidence.reference import join_confidence
from sftmix.confidence.split import confident_flags, select_examples
from sftmix.models import load_tokenizer
from sftmix.run.context import is_main, tokenize, train_records
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, read_jsonl

log = logging.getLogger("sftmix")


def restore_confidence(cfg) -> None:
    """confidence.jsonl deleted after step 1: rebuild it from dynamics/ckpt_*.jsonl, or mark step 1 to run again
    (it resumes from its checkpoints and skips scored ones), so that no command waits on another."""
    d = RunDir(cfg.run_dir)
    conf, marker = d.confidence, d.split
    if not marker.exists() or conf.exists() or not is_main():
        return
    if cfg.run.confidence_mode == "checkpoints":
        try:
            build_confidence(cfg.run_dir, cfg.run.num_checkpoints)
            log.warning("[sftmix] %s was missing: rebuilt from %s/ckpt_*.jsonl", conf, d.dynamics)
            return
        except SFTMixError as e:
            log.warning("[sftmix] %s is missing and cannot be rebuilt (%s): rerunning step 1", conf, e)
    else:
        log.warning("[sftmix] %s is missing: rerunning step 1", conf)
    marker.unlink()


def select_target_examples(cfg, ds):
    """The data selection of the run (paper §5.5) on a dataset tokenized by the target's tokenizer, as
    sftmix.confidence.split.select_examples ranks it: (dataset, description), or (ds, None) without a selection."""
    if cfg.train.selection == "none":
        return ds, None
    return select_examples(ds, cfg.train)


def selected_target_dataset(cfg, records):
    """The selected examples as the target runs will see them (target tokenizer only, no weights loaded)."""
    tok = load_tokenizer(cfg.run.model, chat_template=cfg.run.chat_template, cache_dir=cfg.run.model_cache_dir)
    return select_target_examples(cfg, tokenize(cfg, records, tok, "target"))


def step1_records(cfg, records):
    """The records step 1 runs on, and the selection's description: with a selection and selection_split=subset
    (the paper's §5.5: select first, then train NTP / SFTMix on the selection, whose halves come from a reference
    trained on it), only the selected records; otherwise all of them (None)."""
    if cfg.train.selection == "none" or cfg.run.selection_split != "subset":
        return records, None
    ds, desc = selected_target_dataset(cfg, records)
    keep = set(ds["guid"])
    log.info("dynamics: step 1 on the selected subset (selection_split=subset): %s", desc)
    return [r for r in records if r["guid"] in keep], desc


def with_split(cfg, ds):
    """Add the confident/unconfident split (and, for nearest pairing, the reference's hidden states) by guid."""
    if cfg.train.split_source == "column":
        return ds  # the split column travels with the records
    d = RunDir(cfg.run_dir)
    restore_confidence(cfg)
    if not d.confidence.exists():
        raise SFTMixError(f"{d.confidence} is missing: run step 1 first (`sftmix dynamics --output_dir "
                          f"{cfg.run_dir}`), or set split_source=column with a split_column.")
    ds = join_confidence(ds, read_jsonl(d.confidence))
    if cfg.train.pairing == "nearest":
        if not d.hidden_final.exists():
            raise SFTMixError(f"pairing=nearest needs {d.hidden_final} (written by step 1); rerun `sftmix dynamics`.")
        with np.load(d.hidden_final) as z:
            pos = {str(g): i for i, g in enumerate(z["guid"])}
            emb = z["hidden"]
        ds = ds.add_column("pairing_embedding", [emb[pos[g]].tolist() for g in ds["guid"]])
    return ds


def check_split_halves(cfg) -> None:
    """Refuse, before any training, a selection (or label split) that leaves fewer than 2 examples in a half of the
    SFTMix split, which the balanced sampler needs; one line naming the counts and the fix."""
    train, d = cfg.train, RunDir(cfg.run_dir)
    if (train.selection == "none" and train.split_source != "column") or (
            d.train_result("sftmix").exists()) or cfg.run.reference == "self":
        return  # reference=self: the run splits its own (selected) examples at the median
    if train.split_source == "dynamics" and not d.confidence.exists():
        return  # no split yet (`sftmix train` before step 1): stage_train names the missing file
    ds, desc = selected_target_dataset(cfg, train_records(cfg))
    if train.split_source == "dynamics":
        ds = join_confidence(ds, read_jsonl(d.confidence))
    flags = confident_flags(ds, train)
    n_conf, n_unconf = int(flags.sum()), int((~flags).sum())
    if min(n_conf, n_unconf) >= 2:
        return
    if train.split_source == "column":
        source = f"the split column {train.split_column!r}"
    elif cfg.run.selection_split == "all":
        source = "step 1's split of all the data (selection_split=all)"
    else:
        source = "step 1's split"
    what = f"selection={train.selection} ({desc})" if desc else "the data"
    fix = ("use selection_split=subset (step 1 on the selected examples, equal halves), or relax the selection"
           if train.split_source == "dynamics" and cfg.run.selection_split == "all" else
           "relax the selection or use another split")
    raise SFTMixError(f"{what} leaves {n_conf} confident and {n_unconf} unconfident examples by {source}; SFTMix "
                      f"needs at least 2 in each half: {fix}.")
