"""DIR/config.yaml and DIR/sources.json: what a run was started with, written before anything runs.

    from sftmix.run.config_file import resolve_sources, save_sources, write_config
    cfg.sources = resolve_sources(cfg)   # Hub ids -> commit shas (DIR/sources.json's when resuming)
    write_config(cfg)                    # refuses a run directory made with another config
    save_sources(cfg)
"""

from __future__ import annotations

import json

import yaml

from sftmix.config import (
    RECIPES,
    RUN_TRAINING_DEFAULTS,
    RunConfig,
    _eval_args_class,
    _field_defaults,
    unaffected_settings,
)
from sftmix.hub import run_sources, sources_comment
from sftmix.mixup.trainer import SFTMixConfig
from sftmix.run.context import is_main
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, atomic_write_json, atomic_write_text


def write_config(cfg) -> None:
    """Write DIR/config.yaml (the resolved config) first; refuse a run directory made with a different config."""
    d = RunDir(cfg.run_dir)
    path = d.config
    new = _plain(cfg.flat())
    if path.exists():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if old == new:
            return  # unchanged: keep the file (and its mtime, which tells the report whether it is stale)
        # a field absent from one file (an older version wrote fewer keys) has its default there
        defaults, unaffected = _config_defaults(), unaffected_settings("run")
        old, new = {**defaults, **old}, {**defaults, **new}
        changed = sorted(k for k in set(old) | set(new) if k not in unaffected
                         and old.get(k) != new.get(k) and k != "output_dir")
        if changed and not any(d.recipe(r).exists() for r in RECIPES):
            # no target run has started: what only they read may still change (a setting refused after the data
            # stage, e.g. by validation.check_step_counts, is corrected on the same directory)
            changed = [k for k in changed if k not in unaffected_settings("dynamics", cfg)]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
            more = f" and {len(changed) - 3} more ({', '.join(changed[3:])})" if len(changed) > 3 else ""
            raise SFTMixError(f"{cfg.run_dir} holds a run made with another config ({diff}{more}); use another "
                              f"--output_dir, or delete that directory to start over.")
    if not is_main():
        return
    text = (f"# Resolved sftmix config (from {cfg.source}); rerun with:\n"
            f"#   sftmix run --config {path}\n" + sources_comment(cfg.sources) +
            yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    atomic_write_text(path, text)


def resolve_sources(cfg) -> dict:
    """The commit sha of every Hub model and dataset of the run (sftmix.hub.run_sources); DIR/sources.json's when it
    has them (a resumed run loads what it started with)."""
    path = RunDir(cfg.run_dir).sources
    return run_sources(cfg.run, json.loads(path.read_text()) if path.exists() else None)


def save_sources(cfg) -> None:
    """DIR/sources.json, written once write_config has accepted the run directory."""
    if is_main() and (cfg.sources.get("models") or cfg.sources.get("data")):
        atomic_write_json(RunDir(cfg.run_dir).sources, cfg.sources)


def _config_defaults() -> dict:
    """Every field's default as the parser sets it (run, training with the pipeline's defaults, evaluation)."""
    return _plain({**_field_defaults(SFTMixConfig), **RUN_TRAINING_DEFAULTS, **_field_defaults(RunConfig),
                   **_field_defaults(_eval_args_class())})


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):  # enums
        return obj.value
    return obj
