"""Shared fixtures: small tunes we wrote ourselves, and a tiny trained model."""

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import abc_music  # noqa: E402
import corpus  # noqa: E402
import musicrnn  # noqa: E402

FIXTURE_BOOK = ROOT / "tests" / "fixtures" / "tunes.abc"

# the tests of Ctrl-C send SIGINT, to this process and to the commands it starts: a runner that started
# pytest with SIGINT ignored (a shell script's `&`), which its children inherit, would make them fail
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# oneDNN, which runs the LSTM on a CPU, has no bf16 LSTM without AVX-512: those tests need a CPU that has it
BF16_LSTM = pytest.mark.skipif(not musicrnn.cpu_runs_bf16_lstm(), reason="this CPU runs no bf16 LSTM (no AVX-512)")


@pytest.fixture(scope="session")
def fixture_tunes() -> list[str]:
    return abc_music.read_tunebook(FIXTURE_BOOK.read_text())[0]


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory, fixture_tunes) -> dict:
    """train.json (the fixture tunes, three times) and validation.json (two of them) in IrishMAN form."""
    folder = tmp_path_factory.mktemp("data")
    train, val = folder / "train.json", folder / "validation.json"
    corpus.write_irishman_json(train, fixture_tunes * 3)
    corpus.write_irishman_json(val, fixture_tunes[:2])
    return {"train": str(train), "val": str(val), "folder": folder}


def tiny_config(fixture_data: dict, out: Path, **overrides) -> musicrnn.Config:
    settings = dict(train_data=fixture_data["train"], val_data=fixture_data["val"], embedding_dim=16,
                    hidden_dim=32, batch_size=4, epochs=3, lr=1e-2, warmup_steps=2, out_dir=str(out),
                    device="cpu", max_minutes=5.0)
    settings.update(overrides)
    return musicrnn.Config(**settings)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fixture_data) -> Path:
    """A tiny model trained for a few seconds on the fixture tunes; returns its run folder."""
    out = tmp_path_factory.mktemp("run")
    musicrnn.train(tiny_config(fixture_data, out), log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run) -> Path:
    """The tiny model exported to ONNX."""
    import export

    ckpt = musicrnn.load_checkpoint(str(tiny_run / "best.pt"))
    model, cfg, vocab = musicrnn.model_from_checkpoint(ckpt)
    path = tiny_run / "tiny.onnx"
    export.export_onnx(model, cfg, vocab, path, tune_types=musicrnn.model_facts(ckpt, cfg).tune_types)
    return path


def run_main(main, *args) -> tuple[int, str, str]:
    """A command's main() in this process: exit code, stdout, stderr (argparse's exits included)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, stderr: str) -> bool:
    """Exit code 2 and exactly one line on stderr, an `error:` line: what every bad input must give."""
    lines = stderr.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:")


DRILL_REPORTS: list[str] = []  # what the drills measured, printed at the end of every run


def report(line: str) -> None:
    DRILL_REPORTS.append(line)


def pytest_terminal_summary(terminalreporter):
    for line in DRILL_REPORTS:
        terminalreporter.write_line(f"drill: {line}")
