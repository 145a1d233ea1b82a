"""Command line: `python -m finetune <command> ...`.

    validate FILE   check a training file; prints the report as JSON, exit 1 if invalid
    gen             write a domain suite's SFT data as chat JSONL
    sft             LoRA SFT on a chat JSONL file          (finetune/cli_train.py)
    grpo            GRPO with LoRA on a domain suite       (finetune/cli_train.py)
    eval            held-out accuracy per family, as JSON  (finetune/cli_train.py)
    pretrain        train the tiny base model from scratch (finetune/cli_train.py)

Each command is a pair: `add_<name>(subparsers)` declares its arguments and sets
`func`, a function of the parsed arguments returning the exit status. A new command
(sft, grpo, eval, pretrain) adds its pair and one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from finetune import cli_train


def add_validate(subparsers) -> None:
    # Defaults (None) are filled in by run_validate: importing finetune.data here would
    # load torch for every command, `gen` included.
    parser = subparsers.add_parser(
        "validate",
        help="check a training file (chat, alpaca or sharegpt JSONL)",
        description="Check a training file and print the report as JSON. Exit status 1 "
        "when it is invalid; the errors name their lines.",
    )
    parser.add_argument("file", help="the JSONL file")
    parser.add_argument("--max-line-bytes", type=int, help="longest line accepted (1 MiB)")
    parser.add_argument("--max-examples", type=int, help="most examples read (200000)")
    parser.add_argument("--max-chars", type=int, help="per-example character limit (200000)")
    parser.add_argument("--tokenizer", help="tokenizer directory, for token statistics")
    parser.add_argument("--max-tokens", type=int, help="per-example token limit")
    parser.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from finetune import data

    tokenizer = None
    if args.tokenizer:
        from finetune.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.max_tokens is not None and tokenizer is None:
        print("--max-tokens needs --tokenizer", file=sys.stderr)
        return 2
    try:
        report = data.validate(
            args.file,
            max_line_bytes=_or_default(args.max_line_bytes, data.DEFAULT_MAX_LINE_BYTES),
            max_examples=_or_default(args.max_examples, data.DEFAULT_MAX_EXAMPLES),
            max_chars=_or_default(args.max_chars, data.DEFAULT_MAX_CHARS),
            tokenizer=tokenizer,
            max_tokens=args.max_tokens,
        )
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    for error in report.errors[:20]:
        where = f" ({error.field})" if error.field else ""
        print(f"{args.file}:{error.line}: {error.message}{where}", file=sys.stderr)
    return 0 if report.ok else 1


def _or_default(value, default):
    return default if value is None else value


def add_gen(subparsers) -> None:
    from finetune.domains import SUITES

    parser = subparsers.add_parser(
        "gen",
        help="write a domain suite's SFT data as chat JSONL",
        description="Generate seeded task items and write them as OpenAI chat JSONL "
        "(system prompt, question, reference completion).",
    )
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--n", type=int, default=100, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output JSONL path")
    parser.set_defaults(func=run_gen)


def run_gen(args: argparse.Namespace) -> int:
    from finetune.domains import SUITES

    if args.n < 1:
        print("--n must be positive", file=sys.stderr)
        return 2
    n = SUITES[args.suite].to_sft_jsonl(args.out, args.n, args.seed)
    print(json.dumps({"suite": args.suite, "n": n, "seed": args.seed, "out": args.out}))
    return 0


COMMANDS: list[Callable] = [add_validate, add_gen, *cli_train.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune", description="Enclave training tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
