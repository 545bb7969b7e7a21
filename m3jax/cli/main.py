"""The `m3jax` command (also `python -m m3jax`): a training run and the subcommands around it.

    m3jax train --config configs/toy.py [--config.<field>=<value> ...]      (the same as python train.py ...)
    m3jax export --checkpoint runs/toy --output runs/toy_export [--step N] [--pytorch-bin] [--heads-dtype float16]
                 [--lora-adapters]
    m3jax eval --model runs/toy_export --corpus c.jsonl --queries q.jsonl --qrels qrels.tsv [--output r.json]
    m3jax mine --model /models/bge-m3 --input train.jsonl --output mined.jsonl [--pool pool.jsonl] [--mode dense] ...
    m3jax score --model /models/bge-reranker-v2-m3 --input mined.jsonl --output scored.jsonl [--teacher m3] ...
    m3jax export --checkpoint runs/x --step best --output out [--merge-with /models/bge-m3 --merge-weight 0.5]
    m3jax merge --models A B [C ...] [--weights 0.5 0.3 0.2] --output merged
    m3jax merge --models A B --grid 0,0.25,0.5,0.75,1 --eval-set domain=DIR [--eval-set general=DIR] --output out
    m3jax plan --topology v5p-64 --config configs/bge_m3_unified.py [--shapes 8x8:512:2048] [--config.<field>=...]

Errors a user can fix (m3jax.core.errors.M3JaxError: a bad config value, malformed data or eval file, a missing or
incomplete checkpoint, an existing output directory) print one line "m3jax <command>: error: ..." on stderr and exit
with status 2, without a traceback. Flags naming the same thing are spelled the same in every subcommand
(--step, --base-model, --output, --overwrite, --batch-size, --query-max-len, --passage-max-len).

Each subcommand is a module m3jax/cli_<name>.py with `add(subparsers)`, which creates its parser and sets `func` to
its `run(args)` (the parsed args -> an exit status); what several share is in m3jax/cli/common.py. Adding one: write
that module and append its `add` to SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import logging
import sys

import m3jax
from m3jax import config as config_lib
from m3jax.cli import eval as cli_eval
from m3jax.cli import export as cli_export
from m3jax.cli import merge as cli_merge
from m3jax.cli import mine as cli_mine
from m3jax.cli import plan as cli_plan
from m3jax.cli import score as cli_score
from m3jax.cli import train as cli_train
from m3jax.core.errors import M3JaxError

SUBCOMMANDS = [cli_train.add, cli_export.add, cli_eval.add, cli_mine.add, cli_score.add, cli_merge.add, cli_plan.add]


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: "(default: X)" is appended unless the help already says what the
    default is (the word "default"), the flag is required, or it is --help / --version."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    """The installed package's version (importlib.metadata), else m3jax.__version__ (a source tree on PYTHONPATH)."""
    from importlib import metadata

    try:
        return metadata.version("m3jax")
    except metadata.PackageNotFoundError:
        return m3jax.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3jax", description="BGE-M3 fine-tuning in JAX: train, export, eval, "
                                                               "mine, score, merge, plan.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"m3jax {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpFormatter
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # e.g. 2026-05-04 17:35:49,123 INFO m3jax...: ...


def configure_logging() -> None:
    """Timestamped INFO lines on stderr unless the program configured logging itself (e.g. pytest's handlers).
    absl (logging at import time in orbax and grain, imported with this module) runs a bare logging.basicConfig()
    when it first logs: that default handler, which would keep the root at WARNING and lose the INFO lines, is
    replaced."""
    if all(type(h) is logging.StreamHandler and getattr(h.formatter, "_fmt", None) == logging.BASIC_FORMAT
           for h in logging.getLogger().handlers):
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
        for noisy in ("absl", "jax"):  # Orbax logs every handler it creates, jax every backend it probes
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging()
    parser = build_parser()
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        # absl's config flags parse the rest (--config.<field>=<value> for any field of the schema).
        args = argparse.Namespace(command="train", func=cli_train.run, train_argv=argv[1:])
    elif argv[:1] == ["plan"] and not {"-h", "--help"} & set(argv[1:]):
        # argparse takes plan's own flags; absl's config flags --config and --config.<field>=<value>.
        args, rest = parser.parse_known_args(argv)
        unknown = [a for a in rest if not a.startswith("--config.")]
        if unknown:
            try:  # a FlagEmbedding flag: its m3jax spelling
                config_lib.check_foreign_flags(unknown)
            except M3JaxError as e:
                print(f"m3jax plan: error: {e}", file=sys.stderr)
                return 2
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.command, args.config_argv = "plan", ["--config", args.config, *rest]
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except M3JaxError as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
