"""The no-grad scoring engine of step 1 and of the evaluation: each example's mean NLL over its response tokens.

    from sftmix.confidence.scoring import score_examples, run_scoring
    rows = score_examples(model, tokenized_ds, batch_size=16)   # [{guid, nll_mean, n_tokens, ppl}] in dataset order
    res = run_scoring(model, ds, hidden_at="last_response", distributed=True)   # + stats, hidden states, shared out

Examples are scored in length-sorted batches (little padding), right padded, through the backbone and then the LM
head in vocabulary tiles (TRL's chunked log-prob kernel: the [B, T, V] logits never exist), with the logit transforms
TRL's fused head honours (bias, logit scale, final softcapping). Under several processes the batches are shared out
by tokens and the rows gathered, so every process returns the one-process result. Step 1's scoring callback
(sftmix.confidence.callback: the reference run, a data map of any Trainer, one-run SFTMix) scores with it at each
scoring step, sftmix.eval.evaluate the held-out NLL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sftmix.utils import SFTMixError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOGPROB_VOCAB_CHUNK = 8192  # vocabulary columns per LM-head tile: bounds the logits buffer to [4096, 8192]
# Config attributes that scale a model's logits after the LM head (TRL's fused head applies them; the Mixup loss
# does not, so sftmix.mixup.guard refuses such a target)
LOGIT_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class ScoringResult:
    rows: list[dict]  # per example, dataset order: guid, nll_mean, n_tokens, ppl
    stats: dict = field(default_factory=dict)  # tokens, padding_fraction, seconds, tokens_per_s, ...
    hidden: np.ndarray | None = None  # [N, H] float32 when asked for


def score_examples(model, dataset, batch_size: int = 16, desc: str | None = None, **kwargs) -> list[dict]:
    """Per-example `nll_mean`, `n_tokens`, `ppl = exp(nll_mean)` over the response tokens, in dataset order.

    `dataset` (datasets.Dataset or list of dicts) has `input_ids`, `labels` (-100 outside the response) and `guid`.
    Keyword arguments go to `run_scoring` (padding_side, hidden_at, show_progress, distributed)."""
    return run_scoring(model, dataset, batch_size=batch_size, desc=desc, **kwargs).rows


# no_grad rather than inference_mode: scoring runs in the middle of training, and a module that caches a tensor
# created under inference_mode (e.g. a lazily built rotary table) would make the next backward fail
@torch.no_grad()
def run_scoring(
    model,
    dataset,
    batch_size: int = 16,
    desc: str | None = None,
    padding_side: str = "right",
    hidden_at: str | None = None,
    show_progress: bool = True,
    distributed: bool = False,
) -> ScoringResult:
    """Score `dataset` with `model` (inference only) in length-sorted batches; see `score_examples`.

    hidden_at: None, "last_response" (the hidden state of the example's last response token, which has seen the
    whole example) or "last_prompt" (the last prompt token, which predicts the first response token).

    distributed=True, under several processes (a torch.distributed process group; every process must call it; the
    default False scores everything here, for callers that run on one process only): the length-sorted batches are
    shared out by tokens (`share_batches`), each process scores its share, a process with fewer batches runs dummy
    forwards (its shortest example, discarded) until all have run as many as the busiest, so that sharded forwards
    (FSDP2/FSDP1 all-gathers, ZeRO-3 gathers incl. the LM head's) line up, and the rows and hidden states are
    all-gathered: every process returns exactly the one-process result (the same batches, computed the same way).
    stats["per_process"] has each process's batches, examples, tokens, response tokens and seconds."""
    from tqdm.auto import tqdm

    if padding_side not in ("right", "left"):
        raise SFTMixError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    if hidden_at not in (None, "last_response", "last_prompt"):
        raise SFTMixError(f"hidden_at must be None, 'last_response' or 'last_prompt', got {hidden_at!r}.")
    if batch_size < 1:
        raise SFTMixError(f"batch_size must be >= 1, got {batch_size}.")
    check_score_columns(dataset)
    backbone, lm_head, head_kwargs = _backbone_and_head(model)
    device = lm_head.weight.device
    pad_id = pad_token_id(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else contextlib.nullcontext()
    )

    lengths = _lengths(dataset)
    n = len(lengths)
    # longest first: an out-of-memory error shows on the first batch, not after an hour
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    fetch = _fetcher(dataset)
    # Several processes: each scores its share of the very batches one process would score (so every row is computed
    # exactly as on one process), and the rows are gathered. Ranks with fewer batches run dummy forwards (the shortest
    # example, discarded) until all have run the same number, so that the collectives of a sharded forward (FSDP's
    # all-gathers, ZeRO-3's parameter and head gathers) line up.
    world, rank = world_and_rank() if distributed else (1, 0)
    shares = share_batches([len(b) * max(lengths[i] for i in b) for b in batches], world)
    plan = [(batches[b], False) for b in shares[rank]]
    if n:
        plan += [([order[-1]], True)] * (max(len(s) for s in shares) - len(shares[rank]))
    mine = np.array([i for b in shares[rank] for i in batches[b]], dtype=np.int64)

    nll_sum = np.zeros(n, dtype=np.float64)
    n_tok = np.zeros(n, dtype=np.int64)
    hidden = None
    real_tokens = computed_tokens = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for batch_idx, dummy in tqdm(plan, desc=desc or "scoring", disable=not show_progress, leave=False):
            ids_list, labels_list = fetch(batch_idx)
            B = len(batch_idx)
            input_ids, labels, attention_mask = _pad_batch(ids_list, labels_list, pad_id, padding_side,
                                                           lambda r: fetch.guid(batch_idx[r]))
            T = input_ids.shape[1]
            # positions count real tokens only, so that left padding gives the same positions as right padding
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            if not dummy:
                real_tokens += int(attention_mask.sum())
                computed_tokens += B * T
            input_ids, labels = input_ids.to(device), labels.to(device)
            attention_mask, position_ids = attention_mask.to(device), position_ids.to(device)

            with autocast, _capture_output(backbone) as captured:
                # The whole model is called (its head on one position only) so that an FSDP root's pre-forward
                # runs (it gathers the root's own parameters); the backbone's output is taken by a hook.
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      logits_to_keep=1)
            with autocast:
                h = captured[0]  # the backbone's last hidden state: the one at t-1 predicts the token at t
                targets = labels[:, 1:]
                mask = targets != IGNORE_INDEX
                with _full_head(lm_head) as head:  # ZeRO-3 / a sharded FSDP2 head: gathered on every rank
                    logp = _label_logprobs(h[:, :-1][mask], targets[mask], head, head_kwargs)
            if dummy:
                continue
            rows_of = mask.nonzero()[:, 0]
            per_row = torch.zeros(B, dtype=torch.float64, device=logp.device).index_add_(0, rows_of, -logp.double())
            idx = torch.as_tensor(batch_idx)
            nll_sum[idx.numpy()] = per_row.cpu().numpy()
            n_tok[idx.numpy()] = mask.sum(-1).cpu().numpy()
            if hidden_at is not None:
                pos = _hidden_positions(labels, hidden_at)
                hb = h[torch.arange(B, device=h.device), pos].float().cpu().numpy()
                if hidden is None:
                    hidden = np.zeros((n, hb.shape[-1]), dtype=np.float32)
                hidden[idx.numpy()] = hb
    finally:
        model.train(was_training)
    local = {"rank": rank, "batches": len(shares[rank]), "dummy_batches": len(plan) - len(shares[rank]),
             "examples": len(mine), "tokens": real_tokens, "response_tokens": int(n_tok[mine].sum()),
             "computed_tokens": computed_tokens, "seconds": time.perf_counter() - t0}
    if world > 1:
        nll_sum, n_tok, hidden, per_process = _gather_scores(mine, nll_sum, n_tok, hidden, local, n)
        real_tokens = sum(p["tokens"] for p in per_process)
        computed_tokens = sum(p["computed_tokens"] for p in per_process)
    else:
        per_process = [local]
    seconds = time.perf_counter() - t0

    empty = np.flatnonzero(n_tok == 0)
    if len(empty):
        raise SFTMixError(
            f"{len(empty)} of {n} examples have no response tokens (all labels are -100), e.g. guid "
            f"{fetch.guid(int(empty[0]))!r}; tokenize with sftmix.data.tokenize_records, which drops and counts them."
        )
    nll_mean = nll_sum / n_tok
    bad = np.flatnonzero(~np.isfinite(nll_mean))
    if len(bad):
        raise SFTMixError(
            f"the reference model gives a non-finite NLL for {len(bad)} of {n} examples (e.g. guid "
            f"{fetch.guid(int(bad[0]))!r}): the model diverged; lower the learning rate or use an earlier checkpoint."
        )
    guids = fetch.all_guids()
    rows = [
        {"guid": guids[i], "nll_mean": float(nll_mean[i]), "n_tokens": int(n_tok[i]),
         "ppl": float(math.exp(nll_mean[i]))}
        for i in range(n)
    ]
    stats = {
        "examples": n,
        "tokens": real_tokens,
        "response_tokens": int(n_tok.sum()),
        "computed_tokens": computed_tokens,
        "padding_fraction": 1.0 - real_tokens / max(computed_tokens, 1),
        "seconds": seconds,
        "tokens_per_s": real_tokens / max(seconds, 1e-9),
        "batch_size": batch_size,
        "device": str(device),
        "num_processes": world,
        "per_process": per_process,  # each process's share: batches, examples, tokens, response_tokens, seconds
    }
    logger.info(
        "scored %d examples (%d tokens) in %.1fs: %.0f tokens/s, padding %.1f%% of computed tokens",
        n, real_tokens, seconds, stats["tokens_per_s"], 100 * stats["padding_fraction"],
    )
    return ScoringResult(rows=rows, stats=stats, hidden=hidden)


