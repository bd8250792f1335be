"""Does SFTMix beat NTP? A small reproduction of the paper's central claim, rerunnable on a 2-core CPU.

    nohup python benchmarks/quality.py > benchmarks/results/quality.log 2>&1 &     # the default, 114 min (2 cores)
    python benchmarks/quality.py --quick            # tiny random model, 1 seed, under a minute (the test)
    python benchmarks/quality.py --n_train 64 --seeds 0 --epochs 1 --pubmedqa_questions 20   # a smaller run
    python benchmarks/quality.py ... -- --num_threads 1     # after `--`: more `sftmix run` overrides

What it runs: SmolLM2-135M-Instruct (`smollm2`) on N examples of ../shared/data/alpaca_4500.json; per seed what
`sftmix run --config benchmarks/quality.yaml --seed S ...` runs (step 1: reference + confidence at C checkpoints; NTP
and SFTMix from the same start; the evaluation; the report), stage by stage through sftmix.recipe.run so that each
stage's CPU time is measured, in its own run directory under --work_dir (the results record the equivalent command).
Rerunning the same command resumes: finished stages are skipped, an interrupted training resumes from its last
checkpoint.
Data: the source is loaded once here with on_bad="skip" (the file has 2 rows with an empty output; the pipeline's
data stage refuses such rows in a file, so they are counted here instead). A fixed held-out set (split_heldout with
seed 0 over the whole file: the same for every seed and every N) is written to WORK/data/, and the first N+1 other
examples in a fixed shuffled order form the training file. Each run gets `--heldout 1` (the pipeline must hold out
something): it trains on N of those N+1, which one is left out depends on the seed, and that one is not used for
anything. Every metric is computed on the fixed held-out file (`--heldout_file`).
One-run SFTMix (`--reference self --recipes sftmix`, confidence from the target's own first --self_ntp_epochs NTP
epochs: --self_confidence online (the default: the training forward's own NLL, step-relative, no extra pass) or
checkpoints (--self_num_checkpoints scoring passes)) runs per seed from the same start in RUN_DIR-self (its config
differs; the start model's evaluation is reused from the seed's directory). Cost per recipe, end to end, model
loading included: NTP = its target run; two-run SFTMix = step 1 + its target run; one-run SFTMix = its run; each
also as a ratio to NTP (wall and CPU).
Metrics per seed: held-out response NLL (token-weighted; sftmix.eval.evaluate) of the start model, NTP and SFTMix;
3-shot
PubMedQA accuracy on the first Q questions of ../shared/data/pubmedqa_pqal_dev500.json (shots: 3 questions of that
file chosen by id hash and removed from the evaluated set); paired differences SFTMix - NTP per seed, per held-out
example and per question. Over seeds: mean, sample std, min, max. Plus the paper's §3.2 observation: which kinds of
instructions step 1 finds most and least confident (a crude category from the instruction's first word).
The untrained start model is the same for every seed: its evaluation files are copied from the first finished seed
into the next run directories, where sftmix.eval.evaluate reuses them only if their settings fingerprint matches.

Why these settings: the paper's AdamW / cosine / warm-up 0.1 / weight decay 0.1 / alpha 0.5 / mu 0.2 / C=5 / 3 epochs
are kept. Its learning rate (2e-6 at batch 32 on 52K examples: ~4900 steps, a summed learning rate of ~5e-3) would
leave a 104-example run (39 steps at batch 8) practically untrained; 1e-4 gives a summed learning rate of ~2e-3, the
same order as the paper's run, for both recipes alike (and the reference). Batch 8 instead of 32: 4 confident /
unconfident pairs per step and still 13 steps per epoch.
Cost, measured on the free 2-core CPU (torch's 2 threads) with 32 examples, 1 epoch, C=2: a training step of 8
Alpaca examples (~1580 tokens with padding) takes ~13.5 s for NTP and SFTMix alike; scoring a checkpoint ~0.35 s per
example; the held-out NLL ~0.3 s per example; 3-shot PubMedQA ~1 s per question (the 3 shots' 1055 tokens are cached
once). The default run (N=104, C=5, 100 held-out, 100 questions), measured on the free CPU: per seed step 1 ~280 s,
NTP ~440 s, SFTMix ~430 s, evaluation ~220 s; 4114 s (69 min) for the three seeds with the two recipes of then.
With one-run SFTMix as a third recipe (2026-12-01, light other load on the 2 cores): per seed step 1 ~320 s, NTP
~540 s, SFTMix ~530 s, one-run SFTMix ~510 s, evaluation ~360 s; 6814 s (114 min). The results record each stage's
wall and CPU time, so other settings can be budgeted from them.

Outputs (atomic): RESULTS/<name>.json (everything), RESULTS/<name>.md (the tables), name = quality or quality_quick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import resource
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .` too

from sftmix.utils import SFTMixError, atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402

HELDOUT_SEED = 0  # the held-out split never depends on the training seed
SHUFFLE_SEED = 0  # nor does the choice of the N training examples
MODELS = ("start", "ntp", "sftmix")
RECIPES3 = ("ntp", "sftmix", "sftmix_self")  # NTP, two-run SFTMix (step 1 + target), one-run SFTMix (reference=self)
TOP_K = 10

# The instruction kinds of §3.2, by the instruction's first word (crude on purpose: it is easy to check by eye).
KINDS = {
    "generation (write/create)": "write create generate compose design come construct develop invent brainstorm "
                                 "make draft produce suggest propose imagine synthesize synthesise",
    "rewrite/edit/translate": "rewrite edit paraphrase rephrase convert translate change transform correct reword "
                              "revise shorten improve replace format reorder reverse rearrange simplify remove "
                              "delete insert fill complete combine expand split",
    "classify/identify/extract": "classify identify categorize categorise determine detect find extract select "
                                 "pick choose label decide evaluate analyze analyse assess tell",
    "summarize": "summarize summarise",
    "explain/describe": "explain describe discuss outline compare elaborate",
    "list/name": "list name give provide enumerate",
    "question (wh-/yes-no)": "what who when where why how which is are can does do should would",
    "compute/math": "calculate compute solve add multiply divide subtract sort",
}
KIND_OF = {w: kind for kind, words in KINDS.items() for w in words.split()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Arguments after `--` are more `sftmix run` overrides for every seed "
                                       "(e.g. -- --num_threads 1).")
    p.add_argument("--quick", action="store_true", help="tiny random model, a few examples, 1 seed (< 1 min)")
    p.add_argument("--n_train", type=int, default=104, help="training examples per run (default 104: 13 steps of 8 "
                   "per epoch)")
    p.add_argument("--n_heldout", type=int, default=100, help="fixed held-out examples for the NLL (default 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs of NTP and SFTMix (default 3, the paper's)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the reference, NTP and SFTMix")
    p.add_argument("--num_checkpoints", type=int, default=5, help="C: reference checkpoints scored (paper: 5)")
    p.add_argument("--self_ntp_epochs", type=int, default=1,
                   help="one-run SFTMix (reference=self): NTP epochs whose scores give the split (default 1)")
    p.add_argument("--self_confidence", choices=["online", "checkpoints"], default="online",
                   help="one-run SFTMix: confidence from the NTP epochs' own training forward (online, default) or "
                        "from --self_num_checkpoints scoring passes (checkpoints)")
    p.add_argument("--self_num_checkpoints", type=int, default=2,
                   help="one-run SFTMix with --self_confidence checkpoints: scoring passes inside those NTP epochs")
    p.add_argument("--pubmedqa_questions", type=int, default=100,
                   help="first Q questions of the PubMedQA file (0: skip PubMedQA)")
    p.add_argument("--model", default=None, help="model spec (default: the config's, smollm2)")
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "quality.yaml"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_4500.json"))
    p.add_argument("--pubmedqa_file", default=str(ROOT.parent / "shared" / "data" / "pubmedqa_pqal_dev500.json"))
    p.add_argument("--work_dir", default=None, help="run directories (default runs/quality[_quick], git-ignored)")
    p.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default quality, or quality_quick)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.quick:  # every setting small, unless given explicitly
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        quick = {"n_train": 16, "n_heldout": 8, "seeds": [0], "epochs": 2.0, "lr": 1e-3, "num_checkpoints": 2,
                 "pubmedqa_questions": 4, "model": "tiny-random:0"}
        for k, v in quick.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
        # tiny model: short sequences, one thread; its byte tokenizer makes PubMedQA prompts long, so they are cut
        args.extra = ["--max_length", "512", "--max_dropped_fraction", "0.25", "--per_device_train_batch_size", "4",
                      "--eval_max_length", "1024",
                      "--batch_size", "4", "--num_threads", "1", "--save_steps", "0.5", "--disable_tqdm", "true",
                      *args.extra]
    args.name = args.name or ("quality_quick" if args.quick else "quality")
    args.work_dir = Path(args.work_dir or ROOT / "runs" / args.name)
    if args.n_train < 4 or args.n_heldout < 1 or args.pubmedqa_questions < 0 or not args.seeds:
        p.error("need --n_train >= 4, --n_heldout >= 1, --pubmedqa_questions >= 0 and at least one seed")
    return args


# ------------------------------------------------------------------------------------------------------------ data


def _write_if_changed(path: Path, records: list[dict]) -> None:
    """Write JSONL atomically, but leave an identical file alone: its mtime is part of the evaluation's fingerprint
    (sftmix.eval.evaluate reuses results only for unchanged input files), so rewriting it would redo the evaluation."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def data_pool(args) -> tuple[list, dict, list, list, list[int]]:
    """(records, load stats, pool, fixed held-out, shuffled order of the pool): the training file takes the first
    N+1 of that order (prepare_data), benchmarks/quality_parts.py's validation set its last V."""
    from sftmix.data import load_records_with_stats, split_heldout

    records, stats = load_records_with_stats(args.data, on_bad="skip")
    if stats.get("n_skipped_rows"):
        print(f"[quality] {args.data}: skipped {stats['n_skipped_rows']} bad rows {stats.get('skipped')}", flush=True)
    pool, held = split_heldout(records, args.n_heldout, seed=HELDOUT_SEED)
    order = list(range(len(pool)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    return records, stats, pool, held, order


def prepare_data(args, pooled: tuple | None = None) -> dict:
    """The fixed held-out file and the N+1-example training file (see the module docstring); `pooled`: data_pool's
    result when the caller has it already (the file is then read, and its bad rows reported, once)."""
    from sftmix.data import first_user_message

    records, stats, pool, held, order = pooled or data_pool(args)
    if args.n_train + 1 > len(pool):
        raise SFTMixError(f"--n_train {args.n_train}: {args.data} has only {len(pool)} examples besides the held-out")
    train = [pool[i] for i in sorted(order[: args.n_train + 1])]
    folder = args.work_dir / "data"
    train_file, held_file = folder / f"train_n{args.n_train}.jsonl", folder / f"heldout_h{args.n_heldout}.jsonl"
    _write_if_changed(train_file, train)
    _write_if_changed(held_file, held)
    return {"source": str(args.data), "n_rows": stats.get("n_rows"), "n_records": len(records),
            "n_skipped_rows": stats.get("n_skipped_rows", 0), "skipped": stats.get("skipped"),
            "n_train_file": len(train), "n_train_per_run": args.n_train, "n_heldout": len(held),
            "heldout_seed": HELDOUT_SEED, "train_file": str(train_file), "heldout_file": str(held_file),
            "instructions": {r["guid"]: first_user_message(r) for r in train}}


# ------------------------------------------------------------------------------------------------------------ runs


def run_overrides(args, data: dict) -> list[str]:
    """The `sftmix run` settings shared by every seed (seed and output_dir come on top)."""
    out = ["--config", str(args.config), "--data", data["train_file"], "--heldout", "1",
           "--heldout_file", data["heldout_file"], "--num_train_epochs", str(args.epochs),
           "--learning_rate", str(args.lr), "--num_checkpoints", str(args.num_checkpoints)]
    if args.model:
        out += ["--model", args.model]
    if args.pubmedqa_questions:
        out += ["--pubmedqa_file", str(args.pubmedqa_file), "--mc_limit", str(args.pubmedqa_questions)]
    return out + list(args.extra)


def run_dir_for(args, common: list[str], seed: int) -> Path:
    """One folder per settings (a short hash of them) and seed, so a changed setting never reuses a stale run.
    Settings that never change a result (sftmix.config.settings_of("runtime"), e.g. num_threads) are not part of the
    hash: an interrupted run can resume with `-- --num_threads 1` on a machine that got busy."""
    return args.work_dir / f"n{args.n_train}-e{args.epochs:g}-lr{args.lr:g}-{settings_tag(common)}" / f"seed{seed}"


def settings_tag(common: list[str]) -> str:
    """A short hash of `sftmix run` overrides, runtime settings left out (see run_dir_for)."""
    return hashlib.sha256("\x1f".join(without_runtime(common)).encode()).hexdigest()[:8]


def without_runtime(overrides: list[str]) -> list[str]:
    """`--key value` / `--key=value` overrides less those of settings that never change a result."""
    from sftmix.config import settings_of

    runtime = set(settings_of("runtime"))
    kept, i = [], 0
    while i < len(overrides):
        key = overrides[i][2:].split("=")[0] if overrides[i].startswith("--") else None
        if key in runtime:
            i += 1 if "=" in overrides[i] else 2
            continue
        kept.append(overrides[i])
        i += 1
    return kept


def reuse_start_eval(run_dir: Path, done: list[Path]) -> None:
    """Copy the start model's per-task evaluation files from a finished seed; sftmix.eval.evaluate reuses them only when
    their settings fingerprint (model, files, max_length, shots, ...) equals this run's."""
    target = run_dir / "eval" / "start"
    for src in done:
        folder = src / "eval" / "start"
        if not (src / "eval" / "start.json").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file() and f.suffix in (".json", ".jsonl") and f.name != "results.json" \
                    and not (target / f.name).exists():
                shutil.copy2(f, target / f.name)
        return


# The stages of `sftmix run`, one pipeline command at a time (in this process, through sftmix.recipe.run), so that
# each one's CPU time is measured on its own: on a busy machine the wall time says little, while CPU s / cores estimates
# the wall time on a free one.
STAGE_COMMANDS = (("dynamics", "dynamics", None), ("train:ntp", "train", "ntp"), ("train:sftmix", "train", "sftmix"),
                  ("eval", "eval", None), ("report", "report", None))


# One-run SFTMix (reference=self) in a run directory of its own beside the seed's (its config differs): its target
# run is the whole recipe (no step 1); the start model's evaluation files are reused from the seed's directory.
SELF_STAGE_COMMANDS = (("train:sftmix_self", "train", "sftmix"), ("eval:self", "eval", None),
                       ("report:self", "report", None))


def self_overrides(args, common: list[str]) -> list[str]:
    return [*common, "--reference", "self", "--recipes", "sftmix", "--self_ntp_epochs", str(args.self_ntp_epochs),
            "--self_confidence", args.self_confidence, "--self_num_checkpoints", str(args.self_num_checkpoints)]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_stage(cfg, name: str, command: str, recipe: str | None, costs: dict, costs_path: Path, label: str) -> None:
    """One pipeline command on cfg.run_dir, timed; a stage that really ran now (was not done already) has its wall
    and CPU seconds kept in `costs` (saved to costs_path), so that they survive a resume."""
    import gc

    from sftmix import recipe as sftmix_recipe

    timings_before = _json(cfg.run_dir / "timings.json") or {}
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    sftmix_recipe.run(cfg, command, recipe=recipe)
    gc.collect()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    timings_after = _json(cfg.run_dir / "timings.json") or {}
    ran = [k for k in timings_after if timings_after[k] != timings_before.get(k) and k != "data"]
    if ran and not name.startswith("report"):
        costs[name] = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "stages": ran,
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(costs_path, costs)
    skipped = " (done already)" if not ran else ""  # `sftmix report` always rewrites the (cheap) report
    print(f"[quality] {label} {name}: {wall:.0f}s wall, {cpu:.0f}s CPU{skipped}", flush=True)


def run_seed(args, common: list[str], seed: int, done: list[Path]) -> dict:
    """All stages of one seed's run directory, as `sftmix run` does them; a stage finished earlier (in an interrupted
    invocation) is skipped by the pipeline itself. Each stage's cost is kept in RUN_DIR/quality_costs.json."""
    from sftmix.config import parse_config

    run_dir = run_dir_for(args, common, seed)
    reuse_start_eval(run_dir, done)
    costs_path = run_dir / "quality_costs.json"
    costs = _json(costs_path) or {}
    cfg = parse_config([*common, "--seed", str(seed), "--output_dir", str(run_dir)])
    self_dir = self_run_dir(run_dir)
    self_cfg = parse_config([*self_overrides(args, common), "--seed", str(seed), "--output_dir", str(self_dir)])
    print(f"[quality] seed {seed}: {run_dir}", flush=True)
    plan = [(cfg, *c) for c in STAGE_COMMANDS] + [(self_cfg, *c) for c in SELF_STAGE_COMMANDS]
    for cfg, name, command, recipe in plan:
        if name == "train:sftmix_self":
            reuse_start_eval(cfg.run_dir, [plan[0][0].run_dir])  # the same start model, evaluated once
        run_stage(cfg, name, command, recipe, costs, costs_path, f"seed {seed}")
    return {"seed": seed, "run_dir": str(plan[0][0].run_dir), "self_run_dir": str(self_dir), "stage_costs": costs}


def self_run_dir(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-self"


def recipe_costs(stage_costs: dict) -> dict:
    """Wall and CPU seconds of each recipe end to end (model loading included): NTP = its target run; two-run
    SFTMix = step 1 + its target run; one-run SFTMix = its target run alone. None where a part is missing."""
    parts = {"ntp": ("train:ntp",), "sftmix": ("dynamics", "train:sftmix"), "sftmix_self": ("train:sftmix_self",)}
    out = {}
    for recipe, names in parts.items():
        if all(n in stage_costs for n in names):
            out[recipe] = {k: round(sum(stage_costs[n][k] for n in names), 1) for k in ("wall_seconds", "cpu_seconds")}
        else:
            out[recipe] = None
    for recipe in ("sftmix", "sftmix_self"):
        a, b = out[recipe], out["ntp"]
        out[f"{recipe}_over_ntp"] = None if not a or not b else {
            k: a[k] / b[k] for k in ("wall_seconds", "cpu_seconds") if b[k]}
    return out


# ----------------------------------------------------------------------------------------------------- per seed


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def seed_metrics(run_dir: Path, self_dir: Path | None = None) -> dict:
    """Held-out NLL / PPL and PubMedQA accuracy of each model, and the paired comparisons SFTMix vs NTP (and, with
    `self_dir`, one-run SFTMix's, `sftmix_self`, vs NTP and vs two-run SFTMix)."""
    out = {"models": {}}
    where = [(name, run_dir, name) for name in MODELS]
    if self_dir is not None:
        where.append(("sftmix_self", self_dir, "sftmix"))
    for name, folder, recipe in where:
        ev = (_json(folder / "eval" / f"{recipe}.json") or {}).get("results") or {}
        h, pq = ev.get("heldout") or {}, ev.get("pubmedqa") or {}
        tr = _json(folder / recipe / "train_result.json") if name != "start" else None
        out["models"][name] = {
            "heldout_nll": h.get("nll"), "heldout_ppl": h.get("ppl"),
            "heldout_nll_example_mean": h.get("nll_example_mean"),
            "heldout_examples": h.get("n_examples"), "heldout_tokens": h.get("n_tokens"),
            "pubmedqa_accuracy": pq.get("accuracy"), "pubmedqa_ci95": pq.get("ci95"), "pubmedqa_n": pq.get("n"),
            "pubmedqa_acc_norm": pq.get("acc_norm"), "pubmedqa_predictions": pq.get("prediction_counts"),
            "pubmedqa_truncated": pq.get("n_truncated"),
            "train_loss": (tr or {}).get("metrics", {}).get("train_loss"),
            "train_seconds": (tr or {}).get("metrics", {}).get("train_runtime"),
            "train_steps": (tr or {}).get("global_step"), "train_examples": (tr or {}).get("n_train_examples"),
        }
    m = out["models"]
    diff = {}
    for key in ("heldout_nll", "heldout_ppl", "pubmedqa_accuracy"):
        a, b = m["sftmix"][key], m["ntp"][key]
        diff[key] = None if a is None or b is None else a - b
    # paired per held-out example: does SFTMix give the response a lower mean NLL than NTP?
    ex = {n: {r["guid"]: r["nll_mean"] for r in read_jsonl(p)}
          for n in ("ntp", "sftmix") if (p := run_dir / "eval" / n / "heldout_examples.jsonl").exists()}
    if len(ex) == 2:
        common = sorted(set(ex["ntp"]) & set(ex["sftmix"]))
        diff["heldout_examples_sftmix_lower"] = sum(ex["sftmix"][g] < ex["ntp"][g] for g in common)
        diff["heldout_examples_compared"] = len(common)
    # paired per PubMedQA question: right with one recipe, wrong with the other
    pr = {n: {r["id"]: r["correct"] for r in read_jsonl(p)}
          for n in ("ntp", "sftmix") if (p := run_dir / "eval" / n / "pubmedqa_predictions.jsonl").exists()}
    if len(pr) == 2:
        ids = set(pr["ntp"]) & set(pr["sftmix"])
        diff["pubmedqa_only_sftmix_right"] = sum(pr["sftmix"][i] and not pr["ntp"][i] for i in ids)
        diff["pubmedqa_only_ntp_right"] = sum(pr["ntp"][i] and not pr["sftmix"][i] for i in ids)
    out["sftmix_minus_ntp"] = diff
    if self_dir is not None:
        files = {"ntp": run_dir / "eval" / "ntp", "sftmix": run_dir / "eval" / "sftmix",
                 "sftmix_self": self_dir / "eval" / "sftmix"}
        for other in ("ntp", "sftmix"):
            out[f"sftmix_self_minus_{other}"] = _paired(m, files, "sftmix_self", other)
        out["self_vs_step1_confidence"] = _confidence_agreement(run_dir, self_dir)
    split = _json(run_dir / "dynamics" / "split.json") or {}
    out["confidence_split"] = {k: split.get(k) for k in ("n_examples", "n_confident", "n_unconfident")}
    out["stage_seconds"] = {k: v["seconds"] for k, v in (_json(run_dir / "timings.json") or {}).items()}
    return out


def _confidence_agreement(run_dir: Path, self_dir: Path) -> dict | None:
    """Spearman correlation of one-run confidence (the target's own NTP epochs) with step 1's (the reference run),
    and the share of examples the two median splits put on the same side (sftmix.confidence.online.compare_online).
    With online one-run confidence, `raw_online` is the same comparison for the recorded NLL without the step-relative
    correction (what the correction buys)."""
    from sftmix.confidence.online import compare_online, online_confidence

    a, b = run_dir / "confidence.jsonl", self_dir / "confidence.jsonl"
    if not (a.exists() and b.exists()):
        return None
    step1 = {r["guid"]: r["confidence"] for r in read_jsonl(a)}
    own_rows = read_jsonl(b)
    own = {r["guid"]: r["confidence"] for r in own_rows}
    guids = sorted(set(step1) & set(own))
    if len(guids) < 3:
        return None
    out = compare_online([own[g] for g in guids], [step1[g] for g in guids], guids)
    records = self_dir / "dynamics" / "online_records.jsonl"
    if records.exists():  # example_idx is the row of the one-run's training data, in confidence.jsonl's order
        raw = online_confidence(read_jsonl(records), [r["guid"] for r in own_rows])["confidence"]
        raw = dict(zip((r["guid"] for r in own_rows), raw))
        out["raw_online"] = compare_online([raw[g] for g in guids], [step1[g] for g in guids], guids)
    return out


def _paired(m: dict, files: dict, a: str, b: str) -> dict:
    """a - b per metric, and per held-out example / PubMedQA question (the comparisons above, for any two models)."""
    diff = {key: None if m[a][key] is None or m[b][key] is None else m[a][key] - m[b][key]
            for key in ("heldout_nll", "heldout_ppl", "pubmedqa_accuracy")}
    ex = {n: {r["guid"]: r["nll_mean"] for r in read_jsonl(p)}
          for n in (a, b) if (p := files[n] / "heldout_examples.jsonl").exists()}
    if len(ex) == 2:
        common = sorted(set(ex[a]) & set(ex[b]))
        diff["heldout_examples_lower"] = sum(ex[a][g] < ex[b][g] for g in common)
        diff["heldout_examples_compared"] = len(common)
    pr = {n: {r["id"]: r["correct"] for r in read_jsonl(p)}
          for n in (a, b) if (p := files[n] / "pubmedqa_predictions.jsonl").exists()}
    if len(pr) == 2:
        ids = set(pr[a]) & set(pr[b])
        diff["pubmedqa_only_first_right"] = sum(pr[a][i] and not pr[b][i] for i in ids)
        diff["pubmedqa_only_second_right"] = sum(pr[b][i] and not pr[a][i] for i in ids)
    return diff


def spread(values) -> dict:
    """mean, sample std (None for one value), min, max of the non-missing values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs)}


# ---------------------------------------------------------------------------------------------------- §3.2


def instruction_kind(text: str) -> tuple[str, str]:
    """(kind, first word) of an instruction: the first word, lower-cased, looked up in KINDS."""
    words = re.findall(r"[a-z']+", text.split("\n\n")[0].lower())
    first = words[0] if words else ""
    return KIND_OF.get(first, "other"), first


def confidence_observation(run_dirs: list[Path], instructions: dict[str, str]) -> dict:
    """Which instructions step 1 finds confident, pooled over seeds: each example's confidence percentile within its
    seed's run (0 = least, 1 = most confident), averaged over the seeds that trained on it."""
    from scipy.stats import spearmanr

    pct, flags, tokens = defaultdict(list), defaultdict(list), {}
    for d in run_dirs:
        rows = read_jsonl(d / "confidence.jsonl") if (d / "confidence.jsonl").exists() else []
        ranked = sorted(rows, key=lambda r: (r["confidence"], r["guid"]))
        for i, r in enumerate(ranked):
            pct[r["guid"]].append(i / max(len(ranked) - 1, 1))
            flags[r["guid"]].append(bool(r["confident"]))
            tokens[r["guid"]] = r.get("n_tokens")
    if not pct:
        return {}
    guids = sorted(pct, key=lambda g: (-statistics.fmean(pct[g]), g))

    def item(g):
        kind, first = instruction_kind(instructions.get(g, ""))
        return {"guid": g, "confidence_percentile": statistics.fmean(pct[g]), "kind": kind, "first_word": first,
                "response_tokens": tokens[g], "has_input": "\n\n" in instructions.get(g, ""),
                "instruction": " ".join(instructions.get(g, "?").split())[:200]}

    items = [item(g) for g in guids]
    by_kind = defaultdict(list)
    for it in items:
        by_kind[it["kind"]].append(it)
    kinds = [{"kind": k, "n": len(v), "mean_percentile": statistics.fmean(x["confidence_percentile"] for x in v),
              "confident_share": statistics.fmean(statistics.fmean(flags[x["guid"]]) for x in v),
              "first_words": dict(Counter(x["first_word"] for x in v).most_common(5))}
             for k, v in by_kind.items()]
    kinds.sort(key=lambda r: -r["mean_percentile"])
    out = {"n_examples": len(items), "n_seeds": len(run_dirs), "kinds": kinds,
           "most_confident": items[:TOP_K], "least_confident": items[::-1][:TOP_K]}
    with_len = [it for it in items if it["response_tokens"]]
    if len(with_len) > 2:
        rho = spearmanr([it["confidence_percentile"] for it in with_len], [it["response_tokens"] for it in with_len])
        out["spearman_confidence_vs_response_tokens"] = float(rho.statistic)
    for flag in (True, False):
        sub = [it["confidence_percentile"] for it in items if it["has_input"] is flag]
        out[f"mean_percentile_{'with' if flag else 'without'}_input"] = statistics.fmean(sub) if sub else None
    return out


# ---------------------------------------------------------------------------------------------------- output


def _f(v, digits=4, sign=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _cell(s: dict, digits=4, sign=False) -> str:
    if not s or s["mean"] is None:
        return "–"
    std = f" ± {_f(s['std'], digits)}" if s["std"] is not None else ""
    return f"{_f(s['mean'], digits, sign)}{std} [{_f(s['min'], digits, sign)}, {_f(s['max'], digits, sign)}]"


def render_markdown(res: dict) -> str:
    s, agg = res["settings"], res["aggregate"]
    partial = "" if res["complete"] else f" (PARTIAL: {len(res['seeds'])} of {len(s['seeds'])} seeds done)"
    lines = [f"# SFTMix vs NTP: small-scale reproduction (`benchmarks/quality.py{' --quick' if s['quick'] else ''}`)"
             f"{partial}", "",
             f"Model `{s['model']}`, {s['n_train']} Alpaca training examples per run, {s['epochs']:g} epochs, "
             f"lr {s['lr']:g}, C={s['num_checkpoints']} reference checkpoints, seeds {s['seeds']}; held-out NLL on "
             f"{res['data']['n_heldout']} fixed Alpaca examples; 3-shot PubMedQA on {s['pubmedqa_questions']} "
             f"questions. Mean ± sample std [min, max] over seeds; lower NLL / higher accuracy is better.", "",
             "| metric | start (untrained) | NTP | SFTMix | SFTMix − NTP (paired per seed) | seeds SFTMix better |",
             "|---|---|---|---|---|---|"]
    for key, label in (("heldout_nll", "held-out NLL"), ("heldout_ppl", "held-out PPL"),
                       ("pubmedqa_accuracy", "PubMedQA 3-shot accuracy")):
        a = agg[key]
        lines.append(f"| {label} | {_f(a['start']['mean'])} | {_cell(a['ntp'])} | {_cell(a['sftmix'])} | "
                     f"{_cell(a['sftmix_minus_ntp'], sign=True)} | "
                     f"{a['seeds_sftmix_better']}/{a['sftmix_minus_ntp']['n']} |")
    if "sftmix_self" in agg["heldout_nll"]:
        lines += ["", "## One-run SFTMix (reference=self: confidence from the target's own first "
                  f"{s.get('self_ntp_epochs')} NTP epoch(s), "
                  + ("online: the training forward's step-relative NLL, no scoring pass)"
                     if s.get("self_confidence", "checkpoints") == "online"
                     else f"{s.get('self_num_checkpoints')} scoring passes)"), "",
                  "| metric | one-run SFTMix | one-run − NTP | seeds better than NTP | one-run − two-run "
                  "| seeds better than two-run |", "|---|---|---|---|---|---|"]
        for key, label in (("heldout_nll", "held-out NLL"), ("heldout_ppl", "held-out PPL"),
                           ("pubmedqa_accuracy", "PubMedQA 3-shot accuracy")):
            a = agg[key]
            lines.append(f"| {label} | {_cell(a['sftmix_self'])} | {_cell(a['sftmix_self_minus_ntp'], sign=True)} | "
                         f"{a['seeds_sftmix_self_better_than_ntp']}/{a['sftmix_self_minus_ntp']['n']} | "
                         f"{_cell(a['sftmix_self_minus_sftmix'], sign=True)} | "
                         f"{a['seeds_sftmix_self_better_than_sftmix']}/{a['sftmix_self_minus_sftmix']['n']} |")
        rho = [r["self_vs_step1_confidence"]["spearman"] for r in res["seeds"] if r.get("self_vs_step1_confidence")]
        agree = [r["self_vs_step1_confidence"]["split_agreement"] for r in res["seeds"]
                 if r.get("self_vs_step1_confidence")]
        lines += ["", f"One-run confidence vs step 1's, per seed: Spearman {', '.join(f'{x:.3f}' for x in rho)}; "
                  f"share of examples on the same side of the split {', '.join(f'{x:.2f}' for x in agree)}."]
        raw = [r["self_vs_step1_confidence"]["raw_online"] for r in res["seeds"]
               if (r.get("self_vs_step1_confidence") or {}).get("raw_online")]
        if raw:
            rho_raw = ", ".join(f"{x['spearman']:.3f}" for x in raw)
            agree_raw = ", ".join(f"{x['split_agreement']:.2f}" for x in raw)
            lines += [f"The same without the step-relative correction (raw online PPL): Spearman {rho_raw}; same "
                      f"side {agree_raw}."]
    rc = agg.get("recipe_costs")
    if rc:
        lines += ["", "## Cost per recipe, end to end (step 1 included; mean ± std [min, max] over seeds)", "",
                  "| recipe | wall s | CPU s | wall / NTP | CPU / NTP |", "|---|---|---|---|---|"]
        for recipe, label in (("ntp", "NTP"), ("sftmix", "two-run SFTMix (step 1 + target)"),
                              ("sftmix_self", "one-run SFTMix")):
            ratio = rc.get(f"{recipe}_over_ntp") or {}
            lines.append(f"| {label} | {_cell(rc[recipe]['wall_seconds'], 0)} | "
                         f"{_cell(rc[recipe]['cpu_seconds'], 0)} | "
                         f"{_cell(ratio.get('wall_seconds'), 3) if ratio else '1'} | "
                         f"{_cell(ratio.get('cpu_seconds'), 3) if ratio else '1'} |")
    lines += ["", "## Per seed", "",
              "| seed | NLL NTP | NLL SFTMix | Δ NLL | held-out examples SFTMix lower | PubMedQA NTP "
              "| PubMedQA SFTMix | Δ acc | questions only SFTMix / only NTP right "
              "| confident / unconfident | wall s | CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["seeds"]:
        m, d, c = r["models"], r["sftmix_minus_ntp"], r["confidence_split"]
        lines.append(f"| {r['seed']} | {_f(m['ntp']['heldout_nll'])} | {_f(m['sftmix']['heldout_nll'])} | "
                     f"{_f(d['heldout_nll'], sign=True)} | {d.get('heldout_examples_sftmix_lower', '–')}/"
                     f"{d.get('heldout_examples_compared', '–')} | {_f(m['ntp']['pubmedqa_accuracy'], 3)} | "
                     f"{_f(m['sftmix']['pubmedqa_accuracy'], 3)} | {_f(d['pubmedqa_accuracy'], 3, sign=True)} | "
                     f"{d.get('pubmedqa_only_sftmix_right', '–')} / {d.get('pubmedqa_only_ntp_right', '–')} | "
                     f"{c.get('n_confident')} / {c.get('n_unconfident')} | "
                     f"{sum(v['wall_seconds'] for v in r['stage_costs'].values()):.0f} | "
                     f"{sum(v['cpu_seconds'] for v in r['stage_costs'].values()):.0f} |")
    obs = res["confidence_observation"]
    if obs:
        lines += ["", "## §3.2: which instructions are confident", "",
                  f"{obs['n_examples']} distinct training examples (each seed trains on all but one of the file's "
                  f"examples), confidence percentile within each seed's step 1 (1 = most confident), averaged over the "
                  f"seeds that trained on the example ({obs['n_seeds']} seed(s) in all). "
                  f"Spearman(confidence, response tokens) = "
                  f"{_f(obs.get('spearman_confidence_vs_response_tokens'), 3)}; mean percentile with an input field "
                  f"{_f(obs.get('mean_percentile_with_input'), 3)}, without "
                  f"{_f(obs.get('mean_percentile_without_input'), 3)}.", "",
                  "| kind (first word) | examples | mean percentile | share in confident half "
                  "| commonest first words |",
                  "|---|---|---|---|---|"]
        for k in obs["kinds"]:
            words = ", ".join(f"{w or '∅'} ({n})" for w, n in k["first_words"].items())
            lines.append(f"| {k['kind']} | {k['n']} | {k['mean_percentile']:.3f} | {k['confident_share']:.2f} | "
                         f"{words} |")
        for key, title in (("most_confident", "Most confident"), ("least_confident", "Least confident")):
            lines += ["", f"### {title}", "", "| percentile | kind | response tokens | instruction |",
                      "|---|---|---|---|"]
            for it in obs[key]:
                text = it["instruction"][:140].replace("|", "\\|")
                lines.append(f"| {it['confidence_percentile']:.3f} | {it['kind']} | {it['response_tokens']} | {text} |")
    cost = res["cost"]
    lines += ["", "## Cost", "",
              f"This invocation: {cost['wall_seconds']:.0f} s wall, {cost['cpu_seconds']:.0f} s CPU. "
              f"Per pipeline command (sftmix.recipe.run in this process, model loading included), mean over the "
              f"seeds, as measured by the invocation that ran it. On a busy machine the wall time is inflated; "
              f"CPU s / cores estimates the "
              f"wall time on a free one.", "",
              "| stage command | wall s | CPU s | pipeline stages (their own wall s) |", "|---|---|---|---|"]
    for k, v in cost["stage_commands_mean"].items():
        inner = ", ".join(f"{n} {cost['pipeline_stage_seconds_mean'].get(n, float('nan')):.0f}" for n in v["stages"])
        lines.append(f"| {k} | {v['wall_seconds']:.0f} | {v['cpu_seconds']:.0f} | {inner} |")
    d = res["data"]
    lines += ["", "## Setup", "", f"- Data: {d['source']} ({d['n_rows']} rows, {d['n_skipped_rows']} skipped: "
              f"{d['skipped']}); held-out: {d['n_heldout']} examples by split_heldout(seed={d['heldout_seed']}), the "
              f"same for every seed and N; training file: {d['n_train_file']} examples, each run holds one out "
              f"(seed-dependent) and trains on {d['n_train_per_run']}.",
              f"- Command per seed: `{res['command_template']}`.", f"- Run directories: `{res['work_dir']}`.", ""]
    return "\n".join(lines)


def aggregate(seeds: list[dict]) -> dict:
    agg = {}
    for key, lower_better in (("heldout_nll", True), ("heldout_ppl", True), ("pubmedqa_accuracy", False)):
        diffs = [r["sftmix_minus_ntp"][key] for r in seeds]
        agg[key] = {"start": spread([r["models"]["start"][key] for r in seeds[:1]]),
                    "ntp": spread([r["models"]["ntp"][key] for r in seeds]),
                    "sftmix": spread([r["models"]["sftmix"][key] for r in seeds]),
                    "sftmix_minus_ntp": spread(diffs),
                    "seeds_sftmix_better": sum(1 for x in diffs
                                               if x is not None and (x < 0 if lower_better else x > 0))}
        if all("sftmix_self" in r["models"] for r in seeds):
            agg[key]["sftmix_self"] = spread([r["models"]["sftmix_self"][key] for r in seeds])
            for other in ("ntp", "sftmix"):
                d = [r[f"sftmix_self_minus_{other}"][key] for r in seeds]
                agg[key][f"sftmix_self_minus_{other}"] = spread(d)
                agg[key][f"seeds_sftmix_self_better_than_{other}"] = sum(
                    1 for x in d if x is not None and (x < 0 if lower_better else x > 0))
    costs = [recipe_costs(r["stage_costs"]) for r in seeds]
    agg["recipe_costs"] = {
        recipe: {k: spread([(c[recipe] or {}).get(k) for c in costs]) for k in ("wall_seconds", "cpu_seconds")}
        for recipe in (*RECIPES3, "sftmix_over_ntp", "sftmix_self_over_ntp")}
    return agg


def collect(args, data: dict, common: list[str], runs: list[dict], t0: float, cpu0: float) -> dict:
    """The results document from the seeds finished so far."""
    stages, commands = defaultdict(list), defaultdict(list)
    for r in runs:
        for k, v in r["stage_seconds"].items():
            stages[k].append(v)
        for k, v in r["stage_costs"].items():
            commands[k].append(v)
    command_means = {k: {"wall_seconds": statistics.fmean(x["wall_seconds"] for x in v),
                         "cpu_seconds": statistics.fmean(x["cpu_seconds"] for x in v), "n_seeds": len(v),
                         "stages": sorted({n for x in v for n in x["stages"]})} for k, v in commands.items()}
    return {
        "complete": len(runs) == len(args.seeds),
        "settings": {"quick": args.quick, "model": args.model or "smollm2 (config)", "n_train": args.n_train,
                     "n_heldout": args.n_heldout, "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr,
                     "num_checkpoints": args.num_checkpoints, "pubmedqa_questions": args.pubmedqa_questions,
                     "self_ntp_epochs": args.self_ntp_epochs, "self_confidence": args.self_confidence,
                     "self_num_checkpoints": args.self_num_checkpoints,
                     "config": str(args.config), "extra_overrides": args.extra},
        "data": {k: v for k, v in data.items() if k != "instructions"},
        "command_template": " ".join(["sftmix run", *common, "--seed S --output_dir DIR"]),
        "work_dir": str(args.work_dir),
        "aggregate": aggregate(runs),
        "seeds": runs,
        "confidence_observation": confidence_observation([Path(r["run_dir"]) for r in runs], data["instructions"]),
        "cost": {"wall_seconds": time.perf_counter() - t0,
                 "cpu_seconds": _cpu_seconds() - cpu0,
                 "stage_commands_mean": command_means,
                 "pipeline_stage_seconds_mean": {k: statistics.fmean(v) for k, v in stages.items()}},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    from sftmix.console import setup_logging

    setup_logging()  # the pipeline's progress lines, as the `sftmix` command prints them
    data = prepare_data(args)
    common = run_overrides(args, data)
    print(f"[quality] {data['n_train_per_run']} training examples per run, {data['n_heldout']} held-out; seeds "
          f"{args.seeds}; run directories under {args.work_dir}", flush=True)
    out = Path(args.results_dir)
    runs, done = [], []
    for seed in args.seeds:
        info = run_seed(args, common, seed, done)
        done.append(Path(info["run_dir"]))
        info.update(seed_metrics(Path(info["run_dir"]), Path(info["self_run_dir"])))
        info["recipe_costs"] = recipe_costs(info["stage_costs"])
        runs.append(info)
        # after every seed, so that a long run can be looked at (and is not lost) before it ends
        res = collect(args, data, common, runs, t0, cpu0)
        md = render_markdown(res)
        atomic_write_json(out / f"{args.name}.json", res)
        atomic_write_text(out / f"{args.name}.md", md)
        print(f"[quality] seed {seed} done; wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}",
              flush=True)
    print(md, flush=True)
    return res


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("quality"):
        main()
