"""k-shot multiple choice by log-likelihood.

    from sftmix.eval.mc import eval_multiple_choice
    metrics = eval_multiple_choice(model, tokenizer, "pubmedqa", "../shared/data/pubmedqa_pqal_dev500.json")

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
mc_protocol=biomistral (the paper's Table 2) replaces prompts and shots: BioMistral's prompt ending in "**Answer:**(",
continuations "A", "B", ... (no space), a shot set per question drawn with the round's seed (sftmix.eval.tasks,
docs/evaluation.md); the scoring below is the same.
MedMCQA's `cop` is 1-4 in the official release and 0-3 in the Hugging Face copy: `medmcqa_cop_base=auto` tells them
apart from the values present in the file (a 0 means 0-based, a 4 means 1-based; neither is an error).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from sftmix.confidence.scoring import model_device, pad_token_id
from sftmix.config import EvalConfig
from sftmix.eval.tasks import (
    HUB_EVAL_SOURCES,
    biomistral_shots,
    build_biomistral_prompt,
    build_prompt,
    load_biomistral_sets,
    load_mc,
    split_shots,
)
from sftmix.utils import SFTMixError, write_jsonl

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth a cache copy per batch


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

    from sftmix.confidence.scoring import share_batches, world_and_rank

    device = model_device(model)
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
        # Several processes: each runs its share of the batches (balanced by padded tokens, sftmix.confidence.reference.
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
                         distributed: bool = False, seed: int | None = None,
                         predictions_file: str | None = None) -> dict:
    """k-shot multiple-choice accuracy on `eval_file`; writes <task>_predictions.jsonl (or `predictions_file`) into
    output_dir if given. Under mc_protocol=biomistral this is one round, its shot sets drawn with `seed` (default
    cfg.seed); sftmix.eval.evaluate runs the rounds. distributed=True: every process of the process group calls it and
    scores a share (see score_choice_ids); the main process writes the predictions."""
    from sftmix.confidence.scoring import world_and_rank

    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    biomistral = cfg.mc_protocol == "biomistral"
    shot_sets = None
    if biomistral:
        if cfg.mc_chat_template:
            raise SFTMixError("mc_chat_template is for mc_protocol lm-eval; BioMistral's protocol is plain few-shot "
                              "text: set mc_chat_template false or mc_protocol lm-eval")
        items, pool, info = load_biomistral_sets(task, eval_file, shots_file, cfg)
        if cfg.mc_limit is not None:
            items = items[: cfg.mc_limit]
        seed = cfg.seed if seed is None else seed
        shot_sets = [biomistral_shots(it, pool, cfg.num_shots, seed) for it in items]
        built = [build_biomistral_prompt(it, sh) for it, sh in zip(items, shot_sets)]
        info = {**info, "mc_protocol": "biomistral", "seed": seed}
    else:
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
        if shot_sets is not None:
            preds[-1]["shot_ids"] = [s.id for s in shot_sets[len(preds) - 1]]
    n = len(preds)
    k, k_norm = sum(p["correct"] for p in preds), sum(p["correct_norm"] for p in preds)
    key = "correct" if cfg.mc_score == "sum" else "correct_norm"
    k_main = sum(p[key] for p in preds)
    metrics = {
        "task": task, "file": str(eval_file), "source": HUB_EVAL_SOURCES.get(str(eval_file)),  # a Hub set's commit
        "n": n, "accuracy": k_main / n, "ci95": wilson_interval(k_main, n),
        "score": cfg.mc_score, "acc": k / n, "acc_ci95": wilson_interval(k, n), "acc_norm": k_norm / n,
        "acc_norm_ci95": wilson_interval(k_norm, n), "num_shots": cfg.num_shots, **info,
        "prompt_format": "biomistral" if biomistral else "chat" if cfg.mc_chat_template else "plain",
        "max_length": cfg.max_length,
        "n_truncated": res["stats"]["n_truncated"], "chance": sum(1 / len(it.choices) for it in items) / n,
        "answer_counts": dict(Counter(p["answer"] for p in preds)),
        "prediction_counts": dict(Counter(p["pred" if cfg.mc_score == "sum" else "pred_norm"] for p in preds)),
        "scoring": res["stats"], "seconds": time.perf_counter() - t0,
    }
    if output_dir is not None and (not distributed or world_and_rank()[1] == 0):  # every process has them; one writes
        write_jsonl(Path(output_dir) / (predictions_file or f"{task}_predictions.jsonl"), preds)
    lo, hi = metrics["ci95"]
    log.info("%s: accuracy %.3f [%.3f, %.3f] on %d questions (%d-shot, %d truncated) in %.0fs", task,
             metrics["accuracy"], lo, hi, n, cfg.num_shots, metrics["n_truncated"], metrics["seconds"])
    return metrics
