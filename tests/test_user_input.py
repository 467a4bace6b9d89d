"""What a user types: nothing may destroy their work or end in a traceback.

Each test names the case it covers: an output onto an input, onto an existing file, two
commands at once, unwritable places, flags out of range, crafted files, unbounded work,
surprising flags, file modes, renders, messages, junk input and --help.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import abc_form
import cli
import export
import infer_onnx
import musicrnn
import rendering
import safe_write
import sampler
import serve
from conftest import ROOT, one_error_line, report, run_main, tiny_config


@pytest.fixture()
def copies(tiny_run, tiny_onnx, tmp_path, fixture_data):
    """Copies of the model, its export and the data that a test may try to destroy."""
    shutil.copy(tiny_run / "best.pt", tmp_path / "copy.pt")
    shutil.copy(tiny_onnx, tmp_path / "copy.onnx")
    shutil.copy(fixture_data["train"], tmp_path / "train.json")
    return {name: tmp_path / name for name in ("copy.pt", "copy.onnx", "train.json")}


FORMATS = (".abc", ".onnx", ".json", ".png")  # what the writers' files end in


def writers(c, stem) -> list:
    """Every command that writes a file, aimed at stem + its format's ending, as (main, args, that file)."""
    cheap = ["--num", "1", "--max-tokens", "20"]
    abc, onnx_file, json_file, png = (Path(f"{stem}{suffix}") for suffix in FORMATS)
    return [
        (musicrnn.main, ["generate", "--checkpoint", c["copy.pt"], "--out", abc, *cheap], abc),
        (infer_onnx.main, ["--model", c["copy.onnx"], "--out", abc, *cheap], abc),
        (export.main, ["--checkpoint", c["copy.pt"], "--out", onnx_file], onnx_file),
        (musicrnn.main, ["sweep", "--checkpoint", c["copy.pt"], "--train-data", c["train.json"], "--out", json_file,
                         "--temperatures", "1", "--num", "1", "--max-tokens", "120"], json_file),  # constrained rows' least
        (musicrnn.main, ["stats", "--data", c["train.json"], "--plot", png], png),
        (musicrnn.main, ["sweep", "--checkpoint", c["copy.pt"], "--train-data", c["train.json"], "--plot", png,
                         "--out", Path(c["copy.pt"]).with_name("sweep.json"), "--temperatures", "1", "--num", "1",
                         "--max-tokens", "120"], png),
        (musicrnn.main, ["forms", "--checkpoint", c["copy.pt"], "--num", "1", "--out", json_file], json_file),
        (musicrnn.main, ["types", "--checkpoint", c["copy.pt"], "--train-data", c["train.json"], "--num", "1",
                         "--out", json_file], json_file),
    ]


def test_an_export_is_named_onnx(copies, tmp_path):
    """onnx reads a file's format from its name: an export called .json would not load again."""
    code, _, err = run_main(export.main, "--checkpoint", copies["copy.pt"], "--out", tmp_path / "model.json")
    assert one_error_line(code, err) and "ending in .onnx" in err and not (tmp_path / "model.json").exists()


def test_an_output_is_named_for_its_format(copies, tmp_path, monkeypatch):
    """A tunebook is .abc and a table .json, as an export is .onnx and a plot .png: a slip of the
    name (--out best.pt, or - for the screen) cannot replace a file of another kind, even with --overwrite."""
    monkeypatch.chdir(tmp_path)
    cheap = ["--num", "1", "--max-tokens", "20"]
    cases = [(infer_onnx.main, ["--model", copies["copy.onnx"], *cheap], ".abc"),
             (musicrnn.main, ["generate", "--checkpoint", copies["copy.pt"], *cheap], ".abc"),
             (musicrnn.main, ["forms", "--checkpoint", copies["copy.pt"], "--num", "1"], ".json")]
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"a checkpoint")
    for main, args, suffix in cases:
        for out in (checkpoint, "-"):
            code, _, err = run_main(main, *args, "--out", out, "--overwrite")
            assert one_error_line(code, err) and f"ending in {suffix}" in err, (args, out, err)
    assert checkpoint.read_bytes() == b"a checkpoint" and not (tmp_path / "-").exists()


# --- 1. an output never replaces an input, even with --overwrite


def test_an_output_onto_its_own_input_is_refused_even_with_overwrite(copies):
    cases = [
        (musicrnn.main, ["generate", "--checkpoint", copies["copy.pt"], "--out", copies["copy.pt"], "--overwrite"]),
        (infer_onnx.main, ["--model", copies["copy.onnx"], "--out", copies["copy.onnx"], "--overwrite"]),
        (export.main, ["--checkpoint", copies["copy.pt"], "--out", copies["copy.pt"], "--overwrite"]),
        (musicrnn.main, ["sweep", "--checkpoint", copies["copy.pt"], "--train-data", copies["train.json"],
                         "--out", copies["train.json"], "--overwrite"]),
    ]
    before = {p: p.read_bytes() for p in copies.values()}
    for main, args in cases:
        code, _, err = run_main(main, *args)
        assert one_error_line(code, err) and "is also what this command reads" in err, (args, err)
    assert {p: p.read_bytes() for p in copies.values()} == before


# --- 1, 16. an existing file is replaced only with --overwrite, and keeps its mode


def test_every_writer_refuses_an_existing_file_without_overwrite(copies, tmp_path):
    for main, args, out in writers(copies, tmp_path / "precious"):
        out.write_text("precious")
        code, _, err = run_main(main, *args)
        assert one_error_line(code, err) and "pass --overwrite" in err, (args, err)
        assert out.read_text() == "precious"


def test_with_overwrite_the_file_is_replaced_and_keeps_its_mode(copies, tmp_path):
    out = tmp_path / "tunes.abc"
    out.write_text("old")
    out.chmod(0o640)
    code, _, err = run_main(infer_onnx.main, "--model", copies["copy.onnx"], "--out", out, "--overwrite",
                            "--max-tokens", "20")
    assert code == 0, err
    assert out.read_text().startswith("X:1") and (out.stat().st_mode & 0o777) == 0o640


