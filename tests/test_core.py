"""The trainer-agnostic core (sftmix.mixup.mixin) under both trainers it serves: SFTMixTrainer (trl.SFTTrainer + core)
and SFTMixHFTrainer (transformers.Trainer + core, the model's own NTP loss). The same correctness checks run for each:
Mixup equals an independent computation, one backbone pass per micro-batch, gradient accumulation equals one big
batch, the non-finite guard stops before the update; and the two trainers give the same Mixup loss on one batch."""

import numpy as np
import pytest
import torch
from helpers import capture_pairs, naive_mixup_loss, tiny_dataset, tiny_records
from transformers import Trainer, TrainingArguments

import sftmix.mixup.mixin
from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.data import tokenize_records
from sftmix.mixup.hf import SFTMixHFTrainer, SFTMixTrainingArguments
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError

COMMON = dict(report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, bf16=False,
              gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
KINDS = ["trl", "hf"]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def hf_dataset(tok, n=32):
    """The rows of tiny_dataset(n), tokenized as TRL does (input_ids, labels, guid, confidence), for plain Trainers."""
    return tokenize_records(tiny_records(n), tok)[0]


def make(kind, tok, tmp_path, n=32, model_seed=0, **kw):
    args = {**COMMON, "output_dir": str(tmp_path / "out"), **kw}
    if kind == "trl":
        return SFTMixTrainer(model=build_tiny_model(tok, seed=model_seed), args=SFTMixConfig(**args),
                             processing_class=tok, train_dataset=tiny_dataset(n))
    return SFTMixHFTrainer(model=build_tiny_model(tok, seed=model_seed), args=SFTMixTrainingArguments(**args),
                           processing_class=tok, train_dataset=hf_dataset(tok, n))


def losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_matches_independent_computation(tok, tmp_path, kind):
    """The trainer's Mixup term equals naive_mixup_loss on hidden states from a separate forward of the same batch,
    and every pair is (confident row, unconfident row)."""
    tr = make(kind, tok, tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0)
    seen = capture_pairs(tr)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.train()
    tr.compute_loss(tr.model, {k: v.clone() for k, v in batch.items()})
    pairs, lam = seen[-1]
    logged = tr._metrics["train"]["mixup_loss"][-1]
    with torch.no_grad():
        hidden = tr.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = naive_mixup_loss(hidden, batch["labels"], tr.model.lm_head.weight, pairs, lam)
    assert logged == pytest.approx(ref.item(), rel=1e-5)
    flags = np.array(tr.train_dataset["confident"])
    c, u = batch["example_idx"][pairs[:, 0]], batch["example_idx"][pairs[:, 1]]
    assert flags[c].all() and not flags[u].any()
    assert batch["confident"].sum().item() == 2


@pytest.mark.parametrize("kind", KINDS)
def test_one_backbone_pass_per_micro_batch(tok, tmp_path, kind):
    """Training runs the transformer once per micro-batch: the Mixup term reuses the NTP forward's hidden states."""
    tr = make(kind, tok, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3)
    calls = []
    tr.model.model.register_forward_hook(lambda *a: calls.append(1))
    tr.model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    tr.train()
    assert calls.count(1) == 3 * 2
    assert len(losses(tr, "mixup_loss")) == 3 and all(np.isfinite(losses(tr, "mixup_loss")))
    # TRL's fused head reads the weight directly; the model's own loss calls the head once per micro-batch
    assert calls.count("head") == (0 if kind == "trl" else 3 * 2)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_equals_one_big_batch(tok, tmp_path, kind):
    big = make(kind, tok, tmp_path / "a", per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2)
    big.train()
    acc = make(kind, tok, tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
               learning_rate=1e-2)
    acc.train()
    np.testing.assert_allclose(losses(big), losses(acc), rtol=1e-5)
    np.testing.assert_allclose(losses(big, "ntp_loss"), losses(acc, "ntp_loss"), rtol=1e-5)
    np.testing.assert_allclose(losses(big, "mixup_loss"), losses(acc, "mixup_loss"), rtol=1e-5)
    for h in big.state.log_history[:-1]:  # logged loss = NTP + mu * Mixup
        assert h["loss"] == pytest.approx(h["ntp_loss"] + 0.2 * h["mixup_loss"], rel=1e-5)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)  # Adam amplifies fp noise in tiny grads


