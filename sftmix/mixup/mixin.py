"""SFTMixMixin: the Mixup term added to any `transformers.Trainer` subclass's own NTP loss (steps 2-3).

    from sftmix.mixup.mixin import SFTMixMixin

    class MyTrainer(SFTMixMixin, SomeTrainer):   # its args need the MixupArguments fields (sftmix.mixup.args)
        pass
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()                              # logs ntp_loss and mixup_loss

`ds` holds tokenized rows (`input_ids`, `labels` with -100 outside the response) and a boolean `confident` or a float
`confidence` column (step 1, `sftmix dynamics`, writes confidence.jsonl, joined by guid). The trainer's own NTP loss
(the model's loss, a chunked cross-entropy, TRL's fused head, axolotl's) is kept as it is. The parts:
- sftmix.mixup.sampling: the rows prepared before the Trainer's __init__ (selection, `confident`, `example_idx`), the
  BalancedPairSampler (each micro-batch half confident and half unconfident, the i-th confident row paired with the
  i-th unconfident one) and the collator that passes the flags through;
- sftmix.mixup.capture: the backbone's last hidden states (the LM head's input) kept from the NTP forward itself, and
  the Mixup loss (sftmix.mixup.loss.mixup_loss) computed inside that forward (or right after an NTP loss that runs
  the backbone itself): one backbone pass per step, no full-vocabulary logits for the mixed states;
- sftmix.mixup.guard: the support checks, and the non-finite guard (a loss, gradient or weight) before the update.
This class: compute_loss returns NTP + mu * Mixup (normalised like the Trainer normalises the NTP loss under gradient
accumulation), logs `ntp_loss` and `mixup_loss`, and records online dynamics (`record_online_dynamics`).
One-run SFTMix (`self_reference_epochs=N` and `self_reference=SelfReferenceCallback(...)` of
sftmix.confidence.callback, which the trainer adds to its callbacks and binds to itself): OneRunSampler gives random
order (plain NTP, no Mixup term) for N epochs, then balanced pairs on the split the callback takes then.
Neither this module nor its parts import TRL: they run next to any TRL version, e.g. axolotl's pin.
sftmix.mixup.trainer.SFTMixTrainer is trl.SFTTrainer with it; sftmix.mixup.hf.SFTMixHFTrainer is transformers.Trainer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict

import numpy as np
import torch

from sftmix.confidence.online import OnlineRecords
from sftmix.mixup.args import MixupArguments, mixup_weight_at
from sftmix.mixup.capture import StepCapture, capture_loss_forward, record_online
from sftmix.mixup.guard import NonFiniteGuard, check_lm_head, check_parallelism, lm_head_weight
from sftmix.mixup.loss import mixup_loss
from sftmix.mixup.sampling import OneRunSampler, SFTMixCollator, batch_pairs, prepare_train_dataset, train_sampler
from sftmix.utils import SFTMixError


class SFTMixMixin(NonFiniteGuard):
    """SFTMix for a `transformers.Trainer` subclass: `class T(SFTMixMixin, AnyTrainer)`; see the module docstring.

    Hooks a trainer may override: `_is_loss_forward` (which model forward is the NTP one), `_lm_head_gathered`
    (gather a sharded head for the Mixup term), `_missing_mixup_message`, `mixup_after_forward`.
    """

    # Whether the Mixup term may be computed after the NTP loss when that loss did not call the model's forward (it
    # called the backbone directly): right for one process and DDP; under FSDP/ZeRO-3 the LM head is gathered only
    # inside the forward, where lm_head_weight's checks refuse a sharded head with a one-line error.
    mixup_after_forward = True

    def __init__(self, *args, self_reference=None, **kwargs):
        # One-run SFTMix's callback (sftmix.confidence.callback.SelfReferenceCallback) is given explicitly, as TRL's
        # trainers add their own callbacks: first among the user's callbacks, bound to this trainer in setup_sftmix.
        self.self_reference = self_reference
        if self_reference is not None:
            kwargs["callbacks"] = [self_reference, *(kwargs.get("callbacks") or [])]
        # The training rows are prepared before the Trainer's __init__ (which may tokenize them and reads their
        # columns), whether the base trainer is given them by keyword or in its positional order.
        args = list(args)
        params = inspect.signature(super().__init__).parameters.values()
        names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][:len(args)]
        given = {**dict(zip(names, args)), **kwargs}
        training_args = given.get("args")
        self.selection_description = None
        if isinstance(training_args, MixupArguments):
            prepared, self.selection_description = prepare_train_dataset(given.get("train_dataset"), training_args)
            if "train_dataset" in names:
                args[names.index("train_dataset")] = prepared
            else:
                kwargs["train_dataset"] = prepared
        super().__init__(*args, **kwargs)
        self.setup_sftmix()

    def setup_sftmix(self) -> None:
        """After the Trainer's __init__ (called by __init__; a second call does nothing): wrap the collator, bind
        one-run SFTMix's callback, check the model and layout, hook the backbone."""
        if getattr(self, "_sftmix_set_up", False):
            return
        self._sftmix_set_up = True
        args = self.args
        if not isinstance(args, MixupArguments):
            raise SFTMixError(f"{type(self).__name__} needs training arguments with the SFTMix fields "
                              f"(MixupArguments), got {type(args).__name__}.")
        args.validate_mixup_args()
        if self.data_collator is not None and not isinstance(self.data_collator, SFTMixCollator):
            self.data_collator = SFTMixCollator(self.data_collator, args.ntp_subset)
        if not hasattr(self, "_metrics"):  # TRL's SFTTrainer has this store and logs it; other trainers get ours
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            self._sftmix_logs_metrics = True
        self.online_records = OnlineRecords()
        if getattr(self, "self_reference", None) is not None:
            self.self_reference.trainer = self  # its online mode reads (and restores) `online_records`
        elif args.self_reference_epochs:
            raise SFTMixError(f"self_reference_epochs={args.self_reference_epochs} (one-run SFTMix) takes its split "
                              "from a sftmix.confidence.callback.SelfReferenceCallback: give it to the trainer as "
                              "self_reference=SelfReferenceCallback(train_dataset, out_dir).")
        self._captured = StepCapture()
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._causal_lm = causal_lm
        if args.mixup_enabled:
            check_parallelism(self)
        if not (args.mixup_enabled or args.record_online_dynamics):
            return
        if args.mixup_enabled:  # online records read the NTP forward's own log-probs (bias, scale, softcap applied)
            check_lm_head(causal_lm)
        # _mixup_term is looked up at each call, so that a subclass (or an instance) replacing it is the one used
        capture_loss_forward(causal_lm, lambda: self._captured, self._is_loss_forward,
                             lambda *pending: self._mixup_term(*pending))

    # -- hooks a trainer may override -------------------------------------------------------------------------------
    def _is_loss_forward(self, forward_kwargs: dict) -> bool:
        """Whether this model forward is the one that computes the NTP loss (the Trainer calls no other one)."""
        return True

    def _lm_head_gathered(self, weight):
        """Context in which `weight` is the whole LM head (TRL's trainer gathers ZeRO-3 partitions here)."""
        return contextlib.nullcontext()

    def _missing_mixup_message(self) -> str:
        return ("the Mixup loss was not computed: the model's forward did not run the backbone this trainer hooked "
                "(a custom compute_loss that bypasses model(**inputs)?); set mixup_weight=0 or call the model.")

    # -- data -------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in ("confident", "example_idx", "pairing_embedding"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.mixup_enabled:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self.pair_sampler = train_sampler(dataset, self.args, split_fn=self._one_run_split)
        return self.pair_sampler

    def _one_run_split(self) -> np.ndarray:
        """The confident flags of the training rows at the switch to Mixup (one-run SFTMix), from the
        SelfReferenceCallback given as `self_reference`."""
        if "guid" not in self.train_dataset.column_names:
            raise SFTMixError("one-run SFTMix joins the split by guid: the training data needs a `guid` column "
                              "(sftmix.data.tokenize_records adds one).")
        self.accelerator.wait_for_everyone()  # the scores of the last NTP step are written by the main process
        flags = self.self_reference.self_split(list(self.train_dataset["guid"]), write=self.is_world_process_zero())
        self.accelerator.wait_for_everyone()
        return flags

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        confident = inputs.pop("confident", None)
        mixup_labels = inputs.pop("mixup_labels", None)
        example_idx = inputs.pop("example_idx", None)
        if confident is None and isinstance(getattr(self, "pair_sampler", None), OneRunSampler):
            confident = self.pair_sampler.confident_of(example_idx)  # None during the NTP epochs
        training = self.model.training
        use_mixup = training and self.args.mixup_enabled and confident is not None
        self._captured = StepCapture(want_hidden=use_mixup)
        if use_mixup:
            labels = mixup_labels if mixup_labels is not None else inputs["labels"]
            epoch = getattr(getattr(self, "pair_sampler", None), "epoch", 0)
            pairs, lam = batch_pairs(confident, example_idx, self.args, epoch, labels.device)
            self._captured.pending = (pairs, lam, labels)  # computed by forward_and_capture, see sftmix.mixup.capture
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        ntp_loss = result[0] if return_outputs else result
        outputs = self._captured.outputs
        if (training and self.args.record_online_dynamics and example_idx is not None
                and getattr(outputs, "log_probs", None) is not None
                and not getattr(getattr(self, "pair_sampler", None), "mixup_phase", False)):  # one-run: NTP epochs
            record_online(self.online_records, outputs, example_idx, self.accelerator, self.state)
        if not use_mixup:
            self._captured = StepCapture()
            self._log_losses(training, ntp_loss, outputs, None, num_items_in_batch, example_idx)
            return result

        mix = self._captured.mix
        if mix is None and self.mixup_after_forward and self._captured.hidden is not None:
            # The NTP loss ran the backbone itself rather than the model's forward (e.g. a chunked cross-entropy over
            # the label positions): the hidden states were captured all the same; the Mixup term follows it here.
            mix = self._mixup_term(*self._captured.take_pending())
        if mix is None:
            raise SFTMixError(self._missing_mixup_message())
        self._captured = StepCapture()
        self._log_losses(training, ntp_loss, outputs, mix, num_items_in_batch, example_idx)

        # Match the Trainer's normalisation of the NTP loss: when it is already divided by the tokens of the whole
        # accumulated batch, the Trainer does not divide by the accumulation steps, so the per-micro-batch Mixup mean
        # must be. (Across processes DDP averages gradients, which averages the per-process means.)
        scaled_for_ga = self._ntp_scaled_for_ga(num_items_in_batch)
        mix_term = mix / self.current_gradient_accumulation_steps if scaled_for_ga else mix
        mu = mixup_weight_at(self.args, self.state.global_step, self.state.max_steps)
        if self.args.mixup_role == "only":  # the NTP loss is still computed (and logged) but gets no gradient
            loss = mu * mix_term
        else:
            loss = ntp_loss + mu * mix_term
        self._metrics["train"]["mixup_weight"].append(mu)
        return (loss, result[1]) if return_outputs else loss

    def _ntp_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer treats the NTP loss as already normalised over the whole accumulated batch."""
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return bool(scaled_for_ga)

    def _mixup_term(self, pairs, lam, labels):
        """L_Mixup of the batch from the hidden states the hook captured; called inside the model's forward."""
        hidden, self._captured.hidden = self._captured.hidden, None
        weight = lm_head_weight(self._causal_lm)
        # ZeRO-3 (TRL's trainer): gathered for this forward only. _MixedCrossEntropy computes its weight gradient here
        # and saves it; backward hands it to lm_head.weight's gradient accumulator, summed with the NTP head's
        # gradient, where ZeRO-3's reduce-scatter hook takes it (tested on CPU, see docs/distributed.md).
        with self._lm_head_gathered(weight):
            if weight.dim() != 2 or weight.shape[-1] != hidden.shape[-1]:
                raise SFTMixError(
                    f"the LM head weight has shape {tuple(weight.shape)} in the forward (hidden size "
                    f"{hidden.shape[-1]}): it is sharded by a wrapper that does not gather it there (e.g. an FSDP unit "
                    "of its own whose forward never runs); keep lm_head in the root or final-norm unit, or set "
                    "mixup_weight=0.")
            return mixup_loss(hidden, labels.to(hidden.device), weight, pairs.to(hidden.device),
                              lam.to(hidden.device), self.args.mixup_chunk_tokens)

    # -- logging and the non-finite loss check ----------------------------------------------------------------------
    def _log_losses(self, training, ntp_loss, outputs, mix, num_items_in_batch, example_idx):
        """Log `ntp_loss` and `mixup_loss` with one gather across processes; in training, stop on a non-finite loss.

        `ntp_loss` is the token mean over every process (and, given num_items_in_batch, over the whole accumulated
        batch): the NTP part of the logged `loss`, however the batch is split. `mixup_loss` is the mean over processes
        of each process's pair mean, the quantity whose gradient DDP/FSDP/ZeRO average. The check runs on gathered
        values, so every process raises together (no rank is left waiting in a collective), before backward().
        """
        mode = "train" if training else "eval"
        has_lp = getattr(outputs, "log_probs", None) is not None
        zero = torch.zeros((), dtype=torch.float32, device=ntp_loss.device)
        stats = torch.stack([
            -outputs.log_probs.detach().float().sum() if has_lp else zero,
            outputs.label_mask.sum().float() if has_lp else zero,
            zero + (num_items_in_batch if num_items_in_batch is not None else 0),
            mix.detach().float() if mix is not None else zero,
            ntp_loss.detach().float(),
        ])
        g = self.accelerator.gather(stats[None]).reshape(-1, stats.numel())
        if has_lp:
            if training and num_items_in_batch is not None:
                # Each micro-batch's share of the accumulated token mean, times the steps: the mean of the values
                # logged over one optimizer step is the step's token mean. With average_tokens_across_devices every
                # process holds the global count.
                total = g[:, 2].sum() / (g.shape[0] if self.args.average_tokens_across_devices else 1)
                ntp = g[:, 0].sum() / total.clamp(min=1) * self.current_gradient_accumulation_steps
            else:
                ntp = g[:, 0].sum() / g[:, 1].sum().clamp(min=1)
        else:
            # Another trainer's own NTP loss (e.g. the model's): the mean over processes of the value it returned
            # (the Trainer multiplies it by the process count when it divides by the global token count), times the
            # accumulation steps when it is a share of the accumulated batch's token mean, as above.
            scaled = training and self._ntp_scaled_for_ga(num_items_in_batch)
            ntp = g[:, 4].mean() * (self.current_gradient_accumulation_steps if scaled else 1)
        self._metrics[mode]["ntp_loss"].append(ntp.item())
        if mix is not None:
            self._metrics[mode]["mixup_loss"].append(g[:, 3].mean().item())
        if training:
            bad = [name for name, col in (("NTP", 4), ("Mixup", 3)) if not torch.isfinite(g[:, col]).all()]
            if bad:
                values = f"NTP loss {g[:, 4].tolist()}, Mixup loss {g[:, 3].tolist() if mix is not None else 'off'}"
                raise SFTMixError(self._nonfinite_message(" and ".join(bad) + " loss", values, example_idx))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL's SFTTrainer logs self._metrics itself; for other trainers the mean of each metric since the last log
        # joins the Trainer's logs here (as TRL does: `eval_` prefix in evaluation).
        if getattr(self, "_sftmix_logs_metrics", False):
            mode = "train" if self.model.training else "eval"
            metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
            logs.update({f"eval_{k}" if mode == "eval" else k: v for k, v in metrics.items()})
            self._metrics[mode].clear()
        super().log(logs, start_time)
