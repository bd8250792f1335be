"""The evaluation sets: multiple-choice loaders (PubMedQA, MedQA 4/5 options, MedMCQA; local files or Hub ids), the
shots, the prompts, and MT-Bench's questions.

    from sftmix.eval.tasks import load_mc, split_shots, build_prompt
    items = load_mc("pubmedqa", "../shared/data/pubmedqa_pqal_dev500.json")
    shots, evaluated, info = split_shots(items, None, k=3)
    prompt, options = build_prompt(evaluated[0], shots)

See sftmix.eval.mc for the prompt formats and how the options are scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sftmix.config import MC_TASKS, EvalConfig
from sftmix.utils import SFTMixError, read_jsonl

log = logging.getLogger(__name__)


@dataclass
class MCItem:
    id: str
    text: str  # the question block, ending with "Answer:"
    choices: list[str]  # what is scored after the prompt, without the leading space
    answer: int  # index into choices (and into options)
    # the parts the biomistral protocol renders in its own format: question, option texts (A, B, ... in order),
    # PubMedQA's abstract
    question: str = ""
    options: tuple[str, ...] = ()
    context: str | None = None

    @property
    def content_key(self) -> str:
        """Hash of the question text: the same question under another id is still the same question."""
        return hashlib.sha256(" ".join(self.text.split()).lower().encode("utf-8")).hexdigest()


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# Evaluation sets by Hugging Face Hub id, `ID[:CONFIG[:SPLIT]]` in place of a file (a local file of that name wins):
# the default config and split of each task's usual Hub copy (PubMedQA's labelled set is its only split, `train`;
# MedQA's test split; MedMCQA's validation split, since its test split has no answers).
HUB_DEFAULTS = {"pubmedqa": ("pqa_labeled", "train"), "medqa": (None, "test"), "medqa5": (None, "test"),
                "medmcqa": (None, "validation")}
HUB_EVAL_SOURCES: dict[str, dict] = {}  # spec -> {id, config, split, sha} of every Hub set read, for the metrics


def _hub_spec(path: str) -> tuple[str, str | None, str | None] | None:
    """(id, config, split) when `path` names a Hub dataset (`ID[:CONFIG[:SPLIT]]`) rather than a local file."""
    from sftmix.hub import dataset_spec

    return dataset_spec(path)


def _read_hub_rows(path: str, task: str | None) -> list[dict]:
    from sftmix.hub import load_hub_dataset

    repo_id, config, split = _hub_spec(path)
    default_config, default_split = HUB_DEFAULTS.get(task, (None, "train"))
    ds, source = load_hub_dataset(repo_id, config or default_config, split or default_split)
    HUB_EVAL_SOURCES[str(path)] = source
    log.info("%s: %d rows of %s (config %s, split %s) at %s", task, len(ds), repo_id, source["config"],
             source["split"], source["sha"][:12])
    return [dict(r) for r in ds]


def _rec(path: str, i: int) -> str:
    """How the i-th row (0-based) of an evaluation set is named in errors: a file's line, a Hub split's row index."""
    return f"row {i}" if _hub_spec(path) else f"line {i + 1}"


def _read_rows(path: str, task: str | None = None) -> list[dict]:
    """A JSON array; a JSON object of objects (PubMedQA: keyed by PMID; the key goes to `_key`); or JSON Lines; or a
    Hub dataset `ID[:CONFIG[:SPLIT]]` (defaults per task: HUB_DEFAULTS)."""
    p = Path(path)
    if not p.is_file() and _hub_spec(path):
        return _read_hub_rows(path, task)
    if not p.is_file():
        raise SFTMixError(f"{path}: file not found; check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return read_jsonl(p)  # JSON Lines (or broken JSON: read_jsonl names the bad line)
    if isinstance(data, dict):
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"_key": k, **v} for k, v in data.items()]
        data = [data]  # a one-line JSONL file
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SFTMixError(f"{path}: expected a JSON array of objects, an object of objects, or JSON Lines")
    return data


def _need(row: dict, key: str, path: str, rec: str, types=(str,)):
    v = row.get(key)
    if not isinstance(v, types) or (isinstance(v, str) and not v.strip()):
        raise SFTMixError(f"{path}: record {rec}: field {key!r} is missing or empty (got {str(v)[:60]!r}); fix or "
                          f"remove that record")
    return v


def _lettered(question: str, options: list[str]) -> str:
    lines = [f"Question: {question.strip()}"] + [f"{chr(65 + i)}. {o.strip()}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def load_pubmedqa(path: str) -> list[MCItem]:
    """PubMedQA labelled JSON (ori_pqal.json style): {PMID: {QUESTION, CONTEXTS: [...], final_decision}}; or the Hub
    copy (qiaojin/PubMedQA, pqa_labeled: rows of pubid, question, context {contexts, labels, meshes}, long_answer,
    final_decision)."""
    rows = _read_rows(path, "pubmedqa")
    items = []
    for i, row in enumerate(rows):
        if "QUESTION" not in row and "question" in row and isinstance(row.get("context"), dict):  # the Hub layout
            row = {**row, "QUESTION": row["question"], "CONTEXTS": row["context"].get("contexts")}
        rec = str(row.get("_key", row.get("pubid", i)))
        q = _need(row, "QUESTION", path, rec)
        ctx = _need(row, "CONTEXTS", path, rec, (list,))
        dec = _need(row, "final_decision", path, rec).strip().lower()
        if dec not in ("yes", "no", "maybe"):
            raise SFTMixError(f"{path}: record {rec}: final_decision is {dec!r}, expected yes/no/maybe; fix it")
        text = "Abstract: " + "\n".join(str(c).strip() for c in ctx) + f"\nQuestion: {q.strip()}\nAnswer:"
        items.append(MCItem(rec, text, ["yes", "no", "maybe"], ["yes", "no", "maybe"].index(dec), q.strip(),
                            ("yes", "no", "maybe"), " ".join(str(c).strip() for c in ctx)))
    return items


def load_medqa(path: str, n_options: int = 4) -> list[MCItem]:
    """MedQA JSONL: {question, options: {"A": ..., ...}, answer_idx: "A"} (4-option or 5-option release); the same
    on the Hub (GBaker/MedQA-USMLE-4-options), or bigbio med_qa's source layout (options: [{key, value}])."""
    items = []
    for i, row in enumerate(_read_rows(path, "medqa5" if n_options == 5 else "medqa")):
        rec = _rec(path, i)
        q = _need(row, "question", path, rec)
        if isinstance(row.get("options"), list) and all(isinstance(o, dict) and "key" in o for o in row["options"]):
            row = {**row, "options": {str(o["key"]): o.get("value") for o in row["options"]}}  # bigbio layout
        opts = _need(row, "options", path, rec, (dict,))
        letters = sorted(opts)
        if letters != [chr(65 + j) for j in range(len(letters))] or len(letters) != n_options:
            hint = "medqa5_file" if len(letters) == 5 else "medqa_file" if len(letters) == 4 else "a MedQA file"
            raise SFTMixError(f"{path}: {rec}: options are {letters}, expected A-{chr(64 + n_options)} "
                              f"({n_options} options); pass this file as {hint}")
        ans = _need(row, "answer_idx", path, rec).strip()
        if ans not in letters:
            raise SFTMixError(f"{path}: {rec}: answer_idx {ans!r} is not one of {letters}; fix that record")
        options = [str(opts[k]) for k in letters]
        rid = str(row.get("id") or _hash(q + "\x1f" + "\x1f".join(options))[:16])
        items.append(MCItem(rid, _lettered(q, options), letters, letters.index(ans), q.strip(),
                            tuple(o.strip() for o in options)))
    return items


