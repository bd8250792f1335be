"""`sftmix sweep`: run a set of configs (e.g. the ablations of the paper's §5) and merge their reports into one table.

    sftmix sweep configs/ablations/*.yaml --output_dir runs/ablations                  # paper scale (GPUs)
    sftmix sweep configs/ablations/baseline.yaml configs/ablations/mixup_as_loss.yaml --output_dir runs/abl \\
        --overrides configs/ablations/overrides/tiny_cpu.yaml                         # the same on a tiny model, CPU
    sftmix sweep --merge_only --output_dir runs/ablations                             # re-merge what is there
    sftmix sweep configs/ablations/*.yaml --output_dir runs/abl --launcher \\
        "accelerate launch --config_file configs/accelerate/ddp.yaml -m sftmix.cli"   # each run on several GPUs

Configs come first, then options. Each config runs as `sftmix run --config CONFIG --output_dir DIR/<config stem>`
in its own process (a failed run does not stop the others; rerunning the sweep resumes every run where it stopped),
with the settings of --overrides (a YAML file) and any further `--key value` arguments on top of the config's own.
A `reference_model` in --overrides replaces only the reference of configs that name one (the weaker-reference
ablation); the others keep using their target model as the reference.

Shared work: when an earlier config of the sweep has the same data and step-1 settings (every setting except those
that only the target runs or the evaluation read), its data split, step-1 result (confidence.jsonl, dynamics/, plots/)
and, with the same evaluation settings too, its evaluation of the untrained start model are linked into the new run
directory instead of being computed again (--no_reuse turns this off). The reference is trained once per distinct
reference setup, as in the paper, where all variants of a table share one confidence split.

Output: DIR/sweep.md and DIR/sweep.json, in the layout of the paper's Tables 3-8: one row per trained variant (config
x recipe), the columns the runs have (held-out NLL / PPL, and multiple-choice accuracy or judge scores when
evaluated), the difference to the baseline row (default: the NTP recipe of the first config that trains one;
--baseline STEM or STEM:RECIPE), and what each variant changes relative to the baseline's config.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sftmix.config import (
    _read_yaml,
    parse_config,
    resolve_config_path,
    settings_of,
    shipped_configs,
    unaffected_settings,
)
from sftmix.report.report import _fmt, _md_table  # one number format and table for run reports and the sweep
from sftmix.run.validation import validate_settings
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("sftmix")

# comparison-row keys of sftmix.report.report that are not metrics
NOT_METRICS = {"model", "label", "n_examples", "n_tokens", "delta_nll_vs_start", "heldout_ppl_example_mean",
               "train_ntp_loss", "train_seconds"}
HIGHER_IS_BETTER = ("accuracy", "score", "win_rate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftmix sweep", allow_abbrev=False,
                                description="Run several configs (`sftmix run` each) and merge their reports into "
                                            "one table (DIR/sweep.md, DIR/sweep.json).",
                                epilog="Any other --key value is passed to every run. Configs come first.")
    p.add_argument("configs", nargs="*", help="config files; each runs into DIR/<file stem>")
    p.add_argument("--output_dir", required=True, help="sweep directory DIR")
    p.add_argument("--overrides", help="YAML of settings applied on top of every config (e.g. "
                                       "configs/ablations/overrides/tiny_cpu.yaml to run any ablation on a tiny "
                                       "model on CPU)")
    p.add_argument("--baseline", help="baseline row: STEM (its ntp recipe, else its first) or STEM:RECIPE; default: "
                                      "the ntp recipe of the first config that has one")
    p.add_argument("--merge_only", action="store_true", help="run nothing; merge the reports DIR holds")
    p.add_argument("--no_reuse", action="store_true", help="compute the data split, step 1 and the start model's "
                                                           "evaluation in every run directory")
    p.add_argument("--launcher", default=None, help="command that runs the `sftmix` CLI, e.g. \"accelerate launch "
                                                    "--config_file F -m sftmix.cli\"; default: this Python, "
                                                    "-m sftmix.cli")
    return p


# ----------------------------------------------------------------------------------------------------------------
# the arguments of each run


def _overrides_argv(path: Path) -> tuple[list[str], str | None]:
    """`--key value` arguments from an overrides YAML, and its reference_model (applied separately)."""
    values = _read_yaml(path)
    argv, reference = [], values.pop("reference_model", None)
    for key, value in values.items():
        if isinstance(value, dict) or value is None:
            raise SFTMixError(f"overrides file {path}: `{key}` must be a plain value or a list (got {value!r}).")
        if isinstance(value, str) and (key == "data" or key.endswith("_file")) and not Path(value).is_absolute():
            beside = path.resolve().parent / value
            if not Path(value).exists() and beside.exists():
                value = str(beside)  # relative paths are relative to the overrides file, as in configs
        items = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return argv, reference


def run_argv(config: Path, run_dir: Path, overrides: Path | None = None, extra: list[str] = ()) -> list[str]:
    """The arguments after `sftmix run` for one config of a sweep."""
    argv = ["--config", str(config), "--output_dir", str(run_dir)]
    if overrides is not None:
        more, reference = _overrides_argv(overrides)
        argv += more
        if reference is not None and _read_yaml(config).get("reference_model"):
            argv += ["--reference_model", str(reference)]
    return argv + list(extra)


def _keys(cfg) -> tuple[str, str]:
    """(step-1 key, start-eval key): configs with equal keys share the data split and step 1 (and the evaluation of
    the untrained start model). Settings step 1 does not read (sftmix.config.unaffected_settings) are left out;
    any other, including a setting added later, keeps runs apart, which is always correct."""
    flat = json.loads(json.dumps(cfg.flat(), default=str, sort_keys=True))
    eval_fields = set(settings_of("eval"))
    skip = unaffected_settings("dynamics", cfg)
    step1 = {k: v for k, v in flat.items() if k not in skip}
    # step 1 reads learning_rate only as the default of reference_learning_rate
    step1["reference_learning_rate"] = step1.pop("reference_learning_rate", None) or step1.pop("learning_rate", None)
    step1.pop("learning_rate", None)
    start = {**step1, **{k: flat[k] for k in eval_fields if k in flat}}
    return json.dumps(step1, sort_keys=True), json.dumps(start, sort_keys=True)


def _needs_step1(cfg) -> bool:
    return "sftmix" in cfg.run.recipes and cfg.train.split_source == "dynamics"


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # outputs are replaced atomically (new files), never written in place: links are safe
    except OSError:
        shutil.copy2(src, dst)


def _copy_into(src: Path, dst: Path) -> None:
    """Copy a file or folder to dst via a temporary name, so dst appears complete or not at all."""
    if src.is_dir():
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        return
    tmp = dst.with_name(dst.name + ".sweep-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a killed copy: os.link would refuse it
    _link_or_copy(src, tmp)
    os.replace(tmp, dst)


def share_step1(donor: Path, run_dir: Path, step1: bool, start_eval: bool) -> list[str]:
    """Link the donor run's data split (and step 1 / start evaluation when asked) into run_dir where run_dir does not
    have them yet; markers last, so an interrupted copy is redone. Returns what was shared."""
    shared, src, dst = [], RunDir(donor), RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if src.data_stats.exists() and not dst.data_stats.exists():
        _copy_into(src.data, dst.data)
        shared.append("data")
    if step1 and src.split.exists() and not dst.dynamics.exists() and not dst.reference.exists():
        for a, b in ((src.plots, dst.plots), (src.confidence, dst.confidence)):
            if a.exists():
                _copy_into(a, b)
        _copy_into(src.dynamics, dst.dynamics)  # holds the stage marker split.json
        shared.append("step 1")
    if start_eval and src.eval_result("start").exists() and not dst.eval_result("start").exists():
        dst.eval.mkdir(exist_ok=True)
        if src.eval_details("start").is_dir():
            _copy_into(src.eval_details("start"), dst.eval_details("start"))
        _copy_into(src.eval_result("start"), dst.eval_result("start"))
        shared.append("start eval")
    return shared


# ----------------------------------------------------------------------------------------------------------------
# running


def run_sweep(configs: list[Path], out_dir: Path, overrides: Path | None = None, extra: list[str] = (),
              reuse: bool = True, launcher: list[str] | None = None) -> list[dict]:
    """Run every config (`sftmix run` in a subprocess) into out_dir/<stem>; returns one status dict per config."""
    stems = [c.stem for c in configs]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise SFTMixError(f"sweep: several configs are named {', '.join(dupes)}; each runs into DIR/<file stem>, so "
                          "give them distinct file names.")
    plans = []
    for config in configs:  # parse everything first: a typo in the last config fails now, not after hours
        if not config.is_file():
            raise SFTMixError(f"sweep: config file {config}: no such file; check the path.")
        argv = run_argv(config, out_dir / config.stem, overrides, extra)
        try:
            cfg = parse_config(argv)
            validate_settings(cfg)  # every setting of every run (ranges, one-run SFTMix) before the first one starts
        except SFTMixError as e:
            raise SFTMixError(f"sweep: {config}: {e}") from e
        plans.append((config, argv, cfg))

    launcher = launcher or [sys.executable, "-m", "sftmix.cli"]
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, donors = [], {}
    for i, (config, argv, cfg) in enumerate(plans):
        run_dir = out_dir / config.stem
        status = {"config": str(config), "stem": config.stem, "run_dir": str(run_dir), "shared_from": None,
                  "shared": []}
        step1_key, start_key = _keys(cfg)
        if reuse and step1_key in donors:
            donor, donor_start_key = donors[step1_key]
            shared = share_step1(out_dir / donor, run_dir, _needs_step1(cfg), start_key == donor_start_key)
            if shared:
                status.update(shared_from=donor, shared=shared)
                log.info("[sweep] %s: %s shared with %s", config.stem, ", ".join(shared), donor)
        log.info("[sweep] %d/%d %s: %s", i + 1, len(plans), config.stem, shlex.join(launcher + ["run", *argv]))
        t0 = time.perf_counter()
        proc = subprocess.run(launcher + ["run", *argv])
        status.update(returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1),
                      status="ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
        if proc.returncode == 0 and step1_key not in donors:
            donors[step1_key] = (config.stem, start_key)
        runs.append(status)
    return runs


# ----------------------------------------------------------------------------------------------------------------
# merging


def _config_diff(config: dict, base: dict, recipe: str) -> str:
    """What a run's config changes relative to the baseline's (settings the recipe actually reads)."""
    skip = {"output_dir", "run_name", "judge_api_key"} | set(settings_of("runtime"))
    if recipe != "sftmix":
        skip |= set(settings_of("mixup"))  # the NTP baseline runs without the Mixup settings
    if not config.get("use_peft") and not base.get("use_peft"):
        skip |= {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
    diff = []
    for k in list(base) + [k for k in config if k not in base]:
        if k not in skip and config.get(k) != base.get(k):
            v = config.get(k)
            diff.append(f"{k}={' '.join(map(str, v)) if isinstance(v, list) else v}")
    return ", ".join(diff)


def _metric_header(key: str) -> str:
    names = {"heldout_nll": "held-out NLL", "heldout_ppl": "held-out PPL"}
    return names.get(key, key.replace("_", " "))


def merge(out_dir: Path, stems: list[str] | None = None, baseline: str | None = None,
          runs: list[dict] | None = None) -> dict:
    """Merge DIR/<stem>/report.json of every run into DIR/sweep.json and DIR/sweep.md; returns the summary."""
    out_dir = Path(out_dir)
    previous = json.loads((out_dir / "sweep.json").read_text()) if (out_dir / "sweep.json").exists() else {}
    if runs is None:
        runs = previous.get("runs") or []
        if stems:
            runs = [r for r in runs if r["stem"] in stems] + [{"stem": s, "run_dir": str(out_dir / s)} for s in stems
                                                              if s not in {r["stem"] for r in runs}]
        if not runs:
            found = sorted(p.parent.name for p in out_dir.glob("*/config.yaml"))
            runs = [{"stem": s, "run_dir": str(out_dir / s)} for s in found]
    if not runs:
        raise SFTMixError(f"sweep: {out_dir} holds no runs (no */config.yaml); run the sweep first.")

    rows, starts, configs, missing = [], {}, {}, []
    for r in runs:
        path = RunDir(out_dir / r["stem"]).report("json")
        if not path.exists():
            missing.append({**r, "status": r.get("status") or "no report.json"})
            continue
        rep = json.loads(path.read_text())
        configs[r["stem"]] = rep.get("config") or {}
        for c in rep.get("comparison") or []:
            metrics = {k: v for k, v in c.items() if k not in NOT_METRICS and isinstance(v, (int, float))
                       and not isinstance(v, bool)}
            train = (rep.get("models", {}).get(c["model"]) or {}).get("train") or {}
            row = {"variant": r["stem"], "recipe": c["model"], "label": f"{r['stem']} · {c['label']}",
                   "metrics": metrics, "n_train_examples": train.get("n_train_examples"),
                   "steps": train.get("global_step"), "repeated_per_epoch": train.get("duplicates_per_epoch"),
                   "train_seconds": c.get("train_seconds"), "model_spec": configs[r["stem"]].get("model")}
            if c["model"] == "start":
                starts.setdefault(row["model_spec"], {**row, "label": f"start (untrained {row['model_spec']})"})
            else:
                rows.append(row)
    if not rows:
        raise SFTMixError(f"sweep: no finished run in {out_dir} has a trained recipe in its report; see the runs' "
                          "logs (statuses: " + ", ".join(f"{m['stem']}: {m['status']}" for m in missing) + ").")

    base = _pick_baseline(rows, baseline)
    base_cfg = configs[base["variant"]]
    base_nll = base["metrics"].get("heldout_nll")
    for row in rows:
        row["baseline"] = row is base
        row["changes"] = _config_diff(configs[row["variant"]], base_cfg, row["recipe"]) or (
            "–" if row["variant"] == base["variant"] else "(same config)")
        nll = row["metrics"].get("heldout_nll")
        row["delta_nll_vs_baseline"] = nll - base_nll if nll is not None and base_nll is not None else None
    keys = {k for row in [*rows, *starts.values()] for k in row["metrics"]}
    columns = [k for k in ("heldout_nll", "heldout_ppl") if k in keys] + sorted(keys - {"heldout_nll", "heldout_ppl"})
    summary = {"output_dir": str(out_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "baseline": base["label"],
               "columns": columns, "rows": rows, "start_rows": list(starts.values()), "runs": runs,
               "missing": missing}
    atomic_write_json(out_dir / "sweep.json", summary)
    atomic_write_text(out_dir / "sweep.md", render_markdown(summary))
    return summary


def _pick_baseline(rows: list[dict], baseline: str | None) -> dict:
    if baseline:
        stem, _, recipe = baseline.partition(":")
        cands = [r for r in rows if r["variant"] == stem and (not recipe or r["recipe"] == recipe)]
        if not cands:
            raise SFTMixError(f"sweep: --baseline {baseline} matches no row; rows: "
                              f"{', '.join(r['variant'] + ':' + r['recipe'] for r in rows)}.")
        return next((r for r in cands if r["recipe"] == "ntp"), cands[0])
    return next((r for r in rows if r["recipe"] == "ntp"), rows[0])


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    cols = summary["columns"]
    delta_col = ["Δ NLL vs baseline"] if "heldout_nll" in cols else []
    header = (["variant", "changes vs baseline"] + [_metric_header(c) for c in cols[:1]] + delta_col
              + [_metric_header(c) for c in cols[1:]] + ["train examples", "steps", "repeated / epoch", "train s"])
    body = []
    for row in summary["start_rows"] + summary["rows"]:
        m = row["metrics"]
        delta = row.get("delta_nll_vs_baseline")
        cells = [row["label"] + (" (baseline)" if row.get("baseline") else ""), row.get("changes", "–")]
        cells += [_fmt(m.get(c)) for c in cols[:1]]
        if delta_col:
            cells.append("–" if delta is None or row.get("baseline") or row["recipe"] == "start" else f"{delta:+.4f}")
        cells += [_fmt(m.get(c)) for c in cols[1:]]
        cells += [_fmt(row.get(k)) for k in ("n_train_examples", "steps", "repeated_per_epoch")]
        body.append(cells + [_fmt(row.get("train_seconds"), 1)])
    return header, body


def render_markdown(summary: dict) -> str:
    header, body = table(summary)
    better = [c for c in summary["columns"] if c.endswith(HIGHER_IS_BETTER)]
    lines = [f"# SFTMix sweep: {summary['output_dir']}\n", f"{summary['created']}. One row per trained variant "
             f"(config · recipe); baseline: **{summary['baseline']}**. Held-out NLL and PPL: lower is better"
             + (f"; {', '.join(map(_metric_header, better))}: higher is better" if better else "") +
             ". \"changes vs baseline\" lists the settings in which a variant's config differs from the baseline's; "
             "\"repeated / epoch\" counts the examples the balanced sampler repeats when the confident and unconfident "
             "sides differ in size (a subset under selection_split=all, a label split, nearest pairs), which also "
             "adds steps.\n",
             _md_table(header, body) + "\n"]
    shared = [r for r in summary["runs"] if r.get("shared")]
    if shared:
        lines.append("Shared work: " + "; ".join(f"{r['stem']} reused {', '.join(r['shared'])} of {r['shared_from']}"
                                                for r in shared) + ".\n")
    if summary["missing"]:
        lines.append("Not in the table (no report.json): " + "; ".join(
            f"{m['stem']} ({m['status']})" for m in summary["missing"]) + ".\n")
    lines.append("Each run's own report: " + ", ".join(f"[{r['stem']}]({r['stem']}/report.md)"
                                                        for r in summary["runs"]) + ".\n")
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table(summary)
    t = Table(title=f"Sweep ({summary['output_dir']}); baseline: {summary['baseline']}")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 2 else "right")
    for row in body:
        t.add_row(*row)
    Console(width=200).print(t)


# ----------------------------------------------------------------------------------------------------------------
# command


def _shipped_or_files(values: list[str]) -> list[str]:
    """Config files, names of shipped configs, or a shipped folder (`ablations`: every config directly in it), so that
    a sweep runs from an installed wheel without the repository."""
    out = []
    for v in values:
        folder = v.strip("/").removeprefix("configs/")
        # a shipped folder, or a glob the shell left unexpanded (no such files here)
        inside = [str(p) for n, p in shipped_configs().items() if n.rpartition("/")[0] == folder or
                  ("*" in folder and n.count("/") == folder.count("/") and fnmatch.fnmatchcase(n + ".yaml", folder))]
        out += inside if inside and not Path(v).exists() else [str(resolve_config_path(v, "sweep"))]
    return out


def main(argv: list[str]) -> int:
    """`sftmix sweep ...`; returns the exit code (1 when a run failed; the table still holds the others)."""
    args, extra = _parser().parse_known_args(argv)
    stray = [a for a in extra if a.endswith((".yaml", ".yml")) and not a.startswith("-")]
    if stray:
        raise SFTMixError(f"sweep: {stray[0]} comes after an option; give the configs first, then the options.")
    out_dir = Path(args.output_dir)
    args.configs = _shipped_or_files(args.configs)
    stems = [Path(c).stem for c in args.configs] or None
    if args.merge_only:
        runs = None
    else:
        if not args.configs:
            raise SFTMixError("sweep: give the configs to run (or --merge_only to merge what DIR holds).")
        launcher = shlex.split(args.launcher) if args.launcher else None
        overrides = resolve_config_path(args.overrides, "sweep --overrides") if args.overrides else None
        runs = run_sweep([Path(c) for c in args.configs], out_dir, overrides,
                         extra, reuse=not args.no_reuse, launcher=launcher)
    summary = merge(out_dir, stems, args.baseline, runs)
    print_table(summary)
    log.info("[sweep] merged table: %s, %s", out_dir / "sweep.md", out_dir / "sweep.json")
    failed = [r for r in summary["runs"] if r.get("returncode") not in (None, 0)]
    if failed:
        # exit 2 is a user's mistake (config, data, input file): a rerun fails the same way until it is fixed
        mistakes = [r["stem"] for r in failed if r.get("returncode") == 2]
        fix = (f"fix the error each of {', '.join(mistakes)} printed (`sftmix: error: ...` above, and in "
               f"{out_dir}/<run>/logs/sftmix.log), then rerun the same command (finished runs are skipped)"
               if mistakes else "rerun the same command to resume them")
        print(f"sftmix: error: sweep: {len(failed)} of {len(summary['runs'])} runs failed ("
              + ", ".join(f"{r['stem']}: {r['status']}" for r in failed) + f"); {fix}.", file=sys.stderr)
        return 1
    return 0
