"""
bench: how fast musicrnn generates and trains, measured side by side in one run on this machine.

    make bench        # = python bench.py --overwrite (the defaults: runs/best.pt, runs/musicrnn.onnx, data/)
    python bench.py --compare runs/bench.json runs/bench2.json   # do two runs' ratios agree?

Prints a markdown table and writes runs/bench.json. Every figure comes from this one
run, with the default model: compare them with each other, not with another machine.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import cli  # first: Ctrl-C while torch loads is one line, as it is later
cli.quiet_interrupt_while_loading(__name__)

import numpy as np
import torch

from cli import UserError
import exported_model
import musicrnn
import rendering
import sampler
from abc_constraint import AbcConstraint
from abc_music import note_shape
from safe_write import check_output, write_atomic

TUNE_TOKENS = 500  # "a 500-token tune"
GEMM_N = 2048  # the ceiling: a product of two GEMM_N x GEMM_N matrices, in the precision training multiplies in
GEMM_FLOPS = 2 * GEMM_N ** 3  # of one such product (a multiply and an add per term)


def timed(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of a few runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


REPEATS = 5        # turns of each side of a ratio; its median turn ratio counts
STEP_REPEATS = 11  # turns for generation, whose steps take microseconds and so meet the most noise
PROCESS_REPEATS = 5  # turns of the training processes: at 3, a pair's 1-process figures can be 26% apart


def in_turns(sides: dict, repeats: int = REPEATS) -> dict[str, list[float]]:
    """Measure every side `repeats` times, in turns (a, b, c, a, b, c, ...), so that a change
    in the machine's speed falls on each side alike. Each side returns a cost (seconds, or
    seconds per token); returns name -> its costs, turn by turn."""
    costs = {name: [] for name in sides}
    for _ in range(repeats):
        for name, measure in sides.items():
            costs[name].append(measure())
    return costs


def picked(costs: dict[str, list[float]], typical: bool = False) -> tuple[list[float], dict[str, float]]:
    """Each side's best (the lowest; typical=True: the median), in order, and name -> its spread
    (highest / lowest - 1)."""
    pick = (lambda c: float(np.median(c))) if typical else min
    return [pick(c) for c in costs.values()], {name: max(c) / min(c) - 1 for name, c in costs.items()}


def turn_ratio(numerators: list[float], denominators: list[float]) -> float:
    """A ratio of two sides measured in turns: each turn's ratio (its two sides taken side by
    side), and the median of those. A ratio of the sides' bests moves with whichever single turn
    met a fast spell: on an AMD host a pair of runs read 119.9 and 139.7 that way for carried
    state / prefix recompute, and a pair of an AMX host 0.093 and 0.112 for a FLOP utilisation."""
    return float(np.median([a / b for a, b in zip(numerators, denominators)]))


def turn_utilisation(flops_per_token: int, train_costs: list[float], gemm_costs: list[float]) -> float:
    """The FLOP utilisation of each turn, its training (seconds per token) against the ceiling
    measured beside it (seconds per product), and the median of those."""
    return flops_per_token / GEMM_FLOPS * turn_ratio(gemm_costs, train_costs)


STEP_WINDOW = 50         # steps timed together
STEP_TURN_SECONDS = 1.0  # one turn of a step's measurement: windows back to back for this long


def step_ms(step, eos_id: int, batch: int = 1) -> float:
    """ms per step of a step function, the state carried on (the token is fixed: timing only):
    the median of STEP_WINDOW-step windows run back to back for STEP_TURN_SECONDS.

    The median, not the best: a step of tens of microseconds runs at two speeds on this host,
    the fast one in rare short spells (measured: 2% of 500-step windows, 17% of 50-step ones,
    and in some processes none), so a best of a few timings is a draw of whether a spell came."""
    x, state = np.full((batch, 1), eos_id, np.int64), None
    windows, end = [], time.perf_counter() + STEP_TURN_SECONDS
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(STEP_WINDOW):
            _, state = step(x, state)
        windows.append(time.perf_counter() - start)
    return float(np.median(windows)) / STEP_WINDOW * 1e3


def threads_label(threads: int) -> str:
    return f"{threads} thread" + "s" * (threads > 1)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Torch's intra-op threads set for a measurement, and set back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_ms_per_token(model, vocab, threads: int, mkldnn: bool) -> float:
    """Torch eager, one token per step, in this configuration."""
    # allow_tf32=None: setting it warns on every CPU build ("TF32 ... available for Intel GPUs")
    with torch_threads(threads), torch.backends.mkldnn.flags(enabled=mkldnn, allow_tf32=None):
        return step_ms(musicrnn.torch_step(model, torch.device("cpu")), vocab.eos_id)


TORCH_CONFIGS = [(threads, mkldnn) for threads in (1, 2) for mkldnn in (False, True)]


def fastest(measures: dict, wins: dict):
    """A side of a ratio at its best in this turn: the fastest of its configurations, chosen
    again in every turn, so that one disturbed measurement cannot fix the choice for a run.
    Counts each turn's winner in `wins`."""
    def measure() -> float:
        costs = {name: m() for name, m in measures.items()}
        best = min(costs, key=costs.get)
        wins[best] = wins.get(best, 0) + 1
        return costs[best]
    return measure


def ort_ms_per_token(path: str, batch: int = 1) -> tuple[float, int]:
    """onnxruntime at its best of 1 and 2 threads: (ms per step, threads); a step serves `batch` tunes."""
    results = {threads: ort_step_ms(ort_runner(path, threads), batch) for threads in (1, 2)}
    best = min(results, key=results.get)
    return results[best], best