def load_medmcqa(path: str, cop_base: str = "auto") -> list[MCItem]:
    """MedMCQA JSONL: {id, question, opa, opb, opc, opd, cop}; cop 1-4 (official) or 0-3 (HF), see module doc. The
    Hub copy (openlifescienceai/medmcqa) has the same columns, cop 0-based."""
    rows = _read_rows(path, "medmcqa")
    cops = []
    for i, row in enumerate(rows):
        c = row.get("cop")
        if isinstance(c, str) and c.strip().lstrip("-").isdigit():
            c = int(c)
        if not isinstance(c, int) or not -1 <= c <= 4 or c == -1:
            raise SFTMixError(f"{path}: {_rec(path, i)}: cop is {row.get('cop')!r}, expected the correct option as 0-3 "
                              f"or 1-4 (the unlabelled test split cannot be evaluated); fix or remove that record")
        cops.append(c)
    if cop_base == "auto":
        has0, has4 = 0 in cops, 4 in cops
        if has0 and has4:
            raise SFTMixError(f"{path}: cop takes both 0 and 4: neither 0-3 nor 1-4; fix the file")
        if not has0 and not has4:
            raise SFTMixError(f"{path}: cop never is 0 or 4, so it is unclear whether it is 0-based or 1-based; set "
                              f"medmcqa_cop_base to 0 (Hugging Face copy) or 1 (official release)")
        base = 0 if has0 else 1
    else:
        base = int(cop_base)
    items = []
    for i, (row, c) in enumerate(zip(rows, cops)):
        rec = _rec(path, i)
        q = _need(row, "question", path, rec)
        options = [_need(row, k, path, rec) for k in ("opa", "opb", "opc", "opd")]
        ans = c - base
        if not 0 <= ans <= 3:
            raise SFTMixError(f"{path}: {rec}: cop {c} is out of range for {base}-based options; fix that record")
        rid = str(row.get("id") or _hash(q + "\x1f" + "\x1f".join(options))[:16])
        items.append(MCItem(rid, _lettered(q, options), ["A", "B", "C", "D"], ans, q.strip(),
                            tuple(o.strip() for o in options)))
    return items


