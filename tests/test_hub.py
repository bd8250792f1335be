"""Models and datasets by Hub id (issue 12), through the real download code against a loopback stand-in of the Hub.

    pytest tests/test_hub.py                 # everything (the whole-pipeline ones are marked slow: about a minute each)
    pytest tests/test_hub.py -m "not slow"   # the loaders, offline errors and the resumed download

`tests/hub_stub.py` serves a tiny random model, an Alpaca-format dataset, an UltraChat-layout chat dataset (a
`messages` column, split `train_sft` inferred from its file names), a PubMedQA `pqa_labeled` set and a gated model on
http://127.0.0.1:PORT. Each `sftmix` command runs in a subprocess with HF_ENDPOINT pointing at it and a fresh HF_HOME
(huggingface_hub reads its settings once, at import); nothing but loopback is contacted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hub_stub import GRANTED_TOKEN, HubStub

from sftmix.models import build_byte_tokenizer, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
N_ALPACA, N_CHATS = 40, 14


def _alpaca_rows(n):
    rows = []
    for i in range(n):
        inp = "" if i % 3 else f"context {i}"
        rows.append({"instruction": f"Name colour number {i}.", "input": inp, "output": f"Colour {i} is blue."})
        # the real tatsu-lab/alpaca also has the rendered prompt in a `text` column
        rows[-1]["text"] = f"### Instruction:\n{rows[-1]['instruction']}\n\n### Response:\n{rows[-1]['output']}"
    return rows


def _chat_rows(n):
    rows = []
    for i in range(n):
        turns = 2 + i % 2  # 2 or 3 assistant turns
        msgs = []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"chat {i} question {t}"},
                     {"role": "assistant", "content": f"chat {i} answer {t}"}]
        # UltraChat's layout: `prompt` (the first user turn, a string), `prompt_id`, `messages`
        rows.append({"prompt": msgs[0]["content"], "prompt_id": f"{i:04d}", "messages": msgs})
    return rows


def _pubmedqa_rows(n):
    dec = ["yes", "no", "maybe"]
    return [{"pubid": 1000 + i, "question": f"Does treatment {i} help?",
             "context": {"contexts": [f"Background {i}.", f"Results {i}."], "labels": ["BACKGROUND", "RESULTS"],
                         "meshes": ["Humans"]},
             "long_answer": f"Long answer {i}.", "final_decision": dec[i % 3]} for i in range(n)]


def _medqa_rows(n):  # GBaker/MedQA-USMLE-4-options' columns
    return [{"question": f"A patient with sign {i}. Which drug?", "answer": f"drug {i}c",
             "options": {k: f"drug {i}{k.lower()}" for k in "ABCD"}, "meta_info": "step1",
             "answer_idx": "ABCD"[i % 4], "metamap_phrases": ["patient", f"sign {i}"]} for i in range(n)]


def _medmcqa_rows(n):  # openlifescienceai/medmcqa's columns: cop 0-based
    return [{"id": f"mcq-{i}", "question": f"Nerve {i} supplies?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
             "cop": i % 4, "choice_type": "single", "exp": None, "subject_name": "Anatomy", "topic_name": None}
            for i in range(n)]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Local folders laid out as the real Hub repos are, served by one stand-in for the whole module."""
    root = tmp_path_factory.mktemp("repos")
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=7)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "alpaca" / "data").mkdir(parents=True)
    pd.DataFrame(_alpaca_rows(N_ALPACA)).to_parquet(root / "alpaca" / "data" / "train-00000-of-00001.parquet")
    (root / "alpaca" / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a tiny Alpaca\n")
    (root / "chat" / "data").mkdir(parents=True)
    chats = _chat_rows(N_CHATS)
    pd.DataFrame(chats).to_parquet(root / "chat" / "data" / "train_sft-00000-of-00001-0a1b2c3d.parquet")
    pd.DataFrame(chats[:3]).to_parquet(root / "chat" / "data" / "test_sft-00000-of-00001-0a1b2c3d.parquet")
    (root / "chat" / "README.md").write_text("---\nlicense: mit\n---\n# a tiny UltraChat\n")
    (root / "pubmedqa" / "pqa_labeled").mkdir(parents=True)
    pd.DataFrame(_pubmedqa_rows(12)).to_parquet(root / "pubmedqa" / "pqa_labeled" / "train-00000-of-00001.parquet")
    (root / "pubmedqa" / "README.md").write_text(
        "---\nconfigs:\n- config_name: pqa_labeled\n  data_files:\n  - split: train\n"
        "    path: pqa_labeled/train-*\n---\n# PubMedQA\n")
    (root / "medqa" / "data").mkdir(parents=True)
    pd.DataFrame(_medqa_rows(9)).to_parquet(root / "medqa" / "data" / "test-00000-of-00001.parquet")
    (root / "medmcqa" / "data").mkdir(parents=True)
    pd.DataFrame(_medmcqa_rows(9)).to_parquet(root / "medmcqa" / "data" / "validation-00000-of-00001.parquet")
    for name, rows in (("meadow_a", _alpaca_rows(5)), ("meadow_b", _alpaca_rows(4)[1:]),
                       ("meadow_bad", _alpaca_rows(4))):
        # the medalpaca medical_meadow_* layout: one JSON array, no dataset card
        (root / name).mkdir()
        if name == "meadow_bad":
            rows[2]["output"] = ""
        (root / name / f"medical_{name}.json").write_text(json.dumps([{k: r[k] for k in ("instruction", "input",
                                                                                         "output")} for r in rows]))
        (root / name / ".gitattributes").write_text("*.json filter=lfs diff=lfs merge=lfs -text\n")
    with HubStub() as hub:
        hub.model_sha = hub.add_repo("org/tiny-model", root / "model")
        hub.add_repo("org/gated-model", root / "model", gated=True)
        ref = build_tiny_model(tok, seed=9)
        ref.save_pretrained(root / "ref")
        tok.save_pretrained(root / "ref")
        hub.ref_sha = hub.add_repo("org/ref-model", root / "ref")
        # a repo with its own modelling code (auto_map): transformers runs it only with trust_remote_code
        tok.save_pretrained(root / "custom")
        (root / "custom" / "config.json").write_text(json.dumps({
            "model_type": "sftmix-custom", "architectures": ["XForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
        (root / "custom" / "configuration_x.py").write_text("raise RuntimeError('remote code must not run')\n")
        hub.add_repo("org/custom-code", root / "custom")
        big = build_tiny_model(tok, seed=8, hidden_size=512)  # ~20 MB of weights: more than one 10 MB chunk
        big.save_pretrained(root / "big")
        tok.save_pretrained(root / "big")
        hub.add_repo("org/big-model", root / "big")
        hub.big_dir = root / "big"
        hub.alpaca_sha = hub.add_repo("org/alpaca", root / "alpaca", repo_type="dataset")
        hub.chat_sha = hub.add_repo("org/chat", root / "chat", repo_type="dataset")
        hub.pubmedqa_sha = hub.add_repo("org/pubmedqa", root / "pubmedqa", repo_type="dataset")
        hub.add_repo("org/medqa", root / "medqa", repo_type="dataset")
        hub.meadow_shas = [hub.add_repo(f"org/{n}", root / n, repo_type="dataset")
                           for n in ("meadow_a", "meadow_b", "meadow_bad")]
        hub.add_repo("org/medmcqa", root / "medmcqa", repo_type="dataset")
        yield hub


def _env(hub, hf_home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.env(hf_home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def sftmix(env, *args):
    return subprocess.run([sys.executable, "-m", "sftmix.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _ok(res):
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.slow  # whole pipelines in subprocesses (about a minute)
def test_run_with_a_hub_model_and_dataset_downloads_then_hits_the_cache(repos, tmp_path):
    hub, hf_home = repos, tmp_path / "hf_home"
    env = _env(hub, hf_home)
    n0 = len(hub.downloads())
    out = tmp_path / "run"
    res = _ok(sftmix(env, "run", "--config", SMOKE, "--model", "org/tiny-model", "--data", "org/alpaca",
                     "--output_dir", str(out)))
    # the console: a line per stage and the training bar, not the libraries' per-step bars; those go to the log file
    assert "[sftmix] train:ntp" in res.stderr and "Loading weights" not in res.stderr
    assert "Tokenizing" not in res.stderr and "Generating train split" not in res.stderr
    log_text = (out / "logs" / "sftmix.log").read_text()
    assert "[sftmix] train:ntp" in log_text and "org/alpaca" in log_text
    got = {p for _, p in hub.downloads()[n0:]}
    assert f"/org/tiny-model/resolve/{hub.model_sha}/model.safetensors" in got
    assert f"/datasets/org/alpaca/resolve/{hub.alpaca_sha}/data/train-00000-of-00001.parquet" in got
    # the standard cache holds them
    assert (hf_home / "hub" / "models--org--tiny-model" / "snapshots" / hub.model_sha / "model.safetensors").exists()
    assert (hf_home / "hub" / "models--org--tiny-model" / "refs" / "main").read_text() == hub.model_sha
    # trained and reported; every source row became one example
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["format"] == "alpaca" and stats["n_records"] == N_ALPACA and stats["container"] == "hub"
    assert stats["hub"][0]["sha"] == hub.alpaca_sha and stats["hub"][0]["split"] == "train"
    assert (out / "sftmix" / "model").is_dir() and (out / "ntp" / "model").is_dir()
    report = json.loads((out / "report.json").read_text())
    assert report["sources"]["models"] == [{"role": "model", "id": "org/tiny-model", "revision": "main",
                                            "sha": hub.model_sha}]
    assert report["sources"]["data"] == [{"id": "org/alpaca", "config": None, "split": "train",
                                          "revision": "main", "sha": hub.alpaca_sha}]
    config_text = (out / "config.yaml").read_text()
    assert f"org/tiny-model@main = {hub.model_sha}" in config_text
    assert f"data: org/alpaca split train@main = {hub.alpaca_sha}" in config_text
    # the record keeps what the source row said, `text` included
    first = json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][-1]["role"] == "user" and "text" in first

    # a second run (fresh run directory, same HF_HOME): no file is downloaded again
    n1 = len(hub.downloads())
    _ok(sftmix(env, "run", "--config", SMOKE, "--model", "org/tiny-model", "--data", "org/alpaca",
               "--output_dir", str(tmp_path / "run2"), "--recipes", "ntp"))
    assert hub.downloads()[n1:] == []
    assert json.loads((tmp_path / "run2" / "sources.json").read_text()) == report["sources"]

    # offline, from the cache alone (HF_HUB_OFFLINE=1): the same ids still resolve and load
    n2 = len(hub.requests)
    _ok(sftmix(_env(hub, hf_home, HF_HUB_OFFLINE="1"), "run", "--config", SMOKE, "--model", "org/tiny-model",
               "--data", "org/alpaca", "--output_dir", str(tmp_path / "run3"), "--recipes", "ntp"))
    assert hub.requests[n2:] == []
    assert json.loads((tmp_path / "run3" / "sources.json").read_text()) == report["sources"]

    # the first run directory refuses another model, and its record of what it loaded stays as it was
    res = sftmix(env, "run", "--config", SMOKE, "--model", "tiny-random:1", "--data", "org/alpaca",
                 "--output_dir", str(out))
    assert res.returncode == 2 and "holds a run made with another config" in res.stderr
    assert json.loads((out / "sources.json").read_text()) == report["sources"]


@pytest.mark.slow  # whole pipelines in subprocesses (about a minute)
def test_multi_turn_hub_dataset_with_a_named_split(repos, tmp_path):
    hub = repos
    env = _env(hub, tmp_path / "hf_home")
    out = tmp_path / "run"
    # step 1 with another Hub model as the reference (at its own revision: here its commit sha)
    _ok(sftmix(env, "run", "--config", SMOKE, "--model", "org/tiny-model", "--data", "org/chat",
               "--dataset_train_split", "train_sft", "--output_dir", str(out), "--recipes", "sftmix",
               "--reference_model", "org/ref-model", "--reference_model_revision", hub.ref_sha,
               "--num_checkpoints", "1", "--max_length", "256"))  # byte tokens: 3-turn histories need > 128
    sources = json.loads((out / "sources.json").read_text())
    assert sources["models"][1] == {"role": "reference_model", "id": "org/ref-model", "revision": hub.ref_sha,
                                    "sha": hub.ref_sha}
    assert sources["data"] == [{"id": "org/chat", "config": None, "split": "train_sft", "revision": "main",
                                "sha": hub.chat_sha}]
    assert any(p.endswith(f"/org/ref-model/resolve/{hub.ref_sha}/model.safetensors") for _, p in hub.downloads())
    assert json.loads((out / "dynamics" / "split.json").read_text())["reference_model"] == "org/ref-model"
    stats = json.loads((out / "data" / "stats.json").read_text())
    n_turns = sum(2 + i % 2 for i in range(N_CHATS))
    assert stats["format"] == "openai" and stats["n_rows"] == N_CHATS and stats["n_records"] == n_turns
    assert stats["hub"][0]["split"] == "train_sft" and stats["hub"][0]["sha"] == hub.chat_sha
    records = [json.loads(x) for f in ("train.jsonl", "heldout.jsonl")
               for x in (out / "data" / f).read_text().splitlines()]
    assert len(records) == n_turns
    # one example per assistant turn, its prompt the whole history before it
    chat3 = sorted((r for r in records if r["prompt_id"] == "0003"), key=lambda r: r["turn"])
    assert [r["turn"] for r in chat3] == [1, 2, 3]
    assert [len(r["prompt"]) for r in chat3] == [1, 3, 5]
    assert chat3[2]["completion"] == [{"role": "assistant", "content": "chat 3 answer 2"}]
    # UltraChat's `prompt` string column is kept under another name instead of replacing the prompt messages
    assert chat3[0]["source_prompt"] == "chat 3 question 0"
    assert (out / "report.json").exists()


def test_a_list_of_card_less_hub_datasets_is_one_merged_source(repos, tmp_path):
    """The MedAlpaca merge: a list of ids (each one JSON file and no README, as the medalpaca sets are) read in order
    into one set; offline afterwards from the cache alone; a bad row names its dataset and row index."""
    code = ("import json, sys\nfrom sftmix.data import load_records_with_stats\nfrom sftmix.utils import SFTMixError\n"
            "recs, stats = load_records_with_stats(['org/meadow_a', 'org/meadow_b'])\n"
            "try:\n    load_records_with_stats('org/meadow_bad')\nexcept SFTMixError as e:\n    err = str(e)\n"
            "print(json.dumps({'n': len(recs), 'guids': len({r['guid'] for r in recs}), 'hub': stats['hub'],"
            " 'first': recs[0]['prompt'][0]['content'], 'err': err}))\n")
    hf_home = tmp_path / "hf_home"
    runs = []
    for offline in ("0", "1"):
        n0 = len(repos.requests)
        res = subprocess.run([sys.executable, "-c", code], env=_env(repos, hf_home, HF_HUB_OFFLINE=offline),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if offline == "1":
            assert repos.requests[n0:] == []
    for out in runs:
        # meadow_b repeats meadow_a's rows 1-3: 8 examples, 3 of them exact repeats (guids suffixed, all unique)
        assert out["n"] == 5 + 3 and out["guids"] == 8
        assert [h["sha"] for h in out["hub"]] == repos.meadow_shas[:2]
        assert out["first"] == "Name colour number 0.\n\ncontext 0"
        assert "org/meadow_bad" in out["err"] and "row 2" in out["err"] and "'output'" in out["err"]
    assert runs[0]["err"] == runs[1]["err"]


def test_a_list_of_hub_ids_each_with_its_own_format_config_and_split(repos, tmp_path):
    """Issue 25: a list of ids no longer has to share one format and one split: each id is ID[:CONFIG[:SPLIT]] (as
    the evaluation sets), its format detected on its own first row; the sources record each id's split."""
    code = ("import json\nfrom sftmix.data import load_records_with_stats\nfrom sftmix.config import RunConfig\n"
            "from sftmix.hub import run_sources\n"
            "recs, stats = load_records_with_stats(['org/alpaca', 'org/chat::train_sft'])\n"
            "src = run_sources(RunConfig(data=['org/alpaca', 'org/chat::train_sft']))\n"
            "print(json.dumps({'n': len(recs), 'format': stats['format'], 'splits': [h['split'] for h in "
            "stats['hub']], 'sources': [(e['id'], e['split']) for e in src['data']],"
            " 'last': recs[-1]['completion'][-1]['content']}))\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(repos, tmp_path / "hf_home"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["splits"] == ["train", "train_sft"]
    assert out["sources"] == [["org/alpaca", "train"], ["org/chat", "train_sft"]]
    assert out["format"].startswith("org/alpaca: alpaca, org/chat::train_sft: ")
    n_chat_turns = sum(2 + i % 2 for i in range(N_CHATS))  # one example per assistant turn
    assert out["n"] == N_ALPACA + n_chat_turns and out["last"] == f"chat {N_CHATS - 1} answer 2"


def test_offline_with_an_uncached_id_is_one_line(repos, tmp_path):
    env = _env(repos, tmp_path / "hf_home", HF_HUB_OFFLINE="1")
    n0 = len(repos.requests)
    for args, name in ((["--model", "org/tiny-model"], "model 'org/tiny-model'"),
                       (["--model", "tiny-random:0", "--data", "org/alpaca"], "dataset 'org/alpaca'")):
        res = sftmix(env, "run", "--config", SMOKE, "--output_dir", str(tmp_path / "run"), *args)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        assert lines[-1].startswith("sftmix: error: ") and name in lines[-1]
        assert str(tmp_path / "hf_home" / "hub") in lines[-1] and "hf download org/" in lines[-1]
        assert "HF_HUB_OFFLINE=1" in lines[-1]
    assert repos.requests[n0:] == []  # offline means offline


@pytest.mark.slow  # six subprocesses
def test_gated_missing_and_bad_revision_are_one_line(repos, tmp_path):
    env = _env(repos, tmp_path / "hf_home")
    code = ("import sys\nfrom sftmix.models import resolve_model\nfrom sftmix.utils import SFTMixError\n"
            "try:\n    resolve_model(sys.argv[1], revision=sys.argv[2])\nexcept SFTMixError as e:\n"
            "    print(e)\nelse:\n    print('resolved')\n")

    def resolve(repo_id, revision="main", **extra):
        res = subprocess.run([sys.executable, "-c", code, repo_id, revision], env={**env, **extra}, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.strip()

    msg = resolve("org/gated-model")
    assert "gated" in msg and "not logged in" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    msg = resolve("org/gated-model", HF_TOKEN="hf_wrong")
    assert "has not been granted access" in msg and "org/gated-model" in msg
    assert resolve("org/gated-model", HF_TOKEN=GRANTED_TOKEN) == "resolved"
    msg = resolve("org/no-such-model")
    assert "does not exist on the Hub" in msg and "org/no-such-model" in msg
    msg = resolve("org/tiny-model", "v9")
    assert "no revision 'v9'" in msg
    assert resolve("org/tiny-model", repos.model_sha) == "resolved"
    load = ("from sftmix.models import load_model_and_tokenizer\nfrom sftmix.utils import SFTMixError\ntry:\n"
            "    load_model_and_tokenizer('org/custom-code', device='cpu')\nexcept SFTMixError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", load], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "own modelling code" in res.stdout and "--trust_remote_code true" in res.stdout


def test_a_download_cut_half_way_resumes(repos, tmp_path):
    """The connection drops 11 MB into a 20 MB weights file. huggingface_hub (2.x) writes downloads in 10 MB chunks
    and retries a dropped stream with a Range request from the last complete chunk; the loaded model is the served
    one. (A process that is killed instead loses only the file it was writing: files already in the cache stay.)"""
    hub = repos
    env = _env(hub, tmp_path / "hf_home")
    size = (hub.big_dir / "model.safetensors").stat().st_size
    assert size > 12 * 2**20
    hub.cut_once("org/big-model", "model.safetensors", 11 * 2**20)
    n0 = len(hub.requests)
    code = ("import torch\nfrom sftmix.models import load_model_and_tokenizer\n"
            "from transformers import AutoModelForCausalLM\n"
            "m, tok = load_model_and_tokenizer('org/big-model', device='cpu')\n"
            f"ref = AutoModelForCausalLM.from_pretrained({str(hub.big_dir)!r})\n"
            "x = torch.tensor([tok('hello there')['input_ids']])\n"
            "print(bool(torch.equal(m(x).logits, ref(x).logits)))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "True"
    weights = [r for r in hub.requests[n0:] if r[1].endswith("/model.safetensors") and r[0] in ("GET", "CUT")]
    assert [w[0] for w in weights] == ["GET", "CUT", "GET"]
    assert weights[0][2] is None and weights[1][2] == str(11 * 2**20)
    assert weights[2][2] == f"bytes={10 * 2**20}-"  # resumed after the first complete 10 MB chunk


def test_evaluation_sets_by_hub_id_read_as_their_local_files(repos, tmp_path):
    """PubMedQA (pqa_labeled), MedQA (4 options) and MedMCQA by Hub id give the same questions as the same rows in
    the local file layouts the loaders already read; the metrics record the Hub commit."""
    from sftmix.eval.tasks import load_medmcqa, load_medqa, load_pubmedqa
    from sftmix.utils import write_jsonl

    local = tmp_path / "local"
    local.mkdir()
    pq = {str(r["pubid"]): {"QUESTION": r["question"], "CONTEXTS": r["context"]["contexts"],
                            "final_decision": r["final_decision"]} for r in _pubmedqa_rows(12)}
    (local / "pubmedqa.json").write_text(json.dumps(pq))
    write_jsonl(local / "medqa.jsonl", _medqa_rows(9))
    write_jsonl(local / "medmcqa.jsonl", _medmcqa_rows(9))
    items = lambda xs: [[it.id, it.text, it.choices, it.answer] for it in xs]  # noqa: E731
    want = {"pubmedqa": items(load_pubmedqa(str(local / "pubmedqa.json"))),
            "medqa": items(load_medqa(str(local / "medqa.jsonl"))),
            "medmcqa": items(load_medmcqa(str(local / "medmcqa.jsonl"), "0"))}
    code = ("import json\nfrom sftmix.eval import evaluate as ev\nfrom sftmix.eval import tasks\n"
            "from sftmix.config import EvalConfig\nfrom sftmix.models import load_model_and_tokenizer\n"
            "items = lambda xs: [[it.id, it.text, it.choices, it.answer] for it in xs]\n"
            "got = {'pubmedqa': items(tasks.load_pubmedqa('org/pubmedqa')), "
            "'medqa': items(tasks.load_medqa('org/medqa')), 'medmcqa': items(tasks.load_medmcqa('org/medmcqa'))}\n"
            "m, tok = load_model_and_tokenizer('tiny-random:0', device='cpu')\n"
            "res = ev.run_eval(m, tok, EvalConfig(pubmedqa_file='org/pubmedqa', num_shots=1), "
            f"{str(tmp_path / 'e')!r})\n"
            "print(json.dumps({'items': got, 'source': res['pubmedqa']['source'], 'n': res['pubmedqa']['n']}))\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(repos, tmp_path / "hf_home"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["items"] == want
    assert [x[3] for x in out["items"]["medmcqa"]] == [i % 4 for i in range(9)]  # cop 0-based, read as such
    assert out["source"] == {"id": "org/pubmedqa", "config": "pqa_labeled", "split": "train", "revision": "main",
                             "sha": repos.pubmedqa_sha}
    assert out["n"] == 12 - 1  # one question became the shot


@pytest.mark.slow
def test_a_run_killed_by_a_failed_download_continues_with_the_missing_files(repos, tmp_path):
    """The weights never arrive (every attempt is cut off): one line, exit 2; the same command again fetches only what
    is missing (the weights), not the config and tokenizer files it already has, and runs to the end."""
    hub = repos
    env = _env(hub, tmp_path / "hf_home")
    hub.cut_once("org/tiny-model", "model.safetensors", 1000, times=6)  # more than huggingface_hub's retries
    args = ["run", "--config", SMOKE, "--model", "org/tiny-model", "--output_dir", str(tmp_path / "run"),
            "--recipes", "ntp", "--num_checkpoints", "1"]
    n0 = len(hub.requests)
    res = sftmix(env, *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = [x for x in res.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("sftmix: error: model 'org/tiny-model': a download from the Hub failed")
    assert "run the same command again" in last
    first = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests[n0:] if m == "GET" and "/resolve/" in p}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= first
    hub._cuts.clear()
    n1 = len(hub.requests)
    _ok(sftmix(env, *args))
    again = [p.rsplit("/", 1)[-1] for m, p, _ in hub.requests[n1:] if m == "GET" and "/resolve/" in p]
    assert "model.safetensors" in again and not {"config.json", "tokenizer.json", "tokenizer_config.json"} & set(again)
    assert (tmp_path / "run" / "report.json").exists()


def test_hub_ids_paths_and_the_trl_field_names(tmp_path, monkeypatch):
    """In-process, no network (offline): what counts as a Hub id, a local path of that name winning, the TRL names."""
    from sftmix.config import parse_config
    from sftmix.data import load_records_with_stats
    from sftmix.hub import is_hub_id

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert is_hub_id("HuggingFaceH4/ultrachat_200k", "dataset") and is_hub_id("meta-llama/Llama-3.1-8B")
    assert not is_hub_id("data/smoke.jsonl", "dataset") and not is_hub_id("./org/x") and not is_hub_id("/org/x")
    assert not is_hub_id("org/model.gguf") and not is_hub_id("tiny-random:0") and not is_hub_id("sharegpt:200")
    # a local file named like an id is read as that file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "alpaca").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    recs, stats = load_records_with_stats("org/alpaca")
    assert len(recs) == 1 and stats["container"] == "jsonl" and "hub" not in stats
    cfg = parse_config(["--config", SMOKE, "--output_dir", str(tmp_path / "r"), "--data", "org/a, org/b",
                        "--torch_dtype", "bfloat16", "--model_revision", "v1.0", "--dataset_config", "pqa_labeled",
                        "--dataset_train_split", "train_sft", "--attn_implementation", "eager"])
    run = cfg.run
    assert run.data == ["org/a", "org/b"] and run.dtype == "bfloat16" and run.torch_dtype is None
    assert (run.model_revision, run.dataset_config, run.dataset_train_split) == ("v1.0", "pqa_labeled", "train_sft")
    assert run.attn_implementation == "eager" and cfg.train.trust_remote_code is False  # TRL's own field
    assert parse_config(["--config", SMOKE, "--output_dir", str(tmp_path / "r")]).run.dataset_train_split == "train"
