"""What a training, an export and the judging commands do with what they are given: every output
of a run checked before the first epoch, flags that would do nothing refused, crafted checkpoint
fields and non-finite weights refused in one line, failed starts that leave no folder behind;
judging figures where there is nothing to measure."""

import json
import os
from pathlib import Path

import pytest
import torch

import corpus
import export
import infer_onnx
import judging
import musicrnn
import plots
import sampler
from abc_music import transpose_tune
from conftest import one_error_line, run_main, tiny_config

TINY = ["--hidden-dim", "16", "--embedding-dim", "8", "--epochs", "1", "--device", "cpu"]


def train_args(fixture_data, out, *extra) -> list:
    return ["train", "--train-data", fixture_data["train"], "--val-data", fixture_data["val"], "--out", out,
            *TINY, *extra]


def test_validation_tunes_that_are_training_tunes_are_named_but_allowed(fixture_data, fixture_tunes, tmp_path):
    code, out, _ = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "leak"), "--val-data",
                            fixture_data["train"])
    assert code == 0 and "warning: 24 of the 24 validation tunes are training tunes too" in out, out
    held_out = tmp_path / "held-out.json"
    corpus.write_irishman_json(held_out, [transpose_tune(tune, 2) for tune in fixture_tunes[:2]])
    code, out, _ = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "held-out"), "--val-data", held_out)
    assert code == 0 and "warning" not in out, out


# --- every output of a run, checked before the first epoch


def test_an_empty_out_is_refused_not_the_current_folder(fixture_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, ""))
    assert one_error_line(code, err) and "names no folder" in err and list(tmp_path.iterdir()) == [], err


def test_not_even_overwrite_lets_a_training_replace_its_data(fixture_data, tmp_path):
    data = tmp_path / "last.pt"  # training data that happens to bear a run file's name
    data.write_bytes(Path(fixture_data["train"]).read_bytes())
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path), "--train-data", data, "--overwrite")
    assert one_error_line(code, err) and "also what it reads" in err, err
    assert data.read_bytes() == Path(fixture_data["train"]).read_bytes()


def test_a_run_file_that_is_a_pipe_is_refused_before_the_first_epoch(fixture_data, tmp_path):
    os.mkfifo(tmp_path / "last.pt")
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path), "--overwrite")
    assert one_error_line(code, err) and "last.pt is not a regular file" in err, err
    assert "epoch" not in out and (tmp_path / "last.pt").is_fifo()


def test_an_existing_loss_curve_is_not_replaced_without_overwrite(fixture_data, tmp_path):
    (tmp_path / "loss.png").write_text("precious")
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path))
    assert one_error_line(code, err) and "loss.png" in err and "--overwrite" in err, err
    assert "epoch" not in out and (tmp_path / "loss.png").read_text() == "precious"
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("name", ["best.pt", "last.pt", "loss.png"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["fresh", "overwrite"])
def test_a_run_file_that_is_a_folder_is_refused_before_the_first_epoch(name, overwrite, fixture_data, tmp_path):
    (tmp_path / name).mkdir()
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path), *overwrite)
    assert one_error_line(code, err) and f"{name} is a folder" in err, err
    assert "epoch" not in out and not (tmp_path / "last.pt").is_file()


def test_resume_may_replace_its_own_loss_curve(fixture_data, tmp_path):
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1), log=lambda *a: None)
    code, _, err = run_main(musicrnn.main, "train", "--out", tmp_path, "--resume", "--epochs", "2")
    assert code == 0, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


# --- sweep, forms, types: one model, named once


@pytest.mark.parametrize("command", ["sweep", "forms", "types"])
def test_judging_refuses_a_checkpoint_and_an_onnx_model_together(command, tiny_onnx, fixture_data, tmp_path,
                                                                  monkeypatch):
    code, out, err = run_main(musicrnn.main, command, "--onnx", tiny_onnx, "--checkpoint", tmp_path / "no.pt",
                              "--num", "1", "--out", tmp_path / "t.json")
    assert one_error_line(code, err) and "--checkpoint" in err and "--onnx" in err, err
    monkeypatch.chdir(tmp_path)  # neither given: the default checkpoint, runs/best.pt, is what is read
    corpus = [] if command == "forms" else ["--train-data", fixture_data["train"]]
    code, _, err = run_main(musicrnn.main, command, "--num", "1", *corpus)
    assert one_error_line(code, err) and "runs/best.pt: no such checkpoint" in err, err