def test_a_new_file_gets_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        safe_write.write_atomic(tmp_path / "new.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644


# --- 2, 3. two commands at once


def test_a_second_training_into_a_locked_folder_names_the_holder(tmp_path, fixture_data):
    out = tmp_path / "run"
    with safe_write.folder_lock(out):
        code, _, err = run_main(musicrnn.main, "train", "--train-data", fixture_data["train"],
                                "--val-data", fixture_data["val"], "--out", out, "--hidden-dim", "8")
    assert one_error_line(code, err) and f"PID {os.getpid()}" in err
    assert not (out / "last.pt").exists()


def test_a_refused_start_leaves_the_folder_it_made_to_the_training_that_took_it(tmp_path):
    """A --procs 2 rank makes --out and waits for its peer; a 1-process training takes the folder's lock
    meanwhile; the rank is refused, and its clean-up leaves the folder and the other's lock in it:
    removing them would let a third training in beside the second."""
    out, theirs = tmp_path / "run", safe_write.folder_lock(tmp_path / "run")
    with pytest.raises(safe_write.OutputError, match="in use by another training"):
        with safe_write.removed_if_failed(out):
            out.mkdir()                            # ours, made for the run
            theirs.__enter__()                     # the other training takes it
            with safe_write.folder_lock(out):      # ours is refused
                pass
    try:
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(safe_write.OutputError, match="in use by another training"):
            with safe_write.folder_lock(out):      # a third one is still refused
                pass
    finally:
        theirs.__exit__(None, None, None)


def test_ctrl_c_while_the_checkpoints_are_written_waits_for_both(tmp_path, fixture_data, monkeypatch):
    """Ctrl-C between best.pt and last.pt waits for both, or it would leave a best.pt alone (--resume: no
    last.pt) or, under --overwrite, a new best.pt beside the old run's last.pt, which --resume would continue."""
    save = musicrnn.save_checkpoint

    def save_then_interrupt(path, run):
        save(path, run)
        if path.name == "best.pt":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands between the two writes

    monkeypatch.setattr(musicrnn, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "run"
    code, _, err = run_main(musicrnn.main, "train", "--train-data", fixture_data["train"], "--val-data",
                            fixture_data["val"], "--out", out, "--hidden-dim", "8", "--epochs", "3")
    assert code == 130 and err.strip() == "interrupted", err
    best, last = (torch.load(out / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 1 and best["history"] == last["history"]


INTERRUPT_AT_IMPORT = """
import os, runpy, signal, sys
class Interrupt:  # Ctrl-C (or kill: {signal}) the moment the script first imports {module}
    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["{script}", "--help"]
runpy.run_path("{script}", run_name="__main__")
"""


STOPPED = [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]  # Ctrl-C, kill


@pytest.mark.parametrize("script", ["musicrnn.py", "export.py"])
@pytest.mark.parametrize("sent, code, line", STOPPED)
def test_ctrl_c_or_kill_while_torch_loads_is_one_line(script, sent, code, line):
    """Ctrl-C or kill while a command imports torch (its first seconds): one line alone, as later."""
    hook = INTERRUPT_AT_IMPORT.format(module="torch", script=script, signal=sent)
    proc = subprocess.run([sys.executable, "-c", hook], capture_output=True, cwd=ROOT, text=True, timeout=60)
    assert proc.returncode == code and proc.stderr == line + "\n", proc.stderr[-2000:]


@pytest.mark.parametrize("script", ["infer_onnx.py", "serve.py"])
@pytest.mark.parametrize("sent, code, line", STOPPED)
def test_ctrl_c_or_kill_while_numpy_and_onnxruntime_load_is_one_line(script, sent, code, line):
    """The torch-free commands load for ~0.3 s: a signal then is one line too, never a traceback from
    inside numpy, nor a silent end."""
    hook = INTERRUPT_AT_IMPORT.format(module="numpy", script=script, signal=sent)
    proc = subprocess.run([sys.executable, "-c", hook], capture_output=True, cwd=ROOT, text=True, timeout=60)
    assert proc.returncode == code and proc.stderr == line + "\n", proc.stderr[-2000:]


INTERRUPT_AT_EXIT = """
import atexit, os, runpy, signal, sys, time
def ctrl_c_while_exiting():  # registered first, so it runs last of the exit handlers
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
atexit.register(ctrl_c_while_exiting)
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("command", ["infer_onnx", "stats"])
def test_ctrl_c_while_a_finished_command_exits_is_one_line_and_keeps_its_output(command, tiny_onnx, fixture_data):
    """Ctrl-C (one, or the second of two) while Python runs its exit handlers, after the command has
    done its work: "interrupted" and 130 at once, never a traceback from inside torch's or threading's
    handlers, and what the command printed is all on stdout."""
    argv = (["infer_onnx.py", "--model", str(tiny_onnx), "--num", "3", "--seed", "0"] if command == "infer_onnx"
            else ["musicrnn.py", "stats", "--data", str(fixture_data["train"])])
    whole = subprocess.run([sys.executable, *argv], capture_output=True, cwd=ROOT, text=True, timeout=120)
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_EXIT.format(argv=argv)], capture_output=True,
                          cwd=ROOT, text=True, timeout=120)
    assert whole.returncode == 0 and whole.stdout.strip(), whole.stderr[-2000:]
    assert (proc.returncode, proc.stderr) == (130, "interrupted\n"), proc.stderr[-2000:]
    assert proc.stdout == whole.stdout


INTERRUPT_TWICE = """
import os, runpy, signal, sys, threading, time
import cli, sampler
draw, say = sampler.sample_next, cli._say
def first_press(*args, **kwargs):  # Ctrl-C in the work: at the first token drawn
    sampler.sample_next = draw
    os.kill(os.getpid(), signal.SIGINT)
    return draw(*args, **kwargs)
def second_press(line):  # and again {after} s later, while the command cleans up (here: says "interrupted")
    say(line)
    threading.Timer({after}, os.kill, (os.getpid(), signal.SIGINT)).start()
    time.sleep({after} + 2)
    print("clean-up finished", file=sys.stderr)
sampler.sample_next, cli._say = first_press, second_press
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("after, finished", [(0.2, True), (1.5, False)])
def test_a_second_ctrl_c_is_the_same_request_or_if_late_ends_it_at_once(after, finished, tiny_onnx):
    """A second Ctrl-C while the first is honoured: within a second (a double press), ignored, so the
    clean-up finishes; later (a clean-up stuck), the command ends at once. Either way one line and 130,
    never a traceback from a KeyboardInterrupt raised inside the clean-up."""
    argv = ["infer_onnx.py", "--model", str(tiny_onnx), "--num", "3", "--seed", "0"]
    script = INTERRUPT_TWICE.format(after=after, argv=argv)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr == "interrupted\n" + ("clean-up finished\n" if finished else ""), proc.stderr[-2000:]


def test_a_file_that_appears_while_a_command_runs_is_left_as_it_was(tmp_path):
    target = tmp_path / "tunes.abc"
    with pytest.raises(safe_write.OutputError, match="another command"):
        with safe_write.atomic_file(target, overwrite=False) as f:
            f.write(b"mine")
            target.write_text("theirs")  # the other run finished first
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["tunes.abc"]


# --- 4. unwritable places: one line, before any work


def test_a_folder_or_an_unwritable_place_as_output_is_one_line(copies, tmp_path):
    folder = tmp_path / "folder"
    for suffix in FORMATS:
        Path(f"{folder}{suffix}").mkdir()
    for target, message in [(folder, "is a folder"), ("/proc/no-such-dir/out", "cannot write")]:
        train = (musicrnn.main, ["train", "--train-data", copies["train.json"], "--out", "/proc/no-such-dir/run"], None)
        for main, args, _ in writers(copies, target) + ([train] if target != folder else []):
            code, out, err = run_main(main, *args, "--overwrite")
            assert one_error_line(code, err) and message in err, (args, err)
            assert "temperature" not in out  # refused before the work


def test_training_into_a_file_is_refused_before_the_first_epoch(tmp_path, fixture_data):
    existing = tmp_path / "existing.abc"
    existing.write_text("X:1\n")
    for out_dir in (existing, "/dev/null"):  # a device is no folder either
        code, out, err = run_main(musicrnn.main, "train", "--train-data", fixture_data["train"],
                                  "--val-data", fixture_data["val"], "--out", out_dir)
        assert one_error_line(code, err) and f"{out_dir} is not a folder" in err and "epoch" not in out
    assert existing.read_text() == "X:1\n"


def limited_file_size(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    return preexec


def test_a_full_disk_is_one_line_and_leaves_no_file(tiny_onnx, tmp_path):
    """The disk-full drill: a file-size limit makes the write fail as a full disk does."""
    out = tmp_path / "tunes.abc"
    result = subprocess.run([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "20",
                             "--max-tokens", "200", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                            preexec_fn=limited_file_size(1000))
    assert one_error_line(result.returncode, result.stderr) and str(out) in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_small_tmpfs_fills_up_with_one_line(tiny_onnx, tmp_path):
    """The same on a real 64 KB tmpfs, where the machine lets a test mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs")
    try:
        (mount / "filler").write_bytes(b"x" * 60_000)  # 4 KB left
        out = mount / "tunes.abc"
        result = subprocess.run([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "400",
                                 "--max-tokens", "400", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert one_error_line(result.returncode, result.stderr) and "No space left" in result.stderr, result.stderr
        assert [p.name for p in mount.iterdir()] == ["filler"]
    finally:
        subprocess.run(["umount", str(mount)])


# --- 5, 6, 7, 12, 13. flags out of range


BAD_TRAINING_FLAGS = [["--batch-size", "0"], ["--batch-size", "-1"], ["--hidden-dim", "0"], ["--num-layers", "0"],
                      ["--embedding-dim", "-1"], ["--dropout", "2"], ["--lr", "-1"], ["--lr", "nan"],
                      ["--lr", "5e-324"], ["--max-minutes", "0"], ["--epochs", "0"], ["--grad-clip", "nan"], ["--limit", "0"],
                      ["--seed", "-5"], ["--hidden-dim", "4096", "--num-layers", "16"], ["--transpose-range", "x"]]


@pytest.mark.parametrize("flags", BAD_TRAINING_FLAGS, ids=" ".join)
def test_training_flags_out_of_range_are_one_line(flags, tmp_path, fixture_data):
    code, out, err = run_main(musicrnn.main, "train", "--train-data", fixture_data["train"],
                              "--val-data", fixture_data["val"], "--out", tmp_path / "run", *flags)
    assert one_error_line(code, err) and "epoch" not in out, err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_config_out_of_range_from_the_api_is_refused_too(tmp_path, fixture_data):
    with pytest.raises(musicrnn.UserError, match="--batch-size must be a whole number"):
        musicrnn.train(tiny_config(fixture_data, tmp_path, batch_size=0), log=lambda *a: None)


@pytest.mark.parametrize("flags", [["--seed", "-5"], ["--temperature", "inf"], ["--temperature", "1e308"],
                                   ["--temperature", "1e308", "--constrained"], ["--threads", "1000"],
                                   ["--top-k", "100000"], ["--num", "0"], ["--max-tokens", "nan"]], ids=" ".join)
def test_sampling_flags_out_of_range_are_one_line(flags, tiny_run, tiny_onnx):
    onnx_only = flags[0] == "--threads"
    runs = [(infer_onnx.main, ["--model", tiny_onnx])]
    if not onnx_only:
        runs.append((musicrnn.main, ["generate", "--checkpoint", tiny_run / "best.pt"]))
    for main, args in runs:
        code, out, err = run_main(main, *args, *flags)
        assert one_error_line(code, err) and out == "", (flags, err)


def test_sweep_refuses_a_negative_seed(tiny_run):
    code, _, err = run_main(musicrnn.main, "sweep", "--checkpoint", tiny_run / "best.pt", "--seed", "-5")
    assert one_error_line(code, err)


# --- 8, 18, 19. data that cannot be read: one line


def test_unreadable_collections_are_one_line(tmp_path, tiny_run):
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"control code": "", "abc notation": "X:1\nK:D\nABc|\n"}))
    junk = tmp_path / "junk.abc"
    rng = np.random.default_rng(0)
    lines = ["".join(map(chr, rng.integers(32, 127, size=int(rng.integers(0, 60))))) for _ in range(20000)]
    lines[::97] = ["X:" + line for line in lines[::97]]
    lines[3::89] = ["K:" + line for line in lines[3::89]]
    junk.write_text("\n".join(lines))
    cases = [(single, "one JSON object"), (junk, "tunes skipped"), ("nosuchprotocol://x/train.json", "cannot be read"),
             ("memory://missing.json", "no such file"), ("hf://datasets/sander-wood/irishman/validation.json",
                                                         "cannot be read")]  # no network here, or no such dataset
    for data, message in cases:
        code, _, err = run_main(musicrnn.main, "evaluate", "--checkpoint", tiny_run / "best.pt", "--data", data)
        assert one_error_line(code, err) and message in err, (data, err)


def test_a_tunebook_with_some_junk_keeps_the_music_and_counts_the_rest(tmp_path, fixture_tunes, capsys):
    book = tmp_path / "mixed.abc"
    book.write_text("\n".join(fixture_tunes[:3]) + "\nX:9\nK:qq\n#$%&@#$%^&*_+=?><\n\nX:10\nT:no key\n")
    assert musicrnn.load_tunes(str(book)) == fixture_tunes[:3]
    assert "3 tunes read, 2 tunes skipped" in capsys.readouterr().err


# --- 9, 18. crafted and damaged files


def test_crafted_checkpoints_are_one_line(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    cases = {"list_config.pt": {**ckpt, "config": [1, 2]}, "text.pt": None,
             "bad_range.pt": {**ckpt, "config": {**ckpt["config"], "hidden_dim": -3}},
             "bad_vocab.pt": {**ckpt, "vocab": {"kind": "char", "tokens": ["<pad>", "<eos>", "<unk>", 3, 3]}},
             "bad_weights.pt": {**ckpt, "model": {"embedding.weight": torch.zeros(2, 2)}}}
    for name, content in cases.items():
        if content is None:
            (tmp_path / name).write_text("hello, I am not a checkpoint\n" * 4)
        else:
            torch.save(content, tmp_path / name)
        code, _, err = run_main(musicrnn.main, "generate", "--checkpoint", tmp_path / name)
        assert one_error_line(code, err), (name, err)
        run = tmp_path / f"run_{name}"
        run.mkdir()
        shutil.copy(tmp_path / name, run / "last.pt")
        code, out, err = run_main(musicrnn.main, "train", "--out", run, "--resume")
        assert one_error_line(code, err) and "epoch" not in out, (name, err)
    assert "not a PyTorch zip file" in run_main(musicrnn.main, "evaluate", "--checkpoint", tmp_path / "text.pt")[2]


def test_resume_of_a_checkpoint_without_epochs_in_its_config_still_works(tmp_path, fixture_data):
    out = tmp_path / "run"
    musicrnn.train(tiny_config(fixture_data, out, epochs=1), log=lambda *a: None)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["config"]["epochs"]
    torch.save(ckpt, out / "last.pt")
    code, _, err = run_main(musicrnn.main, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 0, err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_crafted_onnx_files_are_one_line(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    wrong_shape = onnx.load(str(tiny_onnx))
    config = json.loads(meta["musicrnn.config"])
    onnx.helper.set_model_props(wrong_shape, {**meta, "musicrnn.config": json.dumps({**config, "hidden_dim": 7})})
    onnx.save(wrong_shape, str(tmp_path / "wrong_shape.onnx"))
    node = onnx.helper.make_node("Identity", ["tokens"], ["logits"])
    graph = onnx.helper.make_graph([node], "foreign", [onnx.helper.make_tensor_value_info("tokens", 7, [None, 1])],
                                   [onnx.helper.make_tensor_value_info("logits", 7, [None, 1])])
    foreign = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(foreign, meta)
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    nested = onnx.load(str(tiny_onnx))
    onnx.helper.set_model_props(nested, {**meta, "musicrnn.config": "[" * 200_000 + "]" * 200_000})
    onnx.save(nested, str(tmp_path / "nested.onnx"))
    (tmp_path / "folder.onnx").mkdir()
    for name in ("wrong_shape.onnx", "foreign.onnx", "nested.onnx", "folder.onnx"):
        code, _, err = run_main(infer_onnx.main, "--model", tmp_path / name)
        assert one_error_line(code, err) and ("musicrnn" in err or "is a folder" in err), (name, err)


@pytest.mark.parametrize("scheme", ["file", "FILE", "File"])  # the readers take a scheme in any case
def test_an_input_given_as_a_file_url_is_never_replaced(fixture_data, tmp_path, scheme):
    data = tmp_path / "tunes.png"
    shutil.copy(fixture_data["train"], data)
    before = data.read_bytes()
    code, _, err = run_main(musicrnn.main, "stats", "--data", f"{scheme}://{data}", "--plot", data, "--overwrite")
    assert one_error_line(code, err) and "is also what this command reads" in err and data.read_bytes() == before


def test_a_file_an_input_folder_is_read_for_is_never_replaced(fixture_data, copies, tmp_path):
    """A folder of tunes is read for its .abc and .json files, a link among them included: none is an --out."""
    folder = tmp_path / "tunes"
    folder.mkdir()
    shutil.copy(fixture_data["train"], folder / "a.json")
    (folder / "b.json").symlink_to(tmp_path / "elsewhere.json")
    shutil.copy(fixture_data["train"], tmp_path / "elsewhere.json")
    before = {p: p.read_bytes() for p in (folder / "a.json", tmp_path / "elsewhere.json")}
    for out in (folder / "a.json", tmp_path / "elsewhere.json"):
        code, _, err = run_main(musicrnn.main, "sweep", "--checkpoint", copies["copy.pt"], "--train-data", folder,
                                "--out", out, "--overwrite")
        assert one_error_line(code, err) and "is also what this command reads" in err, err
    assert {p: p.read_bytes() for p in before} == before


def test_a_run_started_with_relative_data_paths_resumes_from_any_folder(fixture_data, tmp_path, monkeypatch):
    monkeypatch.chdir(fixture_data["folder"])
    tiny = ["--embedding-dim", "8", "--hidden-dim", "16", "--batch-size", "4", "--out", tmp_path / "run"]
    code, _, err = run_main(musicrnn.main, "train", "--train-data", "train.json", "--val-data", "validation.json",
                            "--epochs", "1", *tiny)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # where no train.json is
    code, _, err = run_main(musicrnn.main, "train", "--resume", "--epochs", "2", "--out", tmp_path / "run")
    assert code == 0, err
    code, _, err = run_main(musicrnn.main, "train", "--resume", "--epochs", "3", "--out", tmp_path / "run",
                            "--train-data", fixture_data["train"])  # the same file, spelled from here
    assert code == 0, err


def test_a_loss_past_what_exp_can_hold_is_an_infinite_perplexity(tiny_run, fixture_data, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["model"]["to_logits.weight"] *= 1e5  # confidently wrong: a loss of thousands of nats
    torch.save(ckpt, tmp_path / "huge.pt")
    code, out, err = run_main(musicrnn.main, "evaluate", "--checkpoint", tmp_path / "huge.pt",
                              "--data", fixture_data["val"], "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["loss"] > 700 and metrics["perplexity"] is None, err  # JSON has no inf


def test_a_pickled_checkpoint_prints_no_warning_before_its_line(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    result = subprocess.run([sys.executable, "musicrnn.py", "evaluate", "--checkpoint", str(tmp_path / "pickled.pt")],
                            capture_output=True, text=True, cwd=ROOT)
    assert one_error_line(result.returncode, result.stderr) and result.stderr.rstrip().endswith("plain values only)")


# --- 10. long inputs in bounded memory


def test_chunked_evaluation_and_training_give_the_numbers_of_the_whole_tune(tiny_run, fixture_tunes):
    model, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tiny_run / "best.pt")))
    long_tune = fixture_tunes[0] + "".join(t.split("K:", 1)[1] for t in fixture_tunes)  # ~1,500 characters
    data = musicrnn.MusicDataset([long_tune, fixture_tunes[1]], vocab)
    whole = musicrnn.evaluate(model, data, vocab.pad_id, torch.device("cpu"))
    chunked = musicrnn.evaluate(model, data, vocab.pad_id, torch.device("cpu"), chunk=37)
    assert np.isclose(whole["bits_per_char"], chunked["bits_per_char"], rtol=1e-5, atol=0)
    x, y = musicrnn.collate([data[0], data[1]], vocab.pad_id)
    losses = []
    for chunk in (musicrnn.CHUNK, 37):
        torch.manual_seed(0)
        copy = musicrnn.build_model(cfg, len(vocab))
        copy.load_state_dict(model.state_dict())
        copy.eval()  # no dropout: both see the same function
        losses.append(musicrnn.train_step(copy, torch.optim.SGD(copy.parameters(), lr=0.0), x, y, vocab.pad_id,
                                          1.0, int((y != vocab.pad_id).sum()), chunk=chunk))
    assert np.isclose(*losses, rtol=1e-5, atol=0)


def peak_mb(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command in a child that reports its own peak memory, as make bench measures it."""
    import bench

    result = subprocess.run([sys.executable, "-c", bench._PEAK, *args], capture_output=True, text=True, cwd=ROOT)
    return result, int(re.search(r"PEAK_KB (\d+)", result.stderr).group(1)) / 1024


@pytest.mark.slow
def test_a_5_mb_tune_is_evaluated_and_trained_in_bounded_memory(tiny_run, tmp_path, fixture_tunes):
    """The drill: one 5 MB tune, scored under 500 MB of peak memory, and trained on."""
    body = "".join(t.split("K:", 1)[1].split("\n", 1)[1] for t in fixture_tunes)
    tune = "X:1\nL:1/8\nM:6/8\nK:D\n" + body * (5_000_000 // len(body))
    (tmp_path / "long.abc").write_text(tune)
    result, mb = peak_mb(["musicrnn.py", "evaluate", "--checkpoint", str(tiny_run / "best.pt"),
                          "--data", str(tmp_path / "long.abc"), "--json"])
    assert result.returncode == 0, result.stderr
    report(f"one 5 MB tune: evaluate peaks at {mb:.0f} MB")
    assert json.loads(result.stdout)["chars"] == len(tune) and mb < 500, mb
    result, mb = peak_mb(["musicrnn.py", "train", "--train-data", str(tmp_path / "long.abc"),
                          "--val-data", str(tmp_path / "long.abc"), "--hidden-dim", "16", "--embedding-dim", "8",
                          "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.returncode == 0 and (tmp_path / "run" / "best.pt").exists(), result.stderr
    report(f"one 5 MB tune: a training epoch peaks at {mb:.0f} MB")
    assert mb < 1500


# --- 11. many tunes: bounded batches, streamed


def test_many_tunes_come_in_batches_numbered_and_reproducible(tiny_onnx, tmp_path):
    args = ["--model", tiny_onnx, "--max-tokens", "30", "--seed", "3"]
    code, many, err = run_main(infer_onnx.main, *args, "--num", "130", "--out", tmp_path / "many.abc")
    assert code == 0, err
    numbers = [int(line[2:]) for line in many.splitlines() if line.startswith("X:")]
    assert numbers == list(range(1, 131))
    assert (tmp_path / "many.abc").read_text() + "\n" == many
    _, first, _ = run_main(infer_onnx.main, *args, "--num", "64")
    assert many.startswith(first)  # the first batch is the same tunes as asking for 64


def test_a_huge_request_streams_tunes_in_bounded_memory(tiny_onnx):
    """The 100,000-tune drill: tunes appear batch by batch while memory stays flat; then stop it."""
    proc = subprocess.Popen([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "100000",
                             "--max-tokens", "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                            text=True)
    try:
        tunes, deadline = 0, time.time() + 120
        while tunes < 5 * 64 and time.time() < deadline:
            tunes += proc.stdout.readline().startswith("X:")
        status = open(f"/proc/{proc.pid}/status").read()
        peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    finally:
        proc.kill()
        proc.wait()
    report(f"--num 100000: {tunes} tunes streamed before the stop, peak {peak_kb / 1024:.0f} MB")
    assert tunes >= 5 * 64 and peak_kb / 1024 < 400, (tunes, peak_kb)


# --- 14. --resume says what it keeps


def test_resume_refuses_settings_it_cannot_honour(tmp_path, fixture_data, monkeypatch):
    out = tmp_path / "run"
    base = ["train", "--train-data", fixture_data["train"], "--val-data", fixture_data["val"], "--out", out,
            "--hidden-dim", "16", "--embedding-dim", "8", "--epochs", "2"]
    assert run_main(musicrnn.main, *base)[0] == 0
    for extra, message in [(["--hidden-dim", "32"], "--hidden-dim 32 (it has 16)"), (["--lr", "0.1"], "--lr 0.1"),
                           (["--tokenizer", "abc"], "--tokenizer abc"), (["--epochs", "1"], "already done 2"),
                           (["--max-minutes", "0.00001"], "has already trained for")]:
        code, _, err = run_main(musicrnn.main, *base, "--resume", *extra)
        assert one_error_line(code, err) and message in err, (extra, err)
    code, _, err = run_main(musicrnn.main, *base, "--resume", "--overwrite")
    assert one_error_line(code, err) and "not allowed with argument" in err
    code, out_text, err = run_main(musicrnn.main, *base, "--resume", "--epochs", "3", "--patience", "5")
    assert code == 0 and "resuming" in out_text, err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    same_file = f'{Path(fixture_data["train"]).parent}/./{Path(fixture_data["train"]).name}'  # Path would drop "."
    spelled = [same_file if arg == fixture_data["train"] else arg for arg in base]  # the same file, spelled anew
    code, out_text, err = run_main(musicrnn.main, *spelled, "--resume", "--epochs", "4", "--patience", "5")
    assert code == 0 and "resuming" in out_text, err
    monkeypatch.chdir(Path(fixture_data["train"]).parent)  # and as a relative path, the run's data given absolute
    relative = ["train.json" if arg == fixture_data["train"] else arg for arg in base]
    code, out_text, err = run_main(musicrnn.main, *relative, "--resume", "--epochs", "5", "--patience", "5")
    assert code == 0 and "resuming" in out_text, err
    code, out_text, err = run_main(musicrnn.main, "train", "--out", out, "--resume")
    assert code == 0 and "nothing to train: 5 of --epochs 5 done" in out_text, out_text
    assert "raise --epochs" in out_text, out_text  # the limit that ended it, not both
    code, out_text, err = run_main(musicrnn.main, *base, "--resume", "--epochs", "5", "--patience", "6")
    assert one_error_line(code, err) and "--epochs and --patience: nothing to train" in err, err  # both did nothing
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 5


# --- 15. meter and key checked alike, free and constrained


@pytest.mark.parametrize("flags, message", [
    (["--key", "D", "--constrained"], "give --meter too"), (["--meter", "13/0"], "not a meter"),
    (["--meter", "13/0", "--constrained"], "not a meter"), (["--key", "H#"], "not a key"),
    (["--key", "H#", "--meter", "6/8", "--constrained"], "not a key"),
    (["--key", "bbmix"], "not a key like D, Ador, Bbmix or F#m (its letter a capital: Bbmix)"),  # as abc2midi reads it
    (["--key", "h"], "not a key like D, Ador, Bbmix or F#m")], ids=" ".join)
def test_meter_and_key_are_checked_in_both_modes(flags, message, tiny_onnx):
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, *flags)
    assert one_error_line(code, err) and message in err


@pytest.mark.parametrize("flags, message", [
    (["--constrained", "--max-tokens", "5"], "--max-tokens 5 is too few for --constrained"),  # no room to finish
    (["--max-bars", "5"], "add --constrained"),                                              # nothing would cap
    (["--top-k", "1", "--temperature", "0.8"], "--temperature does nothing with --top-k 1"),  # greedy: nothing drawn
    (["--temperature", "1", "--top-k", "1"], "--temperature does nothing with --top-k 1"),    # the default, typed
    (["--constrained", "--max-bars", "5", "--meter", "6/8", "--sections", "2", "--bars", "4"],
     "error: --max-bars with a form: the form sets the bars itself; give --max-bars or the form, not both"),
    (["--meter", "6/8", "--key", "Dog"], "not a key"), (["--meter", "6/8", "--key", "D\nK:G"], "not a key"),
    (["--meter", "6/8", "--key", "A#"], "not a key"),                                         # 10 sharps
    (["--constrained", "--prompt", "X:1\\nL:1/8\\nM:6/8\\nK:Fbm\\n"], "not 'K:Fbm'"),  # 10 flats
    (["--meter", "3/3"], "not a meter"),                                                     # abc2midi refuses it
    (["--constrained", "--prompt", "X:1\\nL:1/3\\nM:6/8\\nK:D\\n"], "like L:1/8, not 'L:1/3'"),
    (["--constrained", "--prompt", "X:1\\nL:1/8\\nM:6/8\\nK:Dog\\n"], "with nothing after its mode, not 'K:Dog'"),
    (["--sections", "2", "--bars", "\u00b2"], "--bars \u00b2: one number"),                    # isdigit(), not int()
], ids=repr)
def test_a_request_the_tunes_could_not_honour_is_one_line(flags, message, tiny_onnx):
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, *flags)
    assert one_error_line(code, err) and message in err, err


def test_top_k_1_alone_writes_the_most_likely_tune_whatever_the_seed(tiny_onnx):
    """Greedy decoding: the temperature untyped, no draw decides anything, so every seed gives one tune."""
    tunes = {run_main(infer_onnx.main, "--model", tiny_onnx, "--top-k", "1", "--seed", seed, "--max-tokens", "80")[1]
             for seed in ("0", "1", "2")}
    assert len(tunes) == 1 and next(iter(tunes)).startswith("X:1")


def test_bars_for_one_section_ask_for_one_number_only(tiny_onnx):
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--sections", "1", "--bars", "8,8")
    assert one_error_line(code, err) and err.strip().endswith("--bars 8,8: one number"), err


@pytest.mark.parametrize("out", ["", "a/folder/"], ids=repr)
def test_an_out_that_names_no_file_is_one_line(out, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out", out)
    assert one_error_line(code, err) and "names no file" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt, flags", [("X:1\\nT:A\\n\\nL:1/8\\n", []),
                                           ("X:1\\nL:1/8\\nM:6/8\\nK:D\\nA|\\n\\n", []),
                                           ("X:1\\nL:1/8\\nM:6/8\\nK:D\\nA|\\n\\n", ["--constrained"])])
def test_a_prompt_with_a_blank_line_is_one_line(prompt, flags, tiny_onnx):
    """A blank line ends a tune in a tunebook: the tune printed cannot keep it (one at the end too)."""
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", prompt, *flags)
    assert one_error_line(code, err) and "blank line" in err, err


def test_a_meter_alone_is_in_d_as_the_help_says(tiny_onnx):
    code, out, _ = run_main(infer_onnx.main, "--model", tiny_onnx, "--meter", "6/8", "--max-tokens", "5")
    assert code == 0 and out.startswith("X:1\nL:1/8\nM:6/8\nK:D\n")
    assert "(with --meter alone: D)" in " ".join(infer_onnx.build_parser().format_help().split())


def test_out_is_written_in_full_when_the_reader_of_stdout_stops_early(tiny_onnx, tmp_path):
    """`... --out all.abc | head -3`: the pipe closes after the first lines, the file still gets every tune."""
    out = tmp_path / "all.abc"
    proc = subprocess.Popen([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "70",
                             "--max-tokens", "20", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
    numbers = {int(n) for n in re.findall(r"(?m)^X:(\d+)$", out.read_text())}
    assert set(range(1, 71)) <= numbers  # the first batch of 64 and the 6 after the pipe closed


def test_a_closed_stdout_is_no_reader_and_the_work_goes_on(tiny_onnx, tmp_path):
    """`infer_onnx.py --out all.abc >&-`: Python has no sys.stdout at all; the tunes are still written,
    and no file the command opens takes stdout's place."""
    out = tmp_path / "all.abc"
    proc = subprocess.run([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "3",
                           "--max-tokens", "20", "--out", str(out)], stderr=subprocess.PIPE, cwd=ROOT,
                          preexec_fn=lambda: os.close(1), timeout=120)
    assert proc.returncode == 0 and proc.stderr.decode() == "", proc.stderr.decode()
    assert re.findall(r"(?m)^X:(\d+)$", out.read_text()) == ["1", "2", "3"]


def test_a_closed_stderr_loses_no_work_and_no_file_takes_its_place(fixture_data, tmp_path):
    """`musicrnn.py train ... 2>&-`: Python has no sys.stderr; the progress bar and warnings write nowhere,
    the run finishes, and neither checkpoint is the descriptor that torch's warnings would write to."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "musicrnn.py", "train", "--train-data", fixture_data["train"],
                           "--val-data", fixture_data["val"], "--hidden-dim", "16", "--embedding-dim", "8",
                           "--epochs", "1", "--out", str(out)], stdout=subprocess.PIPE, cwd=ROOT,
                          preexec_fn=lambda: os.close(2), timeout=300)
    assert proc.returncode == 0 and "best val loss" in proc.stdout.decode(), proc.stdout.decode()[-500:]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    refused = subprocess.run([sys.executable, "musicrnn.py", "train", "--train-data", fixture_data["train"],
                              "--val-data", fixture_data["val"], "--out", str(out)], stdout=subprocess.PIPE,
                             cwd=ROOT, preexec_fn=lambda: os.close(2), timeout=300)
    assert (refused.returncode, refused.stdout) == (2, b"")  # a user's error: its line has nowhere to go


def test_an_out_name_too_long_to_write_is_refused_before_the_work(tiny_onnx, tmp_path):
    """A name within Linux's 255 bytes whose temporary file would pass them: refused at once, not after
    the tunes are made."""
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                              tmp_path / ("a" * 246 + ".abc"))
    assert one_error_line(code, err) and "more than 239 bytes" in err and out == "", err
    assert list(tmp_path.iterdir()) == []


def test_a_stdout_that_fails_is_said_once_and_the_work_goes_on(tiny_onnx, tmp_path):
    """`infer_onnx.py --out all.abc > /dev/full` (a full disk behind the redirect): one warning, the tunes
    written all the same, exit 0."""
    out = tmp_path / "all.abc"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "3",
                               "--max-tokens", "20", "--out", str(out)], stdout=full, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=120, text=True)
    assert proc.returncode == 0 and proc.stderr.splitlines() == [
        "warning: standard output: No space left on device; the command goes on without it"], proc.stderr
    assert re.findall(r"(?m)^X:(\d+)$", out.read_text()) == ["1", "2", "3"]


@pytest.mark.parametrize("command", [
    ["musicrnn.py", "sweep", "--num", "2", "--temperatures", "0.5", "1", "--max-tokens", "120", "--onnx"],
    ["musicrnn.py", "stats", "--plot"]], ids=["sweep", "stats"])
def test_a_reader_that_stops_early_ends_the_printing_not_the_work(command, tiny_onnx, fixture_data, tmp_path):
    """`musicrnn.py sweep ... | head -1`: the command finishes and writes its files, exit 0."""
    out = tmp_path / ("sweep.json" if "sweep" in command else "lengths.png")
    args = [*command, str(tiny_onnx), "--train-data", fixture_data["train"], "--out", str(out)] \
        if "sweep" in command else [*command, str(out), "--data", fixture_data["train"]]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "error" not in err, err
    assert out.stat().st_size > 0


def test_a_prompt_typed_with_backslash_n_or_pasted_with_crlf_keeps_its_header(tiny_onnx):
    """A shell passes \\n through as two characters: the prompt's lines must still be lines, else
    the whole header would sit on its X: line, which the tunebook replaces with its own number."""
    for typed, extra in [("X:1\\nL:1/8\\nM:6/8\\nK:D\\n", []), ("X:1\\nL:1/8\\nM:6/8\\nK:D\\n", ["--constrained"]),
                         ("X:1\r\nL:1/8\r\nM:6/8\r\nK:D\r\n", ["--constrained"])]:
        code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", typed, "--max-tokens", "120",
                                  *extra)
        assert code == 0, err
        assert out.startswith("X:1\nL:1/8\nM:6/8\nK:D\n"), out


def test_a_tune_pasted_from_a_tunebook_with_its_title_and_comment_lines_is_continued(tiny_onnx):
    """The Nottingham Music Database's header: a title the model cannot spell (W), a % comment line;
    comments in the body, at a line's end and alone; free and constrained, the tune keeps them as typed."""
    prompt = "X: 1\nT:Wind % x\n% Nottingham Music Database\nS:Trad\nM:6/8\nL:1/8\nK:D\nDFA dAF| % A\n% part A\n"
    for extra in ([], ["--constrained"]):
        code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", prompt, "--max-tokens", "200",
                                  *extra)
        assert code == 0, err
        assert out.startswith(prompt.replace("X: 1", "X:1")), out
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--constrained", "--prompt",
                            "X:1\nT:Wind\nM:6/8\nL:1/8\nK:D\nDFA dAF|DF|")  # its quote lacks the T: line: it says so
    assert one_error_line(code, err) and "the bar has 2 units" in err and "as the model reads it" in err, err
    for unfinished in ("X:1\nT:Wind", "X:1\nM:6/8\nK:D\nDFA % the"):
        code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", unfinished)
        assert one_error_line(code, err) and "end the line" in err


# --- 17. --render


@pytest.mark.skipif(not shutil.which("abc2midi"), reason="abc2midi not installed (apt-get install abcmidi)")
def test_render_with_overwrite_replaces_the_tunebooks_render_whole_and_counts_only_its_own(tiny_onnx, tmp_path):
    """The tunebook of 4 tunes is replaced by one of 1: its tunes 2-4's files would play tunes it no longer
    holds, so they go; another tunebook's files (tunes1-1.mid: without the "-", tunes11.mid) stay."""
    out = tmp_path / "tunes.abc"
    args = ["--model", tiny_onnx, "--constrained", "--max-tokens", "400", "--out", out, "--render"]
    assert run_main(infer_onnx.main, *args, "--num", "4")[0] == 0
    earlier = {p.name: p.read_bytes() for p in tmp_path.glob("tunes*.mid")}
    assert sorted(earlier) == [f"tunes-{n}.mid" for n in (1, 2, 3, 4)]
    (tmp_path / "tunes1-1.mid").write_bytes(b"another tunebook's")
    code, _, err = run_main(infer_onnx.main, *args, "--num", "1")
    assert one_error_line(code, err) and "pass --overwrite" in err
    code, _, err = run_main(infer_onnx.main, *args, "--num", "1", "--seed", "5", "--overwrite")
    assert code == 0 and "MIDI: 1 file " in err, err
    now = {p.name: p.read_bytes() for p in tmp_path.glob("tunes*.mid")}
    assert sorted(now) == ["tunes-1.mid", "tunes1-1.mid"] and now["tunes-1.mid"] != earlier["tunes-1.mid"]
    assert now["tunes1-1.mid"] == b"another tunebook's"


def test_render_without_out_is_one_line(tiny_onnx):
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--render")
    assert one_error_line(code, err) and "give --out too" in err


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_an_error_with_stderr_closed_or_full_is_exit_2_and_never_lands_in_stdout(stderr):
    """2>&- or 2>/dev/full: the error line has nowhere to go, and must not go to stdout, which may be the
    file the user asked for (print with no stderr writes to stdout)."""
    with open(os.devnull if stderr == "closed" else "/dev/full", "w") as sink:
        done = subprocess.run([sys.executable, "infer_onnx.py", "--num", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=sink, text=True, preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None)
    assert done.returncode == 2 and done.stdout == ""


def test_overwrite_without_out_is_one_line(tiny_onnx):
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--overwrite", "--max-tokens", "5")
    assert one_error_line(code, err) and "without --out nothing is written" in err and out == ""


def test_render_never_replaces_an_input_even_with_overwrite(tmp_path):
    """A tunebook with more tunes than were asked for (a model that wrote an X: line itself) would
    render tunes-2.mid: when that is the model, it is refused before any tool runs."""
    book, model = tmp_path / "tunes.abc", tmp_path / "tunes-2.mid"
    book.write_text("X:1\nL:1/8\nM:2/4\nK:D\nAB cd|\nX:2\nL:1/8\nM:2/4\nK:D\ndc BA|\n")
    model.write_bytes(b"the model")
    with pytest.raises(safe_write.OutputError, match="is also what this command reads"):
        rendering.render_tunebook(book, overwrite=True, inputs=[model])
    assert model.read_bytes() == b"the model" and sorted(p.name for p in tmp_path.iterdir()) == ["tunes-2.mid",
                                                                                                 "tunes.abc"]


def test_an_out_that_is_a_link_to_nowhere_is_refused_before_the_work(tiny_onnx, tmp_path):
    (tmp_path / "tunes.abc").symlink_to(tmp_path / "nowhere.abc")
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                              tmp_path / "tunes.abc")
    assert one_error_line(code, err) and "is a link to a missing" in err and out == ""


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["fresh", "overwrite"])
def test_an_out_that_is_a_pipe_or_a_link_to_one_is_never_replaced_by_a_file(tiny_onnx, tmp_path, overwrite):
    os.mkfifo(tmp_path / "pipe.abc")
    (tmp_path / "link.abc").symlink_to(tmp_path / "pipe.abc")  # as /dev/stdout links to what stdout is
    for name in ("pipe.abc", "link.abc"):
        code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                                  tmp_path / name, *overwrite)
        assert one_error_line(code, err) and "not a regular file" in err and out == "", err
    assert (tmp_path / "pipe.abc").is_fifo() and (tmp_path / "link.abc").is_symlink()


def test_overwrite_through_a_link_replaces_the_file_it_leads_to_and_keeps_the_link(tiny_onnx, tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "tunes.abc").write_text("old tunes")
    (tmp_path / "tunes.abc").symlink_to(Path("v2") / "tunes.abc")  # a link a user keeps to the current book
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                            tmp_path / "tunes.abc", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "tunes.abc").is_symlink() and (tmp_path / "v2" / "tunes.abc").read_text().startswith("X:1")
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == ["tunes.abc"]  # no temporary file left
    (tmp_path / "status.abc").symlink_to("/proc/self/status")  # as /dev/stdout leads into /proc: the system's
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                              tmp_path / "status.abc", "--overwrite")
    assert one_error_line(code, err) and "is a link to /proc/" in err and out == "", err


def test_an_out_under_a_link_to_a_missing_folder_is_refused_before_the_work(tiny_onnx, tmp_path):
    (tmp_path / "book").symlink_to(tmp_path / "nowhere")
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--max-tokens", "5", "--out",
                              tmp_path / "book" / "tunes.abc")
    assert one_error_line(code, err) and f"{tmp_path / 'book'} is a link to a missing" in err and out == "", err


def test_line_breaks_before_a_prompt_carry_nothing_and_a_second_tune_is_refused(tiny_onnx):
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", "\\nX:1\\nK:D\\n", "--num", "2",
                              "--max-tokens", "5")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("X:")] == ["X:1", "X:2"]  # one header a tune
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", "X:1\\nK:D\\nAB|\\nX:2\\nK:D\\n")
    assert one_error_line(code, err) and "second X: line" in err


@pytest.mark.parametrize("prompt, says", [
    ("T:Foo\\nX:1\\nL:1/8\\nM:6/8\\nK:D\\n", "X: line on line 2"),
    ("X:1\\nK:D\\nAB|\\nX:2\\nK:D\\n", "second X: line"),
], ids=["x-not-first", "second-x"])
def test_a_prompt_whose_x_line_is_not_its_first_is_refused_in_words_that_fit(prompt, says, tiny_onnx):
    code, _, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", prompt)
    assert one_error_line(code, err) and says in err, err


def test_a_comment_line_before_a_prompts_x_line_is_read_as_a_comment(tiny_onnx):
    """A tune pasted from a file with its %abc-2.1 line: a comment, which the model does not read; the tunes
    keep it, numbered from the prompt's X:."""
    prompt = "%abc-2.1\\nX:2\\nT:x\\nM:6/8\\nL:1/8\\nK:D\\nA|"
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", prompt, "--num", "2",
                              "--max-tokens", "5")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith(("X:", "%"))] == ["X:2", "%abc-2.1", "X:3", "%abc-2.1"]


