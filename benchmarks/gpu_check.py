"""One prepared device check of SFTMix: correct on the device, its cost at a real shape, and `sftmix run` end to end.

    python benchmarks/gpu_check.py                       # on a GPU machine: all three parts (planned < 8 min, H200)
    python benchmarks/gpu_check.py --device cpu --quick  # tiny shapes on CPU, < 2 min (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --skip speed,e2e      # the correctness part alone
    python benchmarks/gpu_check.py --out gpu_check.json  # also write the JSON result to a file

On a GPU image without trl and datasets, and without network access, bring them as wheels. Here, in the repo root
(`echo /.whl/ >> .git/info/exclude` once), for the device's Python (3.12 on the H200 image; 1.9 MB in all):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2

(the versions installed and tested here: `pip show trl datasets dill multiprocess transformers peft`; 16 MB).
transformers and peft are on the image, but its transformers 5.17 has no `activation_checkpointing` (the
TrainingArguments field and PreTrainedModel.activation_checkpointing_enable, which benchmarks/perf.py and the paper
configs use; 5.24 has them), and peft goes with it. Of what the wheels need, the image lacks only dill and
multiprocess (hence in the list); it has pyarrow, xxhash, pandas, fsspec, huggingface-hub, filelock, pyyaml, tqdm
(datasets), accelerate, jinja2, psutil (trl), tokenizers, safetensors, regex, typer (transformers), and scipy,
scikit-learn, matplotlib, rich (sftmix). datasets 5.2 wants pyarrow>=24 and fsspec<=2026.9.0: the JSON's "versions"
shows what the device has; carry pyarrow==26.0.1 / fsspec==2026.9.0 as wheels too if they are off. gguf (an sftmix
dependency) only converts GGUF checkpoints, not needed here. Then, on the device, with `.whl` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py \
        --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Nothing is downloaded at run time: the models are random-initialised from a config (no weights are needed for these
checks or timings), the tokenizer is sftmix's byte-level one, the data are ../shared/data/alpaca_4500.json when it is
there, else synthetic records with Alpaca-like lengths.

1. Correct on the device (fresh random inputs, the device's own kernels: TRL's Triton LM head on CUDA):
   - mixup_loss against an fp64 reference (naive_mixup_loss of tests/helpers.py, fp64 inputs), loss value and
     gradients w.r.t. the hidden states and the LM-head weight, for fp32 inputs, fp32 inputs under bf16 autocast and
     bf16 inputs; errors are relative (|a-b|/|b|, Frobenius norms for gradients), tolerances in TOLERANCES below;
   - SFTMixTrainer with mixup_weight=0 against trl.SFTTrainer, step by step (losses, gradient norms, final weights);
   - with Mixup on: one backbone forward per optimizer step (a forward hook counts it; a hook on decoder layer 0
     counts as many calls as in the NTP trainer, so no extra pass through the layers) and the step's loss equal to an
     independent computation (full fp64 logits from the backbone's hidden states: NTP cross-entropy + mu * L_Mixup);
   - step-1 scoring (sftmix.confidence.scoring.score_examples, batched and padded) equal to a full-logits
   computation, one
     unpadded example at a time;
   - the non-finite guard: a NaN Mixup loss, and a non-finite gradient with a finite loss, each stop training with
     SFTMixError before the update (the weights are bit-identical to the previous step's).
   Any error or exception is a failure: JSON "correct" is false and "failures" lists them (the exit status is 1).
   `--inject-fault mixup` (mixup_loss returns 10% too much) or `--inject-fault tolerance` (every tolerance 0) show
   that the checks can fail.
2. Cost at a real shape (benchmarks/perf.py's machinery: the same steps, memory counters and FLOP model): a random
   Llama-3.2-1B-shaped model (bf16, sequence 2048, gradient checkpointing on), the batch chosen to fill the device
   (from one probing step's peak memory, capped by --max-batch): SFTMix/NTP step time (median of paired interleaved
   ratios), peak memory ratio, step-1 scoring vs training tokens/s, the NTP step's model-FLOP utilisation against the
   measured bf16 matmul rate, the ideal ratio from FLOPs; then the same at 4 layers of Llama-3.1-8B's width while the
   time budget allows. On CPU (--quick) the tiny shape; memory is torch.profiler's memory events (tensor bytes).
3. End to end: `sftmix run --config configs/smoke.yaml` on the device in a subprocess (tiny random model): models
   placed on the device in the expected dtype, reference checkpoints written, both recipes' models saved, report.json.
The last stdout line is one JSON object; a short table precedes it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import perf  # noqa: E402  benchmarks/perf.py: model shapes, data, steps, memory counters, FLOP model

sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import capture_pairs, naive_mixup_loss  # noqa: E402  tests/helpers.py: the independent Mixup loss

from sftmix.mixup import loss as loss_mod  # noqa: E402

RESULT_KEYS = ("device", "correct", "failures", "step_time_ratio", "peak_memory_ratio",
               "scoring_vs_training_throughput")
# Tolerances: relative errors against the fp64 reference (or the other implementation), per precision.
TOLERANCES = {
    # fp32 inputs (also under bf16 autocast, which mixup_loss turns off): fp32 rounding of sums over V logits
    "mixup_loss fp32": {"loss": 1e-5, "grad": 1e-4},
    "mixup_loss fp32 autocast": {"loss": 1e-5, "grad": 1e-4},
    # bf16 inputs (the reference gets the same bf16 values, upcast): the projection runs in bf16 (as the NTP head), its
    # logits rounded to bf16 (relative 2^-9 = 2e-3 each, random in sign, so the loss's error averages out: 1.5e-5 on
    # CPU's tiny shape) before the fp32 softmax; the z gradient's matmul is bf16 too (observed 3e-3 there)
    "mixup_loss bf16": {"loss": 2e-3, "grad": 1e-2},
    # trainer vs trainer: the same code path; on CUDA atomics and bf16 weights leave run-to-run noise
    "sft equivalence fp32": {"loss": 1e-6, "weights": 1e-4},
    "sft equivalence bf16": {"loss": 2e-3, "weights": 5e-2},
    # the trainer's loss vs fp64 full logits from the same hidden states
    "loss vs full logits fp32": {"loss": 1e-5},
    "loss vs full logits bf16": {"loss": 2e-3},
    # score_examples vs one unpadded example at a time (absolute error of each example's mean NLL, in nats)
    "scoring fp32": {"nll": 1e-4},
    "scoring bf16": {"nll": 2e-2},  # bf16 hidden states of a padded batch vs a lone example: 1.4e-4 on CPU
}
FAULTS = ("mixup", "tolerance")
PROBE_BATCH = 4
TARGETS = {"step_time_ratio": 1.03, "peak_memory_ratio": 1.02}  # issue 15, at the Llama-3.2-1B shape


# ----------------------------------------------------------------------------------------------------------------
# bookkeeping


class Checks:
    """Each check: a measured error against a tolerance, or a condition; an exception in a section is a failure."""

    def __init__(self, tol_scale: float = 1.0):
        self.rows, self.failures, self.tol_scale = [], [], tol_scale

    def error(self, name: str, err: float, tol: float, note: str = "") -> bool:
        tol = tol * self.tol_scale
        ok = bool(math.isfinite(err) and err <= tol)
        self.rows.append({"check": name, "error": err, "tolerance": tol, "ok": ok, "note": note})
        if not ok:
            self.failures.append(f"{name}: error {err:.3g} > tolerance {tol:.3g}" + (f" ({note})" if note else ""))
        return ok

    def expect(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append({"check": name, "error": None, "tolerance": None, "ok": bool(ok), "note": detail})
        if not ok:
            self.failures.append(f"{name}: {detail}")
        return bool(ok)

    @contextlib.contextmanager
    def section(self, name: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a crash of a check is its failure, and the other checks still run
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            self.rows.append({"check": name, "error": None, "tolerance": None, "ok": False,
                              "note": f"{type(e).__name__}: {msg}"})
            self.failures.append(f"{name}: raised {type(e).__name__}: {msg}")


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius norms for tensors), in fp64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def inject_fault(name: str | None) -> float:
    """Apply a deliberate fault (for the test that the checks can fail); returns the tolerance scale."""
    if name == "mixup":
        import sftmix.mixup.mixin

        real = loss_mod.mixup_loss

        def wrong(*a, **kw):
            return real(*a, **kw) * 1.1

        loss_mod.mixup_loss = wrong
        sftmix.mixup.mixin.mixup_loss = wrong  # where the trainers look it up
    return 0.0 if name == "tolerance" else 1.0


# ----------------------------------------------------------------------------------------------------------------
# 1. correctness


def check_mixup_loss(checks: Checks, device, quick: bool, seed: int = 0) -> None:
    """mixup_loss vs the fp64 reference: fresh random inputs, values and gradients, three precision cases."""
    B, T, H, V = (8, 40, 64, 512) if quick else (8, 512, 2048, 128256)
    chunk = 7 if quick else None  # quick: several chunks on tiny shapes; else the default (2**23 // V = 65 tokens)
    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b in range(B):  # varied prompt and response lengths, right padding
        p = int(torch.randint(1, T // 3, (1,), generator=g))
        r = int(torch.randint(1, T - p, (1,), generator=g))
        labels[b, p:p + r] = torch.randint(0, V, (r,), generator=g)
    pairs = torch.stack([torch.arange(0, B, 2), torch.arange(1, B, 2)], dim=1)
    lam = torch.from_numpy(np.random.default_rng(seed).beta(0.5, 0.5, B // 2))  # fp64, as SFTMix draws it
    hidden32 = torch.randn(B, T, H, generator=g)  # like the final norm's output: entries ~ 1
    weight32 = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))  # logits of std ~ 2
    labels, pairs = labels.to(device), pairs.to(device)
    for case, dtype, autocast in (("fp32", torch.float32, False), ("fp32 autocast", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):
        name = f"mixup_loss {case}"
        with checks.section(name):
            h = hidden32.to(device=device, dtype=dtype).requires_grad_()
            w = weight32.to(device=device, dtype=dtype).requires_grad_()
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                got = loss_mod.mixup_loss(h, labels, w, pairs, lam.to(device=device, dtype=torch.float32), chunk)
            g_h, g_w = torch.autograd.grad(got, (h, w))
            h64 = h.detach().double().requires_grad_()
            w64 = w.detach().double().requires_grad_()
            ref = naive_mixup_loss(h64, labels, w64, pairs, lam.to(device))
            r_h, r_w = torch.autograd.grad(ref, (h64, w64))
            tol = TOLERANCES[name]
            checks.error(f"{name}: loss", rel(got.detach(), ref.detach()), tol["loss"], f"loss {ref.item():.4f}")
            checks.error(f"{name}: grad hidden", rel(g_h, r_h), tol["grad"])
            checks.error(f"{name}: grad W", rel(g_w, r_w), tol["grad"])
            checks.expect(f"{name}: fp32 result", got.dtype == torch.float32, f"loss dtype {got.dtype}")
            del h, w, h64, w64, g_h, g_w, r_h, r_w, ref, got
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_model_shape(quick: bool, gpu: bool) -> dict:
    """The trainer checks' model: tiny on CPU; on CUDA a small Llama with the real vocabulary (TRL's Triton head
    tiles a 128256-wide head), cheap to train a few steps."""
    if quick or not gpu:
        return perf.SHAPES["tiny"]
    return dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=512, vocab_size=128256)


class TrainerKit:
    """Builds the trainers of the checks: one model shape, one dataset, the device's dtype policy (bf16 weights and
    bf16=True on CUDA, as `sftmix run` loads and trains; fp32 on CPU unless --bf16)."""

    def __init__(self, device, bf16: bool, quick: bool, out_dir: str, seed: int = 0):
        from datasets import Dataset

        from sftmix.models import build_byte_tokenizer

        self.device, self.bf16, self.out_dir, self.seed = device, bf16, out_dir, seed
        self.gpu = device.type == "cuda"
        self.tok = build_byte_tokenizer()
        self.shape = check_model_shape(quick, self.gpu)
        self.max_length = 128 if quick else 512
        self.records = perf.synthetic_records(64, seed, log_words=(1.8, 2.2) if quick else (3.0, 3.3))
        rows = [{"prompt": r["prompt"], "completion": r["completion"], "guid": r["guid"]} for r in self.records]
        self.dataset = Dataset.from_list([{**r, "confident": i % 2 == 0} for i, r in enumerate(rows)])
        self.n = 0

    def model(self):
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return perf.random_llama(self.shape, self.tok, self.device, dtype, seed=self.seed)

    def trainer(self, mixup_weight: float | None, **kw):
        """mixup_weight None: trl.SFTTrainer; else SFTMixTrainer with that weight."""
        from trl import SFTConfig, SFTTrainer

        from sftmix.mixup.trainer import SFTMixConfig, SFTMixTrainer

        self.n += 1
        common = dict(output_dir=os.path.join(self.out_dir, f"t{self.n}"), report_to=[], save_strategy="no",
                      logging_steps=1, learning_rate=1e-3, dataloader_num_workers=0, disable_tqdm=True,
                      seed=self.seed, max_length=self.max_length, per_device_train_batch_size=4, bf16=self.bf16,
                      use_cpu=not self.gpu)
        common.update(kw)
        plain = self.dataset.remove_columns("confident")  # as TRL users have it; Mixup needs the split
        if mixup_weight is None:
            return SFTTrainer(model=self.model(), args=SFTConfig(**common), train_dataset=plain,
                              processing_class=self.tok)
        args = SFTMixConfig(mixup_weight=mixup_weight, mixup_alpha=0.5, **common)
        return SFTMixTrainer(model=self.model(), args=args, train_dataset=self.dataset if mixup_weight else plain,
                             processing_class=self.tok)


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def check_sft_equivalence(checks: Checks, kit: TrainerKit) -> None:
    """SFTMixTrainer(mixup_weight=0) vs trl.SFTTrainer: the same logged loss and gradient norm at every step and the
    same weights at the end (weights error: ||ours - TRL's|| / ||TRL's - initial||, over all parameters)."""
    name = "sft equivalence " + ("bf16" if kit.bf16 else "fp32")
    with checks.section(name):
        kw = dict(max_steps=4, gradient_accumulation_steps=2)
        ref = kit.trainer(None, **kw)
        init = [p.detach().clone() for p in ref.model.parameters()]
        ref.train()
        ours = kit.trainer(0.0, **kw)
        ours.train()
        tol = TOLERANCES[name]
        a, b = logged(ours, "loss"), logged(ref, "loss")
        checks.expect(f"{name}: steps logged", len(a) == len(b) == 4, f"{len(a)} vs {len(b)} logged steps")
        checks.error(f"{name}: loss per step", max(rel(x, y) for x, y in zip(a, b)), tol["loss"],
                     "max over steps of the relative difference")
        checks.error(f"{name}: grad norm per step",
                     max(rel(x, y) for x, y in zip(logged(ours, "grad_norm"), logged(ref, "grad_norm"))), tol["loss"])
        with torch.no_grad():
            diff = math.sqrt(sum(float((p.double() - q.double()).pow(2).sum())
                                 for p, q in zip(ours.model.parameters(), ref.model.parameters())))
            moved = math.sqrt(sum(float((q.double() - p0.double()).pow(2).sum())
                                  for q, p0 in zip(ref.model.parameters(), init)))
        checks.expect(f"{name}: training moved the weights", moved > 0, f"||update|| = {moved:.3g}")
        checks.error(f"{name}: final weights", diff / max(moved, 1e-300), tol["weights"], f"||update|| {moved:.3g}")


def check_one_forward_and_loss(checks: Checks, kit: TrainerKit) -> None:
    """With Mixup on: one backbone forward per step, decoder-layer calls as many as NTP's, and the loss of a step equal
    to an independent full-logits computation from the same batch."""
    prec = "bf16" if kit.bf16 else "fp32"
    steps = 3
    with checks.section("one forward per step"):
        counts = {}
        for label, mu in (("ntp", None), ("sftmix", 0.2)):
            tr = kit.trainer(mu, max_steps=steps)
            causal = getattr(tr, "_causal_lm", tr.model)
            c = counts[label] = {"backbone": 0, "layer0": 0}
            causal.base_model.register_forward_hook(lambda *a, c=c: c.__setitem__("backbone", c["backbone"] + 1))
            causal.base_model.layers[0].register_forward_hook(lambda *a, c=c: c.__setitem__("layer0", c["layer0"] + 1))
            tr.train()
            losses = logged(tr, "loss")
            checks.expect(f"{label}: finite losses", all(map(math.isfinite, losses)), str(losses))
        checks.expect("sftmix: backbone forwards per step", counts["sftmix"]["backbone"] == steps,
                      f"{counts['sftmix']['backbone']} backbone forwards in {steps} steps (NTP: "
                      f"{counts['ntp']['backbone']})")
        checks.expect("sftmix: decoder-layer calls = NTP's", counts["sftmix"]["layer0"] == counts["ntp"]["layer0"],
                      f"layer 0 ran {counts['sftmix']['layer0']} times, NTP's {counts['ntp']['layer0']} "
                      f"(activation checkpointing {getattr(tr.model, 'is_activation_checkpointing', '?')})")
    name = f"loss vs full logits {prec}"
    with checks.section(name):
        tr = kit.trainer(0.2, max_steps=1)
        seen = capture_pairs(tr)
        batch = next(iter(tr.get_train_dataloader()))
        batch = {k: v.to(kit.device) for k, v in batch.items()}
        model = tr.model
        model.train()
        tr.current_gradient_accumulation_steps = 1  # set by the training loop before its first step
        labels = batch["labels"]
        n_items = (labels[:, 1:] != -100).sum()
        with tr.accelerator.autocast():
            loss = tr.compute_loss(model, {k: v.clone() for k, v in batch.items()}, num_items_in_batch=n_items)
        pairs, lam = seen[-1]
        conf = batch["confident"].cpu()
        want = torch.stack([torch.nonzero(conf).flatten(), torch.nonzero(~conf).flatten()], dim=1)
        checks.expect(f"{name}: pairs", torch.equal(pairs, want), f"pairs {pairs.tolist()} vs {want.tolist()}")
        fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.no_grad(), tr.accelerator.autocast():
            hidden = tr._causal_lm.base_model(**fwd, use_cache=False).last_hidden_state
        weight = tr._causal_lm.get_output_embeddings().weight.detach()
        with torch.no_grad():
            h64, w64 = hidden.double(), weight.double()
            logits = h64 @ w64.t()  # [B, T, V] fp64: the full logits
            ntp = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                  reduction="sum") / n_items
            mix = naive_mixup_loss(h64, labels, w64, pairs.to(kit.device), lam.to(kit.device).double())
            del logits
        tol = TOLERANCES[name]["loss"]
        mu = tr.args.mixup_weight
        checks.error(f"{name}: step loss", rel(loss.detach(), ntp + mu * mix), tol,
                     f"NTP {ntp.item():.4f} + {mu} x Mixup {mix.item():.4f}")
        checks.error(f"{name}: logged mixup_loss", rel(tr._metrics["train"]["mixup_loss"][-1], mix), tol)
        checks.error(f"{name}: logged ntp_loss", rel(tr._metrics["train"]["ntp_loss"][-1], ntp), tol)


def check_scoring(checks: Checks, kit: TrainerKit) -> None:
    """score_examples (length-sorted, padded batches, TRL's chunked head) vs one unpadded example at a time with fp64
    full logits from the backbone's hidden states."""
    from sftmix.confidence.scoring import score_examples
    from sftmix.data import tokenize_records

    name = "scoring " + ("bf16" if kit.bf16 else "fp32")
    with checks.section(name):
        model = kit.model().eval()
        ds, _ = tokenize_records(kit.records[:24], kit.tok, max_length=kit.max_length, max_dropped_fraction=1.0)
        rows = score_examples(model, ds, batch_size=5, show_progress=False)
        errs, n_bad = [], 0
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if kit.gpu else contextlib.nullcontext())
        w64 = model.get_output_embeddings().weight.detach().double()
        for row, ex in zip(rows, ds):
            ids = torch.tensor([ex["input_ids"]], device=kit.device)
            with torch.no_grad(), autocast:
                h = model.model(input_ids=ids).last_hidden_state[0]
            logp = torch.log_softmax(h.double()[:-1] @ w64.t(), dim=-1)
            y = torch.tensor(ex["labels"][1:], device=kit.device)
            mask = y != -100
            nll = float(-logp[mask].gather(1, y[mask][:, None]).mean())
            n_bad += row["n_tokens"] != int(mask.sum()) or row["guid"] != ex["guid"]
            errs.append(abs(row["nll_mean"] - nll))
        checks.expect(f"{name}: guids and token counts", n_bad == 0 and len(rows) == len(ds),
                      f"{n_bad} of {len(ds)} rows with another guid or token count")
        checks.error(f"{name}: nll_mean", max(errs), TOLERANCES[name]["nll"],
                     f"max over {len(errs)} examples, absolute (nats)")