def _pad_batch(ids_list, labels_list, pad_id: int, padding_side: str, guid_of):
    """input_ids, labels and attention_mask [B, T] of one batch, padded on `padding_side` by torch's pad_sequence
    (pad_id, -100, 0). `guid_of(r)` names row r when its input_ids and labels differ in length."""
    from torch.nn.utils.rnn import pad_sequence

    for r, (ids, lab) in enumerate(zip(ids_list, labels_list)):
        if len(ids) != len(lab):
            raise SFTMixError(f"example {guid_of(r)!r}: input_ids ({len(ids)}) and labels ({len(lab)}) differ in "
                              f"length; re-tokenize it with sftmix.data.tokenize_records.")

    def pad(rows, value):
        return pad_sequence([torch.as_tensor(x, dtype=torch.long) for x in rows], batch_first=True,
                            padding_value=value, padding_side=padding_side)

    return (pad(ids_list, pad_id), pad(labels_list, IGNORE_INDEX),
            pad([[1] * len(x) for x in ids_list], 0))


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def share_batches(costs: list[int], world_size: int) -> list[list[int]]:
    """Which batches each of `world_size` processes scores, given each batch's cost in padded tokens (batch size x
    longest sequence; batches longest first): batch by batch to the process with the fewest tokens so far, ties to the
    lowest rank (greedy longest-first). Balanced by tokens, not by count (a batch of long examples costs many of short
    ones); deterministic, so every process computes every share without communicating. Batch positions per rank."""
    load, shares = [0] * world_size, [[] for _ in range(world_size)]
    for b, cost in enumerate(costs):
        r = min(range(world_size), key=lambda j: (load[j], j))
        shares[r].append(b)
        load[r] += cost
    return shares


