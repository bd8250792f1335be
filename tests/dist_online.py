"""One-run SFTMix's online records over a matrix of layouts; the main process writes what each run recorded.

    python tests/dist_online.py --out single.json
    torchrun --nproc_per_node 2 tests/dist_online.py --out multi.json

Each case trains one-run SFTMix (online confidence) on the tiny model with a per-device batch, gradient accumulation
steps, NTP epochs and data size, and keeps: the online records, confidence.jsonl, the rows each optimizer step of
the NTP epochs trained on (the sampler's order, as the Trainer's dataloader hands it out), the number of processes
and of optimizer steps per epoch. Used by tests/test_online.py.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py
from helpers import tiny_records  # noqa: E402

from sftmix import SFTMixConfig, SFTMixTrainer  # noqa: E402
from sftmix.confidence.callback import SelfReferenceCallback  # noqa: E402
from sftmix.data import tokenize_records  # noqa: E402
from sftmix.models import build_byte_tokenizer, build_tiny_model  # noqa: E402
from sftmix.utils import atomic_write_json, read_jsonl  # noqa: E402

# (examples, per-device batch, gradient accumulation, NTP epochs). 31 examples round up to 32 rows per epoch under
# every layout below (16 pairs), so the runs of one global batch see the same rows at the same steps and their
# records must agree; 18 and 21 leave remainders that differ between layouts (the last window is short).
CASES = [(n, pd, ga, e) for e in (1, 2) for n, pd, ga in
         ((31, 8, 1), (31, 4, 2), (31, 2, 4), (31, 4, 1), (31, 2, 2), (18, 2, 2), (21, 2, 4), (18, 4, 1))]


def run_case(tmp, n, per_device, ga, ntp_epochs):
    tok = build_byte_tokenizer()
    ds, _ = tokenize_records(tiny_records(n, seed=3, with_confidence=False), tok)
    args = SFTMixConfig(output_dir=os.path.join(tmp, "sftmix"), per_device_train_batch_size=per_device,
                        gradient_accumulation_steps=ga, num_train_epochs=ntp_epochs + 1,
                        self_reference_epochs=ntp_epochs, record_online_dynamics=True, learning_rate=3e-3,
                        save_strategy="no", report_to=[], logging_steps=1, bf16=False, seed=0, use_cpu=True,
                        dataloader_num_workers=0, disable_tqdm=True, max_length=None, gradient_checkpointing=False)
    cb = SelfReferenceCallback(ds, tmp, confidence="online")
    trainer = SFTMixTrainer(model=build_tiny_model(tok, seed=0), args=args, train_dataset=ds, processing_class=tok,
                            self_reference=cb)
    trainer.train()
    sampler = trainer.pair_sampler
    orders = []
    for epoch in range(ntp_epochs):  # the NTP epochs' global order (seeded by (seed, epoch), as the Trainer drew it)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return {"records": list(trainer.online_records), "confidence": read_jsonl(os.path.join(tmp, "confidence.jsonl")),
            "orders": orders, "world_size": trainer.accelerator.num_processes,
            "steps_per_epoch": trainer.state.max_steps // (ntp_epochs + 1), "n": n}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)  # several processes on a small machine
    results = {}
    for case in CASES:
        # a folder per case, the same path on every process (the callback's files are written by the main one)
        tmp = os.path.join(os.path.dirname(os.path.abspath(a.out)), "case-" + "-".join(map(str, case)))
        results["/".join(map(str, case))] = run_case(tmp, *case)
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(a.out, results)
