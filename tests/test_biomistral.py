"""The biomistral multiple-choice protocol (issue 24): BioMistral's prompt reproduced, a shot set per question drawn
per round, rounds as mean +- sd, a killed evaluation resuming at its round.

    OMP_NUM_THREADS=1 pytest tests/test_biomistral.py

The prompt fixtures under tests/fixtures/biomistral/ were rendered by BioMistral's own getPrompt (its
Data/Evaluation/BioInstructQA.py at commit 4d1fa85), see tests/fixtures/biomistral/record.py.
"""

import json
import random
import statistics
from pathlib import Path

import pytest

from sftmix.config import EvalConfig
from sftmix.eval.tasks import MCItem, build_biomistral_prompt, load_mc
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl

FIX = Path(__file__).resolve().parent / "fixtures" / "biomistral"


def _item(q: dict, answer_letter: str | None, i: int) -> MCItem:
    options = tuple(q["options"].values())
    letters = list(q["options"])
    return MCItem(f"q{i}", "unused", letters, letters.index(answer_letter) if answer_letter else 0, q["question"],
                  options, q["context"])


@pytest.mark.parametrize("name", ["medqa_3shot", "pubmedqa_3shot"])
def test_biomistral_prompt_equals_the_one_biomistrals_code_renders(name):
    case = next(c for c in json.loads((FIX / "inputs.json").read_text()) if c["name"] == name)
    shots = [_item(s, s["correct_answer_letter"], i) for i, s in enumerate(case["shots"])]
    prompt, conts = build_biomistral_prompt(_item(case["question"], None, 99), shots)
    assert prompt == (FIX / f"{name}.txt").read_text(encoding="utf-8")
    assert conts == list(case["question"]["options"])  # the letter that follows "**Answer:**("


def test_pubmedqa_loader_keeps_the_parts_biomistral_renders(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"123": {"QUESTION": " Does X help? ", "CONTEXTS": ["First part.", "Second part."],
                                        "final_decision": "maybe"}}))
    it = load_mc("pubmedqa", str(path))[0]
    assert (it.question, it.options, it.context, it.answer) == ("Does X help?", ("yes", "no", "maybe"),
                                                                "First part. Second part.", 2)
    prompt, conts = build_biomistral_prompt(it, [])
    assert prompt.endswith("First part. Second part. \n **Question:** Does X help? \n (A) yes \n (B) no \n "
                           "(C) maybe \n **Answer:**(") and conts == ["A", "B", "C"]


def _pubmedqa(path, n=16):
    rng = random.Random(0)
    path.write_text(json.dumps({str(10_000 + i): {
        "QUESTION": f"Does treatment {i} work?", "CONTEXTS": [f"Study {i} of {rng.randint(5, 500)} patients."],
        "final_decision": ["yes", "no", "maybe"][i % 3]} for i in range(n)}))
    return path


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=0), tok


def _cfg(path, **kw):
    return EvalConfig(pubmedqa_file=str(path), mc_protocol="biomistral", num_shots=3, seed=5, batch_size=4, **kw)


def test_rounds_draw_other_shot_sets_and_report_mean_and_sd(tiny, tmp_path):
    from sftmix.eval.evaluate import run_eval

    model, tok = tiny
    res = run_eval(model, tok, _cfg(_pubmedqa(tmp_path / "p.json")), tmp_path / "eval")["pubmedqa"]
    assert res["n_rounds"] == 3 and res["seeds"] == [5, 6, 7] and res["n"] == 16  # leave-one-out: all evaluated
    accs = [r["accuracy"] for r in res["rounds"]]
    assert res["accuracies"] == accs
    assert res["accuracy"] == pytest.approx(statistics.fmean(accs))
    assert res["accuracy_sd"] == pytest.approx(statistics.pstdev(accs))
    shots = [{p["id"]: tuple(p["shot_ids"]) for p in read_jsonl(tmp_path / "eval" / f"pubmedqa_predictions_round{r}"
                                                                ".jsonl")} for r in range(3)]
    for q in shots[0]:
        assert all(len(set(s[q])) == 3 and q not in s[q] for s in shots)  # 3 other questions, never itself
    assert sum(shots[0][q] != shots[1][q] for q in shots[0]) >= 12  # each round its own draw, question by question
    assert len({shots[0][q] for q in shots[0]}) > 8  # and each question its own set within a round
    assert res["mc_protocol"] == "biomistral" and res["prompt_format"] == "biomistral"


