"""
export: turn a musicrnn checkpoint into a step-wise ONNX model for infer_onnx.py.

    python export.py                                   # runs/best.pt -> runs/musicrnn.onnx
    python export.py --checkpoint runs/best.pt --out runs/musicrnn.onnx --int8

The graph is one generation step: tokens (B, 1) int64 and h0, c0 (layers, B, hidden)
go in; logits (B, V) and h1, c1 come out. The batch is dynamic. The vocabulary and the
model config travel in the file's metadata_props, so the .onnx file is all a runtime
needs. Before --out is written, onnxruntime's step is checked against torch's on a random batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cli  # first: Ctrl-C while torch loads is one line, as it is later
cli.quiet_interrupt_while_loading(__name__)

import numpy as np
import onnx
import torch
from torch import nn

import exported_model
import musicrnn
from abc_tokens import SPECIALS, Vocabulary
from cli import UserError
from safe_write import atomic_file, check_output, deferred_interrupt, same_file, write_atomic
from sampler import sample_next

OPSET = 18           # pinned: the LSTM op and everything else here are stable at 18
PARITY_TOLERANCE = 1e-4


class StepModel(nn.Module):
    """One generation step of MusicRNN, with the state as explicit tensors.

    It runs the same weights time-major (T=1 first), which exports to a leaner graph
    than MusicRNN's batch-first forward: no transposes or reshapes around the LSTM op.
    """

    def __init__(self, model: musicrnn.MusicRNN):
        super().__init__()
        self.embedding, self.to_logits = model.embedding, model.to_logits
        lstm = model.lstm
        self.lstm = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=False)
        self.lstm.load_state_dict(lstm.state_dict())

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        emb = self.embedding(tokens.T)                      # (1, B, E)
        _, (h1, c1) = self.lstm(emb, (h0, c0))              # (L, B, H) x 2
        # with one time step the top layer's new h IS the LSTM output
        return self.to_logits(h1[-1]), h1, c1               # (B, V), (L, B, H), (L, B, H)


def example_inputs(cfg: musicrnn.Config, batch: int, vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, 1), generator=g)                 # (B, 1)
    h0 = torch.randn(cfg.num_layers, batch, cfg.hidden_dim, generator=g) * 0.5     # (L, B, H)
    c0 = torch.randn(cfg.num_layers, batch, cfg.hidden_dim, generator=g) * 0.5     # (L, B, H)
    return tokens, h0, c0


def metadata(cfg: musicrnn.Config, vocab: Vocabulary, tune_types: tuple[str, ...] = ()) -> dict[str, str]:
    """Everything infer_onnx.py needs to encode a prompt and decode tokens, as strings; "control"
    says whether the model reads a control code before each tune (train --control)."""
    return {
        "musicrnn.format": exported_model.METADATA_FORMAT,
        "musicrnn.vocab": vocab.to_json(),
        "musicrnn.tokenizer": vocab.kind,
        "musicrnn.special_ids": json.dumps({t: vocab.index[t] for t in SPECIALS}),
        "musicrnn.config": json.dumps({k: getattr(cfg, k) for k in
                                       ("embedding_dim", "hidden_dim", "num_layers", "tokenizer", "control")}),
        "musicrnn.tune_types": json.dumps(list(tune_types)),
    }


def export_onnx(model: musicrnn.MusicRNN, cfg: musicrnn.Config, vocab: Vocabulary, out: Path,
                overwrite: bool = True, tune_types: tuple[str, ...] = ()) -> None:
    """Write the step graph with its metadata, checked by onnx.checker."""
    step = StepModel(model.eval())
    # An example batch of 1 would silently fix the batch dimension at 1, even with a Dim.
    inputs = example_inputs(cfg, batch=2, vocab_size=len(vocab))
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed", ...
    with warnings.catch_warnings():  # the exporter's internal deprecation chatter is not for our users
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step, inputs, dynamo=True, opset_version=OPSET, external_data=False, verbose=False,
            input_names=["tokens", "h0", "c0"], output_names=["logits", "h1", "c1"],
            dynamic_shapes={"tokens": {0: batch}, "h0": {1: batch}, "c0": {1: batch}},
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(cfg, vocab, tune_types))
    onnx.checker.check_model(proto)
    write_atomic(out, proto.SerializeToString(), overwrite)


def parity(model: musicrnn.MusicRNN, cfg: musicrnn.Config, vocab: Vocabulary, path: Path,
           batch: int = 5) -> float:
    """Max |onnxruntime - torch| over logits, h and c for one random batch."""
    session, _, _ = exported_model.load_model(str(path))
    tokens, h0, c0 = example_inputs(cfg, batch, len(vocab), seed=1)
    with torch.no_grad():
        expected = StepModel(model.eval())(tokens, h0, c0)
    got = session.run(None, {"tokens": tokens.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


def quantize_int8(fp32: Path, out: Path, overwrite: bool = True) -> None:
    """Dynamic int8 quantization of the weights, LSTM included.

    quant_pre_process first: without its shape inference quantize_dynamic leaves the
    LSTM in fp32. reduce_range=True (7-bit weights, which no int8 kernel saturates): without it
    the argmax agrees with fp32's only 68-81% of the time on this project's host, whose CPU has VNNI
    (measured; 96.6% with it, README).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet, \
            contextlib.redirect_stdout(quiet), _root_log_level(logging.ERROR):  # the quantizer's chatter
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8, reduce_range=True)
        proto = onnx.load(str(quantized))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in onnx.load(str(fp32)).metadata_props})
    write_atomic(out, proto.SerializeToString(), overwrite)


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


