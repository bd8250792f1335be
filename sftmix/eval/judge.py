"""LLM-as-a-judge through any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, OpenAI, ...).

    from sftmix.eval.judge import JudgeClient, judge_mt_bench, mt_bench_summary, judge_pairwise, win_rate
    client = JudgeClient("http://127.0.0.1:8000/v1", model="judge", api_key_env="OPENAI_API_KEY",
                         cache_path="run/eval/judge_cache.jsonl")
    mt = sftmix.eval.tasks.load_mt_bench_set("lmsys/mt-bench")    # FastChat's questions, references, templates
    rows = judge_mt_bench(client, mt["questions"], answers, mt["templates"], mt["references"])
    print(mt_bench_summary(rows))                           # mean score per turn and category, failures apart
    rows = judge_pairwise(client, instructions, outputs, references)   # AlpacaEval style, model vs reference
    print(win_rate(rows))                                   # win rate, standard error, length-controlled win rate

Only the standard library talks HTTP (urllib): POST {base_url}/chat/completions with temperature 0.
Retries (`JudgeClient._post`, up to max_retries after the first request, waiting backoff * 2**(retry - 1) seconds,
at most 60): transport errors, timeouts, HTTP 408/409/425/429/500/502/503/504, bodies that are not the expected JSON,
and replies without a parseable rating / verdict (unless the same one comes twice in a row); any other HTTP status
fails at once. A judgment that still fails, or whose text holds no parseable rating/verdict, is returned with
failed=True and is never counted as a win, a loss or a score.
Cache: every usable completion (one holding a rating / verdict) is appended (one write per line, under a lock) to a
JSONL file keyed by sha256(judge model, messages, temperature, max_tokens); the messages contain the question and the
answer, so a rerun of the same evaluation makes no HTTP call.
Failures come in two kinds. A deterministic one (the same request got the same reply without a rating / verdict twice
in a row, or an HTTP error status outside that retried set) would fail the same way again: it is cached as failed
({"failed": true, "error", "text"}) and a rerun reports it without asking (`retry_failed=True`, the setting
`judge_retry_failed`, asks again). A transient one (transport errors, timeouts, a retried HTTP status, malformed
JSON, retries exhausted on differing replies) is not cached: a rerun asks again. Rows carry `retryable` to tell them
apart.
Pre-flight (`preflight`): one request on a fixed item before any answer is generated, failing in one line on an
unreachable endpoint, a refused model name or key, or a reply without a parseable verdict.
Progress: `map` logs a line every 10% of the items with the running count of failed judgments.

MT-Bench is graded as FastChat's llm_judge does (fschat 0.2.36, fastchat/llm_judge/common.py run_judge_single):
FastChat's own templates from its judge_prompts.jsonl (single-v1, single-math-v1 and their -multi-turn forms, each
with its own system prompt), GPT-4's reference answers for the reference categories only (math, reasoning, coding),
FastChat's rating parser (the first [[x]], else the first [x]); tests/test_mtbench.py checks the messages and the
parser against FastChat's own code. The pairwise prompt (AlpacaEval style) is a text file in sftmix/judge_prompts/
(or `prompt_dir`): system.txt and pairwise.txt, with {instruction}, {output_a}, {output_b}.

Pairwise order: the model's output is shown as A or B depending on a hash of the instruction (deterministic, about
half each), which cancels the judge's position bias on average. Ties count half a win (as in AlpacaEval).
Length-controlled win rate: alpaca_eval's own `length_controlled_v1` (get_length_controlled_winrate, alpaca_eval
0.6.6) on alpaca_eval-format annotations of the judgments, when the package is installed (`sftmix[alpaca-eval]`);
`lc_method` names which was used. The fallback without it (documented, not AlpacaEval 2's number): a logistic
regression of the outcome on tanh((len_model - len_reference) / std) over characters, with an intercept, read at equal
length as sigmoid(intercept), with no instruction-difficulty term and no regularisation toward the gamed baselines
(alpaca_eval's "length_controlled_minimal").
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from sftmix.utils import SFTMixError

log = logging.getLogger(__name__)

RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}
_PREFLIGHT_OK: dict[tuple, str] = {}  # (url, model, request key) -> the reply of a passed pre-flight


class JudgeClient:
    """Chat completions with retries and a persistent cache. Thread-safe; `n_requests` counts HTTP calls made."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, cache_path: str | None = None,
                 max_tokens: int = 1024, temperature: float = 0.0, retry_failed: bool = False):
        if not base_url or not model:
            raise SFTMixError("the judge needs a base URL and a model name (judge_base_url, judge_model); e.g. "
                              "judge_base_url=http://127.0.0.1:8000/v1 for a local vLLM or llama.cpp server")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache_path = Path(cache_path) if cache_path else None
        self.retry_failed = retry_failed
        self.n_requests = 0
        self._lock = threading.Lock()
        self._failed: dict[str, dict] = {}  # deterministic failures: key -> {"text", "error"}
        self._cache = self._load_cache()

    # --------------------------------------------------------------------------------------------------- cache
    def _load_cache(self) -> dict[str, str]:
        cache: dict[str, str] = {}
        if self.cache_path is None or not self.cache_path.exists():
            return cache
        bad = 0
        with open(self.cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    if row.get("failed"):
                        self._failed[row["key"]] = {"text": row.get("text"), "error": row["error"]}
                    else:
                        cache[row["key"]] = row["text"]
                        self._failed.pop(row["key"], None)  # a later success (judge_retry_failed) wins
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    bad += 1  # a line torn by a killed run: that judgment is simply asked again
        if bad:
            log.warning("%s: ignored %d unreadable line(s); those judgments will be requested again",
                        self.cache_path, bad)
        return cache

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _store(self, key: str, text: str | None, error: str | None = None) -> None:
        """Append a usable reply, or (error set) a deterministic failure, to the cache."""
        with self._lock:
            row = {"key": key, "model": self.model, "text": text}
            if error is None:
                self._cache[key] = text
            else:
                self._failed[key] = {"text": text, "error": error}
                row.update(failed=True, error=error)
            if self.cache_path is None:
                return
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps(row, ensure_ascii=False) + "\n"
            # one O_APPEND write per line: concurrent writers never interleave inside a line
            fd = os.open(self.cache_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---------------------------------------------------------------------------------------------------- HTTP
    def complete(self, messages: list[dict], valid=None) -> dict:
        """{"text", "error", "cached", "attempts", "retryable"}; never raises for HTTP trouble.

        `valid(text)` (optional) tells a usable reply (one with a verdict / rating). An unusable reply is asked again
        (within max_retries); the same unusable reply twice in a row is a deterministic failure, cached as failed (see
        the module doc), as is a non-retryable HTTP 4xx. Other failures are `retryable`: not cached, asked next run."""
        key = self.key(messages)
        with self._lock:
            if key in self._cache and (valid is None or valid(self._cache[key])):
                return {"text": self._cache[key], "error": None, "cached": True, "attempts": 0, "retryable": False}
            if key in self._failed and not self.retry_failed:
                f = self._failed[key]
                return {"text": f["text"], "error": f["error"], "cached": True, "attempts": 0, "retryable": False}
        res = self._post(messages, valid)
        if res["error"] is None:
            self._store(key, res["text"])
        elif not res["retryable"]:
            self._store(key, res["text"], res["error"])
        return res

    def _post(self, messages: list[dict], valid=None) -> dict:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error, text, previous = None, None, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
            with self._lock:
                self.n_requests += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                error, text = f"HTTP {e.code}: {_snippet(e.read())}", None
                if e.code not in RETRYABLE_HTTP:
                    # a bad request, model name or key does not get better by asking again
                    return {"text": None, "error": error, "cached": False, "attempts": attempt + 1,
                            "retryable": False}
                continue
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, socket.timeout, OSError) as e:
                error, text = f"{type(e).__name__}: {getattr(e, 'reason', e)}", None
                continue
            try:
                text = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error, text = f"bad response ({type(e).__name__}): {_snippet(raw)}", None
                continue
            if valid is None or valid(text):
                return {"text": text, "error": None, "cached": False, "attempts": attempt + 1, "retryable": False}
            error = "no parseable verdict in the judge's reply"
            if text == previous:  # the same request, the same unusable reply: asking again will not help
                return {"text": text, "error": error, "cached": False, "attempts": attempt + 1, "retryable": False}
            previous = text
        return {"text": text, "error": error, "cached": False, "attempts": attempt + 1, "retryable": True}

    def preflight(self, messages: list[dict], valid, what: str) -> str:
        """One request on a fixed item (never cached), before any answer is generated: raises SFTMixError in one
        line when the endpoint is unreachable, refuses the model name or key, or replies without a verdict."""
        memo = (self.url, self.model, self.key(messages))
        if memo in _PREFLIGHT_OK:  # once per process and judge: `sftmix run` evaluates several models in a row
            return _PREFLIGHT_OK[memo]
        res = self._post(messages, valid)
        where = f"judge_model={self.model!r} at judge_base_url={self.url.rsplit('/chat/completions', 1)[0]}"
        if res["text"] is None:
            raise SFTMixError(f"judge pre-flight failed before any answer was generated: {where}: {res['error']}; "
                              f"check judge_base_url, judge_model and the API key (judge_api_key_env)")
        if res["error"] is not None:
            raise SFTMixError(f"judge pre-flight failed before any answer was generated: {where} replied without "
                              f"a parseable {what} ({_snippet(res['text'], 80)!r}); use a judge that follows the "
                              f"prompt's format or adapt the prompts (judge_prompt_dir)")
        _PREFLIGHT_OK[memo] = res["text"]
        return res["text"]

    def preflight_annotator(self, annotator: str, logprobs: bool) -> None:
        """The pre-flight of an alpaca_eval annotator (sftmix.eval.annotators): one request for one token, with the
        top logprobs when the annotator reads its preference from them; one line when they do not come back."""
        memo = (self.url, self.model, annotator)
        if memo in _PREFLIGHT_OK:
            return
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with the single letter m."}],
                "max_tokens": 1, "temperature": 0}
        if logprobs:
            body.update(logprobs=True, top_logprobs=5)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"}
                                                           if self.api_key else {})}
        where = f"judge_model={self.model!r} at judge_base_url={self.url.rsplit('/chat/completions', 1)[0]}"
        try:
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                choice = json.loads(resp.read())["choices"][0]
        except urllib.error.HTTPError as e:
            raise SFTMixError(f"judge pre-flight failed before any answer was generated: {where}: HTTP {e.code}: "
                              f"{_snippet(e.read())}; check judge_base_url, judge_model and the API key") from None
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as e:
            raise SFTMixError(f"judge pre-flight failed before any answer was generated: {where}: "
                              f"{type(e).__name__}: {getattr(e, 'reason', e)}; check judge_base_url") from None
        top = ((((choice.get("logprobs") or {}).get("content") or [{}])[0]) or {}).get("top_logprobs")
        if logprobs and not top:
            from sftmix.eval.annotators import NON_LOGPROB

            raise SFTMixError(f"{where} returned no logprobs, which alpacaeval_annotator={annotator} reads its "
                              f"preference from; set alpacaeval_annotator to one of alpaca_eval's annotators "
                              f"without logprobs ({', '.join(NON_LOGPROB)}; reported as such) or to sftmix")
        _PREFLIGHT_OK[memo] = "ok"

    def map(self, messages_list: list[list[dict]], concurrency: int = 4, desc: str = "judging",
            valid=None) -> list[dict]:
        """complete() over many prompts with a thread pool (the work is waiting on the server), in order; a log line
        every 10% of the items with the running count of failed judgments, so a failing judge shows early."""
        from tqdm.auto import tqdm

        n, done, failed = len(messages_list), 0, 0
        step = max(1, n // 10)
        bar = tqdm(total=n, desc=desc, leave=False)

        def one(m):
            nonlocal done, failed
            res = self.complete(m, valid)
            with self._lock:
                done += 1
                failed += res["error"] is not None
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
                if done % step == 0 or done == n:
                    log.info("%s: %d/%d judged, %d failed%s", desc, done, n, failed,
                             f" (last error: {res['error'][:120]})" if res["error"] and failed else "")
            return res

        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                return list(pool.map(one, messages_list))
        finally:
            bar.close()


def _snippet(raw: bytes | str, n: int = 200) -> str:
    s = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return s[:n].replace("\n", " ")


# ------------------------------------------------------------------------------------------------------ prompts

def load_prompt(name: str, prompt_dir: str | None = None) -> str:
    """The judge prompt `name` (e.g. "pairwise") from `prompt_dir`, else from the package's judge_prompts/."""
    if prompt_dir:
        path = Path(prompt_dir) / f"{name}.txt"
        if not path.is_file():
            raise SFTMixError(f"{path}: judge prompt file not found; copy sftmix/judge_prompts/{name}.txt there")
        return path.read_text(encoding="utf-8")
    return resources.files("sftmix").joinpath("judge_prompts", f"{name}.txt").read_text(encoding="utf-8")


def _messages(name: str, prompt_dir: str | None, **fields) -> list[dict]:
    user = load_prompt(name, prompt_dir).format_map(fields)
    return [{"role": "system", "content": load_prompt("system", prompt_dir).strip()}, {"role": "user", "content": user}]


# FastChat's rating patterns (fastchat/llm_judge/common.py: one_score_pattern, one_score_pattern_backup)
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str | None) -> float | None:
    """FastChat's parsing: the first "[[x]]", else the first "[x]", as a number; None (FastChat's -1: a failed
    judgment) when neither is there."""
    m = _RATING.search(text or "") or _RATING_BACKUP.search(text or "")
    return float(m.group(1)) if m else None


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from "[[A]]", "[[B]]", "[[C]]"; None when absent or contradictory (a failed judgment)."""
    found = set(_VERDICT.findall(text or ""))
    if len(found) != 1:
        return None
    v = found.pop()
    return "tie" if v == "C" else v


# ----------------------------------------------------------------------------------------------------- MT-Bench

def mt_bench_messages(question: dict, answers: list[str], turn: int, templates: dict,
                      reference: list[str] | None = None) -> list[dict]:
    """The judge's messages for one (question, turn) as FastChat's run_judge_single builds them: single-v1, or
    single-math-v1 with GPT-4's reference answers for the reference categories (NEED_REF_CATS), their -multi-turn forms
    for turn 2; the template's own system prompt (none when empty, as Conversation.to_openai_api_messages does)."""
    from sftmix.eval.tasks import NEED_REF_CATS

    math = question.get("category") in NEED_REF_CATS
    t = templates[("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")]
    kw = {}
    if math:
        kw["ref_answer_1"] = reference[0]
        if turn == 2:
            kw["ref_answer_2"] = reference[1]
    if turn == 2:
        user = t["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                           answer_1=answers[0], answer_2=answers[1], **kw)
    else:
        user = t["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kw)
    system = [{"role": "system", "content": t["system_prompt"]}] if t["system_prompt"] != "" else []
    return system + [{"role": "user", "content": user}]


def judge_mt_bench(client: JudgeClient, questions: list[dict], answers: list[list[str]], templates: dict,
                   references: dict | None = None, concurrency: int = 4) -> list[dict]:
    """FastChat's single-answer grading, one judgment per turn (turn 2 sees the whole conversation).

    questions: FastChat's {"question_id", "category", "turns"}; answers: per question, the model's answer per turn;
    templates: FastChat's judge_prompts.jsonl by name; references: {question_id: GPT-4's answer per turn} for the
    reference categories. Returns rows {question_id, category, turn, rating, failed, error, judgment, cached,
    retryable}."""
    jobs, meta = [], []
    for q, ans in zip(questions, answers, strict=True):
        for t in range(1, len(q["turns"]) + 1):
            jobs.append(mt_bench_messages(q, ans, t, templates, (references or {}).get(q["question_id"])))
            meta.append({"question_id": q["question_id"], "category": q.get("category"), "turn": t})
    rows = []
    replies = client.map(jobs, concurrency, desc="judging MT-Bench", valid=lambda t: parse_rating(t) is not None)
    for m, res in zip(meta, replies):
        rating = parse_rating(res["text"])
        error = None if rating is not None else res["error"] if res["text"] is None \
            else "no [[rating]] in the judge's reply"
        rows.append({**m, "rating": rating, "failed": rating is None, "error": error, "judgment": res["text"],
                     "cached": res["cached"], "retryable": rating is None and res["retryable"]})
    return rows


def mt_bench_summary(rows: list[dict]) -> dict:
    """Mean rating per turn and overall over successful judgments; failures are counted, never scored."""
    ok = [r for r in rows if not r["failed"]]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    out = {"n_judgments": len(rows), "n_failed": len(rows) - len(ok),
           "n_failed_retryable": sum(bool(r.get("retryable")) for r in rows), "score": mean([r["rating"] for r in ok])}
    for t in sorted({r["turn"] for r in rows}):
        out[f"score_turn{t}"] = mean([r["rating"] for r in ok if r["turn"] == t])
    cats = sorted({r["category"] for r in rows if r.get("category")})
    if cats:
        out["score_by_category"] = {c: mean([r["rating"] for r in ok if r.get("category") == c]) for c in cats}
    return out


# ---------------------------------------------------------------------------------------------------- pairwise

def model_is_b(instruction: str) -> bool:
    """Where the model's output is shown: a hash of the instruction, so the order is stable across reruns."""
    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:8], 16) % 2 == 1


