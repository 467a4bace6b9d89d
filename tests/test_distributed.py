"""Training under torchrun: 2 processes (gloo, 1 thread each) against 1, a rank killed, --resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import corpus
import distributed
import musicrnn
from conftest import BF16_LSTM, ROOT, one_error_line, run_main, tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train_command(data: dict, out: Path, *extra: str) -> list[str]:
    # 22 tunes in batches of 7: the last batch has one tune, so one process's share is empty; a --dropout
    # in extra is read after this one, and wins
    return ["musicrnn.py", "train", "--train-data", data["train"], "--val-data", data["val"], "--limit", "22",
            "--batch-size", "7", "--hidden-dim", "32", "--embedding-dim", "16", "--dropout", "0", "--lr", "3e-3",
            "--warmup-steps", "2", "--epochs", "2", "--seed", "5", "--device", "cpu", "--out", str(out), *extra]


def run(command: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def val_losses(stdout: str) -> list[str]:
    return re.findall(r"\| val loss (\d+\.\d+)", stdout)


# fp32: the same up to the order of float sums, dropout included: each process draws the whole batch's
# tune masks and keeps its rows' (one process's masks; 7 rows over 2, so the shares differ in size). bf16 (make train's products on CPUs with bf16 units):
# each process rounds its own rows' gradient sums to bf16, so the weights differ by a few of its
# roundings (measured 1.5e-3 after these 8 steps, whose updates reach 2.4e-2) and the printed
# losses by at most 1e-4 (measured)
@pytest.mark.slow
@pytest.mark.parametrize("precision, dropout, atol, loss_atol, launcher", [("fp32", "0.3", 1e-5, 0, "torchrun"),
                                                                           pytest.param("bf16", "0", 4e-3, 3e-4, "--procs",
                                                                                        marks=BF16_LSTM)])
def test_two_processes_train_the_same_model_as_one(fixture_data, tmp_path, precision, dropout, atol, loss_atol,
                                                   launcher):
    settings = ("--precision", precision, "--dropout", dropout)
    one = run([sys.executable, *train_command(fixture_data, tmp_path / "one", *settings)])
    command = train_command(fixture_data, tmp_path / "two", *settings)
    two = run(TORCHRUN + command if launcher == "torchrun" else [sys.executable, *command, "--procs", "2"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert f"2 processes (2 on this machine), 1 thread each, gloo, device cpu on rank 0, {precision} products" in two.stdout
    losses = [[float(v) for v in val_losses(run.stdout)] for run in (one, two)]
    assert len(losses[0]) == 2 and np.allclose(*losses, atol=loss_atol, rtol=0), (one.stdout, two.stdout)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8  # 2 epochs of 4 batches
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=atol, rtol=0), name
    assert a["history"][1]["train_loss"] < a["history"][0]["train_loss"]  # it did learn: the weights moved
    # and a checkpoint written by 2 processes loads in one
    import musicrnn
    model, _, _ = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(str(tmp_path / "two" / "last.pt")))
    assert sum(p.numel() for p in model.parameters()) > 0


def drill_run(tmp_path: Path, fixture_tunes: list[str]) -> tuple[list[str], Path]:
    """(the arguments of a training whose epochs take seconds, long enough to be caught in; its folder)."""
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    corpus.write_irishman_json(train, fixture_tunes * 100)
    corpus.write_irishman_json(val, fixture_tunes[:2])
    out = tmp_path / "run"
    return ["musicrnn.py", "train", "--train-data", str(train), "--val-data", str(val), "--hidden-dim", "128",
            "--embedding-dim", "32", "--batch-size", "8", "--epochs", "5", "--out", str(out)], out  # ~2 s an epoch


def into_second_epoch(job: subprocess.Popen, out: Path) -> None:
    """Wait until the job has written its first checkpoint, and a little more."""
    deadline = time.time() + 180
    while not (out / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_resume_under_torchrun_finishes(tmp_path, fixture_tunes):
    args, out = drill_run(tmp_path, fixture_tunes)
    tag = f"MUSICRNN_DRILL={os.getpid()}-{time.time()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", tag.split("=")[0]: tag.split("=")[1]}
    job = subprocess.Popen(TORCHRUN + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=env)
    into_second_epoch(job, out)
    rank1 = rank_process(tag.encode(), 1)
    assert job.poll() is None and rank1, "the job ended before the drill could kill a rank"
    os.kill(rank1, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]  # torchrun names the cause
    # rank 0 either meets the lost peer in an all-reduce and says so in one line, or torchrun stops
    # it first (SIGTERM): never a traceback from the training itself
    assert "[rank0]: Traceback" not in err and "[rank0]:RuntimeError" not in err, err[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1
    done = run(TORCHRUN + args + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 5 and [row["epoch"] for row in resumed["history"]] == [1, 2, 3, 4, 5]
    assert "resuming" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how, code, line", [("ctrl-c", 130, "interrupted"), ("kill", 143, "terminated")])
def test_ctrl_c_or_kill_under_procs_is_one_line_then_resume_goes_on(tmp_path, fixture_tunes, how, code, line):
    """As one process: Ctrl-C is "interrupted" and 130, `kill PID` (SIGTERM) "terminated" and 143."""
    args, out = drill_run(tmp_path, fixture_tunes)
    args = [sys.executable, *args, "--procs", "2"]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           start_new_session=True)  # a group of its own, as a terminal's foreground job
    into_second_epoch(job, out)
    assert job.poll() is None, "the job ended before the drill could interrupt it"
    if how == "ctrl-c":
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C sends: the launcher and both ranks
    else:
        os.kill(job.pid, signal.SIGTERM)  # the launcher alone, which stops the ranks
    _, err = job.communicate(timeout=120)
    assert job.returncode == code and err.strip().splitlines() == [line], err[-3000:]
    done = run(args + ["--resume"])
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_procs_killed_before_a_checkpoint_leave_no_folder(tmp_path, fixture_tunes):
    """As one process: the new --out folder, holding only the run's lock, goes with the run."""
    args, out = drill_run(tmp_path, fixture_tunes)
    job = subprocess.Popen([sys.executable, *args, "--procs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / ".lock").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    assert job.poll() is None and not (out / "last.pt").exists(), "the drill came too late"
    os.kill(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143 and err.strip().splitlines() == ["terminated"], err[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_ranks_end_with_their_launcher_even_one_killed_outright_and_resume_goes_on(tmp_path, fixture_tunes):
    """SIGKILL of `train --procs 2` ends its two ranks too, or they would train on to the end, holding the
    run's lock; --resume then goes on from the last checkpoint."""
    args, out = drill_run(tmp_path, fixture_tunes)
    tag = f"MUSICRNN_DRILL={os.getpid()}-{time.time()}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    job = subprocess.Popen([sys.executable, *args, "--procs", "2"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    into_second_epoch(job, out)
    assert job.poll() is None and rank_process(tag.encode(), 1), "the job ended before the drill could kill it"
    job.kill()
    job.wait()
    deadline = time.time() + 5  # the run's 5 epochs take ~15 s: a rank that outlives its launcher is seen
    while (rank_process(tag.encode(), 0) or rank_process(tag.encode(), 1)) and time.time() < deadline:
        time.sleep(0.1)
    assert not (rank_process(tag.encode(), 0) or rank_process(tag.encode(), 1)), "a rank outlived its launcher"
    assert not (out / "last.pt").exists() or torch.load(out / "last.pt", weights_only=True)["epoch"] < 5
    done = run([sys.executable, *args, "--procs", "2", "--resume"])
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr[-3000:]


def rank_process(tag: bytes, rank: int) -> int | None:
    """The PID of the process whose environment holds tag and RANK=rank (a torchrun worker)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = environ.read_bytes().split(b"\0")
        except OSError:  # not ours, or it has just ended
            continue
        if tag in values and f"RANK={rank}".encode() in values:
            return int(environ.parent.name)
    return None


# gloo's worker threads outlive destroy_process_group under DistributedDataParallel, and one that frees
# a collective's tensors while Python finalizes aborts the rank (distributed.exit_process): a rank of
# several must leave before finalizing (a module's objects never deleted), its exit handlers run and
# its output written; one process exits as usual
@pytest.mark.parametrize("world_size, finalized", [(2, False), (1, True)])
def test_a_rank_of_several_leaves_without_finalizing_python_its_output_flushed(world_size, finalized):
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "RANK": "0", "WORLD_SIZE": str(world_size),
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world_size)}
    env.pop("PYTHONUNBUFFERED", None)  # stdout a buffered pipe, as under torchrun
    program = ("import atexit, sys, distributed\n"
               "class Module:\n    def __del__(self): print(' finalized', end='')\n"
               "kept = Module(); atexit.register(print, ' exit handlers', end='')\n"
               "print('the last line', end=''); distributed.exit_process(3)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "the last line exit handlers" + " finalized" * finalized
    closed = subprocess.run([sys.executable, "-c", "import sys, distributed; sys.stdout = None; "
                             "distributed.exit_process(3)"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)  # a rank started with `>&-`: Python's stdout is None
    assert (closed.returncode, closed.stderr) == (3, "")


@pytest.mark.parametrize("rank, code, waits", [(1, 2, True), (0, 2, False), (1, 0, False)])
def test_a_failed_rank_other_than_0_leaves_after_rank_0_has_said_why(rank, code, waits, monkeypatch):
    """Every rank meets a user's error at once, and rank 0 alone prints it; torchrun stops the others
    when the first rank fails, so rank 1 waits first: leaving at once, it would cut rank 0 off before its
    line (measured without the wait: 2 of 8 runs of the --device cuda test beside two busy loops)."""
    for name, value in [("TORCHELASTIC_RUN_ID", "test"), ("RANK", str(rank)), ("WORLD_SIZE", "2"),
                        ("LOCAL_RANK", str(rank)), ("LOCAL_WORLD_SIZE", "2")]:
        monkeypatch.setenv(name, value)
    events = []
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    monkeypatch.setattr(distributed.atexit, "_run_exitfuncs", lambda: events.append("exit handlers"))
    monkeypatch.setattr(distributed.os, "_exit", lambda status: events.append(("exit", status)))
    distributed.exit_process(code)
    assert events == [("sleep", distributed.FAILED_RANK_WAIT)] * waits + ["exit handlers", ("exit", code)]


def test_shares_of_a_batch_are_disjoint_and_cover_it():
    batch = np.arange(11)
    shares = [distributed.World(rank, 3).share(batch) for rank in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(11))
    assert [len(s) for s in shares] == [4, 4, 3]


def test_gathered_shares_come_back_in_order_on_every_rank(monkeypatch):
    items = [f"tune {i}" for i in range(11)]
    worlds = [distributed.World(rank, 3) for rank in range(3)]
    shares = [[items[i] for i in world.share(np.arange(len(items)))] for world in worlds]

    def all_gather_object(out, mine):  # what gloo does: every rank's list, in rank order
        assert mine in shares
        out[:] = shares

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert all(world.gather_shares(share) == items for world, share in zip(worlds, shares))
    assert distributed.World(0, 1).gather_shares(items) is items


def test_threads_share_the_cores_without_oversubscribing():
    assert distributed.threads_per_process(2, cores=2) == 1
    assert distributed.threads_per_process(1, cores=16) == 16
    assert distributed.threads_per_process(4, cores=16) == 4
    assert distributed.threads_per_process(8, cores=2) == 1


def test_one_process_without_torchrun_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = distributed.start("cpu")
    assert (world.rank, world.size, device) == (0, 1, "cpu") and world.sum(2.5) == 2.5


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"RANK": "0", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"},
                                 {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"}])
def test_torchruns_variables_left_in_the_shell_make_no_rank(env, fixture_data, tmp_path, monkeypatch):
    """A RANK that torchrun did not set (a shell's, a cluster's for another launcher) neither hides an
    error line nor makes a training wait for processes that never come: the command runs as one process."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    code, _, err = run_main(musicrnn.main, "stats", "--data", tmp_path / "missing.json")
    assert one_error_line(code, err), err
    musicrnn.train(tiny_config(fixture_data, tmp_path / "run", epochs=1), log=lambda *a: None)
    assert (tmp_path / "run" / "best.pt").exists()


def test_a_users_error_under_procs_is_one_line_from_rank_0_and_exit_2(fixture_data, tmp_path):
    done = run([sys.executable, *train_command(fixture_data, tmp_path / "run", "--procs", "2", "--batch-size", "0")])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: argument --batch-size"), done.stderr
    under_torchrun = run(TORCHRUN + train_command(fixture_data, tmp_path / "run", "--batch-size", "0"))
    assert under_torchrun.stderr.count("error: argument --batch-size") == 1  # rank 0 alone says it


def test_a_note_on_the_data_comes_once_from_rank_0(fixture_data, tmp_path):
    """Every rank reads the data; only rank 0 says what it skipped (two ranks' notes ran into one line)."""
    records = json.loads(Path(fixture_data["train"]).read_text()) + [{"control code": "", "abc notation": ""}]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    done = run([sys.executable, *train_command({**fixture_data, "train": str(train)}, tmp_path / "run", "--procs",
                                               "2", "--epochs", "1")])
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {train}: "), done.stderr[-2000:]


def test_more_procs_than_cores_is_one_line_before_any_process_or_file(fixture_data, tmp_path):
    """64 ranks on 2 cores ended in gloo's connection tracebacks (measured): refused, as one line."""
    cores = distributed.usable_cores()
    code, _, err = run_main(musicrnn.main, *train_command(fixture_data, tmp_path / "run", "--procs", str(cores + 1))[1:])
    assert one_error_line(code, err) and f"give at most {cores}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA would train")
def test_cuda_asked_for_where_there_is_none_is_an_error_line_under_torchrun_too(fixture_data, tmp_path):
    command = train_command(fixture_data, tmp_path / "run")
    done = run(TORCHRUN + [c if c != "cpu" else "cuda" for c in command])
    assert done.returncode != 0 and "error: --device cuda: no CUDA device is available here" in done.stderr
    assert "_cuda_setDevice" not in done.stderr and "AttributeError" not in done.stderr  # no rank's traceback