def test_blank_lines_before_a_prompt_carry_nothing(tiny_onnx):
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", " \\n\t\\nX:1\\nK:D\\n",
                              "--max-tokens", "5")
    assert code == 0, err
    assert out.startswith("X:1\nK:D\n")


@pytest.mark.parametrize("main, flag", [(infer_onnx.main, "--model"), (musicrnn.main, "--checkpoint"),
                                        (musicrnn.main, "forms --onnx")])
def test_an_empty_model_name_is_named_as_none_not_as_a_folder(main, flag):
    """--onnx '' too: taken for no --onnx, it would have the command run the torch checkpoint instead."""
    args = [*(["generate"] if flag == "--checkpoint" else []), *flag.split(), ""] if main is musicrnn.main \
        else [flag, ""]
    code, _, err = run_main(main, *args)
    assert one_error_line(code, err) and "'' names no" in err and "folder" not in err, err


def test_a_form_with_a_leading_zero_reads_as_its_number(tiny_onnx):
    assert abc_form.parse_control_code("S:2 B:08 E:3 B:8") == ((8, 8), "S:2\nB:8\nE:3\nB:8\n")


# --- 18, 20. messages and --help


def test_a_plot_needs_a_png_name(fixture_data, tmp_path):
    (tmp_path / "a_folder").mkdir()
    code, _, err = run_main(musicrnn.main, "stats", "--data", fixture_data["train"], "--plot", tmp_path / "a_folder")
    assert one_error_line(code, err) and ".png" in err