def check_guard(checks: Checks, kit: TrainerKit) -> None:
    """A NaN Mixup loss at step 2, and an inf gradient (finite loss) at step 2: SFTMixError, weights = step 1's."""
    from transformers import TrainerCallback

    import sftmix.mixup.mixin
    from sftmix.utils import SFTMixError

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.weights = None

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                self.weights = [p.detach().clone() for p in model.parameters()]

    for case in ("NaN Mixup loss", "inf gradient"):
        with checks.section(f"guard: {case}"):
            tr = kit.trainer(0.2, max_steps=4)
            snap = Snapshot()
            tr.add_callback(snap)
            real = sftmix.mixup.mixin.mixup_loss
            calls = []
            if case == "NaN Mixup loss":
                def poisoned(*a, **kw):
                    calls.append(1)
                    value = real(*a, **kw)
                    return value * float("nan") if len(calls) == 2 else value

                sftmix.mixup.mixin.mixup_loss = poisoned
                expected = "non-finite Mixup loss at step 2"
            else:
                head = tr._causal_lm.get_output_embeddings().weight
                head.register_hook(lambda grad: grad * float("inf") if tr.state.global_step == 1 else grad)
                expected = "non-finite gradient at step 2"
            try:
                tr.train()
                err = "no error"
            except SFTMixError as e:
                err = str(e)
            finally:
                sftmix.mixup.mixin.mixup_loss = real
            checks.expect(f"guard: {case}: stopped", expected in err, err[:200])
            same = snap.weights is not None and all(
                torch.equal(p.detach(), q) for p, q in zip(tr.model.parameters(), snap.weights))
            checks.expect(f"guard: {case}: no update", same and tr.state.global_step == 1,
                          f"weights {'equal' if same else 'differ from'} step 1's, global_step {tr.state.global_step}")


