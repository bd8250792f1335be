"""Evaluation: held-out response likelihood, k-shot multiple choice by log-likelihood, judged instruction following.

    from sftmix.evaluate import EvalConfig, run_eval
    cfg = EvalConfig(pubmedqa_file="../shared/data/pubmedqa_pqal_dev500.json", heldout_file="run/data/heldout.jsonl")
    results = run_eval(model, tokenizer, cfg, "run/eval")   # {"pubmedqa": {...}, "heldout": {...}}; files in run/eval

    python -m sftmix.evaluate --model smollm2 --pubmedqa_file ../shared/data/pubmedqa_pqal_dev500.json \
        --output_dir runs/eval_smollm2

Held-out likelihood (`heldout_nll`): any SFT-format file is tokenized as for training (sftmix.data) and scored by
sftmix.dynamics.score_examples; reported are the token-weighted mean response NLL, its perplexity, and the mean of the
per-example NLL / PPL (the per-example PPL is the quantity the paper's confidence uses).

Multiple choice (`eval_multiple_choice`): MedQA (4 options, `medqa_file`), MedQA-5 (`medqa5_file`), PubMedQA
(`pubmedqa_file`) and MedMCQA (`medmcqa_file`), in lm-evaluation-harness's prompt formats:
    "Question: ...\\nA. ...\\nB. ...\\nAnswer:" scored continuations " A", " B", ...           (MedQA, MedMCQA)
    "Abstract: <contexts joined by newlines>\\nQuestion: ...\\nAnswer:" continuations " yes", " no", " maybe"
k solved shots (default 3) precede the question, separated by blank lines. With `mc_chat_template` the shots become
user/assistant turns of the model's chat template instead (and the continuation drops its leading space); the plain
few-shot text is the default because it is what lm-eval does for base and instruct models alike and because it keeps
the comparison of NTP and SFTMix checkpoints independent of the chat template.
Score of an option = sum of log p(option tokens | prompt) (lm-eval's `acc`, the default `mc_score=sum`); also recorded
is the per-character mean (`acc_norm`, `mc_score=norm`). The options here are single letters or yes/no/maybe, so
length normalisation has nothing to correct and would only favour the longer word ("maybe"); hence the sum.
Tokens: prompt ids = tokenizer(prompt) (with the tokenizer's special tokens, e.g. BOS; none for chat-rendered
prompts), option ids = tokenizer(option, add_special_tokens=False), concatenated.
Shots: the same k shots for every question (fixed exemplars, as in Med-PaLM), taken from the shot pool in sha256(id)
order, label-balanced (one per distinct answer first, see `pick_shots`). The pool is `<task>_shots_file` (e.g. the
dev split) minus any question that also appears (same id or same text) in the evaluated file; without a shots file
the evaluated file is split by the same hash: its first k items become the shots and are removed from the evaluated
set. Disjointness is asserted.
Length: prompt + longest option is capped at `max_length` tokens by dropping prompt tokens from the LEFT (the start
of the first shot goes first); such questions are counted in `n_truncated`.
Speed: each prompt is run once and all options are scored from its key/value cache (single-token options need no
further forward pass). Because the shots are shared, the common token prefix of all prompts is computed once and its
cache reused for every batch (`mc_share_prefix`); this makes 3-shot PubMedQA about 4x cheaper.
Accuracy comes with a 95% Wilson interval; predictions go to <task>_predictions.jsonl.
MedMCQA's `cop` is 1-4 in the official release and 0-3 in the Hugging Face copy: `medmcqa_cop_base=auto` tells them
apart from the values present in the file (a 0 means 0-based, a 4 means 1-based; neither is an error).

Instruction following: answers are generated (batched, left padded, greedy unless `do_sample`, the model's chat
template) and judged by an LLM through an OpenAI-compatible endpoint (sftmix.judge): MT-Bench-style 1-10 grading of
both turns (`mtbench_file`: FastChat's question.jsonl, {question_id, category, turns, reference?}) and AlpacaEval-style
pairwise win rate against reference outputs (`alpacaeval_file`: JSON/JSONL of {instruction, output}).

Outputs in output_dir: <task>.json (metrics, with the settings that produced them; an existing one with the same
settings is reused, `overwrite` forces a rerun), <task>_predictions.jsonl / mtbench_answers.jsonl /
mtbench_judgments.jsonl / alpacaeval_outputs.jsonl / alpacaeval_judgments.jsonl / heldout_examples.jsonl,
judge_cache.jsonl, and results.json with all metrics.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftmix.config import MC_TASKS, EvalConfig, eval_task_fields  # noqa: F401  (EvalConfig: re-exported here)
from sftmix.scoring import pad_token_id
from sftmix.utils import SFTMixError, atomic_write_json, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth a cache copy per batch


# ------------------------------------------------------------------------------------------------------ held-out

def heldout_nll(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int | None = None,
                source: str = "<held-out>", return_rows: bool = False, distributed: bool = False) -> dict:
    """Response NLL of `records` (sftmix.data records): token-weighted mean NLL and its perplexity, plus the mean of
    the per-example mean NLL and PPL. Examples whose prompt fills max_length are dropped and counted (n_dropped).
    distributed=True, under several processes (a torch.distributed process group; every process must call it): each
    scores its share and every process gets the rows and metrics of one process (sftmix.scoring.run_scoring)."""
    from sftmix.data import tokenize_records
    from sftmix.scoring import score_examples

    ds, stats = tokenize_records(records, tokenizer, max_length=max_length, source=source)
    rows = score_examples(model, ds, batch_size=batch_size, desc=f"scoring {source}", distributed=distributed)
    n_tok = sum(r["n_tokens"] for r in rows)
    nll = sum(r["nll_mean"] * r["n_tokens"] for r in rows) / n_tok
    out = {
        "n_examples": len(rows), "n_dropped": stats["n_dropped_truncated"], "n_truncated": stats["n_truncated"],
        "n_tokens": n_tok, "nll": nll, "ppl": math.exp(nll),
        "nll_example_mean": sum(r["nll_mean"] for r in rows) / len(rows),
        "ppl_example_mean": sum(r["ppl"] for r in rows) / len(rows),
        "max_length": max_length,
    }
    return (out, rows) if return_rows else out


# ---------------------------------------------------------------------------------------------- multiple choice

@dataclass
class MCItem:
    id: str
    text: str  # the question block, ending with "Answer:"
    choices: list[str]  # what is scored after the prompt, without the leading space
    answer: int  # index into choices

    @property
    def content_key(self) -> str:
        """Hash of the question text: the same question under another id is still the same question."""
        return hashlib.sha256(" ".join(self.text.split()).lower().encode("utf-8")).hexdigest()


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# Evaluation sets by Hugging Face Hub id, `ID[:CONFIG[:SPLIT]]` in place of a file (a local file of that name wins):
# the default config and split of each task's usual Hub copy (PubMedQA's labelled set is its only split, `train`;
# MedQA's test split; MedMCQA's validation split, since its test split has no answers).
HUB_DEFAULTS = {"pubmedqa": ("pqa_labeled", "train"), "medqa": (None, "test"), "medqa5": (None, "test"),
                "medmcqa": (None, "validation")}
HUB_EVAL_SOURCES: dict[str, dict] = {}  # spec -> {id, config, split, sha} of every Hub set read, for the metrics


def _hub_spec(path: str) -> tuple[str, str | None, str | None] | None:
    """(id, config, split) when `path` names a Hub dataset (`ID[:CONFIG[:SPLIT]]`) rather than a local file."""
    from sftmix.hub import is_hub_id

    repo_id, *rest = str(path).split(":")
    if Path(path).exists() or len(rest) > 2 or not is_hub_id(repo_id, "dataset"):
        return None
    return repo_id, (rest[0] or None) if rest else None, (rest[1] or None) if len(rest) > 1 else None


def _read_hub_rows(path: str, task: str | None) -> list[dict]:
    from sftmix.hub import load_hub_dataset

    repo_id, config, split = _hub_spec(path)
    default_config, default_split = HUB_DEFAULTS.get(task, (None, "train"))
    ds, source = load_hub_dataset(repo_id, config or default_config, split or default_split)
    HUB_EVAL_SOURCES[str(path)] = source
    log.info("%s: %d rows of %s (config %s, split %s) at %s", task, len(ds), repo_id, source["config"],
             source["split"], source["sha"][:12])
    return [dict(r) for r in ds]


def _rec(path: str, i: int) -> str:
    """How the i-th row (0-based) of an evaluation set is named in errors: a file's line, a Hub split's row index."""
    return f"row {i}" if _hub_spec(path) else f"line {i + 1}"


def _read_rows(path: str, task: str | None = None) -> list[dict]:
    """A JSON array; a JSON object of objects (PubMedQA: keyed by PMID; the key goes to `_key`); or JSON Lines; or a
    Hub dataset `ID[:CONFIG[:SPLIT]]` (defaults per task: HUB_DEFAULTS)."""
    p = Path(path)
    if not p.is_file() and _hub_spec(path):
        return _read_hub_rows(path, task)
    if not p.is_file():
        raise SFTMixError(f"{path}: file not found; check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return read_jsonl(p)  # JSON Lines (or broken JSON: read_jsonl names the bad line)
    if isinstance(data, dict):
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"_key": k, **v} for k, v in data.items()]
        data = [data]  # a one-line JSONL file
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SFTMixError(f"{path}: expected a JSON array of objects, an object of objects, or JSON Lines")
    return data


def _need(row: dict, key: str, path: str, rec: str, types=(str,)):
    v = row.get(key)
    if not isinstance(v, types) or (isinstance(v, str) and not v.strip()):
        raise SFTMixError(f"{path}: record {rec}: field {key!r} is missing or empty (got {str(v)[:60]!r}); fix or "
                          f"remove that record")
    return v


def _lettered(question: str, options: list[str]) -> str:
    lines = [f"Question: {question.strip()}"] + [f"{chr(65 + i)}. {o.strip()}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def load_pubmedqa(path: str) -> list[MCItem]:
    """PubMedQA labelled JSON (ori_pqal.json style): {PMID: {QUESTION, CONTEXTS: [...], final_decision}}; or the Hub
    copy (qiaojin/PubMedQA, pqa_labeled: rows of pubid, question, context {contexts, labels, meshes}, long_answer,
    final_decision)."""
    rows = _read_rows(path, "pubmedqa")
    items = []
    for i, row in enumerate(rows):
        if "QUESTION" not in row and "question" in row and isinstance(row.get("context"), dict):  # the Hub layout
            row = {**row, "QUESTION": row["question"], "CONTEXTS": row["context"].get("contexts")}
        rec = str(row.get("_key", row.get("pubid", i)))
        q = _need(row, "QUESTION", path, rec)
        ctx = _need(row, "CONTEXTS", path, rec, (list,))
        dec = _need(row, "final_decision", path, rec).strip().lower()
        if dec not in ("yes", "no", "maybe"):
            raise SFTMixError(f"{path}: record {rec}: final_decision is {dec!r}, expected yes/no/maybe; fix it")
        text = "Abstract: " + "\n".join(str(c).strip() for c in ctx) + f"\nQuestion: {q.strip()}\nAnswer:"
        items.append(MCItem(rec, text, ["yes", "no", "maybe"], ["yes", "no", "maybe"].index(dec)))
    return items


def load_medqa(path: str, n_options: int = 4) -> list[MCItem]:
    """MedQA JSONL: {question, options: {"A": ..., ...}, answer_idx: "A"} (4-option or 5-option release); the same
    on the Hub (GBaker/MedQA-USMLE-4-options), or bigbio med_qa's source layout (options: [{key, value}])."""
    items = []
    for i, row in enumerate(_read_rows(path, "medqa5" if n_options == 5 else "medqa")):
        rec = _rec(path, i)
        q = _need(row, "question", path, rec)
        if isinstance(row.get("options"), list) and all(isinstance(o, dict) and "key" in o for o in row["options"]):
            row = {**row, "options": {str(o["key"]): o.get("value") for o in row["options"]}}  # bigbio layout
        opts = _need(row, "options", path, rec, (dict,))
        letters = sorted(opts)
        if letters != [chr(65 + j) for j in range(len(letters))] or len(letters) != n_options:
            hint = "medqa5_file" if len(letters) == 5 else "medqa_file" if len(letters) == 4 else "a MedQA file"
            raise SFTMixError(f"{path}: {rec}: options are {letters}, expected A-{chr(64 + n_options)} "
                              f"({n_options} options); pass this file as {hint}")
        ans = _need(row, "answer_idx", path, rec).strip()
        if ans not in letters:
            raise SFTMixError(f"{path}: {rec}: answer_idx {ans!r} is not one of {letters}; fix that record")
        options = [str(opts[k]) for k in letters]
        rid = str(row.get("id") or _hash(q + "\x1f" + "\x1f".join(options))[:16])
        items.append(MCItem(rid, _lettered(q, options), letters, letters.index(ans)))
    return items


