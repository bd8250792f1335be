"""Does SFTMix beat what users would run instead? Tuned NTP, NTP + NEFTune and SFTMix, in parts that fit a session.

    python benchmarks/quality_parts.py plan                   # the parts: runs, command, which are done
    python benchmarks/quality_parts.py part grid-ntp          # one part (resumes where a killed one stopped)
    python benchmarks/quality_parts.py merge                  # the tables, from whatever parts exist
    python benchmarks/quality_parts.py part grid-ntp --quick  # tiny random model, seconds per run (the tests)
    python benchmarks/quality_parts.py part seed-1 -- --num_threads 1   # after `--`: more `sftmix run` overrides

Recipes (each in its own `sftmix run` directory, from the same start model, on the data of benchmarks/quality.py):
NTP; NTP + NEFTune (neftune_noise_alpha 5, the common default); two-run SFTMix (step 1's reference at a fixed
learning rate, --ref_lr, shared by every learning rate of the target: the data map is the same, only the target's
rate is tuned); one-run SFTMix (reference=self, online step-relative confidence, the default); one-run SFTMix +
NEFTune. NEFTune needs nothing per recipe from the pipeline: each recipe is its own run directory, so only the NEFTune
recipes' runs get the flag (no NEFTune recipe has a step 1; with one-run SFTMix + NEFTune the NTP epochs whose online
NLL gives the split are noisy too, as they are for a user who sets the one flag; docs/analyses.md says how NEFTune
and the Mixup states interact).

Learning rate: each recipe at its own best rate of --lrs (default 2.5e-5 5e-5 1e-4 2e-4), chosen by the lowest
token-weighted response NLL on a validation set (--n_val examples of the Alpaca file, disjoint from the training file
and from the reported held-out set: the last V of quality.py's fixed shuffled order) after training on the first seed;
the choice is recorded by `merge`. Every run is scored on validation + held-out in one file (per-example NLL, split by
guid), so the first seed's grid run at the chosen rate is also that seed's reported run; the seed parts add PubMedQA
(3-shot, as quality.py) to the chosen runs only. A rate chosen at the grid's edge is flagged by `merge` (the best
may lie beyond it): the first grid, 5e-5 1e-4 2e-4, chose its smallest rate for NTP and one-run SFTMix, so 2.5e-5
joined it; the grid parts' files of the smaller grid are kept, and rerunning a grid part trains only the new rate.

Parts (each writes RESULTS/quality_parts/<part>.json atomically after every run; rerunning a part resumes: finished
runs are read back, an interrupted training resumes from its checkpoint; commit each part's file when it finishes):
  grid-ntp      seed 0: NTP and NTP + NEFTune at each rate                       (2 x 4 runs)
  grid-sftmix   seed 0: step 1 once + two-run SFTMix's target at each rate      (1 + 4 runs)
  grid-self     seed 0: one-run SFTMix and one-run SFTMix + NEFTune at each rate (2 x 4 runs)
  seed-S        the five recipes at their chosen rates, seed S, with PubMedQA (needs the three grid parts; seed 0
                reuses the grid's runs and adds PubMedQA only, if their run directories are on this machine,
                else trains them again, to the same NLL; other seeds: step 1 + 5 runs)
  variants      one-run SFTMix's confidence variants other than the default (online raw, online less a fitted line,
                2 scoring passes), at one-run SFTMix's chosen rate, every seed (held-out NLL only; the default's
                runs are those of the seed parts)                               (3 x 3 runs)
Cost: each part file records its own wall and CPU seconds and `merge` tabulates them. Measured on the 2-core machine
(2026-12-03, two parts side by side, `OMP_NUM_THREADS=1 ... -- --num_threads 1`): a training run 979-1256 s wall,
scoring validation + held-out 99-124 s; grid-ntp 9387 s wall in all, grid-self 9979 s (docs/results.md). Plan ~20
min per run this way: 42 runs, about 7 h for the whole benchmark; a part killed at a session's end resumes.

Merge: the learning-rate grid's validation figures and choices; the five recipes at their chosen rates over the
seeds found (held-out NLL token-weighted and per example, PubMedQA, cost end to end); paired differences against
tuned NTP and against NTP + NEFTune: per seed, and per held-out example (the per-seed differences averaged over seeds)
with a 95% bootstrap interval over examples (scipy.stats.bootstrap, percentile, 9999 resamples, fixed seed) and the
count of examples each way; the confidence variants against the default on held-out NLL; each part's CPU time, and
which parts are missing. Outputs (atomic): RESULTS/quality_parts.json and .md (quality_parts_quick with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without `pip install -e .` too
sys.path.insert(0, str(HERE))

import quality as q  # noqa: E402  (benchmarks/quality.py: data, run directories, stage timing)

from sftmix.utils import SFTMixError, atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402

NEFTUNE_ALPHA = 5.0
# recipe -> (label, `sftmix run` overrides, the pipeline's recipe name in the run directory)
RECIPES = {
    "ntp": ("NTP", ["--recipes", "ntp"], "ntp"),
    "ntp_neftune": (f"NTP + NEFTune (alpha {NEFTUNE_ALPHA:g})",
                    ["--recipes", "ntp", "--neftune_noise_alpha", str(NEFTUNE_ALPHA)], "ntp"),
    "sftmix": ("two-run SFTMix", ["--recipes", "sftmix"], "sftmix"),
    "sftmix_self": ("one-run SFTMix", ["--recipes", "sftmix", "--reference", "self", "--self_ntp_epochs", "1",
                                       "--self_confidence", "online"], "sftmix"),
    "sftmix_self_neftune": (f"one-run SFTMix + NEFTune (alpha {NEFTUNE_ALPHA:g})",
                            ["--recipes", "sftmix", "--reference", "self", "--self_ntp_epochs", "1",
                             "--self_confidence", "online", "--neftune_noise_alpha", str(NEFTUNE_ALPHA)], "sftmix"),
}
# one-run SFTMix's confidence variants: the default (`sftmix_self` above) against these, on held-out NLL
VARIANTS = {
    "self_online_raw": ("one-run, online NLL as recorded (no step-relative correction)",
                        ["--recipes", "sftmix", "--reference", "self", "--self_ntp_epochs", "1",
                         "--self_confidence", "online_raw"], "sftmix"),
    "self_online_linear": ("one-run, online NLL less a line fitted over the steps (a smoother de-trend)",
                           ["--recipes", "sftmix", "--reference", "self", "--self_ntp_epochs", "1",
                            "--self_confidence", "online_linear"], "sftmix"),
    "self_checkpoints": ("one-run, confidence from 2 scoring passes (checkpoints)",
                         ["--recipes", "sftmix", "--reference", "self", "--self_ntp_epochs", "1",
                          "--self_confidence", "checkpoints", "--self_num_checkpoints", "2"], "sftmix"),
}
GRID_PARTS = {"grid-ntp": ("ntp", "ntp_neftune"), "grid-sftmix": ("sftmix",),
              "grid-self": ("sftmix_self", "sftmix_self_neftune")}
BASELINES = ("ntp", "ntp_neftune")  # the paired comparisons: every other recipe against each of these
N_BOOT = 9999


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Arguments after `--` are more `sftmix run` overrides for every run.")
    p.add_argument("action", choices=["plan", "part", "merge"])
    p.add_argument("part", nargs="?", help="with `part`: grid-ntp, grid-sftmix, grid-self, seed-S, variants")
    p.add_argument("--quick", action="store_true", help="tiny random model, a few examples (seconds per run)")
    p.add_argument("--n_train", type=int, default=104, help="training examples per run (as quality.py)")
    p.add_argument("--n_heldout", type=int, default=100, help="the reported fixed held-out set (as quality.py)")
    p.add_argument("--n_val", type=int, default=100, help="validation examples that choose the learning rate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the grid trains the first)")
    p.add_argument("--lrs", type=float, nargs="+", default=[2.5e-5, 5e-5, 1e-4, 2e-4],
                   help="learning-rate grid (a part file of a smaller grid is extended: rerunning the grid part trains "
                        "only the new rates)")
    p.add_argument("--ref_lr", type=float, default=1e-4, help="two-run SFTMix: step 1's reference learning rate")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--num_checkpoints", type=int, default=5, help="C: step 1's scored checkpoints")
    p.add_argument("--pubmedqa_questions", type=int, default=100, help="first Q PubMedQA questions (0: none)")
    p.add_argument("--model", default=None, help="model spec (default: the config's, smollm2)")
    p.add_argument("--config", default=str(HERE / "quality.yaml"))
    p.add_argument("--data", default=str(q.ROOT.parent / "shared" / "data" / "alpaca_4500.json"))
    p.add_argument("--pubmedqa_file", default=str(q.ROOT.parent / "shared" / "data" / "pubmedqa_pqal_dev500.json"))
    p.add_argument("--work_dir", default=None, help="run directories (default runs/quality_parts[_quick])")
    p.add_argument("--results_dir", default=str(HERE / "results"))
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.quick:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        quick = {"n_train": 16, "n_heldout": 8, "n_val": 8, "seeds": [0, 1], "lrs": [1e-3, 3e-3], "ref_lr": 1e-3,
                 "epochs": 2.0, "num_checkpoints": 2, "pubmedqa_questions": 4, "model": "tiny-random:0"}
        for k, v in quick.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
        args.extra = ["--max_length", "512", "--max_dropped_fraction", "0.25", "--per_device_train_batch_size", "4",
                      "--eval_max_length", "1024", "--batch_size", "4", "--num_threads", "1", "--save_steps", "0.5",
                      "--disable_tqdm", "true", *args.extra]
    args.name = "quality_parts_quick" if args.quick else "quality_parts"
    args.work_dir = Path(args.work_dir or q.ROOT / "runs" / args.name)
    args.parts_dir = Path(args.results_dir) / args.name
    if args.action == "part" and args.part not in part_names(args):
        p.error(f"part {args.part!r}: choose one of {', '.join(part_names(args))}")
    if args.n_train < 4 or args.n_heldout < 1 or args.n_val < 2 or not args.seeds or not args.lrs:
        p.error("need --n_train >= 4, --n_heldout >= 1, --n_val >= 2, a seed and a learning rate")
    return args


def part_names(args) -> list[str]:
    return [*GRID_PARTS, *(f"seed-{s}" for s in args.seeds), "variants"]


def settings(args) -> dict:
    """What every part must share to be merged (a part file with other settings is refused; the grid `lrs` may
    differ, see `read_part`)."""
    keys = ("quick", "n_train", "n_heldout", "n_val", "seeds", "lrs", "ref_lr", "epochs", "num_checkpoints",
            "pubmedqa_questions", "model", "config", "extra")
    out = {k: getattr(args, k) for k in keys}
    out["config"] = Path(out["config"]).name
    out["extra"] = q.without_runtime(out["extra"])  # a part resumed with `-- --num_threads 1` still merges
    out["data"] = Path(args.data).name
    return out


# ------------------------------------------------------------------------------------------------------------ data


def prepare(args) -> dict:
    """quality.py's training file and fixed held-out (the reported set), plus a validation set: the last n_val of
    the same shuffled pool, so it meets neither. One evaluation file holds validation + held-out."""
    pooled = q.data_pool(args)
    data = q.prepare_data(args, pooled)
    _, _, pool, held, order = pooled
    if args.n_train + 1 + args.n_val > len(pool):
        raise SFTMixError(f"--n_val {args.n_val}: {args.data} has {len(pool)} examples besides the held-out, fewer "
                          f"than --n_train + 1 + --n_val; lower --n_val.")
    val = [pool[i] for i in sorted(order[-args.n_val:])]
    eval_file = args.work_dir / "data" / f"eval_v{args.n_val}_h{args.n_heldout}.jsonl"
    q._write_if_changed(eval_file, val + held)
    data.update(eval_file=str(eval_file), val_guids=sorted(r["guid"] for r in val),
                test_guids=sorted(r["guid"] for r in held))
    return data


def common_overrides(args, data: dict) -> list[str]:
    """The `sftmix run` settings of every run (recipe, learning rate, seed and output_dir come on top)."""
    out = ["--config", str(args.config), "--data", data["train_file"], "--heldout", "1",
           "--heldout_file", data["eval_file"], "--num_train_epochs", str(args.epochs),
           "--num_checkpoints", str(args.num_checkpoints), "--reference_learning_rate", str(args.ref_lr)]
    if args.model:
        out += ["--model", args.model]
    return out + list(args.extra)


def pubmedqa_overrides(args) -> list[str]:
    return ["--pubmedqa_file", str(args.pubmedqa_file), "--mc_limit", str(args.pubmedqa_questions)] \
        if args.pubmedqa_questions else []


def run_dir(args, common: list[str], recipe: str, lr: float, seed: int) -> Path:
    """One folder per (settings, recipe, rate, seed); evaluation-only settings (PubMedQA) are not in the hash, so a
    seed part adds PubMedQA to the grid's run instead of training it again."""
    return args.work_dir / recipe / f"lr{lr:g}-{q.settings_tag([*common, *_recipe(recipe)[1]])}" / f"seed{seed}"