# --- flags that would do nothing are refused


def test_min_count_is_refused_with_the_char_tokenizer_and_its_help_says_why(fixture_data, fixture_tunes, tmp_path):
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "run", "--min-count", "7"))
    assert one_error_line(code, err) and "--min-count" in err and "--tokenizer abc" in err, err
    assert "epoch" not in out
    train = next(a for a in musicrnn.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {a.dest: a.help for a in train.choices["train"]._actions}
    assert "--tokenizer abc" in helps["min_count"]
    vocabulary = {n: musicrnn.build_vocabulary(fixture_tunes, musicrnn.Config(tokenizer="abc", min_count=n))
                  for n in (1, 3)}  # with abc tokens it counts
    assert len(vocabulary[1]) > len(vocabulary[3])


def test_warmup_steps_with_the_plateau_schedule_is_refused(fixture_data, tmp_path):
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "run", "--schedule", "plateau",
                                                         "--warmup-steps", "10"))
    assert one_error_line(code, err) and "--warmup-steps" in err and "plateau" in err and "epoch" not in out, err
    assert run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "run", "--warmup-steps", "10"))[0] == 0


def test_a_dropout_mask_without_dropout_is_refused(fixture_data, tmp_path):
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "run", "--dropout", "0",
                                                         "--dropout-mask", "element"))
    assert one_error_line(code, err) and "--dropout-mask" in err and "epoch" not in out, err


@pytest.mark.parametrize("flags, message", [(["--overwrite"], "without --plot"), (["--plot", ""], "names no file")])
def test_stats_refuses_an_overwrite_with_nothing_to_write_and_an_empty_plot(flags, message, fixture_data):
    code, out, err = run_main(musicrnn.main, "stats", "--data", fixture_data["train"], *flags)
    assert one_error_line(code, err) and message in err and out == "", err


@pytest.mark.parametrize("flags, message", [
    (["--augment-key", "0", "--transpose-range", "C..c"], "--augment-key"),
    (["--transpose-range", "c..C"], "above"),
    (["--transpose-range", "C..a''''"], "MIDI's notes, 0 to 127 (C,,,,, to g''''), not 60 to 129"),
    (["--transpose-range", "C,,,,,,..c"], "MIDI's notes, 0 to 127"),  # a transposed tune: notes no MIDI file holds
], ids=["without augment-key", "reversed", "above MIDI", "below MIDI"])
def test_a_transpose_range_that_does_nothing_or_is_reversed_is_one_line(flags, message, fixture_data, tmp_path):
    code, out, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "run", *flags))
    assert one_error_line(code, err) and "--transpose-range" in err and message in err, err
    assert "epoch" not in out


# --- crafted checkpoint fields: one line that names the field


@pytest.mark.parametrize("field, value", [
    ("epoch", "3"), ("epoch", 0.5), ("epoch", -5), ("epoch", True), ("step", "x"), ("step", -100),
    ("history", [1, 2]), ("history", {"a": 1}), ("history", [{"epoch": 1}]), ("history", [{"epoch": "1"}]),
    ("best_val_loss", float("nan")), ("best_val_loss", "low"), ("lr_scale", -1.0), ("tune_types", 5),
    ("tune_types", [1]),
])
def test_crafted_checkpoint_fields_are_one_line_naming_the_field(field, value, tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, tmp_path / "last.pt")
    code, out, err = run_main(musicrnn.main, "train", "--out", tmp_path, "--resume", "--epochs", "5")
    assert one_error_line(code, err) and field in err, err
    assert "epoch " not in out


def test_a_crafted_setting_in_a_checkpoint_names_the_checkpoint(tiny_run, tmp_path):
    """The user typed no --transpose-range: the refusal says whose setting it is."""
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["config"]["transpose_range"] = "zz"
    torch.save(ckpt, tmp_path / "odd.pt")
    code, _, err = run_main(musicrnn.main, "generate", "--checkpoint", tmp_path / "odd.pt", "--max-tokens", "5")
    assert one_error_line(code, err) and f"{tmp_path / 'odd.pt'}: --transpose-range wants two ABC notes" in err, err