def ms_per_step(path: Path, steps: int = 300) -> float:
    session, vocab, config = exported_model.load_model(str(path))
    step = exported_model.onnx_step(session, config)
    tokens, state = np.full((1, 1), vocab.eos_id, np.int64), None
    for _ in range(20):
        _, state = step(tokens, state)
    start = time.perf_counter()
    for _ in range(steps):
        _, state = step(tokens, state)
    return (time.perf_counter() - start) / steps * 1e3


def argmax_agreement(fp32: Path, int8: Path, tokens: int = 500, seed: int = 0) -> float:
    """Share of steps where int8 and fp32 pick the same most likely token, along one fp32 tune."""
    steps = []
    for path in (fp32, int8):
        session, vocab, config = exported_model.load_model(str(path))
        steps.append(exported_model.onnx_step(session, config))
    rng = np.random.default_rng(seed)
    token, states, same = np.full((1, 1), vocab.eos_id, np.int64), [None, None], 0
    for _ in range(tokens):
        (a, states[0]), (b, states[1]) = steps[0](token, states[0]), steps[1](token, states[1])
        same += int(a.argmax() == b.argmax())
        token = sample_next(a, [rng])[:, None]  # follow the fp32 model's own tune
    return same / tokens


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="export.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/best.pt", help="the trained model (default: runs/best.pt)")
    parser.add_argument("--out", default="runs/musicrnn.onnx", help="the ONNX file to write (default: runs/musicrnn.onnx)")
    parser.add_argument("--int8", action="store_true",
                        help="also write a dynamically quantized copy beside it, its .onnx replaced by .int8.onnx "
                             "(runs/musicrnn.int8.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="let --out (and its .int8.onnx) replace existing files")
    return parser


def export(args: argparse.Namespace) -> None:
    # onnx and its quantizer read a file's format from its name
    out = check_output(args.out, "--out", args.overwrite, inputs=[args.checkpoint], suffix=".onnx")
    int8_path = out.with_suffix(".int8.onnx")
    int8 = check_output(int8_path, "--int8", args.overwrite, inputs=[args.checkpoint]) if args.int8 else None
    if int8 and same_file(out, int8):  # a link between them: one model would replace the other
        raise UserError(f"--out {args.out} and its int8 model {int8} are one file (a link); choose another name")
    ckpt = musicrnn.load_checkpoint(args.checkpoint)
    model, cfg, vocab = musicrnn.model_from_checkpoint(ckpt, args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:  # checked before it becomes --out: a failed export replaces nothing
        candidate = Path(tmp) / out.name
        export_onnx(model, cfg, vocab, candidate, True, musicrnn.model_facts(ckpt, cfg).tune_types)
        diff = parity(model, cfg, vocab, candidate)
        if not np.isfinite(diff):  # NaN compares False with everything: it would pass the check below
            raise UserError(f"{args.checkpoint}: the model's outputs are not finite (max |onnxruntime - torch| = "
                            f"{diff}); nothing written")
        if diff > PARITY_TOLERANCE:
            raise UserError(f"onnxruntime differs from torch by {diff:.2e} > {PARITY_TOLERANCE}; nothing written")
        if int8:  # made before either is written
            quantize_int8(candidate, Path(tmp) / int8.name)
        made = [(out, candidate)] + ([(int8, Path(tmp) / int8.name)] if int8 else [])
        with deferred_interrupt(), contextlib.ExitStack() as files:  # both written in full before either is
            for path, source in made:                                  # renamed into place (a full disk: neither)
                files.enter_context(atomic_file(path, args.overwrite)).write(source.read_bytes())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, opset {OPSET}); "
          f"max |onnxruntime - torch| = {diff:.2e}")
    if int8:
        print(f"wrote {int8}: {out.stat().st_size / int8.stat().st_size:.1f}x smaller, "
              f"{ms_per_step(out) / ms_per_step(int8):.2f}x the fp32 speed at batch 1, "
              f"argmax agrees with fp32 on {argmax_agreement(out, int8):.1%} of 500 steps")
    elif int8_path.exists():  # left as it was (not asked for), but not silently
        print(f"note: {int8_path} is left as it was, from before this export: pass --int8 to replace it with "
              f"this model's", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return cli.run_command(export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