def all_parsers():
    top = musicrnn.build_parser()
    subs = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction").choices
    return {**{f"musicrnn.py {name}": p for name, p in subs.items()}, "infer_onnx.py": infer_onnx.build_parser(),
            "export.py": export.build_parser(), "serve.py": serve.build_parser()}


def test_help_explains_every_flag_and_every_command_in_words():
    for name, parser in all_parsers().items():
        assert parser.description, name
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                words = (action.help or "").split()
                assert len(words) >= 3 and words[0] != "default:", (name, action.option_strings, action.help)
    train = all_parsers()["musicrnn.py train"]
    groups = {g.title: [a.dest for a in g._group_actions] for g in train._action_groups}
    assert groups["an existing run folder"] == ["resume", "overwrite"]
    shown = {a.dest: a.help.rsplit("(default: ", 1)[-1] for a in train._actions if a.help}
    assert shown["num_layers"] == "1)" and shown["control"] == "off)"  # a count of 1 is not a switch "on"
    assert "hf://" in all_parsers()["musicrnn.py evaluate"].format_help()


# --- the fuzz drill: random command lines from every command's real flags


FUZZ_VALUES = {int: ["-1", "0", "1", "2", "7", "10000000000", "x", "1.5", ""],
               float: ["nan", "inf", "-inf", "-1", "0", "0.3", "1", "2", "1e308", "x"]}


