"""
infer_onnx: write tunes with an exported musicrnn model, using onnxruntime and numpy only.

    python infer_onnx.py --model runs/musicrnn.onnx --num 5 --meter 6/8 --key D
    python infer_onnx.py --num 32 --temperature 0.8 --out runs/tunes.abc

It never imports torch: the tokenizer and vocabulary (abc_tokens), the sampling loop
(sampler) and the constraint (abc_constraint) are the same code that musicrnn.py uses, so
the same seed and flags give the same tunes. Everything the runtime needs (vocabulary,
model shape) is in the .onnx file's metadata (exported_model).
"""

from __future__ import annotations

import argparse
import sys

import cli
import sampler
from abc_tokens import PromptError
from exported_model import ModelError, load_model, onnx_step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer_onnx.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="runs/musicrnn.onnx", help="default: runs/musicrnn.onnx")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="onnxruntime threads (default: one per core)")
    sampler.add_sampling_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        session, vocab, config = load_model(args.model, args.threads)
        tunes = sampler.generate_tunes(onnx_step(session, config), vocab, sampler.sampling_options(args))
        sampler.write_tunebook(sampler.tunebook(tunes), args.out, args.render)
    except (ModelError, PromptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