def ort_runner(path: str, threads: int):
    session, vocab, config = exported_model.load_model(path, threads)
    return exported_model.onnx_step(session, config), vocab.eos_id


def ort_step_ms(runner, batch: int = 1) -> float:
    return step_ms(*runner, batch)


@torch.no_grad()
def prefix_ms_per_token(model, vocab, threads: int, stride: int = 20) -> float:
    """What a stateless generator pays: re-run the whole prefix for every new token.

    Timing all 500 prefixes takes minutes, so every `stride`-th prefix length is timed
    (the middle of each block of `stride`) and the sum is scaled by `stride`. Each length
    counts at its best of 3 runs: one long timing would take every disturbance of its seconds in.
    Torch at its best for whole sequences: oneDNN on.
    """
    x = torch.full((1, TUNE_TOKENS), vocab.eos_id, dtype=torch.long)
    lengths = range(stride // 2, TUNE_TOKENS + 1, stride)
    with torch_threads(threads):
        model(x[:, :stride])  # warm-up
        seconds = sum(timed(lambda t=t: model(x[:, :t])) for t in lengths)
    return seconds * stride / TUNE_TOKENS * 1e3


ROUNDS = 9  # of the constraint's batch-1 measurement: a round is a turn, its two sides alternating tune by tune


def constraint_overhead(step, vocab, tunes: int = 10, first_seed: int = 0) -> dict:
    """Whole generation steps (model, mask, sampler) at batch 1, with and without --constrained.

    Every tune is new (its own seed), as for a user: the masks are cached by automaton
    state, but a new tune still meets states the cache has not seen. Two figures: the first
    `tunes` tunes of a fresh process (infer_onnx.py --num 10), and `tunes` more after 50
    tunes have filled the cache. Free and constrained alternate tune by tune over the same
    seeds, the free tune held to the constrained one's length (held_to), so that both sides take
    the same steps and a change in the machine's speed falls on both alike: a round is a turn,
    and an overhead is the median of the ROUNDS rounds' ratios (turn_ratio); a side's row is its
    best round. The constraint's start-up (what it builds ahead, so that the first tunes do not)
    is timed apart.
    """
    assert 2 * tunes + 50 <= 100, "rounds would share seeds"
    rounds = []  # per round: start-up s, then free, cold, free later, warm (ms per token)
    scratch = AbcConstraint(vocab)  # finds each tune's length, untimed
    for r in range(ROUNDS):
        seeds = range(first_seed + 100 * r, first_seed + 100 * r + tunes)  # 2 x tunes + 50 seeds: below the next's
        start = time.perf_counter()
        constraint = AbcConstraint(vocab)                 # a fresh process: empty caches,
        startup = time.perf_counter() - start
        note_shape.cache_clear()                          # the module's one included
        free, cold = paired_ms_per_token(step, vocab, constraint, seeds, scratch)
        for seed in range(seeds.stop, seeds.stop + 50):   # 50 more tunes fill the cache
            tunes_seconds(step, vocab, constraint, seed)
        later = range(seeds.stop + 50, seeds.stop + 50 + tunes)
        rounds.append((startup, free, cold, *paired_ms_per_token(step, vocab, constraint, later, scratch)))
    startup, free, cold, free_later, warm = np.min(rounds, axis=0).tolist()  # each side's best
    sides = np.array(rounds).T.tolist()  # (5, ROUNDS): each figure, round by round
    return {"gen_ms_per_token_sampled_ort": free, "gen_ms_per_token_constrained_cold_ort": cold,
            "gen_ms_per_token_sampled_later_ort": free_later, "gen_ms_per_token_constrained_ort": warm,
            "constraint_overhead_cold": turn_ratio(sides[2], sides[1]) - 1,
            "constraint_overhead": turn_ratio(sides[4], sides[3]) - 1, "constraint_startup_ms": startup * 1e3}


def tunes_seconds(step, vocab, constraint: AbcConstraint | None, seed: int, num: int = 1) -> tuple[float, int]:
    """(seconds, tokens) to generate one batch of `num` tunes from this seed, free (constraint
    None) or constrained; each tune's tokens counted with its <eos>."""
    opts = sampler.SamplingOptions(num=num, seed=seed, max_tokens=TUNE_TOKENS, constrained=constraint is not None)
    start = time.perf_counter()
    tunes = sampler.generate_tunes(step, vocab, opts, constraint)
    return time.perf_counter() - start, sum(len(vocab.encode(t)) + 1 for t in tunes)


def constrained_lengths(step, vocab, seed: int, num: int, scratch: AbcConstraint) -> np.ndarray:
    """(num,) the steps each constrained tune of this seed takes, its <eos> included (untimed; the tunes
    are the same whatever a constraint's cache holds, so a scratch one finds them)."""
    opts = sampler.SamplingOptions(num=num, seed=seed, max_tokens=TUNE_TOKENS, constrained=True)
    return np.array([len(vocab.encode(t)) + 1 for t in sampler.generate_tunes(step, vocab, opts, scratch)])


def held_to(step, lengths: np.ndarray, eos_id: int, hold: bool):
    """step, with row b made to write <eos> at its step lengths[b] and never before (hold), so that a free
    batch takes the constrained batch's steps and tokens. Without hold the same operations go to a scratch
    array: the constrained side pays the bookkeeping too, its own draws untouched."""
    t, scratch = 0, None

    def held(tokens: np.ndarray, state):
        nonlocal t, scratch
        logits, state = step(tokens, state)                            # (B, V)
        if not hold and scratch is None:
            scratch = np.empty_like(logits)
        target = logits if hold else scratch
        target[t + 1 < lengths, eos_id] = -np.inf
        ending = t + 1 == lengths
        target[ending] = -np.inf
        target[ending, eos_id] = 0.0
        t += 1
        return logits, state

    return held


def paired_ms_per_token(step, vocab, constraint: AbcConstraint, seeds, scratch: AbcConstraint) -> tuple[float, float]:
    """(free, constrained) ms per token over these seeds' tunes, generated in turns: free, then
    constrained, tune by tune, the free tune held to the constrained one's length."""
    totals = np.zeros((2, 2))  # (free, constrained) x (seconds, tokens)
    for seed in seeds:
        # both sides take these steps: counted from the lengths, as a drawn <pad> shows in no text
        lengths = constrained_lengths(step, vocab, seed, 1, scratch)
        for side, hold, c in ((0, True, None), (1, False, constraint)):
            totals[side] += tunes_seconds(held_to(step, lengths, vocab.eos_id, hold), vocab, c, seed)[0], lengths.sum()
    free, constrained = totals[:, 0] / totals[:, 1] * 1e3
    return float(free), float(constrained)


BATCH_TURNS = 15  # a batch of 32 takes a third of a second: at 7 turns, a run's two figures can be 13% apart


def constrained_batch(step, vocab, batch: int = 32, first_seed: int = 10_000) -> dict:
    """Tokens/s of one batch of `batch` new tunes, free and --constrained (a cache filled by 50
    tunes first), in turns, each turn's two batches from one seed of their own, the free batch's rows
    held to the constrained rows' lengths (the same steps, the same tokens: a free batch would
    otherwise run until its longest tune ends, its rows that ended idle); each side's best of
    BATCH_TURNS turns, and the median of the turns' ratios."""
    constraint, scratch = AbcConstraint(vocab), AbcConstraint(vocab)
    seeds = iter(range(first_seed, first_seed + 10_000))
    lengths = {}  # this turn's: found before its free side, read by its constrained side

    def seconds_per_token(c) -> float:
        if c is None:
            seed = next(seeds)
            lengths["turn"] = seed, constrained_lengths(step, vocab, seed, batch, scratch)
        seed, held = lengths["turn"]
        seconds, _ = tunes_seconds(held_to(step, held, vocab.eos_id, c is None), vocab, c, seed, batch)
        return seconds / held.sum()

    sampler.generate_tunes(step, vocab, sampler.SamplingOptions(num=50, max_tokens=TUNE_TOKENS, constrained=True),
                           constraint)
    costs = in_turns({"free, batch 32": lambda: seconds_per_token(None),
                      "constrained, batch 32": lambda: seconds_per_token(constraint)}, repeats=BATCH_TURNS)
    (free, constrained), spread = picked(costs)
    return {"gen_tokens_per_s_batch32_free": 1 / free, "gen_tokens_per_s_batch32_constrained": 1 / constrained,
            "constrained_share_batch32": turn_ratio(costs["free, batch 32"], costs["constrained, batch 32"]),
            "spread_batch32": spread}


def constraint_bench(onnx_path: str) -> dict:
    """The constraint's cost, measured twice in this run (run 1, run 2), so the reader sees the spread."""
    session, vocab, config = exported_model.load_model(onnx_path)
    step = exported_model.onnx_step(session, config)
    runs = [constraint_overhead(step, vocab, first_seed=1000 * r)  # seeds of their own: each run times its own tunes
            | constrained_batch(step, vocab, first_seed=10_000 * r) for r in (1, 2)]
    return {f"{key}_run{n}": value for n, run in enumerate(runs, start=1) for key, value in run.items()}


def generation_bench(checkpoint: str, onnx_path: str, int8_path: str) -> dict:
    """Torch, onnxruntime and the stateless prefix recompute measured in turns for the ratios
    between them, each back end in every turn at the fastest of its configurations."""
    model, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(checkpoint), checkpoint)
    torch_wins, ort_wins, prefix_wins = {}, {}, {}
    torch_side = fastest({f"{threads_label(threads)}, oneDNN {'on' if mkldnn else 'off'}":
                          (lambda c=(threads, mkldnn): torch_ms_per_token(model, vocab, *c))
                          for threads, mkldnn in TORCH_CONFIGS}, torch_wins)
    ort_side = fastest({threads: (lambda r=ort_runner(onnx_path, threads): ort_step_ms(r)) for threads in (1, 2)},
                       ort_wins)
    # every side at the fastest of 1 and 2 threads in each turn: when something else takes a
    # core for a while, a 2-thread side alone would slow down and move the ratios between runs
    prefix_side = fastest({threads: (lambda t=threads: prefix_ms_per_token(model, vocab, t)) for threads in (1, 2)},
                          prefix_wins)
    costs = in_turns({"torch": torch_side, "onnxruntime": ort_side, "prefix": prefix_side}, repeats=STEP_REPEATS)
    (torch_ms, ort_ms, prefix_ms), spread = picked(costs, typical=True)
    int8_ms, _ = ort_ms_per_token(int8_path) if Path(int8_path).exists() else (float("nan"), 0)
    batch32_ms, _ = ort_ms_per_token(onnx_path, batch=32)
    return {
        "gen_ms_per_token_torch": torch_ms,
        "gen_torch_best_config": max(torch_wins, key=torch_wins.get),
        "gen_ms_per_token_ort": ort_ms, "gen_ort_threads": max(ort_wins, key=ort_wins.get),
        "gen_ms_per_token_ort_int8": int8_ms,
        "gen_ms_per_token_prefix": prefix_ms, "gen_prefix_threads": max(prefix_wins, key=prefix_wins.get),
        "gen_tokens_per_s_batch32_ort": 32 / batch32_ms * 1e3,
        "ort_speedup_over_torch": turn_ratio(costs["torch"], costs["onnxruntime"]),
        "state_speedup_over_prefix": turn_ratio(costs["prefix"], costs["onnxruntime"]),
        "state_speedup_over_prefix_torch": turn_ratio(costs["prefix"], costs["torch"]),  # the state's gain alone
        "spread_generation": spread,
        **constraint_bench(onnx_path),
    }


