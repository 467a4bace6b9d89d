"""Training, checkpoints, evaluation and generation on a tiny model and the fixture tunes."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import abc_form
import abc_music
import abc_tokens
import checkpoint_files
import cli
import corpus
import sampler
import settings
import musicrnn
import rendering
from conftest import BF16_LSTM, ROOT, one_error_line, tiny_config


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "musicrnn.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_training_lowers_both_losses_and_writes_loadable_checkpoints(tiny_run):
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tiny_run / name, weights_only=True)
        assert checkpoint_files.CHECKPOINT_KEYS <= ckpt.keys()
        assert ckpt["config"]["hidden_dim"] == 32 and ckpt["vocab"]["kind"] == "char"
    history = torch.load(tiny_run / "last.pt", weights_only=True)["history"]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[0]["train_loss"] != history[0]["val_loss"]  # two measurements, not one printed twice
    assert (tiny_run / "loss.png").stat().st_size > 1000


def test_training_is_reproducible(tmp_path, fixture_data):
    quiet = lambda *a: None  # noqa: E731
    a = musicrnn.train(tiny_config(fixture_data, tmp_path / "a", epochs=1), log=quiet)
    b = musicrnn.train(tiny_config(fixture_data, tmp_path / "b", epochs=1), log=quiet)
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_resume_continues_from_last_checkpoint(tmp_path, fixture_data):
    quiet = lambda *a: None  # noqa: E731
    # the plateau schedule does not depend on the number of epochs, so 1 + 1 must equal 2
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1, schedule="plateau"), log=quiet)
    with pytest.raises(musicrnn.UserError, match="--resume"):
        musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=2, schedule="plateau"), log=quiet)
    last = musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=2, schedule="plateau"), resume=True, log=quiet)
    assert last["epoch"] == 2
    straight = musicrnn.train(tiny_config(fixture_data, tmp_path / "straight", epochs=2, schedule="plateau"),
                              log=quiet)
    assert np.isclose(last["val_loss"], straight["val_loss"], atol=1e-5)  # per-epoch seeds replay exactly


def test_early_stopping(tmp_path, fixture_data):
    logs = []
    cfg = tiny_config(fixture_data, tmp_path, epochs=30, lr=0.5, patience=1, schedule="plateau")
    history = musicrnn.train(cfg, log=logs.append)
    assert history["epoch"] < 30 and any("early stop" in line for line in logs)
    again = musicrnn.train(cfg, resume=True, log=lambda *a: None)  # the early stop is remembered: no more epochs
    assert again["epoch"] == history["epoch"]


def test_the_epochs_since_the_best_are_read_back_from_the_history():
    rows = [{"val_loss": v} for v in (3.0, 2.5, 2.6, 2.5, 2.4, 2.7, 2.45)]
    assert settings.epochs_since_best(rows) == 2 and settings.epochs_since_best(rows[:5]) == 0
    assert settings.epochs_since_best(rows[:4]) == 2 and settings.epochs_since_best([]) == 0  # 2.5 again: no gain


def test_evaluate_json(tiny_run, fixture_data):
    result = run_cli("evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--data", fixture_data["val"], "--json")
    assert result.returncode == 0, result.stderr
    import json

    metrics = json.loads(result.stdout)
    assert set(metrics) == {"loss", "perplexity", "bits_per_char", "tunes", "chars", "unknown"}
    assert metrics["tunes"] == 2 and metrics["unknown"] == 0 and metrics["bits_per_char"] > 0


def test_evaluate_scores_tunes_with_unseen_symbols(tiny_run, tmp_path):
    path = tmp_path / "other.abc"
    path.write_text("X:1\nK:D\nABc|\u00e9\u00e9|\n")
    model, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tiny_run / "best.pt")))
    ds = musicrnn.MusicDataset(musicrnn.load_tunes(str(path)), vocab)
    metrics = musicrnn.evaluate(model, ds, vocab.pad_id, torch.device("cpu"))
    assert metrics["unknown"] == 2 and metrics["chars"] == len("X:1\nK:D\nABc|\u00e9\u00e9|\n")


def test_generate_writes_a_numbered_tunebook_reproducibly(tiny_run, tmp_path):
    out = tmp_path / "tunes.abc"
    args = ["generate", "--checkpoint", str(tiny_run / "best.pt"), "--num", "3", "--seed", "5",
            "--max-tokens", "60", "--meter", "6/8", "--key", "G", "--out", str(out)]
    first, second = run_cli(*args), run_cli(*args[:-1], str(tmp_path / "again.abc"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    text = out.read_text()
    assert [line for line in text.splitlines() if line.startswith("X:")] == ["X:1", "X:2", "X:3"]
    assert text.count("M:6/8\nK:G\n") == 3


def test_a_blank_line_a_model_writes_stays_inside_its_tune():
    """A blank line ends a tune in a tunebook: the bars after it would fall outside every tune."""
    book = sampler.tunebook(["X:1\nL:1/8\nM:2/4\nK:D\nabcd|\n\n \ndcba|]\n", "X:1\nL:1/8\nM:2/4\nK:G\n\ngg|]"])
    tunes, skipped = abc_music.read_tunebook(book)
    assert skipped == 0 and len(tunes) == 2
    assert "abcd|\ndcba|]" in tunes[0] and tunes[1].rstrip().endswith("gg|]")


def test_an_x_line_a_model_writes_inside_a_tune_starts_no_tune_of_its_own():
    """X: starts a tune: kept, tune 2's "X:1" would have abc2midi write a second set1.mid over tune 1's."""
    book = sampler.tunebook(["X:1\nL:1/8\nM:2/4\nK:D\nabcd|\n", "X:1\nL:1/8\nM:2/4\nK:G\ngg|\nX:1\nT:B\nab|]"])
    assert [line for line in book.splitlines() if line.startswith("X:")] == ["X:1", "X:2"]
    assert book.endswith("X:2\nL:1/8\nM:2/4\nK:G\ngg|\nT:B\nab|]\n")


def test_the_judge_reads_a_tune_past_a_blank_line_as_the_tunebook_keeps_it():
    """A broken bar after a blank line must count: abc2midi alone would stop at the blank line."""
    import judging

    if not judging.abc2midi_available():
        pytest.skip("abc2midi not installed (apt-get install abcmidi)")
    head = "X:1\nL:1/8\nM:2/4\nK:D\nabcd|dcba|\n"
    assert judging.check_with_abc2midi(head + "abcd|]\n")["bar_clean"]
    assert not judging.check_with_abc2midi(head + "\nabc|abcd|]\n")["bar_clean"]


@pytest.mark.parametrize("body, clean", [
    ("ABc def|ABc def|ABc def|ABc d|]", False),   # a short last bar with no pickup to complete
    ("A|ABc def|ABc def|ABc d|]", False),         # a pickup of 1 and a last bar of 4: not one bar
    ("ABc defg|ABc def|ABc def|ABc def|]", False),  # a first bar of 7 units
    ("A|ABc def|ABc def|ABc de|]", True), ("ABc def|ABc def|ABc def|ABc def|]", True)])
def test_bar_clean_checks_the_first_and_last_bars_abc2midi_never_warns_about(body, clean):
    import judging

    if not judging.abc2midi_available():
        pytest.skip("abc2midi not installed (apt-get install abcmidi)")
    result = judging.check_with_abc2midi("X:1\nL:1/8\nM:6/8\nK:D\n" + body + "\n")
    assert result["valid"] and not any("Bar" in line for line in result["messages"])  # abc2midi says nothing
    assert result["bar_clean"] == clean


def test_an_abc2midi_that_crashes_or_hangs_judges_the_tune_invalid(tmp_path, monkeypatch):
    import judging

    for name, script in [("crashes", "touch \"$3\"; echo x > \"$3\"; kill -SEGV $$"), ("hangs", "sleep 60")]:
        fake = tmp_path / name / "abc2midi"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\n" + script + "\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
        if name == "hangs":
            monkeypatch.setattr(judging.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(
                subprocess.TimeoutExpired(a[0], 30)))
        result = judging.check_with_abc2midi("X:1\nL:1/8\nM:2/4\nK:D\nabcd|dcba|]\n")
        assert not result["valid"] and not result["bar_clean"] and result["messages"][-1].startswith("abc2midi"), name


def test_generation_stops_at_eos():
    vocab = abc_tokens.Vocabulary.build(["AB"], "char")

    def step(tokens, state):  # always certain that the tune ends now
        logits = np.full((len(tokens), len(vocab)), -30.0, dtype=np.float32)
        logits[:, vocab.eos_id] = 30.0
        return logits, state

    assert sampler.generate_tunes(step, vocab, sampler.SamplingOptions(num=4, prompt="AB")) == ["AB"] * 4


def test_the_model_reads_a_prompt_without_its_info_lines_and_the_tune_keeps_them():
    """T:, S:, % lines are text about a tune that no training tune has (and that the vocabulary may not
    spell: W, %): the model reads the header without them, the tune is the prompt as typed."""
    vocab = abc_tokens.Vocabulary.build(["X:1\nL:1/8\nM:6/8\nK:D\nABc|"], "char")
    prompt = "X:1\nT:Wind % that\n% Nottingham Music Database\nS:Mick\nL:1/8\nM:6/8\nK:D\nAB"
    read = []

    def step(tokens, state):  # records what it reads; then ends the tune
        read.append(int(tokens[0, 0]))
        logits = np.full((len(tokens), len(vocab)), -30.0, dtype=np.float32)
        logits[:, vocab.eos_id] = 30.0
        return logits, state

    assert sampler.generate_tunes(step, vocab, sampler.SamplingOptions(prompt=prompt)) == [prompt]
    assert vocab.decode(read) == "X:1\nL:1/8\nM:6/8\nK:D\nAB"
    read.clear()  # a line is what ends in \n, as abc2midi reads it: a form feed is part of the title
    sampler.generate_tunes(step, vocab, sampler.SamplingOptions(prompt="X:1\nT:a\x0cL:1/4\nM:6/8\nK:D\nAB"))
    assert vocab.decode(read) == "X:1\nM:6/8\nK:D\nAB"
    with pytest.raises(abc_tokens.PromptError, match="ends inside its line 'T:The Ba'"):
        sampler.generate_tunes(step, vocab, sampler.SamplingOptions(prompt="X:1\nT:The Ba"))


def test_tune_i_is_the_same_whatever_num_and_the_batch_it_falls_in():
    vocab = abc_tokens.Vocabulary.build(["ABCDEFG|"], "char")
    table = np.random.default_rng(0).normal(size=(len(vocab), len(vocab))).astype(np.float32)  # (V, V)
    table[:, vocab.eos_id] -= 2.0  # tunes of some length

    def step(tokens, state):  # each row's next logits from its own last token: rows independent
        return table[tokens[:, 0]], state

    opts = sampler.SamplingOptions(num=5, seed=3, prompt="A", max_tokens=60)
    five = [tune for batch in sampler.generate_batches(step, vocab, opts, batch=2) for tune in batch]
    assert len(set(five)) == 5
    assert sampler.generate_tunes(step, vocab, dataclasses.replace(opts, num=3)) == five[:3]
    assert sampler.generate_tunes(step, vocab, dataclasses.replace(opts, num=1), first=3) == five[3:4]
    assert five != [tune for batch in sampler.generate_batches(step, vocab, dataclasses.replace(opts, seed=4))
                    for tune in batch]


def test_sampler_respects_temperature_and_top_k():
    rng = [np.random.default_rng(0)] * 20000  # one generator drawing for every row
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 20000))
    counts = np.bincount(sampler.sample_next(logits, rng), minlength=3) / 20000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.02)
    assert set(sampler.sample_next(logits, rng, top_k=1)) == {0}
    cold = np.bincount(sampler.sample_next(logits, rng, temperature=0.1), minlength=3) / 20000
    assert cold[0] > 0.98
    with pytest.raises(ValueError):
        sampler.sample_next(logits, rng, temperature=0)


@pytest.mark.parametrize("argv", [[command, "--help"] for command in musicrnn.COMMANDS] + [["--help"]])
def test_help_for_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        musicrnn.main(argv)
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["export", "infer_onnx", "bench"])
def test_help_for_every_script(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def run_main(capsys, *args) -> tuple[int, str]:
    """musicrnn.main in this process (no torch import per case): exit code and stderr."""
    try:
        code = musicrnn.main(list(args))
    except SystemExit as e:  # argparse refuses a flag
        code = e.code
    return code, capsys.readouterr().err


def one_clear_line(code: int, stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:")


def test_bad_input_gets_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tiny_run / "best.pt").read_bytes()[:2000])
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: refused, never unpickled
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    malformed = tmp_path / "bad.json"
    malformed.write_text("[{")
    best = str(tiny_run / "best.pt")
    cases = [
        (["evaluate", "--checkpoint", str(tmp_path / "missing.pt")], "no such checkpoint"),
        (["evaluate", "--checkpoint", str(tiny_run)], "is a folder: give the checkpoint in it"),
        (["evaluate", "--checkpoint", str(truncated)], "not a musicrnn checkpoint"),
        (["evaluate", "--checkpoint", str(pickled)], "would run code"),
        (["evaluate", "--checkpoint", str(foreign)], "not a musicrnn checkpoint"),
        (["evaluate", "--checkpoint", best, "--data", str(malformed)], "not an IrishMAN JSON"),
        (["evaluate", "--checkpoint", best, "--data", str(tmp_path / "none.json")], "no such file"),
        (["generate", "--checkpoint", best, "--temperature", "0"], "at least 0.01"),
        (["generate", "--checkpoint", best, "--prompt", "X:1\nK:D\n\u00e9"], "'\u00e9'"),
        (["generate", "--checkpoint", best, "--prompt", "X:1", "--key", "D"], "cannot be combined"),
        (["stats", "--data", str(malformed)], "not an IrishMAN JSON"),
    ]
    for args, message in cases:
        code, stderr = run_main(capsys, *args)
        assert one_clear_line(code, stderr) and message in stderr, (args, code, stderr)
    for args, hint in [(["generate"], "`make train`"), (["stats"], "`make data`")]:  # a fresh clone's defaults
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 2 and hint in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path):
    result = run_cli("evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_bad_input_overwrites_nothing(tiny_run, tmp_path):
    out = tmp_path / "keep.abc"
    out.write_text("precious")
    assert musicrnn.main(["generate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert out.read_text() == "precious"
    before = (tiny_run / "best.pt").read_bytes()
    code = musicrnn.main(["train", "--train-data", str(tmp_path / "missing.json"), "--out", str(tiny_run), "--overwrite"])
    assert code == 2 and (tiny_run / "best.pt").read_bytes() == before


def test_render_writes_midi_audio_and_svg_beside_the_tunebook(tiny_run, tmp_path, capsys):
    out = tmp_path / "tunes.abc"
    code = musicrnn.main(["generate", "--checkpoint", str(tiny_run / "best.pt"), "--num", "2", "--constrained",
                          "--max-tokens", "400", "--out", str(out), "--render"])
    assert code == 0
    messages = capsys.readouterr().err
    if shutil.which("abc2midi"):
        assert len(list(tmp_path.glob("tunes*.mid"))) == 2
    else:
        assert "apt-get install abcmidi" in messages
    if shutil.which("abcm2ps"):
        assert list(tmp_path.glob("tunes*.svg"))
    else:
        assert "apt-get install abcm2ps" in messages
    if shutil.which("abc2midi") and shutil.which("fluidsynth") and rendering.find_soundfont():
        assert len(list(tmp_path.glob("tunes*.wav"))) == 2 and "audio: 2 files" in messages
    else:
        assert "no audio: apt-get install" in messages


@BF16_LSTM
def test_a_bf16_step_rounds_the_products_but_keeps_fp32_weights_and_loss():
    torch.manual_seed(0)
    model = musicrnn.MusicRNN(20, 16, 64).eval()  # no dropout: both steps see the same function
    x, y = torch.randint(1, 20, (4, 30)), torch.randint(1, 20, (4, 30))   # (B, T)
    losses, grads = {}, {}
    for bf16 in (False, True):
        copy = musicrnn.MusicRNN(20, 16, 64).eval()
        copy.load_state_dict(model.state_dict())
        losses[bf16] = musicrnn.train_step(copy, torch.optim.SGD(copy.parameters(), lr=0.0), x, y, 0, 1e6, 120,
                                           bf16=bf16)
        grads[bf16] = copy.lstm.weight_hh_l0.grad
        assert all(p.dtype == torch.float32 for p in copy.parameters()) and grads[bf16].dtype == torch.float32
    assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert torch.allclose(grads[True], grads[False], atol=0.05 * float(grads[False].abs().max()))


def test_dropout_keeps_one_mask_per_tune_across_its_time_steps():
    torch.manual_seed(0)
    drop, x = musicrnn.LockedDropout(0.5).train(), torch.ones(8, 50, 16)   # (B, T, C)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}                 # dropped, or scaled by 1 / (1 - p)
    assert torch.equal(y, y[:, :1].expand_as(y))                  # every step of a tune: its one mask
    assert not torch.equal(y[0], y[1])                            # each tune its own
    assert torch.equal(drop.eval()(x), x)                         # evaluation and generation: none


def test_a_batch_split_over_processes_gets_the_dropout_masks_one_process_gives_it():
    drop, x = musicrnn.LockedDropout(0.5).train(), torch.randn(7, 5, 16)   # (B, T, C)
    torch.manual_seed(0)
    whole = drop(x)
    for rank in (0, 1):  # 4 rows and 3: every rank draws the 7 rows' masks and keeps its own
        torch.manual_seed(0)
        assert torch.equal(drop(x[rank::2], (rank, 2, 7)), whole[rank::2])
    padding = torch.randn(1, 5, 16)  # an empty share steps on one padding row (collate), as it is
    assert torch.equal(drop(padding, (1, 2, 1)), padding)


@pytest.mark.parametrize("amx, avx512_bf16, auto", [(False, False, False), (True, False, True),
                                                    (False, True, True), (True, True, True)])
def test_precision_auto_asks_for_bf16_only_where_the_cpu_has_its_units(amx, avx512_bf16, auto, monkeypatch):
    monkeypatch.setattr(musicrnn, "cpu_runs_bf16_lstm", lambda: amx or avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert musicrnn.bf16_products("auto", cpu) is auto
    assert musicrnn.bf16_products("fp32", cpu) is False
    if auto:
        assert musicrnn.bf16_products("bf16", cpu) is True
    else:  # asked for where oneDNN would fail inside the first step
        with pytest.raises(cli.UserError, match="--precision bf16: this CPU cannot run the LSTM in bf16"):
            musicrnn.bf16_products("bf16", cpu)


def test_the_bf16_probe_says_what_a_bf16_lstm_step_does():
    model = musicrnn.MusicRNN(20, 16, 64)
    x = torch.randint(1, 20, (2, 5))                                 # (B, T)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        ran = True
    except RuntimeError:
        ran = False
    assert musicrnn.cpu_runs_bf16_lstm() is ran


def test_precision_bf16_on_a_cpu_without_a_bf16_lstm_is_one_line_before_any_file(tmp_path, fixture_data, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(musicrnn, "cpu_runs_bf16_lstm", lambda: False)
    code, err = run_main(capsys, "train", "--train-data", str(fixture_data["train"]), "--val-data",
                         str(fixture_data["val"]), "--out", str(tmp_path / "run"), "--precision", "bf16")
    assert one_error_line(code, err) and "--precision auto or fp32" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("units, auto", [(True, True), (False, False)])  # Ampere on; V100, T4 emulate only
def test_precision_auto_takes_no_emulated_bf16_on_a_gpu_without_its_units(units, auto, monkeypatch):
    # torch can emulate bf16 on a pre-Ampere GPU, and says so unless asked for the units
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: units or including_emulation)
    cuda = torch.device("cuda")
    assert musicrnn.bf16_products("auto", cuda) is auto
    assert musicrnn.bf16_products("bf16", cuda) is True and musicrnn.bf16_products("fp32", cuda) is False


def test_a_budget_spent_between_epochs_logs_no_empty_epoch(tmp_path, fixture_data, monkeypatch):
    ended, lines = [], []
    end_of_epoch = musicrnn.end_of_epoch
    monkeypatch.setattr(musicrnn, "end_of_epoch", lambda *args: ended.append(1) or end_of_epoch(*args))
    monkeypatch.setattr(musicrnn.Run, "budget_used", lambda run: 2.0 if ended else 0.0)  # spent once epoch 1 ends
    musicrnn.train(tiny_config(fixture_data, tmp_path), log=lambda *a: lines.append(" ".join(map(str, a))))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and len(ended) == 1
    assert any(line.startswith("time budget reached after epoch 1 (") for line in lines), lines


def test_cosine_anneals_by_the_time_budget_when_that_runs_out_first():
    cfg = musicrnn.Config(lr=1e-2, warmup_steps=0, max_minutes=10)
    assert musicrnn.learning_rate(cfg, 10, 1000, 1.0) > 0.99e-2         # early in the steps, no time used
    assert musicrnn.learning_rate(cfg, 10, 1000, 1.0, budget_used=0.5) == pytest.approx(0.525e-2)
    assert musicrnn.learning_rate(cfg, 10, 1000, 1.0, budget_used=1.0) == pytest.approx(0.05e-2)
    assert musicrnn.learning_rate(cfg, 1000, 1000, 1.0, budget_used=0.1) == pytest.approx(0.05e-2)
    warm = musicrnn.Config(lr=1e-2, warmup_steps=100, max_minutes=10)
    # just after warm-up, a run ahead of its budget follows its steps alone: the clock cannot move it
    assert musicrnn.learning_rate(warm, 100, 1000, 1.0, budget_used=0.05) == 1e-2
    assert musicrnn.learning_rate(warm, 100, 1000, 1.0, budget_used=0.0) == 1e-2
    assert musicrnn.learning_rate(warm, 550, 1000, 1.0, budget_used=0.3) == pytest.approx(0.525e-2)


def test_training_with_augmentation_is_seeded_and_checks_its_shares(tmp_path, fixture_data):
    logs = []
    cfg = dict(epochs=2, augment_key=1.0, augment_unit=1.0)
    a = musicrnn.train(tiny_config(fixture_data, tmp_path / "a", **cfg), log=logs.append)
    b = musicrnn.train(tiny_config(fixture_data, tmp_path / "b", **cfg), log=lambda *_: None)
    plain = musicrnn.train(tiny_config(fixture_data, tmp_path / "plain", epochs=2), log=lambda *_: None)
    assert sum(line.startswith("augmentation:") for line in logs) == 2  # once per epoch
    tunes = len(musicrnn.load_tunes(fixture_data["train"]))
    assert all(f" of {tunes} transpositions" in line for line in logs if line.startswith("augmentation:"))  # all tried
    unit_only = []
    musicrnn.train(tiny_config(fixture_data, tmp_path / "u", epochs=1, augment_key=0.0, augment_unit=1.0), log=unit_only.append)
    assert not any("transpositions" in line for line in unit_only)  # none tried: no count of them
    assert a["train_loss"] == b["train_loss"] and a["train_loss"] != plain["train_loss"]
    with pytest.raises(musicrnn.UserError, match="at least 0 and at most 1"):
        musicrnn.train(tiny_config(fixture_data, tmp_path / "c", augment_key=1.5), log=lambda *_: None)


def test_checkpoints_with_settings_this_version_dropped_still_load_and_resume(tmp_path, fixture_data):
    quiet = lambda *a: None  # noqa: E731
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1), log=quiet)
    for name in ("best.pt", "last.pt"):  # a boolean augment: a key Config lacks
        ckpt = torch.load(tmp_path / name, weights_only=True)
        ckpt["config"]["augment"] = False
        torch.save(ckpt, tmp_path / name)
    model, cfg, _ = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tmp_path / "best.pt")))
    assert cfg.hidden_dim == 32
    assert musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=2), resume=True, log=quiet)["epoch"] == 2


def test_a_checkpoint_from_before_dropout_masks_per_tune_resumes_with_its_per_step_masks(tmp_path, fixture_data):
    quiet = lambda *a: None  # noqa: E731
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1), log=quiet)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["config"]["dropout_mask"] == "tune"
    del ckpt["config"]["dropout_mask"]                            # without the key: element masks
    _, cfg, _ = musicrnn.model_from_checkpoint(ckpt)
    assert cfg.dropout_mask == "element"


def test_every_training_flag_explains_itself_in_words():
    """--help takes each flag's text from the Config field's comment: none may be missing."""
    comments, groups = cli.field_comments(musicrnn.Config)
    assert set(comments) == {f.name for f in dataclasses.fields(musicrnn.Config)}
    assert all(len(text.split()) >= 3 for text in comments.values()), comments
    assert set(groups.values()) == {"data", "model", "optimisation", "run"}
    assert all(text.count("(") == text.count(")") for text in comments.values()), comments  # none cut mid-line
    assert comments["epochs"].endswith("a slower one anneals by the clock)")  # its second line read too


def test_an_epoch_the_time_budget_cut_short_goes_on_where_it_stopped_when_resumed(tmp_path, fixture_data,
                                                                                   monkeypatch):
    """Stopped by --max-minutes 2 batches into epoch 1 and resumed, a run ends with the very weights of a
    run never stopped: the cut epoch is not counted as done, and --resume skips the batches it took and
    draws their dropout masks on. The log, the row and --resume say how far it got."""
    config = lambda out: tiny_config(fixture_data, out, batch_size=2, epochs=2, dropout=0.3)  # noqa: E731
    batches = math.ceil(len(json.loads(Path(fixture_data["train"]).read_text())) / 2)  # batches of 2 tunes
    monkeypatch.setattr(musicrnn.Run, "budget_used", lambda run: 0.0)  # the learning rate follows the steps alone
    musicrnn.train(config(tmp_path / "straight"), log=lambda *a: None)
    calls, lines = [], []
    monkeypatch.setattr(musicrnn.Run, "budget_used", lambda run: calls.append(1) or (2.0 if len(calls) > 2 else 0.0))
    musicrnn.train(config(tmp_path / "cut"), log=lines.append)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["batches_done"], cut["step"]) == (0, 2, 2) and cut["seconds"] > 0
    assert len(cut["history"]) == 1 and cut["history"][0]["epoch_share"] == pytest.approx(2 / batches)
    assert f"(time budget reached {2 / batches:.0%} into the epoch)" in lines[-2]
    monkeypatch.setattr(musicrnn.Run, "budget_used", lambda run: 0.0)
    musicrnn.train(config(tmp_path / "cut"), resume=True, log=lines.append)
    assert any("after 2 batches of epoch 1, where the time budget cut it" in line for line in lines)
    straight, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "cut"))
    assert (resumed["epoch"], resumed["step"], resumed["batches_done"]) == (2, straight["step"], 0)
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert [row["epoch"] for row in resumed["history"]] == [1, 1, 2] and resumed["seconds"] > cut["seconds"]


def test_the_last_line_names_only_the_checkpoints_that_are_there(tmp_path, fixture_data, monkeypatch):
    """A resumed folder whose best.pt was deleted, and whose new epoch is no better: only last.pt is there."""
    lines = []
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1), log=lines.append)
    assert "checkpoints best.pt and last.pt in" in lines[-1]
    (tmp_path / "best.pt").unlink()
    monkeypatch.setattr(musicrnn, "evaluate", lambda *a, **k: {"loss": 99.0, "bits_per_char": 99.0})
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=2), resume=True, log=lines.append)
    assert "checkpoints last.pt in" in lines[-1] and not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("changed", ["train_data", "val_data"])
def test_resuming_on_data_changed_since_the_run_began_is_refused(tmp_path, fixture_data, changed):
    """A training file changed in place would train on other tunes; a validation file, compare its loss
    with a best from other tunes and replace best.pt on it. A checkpoint without the data's digests
    cannot be checked, and resumes."""
    paths = {name: tmp_path / f"{name}.json" for name in ("train_data", "val_data")}
    shutil.copy(fixture_data["train"], paths["train_data"])
    shutil.copy(fixture_data["val"], paths["val_data"])
    config = lambda epochs: tiny_config(fixture_data, tmp_path / "run", epochs=epochs,  # noqa: E731
                                        **{name: str(path) for name, path in paths.items()})
    musicrnn.train(config(1), log=lambda *a: None)
    records = json.loads(paths[changed].read_text())
    paths[changed].write_text(json.dumps(records[:-1]))  # one tune fewer, the file's name the same
    with pytest.raises(cli.UserError, match=f"holds other tunes than when the run began .{len(records) - 1} tunes"):
        musicrnn.train(config(2), resume=True, log=lambda *a: None)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    del ckpt["data"]  # a checkpoint without the digests
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert musicrnn.train(config(2), resume=True, log=lambda *a: None)["epoch"] == 2


def test_resuming_a_control_run_on_changed_validation_codes_is_refused(tmp_path, fixture_data, fixture_tunes):
    """A --control model reads each tune's code first: validation codes changed in place are other data
    too. A checkpoint whose digest covers the validation tunes alone (written before codes counted) resumes."""
    val, tunes = tmp_path / "val.json", fixture_tunes[:2]
    codes = [abc_form.control_code(tune) for tune in tunes]
    corpus.write_irishman_json(val, tunes, codes)
    config = lambda epochs: tiny_config(fixture_data, tmp_path / "run", epochs=epochs,  # noqa: E731
                                        control=True, val_data=str(val))
    musicrnn.train(config(1), log=lambda *a: None)
    corpus.write_irishman_json(val, tunes, [codes[0], "S:1\nB:16\n"])  # the same tunes, one code another
    with pytest.raises(cli.UserError, match="holds other tunes than when the run began"):
        musicrnn.train(config(2), resume=True, log=lambda *a: None)
    corpus.write_irishman_json(val, tunes, codes)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ckpt["data"]["val_data"] = corpus.collection_digest(tunes)
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert musicrnn.train(config(2), resume=True, log=lambda *a: None)["epoch"] == 2


def test_a_share_prints_as_all_or_none_only_when_it_is():
    import judging

    assert [judging.percent(x) for x in (0, 1, 665 / 668, 0.5, 0.0004, 0.99996)] == [
        "0%", "100%", "99.6%", "50%", "<0.1%", ">99.9%"]


def test_tensorboard_gets_each_epochs_curves_and_its_writer_is_closed(tmp_path, fixture_data, monkeypatch):
    import types
    writers = []

    class SummaryWriter:  # tensorboard is optional; this stands in for torch.utils.tensorboard's
        def __init__(self, folder: str):
            self.folder, self.scalars, self.closed = folder, [], False
            writers.append(self)

        def add_scalar(self, key: str, value: float, epoch: int) -> None:
            self.scalars.append((key, epoch))

        def close(self) -> None:
            self.closed = True

        def __enter__(self):
            return self

        def __exit__(self, *error) -> None:
            self.close()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    musicrnn.train(tiny_config(fixture_data, tmp_path / "run", epochs=2), tensorboard=True)
    [writer] = writers
    assert writer.folder == str(tmp_path / "run" / "tensorboard") and writer.closed
    assert {epoch for _, epoch in writer.scalars} == {1, 2} and ("val_bits_per_char", 2) in writer.scalars
    end_of_epoch = musicrnn.end_of_epoch

    def interrupted_after_one(*args):  # Ctrl-C once the first epoch is logged
        end_of_epoch(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(musicrnn, "end_of_epoch", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        musicrnn.train(tiny_config(fixture_data, tmp_path / "cut", epochs=2), tensorboard=True)
    assert writers[1].closed and {epoch for _, epoch in writers[1].scalars} == {1}


def test_tensorboard_missing_is_one_error_line(tmp_path, fixture_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    assert musicrnn.main(["train", "--train-data", fixture_data["train"], "--val-data", fixture_data["val"],
                          "--out", str(tmp_path / "run"), "--tensorboard"]) == 2
    assert capsys.readouterr().err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
    assert not (tmp_path / "run").exists()
