"""The `sftmix` command: the whole SFTMix recipe from a YAML file, each stage also on its own.

    sftmix run                                             # the embedded demo (configs/demo.yaml): SmolLM2 on ShareGPT
    sftmix run --config configs/smoke.yaml --output_dir runs/smoke      # tiny model, seconds
    sftmix run --config configs/smoke.yaml --output_dir runs/x --data my.jsonl --mixup_weight 0.5
    sftmix dynamics --output_dir runs/x                    # step 1 only: reference run, confidence.jsonl, plots
    sftmix train --recipe ntp --output_dir runs/x          # one target run (sftmix or ntp)
    sftmix eval --output_dir runs/x ;  sftmix report --output_dir runs/x
    sftmix sweep configs/ablations/*.yaml --output_dir runs/abl   # several configs, one merged table (sftmix.sweep)
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sftmix.cli run --config configs/...yaml

Configuration (YAML + `--key value` overrides, which config file is read): sftmix.config; `sftmix run -h` lists every
setting with its help. The resolved config is written to DIR/config.yaml before anything runs.
User errors (bad config, bad data, missing files) print one line, `sftmix: error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys

from sftmix.config import (  # noqa: F401  (re-exported: `from sftmix.cli import parse_config` keeps working)
    RECIPES,
    Config,
    RunConfig,
    _eval_args_class,
    _parser_class,
    parse_config,
)
from sftmix.console import setup_logging as _setup_logging
from sftmix.utils import SFTMixError, one_line_errors

log = logging.getLogger("sftmix")

COMMANDS = {
    "run": "the whole recipe: data, step 1 (reference + confidence), each recipe's training, eval, report",
    "dynamics": "step 1 only: train the reference, score its checkpoints, write confidence.jsonl and plots",
    "train": "train the target with one recipe (--recipe sftmix|ntp; default: every recipe of the config)",
    "eval": "evaluate the start model and every trained recipe (held-out NLL; multiple choice/judge if set)",
    "report": "write report.md, report.json and report.html from what the run directory holds",
    "sweep": "run several configs (`sftmix run` each) and merge their reports into one table (see sftmix.sweep)",
}


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _command_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftmix", allow_abbrev=False,
                                description="SFTMix: Mixup-regularized instruction tuning (Xiao et al., 2410.05248).",
                                epilog="Settings: `sftmix run -h`. Example: sftmix run --config configs/smoke.yaml "
                                       "--output_dir runs/smoke")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sp = sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        if name == "train":
            sp.add_argument("--recipe", choices=RECIPES, help="which target run; default: every recipe of the config")
    return p


def run_command(argv: list[str]) -> int:
    cmd_parser = _command_parser()
    if not argv or argv[0] in ("-h", "--help"):
        cmd_parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        raise SFTMixError(f"unknown command {argv[0]!r}" + (f"; did you mean `{close[0]}`?" if close else
                                                              f"; use one of {', '.join(COMMANDS)}."))
    command, rest = argv[0], argv[1:]
    if command == "sweep":  # several configs and its own options: sftmix.sweep parses them
        from sftmix import sweep

        _setup_logging()
        return sweep.main(rest)
    recipe = None
    if command == "train":
        ns, rest = cmd_parser.parse_known_args(argv)
        recipe = ns.recipe
    if any(a in ("-h", "--help") for a in rest):
        from sftmix.trainer import SFTMixConfig

        _parser_class()((RunConfig, SFTMixConfig, _eval_args_class()), prog=f"sftmix {command}").print_help()
        return 0
    _setup_logging()
    from sftmix import pipeline

    pipeline.cpu_launch()  # before parse_config: the training config sets up the process group when it is parsed
    cfg = parse_config(rest)

    return pipeline.run(cfg, command, recipe=recipe)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors are one line on stderr and exit code 2; bugs keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("sftmix"):
        code = run_command(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
