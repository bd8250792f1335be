"""benchmarks/quality.py: the --quick run (tiny random model) writes the JSON and markdown results with finite numbers,
resumes without redoing a stage, and keeps the held-out split fixed across N."""

import importlib.util
import json
import math
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
    from sftmix.cli import parse_config

    cfg = parse_config(["--config", str(ROOT / "benchmarks" / "quality.yaml"), "--output_dir", "unused"])
    t = cfg.train
    assert (t.num_train_epochs, t.weight_decay, t.warmup_steps) == (3, 0.1, 0.1)
    assert (t.mixup_alpha, t.mixup_weight) == (0.5, 0.2)  # the paper's
    assert getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type) == "cosine"
    assert cfg.run.num_checkpoints == 5 and cfg.run.model == "smollm2"
    assert cfg.eval_args.num_shots == 3