def _recipe(name: str):
    return RECIPES.get(name) or VARIANTS[name]


# ------------------------------------------------------------------------------------------------------------ runs


def run_one(args, common: list[str], recipe: str, lr: float, seed: int, pubmedqa: bool) -> dict:
    """Train (or find trained) and evaluate one recipe at one rate and seed; returns its record for the part file."""
    from sftmix.config import parse_config
    from sftmix.run.sweep import share_step1

    label, overrides, name = _recipe(recipe)
    folder = run_dir(args, common, recipe, lr, seed)
    # The untrained start model is the same for every run: each of its task results is computed once and copied
    # (sftmix.eval.evaluate reuses a copy only if its settings fingerprint matches). From every finished run, since the
    # grid's runs have the start's held-out NLL only and the first seed-part run adds its PubMedQA.
    for donor in sorted(args.work_dir.glob("*/*/seed*")):
        if donor != folder:
            q.reuse_start_eval(folder, [donor])
    if recipe == "sftmix":  # step 1 does not depend on the target's rate: computed once per seed, then linked
        step1 = [p for p in args.work_dir.glob(f"sftmix/*/seed{seed}") if (p / "dynamics" / "split.json").exists()
                 and p.parent.name.rsplit("-", 1)[-1] == folder.parent.name.rsplit("-", 1)[-1]]
        if step1 and step1[0] != folder:
            share_step1(step1[0], folder, step1=True, start_eval=False)
    argv = [*common, *overrides, "--learning_rate", str(lr), "--seed", str(seed), "--output_dir", str(folder)]
    costs_path = folder / "quality_costs.json"
    costs = q._json(costs_path) or {}
    tag = f"{recipe} lr {lr:g} seed {seed}"
    if recipe == "sftmix":
        q.run_stage(parse_config(argv), "dynamics", "dynamics", None, costs, costs_path, tag)
    q.run_stage(parse_config(argv), "train", "train", name, costs, costs_path, tag)
    eval_name = "eval+pubmedqa" if pubmedqa and args.pubmedqa_questions else "eval"
    cfg = parse_config([*argv, *(pubmedqa_overrides(args) if eval_name != "eval" else [])])
    q.run_stage(cfg, eval_name, "eval", None, costs, costs_path, tag)
    return {"recipe": recipe, "label": label, "lr": lr, "seed": seed, "run_dir": str(folder),
            **run_metrics(folder, name), "costs": costs}


