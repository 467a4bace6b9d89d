"""make bench's own arithmetic: ratios from interleaved turns, and impossible ratios refused;
its command line."""

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, run_main

import bench
import exported_model
import sampler
from abc_constraint import AbcConstraint
from cli import UserError


def test_sides_are_measured_in_turns_and_each_keeps_its_best_and_its_spread():
    order, costs = [], {"a": iter([2.0, 1.0, 1.5]), "b": iter([4.0, 4.0, 5.0])}

    def side(name):
        def measure():
            order.append(name)
            return next(costs[name])
        return measure

    result = bench.picked(bench.in_turns({"a": side("a"), "b": side("b")}, repeats=3))
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert result == ([1.0, 4.0], {"a": 1.0, "b": 0.25})


def test_typical_turns_keep_the_median_so_one_lucky_turn_does_not_set_the_figure():
    costs = {"a": iter([1.0, 0.5, 1.2, 1.1, 0.9]), "b": iter([2.0] * 5)}
    result = bench.picked(bench.in_turns({name: (lambda n=name: next(costs[n])) for name in costs}, repeats=5),
                          typical=True)
    assert result == ([1.0, 2.0], {"a": pytest.approx(1.4), "b": 0.0})


def test_a_step_is_timed_in_windows_and_the_median_window_counts(monkeypatch):
    clock, window_costs = [0.0], iter([0.05, 0.01, 0.05, 0.06, 0.05] + [1.0] * 10)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "STEP_TURN_SECONDS", 0.2)
    monkeypatch.setattr(bench, "STEP_WINDOW", 2)
    steps, states = [], []

    def step(x, state):  # each window's second step moves the clock by the window's cost
        steps.append(x.shape)
        states.append(state)
        if len(steps) % 2 == 0:
            clock[0] += next(window_costs)
        return None, len(steps)

    ms = bench.step_ms(step, eos_id=0, batch=3)
    assert len(steps) == 10  # five windows, until 0.2 s had passed: 0.05 + 0.01 + 0.05 + 0.06 + 0.05
    assert set(steps) == {(3, 1)} and states[1:] == list(range(1, 10))  # the state carried from step to step
    assert ms == pytest.approx(0.05 / 2 * 1e3)  # the median window (0.01 would be the lucky best)


def test_a_flop_utilisation_above_one_is_reported_as_a_measurement_error():
    assert bench.utilisation(0.55) == 0.55
    assert bench.utilisation(1.02) == "measurement error (1.02 > 1)"
    table = bench.table([("train_flop_utilisation", bench.utilisation(1.02), "of the ceiling")], {"GEMM": 0.1})
    assert "| train_flop_utilisation | measurement error (1.02 > 1) |" in table and "GEMM 10%" in table


def test_the_constraint_table_shows_both_runs_side_by_side():
    keys = ["gen_ms_per_token_sampled_ort", "gen_ms_per_token_constrained_cold_ort", "gen_ms_per_token_constrained_ort",
            "gen_ms_per_token_sampled_later_ort",
            "constraint_overhead_cold", "constraint_overhead", "gen_tokens_per_s_batch32_free",
            "gen_tokens_per_s_batch32_constrained", "constrained_share_batch32", "constraint_startup_ms"]
    results = {f"{key}_run{n}": float(n) for key in keys for n in (1, 2)} | {"constraint_overhead_run2": 0.125}
    table = bench.constraint_markdown(results)
    assert "| constraint overhead, after 50 tunes (target <= 10%) | 100.000 | 12.500 | % |" in table
    assert "| free sampling, batch 32 (each row held to its constrained row's length) | 1.000 | 2.000 | tokens/s |" \
        in table


def test_free_and_constrained_tunes_alternate_over_the_same_seeds(monkeypatch):
    calls = []

    def fake_tunes_seconds(step, vocab, constraint, seed):
        calls.append((constraint, seed))
        return (0.2, 100) if constraint else (0.1 + seed / 100, 90)  # constrained: 2 ms a token

    monkeypatch.setattr(bench, "tunes_seconds", fake_tunes_seconds)
    monkeypatch.setattr(bench, "constrained_lengths", lambda *args: np.array([100]))  # each side: 100 tokens
    vocab = type("Vocab", (), {"eos_id": 1})
    free, constrained = bench.paired_ms_per_token(None, vocab, "constraint", range(3), "scratch")
    assert calls == [(None, 0), ("constraint", 0), (None, 1), ("constraint", 1), (None, 2), ("constraint", 2)]
    assert free == pytest.approx(0.33 / 300 * 1e3) and constrained == pytest.approx(2.0)