@pytest.mark.parametrize("kind", KINDS)
def test_nan_mixup_loss_stops_before_the_update(tok, tmp_path, monkeypatch, kind):
    real, calls = sftmix.mixup.loss.mixup_loss, []

    def poisoned(*a, **kw):  # the Mixup loss of the 3rd micro-batch (= step 3) is NaN
        calls.append(1)
        value = real(*a, **kw)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(sftmix.mixup.mixin, "mixup_loss", poisoned)  # where both trainers look it up
    tr = make(kind, tok, tmp_path, n=24, per_device_train_batch_size=4, max_steps=6)
    before = {}

    def snapshot(module, args):  # the weights as step 3 starts
        if tr.state.global_step == 2 and not before:
            before.update({n: p.detach().clone() for n, p in tr.model.named_parameters()})

    tr.model.model.register_forward_pre_hook(snapshot)
    with pytest.raises(SFTMixError, match="non-finite Mixup loss at step 3") as e:
        tr.train()
    assert "guids on this process: g00" in str(e.value) and "\n" not in str(e.value)
    assert tr.state.global_step == 2
    for n, p in tr.model.named_parameters():  # the bad step was not applied
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_ntp_loss_and_nan_gradient_stop_training(tok, tmp_path, kind):
    tr = make(kind, tok, tmp_path / "ntp", n=24, per_device_train_batch_size=4, max_steps=6)
    tr.model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: out * float("nan") if tr.state.global_step == 3 else out)
    with pytest.raises(SFTMixError, match=r"non-finite NTP and Mixup loss at step 4"):
        tr.train()
    tr = make(kind, tok, tmp_path / "grad", n=24, per_device_train_batch_size=4, max_steps=6)
    tr.model.lm_head.weight.register_hook(lambda g: g * float("inf") if tr.state.global_step == 1 else g)
    with pytest.raises(SFTMixError, match=r"non-finite gradient at step 2 \(gradient norm (nan|inf)"):
        tr.train()
    assert tr.state.global_step == 1


def test_hf_trainer_mixup_equals_sftmix_trainer_on_the_same_batch(tok, tmp_path):
    """transformers.Trainer + core and SFTMixTrainer, same weights: the same first batch, pairs and lam, and the same
    Mixup loss (tolerance 1e-6 relative; both read the hidden states of the same backbone on the same inputs) and NTP
    loss (1e-5: the model's cross-entropy vs TRL's fused head)."""
    trl_tr = make("trl", tok, tmp_path / "trl", per_device_train_batch_size=8, max_steps=1, learning_rate=0.0)
    hf_tr = make("hf", tok, tmp_path / "hf", per_device_train_batch_size=8, max_steps=1, learning_rate=0.0)
    batches = [next(iter(t.get_train_dataloader())) for t in (trl_tr, hf_tr)]
    assert batches[0].keys() == batches[1].keys()
    for k in batches[0]:
        assert torch.equal(batches[0][k], batches[1][k]), k
    out = []
    for t in (trl_tr, hf_tr):
        seen = capture_pairs(t)
        t.model.train()
        loss = t.compute_loss(t.model, {k: v.clone() for k, v in batches[0].items()})
        out.append((loss.item(), t._metrics["train"]["ntp_loss"][-1], t._metrics["train"]["mixup_loss"][-1],
                    seen[-1]))
    (loss_a, ntp_a, mix_a, (pairs_a, lam_a)), (loss_b, ntp_b, mix_b, (pairs_b, lam_b)) = out
    assert torch.equal(pairs_a, pairs_b) and torch.equal(lam_a, lam_b)
    assert mix_b == pytest.approx(mix_a, rel=1e-6)
    assert ntp_b == pytest.approx(ntp_a, rel=1e-5) and loss_b == pytest.approx(loss_a, rel=1e-5)
    # and through training: two steps, the same logged losses
    trl_tr = make("trl", tok, tmp_path / "trl2", per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2)
    hf_tr = make("hf", tok, tmp_path / "hf2", per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2)
    trl_tr.train()
    hf_tr.train()
    np.testing.assert_allclose(losses(hf_tr, "mixup_loss"), losses(trl_tr, "mixup_loss"), rtol=1e-5)
    np.testing.assert_allclose(losses(hf_tr, "ntp_loss"), losses(trl_tr, "ntp_loss"), rtol=1e-5)


