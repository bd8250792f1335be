"""Step-1 scoring and evaluation on the tiny model under one or several processes; the main process writes the results.

    python tests/dist_score.py --out single.json --run_dir DIR1 --model_dir M --mc_file medqa.jsonl
    torchrun --standalone --nproc_per_node 2 tests/dist_score.py --out multi.json --run_dir DIR2 --model_dir M \
        --mc_file medqa.jsonl

Modes (comma-separated, run one after the other in the same processes):
  scoring    run_scoring of a fixed model (hidden states too): rows, hidden states, each process's share;
  fsdp2      scoring and eval (below) on the model sharded by FSDP2 at load time (transformers'
             distributed_config, as in tests/dist_train.py): every process takes part in every sharded forward;
  reference  run_reference (DDP training under the Trainer, scoring at 3 scoring steps) into RUN_DIR, per-device
             batch 4 / N so that the global batch is that of one process;
  datamap    ConfidenceCallback (the data map) on a plain transformers.Trainer (DDP, per-device batch 4 / N) into
             RUN_DIR/map, with each process's scoring forwards counted by a hook on the model;
  eval       heldout_nll and eval_multiple_choice (MedQA-style, 3 shots, multi-token options " A".." D") with
             distributed=True, and heldout_nll on the main process alone (the default distributed=False).
Used by tests/test_distributed.py (launched with torchrun: `accelerate launch --cpu` starts one process here).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py
from helpers import tiny_records  # noqa: E402

from sftmix.confidence.reference import run_reference  # noqa: E402
from sftmix.confidence.scoring import run_scoring  # noqa: E402
from sftmix.config import EvalConfig  # noqa: E402
from sftmix.data import tokenize_records  # noqa: E402
from sftmix.eval.evaluate import heldout_nll  # noqa: E402
from sftmix.eval.mc import eval_multiple_choice  # noqa: E402
from sftmix.models import build_byte_tokenizer, build_tiny_model  # noqa: E402
from sftmix.utils import atomic_write_json  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", 1))


def scoring(model, tok):
    records = tiny_records(40, seed=5, with_confidence=False)
    # one long example: its batch alone outweighs several others, so the shares differ in batch count and the
    # process with fewer batches runs dummy forwards
    records[7]["completion"][0]["content"] = " ".join(["red stone"] * 60)
    ds, _ = tokenize_records(records, tok)
    res = run_scoring(model, ds, batch_size=3, hidden_at="last_response", show_progress=False, distributed=True)
    return {"rows": res.rows, "hidden": res.hidden.tolist(), "stats": res.stats}


def reference(tok, run_dir):
    ds, _ = tokenize_records(tiny_records(36, seed=6, with_confidence=False), tok)
    run_reference(build_tiny_model(tok, seed=0), tok, ds, run_dir, num_checkpoints=3,
                  per_device_train_batch_size=4 // WORLD, learning_rate=3e-3, seed=1, score_batch_size=3,
                  show_progress=False, use_cpu=True, dataloader_num_workers=0)
    return {"done": True}


def datamap(tok, run_dir):
    """The data map of a plain Trainer run, scored at steps 3 and 6. A forward pre-hook on the model counts what this
    process scores: the real tokens and rows of every eval-mode forward of more than one row (36 examples in batches
    of 3 leave no real batch of one row; a process with fewer batches runs one-row dummy forwards, not counted)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from sftmix.confidence.callback import ConfidenceCallback

    ds, _ = tokenize_records(tiny_records(36, seed=6, with_confidence=False), tok)
    model = build_tiny_model(tok, seed=0)
    mine = {"tokens": 0, "rows": 0, "forwards": 0}

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if not module.training and mask is not None and mask.shape[0] > 1:
            mine["tokens"] += int(mask.sum())
            mine["rows"] += int(mask.shape[0])
            mine["forwards"] += 1

    model.register_forward_pre_hook(count, with_kwargs=True)
    cb = ConfidenceCallback(ds, os.path.join(run_dir, "map"), steps=[3, 6], batch_size=3)
    args = TrainingArguments(output_dir=os.path.join(run_dir, "out"), per_device_train_batch_size=4 // WORLD,
                             max_steps=6, learning_rate=3e-3, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=1, dataloader_num_workers=0)
    train = ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")])
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb],
            data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)).train()
    per_process = [None] * WORLD
    if WORLD > 1:
        torch.distributed.all_gather_object(per_process, {**mine, "scored": cb.scored})
    else:
        per_process = [{**mine, "scored": cb.scored}]
    return {"per_process": per_process}


def evaluation(model, tok, mc_file, out_dir, main_only=True):
    records = tiny_records(21, seed=7, with_confidence=False)
    m, rows = heldout_nll(model, tok, records, batch_size=4, return_rows=True, distributed=True)
    mc = eval_multiple_choice(model, tok, "medqa", mc_file, cfg=EvalConfig(num_shots=3, batch_size=3),
                              output_dir=out_dir, distributed=True)
    alone = None
    if main_only and int(os.environ.get("RANK", 0)) == 0:  # the default: one process alone scores all (no collective)
        alone = heldout_nll(model, tok, records, batch_size=4)
    if WORLD > 1:
        torch.distributed.barrier()
    return {"heldout": m, "heldout_rows": rows, "mc": mc, "heldout_main_only": alone}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="scoring,reference,eval")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--model_dir", help="the tiny model saved by dist_train.save_models (for fsdp2)")
    p.add_argument("--mc_file", help="MedQA-style JSONL (for eval)")
    a = p.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(420, exit=True)  # a hang (mismatched collectives) shows where, then ends
    torch.set_num_threads(1)  # several processes on a small machine
    if WORLD > 1:
        from accelerate import PartialState

        PartialState(cpu=True)  # the gloo process group the Trainer's Accelerator then uses too
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)
    results = {"world_size": WORLD}
    for mode in a.modes.split(","):
        if mode == "scoring":
            results[mode] = scoring(model, tok)
        elif mode == "fsdp2":
            from dist_train import _load_sharded
            from torch.distributed.tensor import DTensor

            sharded = _load_sharded(os.path.join(a.model_dir, "untied"))
            results[mode] = {**scoring(sharded, tok),
                             "sharded": any(isinstance(q, DTensor) for q in sharded.parameters()),
                             # (not main-only: a sharded model needs every process in every forward)
                             "eval": evaluation(sharded, tok, a.mc_file, os.path.join(a.run_dir, "eval_fsdp2"),
                                                main_only=False)}
        elif mode == "reference":
            results[mode] = reference(tok, os.path.join(a.run_dir, "ref"))
        elif mode == "datamap":
            results[mode] = datamap(tok, a.run_dir)
        elif mode == "eval":
            results[mode] = evaluation(model, tok, a.mc_file, os.path.join(a.run_dir, "eval"))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(a.out, results)


if __name__ == "__main__":
    np.set_printoptions(precision=17)
    main()