def load_mc(task: str, path: str, cfg: EvalConfig | None = None) -> list[MCItem]:
    cfg = cfg or EvalConfig()
    if task == "pubmedqa":
        items = load_pubmedqa(path)
    elif task in ("medqa", "medqa5"):
        items = load_medqa(path, 5 if task == "medqa5" else 4)
    elif task == "medmcqa":
        items = load_medmcqa(path, cfg.medmcqa_cop_base)
    else:
        raise SFTMixError(f"unknown multiple-choice task {task!r}; choose one of {', '.join(MC_TASKS)}")
    if not items:
        raise SFTMixError(f"{path}: no questions in the file")
    ids = Counter(it.id for it in items)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise SFTMixError(f"{path}: {len(dup)} ids occur more than once (e.g. {dup[0]!r}); ids must be unique")
    return items


def pick_shots(pool: list[MCItem], k: int) -> list[MCItem]:
    """k shots from `pool`, label-balanced: in sha256(id) order, first one shot per distinct answer (so 3-shot
    PubMedQA shows one yes, one no and one maybe, and MedQA three different letters, which keeps the shots from
    teaching a majority label), then, if k is larger, the next ones in the same order. Returned in hash order."""
    ranked = sorted(pool, key=lambda it: _hash(it.id))
    chosen, used = [], set()
    for it in ranked:
        label = it.choices[it.answer]
        if len(chosen) < k and label not in used:
            chosen.append(it)
            used.add(label)
    chosen += [it for it in ranked if it not in chosen][: k - len(chosen)]
    return sorted(chosen, key=lambda it: _hash(it.id))


