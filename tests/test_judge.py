"""The judge client against a local stub OpenAI-compatible server: bad JSON, timeouts, 5xx, caching, pairwise counts."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hub_stub import MT_TEMPLATES, write_mt_bench

from sftmix.eval.judge import (
    JudgeClient,
    judge_mt_bench,
    judge_pairwise,
    load_prompt,
    model_is_b,
    mt_bench_summary,
    parse_rating,
    parse_verdict,
    win_rate,
)

TEMPLATES = {t["name"]: t for t in MT_TEMPLATES}  # FastChat's judge_prompts.jsonl layout (tests/hub_stub.py)


class _Stub(BaseHTTPRequestHandler):
    """Behaviour is chosen by a marker in the last user message, so one server serves every case."""

    calls: list = []
    flaky_seen: set = set()
    never_verdict = False  # a judge that writes a verdict for the pre-flight item only

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code, body: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = req["messages"][-1]["content"]
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "user": user})
        if req["model"] == "wrong-model":  # what vLLM / OpenAI answer for a model they do not serve
            return self._reply(404, b'{"error": {"message": "The model `wrong-model` does not exist."}}')
        if "What is 2 + 2?" in user and "MODE:preflight-fails" not in user:  # the fixed pre-flight item
            text = "Rating: [[8]]" if "[[A]]" not in user else "[[A]]"
            return self._reply(200, json.dumps({"choices": [{"message": {"content": text}}]}).encode())
        if "MODE:noverdict" in user or type(self).never_verdict:  # a judge that never writes a verdict
            return self._reply(200, json.dumps({"choices": [{"message": {"content": "Nice."}}]}).encode())
        if "MODE:badjson" in user:
            return self._reply(200, b'{"choices": [ not json')
        if "MODE:timeout" in user:
            time.sleep(1.0)
        if "MODE:500" in user:
            return self._reply(500, b'{"error": "overloaded"}')
        if "MODE:flaky" in user and user not in type(self).flaky_seen:
            type(self).flaky_seen.add(user)
            return self._reply(503, b'{"error": "try again"}')
        if "MODE:400" in user:
            return self._reply(400, b'{"error": "bad request"}')
        if "[The Start of Assistant A's Answer]" in user:  # pairwise: the answer containing GOOD wins
            a = user.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
            b = user.split("[The Start of Assistant B's Answer]")[1].split("[The End of Assistant B's Answer]")[0]
            if "BROKEN" in user:
                text = "I cannot decide."
            elif "GOOD" in a and "GOOD" in b:
                text = "Both fine. [[C]]"
            else:
                text = "A is better. [[A]]" if "GOOD" in a else "B is better. [[B]]"
        elif "MODE:norating" in user:
            text = "A fine answer, I would say seven."
        else:
            text = "Reasonable. Rating: [[7]]" if "second" not in user else "Rating: [[4]]"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        return self._reply(200, body)


@pytest.fixture()
def server():
    import sftmix.eval.judge

    _Stub.calls, _Stub.flaky_seen, _Stub.never_verdict = [], set(), False
    getattr(sftmix.eval.judge, "_PREFLIGHT_OK", {}).clear()  # a pre-flight passed on a reused port must not count
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _client(url, tmp_path=None, **kw):
    kw = {"timeout": 0.3, "max_retries": 2, "backoff": 0.01, "api_key": "sk-test", **kw}
    return JudgeClient(url, "stub-judge", cache_path=tmp_path / "cache.jsonl" if tmp_path else None, **kw)


def _msg(text):
    return [{"role": "user", "content": text}]


def test_success_sends_openai_request(server):
    c = _client(server)
    r = c.complete(_msg("hello"))
    assert r["text"] == "Reasonable. Rating: [[7]]" and r["error"] is None and r["attempts"] == 1
    assert _Stub.calls[0]["path"] == "/v1/chat/completions" and _Stub.calls[0]["auth"] == "Bearer sk-test"


def test_bad_json_is_retried_then_failed(server):
    c = _client(server)
    r = c.complete(_msg("MODE:badjson"))
    assert r["text"] is None and "bad response" in r["error"]
    assert r["attempts"] == 3 and c.n_requests == 3


def test_timeout_is_retried_then_failed(server):
    c = _client(server, max_retries=1)
    t0 = time.perf_counter()
    r = c.complete(_msg("MODE:timeout"))
    assert r["text"] is None and "timed out" in r["error"].lower()
    assert r["attempts"] == 2 and time.perf_counter() - t0 < 1.5


def test_500_then_success(server):
    c = _client(server)
    r = c.complete(_msg("MODE:flaky"))
    assert r["text"] == "Reasonable. Rating: [[7]]" and r["attempts"] == 2 and c.n_requests == 2
    r = _client(server).complete(_msg("MODE:500"))
    assert r["text"] is None and r["error"].startswith("HTTP 500") and r["attempts"] == 3


def test_client_error_is_not_retried(server):
    c = _client(server)
    r = c.complete(_msg("MODE:400"))
    assert r["text"] is None and r["error"].startswith("HTTP 400") and r["attempts"] == 1


def test_unreachable_server_fails_cleanly():
    c = JudgeClient("http://127.0.0.1:9/v1", "x", timeout=0.2, max_retries=1, backoff=0.01)
    r = c.complete(_msg("hi"))
    assert r["text"] is None and r["error"]


def test_mt_bench_failures_are_not_scored_and_cache_avoids_http(server, tmp_path):
    questions = [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Now a second one."]},
        {"question_id": 2, "category": "math", "turns": ["2+2?"]},
        {"question_id": 3, "category": "writing", "turns": ["MODE:norating"]},
        {"question_id": 4, "category": "writing", "turns": ["MODE:badjson"]},
    ]
    answers = [["A poem.", "Another."], ["4"], ["x"], ["y"]]
    c = _client(tmp_path=tmp_path, url=server)
    rows = judge_mt_bench(c, questions, answers, TEMPLATES, {2: ["4"]})
    by = {(r["question_id"], r["turn"]): r for r in rows}
    assert by[(1, 1)]["rating"] == 7 and by[(1, 2)]["rating"] == 4 and by[(2, 1)]["rating"] == 7
    assert by[(3, 1)]["failed"] and "rating" in by[(3, 1)]["error"]
    assert by[(4, 1)]["failed"] and "bad response" in by[(4, 1)]["error"]
    # the reference answer went into the prompt of the reference-graded question
    assert any("[The Start of Reference Answer]" in call["user"] and "2+2?" in call["user"] for call in _Stub.calls)
    s = mt_bench_summary(rows)
    assert s["n_judgments"] == 5 and s["n_failed"] == 2
    assert s["score"] == pytest.approx(6.0) and s["score_turn1"] == 7 and s["score_turn2"] == 4
    assert not by[(3, 1)]["retryable"] and by[(4, 1)]["retryable"]
    assert s["n_failed_retryable"] == 1
    first = c.n_requests
    # three good replies; the reply without a rating asked twice (the same reply twice: deterministic); one bad-JSON
    # reply retried twice
    assert first == 1 + 1 + 1 + 2 + 3

    again = _client(tmp_path=tmp_path, url=server)  # a fresh process: the cache is read back from disk
    rows2 = judge_mt_bench(again, questions, answers, TEMPLATES, {2: ["4"]})
    ok = {(r["question_id"], r["turn"]) for r in rows if not r["failed"]}  # usable judgments are cached
    # the deterministic failure is read back as failed without a request; the transient one is asked again
    assert again.n_requests == 3
    assert all(r["cached"] for r in rows2 if (r["question_id"], r["turn"]) in ok)
    assert [r["rating"] for r in rows2] == [r["rating"] for r in rows]
    assert [r["failed"] for r in rows2] == [r["failed"] for r in rows]
    # the explicit setting asks the deterministic failure again
    retry = _client(tmp_path=tmp_path, url=server, retry_failed=True)
    judge_mt_bench(retry, questions, answers, TEMPLATES, {2: ["4"]})
    assert retry.n_requests == 2 + 3


def test_cache_survives_a_torn_last_line(server, tmp_path):
    c = _client(server, tmp_path)
    c.complete(_msg("hello"))
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "abc", "te')  # a run killed mid-append
    c2 = _client(server, tmp_path)
    assert c2.complete(_msg("hello"))["cached"] and c2.n_requests == 0


def test_pairwise_counts_failures_separately(server):
    instructions = [f"task {i}" for i in range(8)] + ["task BROKEN", "task MODE:badjson"]
    outputs = ["GOOD a", "GOOD b", "GOOD c", "meh", "meh", "GOOD d", "GOOD e", "meh", "GOOD", "GOOD"]
    refs = ["meh", "meh", "meh", "GOOD", "GOOD", "GOOD", "meh", "GOOD", "meh", "meh"]
    rows = judge_pairwise(_client(server), instructions, outputs, refs)
    winners = [r["winner"] for r in rows]
    assert winners == ["model"] * 3 + ["reference"] * 2 + ["tie", "model", "reference", None, None]
    assert {r["model_is_b"] for r in rows} == {True, False}  # both presentation orders occur
    s = win_rate(rows)
    assert (s["wins"], s["losses"], s["ties"], s["n_failed"], s["n_valid"]) == (4, 3, 1, 2, 8)
    assert s["win_rate"] == pytest.approx(4.5 / 8)  # failures are neither wins nor losses
    assert s["lc_win_rate"] is None and "10" in s["lc_note"]  # too few judgments for the regression


def test_swap_is_deterministic():
    assert model_is_b("same instruction") == model_is_b("same instruction")


def _rows(pairs):
    return [{"failed": False, "winner": w, "len_model": lm, "len_reference": lr} for w, lm, lr in pairs]


def test_length_controlled_fallback_discounts_length():
    """The fallback used without alpaca_eval (sftmix.eval.judge.length_controlled_win_rate), called directly so that an
    installed alpaca_eval (which fetches its data from the Hub) does not take over."""
    from sftmix.eval.judge import length_controlled_win_rate

    # the model wins exactly when its answer is longer: the raw win rate is 35/60, at equal length it is ~0.5
    rows = _rows([("model", 900, 300)] * 30 + [("reference", 300, 900)] * 20)
    rows += _rows([("model", 500, 500)] * 5 + [("reference", 500, 500)] * 5)
    assert abs(length_controlled_win_rate(rows)[0] - 0.5) < 0.05
    # no length effect: the length-controlled rate is the raw one
    flat = _rows([("model", 500, 500)] * 14 + [("reference", 500, 500)] * 6 + [("tie", 500, 500)] * 4)
    assert length_controlled_win_rate(flat)[0] == pytest.approx(16 / 24, abs=1e-3)


def test_parsers():
    assert parse_rating("Rating: [[7.5]]") == 7.5 and parse_rating("[[ 3 ]] then [[9]]") == 9
    assert parse_rating("Rating: [8]") == 8 and parse_rating("Rating: 7") is None and parse_rating(None) is None
    assert parse_verdict("so [[A]]") == "A" and parse_verdict("[[C]]") == "tie"
    assert parse_verdict("[[A]] or maybe [[B]]") is None and parse_verdict("") is None


def test_prompts_ship_and_fill():
    fields = {k: f"<{k}>" for k in ("instruction", "output_a", "output_b")}
    for name in ("system", "pairwise"):
        assert load_prompt(name).format_map(fields).strip()
    assert "[[C]]" in load_prompt("pairwise")


# --------------------------------------------------------------------------------------------- judge operations

def test_preflight_fails_in_one_line(server):
    from sftmix.eval.judge import preflight_item
    from sftmix.utils import SFTMixError

    msgs, valid, what = preflight_item("mtbench", templates=TEMPLATES)
    assert _client(server).preflight(msgs, valid, what) == "Rating: [[8]]"
    with pytest.raises(SFTMixError) as e:
        JudgeClient(server, "wrong-model", timeout=0.3, max_retries=2, backoff=0.01).preflight(msgs, valid, what)
    msg = str(e.value)
    assert "\n" not in msg and "judge_model='wrong-model'" in msg and "HTTP 404" in msg and "does not exist" in msg
    assert len(_Stub.calls) == 2  # a refused model name is not retried
    with pytest.raises(SFTMixError, match="parseable \\[\\[rating\\]\\]") as e:
        msgs2 = [dict(m) for m in msgs]
        msgs2[-1]["content"] += " MODE:preflight-fails MODE:noverdict"
        _client(server).preflight(msgs2, valid, what)
    assert "\n" not in str(e.value)
    with pytest.raises(SFTMixError, match="URLError|ConnectionRefused"):
        JudgeClient("http://127.0.0.1:9/v1", "x", timeout=0.2, max_retries=0).preflight(msgs, valid, what)


def test_progress_line_counts_failures(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sftmix")
    c = _client(server)
    c.map([_msg(f"q{i}") for i in range(8)] + [_msg("MODE:noverdict x"), _msg("MODE:noverdict y")], concurrency=1,
          desc="judging test", valid=lambda t: parse_rating(t) is not None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judging test:")]
    assert lines[0].startswith("judging test: 1/10 judged, 0 failed")
    assert lines[-1].startswith("judging test: 10/10 judged, 2 failed (last error: no parseable verdict")


def test_run_eval_preflight_before_generation_and_deterministic_failures_not_reasked(server, tmp_path, monkeypatch):
    import sftmix.eval.judged as judged
    from sftmix.config import EvalConfig
    from sftmix.eval.evaluate import run_eval
    from sftmix.models import build_byte_tokenizer, build_tiny_model
    from sftmix.utils import SFTMixError

    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    write_mt_bench(tmp_path / "fc")  # FastChat's layout: 5 questions of 2 turns, references, judge templates
    kw = {"mtbench_file": str(tmp_path / "fc" / "data" / "mt_bench" / "question.jsonl"), "judge_base_url": server,
          "max_new_tokens": 4, "judge_max_retries": 2, "judge_backoff": 0.01, "judge_timeout": 2.0, "eval_rounds": 1}
    real_generate = judged.generate
    monkeypatch.setattr(judged, "generate", lambda *a, **k: pytest.fail("an answer was generated"))
    with pytest.raises(SFTMixError, match="wrong-model.*HTTP 404"):
        run_eval(model, tok, EvalConfig(judge_model="wrong-model", **kw), tmp_path / "eval")
    assert len(_Stub.calls) == 1 and not (tmp_path / "eval" / "mtbench_answers.jsonl").exists()

    monkeypatch.setattr(judged, "generate", real_generate)
    monkeypatch.setattr(_Stub, "calls", [])
    cfg = EvalConfig(judge_model="stub-judge", **kw)
    import sftmix.eval.judge as judge_mod

    _Stub.never_verdict = True
    res = run_eval(model, tok, cfg, tmp_path / "eval")["mtbench"]
    assert res["n_judgments"] == 10 and res["n_failed"] == 10 and res["n_failed_retryable"] == 0
    assert len(_Stub.calls) == 1 + 10 * 2  # the pre-flight, then each judgment asked twice (the same reply twice)
    monkeypatch.setattr(_Stub, "calls", [])
    again = run_eval(model, tok, cfg, tmp_path / "eval")["mtbench"]  # stored, deterministic failures: no request
    assert _Stub.calls == [] and again["n_failed"] == 10
    monkeypatch.setattr(judge_mod.JudgeClient, "_post", lambda *a, **k: pytest.fail("asked the judge"))
    assert run_eval(model, tok, cfg, tmp_path / "eval")["mtbench"]["n_failed"] == 10
    monkeypatch.undo()
    _Stub.never_verdict, _Stub.calls = False, []
    redo = run_eval(model, tok, EvalConfig(judge_model="stub-judge", judge_retry_failed=True, **kw),
                    tmp_path / "eval")["mtbench"]
    assert redo["n_failed"] == 0 and len(_Stub.calls) == 10  # (the pre-flight passed once in this process)


def test_a_wrong_judge_model_is_one_line_and_exit_2_before_any_answer(server, tmp_path):
    """The entry point prints the pre-flight's failure once, as one line, and exits 2; no answer was generated."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_mt_bench(tmp_path / "fc")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "sftmix.eval.evaluate", "--model", "tiny-random:0", "--device", "cpu",
                          "--output_dir", str(tmp_path / "eval"), "--judge_model", "wrong-model",
                          "--judge_base_url", server, "--mtbench_file",
                          str(tmp_path / "fc" / "data" / "mt_bench" / "question.jsonl")],
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "judge pre-flight failed before any answer was generated" in errors[0]
    assert "judge_model='wrong-model'" in errors[0] and "HTTP 404" in errors[0]
    assert not list((tmp_path / "eval").glob("mtbench_answers*"))
