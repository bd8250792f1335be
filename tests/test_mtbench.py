"""MT-Bench as FastChat runs it: the judge messages and the rating parser equal FastChat's own code's output
(tests/fixtures/fastchat, recorded by running fschat 0.2.36; live too when fastchat is importable), FastChat's three
files by Hub id from the loopback stand-in and from a local checkout, and run_eval's rounds, per-turn and
per-category scores, FastChat's temperatures per category and resume."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hub_stub import MT_QUESTIONS, MT_REFERENCES, MT_TEMPLATES, HubStub, write_mt_bench

from sftmix.eval.judge import mt_bench_messages, parse_rating
from sftmix.eval.tasks import FASTCHAT_TEMPERATURES, NEED_REF_CATS, load_mt_bench_set, mt_bench_temperature
from sftmix.utils import SFTMixError

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "tests" / "fixtures" / "fastchat" / "judge_messages.json").read_text())


def _ours():
    templates = {t["name"]: t for t in MT_TEMPLATES}
    out = []
    for q in MT_QUESTIONS:
        answers = RECORDED["answers"][str(q["question_id"])]
        for turn in (1, 2):
            out.append(mt_bench_messages(q, answers, turn, templates, MT_REFERENCES.get(q["question_id"])))
    return out


def test_judge_messages_equal_fastchats_own_code():
    recorded = RECORDED["judgments"]
    assert _ours() == [r["messages"] for r in recorded]
    by = {(r["question_id"], r["turn"]): r for r in recorded}
    # references for FastChat's reference categories only: reasoning and math yes, extraction (which has a short
    # `reference` field in question.jsonl) and writing no
    assert by[(101, 1)]["template"] == "single-math-v1" and by[(111, 2)]["template"] == "single-math-v1-multi-turn"
    assert by[(131, 1)]["template"] == "single-v1" and "Reference" not in by[(131, 1)]["messages"][-1]["content"]
    assert by[(81, 2)]["messages"][0]["content"].endswith("\n\n")  # each template's own system prompt, as it is


def test_judge_messages_equal_fastchat_live():
    """The same, against FastChat's code itself when it is importable (pip install --no-deps fschat==0.2.36)."""
    pytest.importorskip("fastchat")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "fastchat" / "record.py"), "--check"],
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""),
                                                                           str(ROOT / "tests")])},
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "same as recorded" in res.stdout, res.stdout + res.stderr[-2000:]


def test_rating_parser_equals_fastchat():
    for text, rating in RECORDED["ratings"].items():
        assert parse_rating(text) == (None if rating == -1 else rating), text


def test_fastchat_categories_and_temperatures():
    assert set(NEED_REF_CATS) == {"math", "reasoning", "coding", "arena-hard-200"}
    assert FASTCHAT_TEMPERATURES["writing"] == 0.7 and FASTCHAT_TEMPERATURES["stem"] == 0.1
    assert mt_bench_temperature("math") == 0.0 and mt_bench_temperature("unknown") == 0.7


def test_local_fastchat_layout_and_missing_files(tmp_path):
    write_mt_bench(tmp_path / "fc")
    q = tmp_path / "fc" / "data" / "mt_bench" / "question.jsonl"
    mt = load_mt_bench_set(str(q))
    assert [x["question_id"] for x in mt["questions"]] == [81, 101, 111, 131, 151]
    assert mt["references"] == {101: MT_REFERENCES[101], 111: MT_REFERENCES[111]}
    assert sorted(mt["templates"]) == sorted(["single-v1", "single-math-v1", "single-v1-multi-turn",
                                              "single-math-v1-multi-turn"])
    alone = tmp_path / "question.jsonl"
    alone.write_text(q.read_text())
    with pytest.raises(SFTMixError, match="set mtbench_judge_prompts_file") as e:
        load_mt_bench_set(str(alone))
    assert "\n" not in str(e.value)
    with pytest.raises(SFTMixError, match=r"questions \[101, 111\].*set mtbench_reference_file"):
        load_mt_bench_set(str(alone), judge_prompts=str(tmp_path / "fc" / "data" / "judge_prompts.jsonl"))