GEMM_TURN_SECONDS = 10.0  # a ceiling turn as long as a training turn: a shorter one is the likelier to catch a quiet spell


def product_dtype(cfg: musicrnn.Config) -> torch.dtype:
    """What training with cfg multiplies in on this CPU (musicrnn.bf16_products): bf16 units
    multiply several times faster than fp32 ones, so its ceiling is measured in the same type."""
    return torch.bfloat16 if musicrnn.bf16_products(cfg.precision, torch.device("cpu")) else torch.float32


def products_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def gemm_seconds(dtype: torch.dtype = torch.float32, n: int = GEMM_N, seconds: float = GEMM_TURN_SECONDS) -> float:
    """Seconds per large matrix product on this machine, now: the mean over products repeated
    for `seconds`, a sustained rate like the training turns it divides, not one product's burst."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    products, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        products += 1
    return (time.perf_counter() - start) / products


def train_flops_per_token(cfg: musicrnn.Config, vocab_size: int) -> int:
    """3 x the forward matmul FLOPs per token (LSTM gates + output layer): forward and backward."""
    lstm = sum(2 * 4 * cfg.hidden_dim * ((cfg.embedding_dim if layer == 0 else cfg.hidden_dim) + cfg.hidden_dim)
               for layer in range(cfg.num_layers))
    return 3 * (lstm + 2 * cfg.hidden_dim * vocab_size)


def useful_tokens_per_s(cfg, vocab, dataset, batches, seconds: float, pad_to: int | None = None) -> float:
    """Train a fresh default model over these batches for `seconds`: non-padding tokens per second."""
    torch.manual_seed(0)
    model = musicrnn.build_model(cfg, len(vocab)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bf16 = product_dtype(cfg) == torch.bfloat16
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        x, y = musicrnn.collate([dataset[i] for i in batch], vocab.pad_id)      # (B, T)
        if pad_to:  # the naive layout: every tune padded to the longest one
            x = torch.nn.functional.pad(x, (0, pad_to - x.shape[1]), value=vocab.pad_id)
            y = torch.nn.functional.pad(y, (0, pad_to - y.shape[1]), value=vocab.pad_id)
        n = int((y != vocab.pad_id).sum())
        musicrnn.train_step(model, optimizer, x, y, vocab.pad_id, cfg.grad_clip, n, bf16=bf16)
        tokens += n
        if time.perf_counter() - start > seconds:
            break
    return tokens / (time.perf_counter() - start)


def training_bench(checkpoint: str, train_data: str, seconds: float = 10.0) -> dict:
    """Our length-grouped batches against the naive layout (pad to the longest tune, batch 8),
    and the GEMM ceiling, measured in turns: the ratios compare figures taken side by side."""
    _, cfg, vocab = musicrnn.model_from_checkpoint(musicrnn.load_checkpoint(checkpoint), checkpoint)
    dataset = musicrnn.MusicDataset(musicrnn.load_tunes(train_data), vocab)
    lengths = dataset.lengths()
    rng = np.random.default_rng(0)
    ours = musicrnn.length_batches(lengths, cfg.batch_size, rng)
    order = rng.permutation(len(lengths))
    naive = [order[i:i + 8] for i in range(0, len(order), 8)]
    flops, dtype = train_flops_per_token(cfg, len(vocab)), product_dtype(cfg)
    costs = in_turns({
        "GEMM ceiling": lambda: gemm_seconds(dtype),
        "training": lambda: 1 / useful_tokens_per_s(cfg, vocab, dataset, ours, seconds),
        "padded training": lambda: 1 / useful_tokens_per_s(cfg, vocab, dataset, naive, seconds,
                                                            pad_to=int(lengths.max()))})
    (gemm_s, ours_s, naive_s), spread = picked(costs)
    return {"gemm_gflops": GEMM_FLOPS / gemm_s / 1e9, "train_tokens_per_s": 1 / ours_s,
            "train_tokens_per_s_padded": 1 / naive_s, "train_flops_per_token": flops,
            "padding_ours": musicrnn.padding_fraction(lengths, ours),
            "padding_naive": 1 - float(lengths.mean()) / int(lengths.max()),
            "train_speedup": turn_ratio(costs["padded training"], costs["training"]),
            "train_batch_size": cfg.batch_size,
            "train_flop_utilisation": turn_utilisation(flops, costs["training"], costs["GEMM ceiling"]),
            "train_products": products_name(dtype),
            "spread_training": spread}


_PEAK = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
finally:  # VmHWM: this process's peak resident memory (ru_maxrss would count the fork from the bench)
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    print("PEAK_KB", peak, file=sys.stderr)
sys.exit(code)
"""