def load_medmcqa(path: str, cop_base: str = "auto") -> list[MCItem]:
    """MedMCQA JSONL: {id, question, opa, opb, opc, opd, cop}; cop 1-4 (official) or 0-3 (HF), see module doc. The
    Hub copy (openlifescienceai/medmcqa) has the same columns, cop 0-based."""
    rows = _read_rows(path, "medmcqa")
    cops = []
    for i, row in enumerate(rows):
        c = row.get("cop")
        if isinstance(c, str) and c.strip().lstrip("-").isdigit():
            c = int(c)
        if not isinstance(c, int) or not -1 <= c <= 4 or c == -1:
            raise SFTMixError(f"{path}: {_rec(path, i)}: cop is {row.get('cop')!r}, expected the correct option as 0-3 "
                              f"or 1-4 (the unlabelled test split cannot be evaluated); fix or remove that record")
        cops.append(c)
    if cop_base == "auto":
        has0, has4 = 0 in cops, 4 in cops
        if has0 and has4:
            raise SFTMixError(f"{path}: cop takes both 0 and 4: neither 0-3 nor 1-4; fix the file")
        if not has0 and not has4:
            raise SFTMixError(f"{path}: cop never is 0 or 4, so it is unclear whether it is 0-based or 1-based; set "
                              f"medmcqa_cop_base to 0 (Hugging Face copy) or 1 (official release)")
        base = 0 if has0 else 1
    else:
        base = int(cop_base)
    items = []
    for i, (row, c) in enumerate(zip(rows, cops)):
        rec = _rec(path, i)
        q = _need(row, "question", path, rec)
        options = [_need(row, k, path, rec) for k in ("opa", "opb", "opc", "opd")]
        ans = c - base
        if not 0 <= ans <= 3:
            raise SFTMixError(f"{path}: {rec}: cop {c} is out of range for {base}-based options; fix that record")
        rid = str(row.get("id") or _hash(q + "\x1f" + "\x1f".join(options))[:16])
        items.append(MCItem(rid, _lettered(q, options), ["A", "B", "C", "D"], ans))
    return items