def correctness(checks: Checks, device, bf16: bool, quick: bool, log) -> dict:
    info = {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as out_dir:
        log("correctness: mixup_loss vs fp64")
        check_mixup_loss(checks, device, quick)
        kit = TrainerKit(device, bf16, quick, out_dir)
        try:  # whether TRL's fused head takes its Triton kernel here (a private helper of TRL's: informative only)
            from trl.kernels.chunked_logprob import _use_triton

            info["trl_triton_head"] = bool(_use_triton(device))
        except ImportError:
            info["trl_triton_head"] = None
        info["trainer_model"] = kit.shape
        for fn in (check_sft_equivalence, check_one_forward_and_loss, check_scoring, check_guard):
            log(f"correctness: {fn.__name__}")
            fn(checks, kit)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------------------------------------------
# 2. cost at a real shape


def matmul_rate(device, dtype, n: int, reps: int = 10) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product in `dtype`: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    perf.sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    perf.sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def build_variants(name, device, dtype, seq, batch, n_score, max_records, ckpt, steps, out_dir, seed=0):
    """perf.py's (a) ntp and (b) sftmix on one fresh random model and one shared optimizer (sftmix built last: its
    forward wrapper is outermost, as in a standalone SFTMixTrainer)."""
    base, tok, model_desc = perf.load_model(name, device, dtype)
    records, score_ds, data_desc, _ = perf.build_data(perf.ALPACA, tok, seq, batch, n_score, seed, 16, max_records)
    gpu = device.type == "cuda"
    common = dict(per_device_train_batch_size=batch, max_length=seq, activation_checkpointing=ckpt, bf16=gpu,
                  max_steps=steps, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=not gpu,
                  dataloader_num_workers=0, disable_tqdm=True, seed=seed)
    optimizer, variants = None, []
    for v_name in ("ntp", "sftmix"):
        v = perf.make_variant(v_name, base, tok, records, common, out_dir, steps, seed, optimizer)
        optimizer = getattr(v.trainer.optimizer, "optimizer", v.trainer.optimizer)
        variants.append(v)
    return variants, score_ds, model_desc, data_desc


def free_device(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pick_batch(name, device, dtype, seq, ckpt, budget_bytes: float, max_batch: int, max_records: int, out_dir,
               log) -> dict:
    """The batch that fills `budget_bytes`: one step of each variant at batch 4 (the smallest perf.make_variant can
    split into 2 + 2 examples, as the sampler needs) gives the persistent bytes and the step's extra bytes; the extra
    is taken as per-row (it also holds fixed buffers, so this errs small)."""
    variants, *_ = build_variants(name, device, dtype, seq, PROBE_BATCH, 4, max_records, ckpt, 4, out_dir)
    for v in variants:
        perf.train_step(v, device)  # Adam state
    extra = max(perf.step_peak_bytes(v, device) for v in variants)
    static = max(perf.persistent_bytes(v) for v in variants)
    del variants, v
    free_device(device)
    left = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # should be ~0: probe freed
    fit = int((budget_bytes - static) / max(extra / PROBE_BATCH, 1))
    batch = max(PROBE_BATCH, min(max_batch, fit - fit % 2))
    log(f"batch probe: persistent {static / 2**30:.2f} GiB, step extra at batch {PROBE_BATCH} "
        f"{extra / 2**30:.2f} GiB, budget {budget_bytes / 2**30:.1f} GiB -> fits {fit}, batch {batch} "
        f"(cap {max_batch})")
    return {"batch": batch, "probe_batch": PROBE_BATCH, "probe_persistent_bytes": static,
            "probe_step_extra_bytes": extra, "budget_bytes": budget_bytes, "fits": fit, "max_batch": max_batch,
            "allocated_after_probe_bytes": left}


def speed_and_memory(name, device, seq, reps, n_score, max_records, budget_bytes, max_batch, out_dir, log) -> dict:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    ckpt = True
    probe = pick_batch(name, device, dtype, seq, ckpt, budget_bytes, max_batch, max_records, out_dir, log)
    batch = probe["batch"]
    while True:
        try:
            variants, score_ds, model_desc, data_desc = build_variants(name, device, dtype, seq, batch, n_score,
                                                                       max_records, ckpt, reps + 4, out_dir)
            ntp, mix = variants
            for v in variants:  # warm-up (Adam state), then one untimed step each for memory
                perf.train_step(v, device)
            for v in variants:
                v.peak_step_bytes = perf.step_peak_bytes(v, device)
                v.static_bytes = perf.persistent_bytes(v)
            break
        except torch.cuda.OutOfMemoryError:  # (CPU never raises it)
            variants = ntp = mix = v = None
            free_device(device)
            if batch <= PROBE_BATCH:
                raise
            log(f"out of memory at batch {batch}: halving")
            batch = max(PROBE_BATCH, batch // 2 - (batch // 2) % 2)
    B, T = ntp.batch["input_ids"].shape
    if B != batch or tuple(mix.batch["input_ids"].shape) != (B, T):
        raise RuntimeError(f"the variants' batches are {tuple(ntp.batch['input_ids'].shape)} and "
                           f"{tuple(mix.batch['input_ids'].shape)}, not {batch} rows of one length")
    real_tokens, label_tokens, mixed_tokens = perf.batch_token_counts(mix.batch)
    log(f"{name}: batch {B}x{T}, {real_tokens} real / {label_tokens} response / {mixed_tokens} mixed tokens")
    perf.interleaved_timing(variants, reps, device, log)
    scoring = perf.scoring_stats(ntp.trainer.model, score_ds, 16, device)
    paired = [b / a for a, b in zip(ntp.times, mix.times)]
    med = {v.name: statistics.median(v.times) for v in variants}
    peak = {v.name: v.static_bytes + v.peak_step_bytes for v in variants}
    config = ntp.trainer.model.config
    fl = perf.flops_model(config, B, T, label_tokens, mixed_tokens, ckpt, device)
    rate = matmul_rate(device, dtype, 8192 if gpu else 256)
    train_tps = real_tokens / med["sftmix"]
    total_mem = torch.cuda.get_device_properties(device).total_memory if gpu else None
    out = {
        "shape": name, "model": model_desc, "data": data_desc, "batch": B, "seq_len": T, "reps": reps,
        "step_time_ratio": statistics.median(paired),
        "step_time_ratio_of_medians": med["sftmix"] / med["ntp"],
        "paired_ratio_q25_q75": [perf.q(paired, 25), perf.q(paired, 75)],
        "ideal_step_time_ratio_flops": fl["ideal_ratio"],
        "peak_memory_ratio": peak["sftmix"] / peak["ntp"],
        "scoring_vs_training_throughput": scoring["tokens_per_s"] / train_tps,
        "scoring_tokens_per_s": scoring["tokens_per_s"], "training_tokens_per_s": train_tps,
        "ntp_mfu": fl["ntp_step_flops"] / med["ntp"] / rate,
        "matmul_tflops": rate / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
        "ntp_step_tflop": fl["ntp_step_flops"] / 1e12, "mixup_tflop": fl["mixup_flops"] / 1e12,
        "step_time_s": {v.name: {"median": med[v.name], "all": v.times} for v in variants},
        "peak_memory_bytes": peak, "step_extra_bytes": {v.name: v.peak_step_bytes for v in variants},
        "device_memory_bytes": total_mem,
        "peak_memory_fraction_of_device": peak["sftmix"] / total_mem if total_mem else None,
        "memory_method": ("torch.cuda.max_memory_allocated over one step + weights/buffers/optimizer state" if gpu else
                          "torch.profiler memory events over one step (tensor bytes, not RSS) + weights/buffers/"
                          "optimizer state"),
        "gradient_checkpointing": bool(ntp.trainer.model.is_activation_checkpointing),
        "tokens": {"real": real_tokens, "response": label_tokens, "mixed": mixed_tokens},
        "batch_probe": probe,
    }
    del variants, ntp, mix, v
    free_device(device)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. end to end


def end_to_end(checks: Checks, device, out_dir: str, timeout: int, log) -> dict:
    """`sftmix run --config configs/smoke.yaml` on the device in a subprocess; checks its outputs."""
    run_dir = os.path.join(out_dir, "smoke")
    dev = "cuda" if device.type == "cuda" else "cpu"
    cmd = [sys.executable, "-m", "sftmix", "run", "--config", os.path.join(ROOT, "configs", "smoke.yaml"),
           "--output_dir", run_dir, "--device", dev]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log("end to end: " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    checks.expect("e2e: exit status 0", proc.returncode == 0, f"exit {proc.returncode}: {last}")
    want = "(torch.bfloat16, cuda" if dev == "cuda" else "(torch.float32, cpu)"
    loads = [line for line in text.splitlines() if line.startswith("loaded model ")]
    checks.expect("e2e: models placed on the device", loads and all(want in line for line in loads),
                  f"{len(loads)} 'loaded model' lines, expected each with {want!r}: {loads[:1]}")
    report = os.path.join(run_dir, "report.json")
    ok_report = os.path.exists(report)
    checks.expect("e2e: report.json", ok_report, report)
    if ok_report:
        models = json.load(open(report)).get("models", {})
        nll = {k: models.get(k, {}).get("eval", {}).get("heldout", {}).get("nll") for k in ("start", "sftmix", "ntp")}
        checks.expect("e2e: report has finite held-out NLL per model",
                      all(isinstance(x, float) and math.isfinite(x) for x in nll.values()), str(nll))
    dtype = "bfloat16" if dev == "cuda" else "float32"
    for recipe in ("sftmix", "ntp"):
        mdir = os.path.join(run_dir, recipe, "model")
        cfg_path = os.path.join(mdir, "config.json")
        has = os.path.exists(cfg_path) and os.path.exists(os.path.join(mdir, "model.safetensors"))
        saved = None
        if os.path.exists(cfg_path):
            saved_cfg = json.load(open(cfg_path))
            saved = saved_cfg.get("dtype") or saved_cfg.get("torch_dtype")  # the key's name before transformers 4.56
        checks.expect(f"e2e: {recipe} model saved", has and saved == dtype, f"{mdir}: files {has}, dtype {saved}")
    ckpts = glob.glob(os.path.join(run_dir, "reference", "checkpoint-*", "trainer_state.json"))
    checks.expect("e2e: reference checkpoints", len(ckpts) >= 1, f"{len(ckpts)} complete checkpoints")
    result_path = os.path.join(run_dir, "sftmix", "train_result.json")
    if os.path.exists(result_path):
        res = json.load(open(result_path))
        mixes = [h["mixup_loss"] for h in res.get("log_history", []) if "mixup_loss" in h]
        checks.expect("e2e: sftmix trained with Mixup", res.get("mixup_enabled") and mixes and
                      all(map(math.isfinite, mixes)), f"{len(mixes)} logged Mixup losses")
    else:
        checks.expect("e2e: sftmix trained with Mixup", False, f"{result_path} missing")
    return {"seconds": seconds, "exit": proc.returncode, "command": "sftmix " + " ".join(cmd[3:])}


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU test: under 2 minutes)")
    ap.add_argument("--bf16", action="store_true", help="on CPU: bf16 weights in the trainer checks (CUDA: always)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: correct, speed, e2e")
    ap.add_argument("--seq", type=int, default=None, help="sequence length of the cost part (default 2048; quick 128)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved timed steps per variant (default 10; quick 3)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="cap of the probed batch (default 64, for the time budget; quick 4)")
    ap.add_argument("--memory-fraction", type=float, default=0.8,
                    help="share of the device's memory the probed batch may fill (CPU: of --cpu-memory-gib)")
    ap.add_argument("--cpu-memory-gib", type=float, default=2.0, help="CPU memory budget for the batch probe")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="seconds: the optional 8B-layer cost run (last) starts only if the time used so far plus 1.5x "
                         "the 1B run's time fits in this")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default as benchmarks/perf.py: 1 on CPU with --quick or a busy machine)")
    ap.add_argument("--inject-fault", choices=FAULTS, default=None,
                    help="break the checks on purpose (mixup: mixup_loss 10%% too large; tolerance: all tolerances 0)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = ap.parse_args(argv)

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available here; use --device cpu")
    perf.set_threads(a.threads, device, quick=a.quick)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - {"correct", "speed", "e2e"}:
        ap.error(f"--skip takes correct, speed, e2e; got {a.skip!r}")
    quick = a.quick
    seq = a.seq or (128 if quick else 2048)
    reps = a.reps or (3 if quick else 10)
    max_batch = a.max_batch or (4 if quick else 64)
    bf16 = gpu or a.bf16
    t_start = time.perf_counter()
    log = lambda *x: print(f"[gpu_check {time.perf_counter() - t_start:5.0f}s]", *x, file=sys.stderr,  # noqa: E731
                           flush=True)
    tol_scale = inject_fault(a.inject_fault)
    checks = Checks(tol_scale)
    result = {"device": (f"cuda ({torch.cuda.get_device_name(device)})" if gpu else
                         f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads)"),
              "torch": torch.__version__, "quick": quick, "inject_fault": a.inject_fault}
    from importlib.metadata import PackageNotFoundError, version

    result["versions"] = {}
    for pkg in ("transformers", "trl", "accelerate", "peft", "datasets", "pyarrow", "fsspec", "dill", "multiprocess",
                "triton"):
        with contextlib.suppress(PackageNotFoundError):
            result["versions"][pkg] = version(pkg)

    from transformers import TrainingArguments

    # benchmarks/perf.py (the cost part) sets TrainingArguments.activation_checkpointing, which transformers 5.17 lacks
    checks.expect("environment: transformers has activation_checkpointing",
                  "activation_checkpointing" in TrainingArguments.__dataclass_fields__,
                  f"transformers {result['versions'].get('transformers')} has no TrainingArguments."
                  "activation_checkpointing: carry transformers==5.24.0 (see the module docstring)")
    speed = {}
    # the Trainer prints its logs to stdout: keep stdout for the table and the JSON line
    with tempfile.TemporaryDirectory() as out_dir, contextlib.redirect_stdout(sys.stderr):
        if "correct" not in skip:
            with checks.section("correctness"):
                result["correctness_info"] = correctness(checks, device, bf16, quick, log)
        budget = a.memory_fraction * (torch.cuda.get_device_properties(device).total_memory if gpu else
                                      a.cpu_memory_gib * 2**30)

        def cost(shape):
            log(f"cost: {shape}")
            t0 = time.perf_counter()
            with checks.section(f"cost {shape}"):
                speed[shape] = speed_and_memory(shape, device, seq, reps, 2048 if gpu else 32, 2500 if gpu else 400,
                                                budget, max_batch, out_dir, log)
            return time.perf_counter() - t0

        first_s = cost("tiny" if quick else "llama-1b") if "speed" not in skip else 0.0
        if "e2e" not in skip:
            with checks.section("end to end"):
                result["e2e"] = end_to_end(checks, device, out_dir, 300, log)
        if "speed" not in skip and not quick:  # optional: only while the time budget leaves room for it
            elapsed = time.perf_counter() - t_start
            if elapsed + 1.5 * first_s > a.budget_s:
                log(f"skipping llama-8b-layers: {elapsed:.0f}s used, the 1B part took {first_s:.0f}s, budget "
                    f"{a.budget_s:.0f}s")
                speed["llama-8b-layers"] = {"skipped": f"time budget ({elapsed:.0f}s used of {a.budget_s:.0f}s)"}
            else:
                cost("llama-8b-layers")

    main_speed = speed.get(("tiny" if quick else "llama-1b"), {})
    result.update({
        "correct": not checks.failures,
        "failures": checks.failures,
        "step_time_ratio": main_speed.get("step_time_ratio"),
        "peak_memory_ratio": main_speed.get("peak_memory_ratio"),
        "scoring_vs_training_throughput": main_speed.get("scoring_vs_training_throughput"),
        "ideal_step_time_ratio_flops": main_speed.get("ideal_step_time_ratio_flops"),
        "ntp_mfu": main_speed.get("ntp_mfu") if gpu else None,
        # the targets at the real shape (not part of "correct"; the tiny CPU shape says nothing about them)
        "targets_met": None if quick or "step_time_ratio" not in main_speed else {
            f"step_time_ratio <= {TARGETS['step_time_ratio']}":
                main_speed["step_time_ratio"] <= TARGETS["step_time_ratio"],
            f"peak_memory_ratio <= {TARGETS['peak_memory_ratio']}":
                main_speed["peak_memory_ratio"] <= TARGETS["peak_memory_ratio"]},
        "speed": speed,
        "checks": checks.rows,
        "tolerances": {k: {kk: vv * tol_scale for kk, vv in v.items()} for k, v in TOLERANCES.items()},
        "wall_s": time.perf_counter() - t_start,
    })

    # ---- the short table
    print(f"\nSFTMix device check ({time.strftime('%Y-%m-%d %H:%M')}, {result['device']}, torch {torch.__version__})")
    print(f"{'check':<58} {'error':>10} {'tolerance':>10}  ok")
    for r in checks.rows:
        err = "" if r["error"] is None else f"{r['error']:.2e}"
        tol = "" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
        print(f"{r['check'][:58]:<58} {err:>10} {tol:>10}  {'yes' if r['ok'] else 'NO: ' + r['note'][:60]}")
    for shape, s in speed.items():
        if "skipped" in s:
            print(f"cost {shape}: skipped ({s['skipped']})")
            continue
        mfu = f", NTP MFU {100 * s['ntp_mfu']:.0f}% of {s['matmul_tflops']:.0f} TFLOP/s" if gpu else ""
        frac = s["peak_memory_fraction_of_device"]
        print(f"cost {shape} (batch {s['batch']} x {s['seq_len']}, {s['reps']} reps): step time x"
              f"{s['step_time_ratio']:.3f} (ideal from FLOPs {s['ideal_step_time_ratio_flops']:.4f}), peak memory x"
              f"{s['peak_memory_ratio']:.3f}" + (f" ({100 * frac:.0f}% of the device)" if frac else "") +
              f", scoring/training {s['scoring_vs_training_throughput']:.2f}x{mfu}")
    if result["targets_met"]:
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items()))
    if "e2e" in result:
        print(f"end to end: {result['e2e']['command']}: exit {result['e2e']['exit']}, {result['e2e']['seconds']:.0f}s")
    print(f"correct: {result['correct']} ({len(checks.failures)} failures); wall {result['wall_s']:.0f}s")
    assert all(k in result for k in RESULT_KEYS)
    if a.out:
        from sftmix.utils import atomic_write_json

        atomic_write_json(a.out, result)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("gpu_check"):
        sys.exit(0 if main()["correct"] else 1)
