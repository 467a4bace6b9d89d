"""
infer_onnx: write tunes with an exported musicrnn model, using onnxruntime and numpy only.

    python infer_onnx.py --model runs/musicrnn.onnx --num 5 --meter 6/8 --key D
    python infer_onnx.py --num 32 --temperature 0.8 --out runs/tunes.abc

It never imports torch: the tokenizer and vocabulary (abc_tokens), the sampling loop
(sampler) and the constraint (abc_constraint) are the same code that musicrnn.py uses, so
the same seed and flags give the same tunes (float32 rounding aside: the README says how
rarely torch's differ). Everything the runtime needs (vocabulary,
model shape) is in the .onnx file's metadata (exported_model).
"""

from __future__ import annotations

import argparse
import os
import sys

import cli  # first: Ctrl-C while numpy and onnxruntime load is one line, as it is later
cli.quiet_interrupt_while_loading(__name__)

import sampler
from exported_model import load_model, model_facts, onnx_step


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="infer_onnx.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="runs/musicrnn.onnx",
                        help="the exported model, made by export.py (default: runs/musicrnn.onnx)")
    parser.add_argument("--threads", type=cli.int_in(1, os.cpu_count() or 1), default=None,
                        help=f"onnxruntime threads, at most the {os.cpu_count()} cores here "
                             f"(default: one per physical core)")
    sampler.add_sampling_flags(parser)
    return parser


def generate(args: argparse.Namespace) -> None:
    def load():
        session, vocab, config = load_model(args.model, args.threads)
        return onnx_step(session, config), vocab, model_facts(config)

    sampler.run_generation(load, args, args.model)


def main(argv: list[str] | None = None) -> int:
    return cli.run_command(generate, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
