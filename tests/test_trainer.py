"""SFTMixTrainer on a tiny random Llama: balance, pairing, equivalence with SFTTrainer, accumulation, LoRA, errors."""

import numpy as np
import pytest
import torch
from helpers import capture_pairs, naive_mixup_loss, tiny_dataset
from trl import SFTConfig, SFTTrainer

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.confidence.split import median_split
from sftmix.mixup.sampling import BalancedPairSampler
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError

COMMON = dict(report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3, bf16=False,
              gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def make_trainer(tok, tmp_path, dataset=None, model_seed=0, cls=SFTMixTrainer, **kw):
    cfg_cls = SFTMixConfig if cls is SFTMixTrainer else SFTConfig
    args = cfg_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})
    return cls(model=build_tiny_model(tok, seed=model_seed), args=args, processing_class=tok,
               train_dataset=dataset if dataset is not None else tiny_dataset(32))


def losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_every_batch_balanced_and_every_pair_confident_x_unconfident(tok, tmp_path):
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=6, max_steps=3)
    seen_pairs = capture_pairs(tr)
    flags = np.array(tr.train_dataset["confident"])
    assert flags.sum() == 16 and (~flags).sum() == 16
    dl = tr.get_train_dataloader()
    seen = set()
    for batch in dl:
        conf = batch["confident"]
        assert conf.sum().item() == (~conf).sum().item() == 3
        seen.update(batch["example_idx"].tolist())
    assert seen == set(range(32))  # nothing left out of an epoch
    tr.train()
    pairs, lam = seen_pairs[-1]
    assert pairs.shape == (3, 2) and lam.shape == (3,)
    # pairs are rows of the last micro-batch: column 0 confident rows, column 1 unconfident rows
    assert ((lam > 0) & (lam < 1)).all()


def test_sampler_pairs_deterministic_and_epoch_dependent():
    conf = median_split(np.random.default_rng(0).random(21))
    s1, s2 = BalancedPairSampler(conf, 4, seed=3), BalancedPairSampler(conf, 4, seed=3)
    assert list(s1) == list(s2)
    assert s1.num_pairs == 12 and len(s1) == 24  # 11 unconfident rounded up to whole batches of 2 pairs
    c, u = s1.epoch_pairs(0)
    assert conf[c].all() and not conf[u].any()
    assert set(np.flatnonzero(conf)) <= set(c.tolist()) and set(np.flatnonzero(~conf)) <= set(u.tolist())
    s1.set_epoch(1)
    assert list(s1) != list(s2)


def test_median_split_rules():
    conf = median_split([0.1, 0.5, 0.3, 0.9, 0.7])
    assert conf.tolist() == [False, False, False, True, True]  # odd N: the median goes to the unconfident half
    a = median_split([1.0, 1.0, 2.0, 0.0], guids=["d", "a", "c", "b"])
    b = median_split([1.0, 2.0, 0.0, 1.0], guids=["a", "c", "b", "d"])  # same examples, shuffled
    assert a.tolist() == [False, True, True, False] and b.tolist() == [True, True, False, False]
    with pytest.raises(SFTMixError, match="same confidence"):
        median_split([2.0, 2.0, 2.0])


def test_mixup_weight_zero_is_sftt_trainer_step_by_step(tok, tmp_path):
    ds = tiny_dataset(24)
    kw = dict(per_device_train_batch_size=4, max_steps=5, gradient_accumulation_steps=2)
    ours = make_trainer(tok, tmp_path / "a", ds, mixup_weight=0.0, **kw)
    ours.train()
    ref = make_trainer(tok, tmp_path / "b", ds, cls=SFTTrainer, **kw)
    ref.train()
    assert len(losses(ours)) == 5
    np.testing.assert_allclose(losses(ours), losses(ref), rtol=1e-6)
    for p, q in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q)


def test_training_changes_parameters_and_lowers_loss(tok, tmp_path):
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=8, num_train_epochs=6, learning_rate=3e-3)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    ntp, mix = losses(tr, "ntp_loss"), losses(tr, "mixup_loss")
    assert len(mix) == len(ntp) == 24
    assert np.mean(ntp[-4:]) < np.mean(ntp[:4]) - 1.0
    assert np.mean(mix[-4:]) < np.mean(mix[:4]) - 1.0
    total = losses(tr)
    # logged loss = NTP + mu * Mixup
    np.testing.assert_allclose(total, np.array(ntp) + 0.2 * np.array(mix), rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tok, tmp_path):
    ds = tiny_dataset(32)
    big = make_trainer(tok, tmp_path / "a", ds, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2)
    big.train()
    acc = make_trainer(tok, tmp_path / "b", ds, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       max_steps=2, learning_rate=1e-2)
    acc.train()
    np.testing.assert_allclose(losses(big), losses(acc), rtol=1e-5)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)  # Adam amplifies fp noise in tiny grads


def test_same_seed_same_pairs_lam_and_losses(tok, tmp_path):
    runs = []
    for name in ("a", "b"):
        tr = make_trainer(tok, tmp_path / name, per_device_train_batch_size=4, max_steps=3)
        seen = capture_pairs(tr)
        tr.train()
        runs.append((losses(tr), seen[-1]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1][0], runs[1][1][0]) and torch.equal(runs[0][1][1], runs[1][1][1])