def test_each_turn_takes_the_fastest_configuration_and_counts_the_winners():
    costs = {"one thread": iter([3.0, 1.0]), "two threads": iter([2.0, 4.0])}
    wins = {}
    side = bench.fastest({name: (lambda n=name: next(costs[n])) for name in costs}, wins)
    assert [side(), side()] == [2.0, 1.0]
    assert wins == {"two threads": 1, "one thread": 1}


def test_the_server_is_not_measured_without_its_rendering_tools(monkeypatch):
    monkeypatch.setattr(bench.rendering, "missing_tools", lambda: {"audio": "no audio: apt-get install fluidsynth"})
    results = bench.server_bench("no-such-model.onnx", requests=3)  # returns before it starts a server
    assert results == {"serve_requests": 3, "serve_not_measured": "no audio: apt-get install fluidsynth"}
    assert bench.serve_rows(results) == [("serve.py: 3 concurrent requests of 2 constrained tunes",
                                          "not measured (no audio: apt-get install fluidsynth)", "")]
    measured = bench.serve_rows({"serve_requests": 3, "serve_success": 1.0, "serve_p50_s": 2.0, "serve_p95_s": 3.0})
    assert measured[0] == ("serve.py: 3 concurrent requests of 2 constrained tunes, answered in full", 100.0, "%")


# --- its command line: inputs checked before the minutes of measuring, never replaced


def test_an_out_that_is_one_of_its_inputs_is_refused_even_with_overwrite(fixture_data, tmp_path):
    corpus = tmp_path / "large.json"
    shutil.copy(fixture_data["train"], corpus)
    before = corpus.read_bytes()
    code, _, err = run_main(bench.main, "--large", str(corpus), "--val-data", str(fixture_data["val"]),
                            "--out", str(corpus), "--overwrite")
    assert one_error_line(code, err) and "is also what this command reads" in err
    assert corpus.read_bytes() == before


