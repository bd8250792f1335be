"""Everything a run can check before it trains: every setting against its range, every input file (data, evaluation
sets, chat templates, judge prompts, models) for existence and parse, the run directory for writability.

    from sftmix.run.validation import validate
    validate(cfg, "run")      # SFTMixError (one line, exit 2) on the first problem; called by run.session.session

A mistake found here costs seconds; found after step 1 it would cost the reference run, and the corrected command
would meet a run directory that holds finished stages. The cross-field checks of the config dataclasses
(RunConfig, SFTMixConfig __post_init__) run earlier, when the config is parsed; the checks here need the whole
config (several dataclasses at once) or the file system.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError

log = logging.getLogger("sftmix")

TEMPLATE_WORDS = ("auto", "model", "plain")


def _num(name: str, value, *, low=None, high=None, low_open=False, allow_none=False, integer=False, why=""):
    """Check one numeric setting: finite, within [low, high] (or (low, high] with low_open)."""
    if value is None:
        if allow_none:
            return
        raise SFTMixError(f"{name} must be set{why}.")
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (integer and value != int(value))
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and value > high)
    if bad:
        rng = "a whole number " if integer else "a number "
        if low is not None:
            rng += f"{'>' if low_open else '>='} {low}"
        if high is not None:
            rng += f"{' and ' if low is not None else ''}<= {high}"
        raise SFTMixError(f"{name}={value!r} is out of range: give {rng.strip()}{why}.")


def validate_settings(cfg) -> None:
    """Ranges of the numeric settings (run, training, evaluation) and the checks that span several of them."""
    run, tr, ev = cfg.run, cfg.train, cfg.eval_args
    _num("score_batch_size", run.score_batch_size, low=1, integer=True)
    _num("reference_learning_rate", run.reference_learning_rate, low=0, low_open=True, allow_none=True)
    _num("reference_epochs", run.reference_epochs, low=0, low_open=True)
    _num("judge_min_valid_fraction", run.judge_min_valid_fraction, low=0, high=1)
    _num("per_device_train_batch_size", tr.per_device_train_batch_size, low=1, integer=True)
    _num("per_device_eval_batch_size", tr.per_device_eval_batch_size, low=1, integer=True)
    _num("gradient_accumulation_steps", tr.gradient_accumulation_steps, low=1, integer=True)
    _num("learning_rate", tr.learning_rate, low=0, low_open=True)
    _num("max_steps", tr.max_steps, low=-1, integer=True)
    _num("num_train_epochs", tr.num_train_epochs, low=0)
    if tr.num_train_epochs == 0 and tr.max_steps <= 0:
        raise SFTMixError("num_train_epochs=0 trains nothing (both recipes would equal the start model); give "
                          "num_train_epochs > 0, or max_steps > 0.")
    _num("max_length", tr.max_length, low=1, integer=True, allow_none=True)
    _num("weight_decay", tr.weight_decay, low=0)
    _num("max_grad_norm", tr.max_grad_norm, low=0, allow_none=True)
    _num("warmup_steps", tr.warmup_steps, low=0)
    _num("adam_beta1", tr.adam_beta1, low=0, high=1)
    _num("adam_beta2", tr.adam_beta2, low=0, high=1)
    _num("adam_epsilon", tr.adam_epsilon, low=0, low_open=True)
    _num("mixup_alpha", tr.mixup_alpha, low=0, low_open=True)
    _num("mixup_weight", tr.mixup_weight, low=0)
    _num("selection_k", getattr(tr, "selection_k", None), low=1, integer=True, allow_none=True)
    _num("mixup_chunk_tokens", getattr(tr, "mixup_chunk_tokens", None), low=1, integer=True, allow_none=True)
    _num("save_total_limit", tr.save_total_limit, low=1, integer=True, allow_none=True)
    _num("dataloader_num_workers", tr.dataloader_num_workers, low=0, integer=True)
    for name in ("seed", "data_seed"):  # numpy's seeding takes 0 .. 2**32 - 1
        _num(name, getattr(tr, name, None), low=0, high=2**32 - 1, integer=True, allow_none=True)
    if "sftmix" in run.recipes and tr.mixup_enabled:
        from sftmix.mixup.guard import check_supported

        check_supported(tr)  # odd batch, packing: what the trainer refuses, before anything trains
    if tr.pairing == "nearest" and tr.split_source == "column":
        # nearest pairing uses step 1's hidden states, and a column split skips step 1
        raise SFTMixError("pairing=nearest pairs examples by the reference model's hidden states, which step 1 "
                          "writes, but split_source=column skips step 1; use pairing=random with a column split, "
                          "or split_source=dynamics.")
    check_one_run(cfg)
    _num("num_shots", ev.num_shots, low=0, integer=True)
    _num("batch_size", ev.batch_size, low=1, integer=True)
    _num("gen_batch_size", ev.gen_batch_size, low=1, integer=True)
    _num("max_new_tokens", ev.max_new_tokens, low=1, integer=True)
    _num("answers", ev.answers, low=0, integer=True)
    _num("answers_max_new_tokens", ev.answers_max_new_tokens, low=1, integer=True)
    _num("eval_max_length", getattr(ev, "eval_max_length", None), low=1, integer=True, allow_none=True)
    _num("mc_limit", ev.mc_limit, low=1, integer=True, allow_none=True)
    _num("eval_seed", getattr(ev, "eval_seed", None), low=0, high=2**32 - 1, integer=True, allow_none=True)
    _num("top_p", ev.top_p, low=0, high=1, low_open=True)
    if ev.do_sample:
        _num("temperature", ev.temperature, low=0, low_open=True, why=" with do_sample")
    _num("judge_timeout", ev.judge_timeout, low=0, low_open=True)
    _num("judge_max_retries", ev.judge_max_retries, low=0, integer=True)
    _num("judge_backoff", ev.judge_backoff, low=0)
    _num("judge_concurrency", ev.judge_concurrency, low=1, integer=True)
    _num("judge_max_tokens", ev.judge_max_tokens, low=1, integer=True)


ONE_RUN = "reference=self (one-run SFTMix)"


def check_one_run(cfg) -> None:
    """reference=self: the settings one-run SFTMix cannot run with (sftmix.confidence.split.one_run_problem, the
    rules the trainer and its callback apply at train time), refused here, before the first stage of the command trains,
    in the names of the run's config (self_ntp_epochs, not the trainer's self_reference_epochs)."""
    from sftmix.confidence.split import one_run_problem

    run, tr = cfg.run, cfg.train
    if run.reference != "self" or "sftmix" not in run.recipes:
        return
    problem = one_run_problem(run.self_ntp_epochs, num_train_epochs=tr.num_train_epochs, max_steps=tr.max_steps,
                              mixup_enabled=tr.mixup_enabled, pairing=tr.pairing, split_source=tr.split_source,
                              ntp_subset=tr.ntp_subset, epochs_name="self_ntp_epochs", what=ONE_RUN)
    if problem:
        raise SFTMixError(problem)


def check_step_counts(cfg, n_train: int) -> None:
    """After the data stage, before any training: enough optimizer steps for the scoring passes of one-run SFTMix
    (self_num_checkpoints within its self_ntp_epochs). `n_train` is the number of training examples (an upper bound
    of what the run trains on, so a refusal here is certain; the callback checks the exact count again)."""
    from accelerate import PartialState

    from sftmix.mixup.sampling import OneRunSampler

    run, tr = cfg.run, cfg.train
    if run.reference != "self" or "sftmix" not in run.recipes or run.self_confidence != "checkpoints":
        return
    if tr.selection in ("long", "random") and tr.selection_k:
        n_train = min(n_train, int(tr.selection_k))
    world = PartialState().num_processes
    sampler = OneRunSampler(n_train, tr.per_device_train_batch_size, 0, run.self_ntp_epochs, None,
                            num_replicas=world)
    batches = 2 * sampler.num_pairs // (tr.per_device_train_batch_size * world)  # per process and epoch
    steps = -(-batches // tr.gradient_accumulation_steps) * run.self_ntp_epochs  # the Trainer rounds up
    if run.self_num_checkpoints > steps:
        raise SFTMixError(f"self_num_checkpoints={run.self_num_checkpoints} scoring passes need as many optimizer "
                          f"steps in the self_ntp_epochs={run.self_ntp_epochs} NTP epoch(s), which have {steps} "
                          f"({n_train} examples, per_device_train_batch_size={tr.per_device_train_batch_size}, "
                          f"gradient_accumulation_steps={tr.gradient_accumulation_steps}, {world} process(es)): "
                          f"lower self_num_checkpoints (or the batch size), or raise self_ntp_epochs.")


def check_template(setting: str, value: str | None) -> None:
    """A chat template setting: auto / model / plain, a readable Jinja file that parses, or a Jinja string."""
    if value is None or value in TEMPLATE_WORDS:
        return
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if os.path.isfile(value):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as e:
            raise SFTMixError(f"{setting}={value}: cannot read the file ({e.strerror}); check its permissions.") from e
        except UnicodeDecodeError as e:
            raise SFTMixError(f"{setting}={value}: not UTF-8 text ({e.reason}); save the template as UTF-8.") from e
        where = f"file {value}"
    elif "{{" in value or "{%" in value:
        text, where = value, "string"
    else:
        raise SFTMixError(f"{setting}: {value!r} is not auto, model, plain, an existing Jinja file or a Jinja "
                          f"template string; fix the path or the setting.")
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise SFTMixError(f"{setting}: the Jinja {where} does not parse (line {e.lineno}: {e.message}); fix the "
                          f"template.") from e


def check_model(setting: str, spec: str | None, trust_remote_code: bool, revision: str | None = None,
                mixup: bool = False) -> None:
    """The model spec resolves (sftmix.models.resolve_model; for a Hub id this fetches config.json, so offline,
    gated and missing repos fail here, before any training); a local folder's config.json parses, its weights are
    whole, and a model that brings its own code (auto_map) is loaded only with trust_remote_code. `mixup`: the
    target of the Mixup recipe, whose config must not soft-cap or scale its logits (what SFTMixMixin refuses when
    it starts, after step 1)."""
    if spec is not None and not str(spec).strip():  # `--model "$UNSET"`: not silently the default model
        raise SFTMixError(f"{setting} is empty (an unset shell variable?); give a model: smollm2, tiny-random, a local "
                          f"HF folder, a .gguf file or a Hub id (org/name).")
    if not spec:
        return
    from sftmix.models import resolve_model

    info = resolve_model(spec, revision=revision)
    check_tokenizer(setting, spec, info)
    path = info.get("path")
    if info.get("kind") not in ("hf-dir", "hub") or not path or not (Path(path) / "config.json").is_file():
        return
    conf = Path(path) / "config.json"
    try:
        data = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SFTMixError(f"{setting}={spec}: {conf} is not readable JSON ({e}); fix or replace the model "
                          f"folder.") from e
    if mixup and isinstance(data, dict):
        from types import SimpleNamespace

        from sftmix.mixup.guard import check_model_config

        # the text model's settings (a multimodal config nests them under text_config)
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
        try:
            check_model_config("the model", SimpleNamespace(**text))
        except SFTMixError as e:
            raise SFTMixError(f"{setting}={spec}: {e}") from None
    if info["kind"] == "hf-dir":
        check_weights(setting, spec, Path(path))
    if isinstance(data, dict) and data.get("auto_map") and not trust_remote_code:
        raise SFTMixError(f"{setting}={spec}: the model brings its own code (auto_map in {conf}), which runs only "
                          f"with --trust_remote_code true; read that code first, then pass the flag (or use a model "
                          f"of an architecture transformers ships).")


# the files a transformers tokenizer is loaded from (any one of them, or any tokenizer* file: tokenizer.model.v3, ...);
# a GGUF file carries its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "tekken.json", "sentencepiece.bpe.model", "spm.model", "merges.txt")


def check_tokenizer(setting: str, spec: str, info: dict) -> None:
    """A model folder or Hub repo has tokenizer files (the data stage and every run load them; without, transformers
    fails with a traceback after the data stage)."""
    if info.get("kind") == "hf-dir":
        files, where = [p.name for p in Path(info["path"]).iterdir()], f"the folder {info['path']}"
    elif info.get("kind") == "hub":
        from sftmix.hub import repo_files

        files, where = repo_files(info["repo_id"], info["sha"], info["path"]), f"the Hub repo at {info['sha'][:12]}"
    else:
        return
    names = [Path(f).name for f in files]
    if not any(n in TOKENIZER_FILES or n.startswith("tokenizer") or n.endswith(".tiktoken") for n in names):
        raise SFTMixError(f"{setting}={spec}: {where} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, "
                          f"...); save the tokenizer beside the weights (tokenizer.save_pretrained(folder)), or use a "
                          f"model that ships one.")


def _loaded(setting: str, path: str, load, *args):
    """Run a loader; text that is not UTF-8 is one line naming the line of the bad byte."""
    try:
        return load(path, *args)
    except UnicodeDecodeError as e:
        from sftmix.data import _line_of_offset

        # read_text decodes the whole file, so e.start is the bad byte's offset in it
        raise SFTMixError(f"{setting}={path}: line {_line_of_offset(path, e.start)} is not UTF-8 text ({e.reason}); "
                          f"save the file as UTF-8.") from e


def check_weights(setting: str, spec: str, folder: Path) -> None:
    """Each .safetensors file of a model folder is readable and whole (header parses, file as long as it says)."""
    from sftmix.utils import safetensors_problem

    for f in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise SFTMixError(f"{setting}={spec}: {f} {problem}; restore or replace that file (or the folder).")


def check_eval_files(cfg) -> None:
    """Every evaluation file set loads (the same loaders as evaluation), and a judge is configured when needed."""
    from sftmix.config import MC_TASKS
    from sftmix.data import load_records
    from sftmix.eval import tasks

    ecfg = cfg.eval_config()
    default_heldout = RunDir(cfg.run_dir).heldout
    if ecfg.heldout_file and Path(ecfg.heldout_file) != default_heldout:
        _loaded("heldout_file", ecfg.heldout_file, load_records)
    for task in MC_TASKS:
        path, shots = getattr(ecfg, f"{task}_file"), getattr(ecfg, f"{task}_shots_file")
        if shots and not path:
            raise SFTMixError(f"{task}_shots_file is set but {task}_file is not; give the file to evaluate.")
        for setting, f in ((f"{task}_file", path), (f"{task}_shots_file", shots)):
            if f:
                _loaded(setting, f, lambda p: tasks.load_mc(task, p, ecfg))
    judged = [t for t in ("mtbench", "alpacaeval") if getattr(ecfg, f"{t}_file")]
    if ecfg.mtbench_file:
        _loaded("mtbench_file", ecfg.mtbench_file, lambda p: tasks.load_mt_bench_set(
            p, ecfg.mtbench_reference_file, ecfg.mtbench_judge_prompts_file))  # FastChat's three files
    if ecfg.alpacaeval_file:
        _loaded("alpacaeval_file", ecfg.alpacaeval_file, tasks.load_alpaca_eval)  # a file, or AlpacaEval 2 by id
    if judged:
        from sftmix.eval.judge import load_prompt

        if not ecfg.judge_model:
            raise SFTMixError(f"{' and '.join(judged)} need{'s' if len(judged) == 1 else ''} a judge: set judge_model "
                              "(and judge_base_url, e.g. "
                              f"http://127.0.0.1:8000/v1 for a local vLLM or llama.cpp server).")
        if not str(ecfg.judge_base_url).startswith(("http://", "https://")):
            raise SFTMixError(f"judge_base_url={ecfg.judge_base_url!r} is not an http(s) URL; e.g. "
                              f"http://127.0.0.1:8000/v1.")
        names = ["system", "pairwise"] if ecfg.alpacaeval_file else []  # MT-Bench: FastChat's templates, above
        for name in names:
            load_prompt(name, ecfg.judge_prompt_dir)


def check_mc_protocol(cfg) -> None:
    """The multiple-choice protocol's own checks: eval_rounds against mc_protocol, and under biomistral each set as
    that protocol reads it (PubMedQA's test questions, the published sizes, a shot pool)."""
    from sftmix.config import MC_TASKS
    from sftmix.eval.evaluate import mc_rounds
    from sftmix.eval.tasks import load_biomistral_sets

    ecfg = cfg.eval_config()
    mc_rounds(ecfg)
    for task in MC_TASKS if ecfg.mc_protocol == "biomistral" else ():
        if getattr(ecfg, f"{task}_file"):
            load_biomistral_sets(task, getattr(ecfg, f"{task}_file"), getattr(ecfg, f"{task}_shots_file"), ecfg)


def check_data(cfg) -> None:
    """Each data path, when it names a local file or folder, exists and is readable (it is parsed by the data stage,
    the first one, before any training); Hub ids are resolved with the run's sources."""
    for data in cfg.run.data if isinstance(cfg.run.data, list) else [cfg.run.data]:
        p = Path(data)
        looks_local = p.suffix.lower() in (".json", ".jsonl", ".arrow", ".parquet", ".csv") or \
            data.startswith((".", "/"))
        if not p.exists():
            if looks_local:
                raise SFTMixError(f"data {data}: no such file or directory; check the path (relative paths start at "
                                  f"{os.getcwd()}, then at the config file's folder).")
            continue
        if not os.access(p, os.R_OK):
            raise SFTMixError(f"data {data}: cannot read it (permission denied); check its permissions.")


def check_run_dir(run_dir: Path) -> None:
    """The run directory is a folder we can write (or can be created)."""
    p = Path(run_dir)
    if p.is_symlink() and not p.exists():
        raise SFTMixError(f"--output_dir {p} is a symbolic link to {os.readlink(p)}, which does not exist; create that "
                          f"folder, or give another --output_dir.")
    if p.exists() and not p.is_dir():
        raise SFTMixError(f"--output_dir {p} is a file, not a folder; give a folder path.")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SFTMixError(f"--output_dir {p}: {probe} is a file, not a folder; choose another --output_dir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SFTMixError(f"--output_dir {p}: cannot write in {probe} (permission denied); choose another "
                          f"--output_dir or fix its permissions.")


READING_COMMANDS = ("eval", "report")  # read a finished (or started) run; they create nothing of their own


def check_existing_run(run_dir: Path, command: str) -> None:
    """`sftmix eval` and `sftmix report` read a run directory: one that does not exist (a mistyped path) or holds no
    run is refused, rather than created and filled with the demo config's stages."""
    p = Path(run_dir)
    if not p.exists():
        raise SFTMixError(f"sftmix {command}: --output_dir {p} does not exist; give the folder of an earlier `sftmix "
                          f"run` (or run it first).")
    if not RunDir(p).config.is_file():
        raise SFTMixError(f"sftmix {command}: --output_dir {p} holds no run (no config.yaml); give the folder of an "
                          f"earlier `sftmix run` (or run it first).")


def make_run_dir(run_dir: Path) -> None:
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SFTMixError(f"--output_dir {run_dir}: cannot create it ({e.strerror}); choose another --output_dir or "
                          f"fix its permissions.") from e


def validate(cfg, command: str = "run") -> None:
    """Every check above, in order of cost; `report` reads only what the run directory holds."""
    from sftmix.rundir import check_inputs_outside

    validate_settings(cfg)
    if command == "dynamics" and cfg.run.reference == "self":
        raise SFTMixError("reference=self has no step 1 (the sftmix run scores its own NTP epochs): run "
                          "`sftmix train --recipe sftmix` or `sftmix run`, or set reference=separate.")
    check_run_dir(cfg.run_dir)
    if command in READING_COMMANDS:
        check_existing_run(cfg.run_dir, command)
    if command == "report":
        return
    check_inputs_outside(cfg)
    check_data(cfg)
    trust = bool(getattr(cfg.train, "trust_remote_code", False))
    check_model("model", cfg.run.model, trust, cfg.run.model_revision,
                mixup="sftmix" in cfg.run.recipes and cfg.train.mixup_enabled)
    if cfg.run.reference_model is not None:
        check_model("reference_model", cfg.run.reference_model, trust, cfg.run.reference_model_revision)
    check_template("chat_template", cfg.run.chat_template)
    check_template("eval_chat_template", getattr(cfg.eval_args, "eval_chat_template", None))
    if command in ("run", "eval"):
        if cfg.run.heldout == 0 and cfg.eval_args.heldout_file is None:
            raise SFTMixError("heldout: 0 holds no examples out, so the held-out evaluation has nothing to score: set "
                              "heldout_file (your own evaluation file), or hold some out (heldout: 0.1).")
        check_eval_files(cfg)
        check_mc_protocol(cfg)
