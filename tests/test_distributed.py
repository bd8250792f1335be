"""Several processes train like one: DDP and FSDP2 on CPU (gloo) give the losses and weights of one process with the
same global batch; layouts SFTMix cannot train are refused. How and what: docs/distributed.md.

The multi-process runs go through tests/dist_train.py under torchrun (2 processes x per-device batch 4, against one
process x batch 8). 36 examples make 20 pairs per epoch: 5 steps of 4 pairs, so the 7 steps cross an epoch boundary
(new pairing and lam) and the sampler must round its pairs to whole batches of *both* processes.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from dist_train import run, save_models
from helpers import tiny_dataset

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.confidence.split import median_split
from sftmix.mixup.sampling import BalancedPairSampler
from sftmix.models import build_byte_tokenizer, build_tiny_model
from sftmix.utils import SFTMixError, read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = dict(max_steps=7, n_examples=36)


def torchrun(tmp_path, modes, env=None, nproc=2):
    out = tmp_path / "multi.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, "dist_train.py"), "--out", str(out), "--modes", modes, "--per_device", "4",
           "--max_steps", str(RUN["max_steps"]), "--n_examples", str(RUN["n_examples"]),
           "--model_dir", str(tmp_path / "models")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def assert_same_training(multi, single):
    assert len(multi["steps"]) == len(single["steps"]) == RUN["max_steps"]
    for key in ("loss", "ntp_loss", "mixup_loss"):
        got = [s[key] for s in multi["steps"]]
        want = [s[key] for s in single["steps"]]
        # fp32 sums in another order: observed differences <= 5e-7 (a wrong Mixup scale or lost head gradient moves
        # them by > 1e-4 from step 2 on)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    names = sorted(single["params"])
    assert sorted(multi["params"]) == names
    got = np.array([multi["params"][n] for n in names])
    want = np.array([single["params"][n] for n in names])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)  # observed: <= 1e-8 relative


@pytest.mark.slow
def test_ddp_fsdp2_fsdp1_train_like_one_process(tmp_path):
    save_models(tmp_path / "models")
    single = {tied: run("single" + tied, per_device=8, **RUN) for tied in ("", "_tied")}
    single["noclip"] = run("single", per_device=8, max_grad_norm=0.0, **RUN)  # reference of the FSDP1 runs
    for ref in single.values():
        assert all(np.isfinite(s["mixup_loss"]) for s in ref["steps"])
    multi = torchrun(tmp_path, "ddp,fsdp2,fsdp2_tied,fsdp2_head_unit,fsdp1,fsdp1_flat")
    for mode, ref in (("ddp", ""), ("fsdp2", ""), ("fsdp2_tied", "_tied"), ("fsdp1", "noclip"),
                      ("fsdp1_flat", "noclip")):
        assert multi[mode]["world_size"] == 2, mode
        assert multi[mode]["sharded"] == mode.startswith("fsdp"), mode  # FSDP really sharded the weights
        assert_same_training(multi[mode], single[ref])
    # The LM head in an FSDP2 unit of its own stays a DTensor shard through the loss: refused, not trained wrongly.
    assert "LM head weight is still sharded" in multi["fsdp2_head_unit"]["error"]


@pytest.mark.slow
def test_gradient_checkpointing_and_lora_under_ddp_and_fsdp_train_like_one_process(tmp_path):
    """The combinations docs/distributed.md listed as never run (issue 29): gradient checkpointing under FSDP2 and
    FSDP1, a LoRA adapter (trainer's peft_config) under DDP, FSDP2 and FSDP1 (use_orig_params=True). FSDP1 with
    use_orig_params=False cannot hold LoRA (frozen and trainable weights in one flat parameter): torch refuses it when
    wrapping, see the docs."""
    save_models(tmp_path / "models")
    single = {f"{m}@{clip}": run(m, per_device=8, max_grad_norm=clip, **RUN)
              for m in ("single_gc", "single_lora") for clip in (1.0, 0.0)}
    assert any("lora_A" in name for name in single["single_lora@1.0"]["params"])
    multi = torchrun(tmp_path, "ddp_lora,fsdp2_gc,fsdp1_gc,fsdp2_lora,fsdp1_lora")
    for mode, ref in (("ddp_lora", "single_lora@1.0"), ("fsdp2_gc", "single_gc@1.0"), ("fsdp1_gc", "single_gc@0.0"),
                      ("fsdp2_lora", "single_lora@1.0"), ("fsdp1_lora", "single_lora@0.0")):
        assert "error" not in multi[mode], (mode, multi[mode].get("error"))
        assert multi[mode]["world_size"] == 2 and multi[mode]["sharded"] == mode.startswith("fsdp"), mode
        assert_same_training(multi[mode], single[ref])


@pytest.mark.slow
def test_deepspeed_zero_trains_like_one_process(tmp_path):
    """ZeRO-3 partitions lm_head.weight; the Mixup loss gathers it and its gradient must reach the partitions.
    Runs on DeepSpeed's CPU accelerator when deepspeed is installed (it is not a dependency of sftmix)."""
    pytest.importorskip("deepspeed")
    save_models(tmp_path / "models")
    single = {tied: run("single" + tied, per_device=8, **RUN) for tied in ("", "_tied", "_lora", "_gc")}
    # + LoRA under ZeRO-2 / ZeRO-3 and gradient checkpointing under ZeRO-3 (issue 29: never run before)
    multi = torchrun(tmp_path, "zero2,zero3,zero3_tied,zero2_lora,zero3_lora,zero3_gc", env={"DS_ACCELERATOR": "cpu"})
    for mode, ref in (("zero2", ""), ("zero3", ""), ("zero3_tied", "_tied"), ("zero2_lora", "_lora"),
                      ("zero3_lora", "_lora"), ("zero3_gc", "_gc")):
        assert "error" not in multi[mode], (mode, multi[mode].get("error"))
        assert multi[mode]["distributed_type"] == "DistributedType.DEEPSPEED" and multi[mode]["world_size"] == 2
        assert_same_training(multi[mode], single[ref])


def _medqa(path, n=23, seed=0):
    rng = random.Random(seed)
    words = ["why", "does", "the", "heart", "beat", "fast", "slow"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "question": " ".join(rng.choice(words) for _ in range(rng.randint(2, 15))) + "?",
                "options": {k: " ".join(rng.choice(["aspirin", "rest", "fluids"]) for _ in range(rng.randint(1, 3)))
                            for k in "ABCD"},
                "answer_idx": "ABCD"[i % 4]}) + "\n")
    return path