def process_bench(checkpoint: str, onnx_path: str, train_data: str, val_data: str) -> dict:
    """Start-up to one printed tune, and peak resident memory, each in a fresh process."""
    import re

    def run(*command: str) -> tuple[float, float]:  # (wall seconds, peak MB)
        start = time.perf_counter()
        done = measured_run([sys.executable, "-c", _PEAK, *command])
        seconds = time.perf_counter() - start
        return seconds, int(re.search(r"PEAK_KB (\d+)", done.stderr).group(1)) / 1024

    ort_s, ort_mb = run("infer_onnx.py", "--model", onnx_path, "--num", "1", "--max-tokens", "300")
    torch_s, torch_mb = run("musicrnn.py", "generate", "--checkpoint", checkpoint, "--num", "1", "--max-tokens", "300")
    train_mb = max(train_processes(1, train_data, val_data)[1])
    return {"startup_s_infer_onnx": ort_s, "startup_s_generate_torch": torch_s,
            "peak_mb_infer_onnx": ort_mb, "peak_mb_generate_torch": torch_mb, "peak_mb_train": train_mb}


def measured_run(command: list[str]):
    """Run one of the commands the bench times; if it fails, its own last error line, as ours."""
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        lines = [line for line in lines if line.startswith("error:")] or lines  # ours, before torchrun's report
        script = next(i for i, part in enumerate(command) if part.endswith(".py"))  # after python -c or torchrun's
        raise UserError(f"a measured command failed ({' '.join(command[script:script + 2])} ...): {lines[-1]}")
    return done