def fuzz_value(action, rng, paths) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(rng.choice(list(action.choices) + ["bogus"]))]
    kind = {"whole number": int, "number": float, "int": int, "float": float}.get(getattr(action.type, "__name__", ""))
    values = FUZZ_VALUES.get(kind) or paths
    count = int(rng.integers(1, 3)) if action.nargs == "+" else 1
    return [str(rng.choice(values)) for _ in range(count)]


@pytest.mark.slow
def test_fuzz_drill_random_command_lines_end_in_0_or_one_error_line(tiny_run, tiny_onnx, fixture_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_run / "best.pt", "model.pt")
    shutil.copy(tiny_onnx, "model.onnx")
    train, val = shutil.copy(fixture_data["train"], "train.json"), shutil.copy(fixture_data["val"], "val.json")
    paths = ["model.pt", "model.onnx", train, "missing.json", "out", "out.abc", "out.json", "out.png", "/proc/x/y",
             ".", "", "X:1\nK:D\nABc|", "6/8", "Ador"]  # copies: a fuzzed --out --overwrite may replace them
    mains = {"musicrnn.py": musicrnn.main, "infer_onnx.py": infer_onnx.main, "export.py": export.main}
    # each line starts from the command's own inputs, which the fuzzed flags may then replace
    bases = {"musicrnn.py train": ["--train-data", train, "--val-data", val], "musicrnn.py stats": ["--data", train],
             "musicrnn.py evaluate": ["--checkpoint", "model.pt", "--data", val],
             "musicrnn.py generate": ["--checkpoint", "model.pt"], "infer_onnx.py": ["--model", "model.onnx"],
             "musicrnn.py sweep": ["--checkpoint", "model.pt", "--train-data", train], "export.py": ["--checkpoint",
                                                                                                  "model.pt"],
             "musicrnn.py forms": ["--checkpoint", "model.pt"],
             "musicrnn.py types": ["--checkpoint", "model.pt", "--train-data", train]}
    fresh_outputs = {"musicrnn.py train": "", "musicrnn.py sweep": ".json", "export.py": ".onnx",
                     "musicrnn.py forms": ".json", "musicrnn.py types": ".json", "musicrnn.py generate": ".abc",
                     "infer_onnx.py": ".abc"}  # --out's ending; generation too: --overwrite and --render need one
    # every line stays short: few tunes and tokens, one small epoch; the fuzzed values come first
    bounds = {"musicrnn.py train": ["--epochs", "1", "--max-minutes", "0.2", "--hidden-dim", "16", "--limit", "8",
                                    "--procs", "1"],  # one process: a fuzzed --procs 200 would start 200
              "musicrnn.py sweep": ["--num", "2", "--temperatures", "1", "--max-tokens", "40"],
              "musicrnn.py generate": ["--num", "2", "--max-tokens", "60"], "infer_onnx.py": ["--num", "2",
                                                                                              "--max-tokens", "60"],
              "musicrnn.py forms": ["--num", "1"], "musicrnn.py types": ["--num", "1"]}
    rng, outcomes = np.random.default_rng(11), {0: 0, 2: 0}
    fuzzed = [(name, parser) for name, parser in all_parsers().items() if name != "serve.py"]  # serve: test_serve
    for i in range(30 * len(fuzzed)):
        name, parser = fuzzed[i % len(fuzzed)]
        actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        chosen = rng.choice(len(actions), size=min(len(actions), int(rng.integers(1, 5))), replace=False)
        fresh = ["--out", f"new{i}{fresh_outputs[name]}"] if name in fresh_outputs else []
        argv = name.split()[1:] + bases[name] + fresh + [w for j in chosen for w in [actions[j].option_strings[-1],
                                                                                     *fuzz_value(actions[j], rng, paths)]]
        code, _, err = run_main(mains[name.split()[0]], *argv, *bounds.get(name, []))
        assert code == 0 or one_error_line(code, err), (name, argv, code, err)
        outcomes[code] += 1
    report(f"fuzz, seed 11: {i + 1} command lines, {outcomes[0]} ran, {outcomes[2]} refused with one error line")
    assert outcomes[0] > 20 and outcomes[2] > 60


