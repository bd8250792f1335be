"""What a reader of the report looks at first: the answers of every model to a fixed held-out sample (the evaluation
task `answers`: greedy, capped, stored and reused), the loss curves (NTP and Mixup per step, the one-run switch) and
the step-1 plots on log axes (perplexity is heavy-tailed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from sftmix.config import EvalConfig, parse_config
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import write_jsonl

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def _heldout(path: Path, n: int = 6) -> Path:
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)]
    rows.append({"prompt": "Question 0?", "completion": "Another answer."})  # a prompt asked twice
    write_jsonl(path, rows)
    return path


def test_answers_task_is_a_fixed_greedy_capped_sample_stored_and_reused(tmp_path, monkeypatch):
    import sftmix.eval.generation as generation
    from sftmix.eval.evaluate import run_eval

    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    heldout = _heldout(tmp_path / "heldout.jsonl")
    cfg = EvalConfig(heldout_file=str(heldout), answers=4, answers_max_new_tokens=5)
    res = run_eval(model, tok, cfg, tmp_path / "eval")
    a = res["answers"]
    stored = json.loads((tmp_path / "eval" / "answers.json").read_text())
    assert stored["items"] == a["items"] and a["n"] == 4 and a["n_heldout"] == 7 and a["decoding"] == "greedy"
    guids = [it["guid"] for it in a["items"]]
    assert guids == sorted(guids)  # the first n by guid: every model and rerun answers the same prompts
    assert len({json.dumps(it["prompt"]) for it in a["items"]}) == 4  # distinct prompts
    assert all(it["n_tokens"] <= 5 for it in a["items"]) and a["n_cut"] == sum(not it["finished"] for it in a["items"])
    # greedy: another model instance with the same weights gives the same answers
    again = generation.heldout_answers(build_tiny_model(tok, seed=0), tok, json_rows(heldout), 4, 5)
    assert [it["answer"] for it in again["items"]] == [it["answer"] for it in a["items"]]
    # stored and fingerprinted as an evaluation task: reused as long as its settings are unchanged
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("regenerated a finished task"))
    assert run_eval(model, tok, cfg, tmp_path / "eval")["answers"]["items"] == a["items"]
    monkeypatch.undo()
    longer = run_eval(model, tok, EvalConfig(heldout_file=str(heldout), answers=4, answers_max_new_tokens=9),
                      tmp_path / "eval")["answers"]
    assert longer["max_new_tokens"] == 9
    assert "answers" not in run_eval(model, tok, EvalConfig(heldout_file=str(heldout), answers=0), tmp_path / "e2")


def json_rows(path: Path) -> list[dict]:
    from sftmix.data import load_records

    return load_records(str(path))


def test_loss_curves_and_the_one_run_switch_in_the_report(tmp_path):
    from sftmix.report.report import collect, render_html, render_markdown

    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path)])
    hist = [{"loss": 3.0, "ntp_loss": 2.5, "step": 5}, {"loss": 2.0, "ntp_loss": 1.8, "mixup_loss": 1.5, "step": 10},
            {"train_runtime": 1.0, "step": 10}]
    for name, h in (("sftmix", hist), ("ntp", [{"loss": 2.6, "ntp_loss": 2.6, "step": 5}]),
                    ("reference", [{"loss": 2.7, "ntp_loss": 2.7, "step": 5}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_result.json").write_text(json.dumps(
            {"metrics": {}, "global_step": 10, "log_history": h}))
    (tmp_path / "dynamics").mkdir()
    (tmp_path / "dynamics" / "self_split.json").write_text(json.dumps({"confidence_source": "self", "steps": 5}))
    summary = collect(cfg)
    runs = summary["curves"]["runs"]
    assert runs["SFTMix"] == {"ntp_loss": [(5, 2.5), (10, 1.8)], "mixup_loss": [(10, 1.5)]}
    assert runs["NTP"]["ntp_loss"] == [(5, 2.6)] and runs["reference (step 1)"]["ntp_loss"] == [(5, 2.7)]
    assert summary["curves"]["switch_step"] == 5 and (tmp_path / "plots" / "loss_curves.png").stat().st_size > 1000
    md = render_markdown(summary)
    assert "## Training curves" in md and "![loss_curves.png](plots/loss_curves.png)" in md and "step 5" in md
    html = render_html(summary, tmp_path)
    assert "<h2>Training curves</h2>" in html and 'alt="NTP (solid) and Mixup (dashed) loss' in html


def _axes_of(monkeypatch):
    import sftmix.report.plots as plots

    seen = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (seen.append(fig.axes[0]), real(fig, path))[1])
    return seen


def test_step1_plots_show_the_bulk_on_log_axes(tmp_path, monkeypatch):
    from sftmix.report.plots import plot_confidence_histogram, plot_data_map

    seen = _axes_of(monkeypatch)
    rng = np.random.default_rng(0)
    ppl = np.exp(rng.normal(1.5, 0.5, 200))
    ppl[:3] = [75.0, 60.0, 400.0]  # a few outliers, as on the demo
    var = ppl * rng.uniform(0.05, 0.5, 200)
    var[5] = 0.0  # a PPL that never moved: kept on the log axis, not dropped
    confident = ppl < np.median(ppl)
    plot_data_map(-ppl, var, confident, tmp_path / "map.png")
    plot_confidence_histogram(-ppl, confident, tmp_path / "hist.png")
    dmap, hist = seen
    assert dmap.get_xscale() == dmap.get_yscale() == "log" and hist.get_xscale() == "log"
    assert sum(len(c.get_offsets()) for c in dmap.collections) == 200  # every point drawn
    lo, hi = sorted(dmap.get_ylim())
    assert lo <= ppl.min() and hi >= 400  # the outliers are on the map, the bulk is not squeezed into a corner
    assert np.log(np.median(ppl) / lo) / np.log(hi / lo) > 0.2  # the median sits away from the axis's edge


@pytest.mark.slow
def test_smoke_report_has_curves_readable_map_and_answers_of_every_model(tmp_path):
    from sftmix.recipe import run

    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path / "run")])
    assert run(cfg, "run") == 0
    d = tmp_path / "run"
    report = json.loads((d / "report.json").read_text())
    assert set(report["answers"]) == {"start", "ntp", "sftmix"}
    assert set(report["curves"]["runs"]) == {"reference (step 1)", "NTP", "SFTMix"}
    html = (d / "report.html").read_text()
    assert "<h2>Answers to held-out prompts</h2>" in html and "<th>SFTMix</th>" in html and "<script" not in html
    prompt = report["answers"]["sftmix"]["items"][0]["prompt"][0]["content"]
    assert prompt.split()[0] in html
    md = (d / "report.md").read_text()
    assert "| prompt | reference answer | start (untrained) | NTP | SFTMix |" in md
