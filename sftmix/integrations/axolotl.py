"""SFTMix as an axolotl plugin: axolotl's own trainer, data pipeline and YAML, plus the Mixup term of
sftmix.mixup.mixin (SFTMixMixin).

    # step 1, in sftmix's environment: the reference run writes runs/ref/confidence.jsonl (guid -> confidence) for
    # every row (step1.yaml: no held-out split, no filter, max_length = sequence_len; docs/integrations.md)
    sftmix dynamics --config examples/axolotl/step1.yaml --output_dir runs/ref
    # step 2, in axolotl's environment (pip install 'sftmix[axolotl]'): train with axolotl
    axolotl train examples/axolotl/sftmix.yaml

    plugins:
      - sftmix.integrations.axolotl.SFTMixPlugin
    sftmix_confidence_file: runs/ref/confidence.jsonl
    sftmix_mixup_alpha: 0.5
    sftmix_mixup_weight: 0.2

How each row knows its half: by content hash, before tokenisation. The plugin's `load_datasets` runs axolotl's own
dataset loading with one addition: where axolotl turns each raw dataset into tokenized rows (get_dataset_wrapper),
the raw rows are still there, and each gets its sftmix guid (sftmix.data.row_records: the content hash of the normalised
example, as `sftmix dynamics` computed it for the same file). The tokenized rows come from that one `map` over the raw
rows, in order, so the guid column goes onto them after checking that the counts agree and that each row's response
text is in its trained tokens. The `guid` column then survives axolotl's merge, length filter, deduplication,
validation split and prepared-dataset cache; the train rows get `confident`/`confidence` from the confidence file by
guid. Every mismatch is a one-line SFTMixError naming the file and the fix (`sftmix_unmatched_rows: drop` leaves out
rows without a confidence, e.g. the examples step 1 held out for its evaluation, and logs their count).

The YAML's settings are checked when axolotl validates it, before any dataset is read (the pydantic validator runs
sftmix.integrations.axolotl_checks.check_plugin_config: the core's Mixup checks with the `sftmix_` names, packing,
rl, an odd micro_batch_size). `get_trainer_cls` returns SFTMixAxolotlTrainer = sftmix.mixup.mixin.SFTMixMixin +
axolotl's AxolotlTrainer (axolotl's NTP loss and features unchanged; the balanced sampler replaces its sampler).
The training arguments get the MixupArguments fields (sftmix.mixup.args) through `get_training_args_mixin` /
`get_training_args`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, create_model, model_validator

from sftmix.integrations.axolotl_checks import YAML_FIELDS, check_plugin_config
from sftmix.mixup.args import MixupArguments
from sftmix.mixup.sampling import BalancedPairSampler
from sftmix.utils import SFTMixError

log = logging.getLogger(__name__)

_MIXUP_FIELDS = {f.name: f for f in dataclasses.fields(MixupArguments)}


class _SFTMixArgsBase(BaseModel):
    sftmix_confidence_file: str | None = Field(
        default=None, description="confidence.jsonl written by step 1 (`sftmix dynamics`): one row per guid with "
                                  "`confident` and `confidence`; required when Mixup is on.")
    sftmix_unmatched_rows: Literal["error", "drop"] = Field(
        default="error", description="Training rows without a row in the confidence file: `error` (stop, naming the "
                                     "first one) or `drop` (leave them out, counted in the log), e.g. the examples "
                                     "step 1 held out for its evaluation.")

    @model_validator(mode="after")
    def _sftmix_check(self):
        # merged into axolotl's config model, `self` also has axolotl's keys (sample_packing, micro_batch_size, rl):
        # the whole config is checked here, when axolotl validates the YAML, before any dataset is read
        try:
            check_plugin_config(self)
        except SFTMixError as e:
            raise ValueError(str(e)) from None  # pydantic reports ValueErrors as validation errors
        return self


# A pydantic model whose sftmix_* fields mirror MixupArguments (one home for defaults and help texts).
SFTMixArgs = create_model(
    "SFTMixArgs", __base__=_SFTMixArgsBase, __module__=__name__,
    __doc__="The axolotl YAML keys of the SFTMix plugin (merged into axolotl's config by get_input_args).",
    **{f"sftmix_{name}": (typ, Field(default=_MIXUP_FIELDS[name].default,
                                     description=_MIXUP_FIELDS[name].metadata["help"]))
       for name, typ in YAML_FIELDS.items()},
)


class SFTMixPlugin(BasePlugin):
    """axolotl plugin: `plugins: [sftmix.integrations.axolotl.SFTMixPlugin]`; see the module docstring."""

    def get_input_args(self) -> str:
        return "sftmix.integrations.axolotl.SFTMixArgs"

    def get_training_args_mixin(self) -> str:
        return "sftmix.mixup.args.MixupArguments"

    def get_training_args(self, cfg) -> dict:
        return {name: cfg[f"sftmix_{name}"] for name in YAML_FIELDS}

    def get_trainer_cls(self, cfg):
        check_plugin_config(cfg)  # as validated with the YAML; again for a config built without that validation
        # imported here, not at the top: axolotl builds its training-arguments class when that module is first
        # imported, which must come after this plugin has registered its MixupArguments mixin
        from sftmix.integrations.axolotl_trainer import SFTMixAxolotlTrainer

        return SFTMixAxolotlTrainer

    def load_datasets(self, cfg, preprocess: bool = False):
        if cfg.rl or cfg.pretraining_dataset:
            return None
        check_plugin_config(cfg)  # before axolotl tokenizes anything (also for a config built without validation)
        if not preprocess and cfg.sftmix_confidence_file and not Path(cfg.sftmix_confidence_file).is_file():
            raise _no_confidence_file(cfg.sftmix_confidence_file)  # found before axolotl reads and tokenizes the data
        meta = load_datasets_with_guids(cfg)
        if preprocess:  # `axolotl preprocess`: the prepared cache now holds the guid column
            return meta
        meta.train_dataset = join_confidence_file(meta.train_dataset, cfg.sftmix_confidence_file,
                                                  cfg.sftmix_unmatched_rows)
        if not cfg.max_steps and "confident" in meta.train_dataset.column_names:
            # axolotl derives max_steps from the row count; an SFTMix epoch is the balanced sampler's (the smaller
            # half cycled to the larger one), counted with axolotl's own formula
            sampler = BalancedPairSampler(meta.train_dataset["confident"], cfg.micro_batch_size,
                                          num_replicas=cfg.world_size or 1)
            meta.total_num_steps = int(math.ceil(len(sampler) * cfg.num_epochs / cfg.batch_size))
        return meta


def load_datasets_with_guids(cfg):
    """axolotl's `load_datasets(cfg=cfg)`, with a `guid` column put on each tokenized row (see the module docstring)."""
    import axolotl.utils.data.sft as sft
    from axolotl.common.datasets import load_datasets

    original = sft.get_dataset_wrapper

    def wrapper(*args, **kwargs):
        tokenized, prompter = original(*args, **kwargs)
        return _add_guids(tokenized, kwargs["dataset"], kwargs["dataset_config"], kwargs["tokenizer"]), prompter

    sft.get_dataset_wrapper = wrapper
    try:
        meta = load_datasets(cfg=cfg)
    finally:
        sft.get_dataset_wrapper = original
    if "guid" not in meta.train_dataset.column_names:
        raise SFTMixError(f"the training rows have no `guid` column: axolotl loaded a prepared dataset made without "
                          f"the SFTMix plugin; delete {cfg.dataset_prepared_path or 'dataset_prepared_path'} (or run "
                          "`axolotl preprocess` with the plugin in the config) and train again.")
    return meta


