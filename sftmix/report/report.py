"""The run report: report.json (everything, machine-readable), report.md and a self-contained report.html.

    from sftmix.report.report import write_report, print_comparison
    summary = write_report(cfg)        # reads the run directory cfg.run_dir, writes report.{json,md,html}
    print_comparison(summary)          # the NTP vs SFTMix table (rich) on the held-out examples

Sections: the resolved config; data statistics (rows, examples, duplicates, skipped and filtered rows, held-out
split, tokenization: dropped and truncated examples per tokenizer); the confidence split (sizes, range, the plots,
the most and least confident instructions); NTP vs SFTMix (and the untrained start) side by side: held-out response
NLL / perplexity, any multiple-choice or judge metric, training loss and time; the wall time of each stage.
The HTML embeds the plots as base64 PNGs, so the one file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import json
import math
import platform
import time
from pathlib import Path

from sftmix.rundir import RunDir, read_train_result
from sftmix.utils import atomic_write_json, atomic_write_text, read_jsonl

PLOTS = [("confidence_hist.png", "Confidence histogram and the split"),
         ("data_map.png", "Data map: variability vs confidence"),
         ("hidden_map.png", "Reference hidden states (last response token), coloured by confidence")]
MODEL_LABELS = {"start": "start (untrained)", "ntp": "NTP", "sftmix": "SFTMix"}
MEDICAL_TASKS = (("medqa", "MedQA"), ("medqa5", "MedQA-5"), ("pubmedqa", "PubMedQA"), ("medmcqa", "MedMCQA"))
TOP_K = 8


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sftmix", "torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def collect(cfg) -> dict:
    """Everything the report shows, from the run directory."""
    d = RunDir(cfg.run_dir)
    summary = {"run_dir": str(cfg.run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "config_source": cfg.source,
               "config": json.loads(json.dumps(cfg.flat(), default=str)), "versions": _versions(),
               "sources": _json(d.sources)}  # Hub ids -> commit shas (sftmix.hub.run_sources)
    summary["data"] = {"load": _json(d.data_stats),
                       "tokenize": {n: {k: v for k, v in (_json(d.tokenize_stats(n)) or {}).items()
                                        if k != "dropped_guids"} or None for n in ("reference", "target")}}

    conf_path = d.confidence
    if conf_path.exists():
        rows = read_jsonl(conf_path)
        train_file = d.train
        train = {r["guid"]: r for r in read_jsonl(train_file)} if train_file.exists() else {}
        ranked = sorted(rows, key=lambda r: (-r["confidence"], r["guid"]))
        confident = [r for r in rows if r["confident"]]
        unconfident = [r for r in rows if not r["confident"]]

        from sftmix.confidence.split import split_threshold
        from sftmix.data import first_user_message

        def brief(r):
            return {"guid": r["guid"], "confidence": r["confidence"], "n_tokens": r.get("n_tokens"),
                    "instruction": first_user_message(train[r["guid"]]) if r["guid"] in train else None}

        self_split = _json(d.self_split)  # one-run SFTMix (reference=self) marks its split
        summary["confidence"] = {
            "n_examples": len(rows), "n_confident": len(confident), "n_unconfident": len(unconfident),
            "mode": (self_split.get("self_confidence") if self_split else
                     (_json(d.split) or {}).get("confidence_mode")),
            "confidence_source": "self" if self_split else "separate",
            "min": ranked[-1]["confidence"], "max": ranked[0]["confidence"],
            "threshold": split_threshold([r["confidence"] for r in rows], [r["confident"] for r in rows])
            if confident and unconfident else None,
            "num_checkpoints": sum(1 for k in rows[0] if k.startswith("ppl_")),
            "most_confident": [brief(r) for r in ranked[:TOP_K]],
            "least_confident": [brief(r) for r in ranked[::-1][:TOP_K]],
            "plots": [name for name, _ in PLOTS if (d.plots / name).exists()],
            "online_summary": _json(d.online_summary),
        }
    else:
        summary["confidence"] = None

    models = {}
    names = ["start"] + [r for r in ("ntp", "sftmix") if r in cfg.run.recipes]
    for name in names:
        ev = _json(d.eval_result(name))
        tr = read_train_result(d.train_result(name)) if name != "start" else None
        if ev is None and tr is None:
            continue
        entry = {"label": MODEL_LABELS.get(name, name), "eval": ev["results"] if ev else None}
        if tr:
            losses = [h for h in tr["log_history"] if "loss" in h]
            entry["train"] = {k: tr.get(k) for k in ("global_step", "resumed_from", "n_train_examples", "selection",
                                                     "duplicates_per_epoch", "mixup_enabled", "mixup_weight",
                                                     "reused_reference_checkpoint")}
            entry["train"].update({k: tr["metrics"].get(k) for k in ("train_loss", "train_runtime")})
            last = {k: losses[-1][k] for k in ("loss", "ntp_loss", "mixup_loss") if k in losses[-1]} if losses else {}
            if "loss" in last and not tr.get("mixup_enabled"):
                last.setdefault("ntp_loss", last["loss"])  # without Mixup the logged loss is the NTP loss
            entry["train"]["last_logged"] = last
        models[name] = entry
    summary["models"] = models
    summary["comparison"] = comparison_rows(models, getattr(cfg.run, "judge_min_valid_fraction", 0.9))
    summary["medical"] = medical_table(models)
    summary["instruction"] = instruction_table(models)
    summary["timings"] = _json(d.timings) or {}
    summary.update(collect_curves_and_answers(cfg))
    return summary


JUDGED = ("score", "win_rate", "lc_win_rate")  # metrics that rest on judgments, some of which may have failed


def sample_size(metrics: dict) -> tuple[int | None, int | None]:
    """(n_valid, n) behind a task's metrics: valid judgments of all judgments, or questions scored."""
    if "n_judgments" in metrics:  # MT-Bench
        n = metrics["n_judgments"]
        return n - (metrics.get("n_failed") or 0), n
    if "n_valid" in metrics:  # pairwise
        return metrics["n_valid"], metrics.get("n")
    n = metrics.get("n")
    return n, n


