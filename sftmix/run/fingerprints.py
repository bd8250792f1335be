"""What each stage of a run reads, by content: the inputs kept in DIR/fingerprints.json (sftmix.rundir.Fingerprints).

    from sftmix.run import fingerprints as fpr
    fpr.fresh(cfg, "data", d.data_stats, fpr.data_inputs(cfg), [d.data])   # outputs removed if the data changed

A stage whose inputs changed since it ran has its outputs removed and runs again (saying what changed); paths inside
the run directory are named relative to it, so a moved run directory is not a changed input.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sftmix.data import sharegpt_package_file
from sftmix.eval.evaluate import _judgments_to_retry
from sftmix.hub import dataset_spec, pinned_revision
from sftmix.models import resolve_model
from sftmix.run.context import is_main, state
from sftmix.rundir import Fingerprints, RunDir
from sftmix.utils import SFTMixError


def fingerprints(cfg) -> Fingerprints:
    return Fingerprints(cfg.run_dir, write=is_main())


def fresh(cfg, stage: str, marker: Path, inputs: dict, clear: list, force_reason: str | None = None) -> None:
    """Rerun `stage` (its outputs `clear` removed) when what it read changed since it ran; see rundir.refresh."""
    if is_main():
        fingerprints(cfg).refresh(stage, marker, inputs, clear=clear, force_reason=force_reason)
    state().wait_for_everyone()  # the other processes see the done marker only once it is known to be current


def model_digest(fp: Fingerprints, spec: str, cache_dir: str | None = None) -> str:
    """The start model's identity: the resolved spec plus the hash of its files (a built-in random model is its
    spec: it is built from code and seed)."""
    try:
        info = resolve_model(spec, cache_dir=cache_dir)
    except SFTMixError:
        return f"unresolved:{spec}"  # loading it reports the problem
    if info.get("kind") == "tiny-random":
        return f"tiny-random:{info['seed']}"
    if info.get("kind") == "hub" and info.get("sha"):
        return f"hub:{info['repo_id']}@{info['sha']}"  # a commit names its files: no need to hash gigabytes
    path = info.get("path")
    if path and Path(path).exists():
        return f"{info.get('kind')}:{fp.digest(path)}"
    return f"{info.get('kind')}:{spec}"


def rel(cfg, path) -> str:
    """A path as fingerprints name it: relative to the run directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(cfg.run_dir.resolve()))
    except ValueError:
        return str(path)


def template_inputs(fp, template: str | None, label: str = "chat template") -> dict:
    return {f"{label} file {template}": fp.digest(template)} if template and os.path.isfile(template) else {}


def data_inputs(cfg) -> dict:
    """Each data source by content: a local file or folder by its hash, a Hub dataset by the commit sha recorded in
    sources.json (a new commit is a change), `sharegpt:N` by the package's file."""
    fp, out = fingerprints(cfg), {}
    for data in cfg.run.data if isinstance(cfg.run.data, list) else [cfg.run.data]:
        if os.path.exists(data):
            out[f"data file {data}"] = fp.digest(data)
        elif data.startswith("sharegpt:"):
            try:
                out[f"data {data}"] = fp.digest(sharegpt_package_file())
            except (SFTMixError, OSError):
                out[f"data {data}"] = data
        else:
            repo_id = (dataset_spec(data) or (data,))[0]  # ID[:CONFIG[:SPLIT]]: the id's commit
            out[f"data {data}"] = pinned_revision(getattr(cfg, "sources", None), "data", repo_id) or data
    return out


def split_input(fp, cfg) -> dict:
    path = RunDir(cfg.run_dir).train
    return {f"training split {rel(cfg, path)}": fp.digest(path)} if path.exists() else {}


def dynamics_inputs(cfg) -> dict:
    fp = fingerprints(cfg)
    spec = cfg.run.reference_model or cfg.run.model
    return {**split_input(fp, cfg), f"reference model {spec}": model_digest(fp, spec, cfg.run.model_cache_dir),
            **template_inputs(fp, cfg.run.chat_template)}


def train_inputs(cfg, recipe: str) -> dict:
    """The training split, the start model, the chat template and, for the Mixup recipe on step 1's split, step 1's
    outputs (the caller has rebuilt a deleted confidence.jsonl and checked step 1 is current: stages.stage_train)."""
    fp, d = fingerprints(cfg), RunDir(cfg.run_dir)
    out = {**split_input(fp, cfg), f"start model {cfg.run.model}": model_digest(fp, cfg.run.model,
                                                                                 cfg.run.model_cache_dir),
           **template_inputs(fp, cfg.run.chat_template)}
    if recipe == "sftmix" and cfg.run.reference == "self":
        return out  # one run: confidence.jsonl is this stage's output, not its input
    if recipe == "sftmix" and cfg.train.split_source == "dynamics":
        for path in (d.confidence, d.hidden_final):
            if path.exists() and (path.suffix == ".jsonl" or cfg.train.pairing == "nearest"):
                out[f"step 1's {rel(cfg, path)}"] = fp.digest(path)
    return out


def check_step1_current(cfg) -> None:
    """The Mixup recipe trains on step 1's split: refuse one computed on another training split (the data changed
    and only `sftmix train` ran since), rather than mix by stale confidence."""
    fp, d = fingerprints(cfg), RunDir(cfg.run_dir)
    done = fp.stages.get("dynamics") or {}
    now = split_input(fp, cfg)
    if d.split.exists() and done and any(done.get(k) != v for k, v in now.items()):
        raise SFTMixError(f"step 1 ({d.confidence}) was computed on another training split (the data changed since): "
                          f"run `sftmix dynamics --output_dir {cfg.run_dir}` (or `sftmix run`) first.")


def eval_inputs(cfg, name: str, spec: str, ecfg) -> dict:
    """The weights evaluated (by content, not by path), every evaluation file and every evaluation setting."""
    fp = fingerprints(cfg)
    if name == "start":
        out = {f"start model {spec}": model_digest(fp, spec, cfg.run.model_cache_dir)}
    else:
        out = {f"weights of {rel(cfg, spec)}": fp.digest(spec) if os.path.isdir(spec) else None}
    for f in dataclasses.fields(ecfg):
        value = getattr(ecfg, f.name)
        if f.name in ("overwrite", "judge_api_key", "judge_cache_file", "judge_retry_failed"):
            continue
        if f.name.endswith("_file") and value and os.path.isfile(value):
            out[f"{f.name} {rel(cfg, value)}"] = fp.digest(value)
        else:
            out[f"setting {f.name}"] = value
    out.update(template_inputs(fp, ecfg.chat_template, "eval chat template"))
    return out


def failed_judgments(marker: Path, retry_failed: bool = False) -> str | None:
    """A reason to rerun an evaluation whose judge failed on some requests (successful judgments are cached)."""
    if not marker.exists():
        return None
    try:
        results = json.loads(marker.read_text(encoding="utf-8")).get("results") or {}
    except (OSError, ValueError):
        return None
    # deterministic failures stay failed (judge_retry_failed asks them again, sftmix.eval.judge): only the transient
    # ones (or every one, in a result written before failures had kinds) make the evaluation run again
    failed = {t: n for t, m in results.items() if isinstance(m, dict) and (n := _judgments_to_retry(m, retry_failed))}
    if not failed:
        return None
    return "judgments failed in " + ", ".join(f"{t} ({n})" for t, n in failed.items()) + ": retrying them"