def judge_pairwise(client: JudgeClient, instructions: list[str], outputs: list[str], references: list[str],
                   prompt_dir: str | None = None, concurrency: int = 4) -> list[dict]:
    """AlpacaEval-style comparison of the model's output with a reference output per instruction.

    Returns rows {index, winner: "model" | "reference" | "tie" | None, failed, error, model_is_b, len_model,
    len_reference, judgment, cached}."""
    jobs, swaps = [], []
    for ins, out, ref in zip(instructions, outputs, references, strict=True):
        b = model_is_b(ins)
        a_text, b_text = (ref, out) if b else (out, ref)
        jobs.append(_messages("pairwise", prompt_dir, instruction=ins, output_a=a_text, output_b=b_text))
        swaps.append(b)
    rows = []
    replies = client.map(jobs, concurrency, desc="judging pairwise", valid=lambda t: parse_verdict(t) is not None)
    for i, (res, b) in enumerate(zip(replies, swaps)):
        v = parse_verdict(res["text"])
        winner = None if v is None else "tie" if v == "tie" else "model" if (v == "B") == b else "reference"
        error = None if v is not None else "no single [[A]]/[[B]]/[[C]] verdict in the judge's reply" \
            if res["text"] is not None else res["error"]
        rows.append({"index": i, "instruction": instructions[i], "output": outputs[i], "reference": references[i],
                     "winner": winner, "failed": winner is None, "error": error, "model_is_b": b,
                     "len_model": len(outputs[i]), "len_reference": len(references[i]), "judgment": res["text"],
                     "cached": res["cached"], "retryable": winner is None and res["retryable"]})
    return rows