@pytest.mark.parametrize("change", [{"betas": (5.0, -1.0)}, {"eps": -1.0}, {"betas": "x"},
                                    {"weight_decay": float("nan")}])
def test_crafted_optimizer_settings_are_one_line_not_a_run_that_diverges(change, tiny_run, tmp_path):
    """Refused in one line: Adam with betas of 5 would resume without a word, and train on to NaN."""
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    ckpt["optimizer"]["param_groups"][0].update(change)
    torch.save(ckpt, tmp_path / "last.pt")
    code, out, err = run_main(musicrnn.main, "train", "--out", tmp_path, "--resume", "--epochs", "5")
    assert one_error_line(code, err) and "optimizer's settings must be Adam's" in err, err
    assert "epoch " not in out


def test_tune_types_that_are_not_a_list_are_one_line_in_export_and_types(tiny_run, fixture_data, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "tune_types": 5}, tmp_path / "crafted.pt")
    code, _, err = run_main(export.main, "--checkpoint", tmp_path / "crafted.pt", "--out", tmp_path / "m.onnx")
    assert one_error_line(code, err) and "tune_types" in err, err
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = run_main(musicrnn.main, "types", "--checkpoint", tmp_path / "crafted.pt", "--num", "1",
                            "--train-data", fixture_data["train"], "--out", tmp_path / "t.json")
    assert one_error_line(code, err) and "tune_types" in err, err


def test_the_checkpoints_training_writes_pass_the_checks_and_load_the_trained_model(tiny_run):
    for name in ("best.pt", "last.pt"):
        ckpt = musicrnn.load_checkpoint(str(tiny_run / name))
        model, cfg, vocab = musicrnn.model_from_checkpoint(ckpt, name)  # refuses non-finite weights
        assert (cfg.hidden_dim, cfg.embedding_dim) == (32, 16) and model.to_logits.out_features == len(vocab)
        assert all(torch.equal(model.state_dict()[k], w) for k, w in ckpt["model"].items())


# --- export: non-finite weights


def test_an_export_of_nan_weights_is_refused_in_one_line(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["model"]["to_logits.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    code, out, err = run_main(export.main, "--checkpoint", tmp_path / "nan.pt", "--out", tmp_path / "m.onnx")
    assert one_error_line(code, err) and "not finite" in err and "to_logits.weight" in err, err
    assert not (tmp_path / "m.onnx").exists() and "nan" not in out
    code, out, err = run_main(musicrnn.main, "evaluate", "--checkpoint", tmp_path / "nan.pt", "--json")
    assert one_error_line(code, err) and "not finite" in err and out == ""  # not {"loss": NaN, ...}, no JSON


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_weights_that_are_not_real_numbers_are_one_line_never_a_cast(dtype, tiny_run, tmp_path):
    """A crafted checkpoint: loading would cast its weights to float32 (with a warning of torch's for
    complex ones) and generate from what is left."""
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["model"]["to_logits.weight"] = ckpt["model"]["to_logits.weight"].to(dtype)
    torch.save(ckpt, tmp_path / "odd.pt")
    for args in (["generate", "--checkpoint", tmp_path / "odd.pt", "--num", "1", "--max-tokens", "5"],
                 ["evaluate", "--checkpoint", tmp_path / "odd.pt", "--json"]):
        code, out, err = run_main(musicrnn.main, *args)
        assert one_error_line(code, err) and "not real numbers: to_logits.weight" in err and out == "", err


def test_non_finite_outputs_fail_the_parity_check(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "parity", lambda *a, **k: float("nan"))
    code, _, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "m.onnx")
    assert one_error_line(code, err) and "not finite" in err, err


def test_an_export_that_fails_its_parity_check_replaces_nothing(tiny_run, tmp_path, monkeypatch):
    """Checked before it is written: an --overwrite of a good model by one that fails keeps the good one."""
    good = tmp_path / "m.onnx"
    assert run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", good)[0] == 0
    before = good.read_bytes()
    monkeypatch.setattr(export, "parity", lambda *a, **k: 1e18)
    code, out, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", good, "--overwrite")
    assert one_error_line(code, err) and "differs from torch" in err and "wrote" not in out, (out, err)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    code, out, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "new.onnx")
    assert code == 2 and not (tmp_path / "new.onnx").exists()


