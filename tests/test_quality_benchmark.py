"""benchmarks/quality.py: the --quick run (tiny random model) writes the JSON and markdown results with finite numbers,
resumes without redoing a stage, and keeps the held-out split fixed across N."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality.py"
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_4500.json"
PUBMEDQA = ROOT.parent / "shared" / "data" / "pubmedqa_pqal_dev500.json"
needs_data = pytest.mark.skipif(not (ALPACA.exists() and PUBMEDQA.exists()), reason="shared data files not present")


def load_quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(QUALITY), "--quick", "--work_dir", str(tmp_path / "work"),
                           "--results_dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@needs_data
def test_quick_run_writes_results_and_resumes(tmp_path):
    first = run_quick(tmp_path)
    res = json.loads((tmp_path / "results" / "quality_quick.json").read_text())
    md = (tmp_path / "results" / "quality_quick.md").read_text()

    assert res["settings"]["quick"] and res["settings"]["seeds"] == [0]
    assert res["data"]["n_skipped_rows"] == 2 and res["data"]["n_heldout"] == 8  # the file's 2 empty outputs
    assert res["data"]["n_train_file"] == res["data"]["n_train_per_run"] + 1 == 17
    (seed,) = res["seeds"]
    for name in ("start", "ntp", "sftmix"):
        m = seed["models"][name]
        assert finite(m["heldout_nll"]) and m["heldout_nll"] > 0 and m["heldout_examples"] == 8
        assert math.isclose(m["heldout_ppl"], math.exp(m["heldout_nll"]), rel_tol=1e-6)
        assert 0 <= m["pubmedqa_accuracy"] <= 1 and m["pubmedqa_n"] == 4
    for name in ("ntp", "sftmix"):
        assert seed["models"][name]["train_examples"] == 16 and finite(seed["models"][name]["train_loss"])
    diff = seed["sftmix_minus_ntp"]
    m = seed["models"]
    assert math.isclose(diff["heldout_nll"], m["sftmix"]["heldout_nll"] - m["ntp"]["heldout_nll"])
    assert diff["heldout_examples_compared"] == 8 and 0 <= diff["heldout_examples_sftmix_lower"] <= 8
    assert diff["pubmedqa_only_sftmix_right"] + diff["pubmedqa_only_ntp_right"] <= 4
    assert seed["confidence_split"] == {"n_examples": 16, "n_confident": 8, "n_unconfident": 8}
    for name in ("start", "ntp", "sftmix"):  # every model is scored on the benchmark's fixed held-out file
        ev = json.loads((Path(seed["run_dir"]) / "eval" / f"{name}.json").read_text())
        assert ev["results"]["heldout"]["file"] == res["data"]["heldout_file"]

    for key in ("heldout_nll", "heldout_ppl", "pubmedqa_accuracy"):
        agg = res["aggregate"][key]
        for name in ("start", "ntp", "sftmix", "sftmix_minus_ntp"):
            s = agg[name]
            assert s["n"] == 1 and finite(s["mean"]) and s["min"] == s["mean"] == s["max"] and s["std"] is None
        assert agg["seeds_sftmix_better"] in (0, 1)

    obs = res["confidence_observation"]
    assert obs["n_examples"] == 16 and sum(k["n"] for k in obs["kinds"]) == 16
    assert len(obs["most_confident"]) == len(obs["least_confident"]) == 10
    assert obs["most_confident"][0]["confidence_percentile"] == 1
    assert obs["least_confident"][0]["confidence_percentile"] == 0
    assert all(it["instruction"] and it["kind"] for it in obs["most_confident"])
    assert -1 <= obs["spearman_confidence_vs_response_tokens"] <= 1

    # one-run SFTMix (reference=self), from the same start, in its own run directory; costs per recipe
    ms = seed["models"]["sftmix_self"]
    assert finite(ms["heldout_nll"]) and ms["heldout_examples"] == 8 and ms["train_examples"] == 16
    d = seed["sftmix_self_minus_ntp"]
    assert math.isclose(d["heldout_nll"], ms["heldout_nll"] - m["ntp"]["heldout_nll"])
    assert d["heldout_examples_compared"] == 8
    assert math.isclose(seed["sftmix_self_minus_sftmix"]["heldout_nll"], ms["heldout_nll"] - m["sftmix"]["heldout_nll"])
    assert (Path(seed["self_run_dir"]) / "dynamics" / "self_split.json").exists()
    agree = seed["self_vs_step1_confidence"]
    assert -1 <= agree["spearman"] <= 1 and agree["n"] == 16 and 0 <= agree["split_agreement"] <= 1
    assert "One-run confidence vs step 1's" in md
    rc = seed["recipe_costs"]
    assert all(rc[r]["cpu_seconds"] > 0 for r in ("ntp", "sftmix", "sftmix_self"))
    sc = seed["stage_costs"]
    assert math.isclose(rc["sftmix"]["wall_seconds"],
                        sc["dynamics"]["wall_seconds"] + sc["train:sftmix"]["wall_seconds"], abs_tol=0.11)
    assert math.isclose(rc["sftmix_self_over_ntp"]["cpu_seconds"], rc["sftmix_self"]["cpu_seconds"]
                        / rc["ntp"]["cpu_seconds"])
    assert "## One-run SFTMix" in md and "## Cost per recipe" in md

    stages = res["cost"]["stage_commands_mean"]
    assert set(stages) >= {"dynamics", "train:ntp", "train:sftmix", "eval"}
    assert all(finite(v["cpu_seconds"]) and v["cpu_seconds"] > 0 and v["n_seeds"] == 1 for v in stages.values())

    for text in ("| held-out NLL |", "| PubMedQA 3-shot accuracy |", "## Per seed", "§3.2", "### Least confident",
                 "## Cost", "sftmix run --config"):
        assert text in md, text
    assert "[quality] seed 0 train:sftmix:" in first.stdout

    # rerun: every stage is skipped, the numbers are the same, the recorded costs are those of the first run
    second = run_quick(tmp_path)
    # all but the two reports, which are rewritten (4 stage commands of the seed's run, 2 of its one-run SFTMix run)
    assert second.stdout.count("(done already)") == 6, second.stdout
    again = json.loads((tmp_path / "results" / "quality_quick.json").read_text())
    assert again["aggregate"] == res["aggregate"] and again["seeds"][0]["stage_costs"] == seed["stage_costs"]


@needs_data
def test_heldout_split_does_not_depend_on_n_or_seed(tmp_path):
    q = load_quality()
    files = []
    for n in (16, 40):
        args = q.parse_args(["--quick", "--n_train", str(n), "--work_dir", str(tmp_path / f"w{n}")])
        data = q.prepare_data(args)
        files.append(data)
        assert data["n_train_file"] == n + 1
        held = {json.loads(line)["guid"] for line in Path(data["heldout_file"]).read_text().splitlines()}
        train = {json.loads(line)["guid"] for line in Path(data["train_file"]).read_text().splitlines()}
        assert len(held) == 8 and not held & train
    assert Path(files[0]["heldout_file"]).read_text() == Path(files[1]["heldout_file"]).read_text()
    small = Path(files[0]["train_file"]).read_text().splitlines()
    assert set(small) <= set(Path(files[1]["train_file"]).read_text().splitlines())  # larger N extends smaller N
    # an unchanged file is not rewritten (its mtime is part of the evaluation's reuse fingerprint)
    mtime = Path(files[0]["heldout_file"]).stat().st_mtime_ns
    q.prepare_data(q.parse_args(["--quick", "--n_train", "16", "--work_dir", str(tmp_path / "w16")]))
    assert Path(files[0]["heldout_file"]).stat().st_mtime_ns == mtime


def test_run_dir_ignores_settings_a_run_may_change(tmp_path):
    q = load_quality()
    args = q.parse_args(["--work_dir", str(tmp_path)])
    base = ["--config", "c.yaml", "--learning_rate", "0.0001"]
    d = q.run_dir_for(args, base, 0)
    assert d == q.run_dir_for(args, base + ["--num_threads", "1", "--disable_tqdm=true"], 0)
    assert d != q.run_dir_for(args, base + ["--max_length", "256"], 0) and d != q.run_dir_for(args, base, 1)
    assert d.parent.name.startswith("n104-e3-lr0.0001-")


def test_spread_kinds_and_config():
    q = load_quality()
    s = q.spread([1.0, 2.0, None, 4.0])
    assert s["n"] == 3 and math.isclose(s["mean"], 7 / 3) and math.isclose(s["std"], 1.5275252, rel_tol=1e-6)
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert q.spread([3.0])["std"] is None and q.spread([None])["mean"] is None
    assert q.instruction_kind("Rewrite the sentence in passive voice.\n\nThe cat ate.") == ("rewrite/edit/translate",
                                                                                            "rewrite")
    assert q.instruction_kind("What is the capital of France?")[0] == "question (wh-/yes-no)"
    assert q.instruction_kind("Zebras are striped.") == ("other", "zebras")
    from sftmix.config import parse_config

    cfg = parse_config(["--config", str(ROOT / "benchmarks" / "quality.yaml"), "--output_dir", "unused"])
    t = cfg.train
    assert (t.num_train_epochs, t.weight_decay, t.warmup_steps) == (3, 0.1, 0.1)
    assert (t.mixup_alpha, t.mixup_weight) == (0.5, 0.2)  # the paper's
    assert getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type) == "cosine"
    assert cfg.run.num_checkpoints == 5 and cfg.run.model == "smollm2"
    assert cfg.eval_args.num_shots == 3


# ------------------------------------------------------------------------------------ benchmarks/quality_parts.py

PARTS = ROOT / "benchmarks" / "quality_parts.py"


def load_parts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_parts_benchmark", PARTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(recipe, lr, seed, examples, pubmedqa=None, train_cost=10.0, step1_cost=None):
    costs = {"train": {"wall_seconds": train_cost, "cpu_seconds": 2 * train_cost}}
    if step1_cost is not None:
        costs["dynamics"] = {"wall_seconds": step1_cost, "cpu_seconds": 2 * step1_cost}
    return {"recipe": recipe, "label": recipe, "lr": lr, "seed": seed, "run_dir": "x", "examples": examples,
            "pubmedqa": pubmedqa, "train_loss": 1.0, "train_steps": 4, "costs": costs}


def test_paired_differences_bootstrap_and_counts():
    qp = load_parts()
    guids = [f"g{i}" for i in range(6)]
    tokens = [10, 20, 30, 40, 5, 60]
    # per example (seed 0 and seed 1) a - b: -0.1, -0.1, -0.1, -0.1, +0.2, 0 on average over the seeds
    d = {0: [-0.1, -0.2, 0.0, -0.1, 0.3, 0.0], 1: [-0.1, 0.0, -0.2, -0.1, 0.1, 0.0]}
    runs_b = [_run("ntp", 1e-4, s, {g: [2.0 + i / 10, t] for i, (g, t) in enumerate(zip(guids, tokens))},
                   pubmedqa={"1": True, "2": False, "3": True}) for s in (0, 1)]
    runs_a = [_run("sftmix", 1e-4, s, {g: [2.0 + i / 10 + d[s][i], t] for i, (g, t) in enumerate(zip(guids, tokens))},
                   pubmedqa={"1": True, "2": True, "3": False}) for s in (0, 1)]
    runs_a.append(_run("sftmix", 1e-4, 2, runs_a[0]["examples"]))  # a seed the baseline lacks is left out
    c = qp.paired(runs_a, runs_b, guids)
    assert c["seeds"] == [0, 1] and c["n_examples"] == 6
    mean_d = [sum(d[s][i] for s in (0, 1)) / 2 for i in range(6)]
    assert math.isclose(c["pooled_nll_example_mean"], sum(mean_d) / 6)
    assert math.isclose(c["pooled_nll"], sum(x * t for x, t in zip(mean_d, tokens)) / sum(tokens))
    assert (c["examples_lower"], c["examples_higher"]) == (4, 1)  # the tie counts neither way
    s0 = c["per_seed"][0]
    assert (s0["examples_lower"], s0["examples_higher"]) == (3, 1)
    assert math.isclose(s0["nll"], sum(x * t for x, t in zip(d[0], tokens)) / sum(tokens), abs_tol=1e-12)
    assert s0["pubmedqa"] == {"accuracy": 0.0, "n": 3, "only_first_right": 1, "only_second_right": 1}
    assert math.isclose(c["nll"]["mean"], statistics.fmean(x["nll"] for x in c["per_seed"]))
    for key in ("pooled_nll", "pooled_nll_example_mean"):
        lo, hi = c[f"{key}_ci95"]
        assert min(mean_d) - 1e-9 <= lo < c[key] < hi <= max(mean_d) + 1e-9, (key, lo, c[key], hi)
    assert c["pooled_nll_ci95"] == qp.paired(runs_a, runs_b, guids)["pooled_nll_ci95"]  # a fixed bootstrap seed
    # a constant difference has a zero-width interval
    shifted = [_run("sftmix", 1e-4, s, {g: [v - 0.05, t] for g, (v, t) in r["examples"].items()})
               for s, r in zip((0, 1), runs_b)]
    c = qp.paired(shifted, runs_b, guids)
    assert all(math.isclose(x, -0.05) for x in (c["pooled_nll"], *c["pooled_nll_ci95"]))
    assert qp.paired(shifted, [], guids) is None


def test_learning_rate_choice_on_validation_only():
    qp = load_parts()
    val = ["v1", "v2"]
    lrs = [5e-5, 1e-4, 2e-4]
    # validation picks 2e-4 for NTP although the held-out set would pick 5e-5; the token weights decide for NEFTune
    grid = [_run("ntp", lr, 0, {"v1": [v, 10], "v2": [v, 10], "t1": [t, 5]})
            for lr, v, t in ((5e-5, 2.0, 1.0), (1e-4, 1.9, 3.0), (2e-4, 1.8, 3.0))]
    grid += [_run("ntp_neftune", 5e-5, 0, {"v1": [1.0, 1], "v2": [3.0, 99]}),  # token-weighted 2.98, mean 2.0
             _run("ntp_neftune", 1e-4, 0, {"v1": [2.5, 1], "v2": [2.5, 99]}),  # 2.5 and 2.5
             _run("ntp_neftune", 2e-4, 0, {"v1": [2.6, 1], "v2": [2.6, 99]})]
    grid += [_run("sftmix", lr, 0, {"v1": [1.0, 1]}) for lr in lrs[:2]]  # one rate missing: no choice yet
    # a diverged rate (NaN) is never chosen, even first in the grid
    grid += [_run("sftmix_self", lr, 0, {"v1": [v, 1]}) for lr, v in zip(lrs, (math.nan, 3.0, 2.0))]
    choice = qp.chosen_lrs(grid, val, lrs)
    assert choice["ntp"] == 2e-4 and choice["ntp_neftune"] == 1e-4 and choice["sftmix_self"] == 2e-4
    assert choice["sftmix"] is None and choice["sftmix_self_neftune"] is None


def _write_part(qp, args, name, runs, complete=True):
    """A part file as run_part writes it, with the given run records."""
    part = {"part": name, "settings": qp.settings(args), "complete": complete, "cpu_seconds": 12.0,
            "wall_seconds": 7.0, "invocations": 1, "updated": "now",
            "runs": {qp.run_key(r["recipe"], r["lr"], r["seed"]): r for r in runs}}
    args.parts_dir.mkdir(parents=True, exist_ok=True)
    (args.parts_dir / f"{name}.json").write_text(json.dumps(part))


def _quick_args(qp, tmp_path, *more):
    return qp.parse_args(["merge", "--quick", "--work_dir", str(tmp_path / "work"), "--results_dir",
                          str(tmp_path / "results"), *more])


@needs_data
def test_merge_builds_tables_from_the_parts_present(tmp_path):
    qp = load_parts()
    args = _quick_args(qp, tmp_path)
    data = qp.prepare(args)
    val, test = data["val_guids"], data["test_guids"]
    assert len(val) == 8 and len(test) == 8 and not set(val) & set(test)
    train = {json.loads(line)["guid"] for line in Path(data["train_file"]).read_text().splitlines()}
    assert not train & (set(val) | set(test))
    assert Path(data["eval_file"]).read_text().count("\n") == 16

    def examples(v_nll, t_nll):
        return {**{g: [v_nll, 10] for g in val}, **{g: [t_nll, 10] for g in test}}

    offset = {"ntp": 0.0, "ntp_neftune": -0.01, "sftmix": -0.03, "sftmix_self": -0.02, "sftmix_self_neftune": -0.04}
    best = {"ntp": 3e-3, "ntp_neftune": 1e-3, "sftmix": 3e-3, "sftmix_self": 1e-3, "sftmix_self_neftune": 3e-3}

    for name, recipes in qp.GRID_PARTS.items():
        _write_part(qp, args, name, [_run(r, lr, 0, examples(2.0 - 0.1 * (lr == best[r]), 2.0 + offset[r]),
                          step1_cost=5.0 if r == "sftmix" else None) for r in recipes for lr in args.lrs])
    for s in (0, 1):
        runs = [_run(r, best[r], s, examples(1.9, 2.0 + offset[r] + 0.001 * s), pubmedqa={"a": s == 0, "b": True},
                     step1_cost=5.0 if r == "sftmix" and s == 1 else None) for r in qp.RECIPES]
        runs.append(_run("sftmix", 1e-3, s, {}))  # a run at another rate is not reported
        _write_part(qp, args, f"seed-{s}", runs, complete=s == 0)
    res = qp.merge(args)

    assert res["missing_parts"] == ["variants"] and res["unfinished_parts"] == ["seed-1"]
    assert res["chosen_lr"] == best
    assert math.isclose(res["lr_grid"]["ntp"]["0.003"]["nll"], 1.9)
    for r, t in res["recipes"].items():
        assert t["seeds"] == [0, 1] and math.isclose(t["nll"]["mean"], 2.0 + offset[r] + 0.0005)
        assert math.isclose(t["pubmedqa_accuracy"]["mean"], 0.75)
    # two-run SFTMix's cost includes step 1 (5 s wall), found in the grid for seed 0 and in seed-1's own run
    assert res["recipes"]["sftmix"]["cost_wall_seconds"]["mean"] == 15.0
    assert res["recipes"]["ntp"]["cost_cpu_seconds"]["mean"] == 20.0
    assert set(res["comparisons"]) == {f"{r}-ntp" for r in qp.RECIPES if r != "ntp"} | {
        f"{r}-ntp_neftune" for r in ("sftmix", "sftmix_self", "sftmix_self_neftune")}
    c = res["comparisons"]["sftmix-ntp_neftune"]
    assert math.isclose(c["pooled_nll"], -0.02) and c["examples_lower"] == 8 and c["examples_higher"] == 0
    assert res["variants"]["self_checkpoints"]["minus_default"] is None
    # the grid's seed, each recipe against NTP at the same rate, on the held-out set
    same = res["grid_heldout_minus_ntp_same_rate"]
    assert set(same) == {"0.001", "0.003"} and set(same["0.003"]) == set(qp.RECIPES) - {"ntp"}
    assert math.isclose(same["0.003"]["sftmix"]["pooled_nll"], offset["sftmix"])
    md = (tmp_path / "results" / "quality_parts_quick.md").read_text()
    for text in ("**Missing parts: variants**", "**Unfinished: seed-1.**", "| NTP + NEFTune (alpha 5) |",
                 "| two-run SFTMix − NTP + NEFTune (alpha 5) | 0,1 |", "| variants | missing |"):
        assert text in md, text

    # runtime overrides (threads) do not block a merge; a part written with other settings is refused, naming the
    # file and the setting
    assert qp.read_part(_quick_args(qp, tmp_path, "--", "--num_threads", "2"), "seed-0")["runs"]
    other = _quick_args(qp, tmp_path, "--n_val", "6")
    with pytest.raises(qp.SFTMixError, match=r"seed-0\.json: written with other settings \(n_val: 8 there, 6 here"):
        qp.read_part(other, "seed-0")


@needs_data
def test_a_seed_part_needs_the_grid_parts_first(tmp_path):
    proc = subprocess.run([sys.executable, str(PARTS), "part", "seed-1", "--quick", "--work_dir", str(tmp_path / "w"),
                           "--results_dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("quality_parts: error: part seed-1: the rates are chosen by the grid parts; run "
                                "grid-ntp, grid-sftmix, grid-self first"), proc.stderr[-2000:]


@needs_data
def test_quick_part_records_every_run_and_resumes(tmp_path):
    """`part grid-ntp --quick` with one rate: both runs recorded with per-example NLL on validation + held-out and
    their costs; a part killed after its first run (its file holds one run) resumes with the second only."""
    qp = load_parts()
    argv = ["part", "grid-ntp", "--quick", "--lrs", "0.003", "--work_dir", str(tmp_path / "w"), "--results_dir",
            str(tmp_path / "r")]

    def run():
        proc = subprocess.run([sys.executable, str(PARTS), *argv], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run()
    args = qp.parse_args(argv)
    path = args.parts_dir / "grid-ntp.json"
    part = json.loads(path.read_text())
    assert part["complete"] and part["settings"] == qp.settings(args) and part["invocations"] == 1
    assert sorted(part["runs"]) == ["ntp_neftune|0.003|0", "ntp|0.003|0"]
    data = qp.prepare(args)
    for key, r in part["runs"].items():
        assert sorted(r["examples"]) == sorted(data["val_guids"] + data["test_guids"])
        assert all(finite(m) and m > 0 and t > 0 for m, t in r["examples"].values())
        assert r["pubmedqa"] is None and r["costs"]["train"]["cpu_seconds"] > 0 and finite(r["train_loss"])
    config = (Path(part["runs"]["ntp_neftune|0.003|0"]["run_dir"]) / "config.yaml").read_text()
    assert "neftune_noise_alpha: 5.0" in config
    assert "neftune" not in (Path(part["runs"]["ntp|0.003|0"]["run_dir"]) / "config.yaml").read_text()
    # NEFTune changed the training: not the same model
    assert part["runs"]["ntp|0.003|0"]["examples"] != part["runs"]["ntp_neftune|0.003|0"]["examples"]
    assert part["cpu_seconds"] > 0

    # as if killed after the first run: the second is done again from its run directory (every stage done already)
    first = part["runs"].pop("ntp_neftune|0.003|0")
    part["complete"] = False
    path.write_text(json.dumps(part))
    out = run()
    assert "1 recorded already" in out and "[quality] ntp lr" not in out
    assert out.count("(done already)") == 2  # ntp_neftune's train and eval
    again = json.loads(path.read_text())
    assert again["complete"] and again["invocations"] == 2 and len(again["runs"]) == 2
    assert again["runs"]["ntp_neftune|0.003|0"]["examples"] == first["examples"]
    assert again["runs"]["ntp_neftune|0.003|0"]["costs"] == first["costs"]  # the first run's costs are kept


@needs_data
def test_the_grid_can_grow_and_an_edge_choice_is_flagged(tmp_path):
    """A grid part written with rates 1e-3 3e-3 is read under the grid 1e-3 3e-3 1e-2 (its runs kept), is no longer
    complete and plans only the new rate; a rate chosen at the grid's edge is flagged in the merge."""
    qp = load_parts()
    small = _quick_args(qp, tmp_path, "--lrs", "0.001", "0.003")
    data = qp.prepare(small)
    val = data["val_guids"]
    runs = {qp.run_key(r, lr, 0): _run(r, lr, 0, {g: [2.0 - (lr == 1e-3) * 0.1, 10] for g in val})
            for r in qp.GRID_PARTS["grid-ntp"] for lr in small.lrs}
    _write_part(qp, small, "grid-ntp", runs.values())
    assert qp.is_complete(small, "grid-ntp", qp.read_part(small, "grid-ntp"), data)

    grown = _quick_args(qp, tmp_path, "--lrs", "0.001", "0.003", "0.01")
    part = qp.read_part(grown, "grid-ntp")
    assert part["runs"] == runs and not qp.is_complete(grown, "grid-ntp", part, data)
    todo = [x for x in qp.part_plan(grown, "grid-ntp", data) if qp.run_key(*x[:3]) not in part["runs"]]
    assert todo == [("ntp", 0.01, 0, False), ("ntp_neftune", 0.01, 0, False)]
    # other settings are still refused
    with pytest.raises(qp.SFTMixError, match=r"grid-ntp\.json: written with other settings \(n_val: 8 there, 6"):
        qp.read_part(_quick_args(qp, tmp_path, "--lrs", "0.001", "--n_val", "6"), "grid-ntp")

    choice = qp.chosen_lrs(list(runs.values()), val, small.lrs)
    assert choice["ntp"] == 1e-3 and qp.at_grid_edge(choice, small.lrs) == {"ntp": 1e-3, "ntp_neftune": 1e-3}
    assert qp.at_grid_edge({"ntp": 3e-3, "sftmix": None}, [1e-3, 3e-3, 1e-2]) == {}
    res = qp.merge(small)
    assert res["lr_at_grid_edge"] == {"ntp": 1e-3, "ntp_neftune": 1e-3}
    md = (tmp_path / "results" / "quality_parts_quick.md").read_text()
    assert "**Chosen at the edge of the grid**" in md and "NTP 0.001, NTP + NEFTune (alpha 5) 0.001." in md