def train_processes(procs: int, train_data: str, val_data: str, *flags: str) -> tuple[float, list[float]]:
    """musicrnn.py train, one epoch, in `procs` processes (torchrun when more than one, gloo, the
    cores shared), its checkpoints in a temporary folder: useful tokens/s of the epoch, and each
    process's peak resident MB."""
    import re

    with tempfile.TemporaryDirectory(prefix="musicrnn-bench.") as out:  # never a folder of the user's runs
        train = [sys.executable, "-c", _PEAK, "musicrnn.py", "train", "--train-data", train_data, "--val-data",
                 val_data, "--epochs", "1", "--out", out, *flags]
        if procs > 1:
            train = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                     "--no-python", *train]
        done = measured_run(train)
    tokens_per_s = float(re.search(r"\| ([\d,]+) tok/s", done.stdout).group(1).replace(",", ""))
    return tokens_per_s, [int(kb) / 1024 for kb in re.findall(r"PEAK_KB (\d+)", done.stderr)]


def scaling_bench(train_data: str, val_data: str, flops_per_token: int) -> dict:
    """1 process (all cores) against 2 under torchrun (the cores shared; make train's way), the
    same global batch (the default's), one epoch of 1,000 tunes each, and the GEMM ceiling, in turns: the
    FLOP utilisation of each is measured against a ceiling taken beside it."""
    def seconds_per_token(procs: int) -> float:
        return 1 / train_processes(procs, train_data, val_data, "--limit", "1000")[0]

    dtype = product_dtype(musicrnn.Config())  # train_processes passes no --precision
    gemm = "GEMM ceiling beside them"
    costs = in_turns({gemm: lambda: gemm_seconds(dtype), "1 process": lambda: seconds_per_token(1),
                      "2 processes": lambda: seconds_per_token(2)}, repeats=PROCESS_REPEATS)
    (gemm_s, one, two), spread = picked(costs)
    ceiling = GEMM_FLOPS / gemm_s
    return {"gemm_gflops_processes": ceiling / 1e9,
            "train_tokens_per_s_1_process": 1 / one, "train_tokens_per_s_2_processes": 1 / two,
            "processes_batch_size": musicrnn.Config.batch_size,  # train_processes passes no --batch-size
            "processes_products": products_name(dtype),
            "scaling_2_over_1": turn_ratio(costs["1 process"], costs["2 processes"]), "spread_processes": spread,
            "train_flop_utilisation_1_process": turn_utilisation(flops_per_token, costs["1 process"], costs[gemm]),
            "train_flop_utilisation_2_processes": turn_utilisation(flops_per_token, costs["2 processes"], costs[gemm])}


def large_bench(data: str, val_data: str, minutes: float = 2.0) -> dict:
    """The scale measurements on data/large.json (make data-large): load and tokenize, the token
    arrays' size, and `minutes` of training in 1 and in 2 processes (tokens/s, peak MB per process)."""
    start = time.perf_counter()
    tunes = musicrnn.load_tunes(data)
    dataset = musicrnn.MusicDataset(tunes, musicrnn.build_vocabulary(tunes, musicrnn.Config()))
    results = {"large_tunes": len(tunes), "large_chars": dataset.chars, "large_tokens": int(dataset.lengths().sum()),
               "large_load_tokenize_s": time.perf_counter() - start,
               "large_token_arrays_mb": sum(s.nbytes for s in dataset.sequences) / 2**20}
    for procs in (1, 2):
        speed, peaks = train_processes(procs, data, val_data, "--max-minutes", str(minutes))
        results[f"large_tokens_per_s_{procs}"], results[f"large_peak_mb_per_process_{procs}"] = speed, max(peaks)
    return results


def json_text(results: dict) -> bytes:
    """The results as JSON, a figure not measured (NaN: no int8 model) as null: JSON has no NaN."""
    return json.dumps({k: None if isinstance(v, float) and v != v else v for k, v in results.items()}, indent=2).encode()