def test_an_int8_export_that_fails_to_write_either_file_replaces_neither(tiny_run, tmp_path, monkeypatch):
    """The model and its int8 are both written in full before either takes its name: a full disk on
    the second leaves the old pair, not a new model beside an old int8."""
    import safe_write

    out, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    out.write_bytes(b"old model")
    int8.write_bytes(b"old int8")
    real_write = safe_write._Writer.write

    def full_disk_on_int8(writer, data):
        if writer.path == int8:  # the export's own temporary files are written as before
            raise OSError(28, "No space left on device")
        real_write(writer, data)

    monkeypatch.setattr(safe_write._Writer, "write", full_disk_on_int8)
    code, out_text, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", out, "--int8",
                                   "--overwrite")
    assert one_error_line(code, err) and "No space left on device" in err, err
    assert (out.read_bytes(), int8.read_bytes()) == (b"old model", b"old int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]  # no temporary file left


def test_an_out_whose_int8_is_the_same_file_is_refused(tiny_run, tmp_path):
    """m.onnx a link to m.int8.onnx is refused: with --overwrite the int8 model would silently replace the
    fp32 one."""
    (tmp_path / "m.int8.onnx").write_bytes(b"old int8")
    (tmp_path / "m.onnx").symlink_to(tmp_path / "m.int8.onnx")
    code, _, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "m.onnx",
                            "--int8", "--overwrite")
    assert one_error_line(code, err) and "are one file (a link)" in err, err
    assert (tmp_path / "m.int8.onnx").read_bytes() == b"old int8"


def test_a_checkpoint_whose_control_is_not_true_or_false_is_refused(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "control": "no"}}, tmp_path / "crafted.pt")
    for main, args in [(musicrnn.main, ["generate", "--checkpoint", tmp_path / "crafted.pt", "--num", "1"]),
                       (export.main, ["--checkpoint", tmp_path / "crafted.pt", "--out", tmp_path / "m.onnx"])]:
        code, out, err = run_main(main, *args)  # "no" as true: generate would write for a form, export refuse its file
        assert one_error_line(code, err) and "--control must be true or false, not 'no'" in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_an_output_in_a_symlink_loop_is_one_error_line(tiny_onnx, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for args in (["--out", tmp_path / "a"], ["--out", tmp_path / "a" / "tunes.abc"]):
        code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--num", "1", "--max-tokens", "5", *args)
        assert one_error_line(code, err) and out == "", err


def test_a_written_file_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    import safe_write

    calls = []
    for name in ("fsync", "replace", "link"):
        real = getattr(safe_write.os, name)
        monkeypatch.setattr(safe_write.os, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    safe_write.write_atomic(tmp_path / "new.abc", b"X:1\n", overwrite=False)
    safe_write.write_atomic(tmp_path / "new.abc", b"X:2\n", overwrite=True)
    assert calls == ["fsync", "link", "fsync", "replace"] and (tmp_path / "new.abc").read_bytes() == b"X:2\n"


# --- failed starts leave no folder behind


def test_a_failed_start_leaves_no_new_folder(fixture_data, tmp_path):
    typo = tmp_path / "typo" / "run"
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, typo, "--resume"))
    assert one_error_line(code, err) and "no such checkpoint" in err, err
    assert not (tmp_path / "typo").exists()
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "bad", "--train-data",
                                                      tmp_path / "missing.json"))
    assert one_error_line(code, err) and not (tmp_path / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_start_refused_for_want_of_cuda_leaves_no_folder(fixture_data, tmp_path):
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path / "cu"), "--device", "cuda")
    assert one_error_line(code, err) and "cuda" in err and not (tmp_path / "cu").exists()