@pytest.mark.parametrize("argv, help_page", [(["train", "--data", "x.json"], "musicrnn.py train --help"),
                                             (["evaluate", "--foo"], "musicrnn.py evaluate --help")])
def test_a_flag_a_command_does_not_know_sends_the_user_to_that_commands_help(argv, help_page):
    code, _, err = run_main(musicrnn.main, *argv)
    assert one_error_line(code, err) and "unrecognized arguments" in err and f"(see {help_page})" in err, err


def test_a_byte_that_is_not_utf8_is_shown_as_the_byte_in_an_error(tiny_onnx):
    """Python reads such a byte from the command line as a stand-in character, \\udcff."""
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--prompt", "X:1\nK:D\n\udcff")
    assert one_error_line(code, err) and "'\\xff'" in err and "udc" not in err, err
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--meter", "6/8", "--key", "D\udcff")
    assert one_error_line(code, err) and "--key D\\xff:" in err, err


def test_ctrl_c_that_a_library_wrapped_in_its_own_error_is_still_an_interrupt(capsys):
    """torch.export, interrupted while it imports, raises its own error from the KeyboardInterrupt."""
    def export_interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Failed to export the model with torch.export")  # raised during it: its context

    def plain_failure(args):
        raise RuntimeError("a bug")

    assert cli.run_command(export_interrupted, None) == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(RuntimeError, match="a bug"):  # a bug still shows as one
        cli.run_command(plain_failure, None)