def test_lora_via_peft_config(tok, tmp_path):
    from peft import LoraConfig

    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=4, max_steps=3,
                      **{})
    args = tr.args
    lora = SFTMixTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, train_dataset=tiny_dataset(16),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    frozen = {n: p.detach().clone() for n, p in lora.model.named_parameters() if not p.requires_grad}
    lora.train()
    mix = losses(lora, "mixup_loss")
    assert len(mix) == 3 and all(np.isfinite(mix))
    changed = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert changed and all("lora" in n for n in changed)
    for n, p in lora.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_gradient_checkpointing_same_losses(tok, tmp_path):
    ds = tiny_dataset(16)
    a = make_trainer(tok, tmp_path / "a", ds, per_device_train_batch_size=4, max_steps=3)
    a.train()
    b = make_trainer(tok, tmp_path / "b", ds, per_device_train_batch_size=4, max_steps=3, gradient_checkpointing=True)
    b.train()
    np.testing.assert_allclose(losses(a, "mixup_loss"), losses(b, "mixup_loss"), rtol=1e-5)
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)


def test_mixup_matches_independent_computation(tok, tmp_path):
    """The trainer's Mixup term equals naive_mixup_loss on hidden states from a separate forward of the same batch."""
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0)
    seen = capture_pairs(tr)
    batch = next(iter(tr.get_train_dataloader()))
    model = tr.model
    model.train()
    inputs = {k: v.clone() for k, v in batch.items()}
    tr.compute_loss(model, inputs)
    pairs, lam = seen[-1]
    logged = tr._metrics["train"]["mixup_loss"][-1]
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = naive_mixup_loss(hidden, batch["labels"], model.lm_head.weight, pairs, lam)
    assert logged == pytest.approx(ref.item(), rel=1e-5)
    c, u = batch["example_idx"][pairs[:, 0]], batch["example_idx"][pairs[:, 1]]
    flags = np.array(tr.train_dataset["confident"])
    assert flags[c].all() and not flags[u].any()


@pytest.mark.parametrize("role", ["only", "loss"])
def test_mixup_role(tok, tmp_path, role):
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=4, max_steps=1, mixup_role=role)
    seen = capture_pairs(tr)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.train()
    loss = tr.compute_loss(tr.model, {k: v.clone() for k, v in batch.items()})
    ntp, mix = tr._metrics["train"]["ntp_loss"][-1], tr._metrics["train"]["mixup_loss"][-1]
    expected = mix if role == "only" else ntp + mix
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if role == "only":
        # The gradient has no NTP component: it equals the gradient of the Mixup loss alone.
        tr.model.zero_grad()
        loss.backward()
        g = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        tr.model.zero_grad()
        pairs, lam = seen[-1]
        hidden = tr.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        naive_mixup_loss(hidden, batch["labels"], tr.model.lm_head.weight, pairs, lam).backward()
        for n, p in tr.model.named_parameters():
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("subset", ["confident", "unconfident"])
def test_ntp_subset_masks_other_half(tok, tmp_path, subset):
    tr = make_trainer(tok, tmp_path, per_device_train_batch_size=4, max_steps=1, ntp_subset=subset)
    batch = next(iter(tr.get_train_dataloader()))
    other = ~batch["confident"] if subset == "confident" else batch["confident"]
    assert (batch["labels"][other] == -100).all()  # the other half carries no NTP loss
    assert (batch["mixup_labels"][other] != -100).any()  # ... but still takes part in Mixup
    tr.model.train()
    tr.compute_loss(tr.model, {k: v.clone() for k, v in batch.items()})
    ntp = tr._metrics["train"]["ntp_loss"][-1]
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert ntp == pytest.approx(ce.item(), rel=1e-5)


def test_errors(tok, tmp_path):
    with pytest.raises(SFTMixError, match="neither a boolean `confident`"):
        make_trainer(tok, tmp_path, tiny_dataset(16, with_confidence=False), per_device_train_batch_size=4)
    with pytest.raises(SFTMixError, match="odd"):
        make_trainer(tok, tmp_path, per_device_train_batch_size=3)
    with pytest.raises(SFTMixError, match="packing"):
        make_trainer(tok, tmp_path, per_device_train_batch_size=4, packing=True, max_length=64)
    with pytest.raises(SFTMixError, match="padding_free"):
        make_trainer(tok, tmp_path, per_device_train_batch_size=4, padding_free=True)
    ds = tiny_dataset(8, with_confidence=False).add_column("confident", [True] * 7 + [False])
    tr = make_trainer(tok, tmp_path, ds, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(SFTMixError, match="unconfident half has 1"):
        tr.get_train_dataloader()
    with pytest.raises(SFTMixError, match="mixup_role"):
        SFTMixConfig(output_dir=str(tmp_path), mixup_role="sometimes")


def test_lm_head_bias_and_softcapping_refused(tok, tmp_path):
    args = SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **COMMON)
    model = build_tiny_model(tok)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
    with pytest.raises(SFTMixError, match="bias"):
        SFTMixTrainer(model=model, args=args, processing_class=tok, train_dataset=tiny_dataset(8))
    model = build_tiny_model(tok)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(SFTMixError, match="soft-capping"):
        SFTMixTrainer(model=model, args=args, processing_class=tok, train_dataset=tiny_dataset(8))
