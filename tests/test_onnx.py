"""The step-wise ONNX export: parity with torch, the same tunes, and a runtime without torch."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import exported_model
import sampler
import export
import musicrnn
from conftest import ROOT


@pytest.fixture(scope="module")
def exported(tiny_run):
    model, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tiny_run / "best.pt")))
    path = tiny_run / "musicrnn.onnx"
    export.export_onnx(model, cfg, vocab, path)
    return model, cfg, vocab, path


def test_graph_is_valid_dynamic_and_self_describing(exported):
    model, cfg, vocab, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["tokens", "h0", "c0"]
    assert [o.name for o in proto.graph.output] == ["logits", "h1", "c1"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    assert "LSTM" in {node.op_type for node in proto.graph.node}
    assert {"musicrnn.format", "musicrnn.vocab", "musicrnn.config"} <= {p.key for p in proto.metadata_props}
    session, got_vocab, config = exported_model.load_model(str(path))
    assert got_vocab.tokens == vocab.tokens and config["hidden_dim"] == cfg.hidden_dim


@pytest.mark.parametrize("batch", [1, 8])
def test_logits_and_state_match_torch_over_200_steps(exported, batch):
    model, cfg, vocab, path = exported
    session, _, config = exported_model.load_model(str(path))
    onnx_step = exported_model.onnx_step(session, config)
    torch_step = musicrnn.torch_step(model, torch.device("cpu"))
    rng = np.random.default_rng(0)
    tokens = np.full((batch, 1), vocab.eos_id, dtype=np.int64)
    onnx_state = torch_state = None
    worst = 0.0
    for _ in range(200):
        a, onnx_state = onnx_step(tokens, onnx_state)
        b, torch_state = torch_step(tokens, torch_state)
        diffs = [np.abs(a - b).max()] + [np.abs(o - t.numpy()).max() for o, t in zip(onnx_state, torch_state)]
        worst = max(worst, *diffs)
        tokens = sampler.sample_next(b, [rng] * batch)[:, None]  # autoregressive: feed back what was sampled
    assert worst < 1e-5


@pytest.mark.parametrize("constrained", [False, True])
def test_same_seed_same_tunes_from_torch_and_onnx(exported, constrained):
    model, cfg, vocab, path = exported
    session, _, config = exported_model.load_model(str(path))
    opts = sampler.SamplingOptions(num=6, prompt="X:1\nL:1/8\nM:6/8\nK:D\n", max_tokens=300, temperature=1.0,
                                   seed=11, constrained=constrained)
    from_onnx = sampler.generate_tunes(exported_model.onnx_step(session, config), vocab, opts)
    from_torch = musicrnn.generate(model, vocab, torch.device("cpu"), opts)
    assert from_onnx == from_torch
    assert len(set(from_onnx)) > 1  # rows of one batch differ


def run_without_torch(*args):
    """infer_onnx.py in a fresh interpreter where torch and every other requirement but onnxruntime and
    numpy fail to import (the runtime promises no more)."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ("torch", "tqdm", "pandas", "matplotlib", "onnx"))
    code = (f"import sys, runpy; {blocked}; "
            f"sys.argv = ['infer_onnx.py'] + {list(args)!r}; "
            "runpy.run_path('infer_onnx.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_runtime_works_with_torch_unimportable(exported, tmp_path):
    *_, path = exported
    out = tmp_path / "tunes.abc"
    result = run_without_torch("--model", str(path), "--num", "3", "--max-tokens", "40", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert [ln for ln in out.read_text().splitlines() if ln.startswith("X:")] == ["X:1", "X:2", "X:3"]
    imports = subprocess.run([sys.executable, "-c", "import infer_onnx, sys; print('torch' in sys.modules)"],
                             capture_output=True, text=True, cwd=ROOT)
    assert imports.stdout.strip() == "False"


def test_bad_models_and_flags_get_one_line_and_exit_2(exported, tmp_path):
    model, cfg, vocab, path = exported
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:500])
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    damaged = tmp_path / "damaged.onnx"
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "musicrnn.vocab":
            prop.value = '{"kind": "abc", "tokens": ["x"'
    onnx.save(proto, str(damaged))
    edited = {}  # hand-edited metadata whose values Python would read as something else: "no" as true
    for name, key, value in [("control", "musicrnn.config", None), ("types", "musicrnn.tune_types", '"jig"')]:
        proto = onnx.load(str(path))
        for prop in proto.metadata_props:
            if prop.key == key:
                prop.value = value or json.dumps({**json.loads(prop.value), "control": "no"})
        edited[name] = tmp_path / f"{name}.onnx"
        onnx.save(proto, str(edited[name]))
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "musicrnn.config":  # Infinity: a number json reads, and no int
            prop.value = json.dumps({**json.loads(prop.value), "hidden_dim": float("inf")})
    edited["infinite"] = tmp_path / "infinite.onnx"
    onnx.save(proto, str(edited["infinite"]))
    cases = [
        (["--model", str(edited["control"])], "damaged musicrnn metadata"),
        (["--model", str(edited["infinite"])], "damaged musicrnn metadata (OverflowError"),
        (["--model", str(edited["types"])], "damaged musicrnn metadata"),
        (["--model", str(tmp_path / "missing.onnx")], "no such model"),
        (["--model", str(corrupt)], "not a readable ONNX model"),
        (["--model", str(bare)], "not a musicrnn export"),
        (["--model", str(damaged)], "damaged musicrnn metadata"),
        (["--model", str(path), "--prompt", "X:1\nK:D\n\u00e9"], "'\u00e9'"),
        (["--model", str(path), "--num", "0"], "--num"),
        (["--model", str(path), "--temperature", "0"], "--temperature"),
    ]
    for args, message in cases:
        result = run_without_torch(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_model_whose_name_is_not_utf8_loads_as_any_other(exported, tmp_path):
    *_, path = exported
    odd = tmp_path / os.fsdecode(b"model-\xff.onnx")  # a Latin-1 name, on a UTF-8 system
    shutil.copy(path, odd)
    result = run_without_torch("--model", str(odd), "--num", "1", "--max-tokens", "5")
    assert result.returncode == 0 and result.stdout.startswith("X:1"), result.stderr


def test_int8_quantizes_the_lstm_and_stays_close(exported, tmp_path):
    *_, path = exported
    int8 = tmp_path / "musicrnn.int8.onnx"
    export.quantize_int8(path, int8)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert int8.stat().st_size < path.stat().st_size
    assert exported_model.load_model(str(int8))[1].tokens == exported_model.load_model(str(path))[1].tokens
    assert export.argmax_agreement(path, int8, tokens=200) > 0.8


def test_two_layer_model_exports_with_parity(exported, tmp_path):
    _, cfg, vocab, _ = exported
    cfg2 = musicrnn.Config(**{**cfg.__dict__, "num_layers": 2})  # the shape make train-long uses
    torch.manual_seed(0)
    model = musicrnn.build_model(cfg2, len(vocab)).eval()
    path = tmp_path / "two_layers.onnx"
    export.export_onnx(model, cfg2, vocab, path)
    session, _, config = exported_model.load_model(str(path))
    assert config["num_layers"] == 2
    onnx_step, torch_step = exported_model.onnx_step(session, config), musicrnn.torch_step(model, torch.device("cpu"))
    tokens, onnx_state, torch_state = np.full((3, 1), vocab.eos_id, dtype=np.int64), None, None
    for i in range(50):
        a, onnx_state = onnx_step(tokens, onnx_state)
        b, torch_state = torch_step(tokens, torch_state)
        assert np.allclose(a, b, atol=1e-5) and np.allclose(onnx_state[0], torch_state[0].numpy(), atol=1e-5)
        tokens = np.array([[i % len(vocab)]] * 3, dtype=np.int64)


TORCH_FREE = ["abc_tokens", "abc_music", "abc_constraint", "sampler", "judging", "plots", "cli", "settings", "corpus",
              "safe_write", "exported_model", "infer_onnx", "rendering", "serve", "abc_form"]


def test_the_machinery_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; " + "; ".join(f"import {m}" for m in TORCH_FREE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
