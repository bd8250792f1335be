"""`python -m sftmix.evaluate --model DIR --output_dir OUT ...`: the evaluation's command, kept at its old path.

The evaluation itself lives in sftmix.eval.evaluate (run_eval, EvalConfig); this file is only the entry point.
"""

from sftmix.eval.evaluate import main

if __name__ == "__main__":
    main()