def _gather_scores(mine, nll_sum, n_tok, hidden, local: dict, n: int):
    """All-gather each process's rows (nll sums, token counts, hidden states of its examples) into full arrays on
    every process, so that every process returns what one process would; also each process's share statistics."""
    part = {"idx": mine, "nll_sum": nll_sum[mine], "n_tok": n_tok[mine], "stats": local,
            "hidden": None if hidden is None else hidden[mine]}
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    nll_sum, n_tok, full_hidden = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64), None
    for p in parts:
        nll_sum[p["idx"]] = p["nll_sum"]
        n_tok[p["idx"]] = p["n_tok"]
        if p["hidden"] is not None:
            if full_hidden is None:
                full_hidden = np.zeros((n, p["hidden"].shape[-1]), dtype=np.float32)
            full_hidden[p["idx"]] = p["hidden"]
    return nll_sum, n_tok, full_hidden, [p["stats"] for p in parts]


@contextlib.contextmanager
def _capture_output(module):
    """A list that receives `module`'s first output (its last hidden state) while the context is open."""
    captured = []
    handle = module.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def _full_head(lm_head):
    """The LM head with its whole weight, for reading it outside the head's own forward: under ZeRO-3 gathered for the
    duration (trl's maybe_gather_lm_head_ctx; a collective, so every rank enters it), an FSDP2 DTensor shard made
    whole (also a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    with maybe_gather_lm_head_ctx(weight, bias):
        if isinstance(weight, DTensor) or isinstance(bias, DTensor):
            from types import SimpleNamespace

            full = [t.full_tensor() if isinstance(t, DTensor) else t for t in (weight, bias)]
            yield SimpleNamespace(weight=full[0], bias=full[1])
        else:
            yield lm_head


def _backbone_and_head(model):
    """The transformer backbone (returns last_hidden_state) and the LM head, and how the head's logits are shaped."""
    if hasattr(model, "get_base_model"):  # a PEFT model: score with the adapters on
        model = model.get_base_model()
    backbone = getattr(model, "base_model", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or lm_head is None or not hasattr(lm_head, "weight"):
        raise SFTMixError(
            f"cannot score with a {type(model).__name__}: it needs a causal-LM head over a backbone "
            f"(an AutoModelForCausalLM); load the reference with AutoModelForCausalLM."
        )
    # The same logit transforms TRL's fused LM head honours (trl.trainer.utils.add_fused_lm_head)
    cfg = model.config.get_text_config()
    logit_scale = getattr(cfg, "logit_scale", None)
    if logit_scale is None:
        logit_scale = getattr(cfg, "output_multiplier", None)
    if logit_scale is None:
        logit_scale = getattr(cfg, "lm_head_multiplier", None)
    if logit_scale is None and getattr(cfg, "logits_scaling", None) is not None:
        logit_scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    head_kwargs = {
        "softcap": getattr(cfg, "final_logit_softcapping", None),
        "logit_scale": 1.0 if logit_scale is None else float(logit_scale),
    }
    return backbone, lm_head, head_kwargs


def _label_logprobs(hidden: torch.Tensor, targets: torch.Tensor, lm_head, head_kwargs: dict) -> torch.Tensor:
    """log p(target) for the selected positions only, through the LM head in vocabulary tiles: the [B, T, V] logits
    are never materialised (TRL's chunked kernel; it handles bias, logit scale and final softcapping)."""
    from trl.kernels import ChunkedLogProbFunction

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    logp, *_ = ChunkedLogProbFunction.apply(
        hidden, lm_head.weight, lm_head.bias, targets, 1.0, LOGPROB_VOCAB_CHUNK,
        head_kwargs["softcap"], head_kwargs["logit_scale"], (),
    )
    return logp.float()


def _hidden_positions(labels: torch.Tensor, hidden_at: str) -> torch.Tensor:
    is_resp = labels != IGNORE_INDEX
    T = labels.shape[1]
    ar = torch.arange(T, device=labels.device).expand_as(labels)
    if hidden_at == "last_response":
        return torch.where(is_resp, ar, -1).max(-1).values
    first = torch.where(is_resp, ar, T).min(-1).values
    return (first - 1).clamp(min=0)


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where its inputs go."""
    return next(model.parameters()).device


def pad_token_id(model=None, tokenizer=None) -> int:
    """The id to pad batches with: the tokenizer's pad or eos token, else the model config's; 0 without either
    (padded positions are masked out, so any id works)."""
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if v is not None:
            return int(v)
    cfg = model.config.get_text_config() if model is not None else None
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        eos = getattr(cfg, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return 0 if pad is None else int(pad)


def check_score_columns(dataset, what: str = "the dataset to score") -> None:
    """The columns every scored dataset needs: input_ids, labels (-100 outside the response) and guid."""
    columns = _column_names(dataset)
    missing = [c for c in ("input_ids", "labels", "guid") if c not in columns]
    if missing:
        raise SFTMixError(
            f"{what} has no {', '.join(missing)} column(s) (it has {sorted(columns)}); tokenize the "
            f"records with sftmix.data.tokenize_records(records, tokenizer)."
        )


def _column_names(dataset) -> set:
    if hasattr(dataset, "column_names"):
        return set(dataset.column_names)
    return set(dataset[0]) if len(dataset) else {"input_ids", "labels", "guid"}


def _lengths(dataset) -> list[int]:
    if hasattr(dataset, "select_columns"):  # datasets.Dataset: read lengths through Arrow, batch by batch
        import pyarrow.compute as pc

        out = []
        for tbl in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=4096):
            out.extend(pc.list_value_length(tbl["input_ids"]).to_pylist())
        return out
    return [len(row["input_ids"]) for row in dataset]


class _fetcher:
    """Rows of a datasets.Dataset or a list of dicts, fetched a batch at a time."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.is_hf = hasattr(dataset, "select_columns")
        if self.is_hf:
            self.sub = dataset.select_columns(["input_ids", "labels"])
        self._guids = None

    def __call__(self, idx):
        if self.is_hf:
            b = self.sub[list(idx)]
            return b["input_ids"], b["labels"]
        return [self.dataset[i]["input_ids"] for i in idx], [self.dataset[i]["labels"] for i in idx]

    def all_guids(self) -> list[str]:
        if self._guids is None:
            self._guids = list(self.dataset["guid"]) if self.is_hf else [r["guid"] for r in self.dataset]
        return self._guids

    def guid(self, i: int) -> str:
        return self.all_guids()[i]