def load_mc(task: str, path: str, cfg: EvalConfig | None = None) -> list[MCItem]:
    cfg = cfg or EvalConfig()
    if task == "pubmedqa":
        items = load_pubmedqa(path)
    elif task in ("medqa", "medqa5"):
        items = load_medqa(path, 5 if task == "medqa5" else 4)
    elif task == "medmcqa":
        items = load_medmcqa(path, cfg.medmcqa_cop_base)
    else:
        raise SFTMixError(f"unknown multiple-choice task {task!r}; choose one of {', '.join(MC_TASKS)}")
    if not items:
        raise SFTMixError(f"{path}: no questions in the file")
    ids = Counter(it.id for it in items)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise SFTMixError(f"{path}: {len(dup)} ids occur more than once (e.g. {dup[0]!r}); ids must be unique")
    return items


def pick_shots(pool: list[MCItem], k: int) -> list[MCItem]:
    """k shots from `pool`, label-balanced: in sha256(id) order, first one shot per distinct answer (so 3-shot
    PubMedQA shows one yes, one no and one maybe, and MedQA three different letters, which keeps the shots from
    teaching a majority label), then, if k is larger, the next ones in the same order. Returned in hash order."""
    ranked = sorted(pool, key=lambda it: _hash(it.id))
    chosen, used = [], set()
    for it in ranked:
        label = it.choices[it.answer]
        if len(chosen) < k and label not in used:
            chosen.append(it)
            used.add(label)
    chosen += [it for it in ranked if it not in chosen][: k - len(chosen)]
    return sorted(chosen, key=lambda it: _hash(it.id))


