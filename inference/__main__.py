"""Command line: ``python -m inference generate --model DIR --prompt "..."``.

Streams the completion to stdout as it is generated. ``--chat`` wraps the prompt as one user
message in the model's (or the adapter's) chat template. Exit status 2 for bad arguments or
an invalid request (the message says why).
"""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    from inference.engine import Engine, Request
    from inference.sampling import SamplingParams

    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop or [],
    )
    if args.chat:
        request = Request(
            messages=[{"role": "user", "content": args.prompt}],
            sampling=sampling,
            adapter=args.adapter,
        )
    else:
        request = Request(prompt=args.prompt, sampling=sampling, adapter=args.adapter)
    with Engine(args.model, fp8=args.fp8) as engine:
        last = None
        for delta in engine.stream(request):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            last = delta
    sys.stdout.write("\n")
    if last is not None and last.usage is not None:
        print(
            f"[{last.finish_reason}; {last.usage.prompt_tokens} prompt tokens, "
            f"{last.usage.completion_tokens} completion tokens]",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("--model", required=True, help="model directory (config.json, safetensors)")
    gen.add_argument("--adapter", help="PEFT LoRA adapter directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument(
        "--fp8", action=argparse.BooleanOptionalAction, default=None, help="quantise to FP8"
    )
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