def split_shots(eval_items: list[MCItem], pool: list[MCItem] | None, k: int) -> tuple[list[MCItem], list[MCItem], dict]:
    """(shots, evaluated items, info). Shots are picked from the pool by `pick_shots`; without a pool they come
    from the evaluated items themselves, which then lose them. Shots never share an id or a question text with
    an evaluated item."""
    info = {"shots_from": "shots_file" if pool is not None else "hash split of the evaluated file", "n_pool_overlap": 0}
    if k == 0:
        shots, evaluated = [], list(eval_items)
    elif pool is None:
        if k >= len(eval_items):
            raise SFTMixError(f"num_shots={k} would take all {len(eval_items)} questions as shots; lower it or give a "
                              f"shots file")
        shots = pick_shots(eval_items, k)
        chosen = {it.id for it in shots}
        evaluated = [it for it in eval_items if it.id not in chosen]
    else:
        clean = _pool_without(pool, eval_items, info, "file")
        if len(clean) < k:
            raise SFTMixError(f"the shots file has {len(clean)} usable questions, fewer than num_shots={k}")
        shots, evaluated = pick_shots(clean, k), list(eval_items)
    # the guarantee the whole evaluation rests on, checked rather than assumed
    ev_ids, ev_texts = {it.id for it in evaluated}, {it.content_key for it in evaluated}
    assert not any(s.id in ev_ids or s.content_key in ev_texts for s in shots), "a shot is in the evaluated split"
    info["shot_ids"] = [s.id for s in shots]
    info["shot_answers"] = [s.choices[s.answer] for s in shots]
    return shots, evaluated, info


def build_prompt(item: MCItem, shots: list[MCItem], tokenizer=None, chat: bool = False) -> tuple[str, list[str]]:
    """(prompt, continuations). Plain: shots as "text answer" blocks joined by blank lines, continuation " X";
    chat: shots as user/assistant turns rendered by the tokenizer's template, continuation "X"."""
    if not chat:
        prefix = "".join(f"{s.text} {s.choices[s.answer]}\n\n" for s in shots)
        return prefix + item.text, [" " + c for c in item.choices]
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s.text}, {"role": "assistant", "content": s.choices[s.answer]}]
    msgs.append({"role": "user", "content": item.text})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), list(item.choices)


# MT-Bench as FastChat runs it (lm-sys/FastChat, fastchat/llm_judge; fschat 0.2.36): its data/ layout, the
# categories graded against GPT-4's reference answers (common.NEED_REF_CATS) and the sampling temperature of each
# category's answers (common.temperature_config; gen_model_answer.py: 0.7 for any other, greedy below 1e-4).
MTBENCH_HUB_ID = "lmsys/mt-bench"  # the Space of FastChat's MT-Bench: its data/ folder in FastChat's layout
MTBENCH_LAYOUT = {"questions": "data/mt_bench/question.jsonl",
                  "references": "data/mt_bench/reference_answer/gpt-4.jsonl",
                  "judge_prompts": "data/judge_prompts.jsonl"}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
FASTCHAT_DEFAULT_TEMPERATURE = 0.7
FASTCHAT_JUDGE_TEMPLATES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")


def _mt_bench_hub(spec: str) -> tuple[str, str] | None:
    """(repo id, repo type) when `spec` names a Hub repo in FastChat's data/ layout: `spaces/ORG/NAME`,
    `datasets/ORG/NAME`, or `ORG/NAME` (a Space, as lmsys/mt-bench is) that is not a local path."""
    from sftmix.hub import is_hub_id

    if Path(spec).exists():
        return None
    kind, _, rest = str(spec).partition("/")
    if kind in ("spaces", "datasets") and is_hub_id(rest, "dataset"):
        return rest, kind[:-1]
    return (spec, "space") if is_hub_id(spec, "dataset") else None