def server_bench(onnx_path: str, requests: int = 50) -> dict:
    """serve.py on loopback: `requests` concurrent forms of 2 constrained tunes each (6/8, D,
    a seed each), written, scored, rendered to MIDI and audio. Success share and latencies;
    without the rendering tools no request could succeed, so none is sent and the table says why."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    missing = rendering.missing_tools()
    if missing:
        return {"serve_requests": requests, "serve_not_measured": "; ".join(missing.values())}
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", onnx_path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):  # it printed its error line instead of its address
        proc.kill()
        raise UserError(f"serve.py did not start: {(proc.stderr.read().strip() or line.strip() or 'no output')[:200]}")
    url = line.split()[1] + "generate"
    try:
        with ThreadPoolExecutor(max_workers=requests) as pool:  # every request in flight at once
            results = list(pool.map(lambda seed: served_in_full(url, seed), range(requests)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    seconds = np.array([s for _, s in results])
    return {"serve_requests": requests, "serve_success": float(np.mean([ok for ok, _ in results])),
            "serve_p50_s": float(np.percentile(seconds, 50)), "serve_p95_s": float(np.percentile(seconds, 95))}


def served_in_full(url: str, seed: int) -> tuple[bool, float]:
    """One form of 2 constrained tunes posted to serve.py: (both came back with their audio, seconds)."""
    import urllib.error
    import urllib.request

    body = f"meter=6%2F8&key=D&temperature=1.0&seed={seed}&num=2&constrained=on".encode()
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, data=body, timeout=600) as r:
            ok = r.status == 200 and r.read().count(b"<audio") == 2
    except (urllib.error.URLError, OSError):
        ok = False
    return ok, time.perf_counter() - start


def markdown(results: dict) -> str:
    rows = [
        ("torch eager step, batch 1 (" + results["gen_torch_best_config"] + ")", results["gen_ms_per_token_torch"], "ms/token"),
        (f"onnxruntime fp32 step, batch 1 ({threads_label(results['gen_ort_threads'])})",
         results["gen_ms_per_token_ort"], "ms/token"),
        ("onnxruntime int8 step, batch 1", results["gen_ms_per_token_ort_int8"], "ms/token"),
        (f"prefix recompute (stateless), {TUNE_TOKENS}-token tune ({threads_label(results['gen_prefix_threads'])})",
         results["gen_ms_per_token_prefix"], "ms/token"),
        ("onnxruntime fp32, batch 32", results["gen_tokens_per_s_batch32_ort"], "tokens/s"),
        ("onnxruntime speed-up over torch eager (target >= 2)", results["ort_speedup_over_torch"], "x"),
        ("carried state (onnxruntime step) over prefix recompute (torch) (target >= 50)",
         results["state_speedup_over_prefix"], "x"),
        ("the same, both torch: carried state over prefix recompute, one engine",
         results.get("state_speedup_over_prefix_torch", float("nan")), "x"),
    ] + serve_rows(results)
    return table(rows, results["spread_generation"]) + "\n\n" + constraint_markdown(results)


def serve_rows(r: dict) -> list[tuple]:
    label = f"serve.py: {r['serve_requests']} concurrent requests of 2 constrained tunes"
    if "serve_not_measured" in r:
        return [(label, "not measured (" + r["serve_not_measured"] + ")", "")]
    return [(label + ", answered in full", 100 * r["serve_success"], "%"),
            ("serve.py: latency of those requests, p50", r["serve_p50_s"], "s"),
            ("serve.py: latency of those requests, p95", r["serve_p95_s"], "s")]


def constraint_markdown(r: dict) -> str:
    """The constraint's cost: both runs side by side (targets: <= 10% overhead, >= 85% at batch 32)."""
    rows = [
        ("sampled step (model + sampler), batch 1, onnxruntime, free (held to the constrained tunes' lengths)",
         "gen_ms_per_token_sampled_ort", 1, "ms/token"),
        ("the same, --constrained, a fresh constraint's first 10 tunes", "gen_ms_per_token_constrained_cold_ort", 1,
         "ms/token"),
        ("free again, in turns with the next row's tunes", "gen_ms_per_token_sampled_later_ort", 1, "ms/token"),
        ("the same, --constrained, new tunes after 50", "gen_ms_per_token_constrained_ort", 1, "ms/token"),
        ("constraint overhead, first 10 tunes (target <= 10%)", "constraint_overhead_cold", 100, "%"),
        ("constraint overhead, after 50 tunes (target <= 10%)", "constraint_overhead", 100, "%"),
        ("free sampling, batch 32 (each row held to its constrained row's length)", "gen_tokens_per_s_batch32_free",
         1, "tokens/s"),
        ("--constrained, batch 32 (after 50 tunes)", "gen_tokens_per_s_batch32_constrained", 1, "tokens/s"),
        ("constrained / free at batch 32 (target >= 85%)", "constrained_share_batch32", 100, "%"),
        ("the constraint's start-up (its prefix tables built ahead)", "constraint_startup_ms", 1, "ms"),
    ]
    lines = ["| constraint | run 1 | run 2 | unit |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {scale * r[key + '_run1']:,.3f} | {scale * r[key + '_run2']:,.3f} | {unit} |"
              for name, key, scale, unit in rows]
    return "\n".join(lines)