def split_shots(eval_items: list[MCItem], pool: list[MCItem] | None, k: int) -> tuple[list[MCItem], list[MCItem], dict]:
    """(shots, evaluated items, info). Shots are picked from the pool by `pick_shots`; without a pool they come
    from the evaluated items themselves, which then lose them. Shots never share an id or a question text with
    an evaluated item."""
    info = {"shots_from": "shots_file" if pool is not None else "hash split of the evaluated file", "n_pool_overlap": 0}
    if k == 0:
        shots, evaluated = [], list(eval_items)
    elif pool is None:
        if k >= len(eval_items):
            raise SFTMixError(f"num_shots={k} would take all {len(eval_items)} questions as shots; lower it or give a "
                              f"shots file")
        shots = pick_shots(eval_items, k)
        chosen = {it.id for it in shots}
        evaluated = [it for it in eval_items if it.id not in chosen]
    else:
        ids, texts = {it.id for it in eval_items}, {it.content_key for it in eval_items}
        clean = [it for it in pool if it.id not in ids and it.content_key not in texts]
        info["n_pool_overlap"] = len(pool) - len(clean)
        if info["n_pool_overlap"]:
            log.warning("%d shot-pool questions also occur in the evaluated file; they are not used as shots",
                        info["n_pool_overlap"])
        if len(clean) < k:
            raise SFTMixError(f"the shots file has {len(clean)} usable questions, fewer than num_shots={k}")
        shots, evaluated = pick_shots(clean, k), list(eval_items)
    # the guarantee the whole evaluation rests on, checked rather than assumed
    ev_ids, ev_texts = {it.id for it in evaluated}, {it.content_key for it in evaluated}
    assert not any(s.id in ev_ids or s.content_key in ev_texts for s in shots), "a shot is in the evaluated split"
    info["shot_ids"] = [s.id for s in shots]
    info["shot_answers"] = [s.choices[s.answer] for s in shots]
    return shots, evaluated, info