def test_a_refused_training_into_a_folder_that_was_there_leaves_no_lock(tmp_path, fixture_data):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "bad.json").write_text("[]")
    code, _, err = run_main(musicrnn.main, "train", "--train-data", tmp_path / "bad.json", "--val-data",
                            fixture_data["val"], "--out", out, "--hidden-dim", "8")
    assert one_error_line(code, err) and list(out.iterdir()) == [], (err, list(out.iterdir()))
    (out / ".lock").write_text("123\n")  # a lock that was there before stays
    run_main(musicrnn.main, "train", "--train-data", tmp_path / "bad.json", "--val-data", fixture_data["val"],
             "--out", out, "--hidden-dim", "8")
    assert (out / ".lock").exists()


def test_kill_ends_a_command_through_its_clean_up_like_ctrl_c(tmp_path, capsys):
    """SIGTERM's default action would kill infer_onnx.py mid-render, leaving a scratch folder of half-made
    audio and a tunebook's temporary file behind: kill goes through the clean-up, exit 143."""
    def writing(args):
        with safe_write.atomic_file(tmp_path / "tunes.abc") as f:
            f.write(b"X:1\n")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises first

    assert cli.run_command(writing, None) == 143 and capsys.readouterr().err == "terminated\n"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_kill_while_a_pair_of_checkpoints_is_written_waits_for_both(tmp_path, capsys):
    def saving(args):
        with safe_write.deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            for name in ("best.pt", "last.pt"):
                safe_write.write_atomic(tmp_path / name, b"x")
        time.sleep(10)  # not reached: the deferred kill is raised as the block ends

    assert cli.run_command(saving, None) == 143 and capsys.readouterr().err == "terminated\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_whole_number_of_thousands_of_digits_is_too_large_not_not_a_number():
    """int() reads no more than 4,300 digits: past them, such a --seed is too large; int()'s ValueError
    would call it "not a whole number"."""
    with pytest.raises(argparse.ArgumentTypeError, match="has 4,400 digits, far past"):
        cli.int_in(0, 2**32 - 1)("9" * 4400)
    with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number"):
        cli.int_in(0, 10)("9" * 4400 + "x")


