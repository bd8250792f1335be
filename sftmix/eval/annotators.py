"""AlpacaEval 2's judgments through the alpaca_eval package itself (0.6.6; `pip install 'sftmix[alpaca-eval]'`): its
annotator configs (default weighted_alpaca_eval_gpt4_turbo: one token, the preference from its logprobs) sent to the
user's OpenAI-compatible judge (judge_base_url, judge_model, the key from judge_api_key_env), its win rate and its
length_controlled_v1 model.

    from sftmix.eval.annotators import annotate, summarize_annotations
    anns = annotate("weighted_alpaca_eval_gpt4_turbo", instructions, outputs, references, cfg, "run/eval/ntp")
    summarize_annotations(anns)   # {"win_rate", "win_rate_se", "lc_win_rate", "n", "n_valid", "n_failed", ...}

The package's config is used as it is, with three things replaced so that it reaches the user's judge: the model name
(judge_model), the client (a client config with judge_base_url and the key) and the prompt template's path (made
absolute, as the config is copied to OUTPUT_DIR/alpaca_eval/<annotator>/configs.yaml). alpaca_eval caches its own
annotations in OUTPUT_DIR/alpaca_eval/annotations_seed<seed>.json, so a rerun sends no request for them.
Annotators without logprobs (for judges that cannot return them): NON_LOGPROB.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from sftmix.utils import SFTMixError

log = logging.getLogger(__name__)

DEFAULT = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2's annotator (the leaderboard's and the paper's)
NON_LOGPROB = ("alpaca_eval_gpt4_turbo_fn", "chatgpt_fn", "alpaca_eval_gpt4")  # alpaca_eval's, discrete verdicts


def resolve(name: str) -> str:
    """The annotator to use: `auto` is alpaca_eval's DEFAULT when the package is installed, else sftmix's pairwise
    prompt ("sftmix"); a named alpaca_eval annotator needs the package."""
    try:
        import alpaca_eval  # noqa: F401
        have = True
    except ImportError:
        have = False
    if name == "auto":
        return DEFAULT if have else "sftmix"
    if name != "sftmix" and not have:
        raise SFTMixError(f"alpacaeval_annotator={name} needs the alpaca_eval package: pip install "
                          f"'sftmix[alpaca-eval]', or set alpacaeval_annotator sftmix")
    return name


def _config(name: str) -> dict:
    import alpaca_eval
    import yaml

    base = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    path = base / name / "configs.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in base.glob("*/configs.yaml"))
        raise SFTMixError(f"alpacaeval_annotator={name}: alpaca_eval has no such annotator config; e.g. "
                          f"{', '.join([DEFAULT, *NON_LOGPROB])} ({len(known)} in {base})")
    conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    inner = conf[name]
    if "prompt_template" in inner:
        inner["prompt_template"] = str(base / inner["prompt_template"])
    return conf


def uses_logprobs(name: str) -> bool:
    return bool(_config(name)[name].get("completions_kwargs", {}).get("logprobs"))


def annotate(name: str, instructions: list[str], outputs: list[str], references: list[str], cfg,
             output_dir, seed: int = 0) -> list[dict]:
    """alpaca_eval's annotations (output_1 = the reference, output_2 = the model), in the evaluated order, each with
    `index` (the instruction's row) and `preference` in [1, 2] (2: the model's output preferred) or None (failed)."""
    import yaml
    from alpaca_eval.annotators import PairwiseAnnotator

    out = Path(output_dir) / "alpaca_eval"
    conf = _config(name)
    kw = conf[name].setdefault("completions_kwargs", {})
    kw["model_name"] = cfg.judge_model
    # the key is never written to a file: the openai client alpaca_eval builds reads OPENAI_API_KEY from the
    # environment (set here from judge_api_key_env / judge_api_key); a local server without a key gets "none"
    key = cfg.judge_api_key or (os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None)
    if key:
        os.environ["OPENAI_API_KEY"] = key
    client = {"base_url": cfg.judge_base_url, **({} if key else {"api_key": "none"})}
    clients = out / "client_config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    clients.write_text(yaml.safe_dump({"default": [client]}))
    kw["client_config_path"] = str(clients.resolve())
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "configs.yaml").write_text(yaml.safe_dump(conf))
    annotator = PairwiseAnnotator(annotators_config=str((out / name / "configs.yaml").resolve()), seed=seed,
                                  caching_path=str((out / f"annotations_seed{seed}.json").resolve()))
    anns = annotator.annotate_head2head(
        outputs_1=[{"instruction": i, "output": r, "generator": "reference"} for i, r in zip(instructions, references)],
        outputs_2=[{"instruction": i, "output": o, "generator": "model"} for i, o in zip(instructions, outputs)])
    by = {(a["instruction"], a["output_2"]): a for a in anns}
    rows = []
    for idx, (i, o, r) in enumerate(zip(instructions, outputs, references)):
        a = by.get((i, o)) or {}
        p = a.get("preference")
        p = None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p)
        rows.append({"index": idx, "instruction": i, "output": o, "reference": r, "preference": p, "annotator": name,
                     "failed": p is None, "retryable": p is None,
                     "error": None if p is not None else "alpaca_eval returned no preference"})
    return rows


def summarize_annotations(rows: list[dict]) -> dict:
    """alpaca_eval's win rate (get_winrate) and length_controlled_v1 LC win rate over the annotated rows, as
    fractions; failed rows are counted apart and never scored."""
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
    from alpaca_eval.metrics.winrate import get_winrate

    ok = [r for r in rows if not r["failed"]]
    out = {"n": len(rows), "n_valid": len(ok), "n_failed": len(rows) - len(ok),
           "n_failed_retryable": sum(r["retryable"] for r in rows), "win_rate": None, "win_rate_se": None,
           "lc_win_rate": None, "lc_note": None, "lc_method": "alpaca_eval length_controlled_v1"}
    if not ok:
        out["lc_note"] = "no successful judgment"
        return out
    anns = [{"instruction": r["instruction"], "output_1": r["reference"], "output_2": r["output"],
             "generator_1": "reference", "generator_2": "model", "annotator": r["annotator"],
             "preference": r["preference"], "index": r["index"]} for r in ok]
    w = get_winrate(anns)
    out["win_rate"], out["win_rate_se"] = float(w["win_rate"]) / 100, float(w["standard_error"]) / 100
    out.update(wins=float(w["n_wins"]), losses=float(w["n_wins_base"]), ties=float(w["n_draws"]))
    lc = get_length_controlled_winrate(anns, save_weights_dir=None, is_warn_extreme_changes=False)
    out["lc_win_rate"] = float(lc["length_controlled_winrate"]) / 100
    return out
