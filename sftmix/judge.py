"""LLM-as-a-judge through any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, OpenAI, ...).

    from sftmix.judge import JudgeClient, judge_mt_bench, mt_bench_summary, judge_pairwise, win_rate
    client = JudgeClient("http://127.0.0.1:8000/v1", model="judge", api_key_env="OPENAI_API_KEY",
                         cache_path="run/eval/judge_cache.jsonl")
    rows = judge_mt_bench(client, questions, answers)      # one rating 1-10 per (question, turn), MT-Bench style
    print(mt_bench_summary(rows))                           # mean score per turn, failures counted apart
    rows = judge_pairwise(client, instructions, outputs, references)   # AlpacaEval style, model vs reference
    print(win_rate(rows))                                   # win rate, standard error, length-controlled win rate

Only the standard library talks HTTP (urllib): POST {base_url}/chat/completions with temperature 0.
Retries: transport errors, timeouts, HTTP 429/5xx and bodies that are not the expected JSON are retried with
exponential backoff (backoff * 2**attempt seconds); other HTTP 4xx fail at once. A judgment that still fails, or whose
text holds no parseable rating/verdict, is returned with failed=True and is never counted as a win, a loss or a score.
Cache: every usable completion (one holding a rating / verdict) is appended (one write per line, under a lock) to a
JSONL file keyed by sha256(judge model, messages, temperature, max_tokens); the messages contain the question and the
answer, so a rerun of the same evaluation makes no HTTP call. Failures (HTTP errors and replies without a rating /
verdict) are not cached, so a rerun retries them; sftmix.pipeline reruns an evaluation that had failed judgments.

Prompts are text files in sftmix/judge_prompts/ (or `prompt_dir`): system.txt, single_turn1.txt, single_turn2.txt
and their *_ref.txt variants (used when a question has reference answers, as MT-Bench does for math, reasoning and
coding), and pairwise.txt. Placeholders are {question_1}, {answer_1}, {question_2}, {answer_2}, {reference_1},
{reference_2}, {instruction}, {output_a}, {output_b}.

Pairwise order: the model's output is shown as A or B depending on a hash of the instruction (deterministic, about
half each), which cancels the judge's position bias on average. Ties count half a win (as in AlpacaEval).
Length-controlled win rate (after AlpacaEval 2, simplified): a logistic regression of the outcome on
tanh((len_model - len_reference) / std) over characters, with an intercept; the length-controlled win rate is
sigmoid(intercept), the predicted win rate at equal length. AlpacaEval 2 also has a per-instruction difficulty term,
which needs annotations of many models and is left out.
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


class JudgeClient:
    """Chat completions with retries and a persistent cache. Thread-safe; `n_requests` counts HTTP calls made."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, cache_path: str | None = None,
                 max_tokens: int = 1024, temperature: float = 0.0):
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
        self.n_requests = 0
        self._lock = threading.Lock()
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
                    cache[row["key"]] = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1  # a line torn by a killed run: that judgment is simply asked again
        if bad:
            log.warning("%s: ignored %d unreadable line(s); those judgments will be requested again",
                        self.cache_path, bad)
        return cache

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _store(self, key: str, text: str) -> None:
        with self._lock:
            self._cache[key] = text
            if self.cache_path is None:
                return
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "model": self.model, "text": text}, ensure_ascii=False) + "\n"
            # one O_APPEND write per line: concurrent writers never interleave inside a line
            fd = os.open(self.cache_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---------------------------------------------------------------------------------------------------- HTTP
    def complete(self, messages: list[dict], valid=None) -> dict:
        """{"text": str | None, "error": str | None, "cached": bool, "attempts": int}; never raises for HTTP trouble.

        `valid(text)` (optional) tells a usable reply (one with a verdict / rating): an unusable one is returned but
        never cached, so a later run asks again (one cached by an older version too)."""
        key = self.key(messages)
        with self._lock:
            if key in self._cache and (valid is None or valid(self._cache[key])):
                return {"text": self._cache[key], "error": None, "cached": True, "attempts": 0}
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error, text = None, None
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
                error = f"HTTP {e.code}: {_snippet(e.read())}"
                if e.code not in RETRYABLE_HTTP:
                    break  # a bad request or a bad key does not get better by asking again
                continue
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, socket.timeout, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                text = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error, text = f"bad response ({type(e).__name__}): {_snippet(raw)}", None
                continue
            if valid is None or valid(text):
                self._store(key, text)  # a reply without a verdict is returned but not cached: a rerun asks again
            return {"text": text, "error": None, "cached": False, "attempts": attempt + 1}
        return {"text": text, "error": error, "cached": False, "attempts": attempt + 1}

    def map(self, messages_list: list[list[dict]], concurrency: int = 4, desc: str = "judging",
            valid=None) -> list[dict]:
        """complete() over many prompts with a thread pool (the work is waiting on the server), in order."""
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(tqdm(pool.map(lambda m: self.complete(m, valid), messages_list), total=len(messages_list),
                             desc=desc, leave=False))


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


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str | None) -> float | None:
    """The last "[[x]]" rating in the judge's text if it lies in 1..10, else None (a failed judgment)."""
    found = _RATING.findall(text or "")
    if not found:
        return None
    r = float(found[-1])
    return r if 1 <= r <= 10 else None


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from "[[A]]", "[[B]]", "[[C]]"; None when absent or contradictory (a failed judgment)."""
    found = set(_VERDICT.findall(text or ""))
    if len(found) != 1:
        return None
    v = found.pop()
    return "tie" if v == "C" else v


# ----------------------------------------------------------------------------------------------------- MT-Bench

def judge_mt_bench(client: JudgeClient, questions: list[dict], answers: list[list[str]], prompt_dir: str | None = None,
                   concurrency: int = 4) -> list[dict]:
    """Single-answer grading, one judgment per turn (turn 2 sees turn 1 as context, as in MT-Bench).

    questions: {"question_id", "category"?, "turns": [q1, q2?], "reference": [r1, r2?]?}; answers: per question, the
    model's answer per turn. Returns rows {question_id, category, turn, rating, failed, error, judgment, cached}."""
    jobs, meta = [], []
    for q, ans in zip(questions, answers, strict=True):
        ref = q.get("reference") or []
        for t in range(len(q["turns"])):
            fields = {"question_1": q["turns"][0], "answer_1": ans[0]}
            if t == 1:
                fields.update(question_2=q["turns"][1], answer_2=ans[1])
            name = f"single_turn{t + 1}"
            if len(ref) > t and ref[t]:
                name += "_ref"
                fields.update({f"reference_{i + 1}": r for i, r in enumerate(ref)})
            jobs.append(_messages(name, prompt_dir, **fields))
            meta.append({"question_id": q["question_id"], "category": q.get("category"), "turn": t + 1})
    rows = []
    replies = client.map(jobs, concurrency, desc="judging MT-Bench", valid=lambda t: parse_rating(t) is not None)
    for m, res in zip(meta, replies):
        rating = parse_rating(res["text"])
        error = res["error"] or (None if rating is not None else "no [[rating]] in 1..10 in the judge's reply")
        rows.append({**m, "rating": rating, "failed": rating is None, "error": error, "judgment": res["text"],
                     "cached": res["cached"]})
    return rows