def _dist_score(tmp_path, name, nproc, modes):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable])
    out = tmp_path / f"{name}.json"
    cmd += [os.path.join(HERE, "dist_score.py"), "--out", str(out), "--modes", modes, "--run_dir",
            str(tmp_path / name), "--model_dir", str(tmp_path / "models"), "--mc_file", str(tmp_path / "medqa.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _about_half(per_process, key):
    counts = [p[key] for p in per_process]
    assert len(counts) == 2 and all(abs(c - sum(counts) / 2) <= 0.2 * sum(counts) / 2 for c in counts), counts


@pytest.mark.slow
def test_step1_scoring_and_evaluation_shared_by_two_processes_equal_one(tmp_path):
    """Two processes each score about half of the response tokens and gather the rows: run_scoring's rows and hidden
    states (plain and FSDP2-sharded model, with dummy forwards on the process with fewer batches), step 1's
    ckpt_{k}.jsonl and confidence.jsonl after DDP training, held-out NLL and multiple choice (plain and
    FSDP2) equal one process."""
    save_models(tmp_path / "models")
    _medqa(tmp_path / "medqa.jsonl")
    one = _dist_score(tmp_path, "one", 1, "scoring,reference,eval")
    two = _dist_score(tmp_path, "two", 2, "scoring,fsdp2,reference,eval")
    assert one["world_size"] == 1 and two["world_size"] == 2

    # the same batches, split across processes: every number is computed exactly as on one process
    for mode in ("scoring", "fsdp2"):
        assert two[mode]["rows"] == one["scoring"]["rows"], mode
        assert two[mode]["hidden"] == one["scoring"]["hidden"], mode
        per = two[mode]["stats"]["per_process"]
        _about_half(per, "response_tokens")
        assert sum(p["examples"] for p in per) == 40 and sum(p["dummy_batches"] for p in per) > 0
        assert two[mode]["stats"]["response_tokens"] == one["scoring"]["stats"]["response_tokens"]
    assert two["fsdp2"]["sharded"]

    # step 1 end to end: DDP trains to weights equal to ~1e-8 relative, so the scores agree to 1e-6
    ddir1, ddir2 = tmp_path / "one" / "ref", tmp_path / "two" / "ref"
    for name in ("dynamics/ckpt_1.jsonl", "dynamics/ckpt_2.jsonl", "dynamics/ckpt_3.jsonl", "confidence.jsonl"):
        a, b = read_jsonl(ddir1 / name), read_jsonl(ddir2 / name)
        assert [r["guid"] for r in a] == [r["guid"] for r in b] and len(a) == 36, name
        for key in a[0]:
            if isinstance(a[0][key], float):  # observed: <= 6.2e-7 relative (variability), nll_mean <= 6e-8
                np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, err_msg=name + key)
            else:
                assert [r[key] for r in b] == [r[key] for r in a], name + key
    for stats in json.loads((ddir2 / "dynamics" / "schedule.json").read_text())["scoring"].values():
        assert stats["num_processes"] == 2
        _about_half(stats["per_process"], "response_tokens")
    h1, h2 = np.load(ddir1 / "dynamics" / "hidden_final.npz"), np.load(ddir2 / "dynamics" / "hidden_final.npz")
    assert list(h1["guid"]) == list(h2["guid"])
    np.testing.assert_allclose(h2["hidden"], h1["hidden"], rtol=1e-5, atol=1e-5)
    assert not list((ddir2 / "reference").glob("checkpoint-*"))  # the default forces no save at scoring steps

    # evaluation: identical metrics and rows; each process ran about half of the multiple-choice tokens
    assert two["eval"]["heldout"] == one["eval"]["heldout"]
    assert two["eval"]["heldout_rows"] == one["eval"]["heldout_rows"]
    assert two["eval"]["heldout_main_only"] == one["eval"]["heldout"]  # distributed=False: no collective, no hang
    strip = ("scoring", "seconds")
    assert ({k: v for k, v in two["eval"]["mc"].items() if k not in strip}
            == {k: v for k, v in one["eval"]["mc"].items() if k not in strip})
    per = two["eval"]["mc"]["scoring"]["per_process"]
    assert sum(p["questions"] for p in per) == one["eval"]["mc"]["n"] == 20
    _about_half(per, "prompt_tokens")
    assert len({p["forwards"] + p["dummy_forwards"] for p in per}) == 1  # the same number of forwards everywhere
    fsdp2 = two["fsdp2"]["eval"]  # the FSDP2-sharded model too
    assert fsdp2["heldout"] == one["eval"]["heldout"] and fsdp2["heldout_rows"] == one["eval"]["heldout_rows"]
    assert ({k: v for k, v in fsdp2["mc"].items() if k not in strip}
            == {k: v for k, v in one["eval"]["mc"].items() if k not in strip})
    assert read_jsonl(tmp_path / "two" / "eval_fsdp2" / "medqa_predictions.jsonl") == read_jsonl(
        tmp_path / "one" / "eval" / "medqa_predictions.jsonl")
    assert read_jsonl(tmp_path / "two" / "eval" / "medqa_predictions.jsonl") == read_jsonl(
        tmp_path / "one" / "eval" / "medqa_predictions.jsonl")


def test_data_map_callback_scores_a_share_per_process_with_the_rows_of_one(tmp_path):
    """ConfidenceCallback on a plain transformers.Trainer under two processes (DDP, gloo): each process scores only
    its share of the examples at each scoring step (a hook on the model counts each process's scoring tokens), the
    shares add up to what one process scores, and the files are those of one process."""
    one = _dist_score(tmp_path, "one", 1, "datamap")["datamap"]["per_process"]
    two = _dist_score(tmp_path, "two", 2, "datamap")["datamap"]["per_process"]
    assert len(one) == 1 and len(two) == 2
    assert one[0]["scored"] == two[0]["scored"] == two[1]["scored"] == [1, 2]  # both scoring steps, on every process
    total = one[0]["tokens"]
    assert one[0]["rows"] == 2 * 36  # one process scores all 36 examples at each of the 2 scoring steps
    # each process scores only its share (before: every process scored all 36 examples, twice the total work)
    assert sum(p["rows"] for p in two) == 2 * 36 and sum(p["tokens"] for p in two) == total
    _about_half(two, "tokens")
    assert all(p["tokens"] < total for p in two)
    for k in (1, 2):  # DDP trains to weights equal to ~1e-8 relative (see the test above): scores equal to 1e-6
        a = read_jsonl(tmp_path / "one" / "map" / "dynamics" / f"ckpt_{k}.jsonl")
        b = read_jsonl(tmp_path / "two" / "map" / "dynamics" / f"ckpt_{k}.jsonl")
        assert [(r["guid"], r["n_tokens"]) for r in b] == [(r["guid"], r["n_tokens"]) for r in a] and len(a) == 36
        np.testing.assert_allclose([r["nll_mean"] for r in b], [r["nll_mean"] for r in a], rtol=1e-6)
    sched = json.loads((tmp_path / "two" / "map" / "dynamics" / "schedule.json").read_text())
    for stats in sched["scoring"].values():
        assert stats["num_processes"] == 2 and stats["examples"] == 36
        assert sum(p["examples"] for p in stats["per_process"]) == 36


def test_batch_shares_are_balanced_by_tokens_and_deterministic():
    from sftmix.confidence.scoring import share_batches

    # one long batch outweighs several short ones: the shares balance tokens, not counts
    assert share_batches([100, 30, 30, 30, 10, 10], 2) == [[0, 5], [1, 2, 3, 4]]
    assert share_batches([5, 5, 5], 2) == [[0, 2], [1]]  # ties go to the lowest rank
    assert share_batches([7, 3], 1) == [[0, 1]]
    assert share_batches([], 3) == [[], [], []]


def test_sampler_deals_one_process_batches_to_several():
    """What N processes see (accelerate deals batch k to process k % N) is the pairing of one process with N times the
    batch, also when the halves do not fill whole batches."""
    conf = median_split(np.random.default_rng(0).random(36))
    one = BalancedPairSampler(conf, 8, seed=5)
    two = BalancedPairSampler(conf, 4, seed=5, num_replicas=2)
    assert one.num_pairs == two.num_pairs == 20 and len(two) % (2 * 4) == 0
    for epoch in (0, 1):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        big = np.array(list(one)).reshape(-1, 8)
        small = np.array(list(two)).reshape(-1, 2, 4)  # [step, process, row]
        for b, s in zip(big, small):
            pairs_one = set(zip(b[:4], b[4:]))
            pairs_two = set(zip(s[0, :2], s[0, 2:])) | set(zip(s[1, :2], s[1, 2:]))
            assert pairs_one == pairs_two


def test_refuses_layouts_that_split_examples_or_the_head(tmp_path, monkeypatch):
    tok = build_byte_tokenizer()

    def make(**kw):
        args = SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], bf16=False,
                            use_cpu=True, **kw)
        return SFTMixTrainer(model=build_tiny_model(tok), args=args, processing_class=tok,
                             train_dataset=tiny_dataset(8))

    with pytest.raises(SFTMixError, match="split_batches"):
        make(accelerator_config={"split_batches": True})
    # Tensor/context parallelism cannot be set up in one CPU process: pretend the Trainer reports it.
    monkeypatch.setattr(SFTMixTrainer, "get_tp_size", lambda self: 2)
    with pytest.raises(SFTMixError, match=r"tensor parallelism \(tp_size=2\)"):
        make()
    monkeypatch.undo()
    monkeypatch.setattr(SFTMixTrainer, "get_cp_size", lambda self: 4)
    with pytest.raises(SFTMixError, match=r"context parallelism \(cp_size=4\).*no process holds whole"):
        make()
    make(mixup_weight=0.0)  # plain NTP is TRL's business: not refused


def test_refuses_losses_that_bypass_the_fused_forward(tmp_path):
    """Label smoothing recomputes the loss from full logits and calls the fused head under no_grad: the Mixup loss,
    computed in that forward, would get no gradient. Refused at the first step."""
    tok = build_byte_tokenizer()
    args = SFTMixConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], bf16=False,
                        use_cpu=True, max_steps=1, save_strategy="no", label_smoothing_factor=0.1)
    tr = SFTMixTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, train_dataset=tiny_dataset(8))
    with pytest.raises(SFTMixError, match="label_smoothing_factor"):
        tr.train()
