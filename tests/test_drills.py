"""Failure drills: a training run killed mid-epoch, and random or mutated ABC thrown at every
stage. Nothing may crash with an unhandled exception, and nothing may be lost silently."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import abc_constraint
import abc_music
import abc_tokens
import corpus
import musicrnn
from conftest import ROOT


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_loadable_checkpoints_and_resume_finishes(tmp_path, fixture_tunes):
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    corpus.write_irishman_json(train, fixture_tunes * 40)   # epochs long enough to be caught in
    corpus.write_irishman_json(val, fixture_tunes[:2])
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "musicrnn.py"), "train", "--train-data", str(train), "--val-data", str(val),
            "--hidden-dim", "32", "--embedding-dim", "16", "--batch-size", "8", "--epochs", "6", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["epoch"] >= 1
    # a kill during a save can leave a .tmp beside them, never half a checkpoint under the real name
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 6


def random_abc(rng: np.random.Generator, corpus: list[str]) -> str:
    """A random string over ABC's characters, or a real tune with random damage."""
    if rng.random() < 0.4:
        return "".join(rng.choice(list("ABCDEFGabcdefgzZx^_=,'/123468|:[](){}<>-~.!\"+ \nKLMX#bm%\\é"),
                                  size=int(rng.integers(0, 120))))
    chars = list(corpus[int(rng.integers(len(corpus)))])
    for _ in range(int(rng.integers(1, 8))):
        i = int(rng.integers(len(chars) + 1))
        action = rng.integers(3)
        if action == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif action == 1:
            chars.insert(i, str(rng.choice(list("|:[]^_=,'/23{}\"!(<>Qé"))))
        else:
            chars[i:i + 5] = chars[i:i + 5][::-1]
    return "".join(chars)


@pytest.fixture(scope="module")
def damaged(fixture_tunes) -> list[str]:
    rng = np.random.default_rng(2024)
    return [random_abc(rng, fixture_tunes) for _ in range(300)]


def test_tokenizer_keeps_every_character(damaged):
    for text in damaged:
        assert "".join(abc_tokens.tokenize_abc(text)) == text


def test_transposition_raises_only_its_own_error(damaged):
    for text in damaged:
        for shift in (-5, 2):
            try:
                out = abc_music.transpose_tune(text, shift)
            except abc_music.RewriteError:
                continue
            assert "".join(abc_tokens.tokenize_abc(out)) == out
            assert len(abc_music.note_tokens(out)) == len(abc_music.note_tokens(text))


def test_constraint_refuses_damaged_prompts_with_its_own_error(damaged):
    vocab = abc_tokens.Vocabulary("char", abc_tokens.SPECIALS + sorted({c for t in damaged for c in t}))
    constraint = abc_constraint.AbcConstraint(vocab)
    refused = 0
    for text in damaged:
        try:
            state = constraint.start(text)
        except abc_tokens.PromptError:
            refused += 1
            continue
        assert constraint.mask(state, 1000).any()  # whatever it accepted, it can go on from
    assert refused > 0


def test_evaluate_scores_damaged_tunes_and_counts_every_character(damaged, tiny_run):
    model, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tiny_run / "best.pt")))
    texts = [t for t in damaged if t]
    dataset = musicrnn.MusicDataset(texts, vocab)
    metrics = musicrnn.evaluate(model, dataset, vocab.pad_id, torch.device("cpu"))
    assert metrics["chars"] == sum(map(len, texts))
    assert metrics["unknown"] == sum(ch not in vocab.index for t in texts for ch in t)
    assert np.isfinite(metrics["bits_per_char"])