def test_a_killed_evaluation_resumes_at_the_round_it_was_in(tiny, tmp_path, monkeypatch):
    import sftmix.eval.evaluate as ev

    model, tok = tiny
    path = _pubmedqa(tmp_path / "p.json")
    clean = ev.run_eval(model, tok, _cfg(path), tmp_path / "clean")["pubmedqa"]
    real, seeds = ev.eval_multiple_choice, []

    def killed_in_round_2(*a, seed=None, **kw):
        seeds.append(seed)
        if seed == 7:
            raise KeyboardInterrupt("killed in round 2")
        return real(*a, seed=seed, **kw)

    monkeypatch.setattr(ev, "eval_multiple_choice", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        ev.run_eval(model, tok, _cfg(path), tmp_path / "eval")
    assert seeds == [5, 6, 7] and not (tmp_path / "eval" / "pubmedqa.json").exists()
    seeds.clear()
    monkeypatch.setattr(ev, "eval_multiple_choice", lambda *a, seed=None, **kw: seeds.append(seed) or
                        real(*a, seed=seed, **kw))
    again = ev.run_eval(model, tok, _cfg(path), tmp_path / "eval")["pubmedqa"]
    assert seeds == [7]  # rounds 0 and 1 read back, round 2 run again
    assert again["n_rounds_reused"] == 2
    assert again["accuracies"] == clean["accuracies"] and again["accuracy_sd"] == clean["accuracy_sd"]


def test_rounds_are_refused_where_they_would_repeat_themselves(tiny, tmp_path):
    from sftmix.eval.evaluate import run_eval

    model, tok = tiny
    cfg = EvalConfig(pubmedqa_file=str(_pubmedqa(tmp_path / "p.json")), eval_rounds=3)
    with pytest.raises(SFTMixError, match="eval_rounds=3 with mc_protocol=lm-eval"):
        run_eval(model, tok, cfg, tmp_path / "eval")


MEDICAL_IDS = {"pubmedqa_file": "qiaojin/PubMedQA", "medqa_file": "GBaker/MedQA-USMLE-4-options",
               "medqa5_file": "fzkuji/MedQA", "medmcqa_file": "openlifescienceai/medmcqa"}


def _hub_run(hub, tmp_path, code):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.env(tmp_path / "hf_home"), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)


def test_the_four_medical_sets_by_hub_id_in_their_real_layouts_and_splits(tmp_path):
    """The stand-in serves the four sets under their real ids and layouts; the biomistral protocol evaluates
    PubMedQA's test questions with the other labelled ones as shots, MedQA / MedQA-5 test and MedMCQA validation with
    shots from their train splits; a split that is not the published size is one line naming the setting."""
    from hub_stub import HubStub, add_medical_sets

    with HubStub() as hub:
        shas = add_medical_sets(hub, tmp_path / "repos", n_test=6, n_train=5)
        code = (
            "import json\nfrom sftmix.eval import evaluate as ev\nfrom sftmix.eval.tasks import load_mc\n"
            "from sftmix.config import EvalConfig\n"
            "from sftmix.models import load_model_and_tokenizer\nfrom sftmix.utils import read_jsonl\n"
            "m, tok = load_model_and_tokenizer('tiny-random:0', device='cpu')\n"
            f"cfg = EvalConfig(**{MEDICAL_IDS!r}, mc_protocol='biomistral', num_shots=2, eval_rounds=2, "
            "mc_check_sizes=False)\n"
            f"res = ev.run_eval(m, tok, cfg, {str(tmp_path / 'e')!r})\n"
            "out = {}\n"
            "for t in ('pubmedqa', 'medqa', 'medqa5', 'medmcqa'):\n"
            f"    preds = read_jsonl({str(tmp_path / 'e')!r} + f'/{{t}}_predictions_round1.jsonl')\n"
            "    out[t] = {'n': res[t]['n'], 'ids': sorted(p['id'] for p in preds), 'source': res[t]['source'],\n"
            "              'shot_ids': sorted({s for p in preds for s in p['shot_ids']}),\n"
            "              'rounds': res[t]['n_rounds'], 'shots_from': res[t]['shots_from'],\n"
            "              'split_check': res[t]['split_check']}\n"
            "out['medqa_train'] = sorted(i.id for i in load_mc('medqa', 'GBaker/MedQA-USMLE-4-options::train'))\n"
            "out['medqa5_train'] = sorted(i.id for i in load_mc('medqa5', 'fzkuji/MedQA::train'))\n"
            "print(json.dumps(out))\n")
        res = _hub_run(hub, tmp_path, code)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        from sftmix.eval.tasks import pubmedqa_test_pmids

        test = pubmedqa_test_pmids()
        assert out["pubmedqa"]["n"] == 6 and all(i in test for i in out["pubmedqa"]["ids"])
        assert out["pubmedqa"]["shot_ids"] and not any(i in test for i in out["pubmedqa"]["shot_ids"])
        assert out["pubmedqa"]["source"]["sha"] == shas["qiaojin/PubMedQA"]
        assert set(out["medqa"]["shot_ids"]) <= set(out["medqa_train"]) and out["medqa"]["n"] == 6
        assert set(out["medqa5"]["shot_ids"]) <= set(out["medqa5_train"]) and out["medqa5"]["n"] == 6
        assert out["medqa5"]["source"]["config"] is None and out["medqa5"]["source"]["split"] == "test"
        assert out["medmcqa"]["n"] == 6 and all(i.startswith("validation-") for i in out["medmcqa"]["ids"])
        assert all(i.startswith("train-") for i in out["medmcqa"]["shot_ids"])
        assert out["medqa"]["split_check"] == {"expected": 1273, "found": 6}
        assert all(out[t]["rounds"] == 2 for t in ("pubmedqa", "medqa", "medqa5", "medmcqa"))

        code = ("from sftmix.eval import evaluate as ev\nfrom sftmix.config import EvalConfig\n"
                "from sftmix.models import load_model_and_tokenizer\n"
                "from sftmix.utils import one_line_errors\n"
                "m, tok = load_model_and_tokenizer('tiny-random:0', device='cpu')\n"
                "with one_line_errors('t'):\n"
                "    ev.run_eval(m, tok, EvalConfig(medqa_file='GBaker/MedQA-USMLE-4-options', "
                f"mc_protocol='biomistral'), {str(tmp_path / 'e2')!r})\n")
        res = _hub_run(hub, tmp_path, code)
        assert res.returncode == 2
        line = res.stderr.strip().splitlines()[-1]
        assert "medqa_file GBaker/MedQA-USMLE-4-options: 6 questions, but the published split has 1273" in line
        assert "mc_check_sizes false" in line