def build_prompt(item: MCItem, shots: list[MCItem], tokenizer=None, chat: bool = False) -> tuple[str, list[str]]:
    """(prompt, continuations). Plain: shots as "text answer" blocks joined by blank lines, continuation " X";
    chat: shots as user/assistant turns rendered by the tokenizer's template, continuation "X"."""
    if not chat:
        prefix = "".join(f"{s.text} {s.choices[s.answer]}\n\n" for s in shots)
        return prefix + item.text, [" " + c for c in item.choices]
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s.text}, {"role": "assistant", "content": s.choices[s.answer]}]
    msgs.append({"role": "user", "content": item.text})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), list(item.choices)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_kw(model) -> str:
    """transformers renamed `past_key_values` to `cache` (deprecated in 5.2x); pass whichever this model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _out_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _full_attention_cache(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@torch.no_grad()
def score_choice_ids(model, prompt_ids: list[list[int]], choice_ids: list[list[list[int]]], batch_size: int = 8,
                     max_length: int | None = None, share_prefix: bool = True, pad_id: int = 0,
                     show_progress: bool = True, distributed: bool = False) -> dict:
    """Summed log p(choice tokens | prompt tokens) for each prompt and each of its choices.

    Returns {"logprobs": [[float]], "n_tokens": [[int]], "truncated": [bool], "stats": {...}}. Each prompt is run once
    (left padded, batched longest first); the first token of every choice is read off the prompt's last logits, the
    rest of multi-token choices are run on a copy of the prompt's key/value cache. With `share_prefix` the common
    prefix of all untruncated prompts is run once and its cache copied into every batch. distributed=True, under
    several processes (a torch.distributed process group; every process must call it): each runs a token-balanced
    share of the batches, with
    dummy forwards so that all run the same number of forwards (FSDP / ZeRO-3), and the scores are gathered:
    every process returns what one process would; stats["per_process"] has each share."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache
    from trl.data_utils import common_prefix_length

    from sftmix.scoring import share_batches, world_and_rank

    device = _device(model)
    ckw = _cache_kw(model)
    n = len(prompt_ids)
    prompts, truncated = [], []
    for i, (p, cs) in enumerate(zip(prompt_ids, choice_ids, strict=True)):
        if not cs or any(len(c) == 0 for c in cs):
            raise SFTMixError(f"question {i}: a choice tokenizes to no tokens; every option needs text")
        longest = max(len(c) for c in cs)
        if max_length is not None and len(p) + longest > max_length:
            keep = max_length - longest
            if keep < 1:
                raise SFTMixError(f"max_length={max_length} leaves no room for the prompt of question {i}; raise it")
            p = p[-keep:]  # drop from the left: the oldest shot text goes first
        truncated.append(len(p) < len(prompt_ids[i]))
        prompts.append(list(p))
    full = [i for i in range(n) if not truncated[i]]
    P = 0
    if share_prefix and len(full) > 1:
        P = min(min(common_prefix_length(prompts[full[0]], prompts[i]) for i in full),
                min(len(prompts[i]) for i in full) - 1)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    computed = 0
    prefix_cache = None
    prefix_computed = 0
    try:
        if P >= MIN_SHARED_PREFIX:
            ids = torch.tensor([prompts[full[0]][:P]], device=device)
            prefix_cache = _out_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
            computed += P  # every process runs the shared prefix (counted once below)
            prefix_computed = P
            if not _full_attention_cache(prefix_cache):  # sliding-window layers would crop the shared prefix
                prefix_cache, P = None, 0
        else:
            P = 0
        uses = [P > 0 and not truncated[i] for i in range(n)]
        start = [P if uses[i] else 0 for i in range(n)]
        order = sorted(range(n), key=lambda i: (not uses[i], -(len(prompts[i]) - start[i]), i))
        batches, cur = [], []
        for i in order:  # a batch never mixes prefix users and non-users
            if cur and (len(cur) == batch_size or uses[cur[0]] != uses[i]):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        # Several processes: each runs its share of the batches (balanced by padded tokens, sftmix.dynamics.
        # share_batches) and the scores are gathered. A batch takes 1 forward, 2 with a multi-token choice; ranks
        # with fewer forwards run one-token dummy forwards until all have run the same number, so that the
        # collectives of a sharded model (FSDP, ZeRO-3) line up.
        world, rank = world_and_rank() if distributed else (1, 0)
        multi_of = [any(len(c) > 1 for i in b for c in choice_ids[i]) for b in batches]
        costs = []
        for k, b in enumerate(batches):
            longest = max(len(prompts[i]) - start[i] for i in b)
            costs.append(len(b) * (longest + (max(len(c) for i in b for c in choice_ids[i]) if multi_of[k] else 0)))
        shares = share_batches(costs, world)
        forwards = [sum(1 + multi_of[k] for k in share) for share in shares]
        logprobs = [[0.0] * len(choice_ids[i]) for i in range(n)]
        for batch in tqdm([batches[k] for k in shares[rank]], desc="scoring choices", disable=not show_progress,
                          leave=False):
            p0 = start[batch[0]]
            suf = [prompts[i][p0:] for i in batch]
            B, T = len(batch), max(len(s) for s in suf)
            ids = torch.full((B, T), pad_id, dtype=torch.long)
            mask = torch.zeros((B, T), dtype=torch.long)
            for r, s in enumerate(suf):
                ids[r, T - len(s):] = torch.tensor(s)
                mask[r, T - len(s):] = 1
            # positions count real tokens only, continuing after the shared prefix
            pos = p0 + (mask.cumsum(-1) - 1).clamp(min=0)
            if p0:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_select_indices(torch.zeros(B, dtype=torch.long, device=device))
                attn = torch.cat([torch.ones((B, p0), dtype=torch.long), mask], 1)
            else:
                cache, attn = DynamicCache(config=model.config), mask
            ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{ckw: cache})
            computed += B * T
            last = out.logits[:, -1].float().log_softmax(-1).cpu()
            multi = []
            for r, i in enumerate(batch):
                for j, c in enumerate(choice_ids[i]):
                    logprobs[i][j] = float(last[r, c[0]])
                    if len(c) > 1:
                        multi.append((r, i, j))
            if not multi:
                continue
            # the rest of each multi-token choice, one row per (question, choice) on a copy of its prompt's cache
            rows = torch.tensor([r for r, _, _ in multi], device=device)
            cache = _out_cache(out)
            cache.batch_select_indices(rows)
            conts = [choice_ids[i][j] for _, i, j in multi]
            M = max(len(c) for c in conts) - 1
            cids = torch.full((len(multi), M), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(multi), M), dtype=torch.long)
            tgt = torch.full((len(multi), M), -100, dtype=torch.long)
            for r, c in enumerate(conts):
                cids[r, : len(c) - 1] = torch.tensor(c[:-1])
                cmask[r, : len(c) - 1] = 1
                tgt[r, : len(c) - 1] = torch.tensor(c[1:])
            qlen = mask.sum(-1).to(device)[rows]
            pos2 = p0 + qlen[:, None] + torch.arange(M, device=device)[None]
            attn2 = torch.cat([attn[rows], cmask.to(device)], 1)
            out2 = model(input_ids=cids.to(device), attention_mask=attn2, position_ids=pos2, use_cache=True,
                         **{ckw: cache})
            computed += len(multi) * M
            lp = out2.logits.float().log_softmax(-1).cpu()
            got = lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
            for r, (_, i, j) in enumerate(multi):
                logprobs[i][j] += float(got[r].sum())
        for _ in range(max(forwards) - forwards[rank]):
            model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False,
                  logits_to_keep=1)
    finally:
        model.train(was_training)
    mine = [i for k in shares[rank] for i in batches[k]]
    local = {"rank": rank, "batches": len(shares[rank]), "forwards": forwards[rank],
             "dummy_forwards": max(forwards) - forwards[rank], "questions": len(mine),
             "prompt_tokens": sum(len(prompts[i]) for i in mine), "computed_tokens": computed,
             "seconds": time.perf_counter() - t0}
    per_process = [local]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, {"idx": mine, "logprobs": [logprobs[i] for i in mine],
                                                    "stats": local})
        for part in parts:
            for i, lp in zip(part["idx"], part["logprobs"]):
                logprobs[i] = lp
        per_process = [part["stats"] for part in parts]
        computed = sum(p["computed_tokens"] for p in per_process) - (world - 1) * prefix_computed
    seconds = time.perf_counter() - t0
    stats = {"n_questions": n, "n_truncated": sum(truncated), "shared_prefix_tokens": P,
             "prompt_tokens": sum(len(p) for p in prompts), "computed_tokens": computed, "seconds": seconds,
             "computed_tokens_per_s": computed / max(seconds, 1e-9), "device": str(device),
             "num_processes": world, "per_process": per_process}
    return {"logprobs": logprobs, "n_tokens": [[len(c) for c in cs] for cs in choice_ids], "truncated": truncated,
            "stats": stats}


