"""Judged instruction following: MT-Bench as FastChat runs it and AlpacaEval win rates, through an LLM judge
(sftmix.eval.judge), over evaluation rounds (sftmix.eval.rounds).

    from sftmix.eval.judged import make_judge, eval_mt_bench
    metrics = eval_mt_bench(model, tokenizer, "lmsys/mt-bench", make_judge(cfg, "out"), cfg, "out")

MT-Bench (`mtbench_file`: FastChat's question.jsonl or a Hub repo in FastChat's data/ layout, sftmix.eval.tasks):
both turns are answered (batched, left padded, the model's chat template) with FastChat's sampling temperature per
category (`mtbench_temperature`), each round with its own seed, and graded 1-10 per turn with FastChat's templates;
reported are the score overall, per turn and per category, mean +- sd over the rounds with every round's value.
AlpacaEval (`alpacaeval_file`: JSON/JSONL of {instruction, output}): pairwise win rate against the reference outputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sftmix.config import EvalConfig
from sftmix.eval.generation import generate
from sftmix.utils import SFTMixError, write_jsonl

log = logging.getLogger(__name__)


def make_judge(cfg: EvalConfig, output_dir: str | os.PathLike):
    from sftmix.eval.judge import JudgeClient

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


def _answer(model, tokenizer, conversations: list[list[dict]], cfg: EvalConfig, **kw) -> list[dict]:
    """Answers from the local model, or from the server of the model under test (generation_base_url)."""
    if not cfg.generation_base_url:
        return generate(model, tokenizer, conversations, **kw)
    from sftmix.eval.generation import generate_via_server

    if not cfg.generation_model:
        raise SFTMixError("generation_base_url is set but generation_model is not; set it to the model name the "
                          "server serves")
    kw.pop("batch_size", None)
    return generate_via_server(cfg.generation_base_url, cfg.generation_model, conversations,
                               api_key=os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None,
                               concurrency=cfg.judge_concurrency, **kw)


def _backend(cfg: EvalConfig) -> str:
    return (f"server {cfg.generation_base_url} (model {cfg.generation_model})" if cfg.generation_base_url
            else "local model")


def _annotator_label(annotator: str) -> str:
    from sftmix.eval.annotators import NON_LOGPROB

    if annotator == "sftmix":
        return "sftmix's pairwise prompt (sftmix/judge_prompts/pairwise.txt), not AlpacaEval 2's annotator"
    return f"alpaca_eval's {annotator} annotator" + (" (no logprobs)" if annotator in NON_LOGPROB else "")


def _gen_summary(gens: list[dict]) -> dict:
    return {"n_answers": len(gens), "n_unfinished": sum(not g["finished"] for g in gens),
            "mean_answer_tokens": sum(g["n_tokens"] for g in gens) / max(len(gens), 1)}


def judged_rounds(cfg: EvalConfig) -> int:
    """Rounds of MT-Bench and AlpacaEval: eval_rounds, else the paper's 5."""
    n = cfg.eval_rounds if cfg.eval_rounds is not None else 5
    if n < 1:
        raise SFTMixError(f"eval_rounds={n}: at least one round is needed; set eval_rounds to 1 or more")
    return n


def _stale_rounds(store: Path, retry_failed: bool) -> None:
    """Forget stored rounds whose judgments should be asked again (transient failures; any with judge_retry_failed),
    so that eval.rounds runs them again; their usable judgments come back from the judge's cache."""
    import json

    for f in sorted(store.glob("round_*.json")) if store.is_dir() else ():
        m = json.loads(f.read_text(encoding="utf-8")).get("metrics") or {}
        if m.get("n_failed_retryable") or (retry_failed and m.get("n_failed")):
            log.info("%s: %d failed judgment(s) to ask again; running that round again", f, m.get("n_failed"))
            f.unlink()