def table(rows: list[tuple], spreads: dict[str, float]) -> str:
    """The rows as Markdown, then how far the repeats of each interleaved side spread."""
    lines = ["| measurement | value | unit |", "|---|---:|---|"]
    lines += [f"| {name} | {value if isinstance(value, str) else f'{value:,.3f}'} | {unit} |"
              for name, value, unit in rows]
    spread = ", ".join(f"{name} {100 * value:.0f}%" for name, value in spreads.items())
    return "\n".join(lines) + f"\n\nEvery ratio is the median of its turns' ratios, each turn's two sides " \
        f"measured side by side ({REPEATS} turns; {STEP_REPEATS} for generation, {PROCESS_REPEATS} for the training " \
        f"processes, {BATCH_TURNS} at batch 32). A side's own figure is its best turn, generation's its median turn, " \
        f"each turn's step the median of its {STEP_WINDOW}-step windows over {STEP_TURN_SECONDS:g} s; the sides' " \
        f"spread (worst / best - 1): " + spread


def utilisation(value: float) -> float | str:
    """A FLOP utilisation above 1 is impossible: it can only be a measurement error."""
    return value if value <= 1 else f"measurement error ({value:.2f} > 1)"


def training_markdown(r: dict) -> str:
    rows = [
        (f"{r['train_products']} GEMM 2048^3, sustained over {GEMM_TURN_SECONDS:.0f} s (the ceiling, measured now)",
         r["gemm_gflops"], "GFLOP/s"),
        (f"training ({r['train_products']} products), length-grouped batches of {r['train_batch_size']}",
         r["train_tokens_per_s"], "useful tokens/s"),
        ("training, pad to the longest tune, batch 8", r["train_tokens_per_s_padded"],
         "useful tokens/s"),
        ("train_speedup (target >= 5)", r["train_speedup"], "x"),
        ("padding: ours / padded to the longest", 100 * r["padding_ours"], f"% / {100 * r['padding_naive']:.0f}%"),
        ("FLOP utilisation, in-process training above", utilisation(r["train_flop_utilisation"]), "of the GEMM ceiling"),
        ("start-up to one tune: infer_onnx.py", r["startup_s_infer_onnx"], "s"),
        ("start-up to one tune: musicrnn.py generate (imports torch)", r["startup_s_generate_torch"], "s"),
        ("peak memory: infer_onnx.py", r["peak_mb_infer_onnx"], "MB"),
        ("peak memory: musicrnn.py generate", r["peak_mb_generate_torch"], "MB"),
        ("peak memory: one training epoch", r["peak_mb_train"], "MB"),
        (f"training, 1 process (2 threads), global batch {r['processes_batch_size']}", r["train_tokens_per_s_1_process"],
         "useful tokens/s"),
        ("training, 2 processes under torchrun (1 thread each, gloo)", r["train_tokens_per_s_2_processes"],
         "useful tokens/s"),
        ("2 processes / 1 process, the same 2 cores", r["scaling_2_over_1"], "x"),
        (f"{r['processes_products']} GEMM ceiling, in turns with the two above", r["gemm_gflops_processes"], "GFLOP/s"),
        ("FLOP utilisation, 1 process (target >= 0.5)", utilisation(r["train_flop_utilisation_1_process"]),
         "of the GEMM ceiling"),
        ("FLOP utilisation, 2 processes: make train (target >= 0.5)",
         utilisation(r["train_flop_utilisation_2_processes"]), "of the GEMM ceiling"),
    ]
    return (f"FLOPs per training token = 3 x (8H(E+H) per layer + 2HV) = {r['train_flops_per_token']:,}\n\n"
            + table(rows, r["spread_training"] | r["spread_processes"]))


AGREEMENT = 0.15  # two runs agree when no ratio of one is more than 15% from the other's (larger / smaller - 1)


def ratios(r: dict) -> dict[str, float]:
    """Every ratio of two timings that a run's tables print, by name; the constraint's from each of its runs."""
    named = {"onnxruntime / torch eager": r["ort_speedup_over_torch"],
             "carried state / prefix recompute": r["state_speedup_over_prefix"],
             "length-grouped / padded training": r["train_speedup"],
             "2 processes / 1 process": r["scaling_2_over_1"],
             "FLOP utilisation, in-process training": r["train_flop_utilisation"],
             "FLOP utilisation, 1 process": r["train_flop_utilisation_1_process"],
             "FLOP utilisation, 2 processes": r["train_flop_utilisation_2_processes"]}
    for n in (1, 2):
        named[f"constrained / free step, first 10 tunes (constraint run {n})"] = 1 + r[f"constraint_overhead_cold_run{n}"]
        named[f"constrained / free step, after 50 tunes (constraint run {n})"] = 1 + r[f"constraint_overhead_run{n}"]
        named[f"constrained / free tokens/s, batch 32 (constraint run {n})"] = r[f"constrained_share_batch32_run{n}"]
    return named


def comparison_markdown(first: dict, second: dict, names: tuple[str, str]) -> str:
    """Two runs' ratios side by side, each difference as larger / smaller - 1, and whether they agree."""
    a, b = ratios(first), ratios(second)
    heads = [name.replace("|", "\\|") for name in names]  # a file named x|y.json: one cell, not two
    lines = [f"| ratio | {heads[0]} | {heads[1]} | difference |", "|---|---:|---:|---:|"]
    over = []
    for name in a:
        difference = max(a[name], b[name]) / min(a[name], b[name]) - 1
        over += [name] if difference > AGREEMENT else []
        lines.append(f"| {name} | {a[name]:,.3f} | {b[name]:,.3f} | {100 * difference:.1f}% |")
    verdict = (f"The two runs agree within {AGREEMENT:.0%} on every ratio." if not over else
               f"{len(over)} of {len(a)} ratios differ by more than {AGREEMENT:.0%}: " + "; ".join(over) + ".")
    return "\n".join(lines) + "\n\n" + verdict


