"""AlpacaEval 2: the instructions and reference outputs by Hub id (tatsu-lab/alpaca_eval from the loopback stand-in),
and the length-controlled win rate equal to alpaca_eval's own function (0.6.6, `length_controlled_v1`) on the same
annotations. alpaca_eval runs in a subprocess pointed at the stand-in (HF_ENDPOINT): it fetches df_gamed.csv there,
never from the internet. Needs the extra `pip install 'sftmix[alpaca-eval]'`; skipped without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_stub import HubStub, write_alpaca_eval

ROOT = Path(__file__).resolve().parents[1]

# Written without sftmix's conversion: alpaca_eval's annotation records built by hand from the same judgments
CODE = r"""
import json, sys
from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
from sftmix.eval.tasks import load_alpaca_eval
from sftmix.eval.judge import win_rate

rows = load_alpaca_eval("tatsu-lab/alpaca_eval")
outs = ["Short." if i % 3 else "A much longer answer that goes on and on. " * (1 + i % 4) for i in range(len(rows))]
winners = ["model" if len(o) > len(r["output"]) else "reference" for o, r in zip(outs, rows)]
winners[0], winners[1] = "tie", "reference" if winners[1] == "model" else "model"
judged = [{"index": i, "instruction": r["instruction"], "output": o, "reference": r["output"], "winner": w,
           "failed": False, "len_model": len(o), "len_reference": len(r["output"])}
          for i, (r, o, w) in enumerate(zip(rows, outs, winners))]
judged.append({**judged[2], "index": 99, "winner": None, "failed": True})  # a failed judgment: never annotated
ours = win_rate(judged)
theirs = get_length_controlled_winrate(
    [{"instruction": r["instruction"], "output_1": r["output"], "output_2": o, "generator_1": "gpt4_1106_preview",
      "generator_2": "m", "annotator": "a", "index": i, "preference": {"model": 2, "reference": 1, "tie": 1.5}[w]}
     for i, (r, o, w) in enumerate(zip(rows, outs, winners))], save_weights_dir=None)
print(json.dumps({"ours": ours, "theirs": theirs, "n": len(rows)}, default=float))
"""


def test_lc_win_rate_equals_alpaca_evals_own_function(tmp_path):
    pytest.importorskip("alpaca_eval")
    with HubStub() as hub:
        hub.add_repo("tatsu-lab/alpaca_eval", write_alpaca_eval(tmp_path / "ae", n=24), repo_type="dataset")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(hub.env(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        res = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        fetched = {p for _, p in hub.downloads()}
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ours, theirs = out["ours"], out["theirs"]
    assert out["n"] == 24 and ours["n_valid"] == 24 and ours["n_failed"] == 1
    assert ours["lc_method"] == "alpaca_eval length_controlled_v1" and ours["lc_note"] is None
    assert ours["lc_win_rate"] == pytest.approx(theirs["length_controlled_winrate"] / 100, abs=1e-12)
    assert ours["win_rate"] == pytest.approx(theirs["win_rate"] / 100, abs=1e-12)
    assert abs(ours["lc_win_rate"] - ours["win_rate"]) > 1e-3  # length control moved it: not the raw rate again
    assert any(p.endswith("/alpaca_eval_gpt4_baseline.json") for p in fetched)
    assert any(p.endswith("/df_gamed.csv") for p in fetched)  # alpaca_eval's own download, from the stand-in


def test_fallback_is_named_when_alpaca_eval_is_missing(monkeypatch):
    import builtins

    from sftmix.eval.judge import win_rate

    real_import = builtins.__import__

    def no_alpaca_eval(name, *a, **k):
        if name.startswith("alpaca_eval"):
            raise ImportError("no alpaca_eval")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_alpaca_eval)
    rows = [{"index": i, "output": "x" * (10 + i), "reference": "y" * 12, "winner": "model" if i % 3 else "reference",
             "failed": False, "len_model": 10 + i, "len_reference": 12} for i in range(20)]
    s = win_rate(rows)
    assert s["lc_method"].startswith("sftmix fallback (alpaca_eval not installed)") and s["lc_win_rate"] is not None


def test_a_judge_without_logprobs_is_one_line_naming_the_other_annotators():
    pytest.importorskip("alpaca_eval")
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sftmix.eval.judge import JudgeClient
    from sftmix.utils import SFTMixError

    class NoLogprobs(BaseHTTPRequestHandler):  # what llama.cpp-style servers without logprob support answer
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "m"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = JudgeClient(f"http://127.0.0.1:{srv.server_address[1]}/v1", "local-judge", timeout=5)
        with pytest.raises(SFTMixError) as e:
            client.preflight_annotator("weighted_alpaca_eval_gpt4_turbo", logprobs=True)
        msg = str(e.value)
        assert "\n" not in msg and "returned no logprobs" in msg and "alpaca_eval_gpt4_turbo_fn" in msg
        client.preflight_annotator("alpaca_eval_gpt4_turbo_fn", logprobs=False)  # that one needs none
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_named_annotator_without_the_package_is_one_line(monkeypatch):
    import builtins

    from sftmix.eval.annotators import resolve
    from sftmix.utils import SFTMixError

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("alpaca_eval") else real_import(name, *a, **k))
    assert resolve("auto") == "sftmix" and resolve("sftmix") == "sftmix"
    with pytest.raises(SFTMixError, match=r"alpacaeval_annotator=weighted_alpaca_eval_gpt4_turbo needs the "
                                          r"alpaca_eval package: pip install 'sftmix\[alpaca-eval\]'"):
        resolve("weighted_alpaca_eval_gpt4_turbo")