def score_choices(model, tokenizer, prompts: list[str], choices: list[list[str]], chat: bool = False,
                  **kwargs) -> dict:
    """score_choice_ids on text: prompt ids = tokenizer(prompt) (special tokens only when not chat-rendered: the
    template already holds them), choice ids = tokenizer(choice, add_special_tokens=False)."""
    p_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    flat = [c for cs in choices for c in cs]
    f_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    c_ids, k = [], 0
    for cs in choices:
        c_ids.append(f_ids[k: k + len(cs)])
        k += len(cs)
    kwargs.setdefault("pad_id", pad_token_id(tokenizer=tokenizer))
    return score_choice_ids(model, p_ids, c_ids, **kwargs)


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (better than the normal one near 0, 1 and for small n);
    (nan, nan) for no trial."""
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def eval_multiple_choice(model, tokenizer, task: str, eval_file: str, shots_file: str | None = None,
                         cfg: EvalConfig | None = None, output_dir: str | None = None,
                         distributed: bool = False) -> dict:
    """k-shot multiple-choice accuracy on `eval_file`; writes <task>_predictions.jsonl into output_dir if given.
    distributed=True: every process of the process group calls it and scores a share (see score_choice_ids); the
    main process writes the predictions."""
    from sftmix.scoring import world_and_rank

    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    items = load_mc(task, eval_file, cfg)
    pool = load_mc(task, shots_file, cfg) if shots_file else None
    shots, items, info = split_shots(items, pool, cfg.num_shots)
    if cfg.mc_limit is not None:
        items = items[: cfg.mc_limit]
    if cfg.mc_chat_template:
        from sftmix.data import ensure_chat_template

        ensure_chat_template(tokenizer, cfg.chat_template)
    built = [build_prompt(it, shots, tokenizer, cfg.mc_chat_template) for it in items]
    res = score_choices(model, tokenizer, [p for p, _ in built], [c for _, c in built], chat=cfg.mc_chat_template,
                        batch_size=cfg.batch_size, max_length=cfg.max_length, share_prefix=cfg.mc_share_prefix,
                        distributed=distributed)
    preds = []
    for it, (_, conts), lps, truncated in zip(items, built, res["logprobs"], res["truncated"]):
        norm = [lp / max(len(c), 1) for lp, c in zip(lps, conts)]
        pred = max(range(len(lps)), key=lambda j: lps[j])
        pred_norm = max(range(len(norm)), key=lambda j: norm[j])
        preds.append({"id": it.id, "answer": it.choices[it.answer], "pred": it.choices[pred],
                      "pred_norm": it.choices[pred_norm], "correct": pred == it.answer,
                      "correct_norm": pred_norm == it.answer, "logprobs": lps, "logprobs_norm": norm,
                      "truncated": truncated})
    n = len(preds)
    k, k_norm = sum(p["correct"] for p in preds), sum(p["correct_norm"] for p in preds)
    key = "correct" if cfg.mc_score == "sum" else "correct_norm"
    k_main = sum(p[key] for p in preds)
    metrics = {
        "task": task, "file": str(eval_file), "source": HUB_EVAL_SOURCES.get(str(eval_file)),  # a Hub set's commit
        "n": n, "accuracy": k_main / n, "ci95": wilson_interval(k_main, n),
        "score": cfg.mc_score, "acc": k / n, "acc_ci95": wilson_interval(k, n), "acc_norm": k_norm / n,
        "acc_norm_ci95": wilson_interval(k_norm, n), "num_shots": cfg.num_shots, **info,
        "prompt_format": "chat" if cfg.mc_chat_template else "plain", "max_length": cfg.max_length,
        "n_truncated": res["stats"]["n_truncated"], "chance": sum(1 / len(it.choices) for it in items) / n,
        "answer_counts": dict(Counter(p["answer"] for p in preds)),
        "prediction_counts": dict(Counter(p["pred" if cfg.mc_score == "sum" else "pred_norm"] for p in preds)),
        "scoring": res["stats"], "seconds": time.perf_counter() - t0,
    }
    if output_dir is not None and (not distributed or world_and_rank()[1] == 0):  # every process has them; one writes
        write_jsonl(Path(output_dir) / f"{task}_predictions.jsonl", preds)
    lo, hi = metrics["ci95"]
    log.info("%s: accuracy %.3f [%.3f, %.3f] on %d questions (%d-shot, %d truncated) in %.0fs", task,
             metrics["accuracy"], lo, hi, n, cfg.num_shots, metrics["n_truncated"], metrics["seconds"])
    return metrics


# ---------------------------------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 1024, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
             show_progress: bool = True) -> list[dict]:
    """Answer each conversation (ending with a user turn) with the chat template's generation prompt.

    Batched longest first, left padded; greedy unless do_sample. Returns per conversation {"text", "n_tokens",
    "finished"} where finished=False means max_new_tokens cut the answer."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = _device(model)
    pad = pad_token_id(tokenizer=tokenizer)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    g_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(g_eos) if isinstance(g_eos, (list, tuple)) else {g_eos} if g_eos is not None else set()
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                               eos_token_id=sorted(eos) or None,
                               **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    out: list[dict | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    if do_sample:
        torch.manual_seed(seed)
    try:
        for b in tqdm(range(0, len(order), batch_size), desc="generating", disable=not show_progress, leave=False):
            batch = order[b: b + batch_size]
            T = max(len(ids[i]) for i in batch)
            x = torch.full((len(batch), T), pad, dtype=torch.long)
            m = torch.zeros_like(x)
            for r, i in enumerate(batch):
                x[r, T - len(ids[i]):] = torch.tensor(ids[i])
                m[r, T - len(ids[i]):] = 1
            y = model.generate(input_ids=x.to(device), attention_mask=m.to(device), generation_config=gen_cfg)
            for r, i in enumerate(batch):
                new = y[r, T:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                toks = new if stop is None else new[:stop]
                out[i] = {"text": tokenizer.decode(toks, skip_special_tokens=True).strip(), "n_tokens": len(toks),
                          "finished": stop is not None}
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ instruction following

def make_judge(cfg: EvalConfig, output_dir: str | os.PathLike):
    from sftmix.judge import JudgeClient

    if not cfg.judge_model:
        raise SFTMixError("MT-Bench / AlpacaEval need a judge: set judge_model (and judge_base_url, e.g. "
                          "http://127.0.0.1:8000/v1 for a local vLLM or llama.cpp server)")
    return JudgeClient(cfg.judge_base_url, cfg.judge_model, api_key=cfg.judge_api_key,
                       api_key_env=cfg.judge_api_key_env, timeout=cfg.judge_timeout,
                       max_retries=cfg.judge_max_retries, backoff=cfg.judge_backoff,
                       cache_path=cfg.judge_cache_file or Path(output_dir) / "judge_cache.jsonl",
                       max_tokens=cfg.judge_max_tokens)


def _gen_kwargs(cfg: EvalConfig) -> dict:
    return {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.gen_batch_size, "do_sample": cfg.do_sample,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}


def _gen_summary(gens: list[dict]) -> dict:
    return {"n_answers": len(gens), "n_unfinished": sum(not g["finished"] for g in gens),
            "mean_answer_tokens": sum(g["n_tokens"] for g in gens) / max(len(gens), 1)}


def load_mt_bench(path: str) -> list[dict]:
    qs = _read_rows(path)
    for i, q in enumerate(qs):
        turns = q.get("turns")
        if "question_id" not in q or not isinstance(turns, list) or not 1 <= len(turns) <= 2 \
                or not all(isinstance(t, str) and t.strip() for t in turns):
            raise SFTMixError(f"{path}: line {i + 1}: expected {{question_id, turns: [1 or 2 non-empty strings]}}; "
                              f"fix that record")
    return qs


def eval_mt_bench(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Generate both turns (the second sees the model's own first answer), then grade each turn 1-10."""
    from sftmix.judge import judge_mt_bench, mt_bench_summary

    qs = load_mt_bench(path)
    first = generate(model, tokenizer, [[{"role": "user", "content": q["turns"][0]}] for q in qs], **_gen_kwargs(cfg))
    two = [i for i, q in enumerate(qs) if len(q["turns"]) == 2]
    second = generate(model, tokenizer, [[{"role": "user", "content": qs[i]["turns"][0]},
                                          {"role": "assistant", "content": first[i]["text"]},
                                          {"role": "user", "content": qs[i]["turns"][1]}] for i in two],
                      **_gen_kwargs(cfg))
    answers = [[g["text"]] for g in first]
    for i, g in zip(two, second):
        answers[i].append(g["text"])
    write_jsonl(Path(output_dir) / "mtbench_answers.jsonl",
                [{"question_id": q["question_id"], "category": q.get("category"), "turns": q["turns"], "answers": a}
                 for q, a in zip(qs, answers)])
    rows = judge_mt_bench(judge, qs, answers, cfg.judge_prompt_dir, cfg.judge_concurrency)
    write_jsonl(Path(output_dir) / "mtbench_judgments.jsonl", rows)
    return {"file": str(path), "n_questions": len(qs), "judge_model": judge.model, **mt_bench_summary(rows),
            "generation": _gen_summary(first + second)}


def eval_alpaca_eval(model, tokenizer, path: str, judge, cfg: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Generate an answer per instruction and compare it pairwise with the file's reference `output`."""
    from sftmix.judge import judge_pairwise, win_rate

    rows = _read_rows(path)
    for i, r in enumerate(rows):
        for k in ("instruction", "output"):
            _need(r, k, path, f"{i + 1}")
    gens = generate(model, tokenizer, [[{"role": "user", "content": r["instruction"]}] for r in rows],
                    **_gen_kwargs(cfg))
    outs = [g["text"] for g in gens]
    write_jsonl(Path(output_dir) / "alpacaeval_outputs.jsonl",
                [{"instruction": r["instruction"], "output": o, "generator": "model"} for r, o in zip(rows, outs)])
    judged = judge_pairwise(judge, [r["instruction"] for r in rows], outs, [r["output"] for r in rows],
                            cfg.judge_prompt_dir, cfg.judge_concurrency)
    write_jsonl(Path(output_dir) / "alpacaeval_judgments.jsonl", judged)
    return {"file": str(path), "judge_model": judge.model, **win_rate(judged), "generation": _gen_summary(gens)}


# --------------------------------------------------------------------------------------------------- entry point

def _fingerprint(cfg: EvalConfig, model, names: list[str], files: list[str | None]) -> dict:
    """What a stored task result depends on: its settings, its files' contents and the model's weights (by value:
    a model retrained into the same folder, with the same parameter count, is another model)."""
    from sftmix.rundir import file_sha256

    fp = {k: getattr(cfg, k) for k in names}
    fp["files"] = {f: file_sha256(f) for f in files if f and os.path.isfile(f)}
    fp["model"] = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    fp["model_parameters"] = sum(p.numel() for p in model.parameters())
    fp["model_weights"] = _weights_digest(model)
    return json.loads(json.dumps(fp, default=str))


_WEIGHTS_MEMO: dict = {}


def _weights_digest(model) -> str:
    """sha256 of every tensor of the state dict (names, dtypes, shapes, bytes); memoised per model object until a
    parameter changes in place (torch's version counters)."""
    state = model.state_dict()
    key = (id(model), tuple((k, t.data_ptr(), t._version) for k, t in state.items()))
    if key not in _WEIGHTS_MEMO:
        h = hashlib.sha256()
        for k, t in state.items():
            h.update(f"{k}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1e".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        _WEIGHTS_MEMO.clear()
        _WEIGHTS_MEMO[key] = h.hexdigest()
    return _WEIGHTS_MEMO[key]


def run_eval(model, tokenizer, eval_config: EvalConfig, output_dir: str | os.PathLike) -> dict:
    """Run every evaluation whose input file is set; returns {task: metrics} and writes them to output_dir."""
    cfg, out = eval_config, Path(output_dir)
    jobs = []
    if cfg.heldout_file:
        jobs.append(("heldout", eval_task_fields("heldout"), [cfg.heldout_file]))
    for t in MC_TASKS:
        if getattr(cfg, f"{t}_file"):
            jobs.append((t, eval_task_fields(t),
                         [getattr(cfg, f"{t}_file"), getattr(cfg, f"{t}_shots_file")]))
        elif getattr(cfg, f"{t}_shots_file"):
            raise SFTMixError(f"{t}_shots_file is set but {t}_file is not; give the file to evaluate")
    for t in ("mtbench", "alpacaeval"):
        if getattr(cfg, f"{t}_file"):
            jobs.append((t, eval_task_fields(t), [getattr(cfg, f"{t}_file")]))
    if not jobs:
        raise SFTMixError("nothing to evaluate: set at least one of heldout_file, pubmedqa_file, medqa_file, "
                          "medqa5_file, medmcqa_file, mtbench_file, alpacaeval_file")
    judge = make_judge(cfg, out) if any(t in ("mtbench", "alpacaeval") for t, _, _ in jobs) else None
    results = {}
    for task, names, files in jobs:
        path = out / f"{task}.json"
        fp = _fingerprint(cfg, model, names, files)
        if path.exists() and not cfg.overwrite:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("settings") == fp and not old.get("n_failed"):  # failed judgments are asked again
                log.info("%s: %s exists with the same settings; reusing it (overwrite=True to redo)", task, path)
                results[task] = old
                continue
        t0 = time.perf_counter()
        if task == "heldout":
            from sftmix.data import ensure_chat_template, load_records

            ensure_chat_template(tokenizer, cfg.chat_template)
            metrics, rows = heldout_nll(model, tokenizer, load_records(cfg.heldout_file), cfg.batch_size,
                                        cfg.max_length, source=cfg.heldout_file, return_rows=True)
            metrics["file"] = cfg.heldout_file
            write_jsonl(out / "heldout_examples.jsonl", rows)
        elif task in MC_TASKS:
            metrics = eval_multiple_choice(model, tokenizer, task, getattr(cfg, f"{task}_file"),
                                           getattr(cfg, f"{task}_shots_file"), cfg, out)
        else:
            from sftmix.data import ensure_chat_template

            ensure_chat_template(tokenizer, cfg.chat_template)
            fn = eval_mt_bench if task == "mtbench" else eval_alpaca_eval
            metrics = fn(model, tokenizer, getattr(cfg, f"{task}_file"), judge, cfg, out)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["settings"] = fp
        atomic_write_json(path, metrics)
        results[task] = metrics
    atomic_write_json(out / "results.json", results)
    return results


@dataclass
class _ModelArgs:
    model: str = field(default="smollm2", metadata={"help": (
        "Model to evaluate: a spec understood by sftmix.models.load_model_and_tokenizer (smollm2, tiny-random, a "
        "local HF directory, ...).")})
    output_dir: str = field(default="eval", metadata={"help": "Where the metrics and predictions go."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype (auto, float32, bfloat16, ...)."})
    device: str = field(default="auto", metadata={"help": "auto (GPU when present), cpu, cuda, ..."})


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    margs, cfg = TrlParser((_ModelArgs, EvalConfig)).parse_args_and_config(argv)
    from sftmix.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(margs.model, dtype=margs.dtype, device=margs.device)
    results = run_eval(model, tokenizer, cfg, margs.output_dir)
    for task, m in results.items():
        brief = {k: m[k] for k in ("accuracy", "ci95", "n", "nll", "ppl", "score", "win_rate", "lc_win_rate",
                                   "n_failed", "n_truncated", "seconds") if k in m}
        print(f"{task}: {json.dumps(brief, default=str)}")
    return results


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("sftmix.evaluate"):
        main()
