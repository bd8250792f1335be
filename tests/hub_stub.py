"""A loopback stand-in of the Hugging Face Hub, enough of its HTTP API for huggingface_hub, datasets and transformers.

    from hub_stub import HubStub                            # (tests/ is on sys.path under pytest)
    with HubStub() as hub:                                      # http://127.0.0.1:<free port>, a thread
        hub.add_repo("org/tiny-model", folder)                  # a model repo from a local folder (save_pretrained)
        hub.add_repo("org/alpaca", data_folder, repo_type="dataset")
        hub.add_repo("lmsys/mt-bench", write_mt_bench(folder), repo_type="space")   # FastChat's data/ layout
        hub.add_repo("org/gated", folder, gated=True)           # 401 without a token, 403 with a wrong one
        env = hub.env(tmp_path / "hf_home")                     # HF_ENDPOINT, HF_HOME, telemetry off, ...
        hub.downloads()                                         # [(repo_type, repo_id, file)] fetched by GET so far

The real download code (hf_hub_download, snapshot_download, HfApi.*_info, HfFileSystem as datasets uses it,
from_pretrained) runs unchanged against it. Served: repo info (/api/{models,datasets}/ID[/revision/REV]) with the
commit sha and siblings, tree listings (/tree/REV[/PATH], recursive or not), paths-info, and /resolve/REV/FILE for
HEAD and GET with ETag, X-Repo-Commit, Content-Length and byte Range requests. Errors carry the X-Error-Code header
huggingface_hub maps to its exceptions: RepoNotFound (404), RevisionNotFound (404), EntryNotFound (404), GatedRepo
(401 without a token, 403 with a token that was not granted). Each repo has one commit (`main`); its sha is a hash of
the repo's files, so changing a file changes it. `cut_once(repo_id, file, n_bytes)` makes the next GET of that file
stop after n bytes (the connection drops), to test resuming. Every request is logged in
`hub.requests` as (method, path, range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GRANTED_TOKEN = "hf_stub_granted_token"


class _Repo:
    def __init__(self, repo_id: str, repo_type: str, folder: Path, gated: bool):
        self.repo_id, self.repo_type, self.gated = repo_id, repo_type, gated
        self.files: dict[str, bytes] = {}
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                self.files[p.relative_to(folder).as_posix()] = p.read_bytes()
        h = hashlib.sha1()
        for name, data in self.files.items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        self.sha = h.hexdigest()

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def folders(self) -> set[str]:
        out = set()
        for name in self.files:
            parts = name.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out

    def entry(self, path: str) -> dict | None:
        if path in self.files:
            data = self.files[path]
            return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                    "lfs": {"oid": self.etag(path), "size": len(data), "pointerSize": 134}}
        if path in self.folders():
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def listing(self, path: str, recursive: bool) -> list[dict] | None:
        prefix = f"{path}/" if path else ""
        if path and path not in self.folders():
            return None
        names = sorted({*self.files, *self.folders()})
        below = [n for n in names if n.startswith(prefix) and n != path]
        if not recursive:
            below = [n for n in below if "/" not in n[len(prefix):]]
        return [self.entry(n) for n in below]


class HubStub:
    def __init__(self):
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._cuts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet; requests are in stub.requests
                pass

            def do_HEAD(self):
                stub._handle(self, "HEAD")

            def do_GET(self):
                stub._handle(self, "GET")

            def do_POST(self):
                stub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------------------------ setup

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, folder, repo_type: str = "model", gated: bool = False) -> str:
        """Serve `folder`'s files as repo `repo_id`; returns its commit sha."""
        repo = _Repo(repo_id, repo_type, Path(folder), gated)
        self.repos[(repo_type, repo_id)] = repo
        return repo.sha

    def cut_once(self, repo_id: str, filename: str, n_bytes: int, repo_type: str = "model", times: int = 1) -> None:
        """The next `times` GETs of that file stop after `n_bytes` of the body."""
        self._cuts[(repo_type, f"{repo_id}/{filename}")] = [n_bytes] * times

    def env(self, hf_home) -> dict:
        """Environment variables that point huggingface_hub, datasets and transformers at this stand-in only."""
        return {"HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "10",
                "HF_HUB_DOWNLOAD_TIMEOUT": "10", "DO_NOT_TRACK": "1", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost"}

    def downloads(self) -> list[tuple[str, str]]:
        """(method, path) of every GET of a file (resolve) so far: what was actually downloaded."""
        return [(m, p) for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]

    # --------------------------------------------------------------------------------------------- serving

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        with self._lock:
            self.requests.append((method, url.path, h.headers.get("Range")))
        body = b""
        if method == "POST":
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        parts = [p for p in url.path.split("/") if p]
        try:
            if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
                return self._api(h, method, parts[1][:-1], parts[2:], parse_qs(url.query), body)
            repo_type = "model"
            if parts[:1] in (["datasets"], ["spaces"]):
                repo_type, parts = parts[0][:-1], parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(h, method, repo_type, "/".join(parts[:2]), unquote(parts[3]),
                                     unquote("/".join(parts[4:])))
            return self._error(h, 404, "RepoNotFound", f"no route for {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, h, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(headers.get("Content-Length", len(body))))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, status: int = 200, extra: dict | None = None) -> None:
        self._send(h, status, {"Content-Type": "application/json", **(extra or {})}, json.dumps(obj).encode())

    def _error(self, h, status: int, code: str, message: str, extra: dict | None = None, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, {"Content-Type": "application/json", "X-Error-Code": code,
                               "X-Error-Message": message, **(extra or {})}, body, head=head)

    def _repo(self, h, repo_type: str, repo_id: str, revision: str | None, head: bool = False):
        """The repo, or None after answering with the error the Hub gives (missing, gated, unknown revision)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(h, 401, "RepoNotFound", f"Repository Not Found for url: {repo_id}.", head=head)
            return None
        if repo.gated:
            auth = h.headers.get("Authorization") or ""
            if not auth:
                self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                            f"to it and be authenticated to access it. Please log in.", head=head)
                return None
            if auth != f"Bearer {GRANTED_TOKEN}":
                self._error(h, 403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                            f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.", head=head)
                return None
        if revision not in (None, "main", repo.sha):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None
        return repo

    def _api(self, h, method: str, repo_type: str, parts: list[str], query: dict, body: bytes) -> None:
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        revision = unquote(rest[1]) if len(rest) >= 2 else None
        repo = self._repo(h, repo_type, repo_id, revision)
        if repo is None:
            return
        if not rest or rest[0] == "revision":  # repo info
            siblings = [{"rfilename": n, "size": len(d)} for n, d in repo.files.items()]
            return self._json(h, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                                  "gated": "manual" if repo.gated else False, "disabled": False,
                                  "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z",
                                  "tags": [], "downloads": 0, "likes": 0})
        if rest[0] == "tree":
            path = unquote("/".join(rest[2:])).strip("/")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            listing = repo.listing(path, recursive)
            if listing is None:
                return self._error(h, 404, "EntryNotFound", f"{path} does not exist on {revision}",
                                   {"X-Repo-Commit": repo.sha})
            return self._json(h, listing)
        if rest[0] == "paths-info" and method == "POST":
            form = parse_qs(body.decode())
            entries = [repo.entry(p.strip("/")) for p in form.get("paths", [])]
            return self._json(h, [e for e in entries if e is not None])
        return self._error(h, 404, "EntryNotFound", f"no API route {'/'.join(rest)}")

    def _resolve(self, h, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        head = method == "HEAD"
        repo = self._repo(h, repo_type, repo_id, revision, head=head)
        if repo is None:
            return
        if filename not in repo.files:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist in {repo_id}",
                               {"X-Repo-Commit": repo.sha}, head=head)
        data = repo.files[filename]
        headers = {"ETag": f'"{repo.etag(filename)}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                return self._send(h, 416, {"Content-Range": f"bytes */{len(data)}"}, head=head)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        if head:
            return self._send(h, status, {**headers, "Content-Length": len(data)}, head=True)
        cuts = self._cuts.get((repo_type, f"{repo_id}/{filename}")) or [None]
        cut = cuts.pop(0)
        if cut is not None and cut < len(data):
            # promise the whole body, send part of it, drop the connection: a download killed half-way
            h.send_response(status)
            for k, v in {**headers, "Content-Length": len(data)}.items():
                h.send_header(k, str(v))
            h.end_headers()
            h.wfile.write(data[:cut])
            h.wfile.flush()
            h.close_connection = True
            with self._lock:
                self.requests.append(("CUT", f"/{repo_id}/{filename}", str(cut)))
            return
        self._send(h, status, headers, data)


# ------------------------------------------------------------------------------------------------ medical sets

def add_medical_sets(hub: HubStub, root, n_test: int = 6, n_train: int = 6) -> dict:
    """Serve the four medical multiple-choice sets under their real Hub ids, in their real file layouts, columns and
    splits (tiny and synthetic: n_test evaluated and n_train training rows each): qiaojin/PubMedQA (config
    pqa_labeled, one split `train` holding test and non-test questions: the first n_test rows carry real test PubMed
    ids), GBaker/MedQA-USMLE-4-options (data/{train,test}), fzkuji/MedQA (MedQA-5: config med_qa_en_source, the
    default, bigbio's options [{key, value}]) and openlifescienceai/medmcqa (data/{train,validation,test}, cop
    0-based, -1 in the unlabelled test split). Returns {repo id: commit sha}."""
    import pandas as pd

    from sftmix.eval.tasks import pubmedqa_test_pmids

    root = Path(root)
    test_ids = sorted(pubmedqa_test_pmids(), key=int)[:n_test]
    other_ids = [str(1000 + i) for i in range(n_train)]
    dec = ["yes", "no", "maybe"]
    pq = [{"pubid": int(pid), "question": f"Does treatment {i} help?",
           "context": {"contexts": [f"Background {i}.", f"Results {i}."], "labels": ["BACKGROUND", "RESULTS"],
                       "meshes": ["Humans"], "reasoning_required_pred": ["yes"], "reasoning_free_pred": ["yes"]},
           "long_answer": f"Long answer {i}.", "final_decision": dec[i % 3]}
          for i, pid in enumerate(test_ids + other_ids)]
    (root / "PubMedQA" / "pqa_labeled").mkdir(parents=True)
    pd.DataFrame(pq).to_parquet(root / "PubMedQA" / "pqa_labeled" / "train-00000-of-00001.parquet")
    (root / "PubMedQA" / "README.md").write_text(
        "---\nconfigs:\n- config_name: pqa_labeled\n  data_files:\n  - split: train\n    path: pqa_labeled/train-*\n"
        "---\n# PubMedQA\n")

    def medqa(n, split, k):
        letters = "ABCDE"[:k]
        return [{"question": f"{split} patient {i} with sign {i}. Which drug?", "answer": f"drug {i}a",
                 "options": {x: f"drug {i}{x.lower()} ({split})" for x in letters}, "meta_info": "step1",
                 "answer_idx": letters[i % k], "metamap_phrases": ["patient"]} for i in range(n)]

    (root / "MedQA4" / "data").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        pd.DataFrame(medqa(n, split, 4)).to_parquet(root / "MedQA4" / "data" / f"{split}-00000-of-00001.parquet")
    (root / "MedQA5" / "med_qa_en_source").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test), ("validation", 2)):
        rows = [{**r, "options": [{"key": k, "value": v} for k, v in r["options"].items()]}
                for r in medqa(n, split, 5)]
        for r in rows:
            del r["metamap_phrases"]
        pd.DataFrame(rows).to_parquet(root / "MedQA5" / "med_qa_en_source" / f"{split}-00000-of-00001.parquet")
    (root / "MedQA5" / "README.md").write_text(
        "---\nconfigs:\n- config_name: med_qa_en_source\n  data_files:\n  - split: train\n"
        "    path: med_qa_en_source/train-*\n  - split: test\n    path: med_qa_en_source/test-*\n"
        "  - split: validation\n    path: med_qa_en_source/validation-*\n  default: true\n---\n# MedQA\n")
    (root / "medmcqa" / "data").mkdir(parents=True)
    for split, n in (("train", n_train), ("validation", n_test), ("test", 2)):
        pd.DataFrame([{"id": f"{split}-{i}", "question": f"Nerve {i} of the {split} split supplies?",
                       "opa": f"a{i}", "opb": f"b{i}", "opc": f"c{i}", "opd": f"d{i}",
                       "cop": -1 if split == "test" else i % 4, "choice_type": "single", "exp": None,
                       "subject_name": "Anatomy", "topic_name": None} for i in range(n)]
                     ).to_parquet(root / "medmcqa" / "data" / f"{split}-00000-of-00001.parquet")
    return {"qiaojin/PubMedQA": hub.add_repo("qiaojin/PubMedQA", root / "PubMedQA", repo_type="dataset"),
            "GBaker/MedQA-USMLE-4-options": hub.add_repo("GBaker/MedQA-USMLE-4-options", root / "MedQA4",
                                                         repo_type="dataset"),
            "fzkuji/MedQA": hub.add_repo("fzkuji/MedQA", root / "MedQA5", repo_type="dataset"),
            "openlifescienceai/medmcqa": hub.add_repo("openlifescienceai/medmcqa", root / "medmcqa",
                                                      repo_type="dataset")}


# ------------------------------------------------------------------------------------------------------ MT-Bench

# Synthetic stand-ins in FastChat's MT-Bench layout and formats (data/mt_bench/question.jsonl,
# data/mt_bench/reference_answer/gpt-4.jsonl, data/judge_prompts.jsonl): the texts are ours, the fields, template
# names and placeholders are FastChat's. 131 (extraction) carries a short `reference` as the real question.jsonl does
# for some non-reference categories: FastChat never shows it to the judge.
MT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a travel note about an island.", "Now in one line."]},
    {"question_id": 101, "category": "reasoning", "turns": ["You pass the second runner. Your place?",
                                                            "And if you pass the last one?"]},
    {"question_id": 111, "category": "math", "turns": ["What is 3 * 7?", "And 21 / 3?"]},
    {"question_id": 131, "category": "extraction", "turns": ["Rate these reviews 1-5.", "Add the years."],
     "reference": ["[5, 1, 3]"]},
    {"question_id": 151, "category": "stem", "turns": ["Explain inflation briefly.", "For a child."]},
]
MT_REFERENCES = {101: ["Second.", "That is impossible."], 111: ["21", "7"]}
MT_TEMPLATES = [
    {"name": "single-v1", "type": "single", "system_prompt": "You are a grader.",
     "prompt_template": "[Instruction]\nRate 1-10 as \"[[rating]]\".\n\n[Question]\n{question}\n\n"
                        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "general", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a grader.",
     "prompt_template": "[Instruction]\nCompare with the reference, rate as \"[[rating]]\".\n\n[Question]\n"
                        "{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference "
                        "Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "math", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single",
     "system_prompt": "Grade the second answer 1-10 as \"[[rating]]\".\n\n",
     "prompt_template": "<|Conversation|>\n\n### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|End|>",
     "description": "general", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single",
     "system_prompt": "Grade the second answer against the reference as \"[[rating]]\".\n\n",
     "prompt_template": "<|Reference|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|End|>\n\n\n"
                        "<|Conversation|>\n\n### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|End|>",
     "description": "math", "category": "math", "output_format": "[[rating]]"},
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "Pick one.", "prompt_template": "{question}",
     "description": "unused here", "category": "general", "output_format": "[[A]]"},
]


def write_mt_bench(root) -> Path:
    """FastChat's MT-Bench data/ layout under root (the Space lmsys/mt-bench, or a local FastChat checkout):
    returns root; the question file is root/data/mt_bench/question.jsonl."""
    root = Path(root)
    (root / "data" / "mt_bench" / "reference_answer").mkdir(parents=True, exist_ok=True)

    def jsonl(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(root / "data" / "mt_bench" / "question.jsonl", MT_QUESTIONS)
    jsonl(root / "data" / "mt_bench" / "reference_answer" / "gpt-4.jsonl",
          [{"question_id": q, "answer_id": f"ref{q}", "model_id": "gpt-4", "choices": [{"index": 0, "turns": t}],
            "tstamp": 0.0} for q, t in MT_REFERENCES.items()])
    jsonl(root / "data" / "judge_prompts.jsonl", MT_TEMPLATES)
    (root / ".gitattributes").write_text("*.jsonl text\n")
    return root


# ---------------------------------------------------------------------------------------------------- AlpacaEval

def write_alpaca_eval(root, n: int = 12) -> Path:
    """tatsu-lab/alpaca_eval's raw files that sftmix and alpaca_eval 0.6.6 fetch, synthetic and small:
    alpaca_eval_gpt4_baseline.json (AlpacaEval 2's instructions with the reference outputs: {dataset, instruction,
    output, generator}) and df_gamed.csv (the annotations of the two length-gamed baselines and each instruction's
    difficulty, which alpaca_eval's length_controlled_v1 regularises toward: model, index, preference, std_delta_len,
    instruction_difficulty, not_gamed_baseline)."""
    import random

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "red", "blue", "green", "small"]
    rows = [{"dataset": "helpful_base", "instruction": f"Say something about the {words[i % 12]} number {i}.",
             "output": f"The {words[i % 12]} {i} " + "is fine. " * (1 + i % 5), "generator": "gpt4_1106_preview"}
            for i in range(n)]
    (root / "alpaca_eval_gpt4_baseline.json").write_text(json.dumps(rows, indent=1))
    rng = random.Random(0)
    lines = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for model, sign in (("gamed_verbose", 1), ("gamed_concise", -1)):
        for i in range(n):
            d = sign * rng.uniform(0.2, 2.0)
            lines.append(f"{model},{i},{1 + (rng.random() < 0.5 + 0.2 * sign):.1f},{d:.4f},"
                         f"{(i % 5 - 2) / 2:.2f},False")
    (root / "df_gamed.csv").write_text("\n".join(lines) + "\n")
    (root / "README.md").write_text("# alpaca_eval (stand-in)\n")
    return root
