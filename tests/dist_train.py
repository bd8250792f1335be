"""A few SFTMix steps on the tiny model under one data-parallel layout; the main process writes losses + weights.

    python tests/dist_train.py --out single.json --modes single --per_device 8
    torchrun --nproc_per_node 2 tests/dist_train.py --out multi.json --modes ddp,fsdp2 --per_device 4 --model_dir DIR

Modes (several run one after the other in the same processes, results keyed by mode):
  single  one process (the reference);
  ddp     the Trainer's own DDP (MULTI_CPU, gloo);
  fsdp2   FSDP2 as transformers applies it at load time: `from_pretrained(DIR, distributed_config=
          DistributedConfig(fsdp_size=N))` (the Trainer then skips DDP and FSDP2 reduces the gradients);
  fsdp2_head_unit  FSDP2 with the LM head in its own resharding unit: SFTMixTrainer must refuse it;
  fsdp1, fsdp1_flat  FSDP1 (torch FullyShardedDataParallel, use_orig_params True / False) in the layout of accelerate's
          FSDP1 plugin, wrapped here because accelerate only enables FSDP on GPUs; trained without gradient clipping
          (accelerate's CPU clip_grad_norm_ would norm FSDP1's plain-tensor shards per rank);
  zero3   DeepSpeed ZeRO-3 on its CPU accelerator (DS_ACCELERATOR=cpu, gloo), when deepspeed is installed.
A `_tied` suffix (e.g. fsdp2_tied) uses the model with tied input/output embeddings (as SmolLM2), saved in DIR/tied;
then `_gc` trains with gradient checkpointing and `_lora` with a LoRA adapter (r=4 on q_proj / v_proj, through the
trainer's peft_config), e.g. fsdp2_gc, fsdp1_lora, single_gc_lora.
`accelerate launch --cpu --num_processes 2` starts a single process unless an MPI hostfile is given, so the test
launches with torchrun; the Trainer's Accelerator picks the gloo backend because use_cpu=True. Used by
tests/test_distributed.py.
"""

import argparse
import os
import sys
import tempfile

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py
from helpers import tiny_dataset  # noqa: E402

from sftmix import SFTMixConfig, SFTMixTrainer  # noqa: E402
from sftmix.models import build_byte_tokenizer, build_tiny_model  # noqa: E402
from sftmix.utils import SFTMixError, atomic_write_json  # noqa: E402


def _load_sharded(model_dir, fsdp_plan=None):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    world = int(os.environ.get("WORLD_SIZE", 1))
    return AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(fsdp_size=world, fsdp_plan=fsdp_plan))


def _wrap_fsdp1(trainer, use_orig_params):
    """FSDP1 as accelerate's plugin lays it out (a unit per decoder layer, lm_head and embeddings in the root unit),
    handed to the Trainer in place of accelerate's DDP wrapper: accelerate only enables FSDP on GPUs."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FSDP(trainer.model, auto_wrap_policy=policy, use_orig_params=use_orig_params,
                   device_id=torch.device("cpu"))  # explicit: FSDP1 refuses to guess a CPU device
    trainer.accelerator.prepare_model = lambda model, *a, **k: wrapped
    return wrapped


def save_models(model_dir):
    """The tiny model (seed 0) untied and tied, saved where the fsdp2 modes load them from."""
    tok = build_byte_tokenizer()
    for name, tied in (("untied", False), ("tied", True)):
        build_tiny_model(tok, seed=0, tie_word_embeddings=tied).save_pretrained(os.path.join(model_dir, name))


def run(mode, per_device=8, max_steps=6, n_examples=32, model_dir=None, max_grad_norm=1.0, mixup_weight=0.2):
    """Train in `mode`; return {"steps": [{step, loss, ntp_loss, mixup_loss}], "params": {name: [sum, abs_sum]}}."""
    tok = build_byte_tokenizer()
    lora, mode = mode.endswith("_lora"), mode.removesuffix("_lora")
    gc, mode = mode.endswith("_gc"), mode.removesuffix("_gc")
    tied = mode.endswith("_tied")
    mode = mode.removesuffix("_tied")
    saved = os.path.join(model_dir or "", "tied" if tied else "untied")
    if mode == "fsdp2":
        model = _load_sharded(saved)
    elif mode == "fsdp2_head_unit":
        model = _load_sharded(saved, {"lm_head": "free_full_weight"})
    else:
        model = build_tiny_model(tok, seed=0, tie_word_embeddings=tied)  # the weights saved by save_models
    extra = {}
    if mode.startswith("zero"):
        # accelerate picks no backend without an accelerator; set up its state for DeepSpeed on gloo ourselves.
        from accelerate import PartialState
        from accelerate.state import AcceleratorState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        AcceleratorState._reset_state()  # keeps the process group; a later mode may bring its own DeepSpeed config
        PartialState(backend="gloo")
        extra = dict(use_cpu=False, accelerator_config={"use_configured_state": True}, deepspeed={
            "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True})
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTMixConfig(output_dir=tmp, per_device_train_batch_size=per_device, max_steps=max_steps,
                            learning_rate=1e-3, max_grad_norm=max_grad_norm, mixup_weight=mixup_weight,
                            logging_steps=1, save_strategy="no", report_to=[], bf16=False, seed=0,
                            gradient_checkpointing=gc, dataloader_num_workers=0, disable_tqdm=True,
                            **{"use_cpu": True, **extra})
        peft = None
        if lora:
            from peft import LoraConfig

            peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                              task_type="CAUSAL_LM")
            torch.manual_seed(0)  # the LoRA A matrices are drawn when TRL wraps the model, before the Trainer seeds
        try:
            trainer = SFTMixTrainer(model=model, args=args, processing_class=tok, peft_config=peft,
                                    train_dataset=tiny_dataset(n_examples))
        except (SFTMixError, ValueError, RuntimeError) as e:  # an untested combination refused (or failing) here
            if not (gc or lora):
                raise
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        wrapped = _wrap_fsdp1(trainer, mode == "fsdp1") if mode.startswith("fsdp1") else None
        try:
            trainer.train()
        except SFTMixError as e:
            return {"error": str(e)}
        except (ValueError, RuntimeError) as e:  # an untested combination that fails inside torch / peft
            if not (gc or lora):
                raise
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        # Collective under FSDP (gathers the shards): every process must call it.
        if mode.startswith("zero"):  # ZeRO-3 keeps each rank's partition only: gather the full weights to read them
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
                state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        else:
            state = (wrapped or trainer.model).state_dict()
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()}
    return {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": bool(wrapped is not None or getattr(model, "is_distributed_loading_by_transformers", False)),
        "steps": [{k: h.get(k) for k in ("step", "loss", "ntp_loss", "mixup_loss")}
                  for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h],
        "params": {k: [t.double().sum().item(), t.double().abs().sum().item()] for k, t in state.items()},
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="single", help="comma-separated, see the module docstring")
    p.add_argument("--per_device", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=6)
    p.add_argument("--n_examples", type=int, default=32)
    p.add_argument("--model_dir", help="the tiny model saved with save_pretrained (needed by the fsdp2 modes)")
    a = p.parse_args()
    torch.set_num_threads(1)  # several processes on a small machine
    results = {}
    for m in a.modes.split(","):
        # FSDP1 shards plain tensors, which accelerate's CPU clip_grad_norm_ would norm per rank: compare unclipped
        clip = 0.0 if m.startswith("fsdp1") else 1.0
        results[m] = run(m, a.per_device, a.max_steps, a.n_examples, a.model_dir, max_grad_norm=clip)
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(a.out, results)
