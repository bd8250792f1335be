"""Evaluation: held-out response likelihood, k-shot multiple choice by log-likelihood, judged instruction following.

    from sftmix.config import EvalConfig
    from sftmix.eval.evaluate import run_eval
    cfg = EvalConfig(pubmedqa_file="../shared/data/pubmedqa_pqal_dev500.json", heldout_file="run/data/heldout.jsonl")
    results = run_eval(model, tokenizer, cfg, "run/eval")   # {"pubmedqa": {...}, "heldout": {...}}; files in run/eval

    python -m sftmix.eval.evaluate --model smollm2 --pubmedqa_file ../shared/data/pubmedqa_pqal_dev500.json \
        --output_dir runs/eval_smollm2

Held-out likelihood (`heldout_nll`): any SFT-format file is tokenized as for training (sftmix.data) and scored by
sftmix.confidence.scoring.score_examples; reported are the token-weighted mean response NLL, its perplexity, and the
mean of the per-example NLL / PPL (the per-example PPL is the quantity the paper's confidence uses).

The tasks live in sftmix.eval: the sets, shots and prompts (`eval.tasks`), k-shot multiple choice by
log-likelihood with its prompt formats and Wilson intervals (`eval.mc`: PubMedQA, MedQA 4/5 options, MedMCQA),
generation (`eval.generation`) and judged instruction following (`eval.judged`: MT-Bench, AlpacaEval); their names are
importable from here too. This module runs them (`run_eval`) and keeps each task's stored result with the fingerprint
of what it depends on (its settings, config.EVAL_TASK_FIELDS; its files; the model's weights).

Outputs in output_dir: <task>.json (metrics, with the settings that produced them; an existing one with the same
settings is reused, `overwrite` forces a rerun; a judged one also reruns for its transient judge failures, or for any
with judge_retry_failed), <task>_predictions.jsonl / heldout_examples.jsonl, per round of MT-Bench and AlpacaEval
(eval_rounds, default 5) mtbench_answers_round<r>.jsonl / mtbench_judgments_round<r>.jsonl /
alpacaeval_outputs_round<r>.jsonl / alpacaeval_judgments_round<r>.jsonl and rounds/<task>/round_<r>.json,
judge_cache.jsonl, and results.json with all metrics. A judged task sends the judge one pre-flight request before any
answer is generated (sftmix.eval.judge; docs/reproducing.md). Under mc_protocol=biomistral each multiple-choice task
runs
eval_rounds rounds (sftmix.eval.rounds): <task>_predictions_round<r>.jsonl and rounds/<task>/round_<r>.json per round,
<task>.json with their mean (accuracy), accuracy_sd and every round (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftmix.config import MC_TASKS, EvalConfig, eval_task_fields
from sftmix.eval.generation import heldout_answers
from sftmix.eval.judged import eval_alpaca_eval, eval_mt_bench, make_judge
from sftmix.eval.mc import eval_multiple_choice
from sftmix.eval.rounds import run_rounds
from sftmix.utils import SFTMixError, atomic_write_json, write_jsonl

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ held-out

def heldout_nll(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int | None = None,
                source: str = "<held-out>", return_rows: bool = False, distributed: bool = False) -> dict:
    """Response NLL of `records` (sftmix.data records): token-weighted mean NLL and its perplexity, plus the mean of
    the per-example mean NLL and PPL. Examples whose prompt fills max_length are dropped and counted (n_dropped).
    distributed=True, under several processes (a torch.distributed process group; every process must call it): each
    scores its share and every process gets the rows and metrics of one process
    (sftmix.confidence.scoring.run_scoring)."""
    from sftmix.confidence.scoring import score_examples
    from sftmix.data import tokenize_records

    ds, stats = tokenize_records(records, tokenizer, max_length=max_length, source=source)
    rows = score_examples(model, ds, batch_size=batch_size, desc=f"scoring {source}", distributed=distributed)
    n_tok = sum(r["n_tokens"] for r in rows)
    nll = sum(r["nll_mean"] * r["n_tokens"] for r in rows) / n_tok
    out = {
        "n_examples": len(rows), "n_dropped": stats["n_dropped_truncated"], "n_truncated": stats["n_truncated"],
        "n_tokens": n_tok, "nll": nll, "ppl": math.exp(nll),
        "nll_example_mean": sum(r["nll_mean"] for r in rows) / len(rows),
        "ppl_example_mean": sum(r["ppl"] for r in rows) / len(rows),
        "max_length": max_length,
    }
    return (out, rows) if return_rows else out


# --------------------------------------------------------------------------------------------------- entry point

def _fingerprint(cfg: EvalConfig, model, names: list[str], files: list[str | None]) -> dict:
    """What a stored task result depends on: its settings, its files' contents and the model's weights (by value:
    a model retrained into the same folder, with the same parameter count, is another model)."""
    from sftmix.rundir import file_sha256

    fp = {k: getattr(cfg, k) for k in names}
    fp["files"] = {f: file_sha256(f) for f in files if f and os.path.isfile(f)}
    fp["model"] = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    fp["model_parameters"] = sum(p.numel() for p in model.parameters())
    fp["model_weights"] = _weights_digest(model)
    return json.loads(json.dumps(fp, default=str))


_WEIGHTS_MEMO: dict = {}


def _weights_digest(model) -> str:
    """sha256 of every tensor of the state dict (names, dtypes, shapes, bytes); memoised per model object until a
    parameter changes in place (torch's version counters)."""
    state = model.state_dict()
    key = (id(model), tuple((k, t.data_ptr(), t._version) for k, t in state.items()))
    if key not in _WEIGHTS_MEMO:
        h = hashlib.sha256()
        for k, t in state.items():
            h.update(f"{k}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1e".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        _WEIGHTS_MEMO.clear()
        _WEIGHTS_MEMO[key] = h.hexdigest()
    return _WEIGHTS_MEMO[key]


def run_eval(model, tokenizer, eval_config: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Run every evaluation whose input file is set; returns {task: metrics} and writes them to output_dir."""
    cfg, out = eval_config, Path(output_dir)
    jobs = []
    if cfg.heldout_file:
        jobs.append(("heldout", eval_task_fields("heldout"), [cfg.heldout_file]))
        if cfg.answers:
            jobs.append(("answers", eval_task_fields("answers"), [cfg.heldout_file]))
    for t in MC_TASKS:
        if getattr(cfg, f"{t}_file"):
            jobs.append((t, eval_task_fields(t, cfg.mc_protocol),
                         [getattr(cfg, f"{t}_file"), getattr(cfg, f"{t}_shots_file")]))
        elif getattr(cfg, f"{t}_shots_file"):
            raise SFTMixError(f"{t}_shots_file is set but {t}_file is not; give the file to evaluate")
    mt = None
    if cfg.mtbench_file:  # FastChat's three files (questions, GPT-4's references, judge templates), maybe by Hub id
        from sftmix.eval.tasks import load_mt_bench_set

        mt = load_mt_bench_set(cfg.mtbench_file, cfg.mtbench_reference_file, cfg.mtbench_judge_prompts_file)
        jobs.append(("mtbench", eval_task_fields("mtbench"),
                     [mt["files"][k] for k in ("questions", "references", "judge_prompts")]))
    if cfg.alpacaeval_file:
        jobs.append(("alpacaeval", eval_task_fields("alpacaeval"), [cfg.alpacaeval_file]))
    if not jobs:
        raise SFTMixError("nothing to evaluate: set at least one of heldout_file, pubmedqa_file, medqa_file, "
                          "medqa5_file, medmcqa_file, mtbench_file, alpacaeval_file")
    results, todo = {}, []
    for task, names, files in jobs:
        path = out / f"{task}.json"
        fp = _fingerprint(cfg, model, names, files)
        if path.exists() and not cfg.overwrite:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("settings") == fp and not _judgments_to_retry(old, cfg.judge_retry_failed):
                log.info("%s: %s exists with the same settings; reusing it (overwrite=True to redo)", task, path)
                results[task] = old
                continue
        todo.append((task, fp))
    judged = [t for t, _ in todo if t in ("mtbench", "alpacaeval")]
    judge = make_judge(cfg, out) if judged else None
    if judge is not None:  # a judge that cannot work fails here, in one line, before any answer is generated
        from sftmix.eval import annotators
        from sftmix.eval.judge import preflight_item

        for task in judged:
            name = annotators.resolve(cfg.alpacaeval_annotator) if task == "alpacaeval" else "sftmix"
            if name == "sftmix":
                judge.preflight(*preflight_item(task, cfg.judge_prompt_dir, mt and mt["templates"]))
            else:  # alpaca_eval's own annotator, through the same endpoint
                judge.preflight_annotator(name, annotators.uses_logprobs(name))
    for task, fp in todo:
        path = out / f"{task}.json"
        t0 = time.perf_counter()
        if task == "heldout":
            from sftmix.data import ensure_chat_template, load_records

            ensure_chat_template(tokenizer, cfg.chat_template)
            metrics, rows = heldout_nll(model, tokenizer, load_records(cfg.heldout_file), cfg.batch_size,
                                        cfg.max_length, source=cfg.heldout_file, return_rows=True)
            metrics["file"] = cfg.heldout_file
            write_jsonl(out / "heldout_examples.jsonl", rows)
        elif task == "answers":
            from sftmix.data import ensure_chat_template, load_records

            ensure_chat_template(tokenizer, cfg.chat_template)
            metrics = heldout_answers(model, tokenizer, load_records(cfg.heldout_file), cfg.answers,
                                      cfg.answers_max_new_tokens, cfg.gen_batch_size)
        elif task in MC_TASKS:
            metrics = eval_mc_task(model, tokenizer, task, cfg, out, fp)
        else:
            from sftmix.data import ensure_chat_template

            ensure_chat_template(tokenizer, cfg.chat_template)
            if task == "mtbench":
                metrics = eval_mt_bench(model, tokenizer, cfg.mtbench_file, judge, cfg, out, fp, mt)
            else:
                metrics = eval_alpaca_eval(model, tokenizer, cfg.alpacaeval_file, judge, cfg, out, fp)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["settings"] = fp
        atomic_write_json(path, metrics)
        results[task] = metrics
    atomic_write_json(out / "results.json", results)
    return results


def _judgments_to_retry(stored: dict, retry_failed: bool) -> int:
    """Failed judgments a stored judged result should ask again: the transient ones (a result written before
    failures had kinds counts every failure as one), every failure with judge_retry_failed."""
    if retry_failed:
        return stored.get("n_failed") or 0
    return stored.get("n_failed_retryable", stored.get("n_failed")) or 0


def mc_rounds(cfg: EvalConfig) -> int:
    """The rounds of the multiple-choice tasks: eval_rounds, else 3 under mc_protocol=biomistral (the paper's
    three few-shot sets), else 1."""
    n = cfg.eval_rounds if cfg.eval_rounds is not None else 3 if cfg.mc_protocol == "biomistral" else 1
    if n < 1:
        raise SFTMixError(f"eval_rounds={n}: at least one round is needed; set eval_rounds to 1 or more")
    has_mc = any(getattr(cfg, f"{t}_file") for t in MC_TASKS)  # eval_rounds may be for MT-Bench / AlpacaEval only
    if n > 1 and cfg.mc_protocol != "biomistral" and has_mc:
        raise SFTMixError(f"eval_rounds={n} with mc_protocol=lm-eval: its shots are fixed, so every round would be "
                          f"the same; set eval_rounds 1 or mc_protocol biomistral")
    return n


_ROUND_KEYS = ("round", "seed", "accuracy", "ci95", "acc", "acc_norm", "n", "n_truncated", "answer_counts",
               "prediction_counts", "seconds")


def eval_mc_task(model, tokenizer, task: str, cfg: EvalConfig, out: Path, fingerprint: dict) -> dict:
    """One multiple-choice task: under lm-eval one call of eval_multiple_choice (as before rounds existed); under
    biomistral eval.rounds' rounds, each its own shot draw (seed + r), each round's predictions in
    <task>_predictions_round<r>.jsonl and its metrics in rounds/<task>/round_<r>.json (the unit of resume)."""
    files = (getattr(cfg, f"{task}_file"), getattr(cfg, f"{task}_shots_file"))
    n_rounds = mc_rounds(cfg)
    if cfg.mc_protocol != "biomistral":
        return eval_multiple_choice(model, tokenizer, task, *files, cfg, out)

    def one(r: int, seed: int) -> dict:
        m = eval_multiple_choice(model, tokenizer, task, *files, cfg, out, seed=seed,
                                 predictions_file=f"{task}_predictions_round{r}.jsonl")
        return {k: v for k, v in m.items() if k != "scoring"}

    res = run_rounds(n_rounds, cfg.seed, one, out / "rounds" / task, fingerprint, "accuracy")
    first = res["rounds"][0]
    metrics = {k: v for k, v in first.items() if k not in _ROUND_KEYS}
    metrics.update(n=first["n"], accuracy=res["mean"], accuracy_sd=res["sd"], accuracies=res["values"],
                   n_rounds=n_rounds, seeds=res["seeds"], n_rounds_reused=res["n_reused"],
                   rounds=[{k: m.get(k) for k in _ROUND_KEYS} for m in res["rounds"]])
    log.info("%s: accuracy %.4f +- %.4f over %d rounds (%s)", task, res["mean"], res["sd"], n_rounds,
             ", ".join(f"{v:.4f}" for v in res["values"]))
    return metrics


@dataclass
class _ModelArgs:
    model: str = field(default="smollm2", metadata={"help": (
        "Model to evaluate: a spec understood by sftmix.models.load_model_and_tokenizer (smollm2, tiny-random, a "
        "local HF directory, ...).")})
    output_dir: str = field(default="eval", metadata={"help": "Where the metrics and predictions go."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype (auto, float32, bfloat16, ...)."})
    device: str = field(default="auto", metadata={"help": "auto (GPU when present), cpu, cuda, ..."})


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    margs, cfg = TrlParser((_ModelArgs, EvalConfig)).parse_args_and_config(argv)
    from sftmix.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(margs.model, dtype=margs.dtype, device=margs.device)
    results = run_eval(model, tokenizer, cfg, margs.output_dir)
    for task, m in results.items():
        brief = {k: m[k] for k in ("accuracy", "ci95", "n", "nll", "ppl", "score", "win_rate", "lc_win_rate",
                                   "n_failed", "n_truncated", "seconds") if k in m}
        print(f"{task}: {json.dumps(brief, default=str)}")
    return results


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("sftmix.eval.evaluate"):
        main()
