"""The judge path end to end against a real OpenAI-compatible server process on loopback: `transformers serve` serving
a tiny model that the test first trains to answer every judge prompt with "Rating: [[7]]" (so verdicts parse).

Needs transformers' serving extras (fastapi, uvicorn, openai: `pip install 'sftmix[test]'`); skipped without them.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from hub_stub import MT_TEMPLATES  # noqa: E402

from sftmix.eval.judge import JudgeClient, judge_mt_bench, mt_bench_summary, preflight_item  # noqa: E402
from sftmix.utils import SFTMixError  # noqa: E402

TEMPLATES = {t["name"]: t for t in MT_TEMPLATES}  # FastChat's judge_prompts.jsonl layout
REFERENCES = {111: ["21"]}

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 3 * 7?"]},
]
ANSWERS = [["Rain on the roof.", "Rain again, my friend."], ["21"]]
TARGET = "Rating: [[7]]"


def _train_judge(path):
    """A tiny byte-level Llama trained (a few seconds) to reply TARGET to the judge's prompts."""
    import torch

    from sftmix.models import build_byte_tokenizer, build_tiny_model

    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    class Recorder:  # the judge messages judge_mt_bench sends, recorded through its own code
        model, jobs = "recorder", []

        def map(self, jobs, *a, **k):
            self.jobs += jobs
            return [{"text": TARGET, "error": None, "cached": False, "retryable": False} for _ in jobs]

    rec = Recorder()
    judge_mt_bench(rec, QUESTIONS, ANSWERS, TEMPLATES, REFERENCES)
    prompts = [preflight_item("mtbench", templates=TEMPLATES)[0]] + rec.jobs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40 * len(prompts)):
        text = tok.apply_chat_template(prompts[step % len(prompts)], tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        t = tok(TARGET, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        loss = model(input_ids=torch.tensor([p + t]), labels=torch.tensor([[-100] * len(p) + t])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    exe = shutil.which("transformers") or pytest.skip("the `transformers` command is not installed")
    model_dir = tmp_path_factory.mktemp("judge") / "tiny-judge"
    _train_judge(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(model_dir.parent / "serve.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    tail = (model_dir.parent / "serve.log").read_text()[-2000:]
                    pytest.fail(f"transformers serve did not start: {tail}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client(url, model, tmp_path, **kw):
    return JudgeClient(url, model, api_key_env=None, timeout=60, max_retries=1, backoff=0.01, max_tokens=16,
                       cache_path=tmp_path / "cache.jsonl", **kw)


def test_preflight_against_a_real_server(served, tmp_path):
    url, model = served
    msgs, valid, what = preflight_item("mtbench", templates=TEMPLATES)
    assert "[[7]]" in _client(url, model, tmp_path).preflight(msgs, valid, what)
    with pytest.raises(SFTMixError) as e:
        _client(url, "gpt-4-typo", tmp_path).preflight(msgs, valid, what)
    assert "\n" not in str(e.value) and "judge_model='gpt-4-typo'" in str(e.value) and "HTTP 4" in str(e.value)


def test_mt_bench_judged_by_a_real_server_then_cached(served, tmp_path):
    url, model = served
    c = _client(url, model, tmp_path)
    rows = judge_mt_bench(c, QUESTIONS, ANSWERS, TEMPLATES, REFERENCES, concurrency=2)
    s = mt_bench_summary(rows)
    assert s["n_judgments"] == 3 and s["n_failed"] == 0 and s["score"] == 7.0, json.dumps(rows)[:2000]
    assert c.n_requests == 3
    again = _client(url, model, tmp_path)
    assert [r["rating"] for r in judge_mt_bench(again, QUESTIONS, ANSWERS, TEMPLATES, REFERENCES)] == [7.0] * 3
    assert again.n_requests == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_answers_from_a_server_of_the_model_under_test(served, tmp_path, monkeypatch):
    """generation_base_url: MT-Bench's answers come from the server (here the same tiny model), with the same
    prompts; the local model is never asked; the result says where the answers came from."""
    from hub_stub import write_mt_bench

    import sftmix.eval.judged as judged
    from sftmix.config import EvalConfig
    from sftmix.eval.evaluate import run_eval
    from sftmix.models import build_byte_tokenizer, build_tiny_model

    url, model_dir = served
    write_mt_bench(tmp_path / "fc")
    monkeypatch.setattr(judged, "generate", lambda *a, **k: pytest.fail("the local model generated"))
    tok = build_byte_tokenizer()
    cfg = EvalConfig(mtbench_file=str(tmp_path / "fc" / "data" / "mt_bench" / "question.jsonl"), eval_rounds=1,
                     judge_model=model_dir, judge_base_url=url, judge_max_tokens=16, judge_api_key_env=None,
                     generation_base_url=url, generation_model=model_dir, max_new_tokens=16)
    res = run_eval(build_tiny_model(tok, seed=1), tok, cfg, tmp_path / "eval")["mtbench"]
    assert res["answers_from"] == f"server {url} (model {model_dir})"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "mtbench_answers_round0.jsonl").open()]
    assert len(rows) == 5 and all(len(r["answers"]) == 2 and "Rating" in r["answers"][0] for r in rows)  # its habit
    assert res["n_judgments"] == 10