def comparison_rows(models: dict, min_valid_fraction: float = 0.9) -> list[dict]:
    """One row per model: held-out NLL / PPL, the change against the start model, other metrics, training loss.

    Each other metric comes with its sample size in row["samples"] ((n_valid, n)); a judged metric whose share of
    valid judgments is below `min_valid_fraction` is withheld (None) with the reason in row["withheld"]."""
    rows = []
    start_nll = (((models.get("start") or {}).get("eval") or {}).get("heldout") or {}).get("nll")
    for name, m in models.items():
        ev = m.get("eval") or {}
        h = ev.get("heldout") or {}
        row = {"model": name, "label": m["label"], "heldout_nll": h.get("nll"), "heldout_ppl": h.get("ppl"),
               "heldout_ppl_example_mean": h.get("ppl_example_mean"), "n_examples": h.get("n_examples"),
               "n_tokens": h.get("n_tokens")}
        row["delta_nll_vs_start"] = (h["nll"] - start_nll) if h.get("nll") is not None and start_nll is not None \
            else None
        row["samples"], row["withheld"] = {}, {}
        for task, metrics in ev.items():
            if task != "heldout" and isinstance(metrics, dict):
                n_valid, n = sample_size(metrics)
                judged = "n_judgments" in metrics or "n_valid" in metrics
                for key in ("accuracy", "score", "win_rate", "lc_win_rate"):
                    if key not in metrics:
                        continue
                    name = f"{task}_{key}"
                    share = n_valid / n if n_valid is not None and n else 0.0
                    if judged and key in JUDGED and share < min_valid_fraction:
                        row[name] = None
                        row["withheld"][name] = (f"withheld: {n_valid}/{n} valid judgments, below the minimum share "
                                                 f"{min_valid_fraction:.0%} (judge_min_valid_fraction)")
                    elif isinstance(metrics.get(key), (int, float)):
                        row[name] = metrics[key]
                    else:
                        row[name] = None
                        if key == "lc_win_rate" and metrics.get("lc_note"):
                            row["withheld"][name] = f"not defined: {metrics['lc_note']}"
                    row["samples"][name] = [n_valid, n]
        tr = m.get("train") or {}
        row["train_ntp_loss"] = (tr.get("last_logged") or {}).get("ntp_loss")
        row["train_seconds"] = tr.get("train_runtime")
        rows.append(row)
    return rows