def test_a_failed_start_keeps_a_folder_that_was_there(fixture_data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_main(musicrnn.main, *train_args(fixture_data, tmp_path, "--resume"))
    assert one_error_line(code, err) and (tmp_path / "notes.txt").read_text() == "mine"


def test_export_checks_its_name_and_its_checkpoint_before_making_folders(tiny_run, tmp_path):
    code, _, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "a" / "b" / "m.txt")
    assert one_error_line(code, err) and ".onnx" in err and not (tmp_path / "a").exists()
    code, _, err = run_main(export.main, "--checkpoint", tmp_path / "no.pt", "--out", tmp_path / "c" / "d" / "m.onnx")
    assert one_error_line(code, err) and "no such checkpoint" in err and not (tmp_path / "c").exists()


# --- a budget spent before the first step


def test_an_epoch_is_never_recorded_without_a_step(fixture_data, tmp_path):
    """The clock may end an epoch only after its first step, except an epoch after one recorded:
    a run always leaves a model trained by at least one step, and no empty epoch is logged."""
    logs = []
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=3, max_minutes=1e-7), log=logs.append)
    history = torch.load(tmp_path / "last.pt", weights_only=True)["history"]
    assert len(history) == 1 and history[0]["step"] >= 1 and history[0]["train_loss"] > 0, history
    assert history[0]["tokens_per_s"] > 0
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=3, max_minutes=1e-7), resume=True, log=logs.append)
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["history"]) == 1
    assert any("time budget reached after 1 batch of epoch 1 (" in line for line in logs), logs


# --- judging figures where there is nothing to measure: n/a, never a made-up number or a NaN


def test_a_type_the_corpus_lacks_is_none_in_the_json_and_n_a_in_the_table(fixture_tunes):
    def generate(opts):
        return ["X:1\nR:jig\nL:1/8\nM:6/8\nK:D\nABc def|\n"] * 2

    rows = judging.type_sweep(generate, sampler.SamplingOptions(), corpus_tunes=[], types=("jig",), log=lambda *a: None)
    assert rows[0]["corpus"] is None and "NaN" not in json.dumps(rows)
    assert "| jig | in 6/8 | n/a | 100% | 100% |" in judging.type_table(rows)


@pytest.mark.parametrize("ending, clean", [("|d2f2|d2f", False), ("|d2f2|d2f2|]", True), ("|d2f2|d2f2|", True),
                                           ("|d2f2|d2f2:|", True)])
def test_a_tune_that_stops_in_mid_bar_is_valid_but_not_bar_clean(ending, clean):
    if not judging.abc2midi_available():
        pytest.skip("abc2midi not installed (apt-get install abcmidi)")
    result = judging.check_with_abc2midi("X:1\nL:1/8\nM:2/4\nK:D\nd2f2|d2f2" + ending + "\n")
    assert result["valid"] and result["bar_clean"] == clean, result["messages"]


def test_tunes_without_notes_have_no_pitch_class_distance_and_no_4_grams(fixture_tunes):
    metrics = judging.tune_metrics(["X:1\nL:1/8\nM:6/8\nK:D\n"], fixture_tunes, judge=False)
    assert metrics["pitch_class_distance"] is None and metrics["distinct_4grams"] is None  # nothing to compare
    assert judging.tune_metrics(fixture_tunes[:3], fixture_tunes, judge=False)["pitch_class_distance"] >= 0


def test_the_sweeps_progress_lines_say_n_a_where_there_is_nothing_to_measure(fixture_tunes):
    lines = []
    rows = judging.sweep(lambda opts: ["X:1\nL:1/8\nM:6/8\nK:D\n"], sampler.SamplingOptions(num=1), fixture_tunes,
                         temperatures=(1.0,), log=lines.append)
    assert rows[0]["distinct_4grams"] is None and "distinct_4grams n/a" in lines[-1], lines


def test_sweep_refuses_a_budget_its_constrained_rows_cannot_finish_in(tiny_onnx, tmp_path):
    code, _, err = run_main(musicrnn.main, "sweep", "--onnx", str(tiny_onnx), "--max-tokens", "30",
                            "--out", str(tmp_path / "s.json"))
    assert one_error_line(code, err) and "from 120" in err


