"""Judged instruction following: MT-Bench grading and AlpacaEval win rates through an LLM judge (sftmix.judge).

    from sftmix.eval.judged import make_judge, eval_mt_bench
    metrics = eval_mt_bench(model, tokenizer, "question.jsonl", make_judge(cfg, "out"), cfg, "out")

Instruction following: answers are generated (batched, left padded, greedy unless `do_sample`, the model's chat
template) and judged by an LLM through an OpenAI-compatible endpoint (sftmix.judge): MT-Bench-style 1-10 grading of
both turns (`mtbench_file`: FastChat's question.jsonl, {question_id, category, turns, reference?}) and AlpacaEval-style
pairwise win rate against reference outputs (`alpacaeval_file`: JSON/JSONL of {instruction, output}).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sftmix.config import EvalConfig
from sftmix.eval.generation import generate
from sftmix.eval.tasks import _need, _read_rows, load_mt_bench
from sftmix.utils import SFTMixError, write_jsonl

log = logging.getLogger(__name__)


def make_judge(cfg: EvalConfig, output_dir: str | os.PathLike):
    from sftmix.judge import JudgeClient

    if not cfg.judge_model:
        raise SFTMixError("MT-Bench / AlpacaEval need a judge: set judge_model (and judge_base_url, e.g. "
                          "http://127.0.0.1:8000/v1 for a local vLLM or llama.cpp server)")
    return JudgeClient(cfg.judge_base_url, cfg.judge_model, api_key=cfg.judge_api_key,
                       api_key_env=cfg.judge_api_key_env, timeout=cfg.judge_timeout,
                       max_retries=cfg.judge_max_retries, backoff=cfg.judge_backoff,
                       cache_path=cfg.judge_cache_file or Path(output_dir) / "judge_cache.jsonl",
                       max_tokens=cfg.judge_max_tokens, retry_failed=cfg.judge_retry_failed)


def _gen_kwargs(cfg: EvalConfig) -> dict:
    return {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.gen_batch_size, "do_sample": cfg.do_sample,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}


def _gen_summary(gens: list[dict]) -> dict:
    return {"n_answers": len(gens), "n_unfinished": sum(not g["finished"] for g in gens),
            "mean_answer_tokens": sum(g["n_tokens"] for g in gens) / max(len(gens), 1)}


def eval_mt_bench(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Generate both turns (the second sees the model's own first answer), then grade each turn 1-10."""
    from sftmix.judge import judge_mt_bench, mt_bench_summary

    qs = load_mt_bench(path)
    first = generate(model, tokenizer, [[{"role": "user", "content": q["turns"][0]}] for q in qs], **_gen_kwargs(cfg))
    two = [i for i, q in enumerate(qs) if len(q["turns"]) == 2]
    second = generate(model, tokenizer, [[{"role": "user", "content": qs[i]["turns"][0]},
                                          {"role": "assistant", "content": first[i]["text"]},
                                          {"role": "user", "content": qs[i]["turns"][1]}] for i in two],
                      **_gen_kwargs(cfg))
    answers = [[g["text"]] for g in first]
    for i, g in zip(two, second):
        answers[i].append(g["text"])
    write_jsonl(Path(output_dir) / "mtbench_answers.jsonl",
                [{"question_id": q["question_id"], "category": q.get("category"), "turns": q["turns"], "answers": a}
                 for q, a in zip(qs, answers)])
    rows = judge_mt_bench(judge, qs, answers, cfg.judge_prompt_dir, cfg.judge_concurrency)
    write_jsonl(Path(output_dir) / "mtbench_judgments.jsonl", rows)
    return {"file": str(path), "n_questions": len(qs), "judge_model": judge.model, **mt_bench_summary(rows),
            "generation": _gen_summary(first + second)}


def eval_alpaca_eval(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Generate an answer per instruction and compare it pairwise with the file's reference `output`."""
    from sftmix.judge import judge_pairwise, win_rate

    rows = _read_rows(path)
    for i, r in enumerate(rows):
        for k in ("instruction", "output"):
            _need(r, k, path, f"{i + 1}")
    gens = generate(model, tokenizer, [[{"role": "user", "content": r["instruction"]}] for r in rows],
                    **_gen_kwargs(cfg))
    outs = [g["text"] for g in gens]
    write_jsonl(Path(output_dir) / "alpacaeval_outputs.jsonl",
                [{"instruction": r["instruction"], "output": o, "generator": "model"} for r, o in zip(rows, outs)])
    judged = judge_pairwise(judge, [r["instruction"] for r in rows], outs, [r["output"] for r in rows],
                            cfg.judge_prompt_dir, cfg.judge_concurrency)
    write_jsonl(Path(output_dir) / "alpacaeval_judgments.jsonl", judged)
    return {"file": str(path), "judge_model": judge.model, **win_rate(judged), "generation": _gen_summary(gens)}