def medical_table(models: dict) -> dict | None:
    """The paper's Table 2: per model, the accuracy of MedQA, MedQA-5, PubMedQA and MedMCQA as mean and sd over the
    evaluation rounds (every round's value kept), and their average. The average is taken round by round (round r's
    mean over the tasks; rounds share seeds) and then summarised the same way; it is given only when every task was
    evaluated with the same number of rounds. None when no medical task was evaluated."""
    from sftmix.eval.rounds import summarize

    tasks = [t for t, _ in MEDICAL_TASKS if any(t in (m.get("eval") or {}) for m in models.values())]
    if not tasks:
        return None
    rows, protocols, n = [], set(), {}
    for name, m in models.items():
        ev = m.get("eval") or {}
        cells = {}
        for t in tasks:
            r = ev.get(t)
            if not isinstance(r, dict) or not isinstance(r.get("accuracy"), (int, float)):
                cells[t] = None
                continue
            protocols.add(r.get("mc_protocol", "lm-eval"))
            n.setdefault(t, r.get("n"))
            cells[t] = summarize(r.get("accuracies") or [r["accuracy"]])
        done = [c for c in cells.values() if c]
        average = None
        if len(done) == len(tasks) and len({len(c["values"]) for c in done}) == 1:
            average = summarize([sum(c["values"][i] for c in done) / len(done) for i in range(len(done[0]["values"]))])
        rows.append({"model": name, "label": m["label"], "cells": cells, "average": average})
    n_rounds = sorted({len(c["values"]) for r in rows for c in r["cells"].values() if c})
    return {"tasks": tasks, "rows": rows, "n": n, "protocols": sorted(protocols), "n_rounds": n_rounds}


INSTRUCTION_COLUMNS = (("mtbench", "score", "MT-Bench overall"), ("mtbench", "score_turn1", "single-turn"),
                       ("mtbench", "score_turn2", "multi-turn"), ("alpacaeval", "win_rate", "AlpacaEval 2 WR (%)"),
                       ("alpacaeval", "lc_win_rate", "LC WR (%)"))


def instruction_table(models: dict) -> dict | None:
    """The paper's Table 1: per model, MT-Bench overall / single-turn / multi-turn (1-10) and AlpacaEval 2's win
    rate and length-controlled win rate, each as mean and sd over the evaluation rounds with every round's value;
    n, rounds, judge and protocol per evaluation. None when neither was evaluated."""
    from sftmix.eval.rounds import summarize

    tasks = [t for t in ("mtbench", "alpacaeval") if any(t in (m.get("eval") or {}) for m in models.values())]
    if not tasks:
        return None
    rows, info = [], {}
    for name, m in models.items():
        ev = m.get("eval") or {}
        cells = {}
        for task, key, _ in INSTRUCTION_COLUMNS:
            r = ev.get(task)
            if task not in tasks:
                continue
            vals = (r or {}).get({"score": "scores", "win_rate": "win_rates", "lc_win_rate": "lc_win_rates"}.get(
                key, f"scores_{key.rsplit('_', 1)[-1]}")) if isinstance(r, dict) else None
            if not vals and isinstance(r, dict) and isinstance(r.get(key), (int, float)):
                vals = [r[key]]  # a result written before rounds: one value
            cells[f"{task}_{key}"] = summarize(vals) if vals else None
            if isinstance(r, dict) and task not in info:
                rounds = r.get("n_rounds") or 1
                n = r.get("n_questions") if task == "mtbench" else (r.get("n") or 0) // rounds
                n_valid, n_all = sample_size(r)
                info[task] = {"n": n, "n_rounds": rounds, "judge": r.get("judge_model"), "protocol": r.get("protocol"),
                              "valid": [n_valid, n_all], "lc_method": r.get("lc_method"),
                              "answers_from": r.get("answers_from", "local model")}
        rows.append({"model": name, "label": m["label"], "cells": cells})
    return {"tasks": tasks, "rows": rows, "info": info}


# ----------------------------------------------------------------------------------------------------------------
# training curves and side-by-side answers (what a reader of a tracker's report looks at first)