def run_metrics(folder: Path, name: str) -> dict:
    """Per-example held-out rows (guid -> [nll_mean, n_tokens]), PubMedQA per question, the training summary."""
    ev = (q._json(folder / "eval" / f"{name}.json") or {}).get("results") or {}
    rows = folder / "eval" / name / "heldout_examples.jsonl"
    examples = {r["guid"]: [r["nll_mean"], r["n_tokens"]] for r in read_jsonl(rows)} if rows.exists() else {}
    pq = folder / "eval" / name / "pubmedqa_predictions.jsonl"
    pubmedqa = {str(r["id"]): bool(r["correct"]) for r in read_jsonl(pq)} if pq.exists() and ev.get("pubmedqa") \
        else None
    tr = q._json(folder / name / "train_result.json") or {}
    return {"examples": examples, "pubmedqa": pubmedqa,
            "train_loss": tr.get("metrics", {}).get("train_loss"), "train_steps": tr.get("global_step")}


def chosen_lrs(grid_runs: list[dict], val_guids: list[str], lrs: list[float]) -> dict:
    """recipe -> the rate of --lrs with the lowest token-weighted validation NLL (None until every rate ran)."""
    out = {}
    for recipe in RECIPES:
        by_lr = {r["lr"]: nll(r["examples"], val_guids)["nll"] for r in grid_runs if r["recipe"] == recipe}
        # a rate that diverged (a non-finite NLL) is never chosen
        out[recipe] = min(lrs, key=lambda lr: by_lr[lr] if math.isfinite(by_lr[lr]) else math.inf) \
            if all(lr in by_lr for lr in lrs) else None
    return out


