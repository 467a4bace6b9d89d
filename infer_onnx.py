"""
infer_onnx: write tunes with an exported musicrnn model, using onnxruntime and numpy only.

    python infer_onnx.py --model runs/musicrnn.onnx --num 5 --meter 6/8 --key D
    python infer_onnx.py --num 32 --temperature 0.8 --out runs/tunes.abc

It never imports torch: the tokenizer, vocabulary and sampler come from abctext.py,
the same code that musicrnn.py uses, so the same seed and flags give the same tunes.
Everything the runtime needs (vocabulary, model shape) is in the .onnx file's metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import abctext

METADATA_FORMAT = "musicrnn-onnx-1"  # export.py writes it; bump it if the metadata changes


class ModelError(Exception):
    """An .onnx file that is missing, unreadable, or not a musicrnn export."""


def load_model(path: str, threads: int | None = None) -> tuple[ort.InferenceSession, abctext.Vocabulary, dict]:
    """An onnxruntime session, the vocabulary and the model config from the file's metadata.

    threads=None lets onnxruntime use one thread per physical core, which measured fastest
    here even for one token at a time (README: bench).
    """
    if not Path(path).is_file():
        raise ModelError(f"{path}: no such model (run `make export` first)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ModelError(f"{path}: not a readable ONNX model ({str(e).strip().splitlines()[0][:120]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("musicrnn.format") != METADATA_FORMAT:
        raise ModelError(f"{path}: not a musicrnn export (its metadata has no musicrnn.format = {METADATA_FORMAT})")
    try:
        vocab = abctext.Vocabulary.from_json(meta["musicrnn.vocab"])
        config = json.loads(meta["musicrnn.config"])
        int(config["hidden_dim"]), int(config["num_layers"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: damaged musicrnn metadata ({type(e).__name__}: {e})") from None
    return session, vocab, config


def onnx_step(session: ort.InferenceSession, config: dict):
    """The model as abctext.generate_ids wants it: (tokens (B, 1), state) -> (logits (B, V), state)."""
    layers, hidden = int(config["num_layers"]), int(config["hidden_dim"])

    def step(tokens: np.ndarray, state):
        if state is None:
            state = (np.zeros((layers, len(tokens), hidden), np.float32),) * 2  # (L, B, H) each
        logits, h, c = session.run(None, {"tokens": tokens, "h0": state[0], "c0": state[1]})
        return logits, (h, c)

    return step


def generate(session, vocab: abctext.Vocabulary, config: dict, num: int = 1, prompt: str = "",
             max_tokens: int = 1000, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             constrained: bool = False, max_bars: int = 32) -> list[str]:
    """num tunes as one batch: the same function as musicrnn.generate, over onnxruntime."""
    return abctext.generate_tunes(onnx_step(session, config), vocab, num, prompt, max_tokens, temperature, top_k,
                                  seed, constrained, max_bars)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer_onnx.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="runs/musicrnn.onnx", help="default: runs/musicrnn.onnx")
    parser.add_argument("--threads", type=abctext.positive_int, default=None,
                        help="onnxruntime threads (default: one per core)")
    abctext.add_sampling_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        session, vocab, config = load_model(args.model, args.threads)
        tunes = generate(session, vocab, config, args.num, abctext.start_text(args), args.max_tokens,
                         args.temperature, args.top_k, args.seed, args.constrained, args.max_bars)
        abctext.write_tunebook(abctext.tunebook(tunes), args.out, args.render)
    except (ModelError, abctext.PromptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