def _mt_bench_answers(model, tokenizer, qs: list[dict], cfg: EvalConfig, seed: int) -> tuple[list[list[str]], list]:
    """Both turns (the second sees the model's own first answer), with FastChat's temperature per category
    (mtbench_temperature=fastchat: greedy below 1e-4) or the generation settings (config); returns the answers and
    the generation records."""
    from sftmix.eval.tasks import mt_bench_temperature

    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(qs):
        if cfg.mtbench_temperature == "fastchat":
            t = mt_bench_temperature(q.get("category"))
            key = (t >= 1e-4, t, 1.0)
        else:
            key = (cfg.do_sample, cfg.temperature, cfg.top_p)
        groups.setdefault(key, []).append(i)
    answers: list[list[str]] = [[] for _ in qs]
    gens = []
    for (do_sample, temperature, top_p), idx in sorted(groups.items()):
        kw = {**_gen_kwargs(cfg), "do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}
        first = _answer(model, tokenizer, [[{"role": "user", "content": qs[i]["turns"][0]}] for i in idx], cfg,
                        **kw)
        for i, g in zip(idx, first):
            answers[i].append(g["text"])
        two = [i for i in idx if len(qs[i]["turns"]) == 2]
        second = _answer(model, tokenizer, [[{"role": "user", "content": qs[i]["turns"][0]},
                                             {"role": "assistant", "content": answers[i][0]},
                                             {"role": "user", "content": qs[i]["turns"][1]}] for i in two], cfg, **kw)
        for i, g in zip(two, second):
            answers[i].append(g["text"])
        gens += first + second
    return answers, gens


def eval_mt_bench(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike,
                  fingerprint: dict | None = None, mt: dict | None = None) -> dict:
    """MT-Bench as FastChat runs it, over eval_rounds rounds (sftmix.eval.rounds: round r samples with seed + r):
    answers, FastChat's single-answer grading of each turn, the score per turn and per category; mean +- sd."""
    from sftmix.eval.judge import judge_mt_bench, mt_bench_summary
    from sftmix.eval.rounds import run_rounds, summarize
    from sftmix.eval.tasks import load_mt_bench_set

    out = Path(output_dir)
    mt = mt or load_mt_bench_set(path, cfg.mtbench_reference_file, cfg.mtbench_judge_prompts_file)
    qs = mt["questions"]
    store = out / "rounds" / "mtbench"
    _stale_rounds(store, cfg.judge_retry_failed)

    def one(r: int, seed: int) -> dict:
        answers, gens = _mt_bench_answers(model, tokenizer, qs, cfg, seed)
        write_jsonl(out / f"mtbench_answers_round{r}.jsonl",
                    [{"question_id": q["question_id"], "category": q.get("category"), "turns": q["turns"],
                      "answers": a} for q, a in zip(qs, answers)])
        rows = judge_mt_bench(judge, qs, answers, mt["templates"], mt["references"], cfg.judge_concurrency)
        write_jsonl(out / f"mtbench_judgments_round{r}.jsonl", rows)
        summary = mt_bench_summary(rows)
        if summary["score"] is None:  # no usable judgment at all: the round has no value, it is still kept
            summary["score"] = float("nan")
        return {**summary, "generation": _gen_summary(gens)}

    res = run_rounds(judged_rounds(cfg), cfg.seed, one, store, fingerprint or {}, "score")
    rounds = res["rounds"]
    metrics = {"file": str(path), "protocol": "fastchat single-answer grading (single-v1 / single-math-v1)",
               "source": mt["source"], "n_questions": len(qs), "judge_model": judge.model,
               "temperatures": cfg.mtbench_temperature, "answers_from": _backend(cfg),
               "n_rounds": res["n_rounds"], "seeds": res["seeds"],
               "n_rounds_reused": res["n_reused"], "score": res["mean"], "score_sd": res["sd"],
               "scores": res["values"]}
    for t in (1, 2):
        vals = [m.get(f"score_turn{t}") for m in rounds]
        if all(v is not None for v in vals):
            s = summarize(vals)
            metrics.update({f"score_turn{t}": s["mean"], f"score_turn{t}_sd": s["sd"], f"scores_turn{t}": s["values"]})
    cats = sorted({c for m in rounds for c in (m.get("score_by_category") or {})})
    metrics["score_by_category"] = {
        c: summarize([m["score_by_category"][c] for m in rounds if m["score_by_category"].get(c) is not None])["mean"]
        for c in cats if any(m["score_by_category"].get(c) is not None for m in rounds)}
    for k in ("n_judgments", "n_failed", "n_failed_retryable"):
        metrics[k] = sum(m.get(k) or 0 for m in rounds)
    metrics["rounds"] = [{k: m.get(k) for k in ("round", "seed", "score", "score_turn1", "score_turn2", "n_judgments",
                                                 "n_failed", "n_failed_retryable", "generation")} for m in rounds]
    metrics["generation"] = rounds[0].get("generation")
    log.info("mtbench: %.3f +- %.3f over %d rounds (turn 1 %s, turn 2 %s)", res["mean"], res["sd"], res["n_rounds"],
             metrics.get("score_turn1"), metrics.get("score_turn2"))
    return metrics


def eval_alpaca_eval(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike,
                     fingerprint: dict | None = None) -> dict:
    """An answer per instruction compared pairwise with the reference `output`, over eval_rounds rounds (round r
    generates with seed + r; sftmix.eval.rounds): win rate and LC win rate, mean +- sd, every round's value kept."""
    from sftmix.eval import annotators
    from sftmix.eval.judge import judge_pairwise, win_rate
    from sftmix.eval.rounds import run_rounds, summarize
    from sftmix.eval.tasks import HUB_EVAL_SOURCES, load_alpaca_eval

    out = Path(output_dir)
    rows = load_alpaca_eval(path)
    store = out / "rounds" / "alpacaeval"
    _stale_rounds(store, cfg.judge_retry_failed)
    annotator = annotators.resolve(cfg.alpacaeval_annotator)

    def one(r: int, seed: int) -> dict:
        gens = _answer(model, tokenizer, [[{"role": "user", "content": x["instruction"]}] for x in rows], cfg,
                       **{**_gen_kwargs(cfg), "seed": seed})
        outs = [g["text"] for g in gens]
        write_jsonl(out / f"alpacaeval_outputs_round{r}.jsonl",
                    [{"instruction": x["instruction"], "output": o, "generator": "model"} for x, o in zip(rows, outs)])
        ins, refs = [x["instruction"] for x in rows], [x["output"] for x in rows]
        if annotator == "sftmix":
            judged = judge_pairwise(judge, ins, outs, refs, cfg.judge_prompt_dir, cfg.judge_concurrency)
            m = win_rate(judged)
        else:  # alpaca_eval's annotator, win rate and LC model
            judged = annotators.annotate(annotator, ins, outs, refs, cfg, out, seed=seed)
            m = annotators.summarize_annotations(judged)
        write_jsonl(out / f"alpacaeval_judgments_round{r}.jsonl", judged)
        if m["win_rate"] is None:  # no usable judgment: the round has no value, it is still kept
            m["win_rate"] = float("nan")
        return {**m, "generation": _gen_summary(gens)}

    res = run_rounds(judged_rounds(cfg), cfg.seed, one, store, fingerprint or {}, "win_rate")
    rounds = res["rounds"]
    metrics = {"file": str(path), "source": HUB_EVAL_SOURCES.get(str(path)), "judge_model": judge.model,
               "annotator": annotator,
               "protocol": f"{_annotator_label(annotator)} against the reference outputs; LC: "
                           f"{rounds[0].get('lc_method')}",
               "answers_from": _backend(cfg), "n_rounds": res["n_rounds"], "seeds": res["seeds"],
               "n_rounds_reused": res["n_reused"], "win_rate": res["mean"], "win_rate_sd": res["sd"],
               "win_rates": res["values"],
               "lc_method": rounds[0].get("lc_method")}
    lc = [m.get("lc_win_rate") for m in rounds]
    if all(v is not None for v in lc):
        s = summarize(lc)
        metrics.update(lc_win_rate=s["mean"], lc_win_rate_sd=s["sd"], lc_win_rates=s["values"], lc_note=None)
    else:
        metrics.update(lc_win_rate=None, lc_note=next((m.get("lc_note") for m in rounds if m.get("lc_note")), None))
    for k in ("n", "n_valid", "n_failed", "n_failed_retryable", "wins", "losses", "ties"):
        metrics[k] = sum(m.get(k) or 0 for m in rounds)
    metrics["rounds"] = [{k: m.get(k) for k in ("round", "seed", "win_rate", "win_rate_se", "lc_win_rate", "n",
                                                 "n_valid", "n_failed", "generation")} for m in rounds]
    metrics["generation"] = rounds[0].get("generation")
    return metrics
