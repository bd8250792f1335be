"""Issue 14, the run directory's reliability: the lock, inputs inside the outputs, content-hash staleness (data and
weights), evaluation settings that change on a finished run, older config.yaml files, a deleted confidence.jsonl,
incomplete-checkpoint fallback, the held-out split by content, the judge share in the report, and the early
validation of every setting and input file. Tiny random model (configs/smoke.yaml), a few steps each."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftmix.cli import main
from sftmix.config import parse_config
from sftmix.utils import SFTMixError, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
DATA = ROOT / "configs" / "data" / "smoke.jsonl"
# the smallest run: the NTP recipe only (no step 1), two optimizer steps, the held-out NLL only
TINY = ["--recipes", "ntp", "--max_steps", "2", "--num_checkpoints", "1", "--disable_tqdm", "true"]


def cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def run_tiny(capsys, out, *extra):
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *TINY, *extra)
    assert code == 0, err[-3000:]
    return err


@pytest.fixture()
def logs(caplog):
    caplog.set_level(logging.INFO, logger="sftmix")
    return caplog


def _nll(out, name):
    return json.loads((Path(out) / "eval" / f"{name}.json").read_text())["results"]["heldout"]["nll"]


# ----------------------------------------------------------------------------------------------------------- lock


def test_second_run_on_a_locked_directory_exits_2_naming_the_holder(tmp_path, capsys, logs):
    out = tmp_path / "run"
    out.mkdir()
    # another process holds the directory's lock (what a running `sftmix run` does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'command': 'sftmix run other'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *TINY)
        assert code == 2 and "in use by another sftmix run" in err and f"pid {holder.pid}" in err
        assert "sftmix run other" in err and len(err.strip().splitlines()) == 1
        assert not (out / "data").exists()  # nothing ran
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over, and released again at exit
    run_tiny(capsys, out)
    assert "took over the lock" in logs.text
    assert (out / ".lock").read_text() == ""


# ------------------------------------------------------------------------------------------- own-file protection


@pytest.mark.parametrize("where", ["data", "eval"])
def test_an_input_inside_the_run_outputs_is_refused(tmp_path, capsys, where):
    out = tmp_path / "run"
    target = out / "data" / "train.jsonl" if where == "data" else out / "eval" / "medqa.jsonl"
    target.parent.mkdir(parents=True)
    shutil.copy(DATA, target)
    before = target.read_bytes()
    flag = ["--data", target] if where == "data" else ["--medqa_file", target]
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *TINY, *flag)
    assert code == 2 and "lies inside the run directory's output" in err, err
    assert target.read_bytes() == before and not (out / "ntp").exists()


# ---------------------------------------------------------------------------------------------- content staleness


def test_a_data_file_edited_in_place_reruns_what_depends_on_it(tmp_path, capsys, logs):
    data, out = tmp_path / "d.jsonl", tmp_path / "run"
    shutil.copy(DATA, data)
    run_tiny(capsys, out, "--data", data)
    first = _nll(out, "ntp")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "output": r["output"] + " and more words"}) + "\n" for r in rows))
    logs.clear()
    run_tiny(capsys, out, "--data", data)
    text = logs.text
    assert f"data file {data} changed since the last run: rerunning data" in text
    assert "rerunning train:ntp" in text and "rerunning eval:ntp" in text
    assert all(r["completion"][0]["content"].endswith("and more words")
               for r in read_jsonl(out / "data" / "train.jsonl"))
    assert _nll(out, "ntp") != first
    # unchanged now: every stage is skipped
    logs.clear()
    run_tiny(capsys, out, "--data", data)
    assert "rerunning" not in logs.text and "train:ntp    done already" in logs.text


def test_evaluation_looks_at_the_weights_and_eval_settings_change_on_a_finished_run(tmp_path, capsys, logs):
    from sftmix.models import load_model_and_tokenizer

    out = tmp_path / "run"
    run_tiny(capsys, out)
    assert _nll(out, "ntp") != _nll(out, "start")
    # the recipe's model is replaced by other weights in the same folder (same path, same parameter count)
    model, tok = load_model_and_tokenizer("tiny-random:0", device="cpu")
    shutil.rmtree(out / "ntp" / "model")
    model.save_pretrained(out / "ntp" / "model")
    tok.save_pretrained(out / "ntp" / "model")
    logs.clear()
    run_tiny(capsys, out)
    assert "weights of" in logs.text and "rerunning eval:ntp" in logs.text
    assert _nll(out, "ntp") == pytest.approx(_nll(out, "start"))  # the start weights, so the start's NLL

    # an evaluation set added to the finished run: evaluated, nothing retrained, no refusal
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text("".join(json.dumps({"question": f"q{i}?", "options": {k: f"o{k}{i}" for k in "ABCD"},
                                         "answer_idx": "ABCD"[i % 4]}) + "\n" for i in range(6)))
    logs.clear()
    run_tiny(capsys, out, "--medqa_file", medqa, "--num_shots", "1")
    assert "train:ntp    done already" in logs.text and "rerunning eval:ntp" in logs.text
    res = json.loads((out / "eval" / "ntp.json").read_text())["results"]
    assert res["medqa"]["n"] == 5  # 6 questions, 1 taken as the shot
    assert yaml.safe_load((out / "config.yaml").read_text())["medqa_file"] == str(medqa)
    md = (out / "report.md").read_text()
    assert "(n=5)" in md  # the accuracy carries its sample size


def test_an_older_config_yaml_with_fewer_keys_is_read_with_the_defaults(tmp_path, capsys, logs):
    out = tmp_path / "run"
    run_tiny(capsys, out)
    path = out / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key in ("judge_timeout", "lora_r", "score_batch_size", "save_strategy", "judge_min_valid_fraction",
                "mixup_chunk_tokens"):
        cfg.pop(key, None)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    logs.clear()
    run_tiny(capsys, out)
    assert "train:ntp    done already" in logs.text


def test_a_deleted_confidence_file_is_rebuilt_not_a_loop(tmp_path, capsys, logs):
    out = tmp_path / "run"
    args = ["--config", SMOKE, "--output_dir", out, "--recipes", "sftmix", "--max_steps", "2", "--num_checkpoints",
            "1", "--disable_tqdm", "true"]
    code, err = cli(capsys, "run", *args)
    assert code == 0, err[-2000:]
    conf = (out / "confidence.jsonl").read_text()
    (out / "confidence.jsonl").unlink()
    shutil.rmtree(out / "sftmix")
    code, err = cli(capsys, "train", "--recipe", "sftmix", "--output_dir", out)
    assert code == 0, err[-2000:]
    assert (out / "confidence.jsonl").read_text() == conf and "rebuilt from" in logs.text
    (out / "confidence.jsonl").unlink()
    code, err = cli(capsys, "dynamics", "--output_dir", out)
    assert code == 0 and (out / "confidence.jsonl").read_text() == conf
    # a finished recipe is not retrained because its confidence file went missing and came back
    (out / "confidence.jsonl").unlink()
    logs.clear()
    code, err = cli(capsys, "train", "--recipe", "sftmix", "--output_dir", out)
    assert code == 0 and "train:sftmix done already" in logs.text and "rerunning" not in logs.text


def test_train_refuses_a_step1_split_from_other_data(tmp_path, capsys):
    data, out = tmp_path / "d.jsonl", tmp_path / "run"
    shutil.copy(DATA, data)
    args = ["--config", SMOKE, "--output_dir", out, "--data", data, "--recipes", "sftmix", "--max_steps", "2",
            "--num_checkpoints", "1", "--disable_tqdm", "true"]
    code, err = cli(capsys, "run", *args)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "output": r["output"] + " edited"}) + "\n" for r in rows))
    code, err = cli(capsys, "train", *args)
    assert code == 2 and "was computed on another training split" in err, err[-2000:]
    code, err = cli(capsys, "run", *args)  # the whole command reruns step 1 first
    assert code == 0, err[-2000:]


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys, logs):
    from sftmix.utils import checkpoint_problem, last_complete_checkpoint

    out = tmp_path / "run"
    run_tiny(capsys, out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "3",
             "--keep_checkpoints", "true")
    ntp = out / "ntp"
    assert last_complete_checkpoint(ntp) == str(ntp / "checkpoint-3")
    # damaged in each way a killed save or a bad disk leaves them
    (ntp / "checkpoint-3" / "scheduler.pt").unlink()
    assert "scheduler.pt" in checkpoint_problem(ntp / "checkpoint-3")
    weights = ntp / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "truncated" in checkpoint_problem(ntp / "checkpoint-2")
    assert last_complete_checkpoint(ntp) == str(ntp / "checkpoint-1")
    assert (ntp / "checkpoint-3").exists() and (ntp / "checkpoint-2").exists()  # the query removes nothing
    for name in ("optimizer.pt", "rng_state.pth"):
        broken = tmp_path / "broken" / "checkpoint-9"
        shutil.copytree(ntp / "checkpoint-1", broken, dirs_exist_ok=True)
        (broken / name).write_bytes(b"garbage")
        assert name in checkpoint_problem(broken)

    # an interrupted run (no final model) resumes from checkpoint-1 and says why not from the newer ones
    shutil.rmtree(ntp / "model")
    (ntp / "train_result.json").unlink()
    logs.clear()
    run_tiny(capsys, out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "3",
             "--keep_checkpoints", "true")
    text = logs.text
    assert "checkpoint-3 is incomplete (scheduler.pt (LR scheduler) is missing)" in text
    assert "checkpoint-2 is incomplete (model.safetensors is truncated" in text
    assert f"resuming from {ntp / 'checkpoint-1'}" in text
    assert json.loads((ntp / "train_result.json").read_text())["resumed_from"] == str(ntp / "checkpoint-1")


# ------------------------------------------------------------------------------------------- held-out duplicates


def test_duplicates_land_on_one_side_and_the_report_says_where(tmp_path):
    from sftmix.data import content_key, load_records, split_heldout
    from sftmix.run import stages

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    data = tmp_path / "dup.jsonl"
    # 8 rows duplicated three times each: 24 extra copies
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:8] * 3))
    recs = load_records(data)
    assert len({r["guid"] for r in recs}) == len(recs)  # suffixed guids
    for seed in range(20):
        train, held = split_heldout(recs, 0.2, seed=seed)
        assert not {content_key(r) for r in train} & {content_key(r) for r in held}, seed

    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path / "run"), "--data", str(data)])
    stages.stage_data(cfg)
    dup = json.loads((cfg.run_dir / "data" / "stats.json").read_text())["duplicates"]
    assert dup["n_duplicate_copies"] == 24 and dup["n_duplicated_examples"] == 8
    assert dup["duplicate_copies_in_train"] + dup["duplicate_copies_in_heldout"] == 24
    assert dup["n_examples_on_both_sides"] == 0
    from sftmix.report.report import _duplicates_line

    assert _duplicates_line(dup).startswith("24 extra copies of 8 examples")


# --------------------------------------------------------------------------------------------------- judge share


def test_judged_metrics_carry_their_share_and_are_withheld_below_the_minimum(tmp_path):
    from sftmix.report.report import comparison_rows, render_markdown
    from sftmix.run.fingerprints import failed_judgments as _failed_judgments

    def alpaca(n_valid, n=12):
        return {"n": n, "n_valid": n_valid, "n_failed": n - n_valid, "win_rate": 1.0 if n_valid else None,
                "lc_win_rate": None, "lc_note": "needs at least 10 successful judgments"}

    models = {name: {"label": name, "eval": {"heldout": {"nll": 1.0, "ppl": 2.7, "n_examples": 8},
                                             "alpacaeval": alpaca(v),
                                             "mtbench": {"n_judgments": 10, "n_failed": 1, "score": 6.5},
                                             "pubmedqa": {"accuracy": 0.5, "n": 40}}}
              for name, v in (("start", 1), ("ntp", 12), ("sftmix", 0))}
    rows = {r["model"]: r for r in comparison_rows(models, 0.9)}
    assert rows["start"]["alpacaeval_win_rate"] is None and rows["sftmix"]["alpacaeval_win_rate"] is None
    assert rows["ntp"]["alpacaeval_win_rate"] == 1.0 and rows["ntp"]["samples"]["alpacaeval_win_rate"] == [12, 12]
    summary = {"comparison": list(rows.values()), "data": {}, "models": {}, "timings": {}, "config_source": "x",
               "config": {}, "versions": {}, "run_dir": "r", "created": "now"}
    md = render_markdown(summary)
    assert "withheld: 1/12 valid judgments, below the minimum share 90%" in md
    assert "withheld: 0/12 valid judgments" in md  # a refused judge keeps its column, with the reason
    assert "6.5000 (9/10 valid)" in md and "0.5000 (n=40)" in md
    assert comparison_rows(models, 0.05)[0]["alpacaeval_win_rate"] == 1.0  # the threshold is a setting

    marker = tmp_path / "eval" / "start.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"results": {"alpacaeval": alpaca(1)}}))
    assert "alpacaeval (11)" in _failed_judgments(marker)  # a rerun asks the failed judgments again


# ------------------------------------------------------------------------------------------------ early validation


def _template(tmp_path):
    p = tmp_path / "bad.jinja"
    p.write_text("{% for m in messages %}{{ m.content }")
    return p


def _latin1_eval(tmp_path):
    p = tmp_path / "medqa.jsonl"
    good = json.dumps({"question": "q?", "options": {k: k for k in "ABCD"}, "answer_idx": "A"})
    p.write_bytes((good + "\n").encode() * 2 + b'{"question": "caf\xe9?"}\n')
    return p


BAD = [
    (["--recipes", "sftmix", "--per_device_train_batch_size", "3"], "is odd"),
    (["--num_train_epochs", "0", "--max_steps", "-1"], "num_train_epochs=0 trains nothing"),
    (["--num_shots", "-1", "--pubmedqa_file", "x.json"], "num_shots=-1 is out of range"),
    (["--learning_rate", "0"], "learning_rate=0.0 is out of range"),
    (["--learning_rate", "nan"], "learning_rate=nan is out of range"),
    (["--max_length", "0"], "max_length=0 is out of range"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0 is out of range"),
    (["--judge_concurrency", "0"], "judge_concurrency=0 is out of range"),
    (["--judge_min_valid_fraction", "1.5"], "judge_min_valid_fraction=1.5 is out of range"),
    (["--seed", "-1"], "seed=-1 is out of range"),
    (["--dataloader_num_workers", "-1"], "dataloader_num_workers=-1 is out of range"),
    (["--pubmedqa_file", "no/such/pubmedqa.json"], "no/such/pubmedqa.json: file not found"),
    (["--chat_template", "TEMPLATE"], "does not parse"),
    (["--alpacaeval_file", str(DATA)], "alpacaeval needs a judge: set judge_model"),
    (["--medqa_file", "LATIN1"], "line 3 is not UTF-8"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[1] for a in BAD])
def test_every_setting_and_input_is_checked_before_any_stage(tmp_path, capsys, args, message):
    args = [str(_template(tmp_path)) if a == "TEMPLATE" else str(_latin1_eval(tmp_path)) if a == "LATIN1" else a
            for a in args]
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, "--max_steps", "2", *args)
    assert code == 2 and message in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "data").exists() and not (out / "config.yaml").exists()  # before any stage, nothing written


def test_a_corrected_setting_after_a_refusal_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = cli(capsys, "run", "--config", SMOKE, "--output_dir", out, *TINY, "--pubmedqa_file", "typo.json")
    assert code == 2
    run_tiny(capsys, out)  # not "holds a run made with another config"


# ------------------------------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_latin1_deep_in_a_data_file_names_its_line(tmp_path, capsys, container):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    data = tmp_path / f"d.{container}"
    if container == "jsonl":
        lines = [json.dumps(r).encode() for r in rows]
        lines[29] = lines[29].replace(b'"output": "', b'"output": "caf\xe9 ')
        data.write_bytes(b"\n".join(lines) + b"\n")
    else:  # a pretty-printed JSON array: the bad byte in the 30th record, far past the first line
        text = json.dumps(rows, indent=1).encode()
        at = -1
        for _ in range(30):
            at = text.index(b'"output": "', at + 1)
        data.write_bytes(text[:at] + b'"output": "caf\xe9 ' + text[at + len(b'"output": "'):])
        bad_line = text[:at].count(b"\n") + 1
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", tmp_path / "run", *TINY, "--data", data)
    assert code == 2 and "not UTF-8" in err, err[-2000:]
    assert f"line {30 if container == 'jsonl' else bad_line}:" in err


def test_a_model_with_custom_code_needs_trust_remote_code(tmp_path, capsys):
    from sftmix.models import load_model_and_tokenizer
    from sftmix.run.validation import check_model

    model, tok = load_model_and_tokenizer("tiny-random:0", device="cpu")
    folder = tmp_path / "custom"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (folder / "config.json").write_text(json.dumps(conf))
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", tmp_path / "run", *TINY, "--model", folder)
    assert code == 2 and "auto_map" in err and "--trust_remote_code true" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "data").exists()  # refused before any stage ran
    check_model("model", str(folder), trust_remote_code=True)  # with the flag the model's code is allowed to load


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", blocker / "run", *TINY)
    assert code == 2 and f"{blocker} is a file, not a folder" in err and "Traceback" not in err
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", blocker, *TINY)
    assert code == 2 and "is a file, not a folder" in err


def test_lock_in_process_and_inputs_outside(tmp_path):
    from sftmix.rundir import RunLock

    with RunLock(tmp_path, "first"):
        with pytest.raises(SFTMixError, match="in use by another sftmix run .*first"):
            RunLock(tmp_path, "second").__enter__()
    with RunLock(tmp_path, "again"):  # released at exit
        pass
    assert os.path.exists(tmp_path / ".lock")


def test_a_truncated_model_file_is_one_line_naming_it(tmp_path, capsys):
    from sftmix.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-random:0", device="cpu")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = cli(capsys, "run", "--config", SMOKE, "--output_dir", tmp_path / "run", *TINY, "--model", folder)
    assert code == 2 and f"{weights} is truncated" in err and "Traceback" not in err, err[-2000:]


def test_failed_judgments_are_withheld_then_retried_on_the_next_run(tmp_path, capsys, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"fail": True, "calls": 0}

    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            state["calls"] += 1
            # the pre-flight request (the first) passes, then 11 of every 12 fail, transiently (a judge overloaded)
            if state["fail"] and state["calls"] % 12 != 1:
                self.send_response(503)
                self.end_headers()
                return
            body = json.dumps({"choices": [{"message": {"content": "A is better. [[A]]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    # the LC win rate is not this test's subject: with alpaca_eval installed it would fetch its data from the Hub
    monkeypatch.setattr("sftmix.eval.judge.length_controlled", lambda ok: (None, "not computed in this test", "none"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"say {w}", "output": f"{w} {w}"} for w in
                                  ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "red", "blue",
                                   "green", "small"]]))
    out = tmp_path / "run"
    judge = ["--alpacaeval_file", alpaca, "--judge_model", "stub", "--judge_max_retries", "0",
             "--judge_base_url", f"http://127.0.0.1:{srv.server_address[1]}/v1", "--max_new_tokens", "4",
             "--judge_concurrency", "1", "--eval_rounds", "1", "--alpacaeval_annotator", "sftmix"]
    try:
        run_tiny(capsys, out, *judge)
        md = (out / "report.md").read_text()
        assert "withheld: 1/12 valid judgments, below the minimum share 90%" in md
        assert "1.0000" not in md.split("## Data")[0]  # no win rate from the one valid judgment
        state["fail"] = False
        run_tiny(capsys, out, *judge)
        res = json.loads((out / "eval" / "ntp.json").read_text())["results"]["alpacaeval"]
        assert res["n_valid"] == 12 and res["n_failed"] == 0
        assert "(n=12)" in (out / "report.md").read_text()
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_moved_run_directory_is_not_stale(tmp_path, capsys, logs):
    run_tiny(capsys, tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    logs.clear()
    run_tiny(capsys, tmp_path / "b")
    assert "rerunning" not in logs.text and "eval:ntp     done already" in logs.text