def win_rate(rows: list[dict]) -> dict:
    """Win rate of the model over the reference (ties count 1/2) with its standard error, over successful
    judgments only; failures are reported in n_failed. Adds the length-controlled win rate when it is defined."""
    ok = [r for r in rows if not r["failed"]]
    wins = sum(r["winner"] == "model" for r in ok)
    losses = sum(r["winner"] == "reference" for r in ok)
    ties = sum(r["winner"] == "tie" for r in ok)
    out = {"n": len(rows), "n_valid": len(ok), "n_failed": len(rows) - len(ok),
           "n_failed_retryable": sum(bool(r.get("retryable")) for r in rows), "wins": wins, "losses": losses,
           "ties": ties, "win_rate": None, "win_rate_se": None, "lc_win_rate": None, "lc_note": None,
           "lc_method": None}
    if not ok:
        out["lc_note"] = "no successful judgment"
        return out
    scores = [1.0 if r["winner"] == "model" else 0.5 if r["winner"] == "tie" else 0.0 for r in ok]
    n = len(scores)
    p = sum(scores) / n
    var = sum((s - p) ** 2 for s in scores) / max(n - 1, 1)
    out["win_rate"], out["win_rate_se"] = p, math.sqrt(var / n)
    out["lc_win_rate"], out["lc_note"], out["lc_method"] = length_controlled(ok)
    return out


