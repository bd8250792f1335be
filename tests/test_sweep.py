"""`sftmix sweep` and the ablation configs: every config parses (paper scale and with the tiny CPU overrides) and sets
its option; a tiny sweep over two ablations merges into one table; the table's layout; LoRA through the CLI trains
only the adapters; nearest pairing gets the reference's hidden states by guid."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sftmix.cli import main
from sftmix.config import parse_config
from sftmix.run.sweep import merge, run_argv
from sftmix.utils import SFTMixError, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
TINY = ABLATIONS / "overrides" / "tiny_cpu.yaml"

# what each ablation config must set: (config part, field, value)
EXPECTED = {
    "baseline": [("run", "recipes", ["ntp", "sftmix"]), ("train", "mixup_weight", 0.2)],
    "mixup_as_loss": [("train", "mixup_role", "loss")],
    "mixup_only": [("train", "mixup_role", "only")],
    "ntp_confident": [("train", "ntp_subset", "confident"), ("train", "mixup_weight", 0.0)],
    "ntp_confident_mixup": [("train", "ntp_subset", "confident"), ("train", "mixup_weight", 0.2)],
    "ntp_unconfident": [("train", "ntp_subset", "unconfident"), ("train", "mixup_weight", 0.0)],
    "ntp_unconfident_mixup": [("train", "ntp_subset", "unconfident"), ("train", "mixup_weight", 0.2)],
    "split_quality": [("train", "split_source", "column"), ("train", "split_column", "quality"),
                      ("train", "split_confident_values", ["High"])],
    "select_long": [("train", "selection", "long"), ("run", "recipes", ["ntp", "sftmix"])],
    "select_score": [("train", "selection", "score"), ("train", "selection_threshold", 4.5),
                     ("run", "recipes", ["ntp", "sftmix"])],
    "select_random": [("train", "selection", "random"), ("run", "recipes", ["ntp", "sftmix"])],
    "lora": [("run", "use_peft", True), ("run", "recipes", ["ntp", "sftmix"])],
    "weak_reference": [("run", "reference_model", "google/gemma-2-2b")],
    "pairing_nearest": [("train", "pairing", "nearest")],
    "mixup_weight_warmup": [("train", "mixup_weight_schedule", "linear_warmup")],
}
CONFIGS = sorted(ABLATIONS.glob("*.yaml"))


def test_every_ablation_config_has_an_expectation():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_ablation_config_parses_and_sets_its_option(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first == (f"# accelerate launch --config_file configs/accelerate/fsdp.yaml -m sftmix.cli run --config "
                     f"configs/ablations/{path.name} --output_dir runs/ablations/{path.stem}")
    assert (ROOT / "configs" / "accelerate" / "fsdp.yaml").is_file()
    paper = parse_config(run_argv(path, tmp_path / "paper"))
    tiny = parse_config(run_argv(path, tmp_path / "tiny", overrides=TINY))
    for cfg in (paper, tiny):
        for part, name, value in EXPECTED[path.stem]:
            if path.stem == "weak_reference" and cfg is tiny and name == "reference_model":
                value = "tiny-random:1"  # the overrides replace a config's own reference only
            assert getattr(getattr(cfg, part), name) == value, (part, name)
    assert paper.run.model == "meta-llama/Llama-3.1-8B" and paper.train.num_train_epochs == 3
    assert paper.train.seed == 42 and paper.run.heldout == 1000  # as configs/llama3.1-8b_alpaca.yaml
    assert paper.train.learning_rate == (1e-4 if path.stem == "lora" else 2e-6)
    assert tiny.run.model == "tiny-random:0" and tiny.train.learning_rate == 1e-3
    assert tiny.run.reference_model == ("tiny-random:1" if path.stem == "weak_reference" else None)
    assert Path(tiny.run.data).is_file() and tiny.run.data.endswith("smoke_labeled.jsonl")


def test_sweep_errors_are_one_line(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            main(["sweep", *argv])
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    base = str(ABLATIONS / "baseline.yaml")
    msg = error([base, "--output_dir", str(tmp_path), "--mixup_wieght", "0.3"])
    assert msg.startswith("sftmix: error: sweep: ") and "baseline.yaml" in msg and "mixup_weight" in msg
    msg = error([base, "--output_dir", str(tmp_path), "--overrides", str(TINY), str(ABLATIONS / "lora.yaml")])
    assert "lora.yaml comes after an option" in msg
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "baseline.yaml").write_text((ABLATIONS / "baseline.yaml").read_text())
    assert "several configs are named baseline" in error([base, str(tmp_path / "x" / "baseline.yaml"),
                                                          "--output_dir", str(tmp_path)])
    assert "holds no runs" in error(["--merge_only", "--output_dir", str(tmp_path / "empty")])
    assert not list(tmp_path.glob("*/config.yaml"))  # nothing ran


@pytest.mark.slow
def test_tiny_sweep_over_two_ablations_merges_one_table(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sftmix", "sweep", str(ABLATIONS / "baseline.yaml"),
                           str(ABLATIONS / "pairing_nearest.yaml"), "--output_dir", str(out), "--overrides", str(TINY)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    rows = {(r["variant"], r["recipe"]): r for r in summary["rows"]}
    assert list(rows) == [("baseline", "ntp"), ("baseline", "sftmix"), ("pairing_nearest", "sftmix")]
    assert [r["baseline"] for r in rows.values()] == [True, False, False]
    assert rows[("pairing_nearest", "sftmix")]["changes"] == "pairing=nearest"
    for r in rows.values():
        assert math.isfinite(r["metrics"]["heldout_nll"]) and math.isfinite(r["metrics"]["heldout_ppl"])
        assert math.isfinite(r["delta_nll_vs_baseline"]) and r["n_train_examples"] == 40
    # the variants really trained differently, and better than the untrained start
    nll = [r["metrics"]["heldout_nll"] for r in rows.values()]
    assert len(set(nll)) == 3 and max(nll) < summary["start_rows"][0]["metrics"]["heldout_nll"]
    # step 1 ran once: the second run reused the first one's split, confidence and start evaluation
    run = {r["stem"]: r for r in summary["runs"]}["pairing_nearest"]
    assert run["shared_from"] == "baseline" and run["shared"] == ["data", "step 1", "start eval"]
    timings = json.loads((out / "pairing_nearest" / "timings.json").read_text())
    assert "dynamics" not in timings and "train:sftmix" in timings
    assert (out / "pairing_nearest" / "confidence.jsonl").read_bytes() == (out / "baseline" /
                                                                           "confidence.jsonl").read_bytes()
    md = (out / "sweep.md").read_text()
    assert "| baseline · NTP (baseline) |" in md and "| pairing_nearest · SFTMix | pairing=nearest |" in md
    assert "Sweep (" in proc.stdout
    # merging again from what the directory holds gives the same rows
    again = merge(out)
    assert [(r["label"], r["metrics"]) for r in again["rows"]] == [(r["label"], r["metrics"]) for r in rows.values()]


def _report(tmp_path, stem, config, rows):
    d = tmp_path / stem
    d.mkdir(parents=True)
    comparison = [{"model": m, "label": {"start": "start (untrained)", "ntp": "NTP", "sftmix": "SFTMix"}[m],
                   "n_examples": 8, "train_seconds": 1.0, **metrics} for m, metrics in rows.items()]
    models = {m: {"train": {"n_train_examples": 40, "global_step": 10, "duplicates_per_epoch": 0}} for m in rows
              if m != "start"}
    (d / "report.json").write_text(json.dumps({"config": config, "comparison": comparison, "models": models}))


def test_merge_layout_metrics_baseline_and_missing_runs(tmp_path):
    base_cfg = {"model": "m", "mixup_role": "regularizer", "selection": "none", "output_dir": "x"}
    _report(tmp_path, "base", base_cfg, {
        "start": {"heldout_nll": 3.0, "heldout_ppl": 20.1},
        "ntp": {"heldout_nll": 2.0, "heldout_ppl": 7.4, "pubmedqa_accuracy": 0.5, "mtbench_score": 5.0},
        "sftmix": {"heldout_nll": 1.9, "heldout_ppl": 6.7, "pubmedqa_accuracy": 0.6, "mtbench_score": 5.5}})
    _report(tmp_path, "loss", {**base_cfg, "mixup_role": "loss", "output_dir": "y"},
            {"sftmix": {"heldout_nll": 2.1, "heldout_ppl": 8.2, "pubmedqa_accuracy": 0.55}})
    _report(tmp_path, "long", {**base_cfg, "selection": "long", "output_dir": "z"},
            {"ntp": {"heldout_nll": 2.2, "heldout_ppl": 9.0}})
    runs = [{"stem": s, "run_dir": str(tmp_path / s), "returncode": 0, "status": "ok"}
            for s in ("base", "loss", "long")]
    runs.append({"stem": "broken", "run_dir": str(tmp_path / "broken"), "returncode": 1, "status": "failed (exit 1)"})

    s = merge(tmp_path, runs=runs)
    assert s["columns"] == ["heldout_nll", "heldout_ppl", "mtbench_score", "pubmedqa_accuracy"]
    assert [r["label"] for r in s["rows"]] == ["base · NTP", "base · SFTMix", "loss · SFTMix", "long · NTP"]
    assert s["baseline"] == "base · NTP" and s["rows"][0]["baseline"]
    assert [round(r["delta_nll_vs_baseline"], 6) for r in s["rows"]] == [0.0, -0.1, 0.1, 0.2]
    # NTP rows do not list Mixup settings; a selection shows for both recipes
    assert [r["changes"] for r in s["rows"]] == ["–", "–", "mixup_role=loss", "selection=long"]
    assert [m["stem"] for m in s["missing"]] == ["broken"]
    md = (tmp_path / "sweep.md").read_text()
    assert "| base · NTP (baseline) | – | 2.0000 | – | 7.4000 | 5.0000 | 0.5000 | 40 | 10 | 0 | 1.0 |" in md
    assert "| loss · SFTMix | mixup_role=loss | 2.1000 | +0.1000 | 8.2000 | – | 0.5500 |" in md
    assert "broken (failed (exit 1))" in md and "mtbench score, pubmedqa accuracy: higher is better" in md
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"][2]["changes"] == "mixup_role=loss"

    s = merge(tmp_path, baseline="base:sftmix")  # --merge_only: the runs come from the previous sweep.json
    assert s["baseline"] == "base · SFTMix" and [m["stem"] for m in s["missing"]] == ["broken"]
    assert round(s["rows"][0]["delta_nll_vs_baseline"], 6) == 0.1
    with pytest.raises(SFTMixError, match="matches no row"):
        merge(tmp_path, baseline="nothing")


def test_lora_through_the_cli_trains_only_adapter_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from sftmix import recipe
    from sftmix.models import load_model_and_tokenizer

    out = tmp_path / "lora"
    # SFTMix with LoRA on a known quality split (no step 1 needed), a few steps
    argv = run_argv(ABLATIONS / "lora.yaml", out, overrides=TINY) + [
        "--recipes", "sftmix", "--split_source", "column", "--split_column", "quality", "--split_confident_values",
        "High", "--max_steps", "3", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--disable_tqdm",
        "true"]
    cfg = parse_config(argv)
    try:
        assert recipe.run(cfg, "train") == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    result = json.loads((out / "sftmix" / "train_result.json").read_text())
    start = load_model_and_tokenizer("tiny-random:0", device="cpu")[0].state_dict()
    targets = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in ("q", "v")]
    # per adapted [out, in] weight: A is r x in, B is out x r (r = 4)
    assert result["use_peft"] and result["trainable_parameters"] == sum(4 * sum(start[k].shape) for k in targets)
    assert max(h.get("mixup_loss", 0) for h in result["log_history"]) > 0  # Mixup ran through the PEFT model
    adapter = load_file(out / "sftmix" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)

    merged = load_file(out / "sftmix" / "model" / "model.safetensors")
    assert set(merged) <= set(start) and "model.layers.0.self_attn.q_proj.weight" in merged
    changed = sorted(k for k in merged if not torch.equal(merged[k], start[k]))
    assert changed == targets


def test_nearest_pairing_gets_the_reference_hidden_states_by_guid(tmp_path):
    from datasets import Dataset

    from sftmix.run.examples import with_split as _with_split

    guids = [f"g{i}" for i in range(6)]
    write_jsonl(tmp_path / "confidence.jsonl",
                [{"guid": g, "confidence": -float(i), "confident": i < 3} for i, g in enumerate(guids)])
    hidden = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    order = [3, 0, 5, 1, 4, 2]  # the scoring order differs from the training order
    (tmp_path / "dynamics").mkdir()
    np.savez(tmp_path / "dynamics" / "hidden_final.npz", hidden=hidden[order], guid=np.array([guids[i] for i in order]))
    cfg = SimpleNamespace(run_dir=tmp_path, train=SimpleNamespace(split_source="dynamics", pairing="nearest"))
    ds = _with_split(cfg, Dataset.from_dict({"guid": guids[::-1], "input_ids": [[1, 2]] * 6}))
    assert ds["confident"] == [False, False, False, True, True, True]
    assert np.array_equal(np.asarray(ds["pairing_embedding"], dtype=np.float32), hidden[::-1])

    cfg.train.pairing = "random"
    assert "pairing_embedding" not in _with_split(cfg, Dataset.from_dict({"guid": guids})).column_names
    cfg.train.pairing = "nearest"
    os.remove(tmp_path / "dynamics" / "hidden_final.npz")
    with pytest.raises(SFTMixError, match="hidden_final.npz"):
        _with_split(cfg, Dataset.from_dict({"guid": guids}))