@pytest.mark.parametrize("flags, says", [
    (["--val-data", "nowhere.json"], "nowhere.json: no such file"),
    (["--int8", "nowhere.onnx"], "nowhere.onnx: no such file"),        # a typo is not a row left out
    (["--int8", "runs/musicrnn.int8.onnx"], "runs/musicrnn.int8.onnx: no such file"),  # given, though the default
    ([], "data/validation.json: no such file (make train and make data write the defaults)"),
    (["--large", "LARGE", "--onnx", "x.onnx"], "--large reads no --onnx"),
    (["--train-data", "OBJECT"], "one JSON object"),                     # there, but no tunes in it
    (["--train-data", "FOLDER"], "no tunes found (a folder is read for"),  # a folder is read, as train reads it
    (["--int8", "OBJECT"], "not a readable ONNX model"),
], ids=repr)
def test_a_missing_or_ignored_input_is_one_line_before_any_measuring(flags, says, fixture_data, tiny_run, tiny_onnx,
                                                                     tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no default input exists
    (tmp_path / "object.json").write_text('{"abc notation": "X:1"}')
    (tmp_path / "folder").mkdir()
    named = {"LARGE": str(fixture_data["train"]), "OBJECT": str(tmp_path / "object.json"),
             "FOLDER": str(tmp_path / "folder")}
    flags = [named.get(f, f) for f in flags]
    val = [] if flags == [] else ["--val-data", str(fixture_data["val"])]
    train = [] if "--train-data" in flags else ["--train-data", str(fixture_data["train"])]
    code, out, err = run_main(bench.main, "--checkpoint", str(tiny_run / "best.pt"), "--onnx", str(tiny_onnx),
                              *train, "--out", "b.json", *val, *flags)
    assert one_error_line(code, err) and says in err and out == "", err


def test_a_measured_command_that_fails_is_one_line_that_names_it(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys; sys.exit('error: it broke')")
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=1", "--no-python", sys.executable]):
        with pytest.raises(UserError, match=f"a measured command failed \\({script} train ...\\): error: it broke"):
            bench.measured_run([*launcher, str(script), "train"])


def bench_results(scale: float = 1.0) -> dict:
    """The ratios a bench.py run writes, each a made-up value (times scale for the first)."""
    results = {"ort_speedup_over_torch": 3.0 * scale, "state_speedup_over_prefix": 60.0, "train_speedup": 13.0,
               "scaling_2_over_1": 1.05, "train_flop_utilisation": 0.12, "train_flop_utilisation_1_process": 0.11,
               "train_flop_utilisation_2_processes": 0.12}
    for n in (1, 2):
        results |= {f"constraint_overhead_cold_run{n}": 0.3, f"constraint_overhead_run{n}": 0.25,
                    f"constrained_share_batch32_run{n}": 0.7}
    return results


def test_two_runs_are_compared_ratio_by_ratio_as_larger_over_smaller():
    table = bench.comparison_markdown(bench_results(), bench_results(1.15), ("a.json", "b.json"))
    assert "| onnxruntime / torch eager | 3.000 | 3.450 | 15.0% |" in table
    assert "| constrained / free step, first 10 tunes (constraint run 2) | 1.300 | 1.300 | 0.0% |" in table
    assert table.endswith("The two runs agree within 15% on every ratio.")
    faster_second = bench.comparison_markdown(bench_results(), bench_results(0.8), ("a.json", "b.json"))
    assert "| onnxruntime / torch eager | 3.000 | 2.400 | 25.0% |" in faster_second  # not 20%: 3 is 25% over 2.4
    assert faster_second.endswith("1 of 13 ratios differ by more than 15%: onnxruntime / torch eager.")


def test_compare_reads_two_runs_and_refuses_what_is_not_one(tmp_path):
    import json
    first, second, large = tmp_path / "1.json", tmp_path / "2.json", tmp_path / "large.json"
    first.write_text(json.dumps(bench_results()))
    second.write_text(json.dumps(bench_results(2.0)))
    large.write_text(json.dumps({"load_seconds": 1.0}))
    code, out, err = run_main(bench.main, "--compare", first, second)
    assert code == 0 and err == "" and "| onnxruntime / torch eager | 3.000 | 6.000 | 100.0% |" in out
    code, out, err = run_main(bench.main, "--compare", first, large)
    assert one_error_line(code, err) and "not the results of a bench.py run" in err
    code, out, err = run_main(bench.main, "--compare", first, second, "--out", tmp_path / "x.json")
    assert one_error_line(code, err) and "leave out --out" in err and not (tmp_path / "x.json").exists()
    (tmp_path / "x|y.json").write_text(second.read_text())  # a | in a name is escaped: one header cell
    code, out, err = run_main(bench.main, "--compare", first, tmp_path / "x|y.json")
    assert code == 0 and len(re.split(r"(?<!\\)\|", out.splitlines()[0])) == 6, out  # 4 cells between pipes
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # json recurses once a level
    code, out, err = run_main(bench.main, "--compare", first, tmp_path / "deep.json")
    assert one_error_line(code, err) and "not readable as JSON" in err



@pytest.mark.parametrize("value", ["fast", None, [1], 0.0, -2.0, float("nan"), True, 10**400])  # 10**400: no float
def test_compare_refuses_a_ratio_no_run_writes_and_a_run_compared_with_itself(tmp_path, value):
    """A ratio no run writes is one error line: 0 would divide by zero, a string meet '>' (tracebacks), and
    NaN and -2 read as agreeing."""
    import json
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_text(json.dumps(bench_results()))
    second.write_text(json.dumps(bench_results() | {"ort_speedup_over_torch": value}))
    code, _, err = run_main(bench.main, "--compare", first, second)
    assert one_error_line(code, err) and "ratio onnxruntime / torch eager is" in err, err
    code, _, err = run_main(bench.main, "--compare", first, first)
    assert one_error_line(code, err) and "with itself" in err, err


def test_a_flop_utilisation_is_the_median_of_its_turns_each_against_the_ceiling_beside_it():
    flops = 2 * bench.GEMM_N ** 3  # a token costs one product: a turn's figure is its gemm_s / train_s
    train, gemm = [1e-3] * 5, [2e-4, 2e-4, 1e-4, 2e-4, 2e-4]  # one ceiling turn met a spell twice as fast
    assert bench.turn_utilisation(flops, train, gemm) == pytest.approx(0.2)  # the ratio of the bests: 0.1
    drifting = [1.0, 1.1, 1.2, 1.3, 1.4]  # both sides slowing alike: every turn reads the same
    assert bench.turn_utilisation(flops, [d * 1e-3 for d in drifting], [d * 2e-4 for d in drifting]) == \
        pytest.approx(0.2)


def test_a_ratio_is_the_median_of_its_turns_ratios_so_one_fast_turn_does_not_set_it():
    padded, grouped = [10.0, 10.0, 10.0, 10.0, 10.0], [1.0, 1.0, 0.5, 1.0, 1.0]  # one grouped turn met a fast spell
    assert bench.turn_ratio(padded, grouped) == 10.0  # the ratio of the bests: 20
    drifting = [1.0, 1.2, 1.4, 1.6, 1.8]  # the machine slowing on both sides alike: every turn reads the same
    assert bench.turn_ratio([10 * d for d in drifting], drifting) == pytest.approx(10.0)
    assert bench.turn_ratio([9.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0  # the median, not the mean (4.0)


def test_the_constraints_overheads_are_the_median_of_its_rounds_ratios(monkeypatch):
    pairs = iter([(1.0, 1.2), (1.0, 1.1)] * 2 + [(1.0, 0.6), (1.0, 0.55)] + [(1.0, 1.2), (1.0, 1.1)] * 2)
    monkeypatch.setattr(bench, "ROUNDS", 5)
    monkeypatch.setattr(bench, "AbcConstraint", lambda vocab: None)
    monkeypatch.setattr(bench, "tunes_seconds", lambda *args: (0.0, 1))
    monkeypatch.setattr(bench, "paired_ms_per_token", lambda *args: next(pairs))  # (free, constrained) ms
    result = bench.constraint_overhead(step=None, vocab=None)  # round 3's constrained tunes met a fast spell
    assert result["constraint_overhead_cold"] == pytest.approx(0.2)  # the ratio of the bests: -0.4
    assert result["constraint_overhead"] == pytest.approx(0.1)       # and -0.45
    assert result["gen_ms_per_token_constrained_cold_ort"] == 0.6    # a side's row: its best round


def test_in_turns_keeps_every_turn_of_every_side():
    costs = {"a": iter([2.0, 1.0]), "b": iter([4.0, 3.0])}
    assert bench.in_turns({n: (lambda n=n: next(costs[n])) for n in costs}, repeats=2) == {"a": [2.0, 1.0],
                                                                                          "b": [4.0, 3.0]}


def test_a_free_batch_is_held_to_the_constrained_batchs_lengths_and_the_constrained_draws_are_untouched(tiny_onnx):
    """The overhead is of the same tunes' lengths: free rows end where the constrained rows did (no row
    idles to the cap), and the constrained side pays the same bookkeeping without a change to its tunes."""
    session, vocab, config = exported_model.load_model(str(tiny_onnx))
    step = exported_model.onnx_step(session, config)
    scratch = AbcConstraint(vocab)
    lengths = bench.constrained_lengths(step, vocab, 5, 4, scratch)
    opts = sampler.SamplingOptions(num=4, seed=5, max_tokens=bench.TUNE_TOKENS)
    fed = []  # (B,) the tokens each step reads: the draws of the step before

    def spy(tokens, state):
        fed.append(tokens[:, 0].copy())
        return step(tokens, state)

    sampler.generate_tunes(bench.held_to(spy, lengths, vocab.eos_id, True), vocab, opts)
    drawn = np.array(fed[1:] + [np.full(4, vocab.eos_id)])  # (steps, B); the batch's last draws end it
    assert [int(np.argmax(row == vocab.eos_id)) + 1 for row in drawn.T] == lengths.tolist()
    assert len(set(lengths.tolist())) > 1  # rows of one batch end apart
    constrained = dataclasses.replace(opts, constrained=True)
    held = sampler.generate_tunes(bench.held_to(step, lengths, vocab.eos_id, False), vocab, constrained, scratch)
    assert held == sampler.generate_tunes(step, vocab, constrained, scratch)


def test_a_figure_not_measured_is_written_as_json_null_and_a_server_that_fails_to_start_is_one_line(
        tmp_path, monkeypatch):
    import json

    assert json.loads(bench.json_text({"gen_ms_per_token_ort_int8": float("nan"), "x": 1.5})) == {
        "gen_ms_per_token_ort_int8": None, "x": 1.5}  # NaN is no JSON: a strict reader refuses the file
    monkeypatch.setattr(bench.rendering, "missing_tools", lambda: {})
    with pytest.raises(UserError, match="serve.py did not start: error: .*no such model"):
        bench.server_bench(str(tmp_path / "missing.onnx"), requests=1)



def test_the_timed_trainings_write_into_folders_of_their_own_and_leave_the_users_runs(tmp_path, monkeypatch):
    """The bench's trainings (peak memory, processes, the large corpus) write checkpoints: each into a
    temporary folder, removed after, never beside the model measured, where a run of the user's may be."""
    users_run = tmp_path / "bench-train"
    users_run.mkdir()
    (users_run / "best.pt").write_bytes(b"the user's")
    outs = []

    def measured_run(command):
        if "train" in command:
            outs.append(Path(command[command.index("--out") + 1]))
            assert outs[-1].is_dir() and not any(outs[-1].iterdir()) and "--overwrite" not in command
        return type("Done", (), {"stderr": "PEAK_KB 1024", "stdout": "| 1,000 tok/s"})()

    monkeypatch.setattr(bench, "measured_run", measured_run)
    monkeypatch.setattr(bench, "gemm_seconds", lambda dtype: 1.0)
    bench.process_bench(str(tmp_path / "best.pt"), "m.onnx", "t.json", "v.json")
    bench.scaling_bench("t.json", "v.json", 1)
    assert len(outs) == 1 + 2 * bench.PROCESS_REPEATS and not any(out.exists() for out in outs)
    assert all(tmp_path not in out.parents for out in outs) and (users_run / "best.pt").read_bytes() == b"the user's"
