"""Multiple choice under both protocols on the real SmolLM2-135M-Instruct: accuracy per round and the spread between
rounds on the first Q questions of ../shared/data/pubmedqa_pqal_dev500.json (a benchmark, not a test).

    OMP_NUM_THREADS=1 nice python benchmarks/mc_protocols.py                    # 200 questions, 3 rounds
    python benchmarks/mc_protocols.py --questions 20 --rounds 2                 # a quick look

lm-eval: lm-evaluation-harness's prompts, one fixed label-balanced 3-shot set taken from the file (removed from the
evaluated questions); its shots and its scoring are deterministic, so it is one round (more would repeat it exactly).
biomistral: BioMistral's prompt, a 3-shot set per question drawn each round (seeds 0, 1, 2) from the file's other
questions (the file is PubMedQA's labelled questions outside its test split; no training split of its own is at
hand, so the pool is leave-one-out over the file). Both score the options by log-likelihood (sftmix.eval.mc).
Writes benchmarks/results/mc_protocols.json and prints the figures docs/results.md records.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default=str(ROOT.parent / "shared" / "data" / "pubmedqa_pqal_dev500.json"))
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--work_dir", default="/tmp/sftmix_mc_protocols")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mc_protocols.json"))
    args = ap.parse_args(argv)

    from sftmix.config import EvalConfig
    from sftmix.eval.evaluate import run_eval
    from sftmix.models import load_model_and_tokenizer
    from sftmix.utils import atomic_write_json

    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    results = {"model": args.model, "file": args.file, "questions": args.questions, "protocols": {}}
    for protocol, rounds in (("lm-eval", 1), ("biomistral", args.rounds)):
        cfg = EvalConfig(pubmedqa_file=args.file, mc_protocol=protocol, eval_rounds=rounds, num_shots=3, seed=0,
                         mc_limit=args.questions, batch_size=args.batch_size, max_length=4096)
        t0 = time.perf_counter()
        m = run_eval(model, tok, cfg, Path(args.work_dir) / protocol)["pubmedqa"]
        accs = m.get("accuracies") or [m["accuracy"]]
        results["protocols"][protocol] = {
            "n": m["n"], "rounds": len(accs), "accuracy_per_round": accs, "mean": m["accuracy"],
            "sd": m.get("accuracy_sd", 0.0), "spread": max(accs) - min(accs), "seconds": time.perf_counter() - t0,
            "n_truncated": [r.get("n_truncated") for r in m.get("rounds", [m])],
            "prediction_counts": [r.get("prediction_counts") for r in m.get("rounds", [m])],
            "answer_counts": m.get("answer_counts") or m["rounds"][0]["answer_counts"]}
        p = results["protocols"][protocol]
        print(f"{protocol}: n={p['n']} rounds={p['rounds']} accuracy per round "
              f"{', '.join(f'{a:.4f}' for a in accs)}; mean {p['mean']:.4f} ± {p['sd']:.4f} (population sd), "
              f"max-min {p['spread']:.4f}; {p['seconds']:.0f} s; predictions {p['prediction_counts']}", flush=True)
    atomic_write_json(Path(args.out), results)
    return results


if __name__ == "__main__":
    from sftmix.utils import one_line_errors

    with one_line_errors("benchmarks/mc_protocols.py"):
        main()