def test_mt_bench_by_hub_id_from_the_stand_in(tmp_path):
    with HubStub() as hub:
        hub.add_repo("lmsys/mt-bench", write_mt_bench(tmp_path / "space"), repo_type="space")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(hub.env(tmp_path / "hf_home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        code = ("import json\nfrom sftmix.eval.tasks import load_mt_bench_set\n"
                "mt = load_mt_bench_set('lmsys/mt-bench')\n"
                "print(json.dumps({'n': len(mt['questions']), 'refs': sorted(mt['references']), "
                "'source': mt['source']}))")
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        got = hub.downloads()
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 5 and out["refs"] == [101, 111]
    assert out["source"]["id"] == "lmsys/mt-bench" and out["source"]["repo_type"] == "space"
    got = {p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in got if p.startswith("/spaces/lmsys/mt-bench/")}
    assert got >= {"data/mt_bench/question.jsonl", "data/mt_bench/reference_answer/gpt-4.jsonl",
                   "data/judge_prompts.jsonl"}


class _Judge(BaseHTTPRequestHandler):
    """Rates turn 1 with 8 and turn 2 with 4 (FastChat's multi-turn templates hold '### User'); counts requests."""

    calls: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(req)
        text = "Rating: [[4]]" if "### User" in req["messages"][-1]["content"] else "Rating: [[8]]"
        body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_run_eval_rounds_per_turn_per_category_and_fastchat_temperatures(tmp_path, monkeypatch):
    import sftmix.eval.judged as judged
    from sftmix.config import EvalConfig
    from sftmix.eval.evaluate import run_eval
    from sftmix.models import build_byte_tokenizer, build_tiny_model

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Judge.calls = []
    write_mt_bench(tmp_path / "fc")
    seen = []
    real = judged.generate

    def spy(model, tok, convs, **kw):
        seen.append((len(convs[0]), kw["do_sample"], kw["temperature"], kw["seed"], len(convs)))
        return real(model, tok, convs, **kw)

    monkeypatch.setattr(judged, "generate", spy)
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    cfg = EvalConfig(mtbench_file=str(tmp_path / "fc" / "data" / "mt_bench" / "question.jsonl"), eval_rounds=2,
                     judge_model="judge", judge_base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1",
                     max_new_tokens=3, judge_max_retries=0)
    try:
        res = run_eval(model, tok, cfg, tmp_path / "eval")["mtbench"]
        n_first = len(_Judge.calls)
        again = run_eval(model, tok, cfg, tmp_path / "eval")["mtbench"]
    finally:
        srv.shutdown()
        srv.server_close()
    assert res["n_rounds"] == 2 and res["seeds"] == [0, 1] and len(res["rounds"]) == 2
    assert res["score_turn1"] == 8 and res["score_turn2"] == 4 and res["score"] == 6 and res["score_sd"] == 0
    assert res["scores"] == [6.0, 6.0] and res["n_judgments"] == 20 and res["n_failed"] == 0
    assert set(res["score_by_category"]) == {"writing", "reasoning", "math", "extraction", "stem"}
    # FastChat's temperatures: writing 0.7 sampled, stem 0.1 sampled, the others greedy; each round its own seed
    first_turns = {(s, t, seed) for n, s, t, seed, _ in seen if n == 1}
    assert first_turns == {(True, 0.7, 0), (True, 0.1, 0), (False, 0.0, 0), (True, 0.7, 1), (True, 0.1, 1),
                           (False, 0.0, 1)}
    assert n_first == 1 + 20 - 6  # the pre-flight; greedy answers repeat in round 2 and their judgments are cached
    assert again == res and len(_Judge.calls) == n_first  # a rerun reuses the stored result: no request
    assert (tmp_path / "eval" / "rounds" / "mtbench" / "round_1.json").is_file()
    assert (tmp_path / "eval" / "mtbench_judgments_round1.jsonl").is_file()