def _add_guids(tokenized, raw, dataset_config, tokenizer):
    from datasets import Dataset

    from sftmix.data import row_records

    path = dataset_config["path"]
    if not isinstance(raw, Dataset) or not isinstance(tokenized, Dataset):
        raise SFTMixError(f"{path}: SFTMix needs map-style datasets (streaming: false): the balanced sampler and the "
                          "confidence join index rows.")
    if tokenized is raw:  # already tokenized by the user: its rows must carry their guid
        if "guid" not in raw.column_names:
            raise SFTMixError(f"{path}: a pre-tokenized dataset needs a `guid` column (sftmix.data's content hash) "
                              "to be joined with the confidence file; add it or give axolotl the raw rows.")
        return tokenized
    records = row_records(raw, source=str(path))
    if len(tokenized) != len(raw):
        raise SFTMixError(f"{path}: axolotl's {dataset_config['type']!r} strategy turned {len(raw)} rows into "
                          f"{len(tokenized)}, so tokenized rows cannot be matched to their guids; use a strategy that "
                          "keeps one row per example (e.g. alpaca, or chat_template on single-turn rows).")
    _check_rows_match(tokenized, records, tokenizer, path)
    if "guid" in tokenized.column_names:
        tokenized = tokenized.remove_columns("guid")
    return tokenized.add_column("guid", [r["guid"] for r in records])


def _check_rows_match(tokenized, records, tokenizer, path, n_checks: int = 64) -> None:
    """Row i of `tokenized` comes from raw row i: its trained tokens contain the start of record i's response
    (compared without whitespace, on up to n_checks rows spread over the dataset)."""
    n = len(records)
    for i in sorted({round(k * (n - 1) / max(n_checks - 1, 1)) for k in range(min(n, n_checks))}):
        response = "".join(records[i]["completion"][0]["content"].split())[:64]
        trained = "".join(tokenizer.decode([t for t in tokenized[i]["labels"] if t != -100]).split())
        if response not in trained:
            raise SFTMixError(f"{path}: tokenized row {i} does not hold the response of raw row {i} (the dataset "
                              "strategy reordered, truncated or rewrote the rows), so rows cannot be matched to their "
                              "confidence; use a strategy that trains each row's response as it is (e.g. alpaca).")


def join_confidence_file(dataset, confidence_file: str, unmatched: str = "error"):
    """`confident` and `confidence` on each row from step 1's confidence.jsonl, by guid
    (sftmix.confidence.reference)."""
    from sftmix.confidence.reference import join_confidence
    from sftmix.utils import read_jsonl

    if not confidence_file:
        return dataset
    try:
        rows = read_jsonl(confidence_file)
    except FileNotFoundError:
        raise _no_confidence_file(confidence_file) from None
    try:
        return join_confidence(dataset, rows, missing=unmatched)
    except SFTMixError as e:
        raise SFTMixError(f"{confidence_file}: {e} With axolotl: train on the data step 1 scored, or set "
                          "sftmix_unmatched_rows: drop.") from None


def _no_confidence_file(path) -> SFTMixError:
    return SFTMixError(f"sftmix_confidence_file {path} does not exist: run step 1 (`sftmix dynamics --config "
                       "examples/axolotl/step1.yaml --output_dir DIR`, docs/integrations.md) and point it at "
                       "DIR/confidence.jsonl.")