def read_results(path: str) -> dict:
    """A run's runs/bench.json, refused in one line if it is not one (a --large run's lacks the ratios)."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        named = ratios(results)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[... nested deep
        raise UserError(f"{path}: not readable as JSON ({cli.first_line(e, 80)})") from None
    except (KeyError, TypeError):
        raise UserError(f"{path}: not the results of a bench.py run (a --large run's hold no ratios)") from None
    for name, value in named.items():  # a ratio of two timings: a number above 0 (json reads NaN too), and one
        # a float holds (json reads a whole number of 400 digits, which no division takes)
        if type(value) not in (int, float) or not 0 < value < 1e300:
            raise UserError(f"{path}: its ratio {name} is {cli.shown(repr(value))}, where a run writes a number "
                            f"above 0, as a float holds it")
    return results


DEFAULTS = {"checkpoint": "runs/best.pt", "onnx": "runs/musicrnn.onnx", "int8": "runs/musicrnn.int8.onnx",
            "train_data": "data/train.json", "val_data": "data/validation.json"}  # make train and make data write them
OUT = "runs/bench.json"
NOT_READ_BY_LARGE = ("onnx", "int8", "train_data")  # --large reads --checkpoint's folder only, to train in


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="bench.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", help=f"the torch model (default: {DEFAULTS['checkpoint']})")
    parser.add_argument("--onnx", help=f"its fp32 export (default: {DEFAULTS['onnx']})")
    parser.add_argument("--int8", help=f"its int8 export (default: {DEFAULTS['int8']}; where it is missing, its row "
                                       f"reads nan and the JSON null)")
    parser.add_argument("--train-data", help=f"tunes to train on (default: {DEFAULTS['train_data']})")
    parser.add_argument("--val-data", help=f"tunes that the measured trainings validate on "
                                           f"(default: {DEFAULTS['val_data']})")
    parser.add_argument("--large", help="instead: the scale measurements on this corpus (data/large.json from "
                                        "make data-large): load, memory, 1 and 2 training processes; trains "
                                        "beside --checkpoint, and reads no --onnx, --int8 or --train-data")
    parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"),
                        help="instead of measuring: the ratios of two runs' JSON side by side, each difference "
                             "(larger / smaller - 1), and whether they agree within 15%%")
    parser.add_argument("--out", help=f"every figure as JSON (default: {OUT})")
    parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    return cli.run_command(bench, parser.parse_args(argv))


def input_paths(args) -> dict[str, str]:
    """Each input's path (given, or its default), once each file this run reads is there: a missing
    default --int8 only makes its row read nan; --large refuses the flags it does not read."""
    given = {name for name in DEFAULTS if getattr(args, name) is not None}
    if args.large and given & set(NOT_READ_BY_LARGE):
        raise UserError(f"--large reads no --{sorted(given & set(NOT_READ_BY_LARGE))[0].replace('_', '-')}: leave it out")
    paths = {name: getattr(args, name) or default for name, default in DEFAULTS.items()}
    read = ["val_data"] if args.large else [name for name in DEFAULTS if name != "int8" or name in given]
    for name in read:  # tunes may also be a folder or a URL, which their reader checks
        tunes = name.endswith("_data") and (Path(paths[name]).is_dir() or "://" in paths[name])
        if not (tunes or Path(paths[name]).is_file()):
            raise UserError(f"{paths[name]}: no such file" + ("" if name in given else " (make train and make data "
                                                                                      "write the defaults)"))
    for name in read:  # and what is in them, which a measurement minutes in would find
        READERS[name](paths[name])
    return paths


def compare(args) -> None:
    given = [name for name in DEFAULTS if getattr(args, name) is not None]
    given += ["large"] * bool(args.large) + ["overwrite"] * args.overwrite + ["out"] * (args.out is not None)
    if given:
        raise UserError(f"--compare measures nothing and writes no file: leave out --{given[0].replace('_', '-')}")
    if Path(args.compare[0]).resolve() == Path(args.compare[1]).resolve():
        raise UserError(f"--compare {args.compare[0]} with itself: give two runs' results")
    first, second = (read_results(path) for path in args.compare)
    print(comparison_markdown(first, second, tuple(args.compare)))


READERS = {"checkpoint": musicrnn.load_checkpoint, "onnx": exported_model.load_model,
           "int8": exported_model.load_model, "train_data": musicrnn.load_tunes, "val_data": musicrnn.load_tunes}


def bench(args) -> None:
    if args.compare:
        compare(args)
        return
    p = input_paths(args)
    inputs = [args.large, p["val_data"]] if args.large else [p[name] for name in DEFAULTS]
    out = check_output(OUT if args.out is None else args.out, "--out", args.overwrite, inputs=inputs, suffix=".json")
    if args.large:
        results = large_bench(args.large, p["val_data"])
        print("\n".join(f"| {key} | {value:,.3f} |" for key, value in results.items()))
        write_atomic(out, json_text(results), args.overwrite)
        return
    results = generation_bench(p["checkpoint"], p["onnx"], p["int8"]) | server_bench(p["onnx"])
    print(markdown(results), flush=True)
    results |= training_bench(p["checkpoint"], p["train_data"])
    results |= process_bench(p["checkpoint"], p["onnx"], p["train_data"], p["val_data"])
    results |= scaling_bench(p["train_data"], p["val_data"], results["train_flops_per_token"])
    print()
    print(training_markdown(results))
    write_atomic(out, json_text(results), args.overwrite)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