CURVE_PLOT = "loss_curves.png"
EXTRA_CAPTIONS = {CURVE_PLOT: "NTP (solid) and Mixup (dashed) loss per step of each recipe and of the reference"}
ANSWER_CHARS = 700  # per table cell: answers are capped in tokens already; prompts can be long


def collect_curves_and_answers(cfg) -> dict:
    """The loss curves of each run (from its train_result.json log_history; plots/loss_curves.png) and the answers
    of every model to the fixed held-out sample (the evaluation task `answers`, eval/<model>.json)."""
    d = RunDir(cfg.run_dir)
    recipes = [r for r in ("ntp", "sftmix") if r in cfg.run.recipes]
    results = {name: read_train_result(d.train_result(name)) for name in ("reference", *recipes)}
    reused = (results.get("ntp") or {}).get("reused_reference_checkpoint")
    curves = {}
    for name, tr in results.items():
        if name == "reference" and reused:
            continue  # the NTP run is the reference run: one curve, labelled NTP
        hist = (tr or {}).get("log_history") or []
        c = {k: [(h["step"], h[k]) for h in hist if "step" in h and isinstance(h.get(k), (int, float))]
             for k in ("ntp_loss", "mixup_loss")}
        if any(c.values()):
            label = "reference (step 1)" if name == "reference" else MODEL_LABELS.get(name, name)
            curves[f"{label} (= the reference run)" if name == "ntp" and reused else label] = c
    switch = None
    self_split = _json(d.self_split)  # one-run SFTMix: NTP epochs, then Mixup
    if self_split and self_split.get("steps"):
        steps = self_split["steps"]
        switch = int(steps if isinstance(steps, int) else max(steps))
    plot = None
    if curves:
        from sftmix.report.plots import plot_loss_curves

        plot_loss_curves(curves, d.plots / CURVE_PLOT, switch)
        plot = CURVE_PLOT
    answers = {}
    for name in ["start", *recipes]:
        found = ((_json(d.eval_result(name)) or {}).get("results") or {}).get("answers")
        if found:
            answers[name] = found
    return {"curves": {"runs": curves, "switch_step": switch, "plot": plot}, "answers": answers}


def _cell(text, n=ANSWER_CHARS) -> str:
    """Spaces collapsed, line breaks kept (answers are often lists): <br> in report.md, pre-line in report.html."""
    lines = [" ".join(line.split()) for line in str(text or "").splitlines()]
    return _short("\n".join(line for line in lines if line), n) if text else "–"


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    turns = list(prompt or [])
    if len(turns) == 1:
        return turns[0].get("content", "")
    return " / ".join(f"{t.get('role')}: {t.get('content', '')}" for t in turns)