def test_sweep_refuses_a_temperature_given_twice(tiny_onnx, fixture_data, tmp_path):
    code, _, err = run_main(musicrnn.main, "sweep", "--onnx", str(tiny_onnx), "--temperatures", "1", "0.5", "1.0",
                            "--train-data", fixture_data["train"], "--out", str(tmp_path / "s.json"))
    assert one_error_line(code, err) and "gives 1 more than once" in err and not (tmp_path / "s.json").exists(), err


def test_sweep_draws_its_table_against_the_temperature(tiny_onnx, fixture_data, tmp_path, monkeypatch):
    """sweep --plot: one panel per group of figures, a line per figure and side (free, constrained)
    through the temperatures asked for, written as a PNG beside the JSON."""
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, overwrite: drawn.append(fig) or
                        Path(path).write_bytes(b"\x89PNG"))
    code, out, err = run_main(musicrnn.main, "sweep", "--onnx", str(tiny_onnx), "--temperatures", "0.5", "1",
                              "--num", "2", "--max-tokens", "120", "--train-data", fixture_data["train"],
                              "--out", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert code == 0 and f"plot written to {tmp_path / 's.png'}" in out, err
    rows = json.loads((tmp_path / "s.json").read_text())
    lines = {line.get_label(): list(zip(*line.get_data())) for ax in drawn[0].axes for line in ax.get_lines()}
    for key, label in [("valid", "valid"), ("distinct_4grams", "distinct 4-grams"),
                       ("pitch_class_distance", "pitch-class distance")]:
        for side, constrained in (("free", False), ("constrained", True)):
            points = [(r["temperature"], r[key]) for r in rows if r["constrained"] == constrained and r[key] is not None]
            assert lines.get(f"{label}, {side}", []) == points, (key, side)  # what abc2midi could not judge: no point
    if judging.abc2midi_available():  # without it no row is judged, and the verdict panel stays empty
        assert lines["valid, constrained"] == [(0.5, 1.0), (1.0, 1.0)]  # the constrained rows are all valid
    assert [ax.get_title() for ax in drawn[0].axes] == ["abc2midi's verdict", "novelty", "against the corpus"]


@pytest.mark.parametrize("plot, message", [("s.txt", "ending in .png"), ("", "names no file"),
                                           ("exists.png", "pass --overwrite")])
def test_sweep_refuses_a_plot_it_cannot_write_before_any_work(plot, message, tiny_onnx, fixture_data, tmp_path):
    (tmp_path / "exists.png").write_bytes(b"precious")
    code, out, err = run_main(musicrnn.main, "sweep", "--onnx", str(tiny_onnx), "--train-data", fixture_data["train"],
                              "--out", tmp_path / "s.json", "--plot", str(tmp_path / plot) if plot else "")
    assert one_error_line(code, err) and message in err and "temperature" not in out, err


def test_an_export_without_int8_names_the_older_int8_it_leaves(tiny_run, tmp_path):
    args = ["--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "m.onnx"]
    assert run_main(export.main, *args, "--int8")[0] == 0
    before = (tmp_path / "m.int8.onnx").read_bytes()
    code, _, err = run_main(export.main, *args, "--overwrite")
    assert code == 0 and "m.int8.onnx is left as it was" in err, err
    assert (tmp_path / "m.int8.onnx").read_bytes() == before  # not asked to replace it


def test_temporary_checkpoints_a_killed_training_left_are_removed_by_the_next(fixture_data, tmp_path):
    """kill -9 mid-write leaves atomic_file's temporary file; the next training into the folder, holding
    its lock, removes those of its own files and no one else's."""
    tmp_path.mkdir(exist_ok=True)
    left = [tmp_path / ".best.pt.k3x9q2ab.tmp", tmp_path / ".last.pt.z8w1m0cd.tmp"]
    others = tmp_path / ".tunes.abc.a1b2c3d4.tmp"
    for path in [*left, others]:
        path.write_bytes(b"half a file")
    musicrnn.train(tiny_config(fixture_data, tmp_path, epochs=1), log=lambda *a: None)
    assert not any(path.exists() for path in left) and others.exists()
