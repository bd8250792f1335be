"""Numerics of training: a non-finite loss or gradient stops the run before the update and keeps the last good
checkpoint; under bf16 autocast the Mixup loss stays close to fp32."""

import math
import os

import numpy as np
import pytest
import torch
from helpers import tiny_dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import sftmix.mixup.mixin
from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError

COMMON = dict(report_to=[], logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, seed=0,
              gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=4)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def make(tok, tmp_path, **kw):
    args = SFTMixConfig(output_dir=str(tmp_path / "out"), **{**COMMON, "save_strategy": "steps", "save_steps": 1,
                                                             "max_steps": 6, **kw})
    return SFTMixTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, train_dataset=tiny_dataset(24))


def assert_stopped_at(tr, tmp_path, step, err):
    """Stopped at `step`: checkpoints up to step-1 exist, the last one is finite and equals the weights in memory (so
    the bad update was not applied), and the message names the checkpoint and the learning rate."""
    out = tmp_path / "out"
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, step)), saved
    last = out / f"checkpoint-{step - 1}"
    assert f"step {step} " in err and str(last) in err and "is intact" in err and "lr=" in err
    reloaded = AutoModelForCausalLM.from_pretrained(last)
    for (name, p), q in zip(tr.model.named_parameters(), reloaded.parameters()):
        assert torch.isfinite(q).all(), name
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert "\n" not in err  # one line for the CLI


def test_nan_mixup_loss_stops_before_the_update(tok, tmp_path, monkeypatch):
    calls = []

    def poisoned(*a, **kw):  # the Mixup loss of the 3rd micro-batch (= step 3) is NaN
        calls.append(1)
        value = sftmix.mixup.loss.mixup_loss(*a, **kw)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(sftmix.mixup.mixin, "mixup_loss", poisoned)
    tr = make(tok, tmp_path)
    with pytest.raises(SFTMixError, match="non-finite Mixup loss at step 3") as e:
        tr.train()
    assert "guids on this process: g00" in str(e.value)  # the batch to look at
    assert_stopped_at(tr, tmp_path, 3, str(e.value))


def test_nan_ntp_loss_stops_plain_ntp_too(tok, tmp_path):
    tr = make(tok, tmp_path, mixup_weight=0.0)  # the NTP baseline is guarded as well

    def nan_hidden(module, args, output):  # NaN from the embeddings on at step 4: the NTP loss becomes NaN
        return output * float("nan") if tr.state.global_step == 3 else output

    tr.model.model.embed_tokens.register_forward_hook(nan_hidden)
    with pytest.raises(SFTMixError, match=r"non-finite NTP loss at step 4 \(NTP loss \[nan\]") as e:
        tr.train()
    assert_stopped_at(tr, tmp_path, 4, str(e.value))


def test_nan_gradient_with_finite_loss_stops_before_the_update(tok, tmp_path):
    tr = make(tok, tmp_path)
    head = tr.model.lm_head.weight
    head.register_hook(lambda g: g * float("inf") if tr.state.global_step == 1 else g)  # step 2's backward
    with pytest.raises(SFTMixError, match=r"non-finite gradient at step 2 \(gradient norm (nan|inf)") as e:
        tr.train()
    assert_stopped_at(tr, tmp_path, 2, str(e.value))


def test_nan_weights_are_never_saved(tok, tmp_path):
    class Poison(TrainerCallback):  # NaN weights after step 3's update, before its checkpoint
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                with torch.no_grad():
                    model.model.norm.weight[0] = float("nan")

    tr = make(tok, tmp_path, max_steps=4)
    tr.add_callback(Poison())
    with pytest.raises(SFTMixError, match="non-finite weights at step 4 .*the last checkpoint, .*checkpoint-2, is"):
        tr.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_fp16_hint(tok, tmp_path):
    tr = make(tok, tmp_path)
    object.__setattr__(tr.args, "fp16", True)  # fp16 needs a GPU; only the message is checked here
    msg = tr._nonfinite_message("NTP loss", "NTP loss [inf]")
    assert "fp16 overflow" in msg and "bf16" in msg and "no checkpoint was saved" in msg


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_bf16_training_step_mixup_loss_close_to_fp32(tok, tmp_path, monkeypatch, weights):
    """One step on CPU with bf16=True against fp32: same initial weights, batch, pairs and lam.

    weights=fp32: mixed precision (the Trainer's bf16 autocast around the forward): the backbone's matmuls run in bf16,
    the Mixup loss reads fp32 hidden states and head. weights=bf16: the model itself in bf16 (as loaded with
    dtype=bfloat16): bf16 hidden states and head; mixup_loss mixes them in fp32, projects in bf16 and runs the
    softmax/cross-entropy in fp32. Either way the Mixup loss comes out fp32 and close to the fp32 run. Tolerance: 1e-3
    relative; observed 1.4e-6 (autocast) and 8.8e-6 (bf16 weights) on this model (loss ~5.6). A bf16 cross-entropy
    would round each token's loss to a step of 2**-5 at this magnitude (up to 0.3%). The NTP loss must differ from the
    fp32 run's, else bf16 was not in effect and the comparison says nothing.
    """
    seen = []

    def spy(hidden, labels, weight, pairs, lam, chunk=None):
        out = sftmix.mixup.loss.mixup_loss(hidden, labels, weight, pairs, lam, chunk)
        seen.append((hidden.dtype, weight.dtype, out.dtype))
        return out

    monkeypatch.setattr(sftmix.mixup.mixin, "mixup_loss", spy)
    logs = {}
    for bf16 in (False, True):
        tr = make(tok, tmp_path / str(bf16), bf16=bf16, save_strategy="no", max_steps=1, learning_rate=0.0)
        if bf16 and weights == "bf16":
            tr.model.to(torch.bfloat16)
        tr.train()
        logs[bf16] = next(h for h in tr.state.log_history if "mixup_loss" in h)
    low = torch.bfloat16 if weights == "bf16" else torch.float32
    assert seen == [(torch.float32, torch.float32, torch.float32), (low, low, torch.float32)]
    mix32, mix16 = logs[False]["mixup_loss"], logs[True]["mixup_loss"]
    assert math.isfinite(mix16) and mix16 == pytest.approx(mix32, rel=1e-3)
    assert logs[True]["ntp_loss"] != logs[False]["ntp_loss"]  # bf16 was in effect
    assert logs[True]["ntp_loss"] == pytest.approx(logs[False]["ntp_loss"], rel=1e-2)


def test_logged_ntp_loss_is_the_ntp_part_of_the_loss_with_accumulation(tok, tmp_path):
    """ntp_loss is the token mean of the whole accumulated batch (the NTP part of `loss`), not a mean of per-micro-batch
    means, so loss = ntp_loss + mu * mixup_loss holds step by step also with gradient accumulation."""
    tr = make(tok, tmp_path, save_strategy="no", max_steps=3, gradient_accumulation_steps=3,
              per_device_train_batch_size=2)
    tr.train()
    steps = [h for h in tr.state.log_history if "mixup_loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert h["loss"] == pytest.approx(h["ntp_loss"] + 0.2 * h["mixup_loss"], rel=1e-6)
    assert np.isfinite([h["ntp_loss"] for h in steps]).all() and os.path.isdir(tmp_path / "out")