ALPACA_EVAL_PREFERENCE = {"model": 2.0, "reference": 1.0, "tie": 1.5}  # alpaca_eval: 2 = output_2 preferred


def alpaca_eval_annotations(ok: list[dict], annotator: str = "sftmix") -> list[dict]:
    """alpaca_eval's annotation records of successful pairwise rows: output_1 / generator_1 the reference (its
    baseline), output_2 / generator_2 the model, preference 2 (model), 1 (reference) or 1.5 (tie), index the
    instruction's row in the evaluated set (alpaca_eval's instruction index for its 805 instructions in order)."""
    return [{"instruction": r.get("instruction", ""), "output_1": r["reference"], "output_2": r["output"],
             "generator_1": "reference", "generator_2": "model", "annotator": annotator,
             "preference": ALPACA_EVAL_PREFERENCE[r["winner"]], "index": r["index"]} for r in ok]


def length_controlled(ok: list[dict]) -> tuple[float | None, str | None, str]:
    """(LC win rate, note, method): alpaca_eval's own `length_controlled_v1` GLM (length, instruction difficulty,
    regularised toward its gamed baselines; it fetches df_gamed.csv from the Hub dataset tatsu-lab/alpaca_eval) when
    the package is installed (`pip install 'sftmix[alpaca-eval]'`); else sftmix's reduced fallback (see the module
    doc), named as such."""
    if len(ok) < 10:
        return None, f"needs at least 10 successful judgments, got {len(ok)}", "none"
    try:
        from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
    except ImportError:
        value, note = length_controlled_win_rate(ok)
        return value, note, "sftmix fallback (alpaca_eval not installed): length only, no instruction difficulty"
    if any("output" not in r or "reference" not in r for r in ok):  # rows judged before the texts were kept
        value, note = length_controlled_win_rate(ok)
        return value, note, "sftmix fallback (judgments without their texts): length only"
    if len({r["winner"] for r in ok}) < 2:
        return None, "every judgment went the same way: the regression is not identified", \
            "alpaca_eval length_controlled_v1"
    try:  # it fetches df_gamed.csv from the Hub dataset tatsu-lab/alpaca_eval (HF_ENDPOINT, the HF cache)
        m = get_length_controlled_winrate(alpaca_eval_annotations(ok), glm_name="length_controlled_v1",
                                          save_weights_dir=None, is_warn_extreme_changes=False)
    except Exception as e:  # offline without df_gamed.csv cached, ...: the win rate stands, the LC is not defined
        return None, f"alpaca_eval's length_controlled_v1 failed: {type(e).__name__}: {str(e)[:160]}", \
            "alpaca_eval length_controlled_v1"
    return float(m["length_controlled_winrate"]) / 100, None, "alpaca_eval length_controlled_v1"