def _sftmix(hub, tmp_path, *args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.env(tmp_path / "hf_home"), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sftmix.cli", *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=1200)


def test_rounds_under_lm_eval_are_refused_before_any_stage_runs(tmp_path):
    from hub_stub import HubStub

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    with HubStub() as hub:
        res = _sftmix(hub, tmp_path, "run", "--config", smoke, "--output_dir", str(tmp_path / "run"),
                      "--pubmedqa_file", str(_pubmedqa(tmp_path / "p.json")), "--eval_rounds", "3")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("sftmix: error: eval_rounds=3 with mc_protocol=lm-eval")
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


@pytest.mark.slow
def test_smoke_run_reports_table_2_over_three_rounds(tmp_path):
    """`sftmix run --config configs/smoke.yaml` with the four medical sets by Hub id (the stand-in) under
    mc_protocol=biomistral: report.md has the paper's Table 2, mean ± sd over 3 rounds and the average column."""
    from hub_stub import HubStub, add_medical_sets

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    with HubStub() as hub:
        add_medical_sets(hub, tmp_path / "repos", n_test=6, n_train=5)
        ids = [a for k, v in MEDICAL_IDS.items() for a in (f"--{k}", v)]
        res = _sftmix(hub, tmp_path, "run", "--config", smoke, "--output_dir", str(tmp_path / "run"), *ids,
                      "--mc_protocol", "biomistral", "--mc_check_sizes", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (tmp_path / "run" / "report.md").read_text()
    table = report[report.index("## Medical QA (the paper's Table 2)"):].split("\n## ")[0]
    print(table)
    assert "| model | MedQA (n=6) | MedQA-5 (n=6) | PubMedQA (n=6) | MedMCQA (n=6) | Avg. |" in table
    assert "mean ± sd over 3 round(s)" in table and "Protocol **biomistral**" in table
    summary = json.loads((tmp_path / "run" / "report.json").read_text())["medical"]
    assert [r["model"] for r in summary["rows"]] == ["start", "ntp", "sftmix"]
    for row in summary["rows"]:
        cells = [row["cells"][t] for t in ("medqa", "medqa5", "pubmedqa", "medmcqa")]
        assert all(len(c["values"]) == 3 for c in cells)
        per_round = [statistics.fmean(c["values"][i] for c in cells) for i in range(3)]
        assert row["average"]["mean"] == pytest.approx(statistics.fmean(per_round))
        assert row["average"]["sd"] == pytest.approx(statistics.pstdev(per_round))
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row['label']} |"))
        assert line.endswith(f"| {100 * row['average']['mean']:.2f} ± {100 * row['average']['sd']:.2f} |")


def test_run_rounds_keeps_every_round_and_reads_back_finished_ones(tmp_path):
    """The generic mechanism on its own (as the judged evaluations will use it): seed + r per round, each value
    kept, population sd, a stored round with another fingerprint is run again."""
    from sftmix.eval.rounds import run_rounds

    calls = []

    def one(r, seed):
        calls.append(seed)
        return {"score": [0.5, 0.6, 0.8][r]}

    out = run_rounds(3, 10, one, tmp_path / "r", {"model": "a"}, "score")
    assert out["values"] == [0.5, 0.6, 0.8] and out["seeds"] == [10, 11, 12] and calls == [10, 11, 12]
    assert out["mean"] == pytest.approx(19 / 30)
    assert out["sd"] == pytest.approx(((0.5 - 19 / 30) ** 2 + (0.6 - 19 / 30) ** 2 + (0.8 - 19 / 30) ** 2) ** 0.5
                                      / 3 ** 0.5)
    calls.clear()
    again = run_rounds(3, 10, one, tmp_path / "r", {"model": "a"}, "score")
    assert calls == [] and again["n_reused"] == 3 and again["values"] == out["values"]
    run_rounds(3, 10, one, tmp_path / "r", {"model": "b"}, "score")  # another model: nothing reused
    assert calls == [10, 11, 12]
    with pytest.raises(SFTMixError, match="eval_rounds=0"):
        run_rounds(0, 10, one, None, {}, "score")


def test_table_2_averages_round_by_round_and_names_the_protocol():
    from sftmix.report.report import _medical_section, medical_table

    def ev(accs):
        return {t: {"accuracy": statistics.fmean(a), "accuracies": a, "n": n, "mc_protocol": "biomistral"}
                for (t, n), a in zip((("medqa", 1273), ("medqa5", 1273), ("pubmedqa", 500), ("medmcqa", 4183)),
                                     accs)}

    models = {"ntp": {"label": "NTP", "eval": ev([[0.4, 0.5, 0.6], [0.3, 0.3, 0.3], [0.7, 0.6, 0.8],
                                                  [0.5, 0.4, 0.5]])},
              "sftmix": {"label": "SFTMix", "eval": {**ev([[0.5, 0.5, 0.5]] * 4), "medmcqa": None}}}
    med = medical_table(models)
    ntp = med["rows"][0]
    assert ntp["average"]["values"] == pytest.approx([0.475, 0.45, 0.55])
    assert ntp["average"]["sd"] == pytest.approx(statistics.pstdev([0.475, 0.45, 0.55]))
    assert med["rows"][1]["average"] is None  # a task missing: no average
    title, text, [(_, (header, body))] = _medical_section(med)
    assert header == ["model", "MedQA (n=1273)", "MedQA-5 (n=1273)", "PubMedQA (n=500)", "MedMCQA (n=4183)", "Avg."]
    assert body[0] == ["NTP", "50.00 ± 8.16", "30.00 ± 0.00", "70.00 ± 8.16", "46.67 ± 4.71", "49.17 ± 4.25"]
    assert body[1][-2:] == ["–", "–"] and "**biomistral**" in text


def test_an_evaluation_killed_by_sigkill_resumes_at_its_round(tmp_path):
    """kill -9 in round 2 of `python -m sftmix.eval.evaluate`: rounds 0 and 1 are on disk; the same command again runs
    round 2 only and gives what an uninterrupted evaluation gives."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    path = _pubmedqa(tmp_path / "p.json", n=10)
    args = ["--model", "tiny-random:0", "--device", "cpu", "--pubmedqa_file", str(path), "--mc_protocol",
            "biomistral", "--num_shots", "2", "--seed", "5"]
    kill = ("import os, signal, sys\nimport sftmix.eval.evaluate as ev\nreal = ev.eval_multiple_choice\n"
            "def killed(*a, seed=None, **kw):\n"
            "    if seed == 7:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return real(*a, seed=seed, **kw)\n"
            "ev.eval_multiple_choice = killed\nev.main(sys.argv[1:])\n")
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=root, env=env, capture_output=True,  # noqa: E731
                                      text=True, timeout=600)
    res = run("-c", kill, *args, "--output_dir", str(tmp_path / "e"))
    assert res.returncode == -9, res.stderr[-2000:]
    rounds = tmp_path / "e" / "rounds" / "pubmedqa"
    assert sorted(p.name for p in rounds.iterdir()) == ["round_0.json", "round_1.json"]
    assert not (tmp_path / "e" / "pubmedqa.json").exists()
    res = run("-m", "sftmix.eval.evaluate", *args, "--output_dir", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr[-2000:]
    clean = run("-m", "sftmix.eval.evaluate", *args, "--output_dir", str(tmp_path / "clean"))
    resumed, fresh = (json.loads((tmp_path / d / "pubmedqa.json").read_text()) for d in ("e", "clean"))
    assert resumed["n_rounds_reused"] == 2 and fresh["n_rounds_reused"] == 0, clean.stderr[-2000:]
    assert resumed["accuracies"] == fresh["accuracies"] and resumed["seeds"] == [5, 6, 7]
