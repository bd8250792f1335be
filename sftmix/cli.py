"""The `sftmix` command: the whole SFTMix recipe from a YAML file, each stage also on its own.

    sftmix run                                             # the embedded demo (configs/demo.yaml): SmolLM2 on ShareGPT
    sftmix run --config configs/smoke.yaml --output_dir runs/smoke      # tiny model, seconds
    sftmix run --config configs/smoke.yaml --output_dir runs/x --data my.jsonl --mixup_weight 0.5
    sftmix dynamics --output_dir runs/x                    # step 1 only: reference run, confidence.jsonl, plots
    sftmix train --recipe ntp --output_dir runs/x          # one target run (sftmix or ntp)
    sftmix eval --output_dir runs/x ;  sftmix report --output_dir runs/x
    sftmix sweep configs/ablations/*.yaml --output_dir runs/abl   # several configs, one merged table (sftmix.run.sweep)
    sftmix configs ;  sftmix configs copy [NAME ...] [--to configs]    # the shipped configs: list, copy out
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sftmix.cli run --config configs/...yaml

`--config` takes a file or the name of a shipped config (`--config smoke`, `--config ablations/baseline`; a
`configs/...yaml` path that does not exist here is read from the package), so the paper's commands work from an
installed wheel; `sftmix configs copy` writes them all to ./configs for `accelerate launch --config_file` and globs.

Configuration (YAML + `--key value` overrides, which config file is read): sftmix.config; `sftmix run -h` lists every
setting with its help. The resolved config is written to DIR/config.yaml before anything runs.
User errors (bad config, bad data, missing files) print one line, `sftmix: error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys

from sftmix.config import (
    RECIPES,
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
    "sweep": "run several configs (`sftmix run` each) and merge their reports into one table (see sftmix.run.sweep)",
    "configs": "list the shipped configs (paper, ablations, accelerate); `copy [NAME ...] [--to DIR]` copies them out",
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
    if command == "configs":
        return configs_command(rest)
    if command == "sweep":  # several configs and its own options: sftmix.run.sweep parses them
        from sftmix.run import sweep

        _setup_logging()
        return sweep.main(rest)
    recipe = None
    if command == "train":
        ns, rest = cmd_parser.parse_known_args(argv)
        recipe = ns.recipe
    if any(a in ("-h", "--help") for a in rest):
        from sftmix.mixup.trainer import SFTMixConfig

        _parser_class()((RunConfig, SFTMixConfig, _eval_args_class()), prog=f"sftmix {command}").print_help()
        return 0
    _setup_logging()
    # imported here, not at the top: `sftmix --help`, `sftmix configs` and a mistyped command need no torch / TRL
    from sftmix import recipe as sftmix_recipe
    from sftmix.run.context import cpu_launch

    cpu_launch()  # before parse_config: the training config sets up the process group when it is parsed
    cfg = parse_config(rest)

    if command == "run":
        return sftmix_recipe.main(cfg)  # the whole recipe, top to bottom
    return sftmix_recipe.run(cfg, command, recipe=recipe)  # one stage


def configs_command(argv: list[str]) -> int:
    """`sftmix configs`: the shipped configs by name; `copy [NAME ...] [--to DIR]` writes them (default: all, with the
    smoke data they read) under DIR keeping their folders, so that README's `configs/...` paths work verbatim there."""
    from pathlib import Path

    from sftmix.config import resolve_config_path, shipped_configs
    from sftmix.utils import atomic_write_bytes

    p = argparse.ArgumentParser(prog="sftmix configs", allow_abbrev=False, description=configs_command.__doc__)
    p.add_argument("action", nargs="?", choices=["list", "copy", "path"], default="list")
    p.add_argument("names", nargs="*", help="shipped config names (see `sftmix configs`); copy: default all")
    p.add_argument("--to", default="configs", help="copy: the folder to write into (default ./configs)")
    p.add_argument("--force", action="store_true", help="copy: overwrite files that differ")
    p.error = lambda message: (_ for _ in ()).throw(SFTMixError(f"configs: {message}"))
    args = p.parse_args(argv)
    shipped = shipped_configs()
    if not shipped:
        raise SFTMixError("configs: the package ships no configs (a broken install?); reinstall sftmix.")
    root = next(iter(shipped.values())).parent
    while root.name != "configs":
        root = root.parent
    if args.action == "list":
        print(f"shipped configs ({root}); use as `--config NAME`, or `sftmix configs copy [NAME ...]`:")
        for name, path in shipped.items():
            comments = [ln.lstrip("# ") for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
            # the first line of prose (most configs open with their launch command, which names the launcher)
            prose = next((c for c in comments if not c.startswith(("sftmix ", "accelerate "))), "")
            launch = next((c.split()[3] for c in comments[:1] if c.startswith("accelerate launch --config_file")), "")
            text = f"[{Path(launch).stem} launch] {prose}" if launch else prose
            print(f"  {name:<34} {text[:84]}")
        return 0
    paths = [resolve_config_path(n, "sftmix configs") for n in args.names]
    if args.action == "path":
        print("\n".join(str(x) for x in paths))
        return 0
    files = paths or [*shipped.values(), *sorted((root / "data").glob("*"))]
    if not paths or any(x.name == "smoke.yaml" for x in paths):  # the smoke configs read data/ beside them
        files += [f for f in sorted((root / "data").glob("*")) if f not in files]
    dest = Path(args.to)
    for src in files:
        try:
            rel = src.relative_to(root)
        except ValueError:  # a file path given as NAME: copied flat
            rel = Path(src.name)
        target = dest / rel
        if target.exists() and target.read_bytes() != src.read_bytes() and not args.force:
            raise SFTMixError(f"configs copy: {target} exists and differs from the shipped {rel}; move it away or "
                              "add --force.")
        atomic_write_bytes(target, src.read_bytes())
        print(target)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors are one line on stderr and exit code 2; bugs keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("sftmix"):
        code = run_command(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