def part_plan(args, name: str, data: dict) -> list[tuple[str, float, int, bool]]:
    """(recipe, rate, seed, with PubMedQA) of every run of the part."""
    if name in GRID_PARTS:
        return [(r, lr, args.seeds[0], False) for r in GRID_PARTS[name] for lr in args.lrs]
    choice = chosen_lrs(grid_runs(args), data["val_guids"], args.lrs)
    missing = [p for p, rs in GRID_PARTS.items() if any(choice[r] is None for r in rs)]
    if name == "variants":
        if choice["sftmix_self"] is None:
            raise SFTMixError(f"part variants: run part grid-self first (one-run SFTMix's rate is chosen there); "
                              f"its file {args.parts_dir / 'grid-self.json'} is missing or unfinished.")
        return [(v, choice["sftmix_self"], s, False) for v in VARIANTS for s in args.seeds]
    if missing:
        raise SFTMixError(f"part {name}: the rates are chosen by the grid parts; run {', '.join(missing)} first "
                          f"(files under {args.parts_dir}).")
    seed = int(name.split("-", 1)[1])
    return [(r, choice[r], seed, True) for r in RECIPES]


def run_key(recipe: str, lr: float, seed: int) -> str:
    return f"{recipe}|{lr:g}|{seed}"


def all_recorded(plan: list[tuple], runs: dict) -> bool:
    return all(run_key(*x[:3]) in runs for x in plan)


def is_complete(args, name: str, part: dict | None, data: dict) -> bool:
    """Every run of the part's plan under these settings is recorded (a grid extended since is not complete)."""
    if part is None or not part.get("complete"):
        return False
    try:
        return all_recorded(part_plan(args, name, data), part["runs"])
    except SFTMixError:  # a seed part whose grid is not finished yet
        return False


def at_grid_edge(choice: dict, lrs: list[float]) -> dict:
    """recipe -> its chosen rate where that is the grid's smallest or largest: the best rate may lie beyond."""
    return {r: lr for r, lr in choice.items() if lr is not None and len(lrs) > 1 and lr in (min(lrs), max(lrs))}