def test_a_prompts_own_tune_number_is_kept_and_counted_on_from(tiny_onnx):
    """X:42 in the prompt stays X:42, and the next tune is X:43: numbered from 1, they would be X:1, X:2."""
    code, out, err = run_main(infer_onnx.main, "--model", tiny_onnx, "--num", "2", "--max-tokens", "20",
                              "--prompt", "X:42\nL:1/8\nM:6/8\nK:D\n")
    assert code == 0 and out.startswith("X:42\nL:1/8\nM:6/8\nK:D\n"), (out, err)
    assert re.findall(r"(?m)^X:.*$", out) == ["X:42", "X:43"]
    assert sampler.first_number("X:1\n") == 1 and sampler.first_number("T:x\nX:7\n") == 1  # X: is first or none
    assert sampler.first_number("%abc-2.1\n\nX:7\n") == 7                                  # comments aside


def test_an_int8_export_that_fails_replaces_neither_model(tiny_run, tmp_path, monkeypatch):
    """--int8 --overwrite writes the pair together: a quantization that fails (or Ctrl-C) never leaves
    a new model beside the old model's int8 copy."""
    for name in ("m.onnx", "m.int8.onnx"):
        (tmp_path / name).write_bytes(b"the old model")

    def failing(fp32, out, overwrite=True):
        raise cli.UserError("the quantizer failed")

    monkeypatch.setattr(export, "quantize_int8", failing)
    code, _, err = run_main(export.main, "--checkpoint", tiny_run / "best.pt", "--out", tmp_path / "m.onnx",
                            "--int8", "--overwrite")
    assert one_error_line(code, err) and "the quantizer failed" in err, err
    assert [(tmp_path / name).read_bytes() for name in ("m.onnx", "m.int8.onnx")] == [b"the old model"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]


def test_a_write_that_fails_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """--out new/sub/tunes.abc on a full disk: the folders made for it go again; one that was there stays."""
    (tmp_path / "there").mkdir()
    monkeypatch.setattr(safe_write._Writer, "write", lambda writer, data: (_ for _ in ()).throw(
        safe_write.OutputError(f"{writer.path}: cannot write (No space left on device)")))
    with pytest.raises(safe_write.OutputError, match="No space left"):
        safe_write.write_atomic(tmp_path / "there" / "new" / "sub" / "tunes.abc", b"X:1\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["there"]


def test_a_stdout_and_stderr_on_a_full_disk_still_let_the_work_finish(tiny_onnx, tmp_path):
    out = tmp_path / "all.abc"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "infer_onnx.py", "--model", str(tiny_onnx), "--num", "2",
                               "--max-tokens", "20", "--out", str(out)], stdout=full, stderr=full, cwd=ROOT,
                              timeout=120)
    assert proc.returncode == 0 and re.findall(r"(?m)^X:(\d+)$", out.read_text()) == ["1", "2"]


def test_a_model_that_is_a_pipe_or_a_device_is_named_as_such_not_missing(tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    for path in (tmp_path / "model.onnx", "/dev/null"):
        code, _, err = run_main(infer_onnx.main, "--model", path)
        assert one_error_line(code, err) and "is not a regular file" in err and "no such" not in err, err
    code, _, err = run_main(musicrnn.main, "evaluate", "--checkpoint", "/dev/null")
    assert one_error_line(code, err) and "is not a regular file" in err, err