def length_controlled_win_rate(ok: list[dict]) -> tuple[float | None, str | None]:
    """The fallback: sigmoid(intercept) of a logistic regression of win on tanh(length difference / its std)."""
    if len(ok) < 10:
        return None, f"needs at least 10 successful judgments, got {len(ok)}"
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    diff = np.array([r["len_model"] - r["len_reference"] for r in ok], dtype=float)
    std = diff.std()
    x = np.tanh(diff / std) if std > 0 else np.zeros_like(diff)
    X, y, w = [], [], []
    for xi, r in zip(x, ok):
        if r["winner"] == "tie":  # a tie is half a win and half a loss
            X += [[xi], [xi]]
            y += [1, 0]
            w += [0.5, 0.5]
        else:
            X.append([xi])
            y.append(int(r["winner"] == "model"))
            w.append(1.0)
    if len(set(y)) < 2:
        return None, "every judgment went the same way: the regression is not identified"
    lr = LogisticRegression(C=1e4).fit(np.array(X), np.array(y), sample_weight=np.array(w))
    return float(1 / (1 + math.exp(-lr.intercept_[0]))), None


# --------------------------------------------------------------------------------------------------- pre-flight

def preflight_item(task: str, prompt_dir: str | None = None, templates: dict | None = None
                   ) -> tuple[list[dict], object, str]:
    """The fixed item JudgeClient.preflight sends for `task` (mtbench, alpacaeval), through the prompts the task
    itself uses (MT-Bench: FastChat's `templates`): (messages, valid, what the reply must hold)."""
    if task == "mtbench":
        q = {"question_id": 0, "category": "writing", "turns": ["What is 2 + 2?"]}
        return (mt_bench_messages(q, ["2 + 2 = 4."], 1, templates), lambda t: parse_rating(t) is not None,
                "[[rating]]")
    return (_messages("pairwise", prompt_dir, instruction="What is 2 + 2?", output_a="2 + 2 = 4.",
                      output_b="2 + 2 = 5."), lambda t: parse_verdict(t) is not None, "[[A]]/[[B]]/[[C]] verdict")