def grid_runs(args) -> list[dict]:
    return [r for p in GRID_PARTS for r in (read_part(args, p) or {}).get("runs", {}).values()]


def read_part(args, name: str) -> dict | None:
    path = args.parts_dir / f"{name}.json"
    if not path.exists():
        return None
    part = json.loads(path.read_text(encoding="utf-8"))
    # The grid may grow after the fact (a best rate at the grid's edge is not a tuned rate): every run is keyed by
    # its own rate and its run directory does not depend on the grid, so a part of another grid is read, its runs
    # kept, and rerunning the part trains only the rates it lacks.
    if _shared(part.get("settings")) != _shared(settings(args)):
        raise SFTMixError(f"{path}: written with other settings ({_settings_diff(part.get('settings'), args)}); "
                          f"rerun that part with these settings, or merge with the settings it was run with.")
    return part


def _shared(settings_: dict | None) -> dict:
    """The settings two part files must agree on: all but the grid's rates."""
    return {k: v for k, v in (settings_ or {}).items() if k != "lrs"}


def _settings_diff(theirs, args) -> str:
    theirs, mine = _shared(theirs), _shared(settings(args))
    keys = [k for k in mine if theirs.get(k) != mine[k]]
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in keys[:3])


def run_part(args) -> dict:
    from sftmix.console import setup_logging

    setup_logging()
    data = prepare(args)
    common = common_overrides(args, data)
    path = args.parts_dir / f"{args.part}.json"
    part = read_part(args, args.part) or {"part": args.part, "settings": settings(args), "runs": {},
                                          "cpu_seconds": 0.0, "wall_seconds": 0.0, "invocations": 0}
    part["invocations"] += 1
    part["settings"] = settings(args)  # the grid this part now covers
    plan = part_plan(args, args.part, data)
    print(f"[quality_parts] part {args.part}: {len(plan)} runs, {len(part['runs'])} recorded already; "
          f"run directories under {args.work_dir}", flush=True)
    t0, cpu0 = time.perf_counter(), q._cpu_seconds()
    for recipe, lr, seed, pubmedqa in plan:
        key = run_key(recipe, lr, seed)
        if key in part["runs"]:
            continue
        part["runs"][key] = run_one(args, common, recipe, lr, seed, pubmedqa)
        # this process's CPU since the last save, so that a killed and resumed part still sums what it spent
        t1, cpu1 = time.perf_counter(), q._cpu_seconds()
        part["wall_seconds"] += t1 - t0
        part["cpu_seconds"] += cpu1 - cpu0
        t0, cpu0 = t1, cpu1
        part["complete"] = all_recorded(plan, part["runs"])
        part["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(path, part, indent=None)
    part["complete"] = True
    atomic_write_json(path, part, indent=None)
    print(f"[quality_parts] part {args.part} done: {part['wall_seconds']:.0f} s wall, {part['cpu_seconds']:.0f} s "
          f"CPU in all; wrote {path} (commit it)", flush=True)
    return part


# ------------------------------------------------------------------------------------------------------- statistics


def nll(examples: dict, guids: list[str]) -> dict:
    """Token-weighted NLL (the held-out metric of sftmix.eval.evaluate) and the mean of per-example NLLs over
    `guids`."""
    rows = [examples[g] for g in guids if g in examples]
    if not rows:
        return {"nll": None, "nll_example_mean": None, "n": 0}
    tokens = sum(t for _, t in rows)
    return {"nll": sum(m * t for m, t in rows) / tokens, "nll_example_mean": statistics.fmean(m for m, _ in rows),
            "n": len(rows)}


def paired(runs_a: list[dict], runs_b: list[dict], guids: list[str]) -> dict | None:
    """a - b over the seeds both have: per seed (token-weighted and per-example NLL, examples each way), and pooled
    per example (each example's difference averaged over those seeds) with 95% bootstrap intervals over examples."""
    import numpy as np
    from scipy.stats import bootstrap

    a = {r["seed"]: r for r in runs_a}
    b = {r["seed"]: r for r in runs_b}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    common = [g for g in guids if all(g in a[s]["examples"] and g in b[s]["examples"] for s in seeds)]
    if not common:
        return None
    per_seed = []
    d = np.zeros((len(seeds), len(common)))
    for i, s in enumerate(seeds):
        ea, eb = a[s]["examples"], b[s]["examples"]
        d[i] = [ea[g][0] - eb[g][0] for g in common]
        na, nb = nll(ea, common), nll(eb, common)
        per_seed.append({"seed": s, "nll": na["nll"] - nb["nll"],
                         "nll_example_mean": na["nll_example_mean"] - nb["nll_example_mean"],
                         "examples_lower": int((d[i] < 0).sum()), "examples_higher": int((d[i] > 0).sum()),
                         "pubmedqa": _pubmedqa_diff(a[s].get("pubmedqa"), b[s].get("pubmedqa"))})
    tokens = np.array([a[seeds[0]]["examples"][g][1] for g in common], dtype=float)
    mean_d = d.mean(axis=0)
    out = {"seeds": seeds, "n_examples": len(common), "per_seed": per_seed,
           "nll": q.spread(x["nll"] for x in per_seed),
           "nll_example_mean": q.spread(x["nll_example_mean"] for x in per_seed),
           "examples_lower": int((mean_d < 0).sum()), "examples_higher": int((mean_d > 0).sum()),
           "examples_lower_per_seed_total": sum(x["examples_lower"] for x in per_seed)}
    if len(common) >= 2:
        rng = np.random.default_rng(0)
        weighted = bootstrap((mean_d, tokens), lambda x, w, axis: (x * w).sum(axis) / w.sum(axis), paired=True,
                             vectorized=True, n_resamples=N_BOOT, method="percentile", random_state=rng)
        plain = bootstrap((mean_d,), lambda x, axis: x.mean(axis), vectorized=True, n_resamples=N_BOOT,
                          method="percentile", random_state=rng)
        out["pooled_nll"] = float((mean_d * tokens).sum() / tokens.sum())
        out["pooled_nll_ci95"] = [float(weighted.confidence_interval.low), float(weighted.confidence_interval.high)]
        out["pooled_nll_example_mean"] = float(mean_d.mean())
        out["pooled_nll_example_mean_ci95"] = [float(plain.confidence_interval.low),
                                               float(plain.confidence_interval.high)]
    return out


def _pubmedqa_diff(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return None
    ids = sorted(set(a) & set(b))
    return {"accuracy": statistics.fmean(a[i] for i in ids) - statistics.fmean(b[i] for i in ids), "n": len(ids),
            "only_first_right": sum(a[i] and not b[i] for i in ids),
            "only_second_right": sum(b[i] and not a[i] for i in ids)}


def recipe_cost(run: dict, step1: dict | None) -> dict:
    """Wall and CPU seconds of the recipe end to end (model loading included, evaluation not): its training run, plus
    step 1 for two-run SFTMix (computed once per seed, wherever it ran)."""
    parts = [run["costs"].get("train"), step1 if run["recipe"] == "sftmix" else {}]
    if any(p is None for p in parts):
        return {"wall_seconds": None, "cpu_seconds": None}
    return {k: sum(p.get(k, 0.0) for p in parts) for k in ("wall_seconds", "cpu_seconds")}


# ------------------------------------------------------------------------------------------------------------ merge


def merge(args) -> dict:
    data = prepare(args)
    parts = {n: read_part(args, n) for n in part_names(args)}
    missing = [n for n, p in parts.items() if p is None]
    unfinished = [n for n, p in parts.items() if p is not None and not is_complete(args, n, p, data)]
    grid = grid_runs(args)
    val, test = data["val_guids"], data["test_guids"]
    choice = chosen_lrs(grid, val, args.lrs)
    grid_table = {r: {f"{x['lr']:g}": {**nll(x["examples"], val), "train_loss": x["train_loss"]}
                      for x in grid if x["recipe"] == r} for r in RECIPES}
    # Against NTP at the same rate on the grid's seed, on the held-out set: how the gap depends on the rate (one seed,
    # so a view of the grid, not the reported comparison)
    by_rate = {(x["recipe"], x["lr"]): x for x in grid}
    same_rate = {f"{lr:g}": {r: paired([by_rate[r, lr]], [by_rate["ntp", lr]], test) for r in RECIPES
                             if r != "ntp" and (r, lr) in by_rate and ("ntp", lr) in by_rate} for lr in args.lrs}
    # the reported runs: each recipe at its chosen rate, every seed found in the seed parts (the grid's seed-0 run is
    # the same training as seed-0's, which adds PubMedQA)
    reported = {r: [] for r in RECIPES}
    for s in args.seeds:
        for x in ((parts.get(f"seed-{s}") or {}).get("runs") or {}).values():
            if x["recipe"] in reported and x["lr"] == choice.get(x["recipe"]):
                reported[x["recipe"]].append(x)
    step1 = {}
    for x in [*grid, *(x for rs in reported.values() for x in rs)]:
        if x["recipe"] == "sftmix" and "dynamics" in x["costs"]:
            step1.setdefault(x["seed"], x["costs"]["dynamics"])
    table = {}
    for r, runs in reported.items():
        table[r] = {"label": RECIPES[r][0], "lr": choice[r], "seeds": [x["seed"] for x in runs],
                    "nll": q.spread(nll(x["examples"], test)["nll"] for x in runs),
                    "nll_example_mean": q.spread(nll(x["examples"], test)["nll_example_mean"] for x in runs),
                    "pubmedqa_accuracy": q.spread(statistics.fmean(x["pubmedqa"].values()) if x["pubmedqa"] else None
                                                  for x in runs),
                    **{f"cost_{k}": q.spread(recipe_cost(x, step1.get(x["seed"]))[k] for x in runs)
                       for k in ("wall_seconds", "cpu_seconds")}}
    comparisons = {f"{r}-{base}": paired(reported[r], reported[base], test)
                   for base in BASELINES for r in RECIPES if r != base and not (base == "ntp_neftune" and r == "ntp")}
    variant_runs = list(((parts.get("variants") or {}).get("runs") or {}).values())
    variants = {"default": {"label": RECIPES["sftmix_self"][0] + " (online, step-relative: the default)",
                            "nll": table["sftmix_self"]["nll"]}}
    for v in VARIANTS:
        runs = [x for x in variant_runs if x["recipe"] == v]
        variants[v] = {"label": VARIANTS[v][0], "nll": q.spread(nll(x["examples"], test)["nll"] for x in runs),
                       "minus_default": paired(runs, reported["sftmix_self"], test)}
    res = {"settings": settings(args), "missing_parts": missing, "unfinished_parts": unfinished,
           "parts": {n: {"complete": bool(p.get("complete")), "runs": len(p["runs"]),
                         "cpu_seconds": p["cpu_seconds"], "wall_seconds": p["wall_seconds"],
                         "invocations": p["invocations"], "updated": p.get("updated")}
                     for n, p in parts.items() if p is not None},
           "data": {k: data[k] for k in ("source", "n_train_per_run", "n_heldout", "heldout_file", "eval_file")}
           | {"n_val": len(val)},
           "chosen_lr": choice, "lr_at_grid_edge": at_grid_edge(choice, args.lrs), "lr_grid": grid_table,
           "grid_heldout_minus_ntp_same_rate": same_rate,
           "recipes": table, "comparisons": comparisons,
           "variants": variants, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.results_dir)
    atomic_write_json(out / f"{args.name}.json", res)
    md = render(res, args)
    atomic_write_text(out / f"{args.name}.md", md)
    print(md, flush=True)
    return res


def render(res: dict, args) -> str:
    f, cell = q._f, q._cell
    s = res["settings"]
    status = (f"**Missing parts: {', '.join(res['missing_parts'])}** (run `python benchmarks/quality_parts.py part "
              f"NAME{' --quick' if s['quick'] else ''}` for each). " if res["missing_parts"] else "All parts present. ")
    if res["unfinished_parts"]:
        status += f"**Unfinished: {', '.join(res['unfinished_parts'])}.** "
    lines = [f"# Tuned NTP, NEFTune and SFTMix (`benchmarks/quality_parts.py merge{' --quick' if s['quick'] else ''}`)",
             "", status, "",
             f"Model `{s['model'] or 'smollm2 (config)'}`, {res['data']['n_train_per_run']} Alpaca training examples "
             f"per run, {s['epochs']:g} epochs; rates {', '.join(f'{x:g}' for x in s['lrs'])} chosen on "
             f"{res['data']['n_val']} validation examples (seed {s['seeds'][0]}); reported: held-out response NLL on "
             f"{res['data']['n_heldout']} other fixed examples, 3-shot PubMedQA on {s['pubmedqa_questions']} "
             f"questions. Mean ± sample std [min, max] over seeds; lower NLL is better.", "",
             "## Learning rate, chosen on the validation set (token-weighted NLL; per-example mean)", "",
             "| recipe | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " | chosen |",
             "|---|" + "---|" * (len(s["lrs"]) + 1)]
    for r, by_lr in res["lr_grid"].items():
        cells = []
        for x in s["lrs"]:
            v = by_lr.get(f"{x:g}")
            cells.append(f"{f(v['nll'])}; {f(v['nll_example_mean'])}" if v else "–")
        chosen = res["chosen_lr"][r]
        lines.append(f"| {RECIPES[r][0]} | {' | '.join(cells)} | {f'{chosen:g}' if chosen else '–'} |")
    if res["lr_at_grid_edge"]:
        lines += ["", "**Chosen at the edge of the grid** (the best rate may lie beyond it; extend `--lrs` and rerun "
                  "the grid part, which trains only the new rates): "
                  + ", ".join(f"{RECIPES[r][0]} {lr:g}" for r, lr in res["lr_at_grid_edge"].items()) + "."]
    lines += ["", f"Held-out, seed {s['seeds'][0]} (the grid's runs), each recipe − NTP at the same rate: pooled Δ NLL "
              "[95% CI over examples]; examples lower / higher. One seed: how the gap moves with the rate, not the "
              "reported comparison.", "", "| recipe − NTP | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " |",
              "|---|" + "---|" * len(s["lrs"])]
    for r in RECIPES:
        if r != "ntp":
            cells = [res["grid_heldout_minus_ntp_same_rate"][f"{x:g}"].get(r) for x in s["lrs"]]
            lines.append(f"| {RECIPES[r][0]} | " + " | ".join(
                f"{_pooled(c)}; {c['examples_lower']}/{c['examples_higher']}" if c else "–" for c in cells) + " |")
    lines += ["", "## The five recipes at their chosen rates", "",
              "| recipe | lr | seeds | held-out NLL | per-example NLL | PubMedQA 3-shot | CPU s end to end "
              "| wall s |", "|---|---|---|---|---|---|---|---|"]
    for r, t in res["recipes"].items():
        lr = f"{t['lr']:g}" if t["lr"] else "–"
        lines.append(f"| {t['label']} | {lr} | "
                     f"{','.join(map(str, t['seeds'])) or '–'} | {cell(t['nll'])} | {cell(t['nll_example_mean'])} | "
                     f"{cell(t['pubmedqa_accuracy'], 3)} | {cell(t['cost_cpu_seconds'], 0)} | "
                     f"{cell(t['cost_wall_seconds'], 0)} |")
    lines += ["", "## Paired differences (first − second; negative: the first has the lower NLL)", "",
              "Per seed: the token-weighted held-out NLL difference. Pooled: each held-out example's difference "
              "averaged over the seeds, token-weighted and per example, with a 95% bootstrap interval over examples "
              f"({N_BOOT} resamples, percentile): it measures how much the result depends on which held-out examples "
              "were drawn, not the seed-to-seed spread, which the per-seed column shows. Examples each way: of the "
              "pooled per-example differences.", "",
              "| comparison | seeds | Δ NLL per seed | pooled Δ NLL [95% CI] | pooled Δ per-example NLL [95% CI] "
              "| examples first lower / higher | Δ PubMedQA per seed |", "|---|---|---|---|---|---|---|"]
    for key, c in res["comparisons"].items():
        a, b = key.split("-")
        name = f"{RECIPES[a][0]} − {RECIPES[b][0]}"
        lines.append(_comparison_row(name, c))
    lines += ["", "## One-run SFTMix's confidence, variants against the default (held-out NLL, at one-run SFTMix's "
              "chosen rate)", "", "| variant | held-out NLL | variant − default per seed | pooled Δ [95% CI] "
              "| examples variant lower / higher |", "|---|---|---|---|---|"]
    for v, t in res["variants"].items():
        c = t.get("minus_default")
        if v == "default":
            lines.append(f"| {t['label']} | {cell(t['nll'])} | – | – | – |")
        else:
            each_way = f"{c['examples_lower']} / {c['examples_higher']}" if c else "–"
            lines.append(f"| {t['label']} | {cell(t['nll'])} | {_per_seed(c)} | {_pooled(c)} | {each_way} |")
    lines += ["", "## Parts", "", "| part | runs | complete | CPU s | wall s | invocations | updated |",
              "|---|---|---|---|---|---|---|"]
    for n in part_names(args):
        p = res["parts"].get(n)
        lines.append(f"| {n} | {p['runs']} | {'yes' if p['complete'] else 'no'} | {p['cpu_seconds']:.0f} | "
                     f"{p['wall_seconds']:.0f} | {p['invocations']} | {p['updated']} |" if p
                     else f"| {n} | missing | – | – | – | – | – |")
    return "\n".join(lines) + "\n"


def _per_seed(c) -> str:
    return ", ".join(f"{x['seed']}: {x['nll']:+.4f}" for x in c["per_seed"]) if c else "–"


def _pooled(c, key: str = "pooled_nll") -> str:
    if not c or key not in c:
        return "–"
    lo, hi = c[f"{key}_ci95"]
    return f"{c[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _comparison_row(name: str, c: dict | None) -> str:
    if not c:
        return f"| {name} | – | – | – | – | – | – |"
    pq = ", ".join(f"{x['pubmedqa']['accuracy']:+.3f}" for x in c["per_seed"] if x["pubmedqa"]) or "–"
    return (f"| {name} | {','.join(map(str, c['seeds']))} | {_per_seed(c)} | {_pooled(c)} | "
            f"{_pooled(c, 'pooled_nll_example_mean')} | {c['examples_lower']} / {c['examples_higher']} | {pq} |")


def plan(args) -> None:
    grid = {n: len(rs) * len(args.lrs) + (n == "grid-sftmix") for n, rs in GRID_PARTS.items()}
    q_ = " --quick" if args.quick else ""
    data = prepare(args)
    for n in part_names(args):
        runs = grid.get(n) or (len(VARIANTS) * len(args.seeds) if n == "variants" else len(RECIPES))
        done = is_complete(args, n, read_part(args, n), data)
        print(f"{n:12s} {runs:2d} runs  {'done' if done else 'to run'}:  python benchmarks/quality_parts.py part {n}"
              f"{q_}")
    print(f"then:  python benchmarks/quality_parts.py merge{q_}")


def main(argv=None):
    args = parse_args(argv)
    if args.action == "plan":
        return plan(args)
    if args.action == "part":
        return run_part(args)
    return merge(args)


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("quality_parts"):
        main()