def mt_bench_files(spec: str, references: str | None = None, judge_prompts: str | None = None) -> dict:
    """The three files of MT-Bench: {"questions", "references", "judge_prompts", "source"}. A Hub repo gives all three
    (FastChat's data/ layout, MTBENCH_LAYOUT); a local question.jsonl finds the other two where FastChat keeps them
    (reference_answer/gpt-4.jsonl beside it, ../judge_prompts.jsonl), unless given. Missing ones are None."""
    hub = _mt_bench_hub(spec)
    if hub is not None:
        from sftmix.hub import download_file

        repo_id, repo_type = hub
        got = {k: download_file(repo_id, f, repo_type) for k, f in MTBENCH_LAYOUT.items()}
        files = {k: v[0] for k, v in got.items()}
        source = {"id": repo_id, "repo_type": repo_type, "sha": got["questions"][1], "files": MTBENCH_LAYOUT}
        HUB_EVAL_SOURCES[str(spec)] = source
    else:
        q = Path(spec)
        files = {"questions": str(q), "references": str(q.parent / "reference_answer" / "gpt-4.jsonl"),
                 "judge_prompts": str(q.parent.parent / "judge_prompts.jsonl")}
        files = {k: v if Path(v).is_file() else None for k, v in files.items()}
        files["questions"], source = str(q), None
    files.update({k: v for k, v in (("references", references), ("judge_prompts", judge_prompts)) if v})
    return {**files, "source": source}


def load_mt_bench(path: str) -> list[dict]:
    """MT-Bench questions (FastChat's question.jsonl: {question_id, category, turns, reference?}), a file or a Hub
    repo in FastChat's layout."""
    if _mt_bench_hub(path) is not None:
        path = mt_bench_files(path)["questions"]
    qs = _read_rows(path)
    for i, q in enumerate(qs):
        turns = q.get("turns")
        if "question_id" not in q or not isinstance(turns, list) or not 1 <= len(turns) <= 2 \
                or not all(isinstance(t, str) and t.strip() for t in turns):
            raise SFTMixError(f"{path}: line {i + 1}: expected {{question_id, turns: [1 or 2 non-empty strings]}}; "
                              f"fix that record")
    return qs