def _curves_and_answers_sections(summary) -> list[tuple[str, str, list]]:
    out = []
    curves = summary.get("curves") or {}
    if curves.get("plot"):
        text = ("NTP loss (solid) and Mixup loss (dashed) per optimizer step, as logged (each point is the mean over "
                "`logging_steps` steps); numbers in each run's train_result.json (log_history).")
        if curves.get("switch_step") is not None:
            text += (f" Dotted line: one-run SFTMix switched from its NTP epochs to Mixup at step "
                     f"{curves['switch_step']}.")
        out.append(("Training curves", text, [("plots", [curves["plot"]])]))
    answers = summary.get("answers") or {}
    if answers:
        first = next(iter(answers.values()))
        by_model = {name: {it["guid"]: it for it in a.get("items", [])} for name, a in answers.items()}

        def answer(name, guid):
            it = by_model[name].get(guid)
            if it is None:
                return "–"
            return _cell(it["answer"]) + ("" if it.get("finished", True) else " [cut at the cap]")

        body = [[_cell(_prompt_text(it["prompt"])), _cell(it["reference"])] +
                [answer(name, it["guid"]) for name in answers] for it in first.get("items", [])]
        cut = {MODEL_LABELS.get(n, n): a.get("n_cut") for n, a in answers.items()}
        text = (f"Greedy answers of every model to the same {first.get('n')} held-out prompts (the first "
                f"{first.get('n')} of {first.get('n_heldout')} by guid), at most {first.get('max_new_tokens')} new "
                f"tokens each (cut at that cap: {', '.join(f'{k} {v}' for k, v in cut.items())}). Long cells are "
                f"shortened here; the full text is in eval/<model>/answers.json.")
        header = ["prompt", "reference answer"] + [MODEL_LABELS.get(n, n) for n in answers]
        out.append(("Answers to held-out prompts", text, [("table", (header, body))]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# rendering


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _comparison_table(summary) -> tuple[list[str], list[list[str]]]:
    rows = summary["comparison"]
    extra = sorted({k for r in rows for k in r if k.split("_")[0] not in ("heldout", "delta", "train", "n", "model",
                                                                          "label", "samples", "withheld")})
    header = ["model", "held-out NLL", "Δ NLL vs start", "held-out PPL", "mean example PPL", "examples"] + extra + [
        "last train NTP loss", "train s"]
    body = []
    for r in rows:
        delta = r["delta_nll_vs_start"]
        body.append([r["label"], _fmt(r["heldout_nll"]), "–" if delta is None or r["model"] == "start" else
                     f"{delta:+.4f}", _fmt(r["heldout_ppl"], 3), _fmt(r["heldout_ppl_example_mean"], 3),
                     _fmt(r["n_examples"])] + [_with_n(r, k) for k in extra] + [
            _fmt(r["train_ntp_loss"]), _fmt(r["train_seconds"], 1)])
    return header, body


def _with_n(row: dict, key: str) -> str:
    """A metric with its sample size: `0.5000 (n=100)`, `0.7500 (9/10 valid)`, or why it is withheld."""
    reason = (row.get("withheld") or {}).get(key)
    if reason:
        return reason
    n_valid, n = (row.get("samples") or {}).get(key) or (None, None)
    if row.get(key) is None:
        return "–"
    if n is None:
        return _fmt(row.get(key))
    return f"{_fmt(row[key])} ({n_valid}/{n} valid)" if n_valid != n else f"{_fmt(row[key])} (n={n})"


def _medical_section(med: dict) -> tuple[str, str, list]:
    names = dict(MEDICAL_TASKS)
    pm = lambda c: "–" if not c else f"{100 * c['mean']:.2f} ± {100 * c['sd']:.2f}"  # noqa: E731
    header = ["model"] + [f"{names[t]} (n={med['n'].get(t, '?')})" for t in med["tasks"]] + ["Avg."]
    body = [[r["label"]] + [pm(r["cells"][t]) for t in med["tasks"]] + [pm(r["average"])] for r in med["rows"]]
    rounds = "/".join(map(str, med["n_rounds"])) or "?"
    protocol = ", ".join(med["protocols"])
    what = ("BioMistral's three-shot protocol (Labrak et al. 2024): its prompt, a shot set per question drawn "
            "from the set's training split in each round" if med["protocols"] == ["biomistral"] else
            "lm-evaluation-harness prompts, one fixed shot set")
    text = (f"Accuracy (%), mean ± sd over {rounds} round(s) (population sd; one round: ± 0.00), n = questions per "
            f"task. Protocol **{protocol}**: {what}; options scored by log-likelihood. Avg. is the mean over the "
            f"tasks, round by round.")
    return ("Medical QA (the paper's Table 2)", text, [("table", (header, body))])


def _instruction_section(t: dict) -> tuple[str, str, list]:
    def pm(c, key):
        if not c:
            return "–"
        k = 100 if key in ("win_rate", "lc_win_rate") else 1
        return f"{k * c['mean']:.2f} ± {k * c['sd']:.2f}"

    cols = [(task, key, label) for task, key, label in INSTRUCTION_COLUMNS if task in t["tasks"]]
    header = ["model"] + [f"{label} (n={t['info'].get(task, {}).get('n', '?')})" for task, key, label in cols]
    body = [[r["label"]] + [pm(r["cells"].get(f"{task}_{key}"), key) for task, key, _ in cols] for r in t["rows"]]
    parts = []
    for task, what in (("mtbench", "MT-Bench"), ("alpacaeval", "AlpacaEval 2")):
        i = t["info"].get(task)
        if i:
            parts.append(f"{what}: {i['n_rounds']} round(s), answers from the {i['answers_from']}, judge "
                         f"`{i['judge']}`, {i['valid'][0]}/{i['valid'][1]} valid judgments (first model), protocol: "
                         f"{i['protocol']}")
    text = ("Mean ± sd over the rounds (population sd; one round: ± 0.00); MT-Bench scores 1-10 (single-turn: turn 1, "
            "multi-turn: turn 2), AlpacaEval 2 win rates in % against the reference outputs. " + "; ".join(parts) + ".")
    return ("Instruction following (the paper's Table 1)", text, [("table", (header, body))])


def _md_table(header, body) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731  (a line break inside a cell)
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def _short(text, n=140) -> str:
    text = text or "?"
    return text if len(text) <= n else text[: n - 1] + "…"


def _duplicates_line(dup: dict | None) -> str:
    if not dup:
        return "–"
    return (f"{dup['n_duplicate_copies']} extra copies of {dup['n_duplicated_examples']} examples: "
            f"{dup['duplicate_copies_in_train']} in train, {dup['duplicate_copies_in_heldout']} in held-out; "
            f"{dup['n_examples_on_both_sides']} examples on both sides (the split is by content)")


def _sections(summary) -> list[tuple[str, str, list]]:
    """(title, markdown text, [(kind, payload)]) for both renderers; kinds: table, plots, pre."""
    out = []
    header, body = _comparison_table(summary)
    best = min((r for r in summary["comparison"] if r["heldout_nll"] is not None),
               key=lambda r: r["heldout_nll"], default=None)
    note = (f"Lower is better. Best held-out NLL: **{best['label']}**. NLL is the token-weighted mean response NLL "
            f"of the held-out examples, PPL = exp(NLL).") if best else "No evaluation yet (run `sftmix eval`)."
    out.append(("NTP vs SFTMix on the held-out examples", note, [("table", (header, body))]))
    if summary.get("instruction"):  # the paper's Table 1, then its Table 2
        out.append(_instruction_section(summary["instruction"]))
    med = summary.get("medical")
    if med:
        out.append(_medical_section(med))
    out += _curves_and_answers_sections(summary)

    data = summary["data"]
    load = data.get("load") or {}
    rows = [["source", load.get("source")], ["format", load.get("format")],
            ["source rows", load.get("n_rows")], ["examples", load.get("n_records")],
            ["exact duplicates (guid suffixed)", load.get("n_duplicates")],
            ["duplicates in the split", _duplicates_line(load.get("duplicates"))],
            ["skipped rows", f"{load.get('n_skipped_rows', 0)} {load.get('skipped') or ''}".strip()],
            ["notes", json.dumps(load.get("notes")) if load.get("notes") else "–"],
            ["filtered", json.dumps(load.get("filtered")) if load.get("filtered") else "–"],
            ["train / held-out", f"{load.get('n_train')} / {load.get('n_heldout')}"]]
    for name, t in (data.get("tokenize") or {}).items():
        if t:
            rows.append([f"tokenized for the {name}", f"{t['n_kept']} kept, {t['n_dropped_truncated']} dropped "
                         f"(prompt fills max_length={t['max_length']}), {t['n_truncated']} truncated; response "
                         f"tokens {t.get('response_tokens')}"])
    out.append(("Data", "", [("table", (["", ""], [[str(a), _fmt(b)] for a, b in rows]))]))

    c = summary.get("confidence")
    if c:
        if c.get("confidence_source") != "self":
            source = f"-mean PPL over {c['num_checkpoints']} reference checkpoints"
        elif c["mode"] in ("online", "online_raw", "online_linear"):
            kind = {"online": "step-relative ", "online_linear": "linearly de-trended "}.get(c["mode"], "")
            source = (f"-mean {kind}PPL from the training forward of the target's own NTP epochs, one run "
                      "(confidence_source self)")
        else:
            source = (f"-mean PPL over {c['num_checkpoints']} checkpoints of the target's own NTP epochs, one run "
                      "(confidence_source self)")
        text = (f"{c['n_examples']} training examples: **{c['n_confident']} confident**, **{c['n_unconfident']} "
                f"unconfident** (median split of confidence = {source}" +
                f"; mode {c['mode']}). Confidence ranges from {c['min']:.3f} to {c['max']:.3f}"
                + (f", split at {c['threshold']:.3f}." if c["threshold"] is not None else "."))
        if c.get("online_summary"):
            o = c["online_summary"]
            text += f" Online vs checkpoint confidence: Spearman {o.get('spearman', float('nan')):.3f}."
        items = [("plots", c["plots"])]
        for key, title in (("most_confident", "Most confident"), ("least_confident", "Least confident")):
            items.append(("subtitle", title))
            items.append(("table", (["confidence", "instruction"],
                                    [[f"{r['confidence']:.3f}", _short(r["instruction"])] for r in c[key]])))
        out.append(("Confidence split (step 1)", text, items))

    detail = []
    for name, m in summary["models"].items():
        tr = m.get("train")
        if tr:
            last = tr.get("last_logged") or {}
            detail.append([m["label"], _fmt(tr.get("global_step")), _fmt(tr.get("n_train_examples")),
                           _fmt(tr.get("train_loss")), _fmt(last.get("ntp_loss")), _fmt(last.get("mixup_loss")),
                           _fmt(tr.get("mixup_weight")), _fmt(tr.get("resumed_from")), _fmt(tr.get("selection")),
                           "the reference run of step 1 (identical NTP run)" if tr.get("reused_reference_checkpoint")
                           else "trained"])
    if detail:
        out.append(("Training", "", [("table", (["recipe", "steps", "examples", "mean train loss", "last NTP loss",
                                                "last Mixup loss", "mixup_weight", "resumed from", "selection",
                                                "model"],
                                               detail))]))
    t = summary.get("timings") or {}
    total = sum(v["seconds"] for v in t.values())
    out.append(("Wall time per stage", f"Total {total:.0f} s (stages run in earlier invocations included).",
                [("table", (["stage", "seconds", "finished"],
                            [[k, f"{v['seconds']:.1f}", v["finished"]] for k, v in t.items()]))]))
    out.append(("Config", f"Resolved from {summary['config_source']}; also in config.yaml.",
                [("pre", json.dumps(summary["config"], indent=1, default=str))]))
    out.append(("Versions", "", [("pre", json.dumps(summary["versions"], indent=1))]))
    return out


def render_markdown(summary) -> str:
    parts = [f"# SFTMix run report\n\n`{summary['run_dir']}`, {summary['created']}.\n"]
    for title, text, items in _sections(summary):
        parts.append(f"## {title}\n")
        if text:
            parts.append(text + "\n")
        for kind, payload in items:
            if kind == "table":
                parts.append(_md_table(*payload) + "\n")
            elif kind == "subtitle":
                parts.append(f"### {payload}\n")
            elif kind == "plots":
                parts += [f"![{name}](plots/{name})\n" for name in payload]
            else:
                parts.append("```\n" + payload + "\n```\n")
    return "\n".join(parts)


def render_html(summary, run_dir: Path) -> str:
    """report.html: the sections of `_sections` through the jinja2 template sftmix/templates/report.html.j2."""
    import re

    import jinja2
    import markupsafe

    env = jinja2.Environment(loader=jinja2.PackageLoader("sftmix", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["bold"] = lambda text: markupsafe.Markup(
        re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", str(markupsafe.escape(text))))
    captions = {**dict(PLOTS), **EXTRA_CAPTIONS}
    sections = [(title, text, [(kind, [(captions.get(name, name),
                                        base64.b64encode((RunDir(run_dir).plots / name).read_bytes()).decode("ascii"))
                                       for name in payload] if kind == "plots" else payload)
                               for kind, payload in items])
                for title, text, items in _sections(summary)]
    return env.get_template("report.html.j2").render(summary=summary, sections=sections)


def write_report(cfg) -> dict:
    """Write report.json, report.md and report.html into the run directory; returns the summary."""
    summary, d = collect(cfg), RunDir(cfg.run_dir)
    atomic_write_json(d.report("json"), summary)
    atomic_write_text(d.report("md"), render_markdown(summary))
    atomic_write_text(d.report("html"), render_html(summary, cfg.run_dir))
    return summary


def print_comparison(summary: dict | None) -> None:
    """Print the comparison table with rich (plain text when not a terminal)."""
    if not summary:
        return
    from rich.console import Console
    from rich.table import Table

    header, body = _comparison_table(summary)
    table = Table(title=f"Held-out comparison ({summary['run_dir']})")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    Console(width=160).print(table)