def test_hf_trainer_mixup_weight_zero_is_transformers_trainer(tok, tmp_path):
    """With Mixup off SFTMixHFTrainer is transformers.Trainer: same sampler, same losses, same weights."""
    ds = hf_dataset(tok, 24)
    kw = dict(per_device_train_batch_size=4, max_steps=4, gradient_accumulation_steps=2)
    ours = make("hf", tok, tmp_path / "a", n=24, mixup_weight=0.0, **kw)
    ours.train()
    from transformers import DataCollatorForSeq2Seq

    ref = Trainer(model=build_tiny_model(tok), args=TrainingArguments(output_dir=str(tmp_path / "b"), **COMMON, **kw),
                  train_dataset=ds.remove_columns(["guid", "confidence", "n_response_tokens"]), processing_class=tok,
                  data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    ref.train()
    assert len(losses(ours)) == 4
    np.testing.assert_allclose(losses(ours), losses(ref), rtol=1e-6)
    np.testing.assert_allclose(losses(ours, "ntp_loss"), losses(ref), rtol=1e-5)
    for p, q in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q)


def test_hf_trainer_errors(tok, tmp_path):
    with pytest.raises(SFTMixError, match="neither a boolean `confident`"):
        SFTMixHFTrainer(model=build_tiny_model(tok), processing_class=tok,
                        args=SFTMixTrainingArguments(output_dir=str(tmp_path), **{**COMMON, "report_to": []}),
                        train_dataset=hf_dataset(tok, 8).remove_columns("confidence"))
    with pytest.raises(SFTMixError, match="odd"):
        make("hf", tok, tmp_path, per_device_train_batch_size=3)
    with pytest.raises(SFTMixError, match="mixup_role"):
        SFTMixTrainingArguments(output_dir=str(tmp_path), mixup_role="sometimes")
    with pytest.raises(SFTMixError, match="SFTMixTrainingArguments"):
        SFTMixHFTrainer(model=build_tiny_model(tok), args=TrainingArguments(output_dir=str(tmp_path)),
                        train_dataset=hf_dataset(tok, 8), processing_class=tok)


def test_core_imports_no_trl():
    import subprocess
    import sys

    code = "import sys, sftmix.mixup.mixin; assert 'trl' not in sys.modules, 'sftmix.mixup.mixin imported trl'"
    subprocess.run([sys.executable, "-c", code], check=True)


class ChunkedNTPTrainer(Trainer):
    """A Trainer with its own NTP loss: the backbone, then a cross-entropy over the label positions only, in chunks
    (no [B, T, V] logits), as memory-saving trainers do."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        hidden = model.model(**inputs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        h, y = hidden[keep], targets[keep]
        total = sum(torch.nn.functional.cross_entropy(h[s:s + 16] @ model.lm_head.weight.t(), y[s:s + 16],
                                                      reduction="sum") for s in range(0, len(y), 16))
        loss = total / (num_items_in_batch if num_items_in_batch is not None else len(y))
        return (loss, None) if return_outputs else loss


class SFTMixChunkedTrainer(sftmix.mixup.mixin.SFTMixMixin, ChunkedNTPTrainer):
    def __init__(self, *a, args=None, train_dataset=None, **kw):
        train_dataset, _ = sftmix.mixup.mixin.prepare_train_dataset(train_dataset, args)
        super().__init__(*a, args=args, train_dataset=train_dataset, **kw)
        self.setup_sftmix()


def test_any_trainer_with_its_own_chunked_ntp_loss(tok, tmp_path):
    """SFTMixMixin on a Trainer whose NTP loss is a chunked cross-entropy over label positions: the same Mixup and NTP
    loss as SFTMixHFTrainer (the model's own loss) on the same batch, one backbone pass, and it trains."""
    from transformers import DataCollatorForSeq2Seq

    args = SFTMixTrainingArguments(output_dir=str(tmp_path / "c"), **{**COMMON, "per_device_train_batch_size": 4,
                                                                        "max_steps": 2})
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    ours = SFTMixChunkedTrainer(model=build_tiny_model(tok), args=args, train_dataset=hf_dataset(tok, 16),
                                processing_class=tok, data_collator=collator)
    ref = make("hf", tok, tmp_path / "h", n=16, per_device_train_batch_size=4, max_steps=2)
    batch = next(iter(ref.get_train_dataloader()))
    for t in (ours, ref):
        t.model.train()
        t.compute_loss(t.model, {k: v.clone() for k, v in batch.items()})
    for key, rel in (("mixup_loss", 1e-6), ("ntp_loss", 1e-5)):
        assert ours._metrics["train"][key][-1] == pytest.approx(ref._metrics["train"][key][-1], rel=rel)
    calls = []
    ours.model.model.register_forward_hook(lambda *a: calls.append(1))
    ours.train()
    assert calls == [1, 1] and len(losses(ours, "mixup_loss")) == 2