def load_mt_bench_set(spec: str, references: str | None = None, judge_prompts: str | None = None) -> dict:
    """Everything FastChat's single-answer grading reads: {"questions", "references": {question_id: [turn answers]}
    (GPT-4's, for NEED_REF_CATS only), "templates": {name: {system_prompt, prompt_template, output_format}},
    "files", "source"}. Errors name the setting and the fix."""
    files = mt_bench_files(spec, references, judge_prompts)
    qs = load_mt_bench(files["questions"])
    if not files["judge_prompts"]:
        raise SFTMixError(f"mtbench_file={spec}: FastChat's judge prompts (judge_prompts.jsonl) are not beside it "
                          f"(../judge_prompts.jsonl); set mtbench_judge_prompts_file to FastChat's "
                          f"fastchat/llm_judge/data/judge_prompts.jsonl, or use mtbench_file {MTBENCH_HUB_ID}")
    templates = {r.get("name"): r for r in _read_rows(files["judge_prompts"])}
    for name in FASTCHAT_JUDGE_TEMPLATES:
        t = templates.get(name)
        if not t or not isinstance(t.get("prompt_template"), str) or not isinstance(t.get("system_prompt"), str):
            raise SFTMixError(f"{files['judge_prompts']}: no judge template {name!r} with system_prompt and "
                              f"prompt_template; use FastChat's fastchat/llm_judge/data/judge_prompts.jsonl")
    refs: dict = {}
    if files["references"]:
        for i, r in enumerate(_read_rows(files["references"])):
            try:
                refs[r["question_id"]] = list(r["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError):
                raise SFTMixError(f"{files['references']}: line {i + 1}: expected FastChat's answer layout "
                                  f"{{question_id, choices: [{{turns: [...]}}]}}; fix that record") from None
    need = [q for q in qs if q.get("category") in NEED_REF_CATS]
    missing = [q["question_id"] for q in need if len(refs.get(q["question_id"]) or []) < len(q["turns"])]
    if missing:
        where = files["references"] or "no reference file found (reference_answer/gpt-4.jsonl beside it)"
        raise SFTMixError(f"mtbench_file={spec}: questions {missing[:5]} of a reference-graded category "
                          f"({', '.join(NEED_REF_CATS)}) have no GPT-4 reference answer for every turn in {where}; "
                          f"set mtbench_reference_file to FastChat's reference_answer/gpt-4.jsonl")
    return {"questions": qs, "references": {q["question_id"]: refs[q["question_id"]] for q in need},
            "templates": {n: templates[n] for n in FASTCHAT_JUDGE_TEMPLATES}, "files": files,
            "source": files["source"]}


# AlpacaEval 2 (alpaca_eval 0.6.6): the 805 instructions with GPT-4 Turbo's outputs, the reference of its win rates, as
# a raw file of the Hub dataset tatsu-lab/alpaca_eval (whose loading script datasets 5 refuses; its split is `eval`)
ALPACAEVAL_HUB_ID = "tatsu-lab/alpaca_eval"
ALPACAEVAL_2_FILE = "alpaca_eval_gpt4_baseline.json"


def load_alpaca_eval(path: str) -> list[dict]:
    """AlpacaEval rows {instruction, output (the reference), ...}: a local JSON/JSONL file, or by Hub id
    (tatsu-lab/alpaca_eval: AlpacaEval 2's alpaca_eval_gpt4_baseline.json)."""
    from sftmix.hub import is_hub_id

    if not Path(path).exists() and is_hub_id(path, "dataset"):
        from sftmix.hub import download_file

        local, sha = download_file(path, ALPACAEVAL_2_FILE, "dataset")
        HUB_EVAL_SOURCES[str(path)] = {"id": path, "file": ALPACAEVAL_2_FILE, "sha": sha}
        path = local
    rows = _read_rows(path)
    for i, r in enumerate(rows):
        for k in ("instruction", "output"):
            _need(r, k, path, f"{i + 1}")
    return rows


def mt_bench_temperature(category: str | None) -> float:
    """FastChat's sampling temperature for a category's answers (gen_model_answer.py)."""
    return FASTCHAT_TEMPERATURES.get(category, FASTCHAT_DEFAULT_TEMPERATURE)


# --------------------------------------------------------------------------------------------- biomistral protocol
# The three-shot protocol of Labrak et al. 2024 (BioMistral), which the paper's Table 2 follows: BioMistral's prompt
# (Data/Evaluation/BioInstructQA.py, getPrompt, answer left empty), its own shot set per question drawn from the
# task's training split, rounds with other draws (sftmix.eval.rounds). See docs/evaluation.md.

BIOMISTRAL_INSTRUCTION = "The following are multiple choice questions (with answers) about medical knowledge. \n "

# The sizes of the paper's evaluated splits as published (PubMedQA: its official test questions; MedQA's US test
# split in both its 4- and 5-option releases; MedMCQA's validation split, its test split being unlabelled).
PUBLISHED_SIZES = {"pubmedqa": 500, "medqa": 1273, "medqa5": 1273, "medmcqa": 4183}


def pubmedqa_test_pmids() -> set[str]:
    """PubMedQA's 500 official test questions (pubmedqa/pubmedqa data/test_ground_truth.json, commit 1cbae8e, MIT):
    their PubMed ids, shipped as sftmix/eval/pubmedqa_test_pmids.txt."""
    return set((Path(__file__).with_name("pubmedqa_test_pmids.txt")).read_text(encoding="utf-8").split())


def _biomistral_block(item: MCItem, letter: str) -> str:
    """One question as BioMistral's getPrompt.parseElement renders it, `letter` the answer (empty for the asked
    question, whose answer the model continues with)."""
    if not item.options:
        raise SFTMixError(f"question {item.id}: no option texts to render in the biomistral format")
    choices = " \n ".join(f"({chr(65 + j)}) {o}" for j, o in enumerate(item.options))
    context = f"{item.context} \n " if item.context is not None else ""
    return f"{context}**Question:** {item.question} \n {choices} \n **Answer:**({letter}"


def build_biomistral_prompt(item: MCItem, shots: list[MCItem]) -> tuple[str, list[str]]:
    """(prompt, continuations): BioMistral's instruction line, the solved shots, the question ending in
    "**Answer:**(", and the option letters as continuations (its next-token prediction, scored as log-likelihood)."""
    blocks = [_biomistral_block(s, chr(65 + s.answer)) for s in shots]
    prompt = BIOMISTRAL_INSTRUCTION + "".join(b + " \n " for b in blocks) + _biomistral_block(item, "")
    return prompt, [chr(65 + j) for j in range(len(item.options))]


def biomistral_shots(item: MCItem, pool: list[MCItem], k: int, seed: int) -> list[MCItem]:
    """k shots for `item`, drawn uniformly without replacement from `pool` (never the item itself) with a generator
    seeded by (seed, item id): the same question gets the same shots in the same round whatever else is evaluated
    (mc_limit, order), and another set in another round."""
    import random

    rng = random.Random(f"{seed}\x1f{item.id}")
    picked = [pool[i] for i in rng.sample(range(len(pool)), min(k + 1, len(pool)))]
    shots = [s for s in picked if s.id != item.id and s.content_key != item.content_key][:k]
    if len(shots) < k:
        raise SFTMixError(f"the shot pool has {len(pool)} questions, too few for num_shots={k}; give a larger "
                          f"shots file or lower num_shots")
    return shots


def load_biomistral_sets(task: str, eval_file: str, shots_file: str | None,
                         cfg: EvalConfig) -> tuple[list[MCItem], list[MCItem], dict]:
    """(evaluated questions, shot pool, info) under the biomistral protocol. The pool: `<task>_shots_file`; else,
    for a Hub id, the same dataset's train split (PubMedQA: its labelled questions outside the 500 test ones); else
    the evaluated file's other questions (leave one out). A Hub id read with its default split is PubMedQA's test
    questions and is checked against the published size (PUBLISHED_SIZES, mc_check_sizes)."""
    spec = _hub_spec(eval_file)
    items = load_mc(task, eval_file, cfg)
    info, pool = {"split_check": None}, None
    if spec is not None and task == "pubmedqa" and spec[2] is None:
        test = pubmedqa_test_pmids()
        pool = [it for it in items if it.id not in test]
        items = [it for it in items if it.id in test]
        if not items:
            raise SFTMixError(f"pubmedqa_file {eval_file}: none of its {len(pool)} questions is one of PubMedQA's "
                              f"500 test questions (by PubMed id); give the set to evaluate as a local file")
        info["shots_from"] = "the labelled PubMedQA questions outside its test split"
    if spec is not None and spec[2] is None:
        want = PUBLISHED_SIZES[task]
        info["split_check"] = {"expected": want, "found": len(items)}
        if cfg.mc_check_sizes and len(items) != want:
            raise SFTMixError(f"{task}_file {eval_file}: {len(items)} questions, but the published split has {want}; "
                              f"point {task}_file at a complete copy, or set mc_check_sizes false to evaluate it "
                              f"as it is")
    if shots_file:
        pool, info["shots_from"] = load_mc(task, shots_file, cfg), f"{task}_shots_file"
    elif spec is not None and task != "pubmedqa":
        repo, config, _ = spec
        pool = load_mc(task, f"{repo}:{config or ''}:train", cfg)
        info["shots_from"] = "the train split of the same Hub dataset"
    if pool is None:  # a local file and no shots file: each question's shots are the file's other questions
        pool, info["shots_from"] = list(items), "the evaluated file's other questions (leave one out)"
    else:  # a separate pool: nothing in it may also be evaluated
        pool = _pool_without(pool, items, info, "set")
    info["n_pool"] = len(pool)
    return items, pool, info


def _pool_without(pool, evaluated, info: dict, what: str) -> list:
    """The shot pool without any question that is also evaluated (by id or by content): a shot must never be a
    question under test. Counts the dropped ones in info["n_pool_overlap"] and says so."""
    ids, texts = {it.id for it in evaluated}, {it.content_key for it in evaluated}
    clean = [it for it in pool if it.id not in ids and it.content_key not in texts]
    info["n_pool_overlap"] = len(pool) - len(clean)
    if info["n_pool_overlap"]:
        log.warning("%d shot-pool questions also occur in the evaluated %s; they are not used as shots",
                    info["n_pool_overlap"], what)
    return clean
