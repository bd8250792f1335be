"""Batched answer generation with the model's chat template (left padded, greedy unless sampling).

    from sftmix.eval.generation import generate
    answers = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=64)
    sample = heldout_answers(model, tokenizer, heldout_records, n=8, max_new_tokens=128)   # the report's answers
"""

from __future__ import annotations

import logging

import torch

from sftmix.confidence.scoring import model_device, pad_token_id

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 1024, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
             show_progress: bool = True) -> list[dict]:
    """Answer each conversation (ending with a user turn) with the chat template's generation prompt.

    Batched longest first, left padded; greedy unless do_sample. Returns per conversation {"text", "n_tokens",
    "finished"} where finished=False means max_new_tokens cut the answer."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = model_device(model)
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


def heldout_answers(model, tokenizer, records: list[dict], n: int = 8, max_new_tokens: int = 128,
                    batch_size: int = 8) -> dict:
    """Greedy answers to a fixed sample of held-out prompts: the first `n` records by guid (a content hash) with
    distinct prompts, so every model of a run, and every rerun, answers the same prompts. For the report's
    side-by-side table; the sample and the settings are recorded with the answers."""
    sample, seen = [], set()
    for r in sorted(records, key=lambda r: r["guid"]):  # one row per distinct prompt (records may share a prompt)
        key = repr(r["prompt"])
        if key not in seen and len(sample) < n:
            seen.add(key)
            sample.append(r)
    answers = generate(model, tokenizer, [r["prompt"] for r in sample], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, do_sample=False, show_progress=False)
    items = [{"guid": r["guid"], "prompt": r["prompt"], "reference": r["completion"][-1]["content"] if r["completion"]
              else "", "answer": a["text"], "n_tokens": a["n_tokens"], "finished": a["finished"]}
             for r, a in zip(sample, answers)]
    return {"n": len(items), "n_heldout": len(records),
            "sample": "the first n held-out records by guid, distinct prompts", "decoding": "greedy",
            "max_new_tokens": max_new_tokens, "n_cut": sum(not a["finished"] for a in items), "items": items}


def generate_via_server(base_url: str, model: str, conversations: list[list[dict]], max_new_tokens: int = 1024,
                        do_sample: bool = False, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                        api_key: str | None = None, concurrency: int = 4, timeout: float = 600.0) -> list[dict]:
    """The same answers from an OpenAI-compatible server serving the model under test (vLLM, `transformers serve`):
    POST {base_url}/chat/completions per conversation with the same settings (greedy = temperature 0; the server
    applies the model's chat template); {"text", "n_tokens", "finished"} as `generate` returns. A request that fails
    raises SFTMixError in one line (an answer is never silently missing)."""
    import json
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from sftmix.utils import SFTMixError

    url = base_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def one(conv):
        body = {"model": model, "messages": conv, "max_tokens": max_new_tokens,
                "temperature": temperature if do_sample else 0.0, "top_p": top_p if do_sample else 1.0, "seed": seed}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                choice = json.loads(resp.read())["choices"][0]
        except urllib.error.HTTPError as e:
            raise SFTMixError(f"generation_base_url={base_url}: generation_model={model!r}: HTTP {e.code}: "
                              f"{e.read()[:200].decode('utf-8', 'replace')}; check the server and the model name")
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise SFTMixError(f"generation_base_url={base_url}: no answer ({type(e).__name__}: {e}); check that the "
                              f"server is running") from None
        text = choice["message"]["content"] or ""
        usage = choice.get("usage") or {}
        return {"text": text.strip(), "n_tokens": usage.get("completion_tokens", len(text.split())),
                "finished": choice.get("finish_reason") != "length"}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, conversations))
