"""The paper's Table 1 from `sftmix run --config configs/smoke.yaml`: MT-Bench and AlpacaEval 2 by Hub id (the
loopback stand-in serves lmsys/mt-bench and tatsu-lab/alpaca_eval in their layouts), a judge on loopback, two rounds;
report.md holds MT-Bench overall / single-turn / multi-turn and AlpacaEval 2 WR / LC WR as mean ± sd; a rerun sends
the judge no request and reports the same numbers."""

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hub_stub import HubStub, write_alpaca_eval, write_mt_bench

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


class _Judge(BaseHTTPRequestHandler):
    """MT-Bench: a rating from a hash of the prompt (turn 2 prompts hold '### User'); pairwise: [[A]] or [[B]] from a
    hash of the prompt. Deterministic, so reruns and rounds agree."""

    calls: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = req["messages"][-1]["content"]
        type(self).calls.append(user)
        h = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16)
        if req.get("logprobs"):  # alpaca_eval's weighted_alpaca_eval_gpt4_turbo: one token and its top logprobs
            pm = 0.2 + 0.6 * (h % 100) / 100
            top = [{"token": "m", "logprob": math.log(pm), "bytes": None},
                   {"token": "M", "logprob": math.log(1 - pm), "bytes": None}]
            return self._reply({"message": {"role": "assistant", "content": "m"},
                                "logprobs": {"content": [{**top[0], "top_logprobs": top}]}})
        if "[The Start of Assistant A's Answer]" in user:
            text = "[[A]]" if h % 2 else "[[B]]"
        else:
            text = f"Rating: [[{2 + h % 8}]]"
        return self._reply({"message": {"role": "assistant", "content": text}})

    def _reply(self, choice):
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                           "choices": [{"index": 0, "finish_reason": "stop", **choice}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_smoke_run_reports_table_1_over_two_rounds_and_reruns_without_requests(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Judge.calls = []
    args = ["-m", "sftmix.cli", "run", "--config", SMOKE, "--output_dir", str(tmp_path / "run"),
            "--mtbench_file", "lmsys/mt-bench", "--alpacaeval_file", "tatsu-lab/alpaca_eval", "--eval_rounds", "2",
            "--judge_model", "judge", "--judge_base_url", f"http://127.0.0.1:{srv.server_address[1]}/v1",
            "--max_new_tokens", "8", "--judge_max_retries", "0"]
    try:
        with HubStub() as hub:
            hub.add_repo("lmsys/mt-bench", write_mt_bench(tmp_path / "space"), repo_type="space")
            hub.add_repo("tatsu-lab/alpaca_eval", write_alpaca_eval(tmp_path / "ae", n=24), repo_type="dataset")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
            env.update(hub.env(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
            first = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                                   timeout=1200)
            assert first.returncode == 0, first.stderr[-3000:]
            n_calls = len(_Judge.calls)
            report1 = (tmp_path / "run" / "report.md").read_text()
            again = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                                   timeout=1200)
            assert again.returncode == 0, again.stderr[-3000:]
    finally:
        srv.shutdown()
        srv.server_close()
    assert n_calls > 0 and len(_Judge.calls) == n_calls  # the rerun sent the judge no request
    report2 = (tmp_path / "run" / "report.md").read_text()
    table = report1[report1.index("## Instruction following (the paper's Table 1)"):].split("\n## ")[0]
    print(table)
    assert table == report2[report2.index("## Instruction following (the paper's Table 1)"):].split("\n## ")[0]
    assert ("| model | MT-Bench overall (n=5) | single-turn (n=5) | multi-turn (n=5) | AlpacaEval 2 WR (%) (n=24) "
            "| LC WR (%) (n=24) |") in table
    assert "MT-Bench: 2 round(s)" in table and "AlpacaEval 2: 2 round(s)" in table and " ± " in table
    summary = json.loads((tmp_path / "run" / "report.json").read_text())["instruction"]
    assert [r["model"] for r in summary["rows"]] == ["start", "ntp", "sftmix"]
    for row in summary["rows"]:
        for key in ("mtbench_score", "mtbench_score_turn1", "mtbench_score_turn2", "alpacaeval_win_rate"):
            assert len(row["cells"][key]["values"]) == 2, (row["model"], key)
    res = json.loads((tmp_path / "run" / "eval" / "ntp.json").read_text())["results"]
    assert res["mtbench"]["n_rounds"] == 2 and res["mtbench"]["seeds"] == [0, 1]
    assert res["alpacaeval"]["source"]["id"] == "tatsu-lab/alpaca_eval"
    try:  # alpacaeval_annotator auto: alpaca_eval's own annotator, win rate and LC model when it is installed
        import alpaca_eval  # noqa: F401
        assert res["alpacaeval"]["lc_method"] == "alpaca_eval length_controlled_v1"
        assert res["alpacaeval"]["annotator"] == "weighted_alpaca_eval_gpt4_turbo"
        assert "alpaca_eval's weighted_alpaca_eval_gpt4_turbo annotator" in table
        assert not float(res["alpacaeval"]["win_rates"][0] * 48).is_integer()  # continuous preferences
    except ImportError:
        assert res["alpacaeval"]["lc_method"].startswith("sftmix fallback")
        assert res["alpacaeval"]["annotator"] == "sftmix" and "not AlpacaEval 2's annotator" in table