def mt_bench_summary(rows: list[dict]) -> dict:
    """Mean rating per turn and overall over successful judgments; failures are counted, never scored."""
    ok = [r for r in rows if not r["failed"]]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    out = {"n_judgments": len(rows), "n_failed": len(rows) - len(ok), "score": mean([r["rating"] for r in ok])}
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
        error = res["error"] or (None if v is not None else "no single [[A]]/[[B]]/[[C]] verdict in the judge's reply")
        rows.append({"index": i, "winner": winner, "failed": winner is None, "error": error, "model_is_b": b,
                     "len_model": len(outputs[i]), "len_reference": len(references[i]), "judgment": res["text"],
                     "cached": res["cached"]})
    return rows


def win_rate(rows: list[dict]) -> dict:
    """Win rate of the model over the reference (ties count 1/2) with its standard error, over successful
    judgments only; failures are reported in n_failed. Adds the length-controlled win rate when it is defined."""
    ok = [r for r in rows if not r["failed"]]
    wins = sum(r["winner"] == "model" for r in ok)
    losses = sum(r["winner"] == "reference" for r in ok)
    ties = sum(r["winner"] == "tie" for r in ok)
    out = {"n": len(rows), "n_valid": len(ok), "n_failed": len(rows) - len(ok), "wins": wins, "losses": losses,
           "ties": ties, "win_rate": None, "win_rate_se": None, "lc_win_rate": None, "lc_note": None}
    if not ok:
        out["lc_note"] = "no successful judgment"
        return out
    scores = [1.0 if r["winner"] == "model" else 0.5 if r["winner"] == "tie" else 0.0 for r in ok]
    n = len(scores)
    p = sum(scores) / n
    var = sum((s - p) ** 2 for s in scores) / max(n - 1, 1)
    out["win_rate"], out["win_rate_se"] = p, math.sqrt(var / n)
    out["lc_win_rate"], out["lc_note"] = length_controlled_win_rate(ok)
    return out


def length_controlled_win_rate(ok: list[dict]) -> tuple[float | None, str | None]:
    """sigmoid(intercept) of a logistic regression of win on tanh(length difference / its std); see module doc."""
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
