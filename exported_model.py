"""
exported_model: an exported musicrnn model in onnxruntime, torch-free.

Holds:
- load_model: the onnxruntime session, the vocabulary and the model shape from the file's
  metadata (METADATA_FORMAT names its version), checked by one trial step, or ModelError
  with one clear line;
- onnx_step: the session as the sampler's step function, carrying the LSTM state (h, c);
- model_facts: whether it reads control codes, and the tune types it knows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from abc_tokens import Vocabulary
from cli import UserError, check_model_file, first_line
from sampler import ModelFacts

METADATA_FORMAT = "musicrnn-onnx-1"  # export.py writes it; bump it if the metadata changes


class ModelError(UserError):
    """An .onnx file that is missing, unreadable, or not a musicrnn export."""


def load_model(path: str, threads: int | None = None) -> tuple[ort.InferenceSession, Vocabulary, dict]:
    """An onnxruntime session, the vocabulary and the model config from the file's metadata,
    after one trial step has shown that the graph is the one its metadata describes.

    threads=None lets onnxruntime use one thread per physical core, which measured fastest
    here even for one token at a time (README: bench).
    """
    session = _session(path, threads)
    vocab, config = _metadata(path, session)
    try:
        logits, (h, c) = onnx_step(session, config)(np.full((2, 1), vocab.eos_id, np.int64), None)
        shapes_match = logits.shape == (2, len(vocab)) and h.shape == c.shape == (config["num_layers"], 2,
                                                                                  config["hidden_dim"])
    except Exception as e:  # a foreign graph: onnxruntime's own exception types
        raise ModelError(f"{path}: its graph does not run as a musicrnn step ({first_line(e)})") from None
    if not shapes_match:
        raise ModelError(f"{path}: its graph's shapes do not match its metadata (vocabulary {len(vocab)}, "
                         f"hidden_dim {config['hidden_dim']}, num_layers {config['num_layers']})")
    return session, vocab, config


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    check_model_file(path, "model", "musicrnn.onnx", " (run `make export` first)", ModelError)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        model = Path(path).read_bytes()  # not the name: onnxruntime opens no name that is not UTF-8
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(e)})") from None


def _metadata(path: str, session: ort.InferenceSession) -> tuple[Vocabulary, dict]:
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("musicrnn.format") != METADATA_FORMAT:
        raise ModelError(f"{path}: not a musicrnn export (its metadata has no musicrnn.format = {METADATA_FORMAT})")
    try:
        vocab = Vocabulary.from_json(meta["musicrnn.vocab"])
        config = json.loads(meta["musicrnn.config"])
        config["hidden_dim"], config["num_layers"] = int(config["hidden_dim"]), int(config["num_layers"])
        types = json.loads(meta.get("musicrnn.tune_types", "[]"))
        if not isinstance(config.get("control", False), bool) or not (
                isinstance(types, list) and all(isinstance(name, str) for name in types)):
            raise TypeError("control is not true or false, or tune_types not a list of names")  # "no" reads as true
        config["tune_types"] = types
    # RecursionError: JSON nested deep; OverflowError: Infinity (which json reads) made an int
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError, OverflowError) as e:
        raise ModelError(f"{path}: damaged musicrnn metadata ({type(e).__name__}: {first_line(e, 80)})") from None
    if not (1 <= config["hidden_dim"] <= 65536 and 1 <= config["num_layers"] <= 64):
        raise ModelError(f"{path}: damaged musicrnn metadata (hidden_dim {config['hidden_dim']:.6g}, "
                         f"num_layers {config['num_layers']:.6g})")
    return vocab, config


def model_facts(config: dict) -> ModelFacts:
    """From the metadata: control codes or not (none where the file has no "control" key), tune types."""
    return ModelFacts(bool(config.get("control", False)), tuple(config["tune_types"]))


def onnx_step(session: ort.InferenceSession, config: dict):
    """The model as sampler.generate_tunes wants it: (tokens (B, 1), state) -> (logits (B, V), state)."""
    layers, hidden = int(config["num_layers"]), int(config["hidden_dim"])

    def step(tokens: np.ndarray, state):
        if state is None:
            state = (np.zeros((layers, len(tokens), hidden), np.float32),) * 2  # (L, B, H) each
        logits, h, c = session.run(None, {"tokens": tokens, "h0": state[0], "c0": state[1]})
        return logits, (h, c)

    return step
