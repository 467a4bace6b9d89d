"""The model: parameter count, init, carried state, and the one-step shift of the dataset."""

import numpy as np
import torch
from torch.nn import functional as F

import abc_tokens
import musicrnn


def test_parameter_count_of_the_default_model():
    cfg = musicrnn.Config()
    model = musicrnn.build_model(cfg, vocab_size=87)
    counts = [sum(p.numel() for p in m.parameters()) for m in (model.embedding, model.lstm, model.to_logits)]
    assert counts == [11_136, 789_504, 33_495]  # parameter_summary's docstring works these out
    assert sum(p.numel() for p in model.parameters()) == 834_135
    assert "834,135" in musicrnn.parameter_summary(model)


def test_init_opens_the_forget_gate_and_zeroes_other_biases():
    torch.manual_seed(0)
    model = musicrnn.MusicRNN(vocab_size=20, embedding_dim=8, hidden_dim=16, num_layers=2)
    for layer in range(2):
        b_ih, b_hh = getattr(model.lstm, f"bias_ih_l{layer}"), getattr(model.lstm, f"bias_hh_l{layer}")
        assert torch.all(b_ih[16:32] == 1) and torch.all(b_ih[:16] == 0) and torch.all(b_ih[32:] == 0)
        assert torch.all(b_hh == 0)
        w = getattr(model.lstm, f"weight_hh_l{layer}")  # (4H, H), orthogonal columns
        assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)
    assert torch.all(model.to_logits.bias == 0)


def test_stepwise_logits_equal_the_full_sequence_forward():
    """Generation feeds one token and (h, c) per step; it must see exactly what training saw."""
    torch.manual_seed(0)
    model = musicrnn.MusicRNN(vocab_size=30, embedding_dim=8, hidden_dim=16, num_layers=2).eval()
    x = torch.randint(0, 30, (3, 25))                      # (B, T)
    with torch.no_grad():
        full, _ = model(x)                                 # (B, T, V)
        state, steps = None, []
        for t in range(x.shape[1]):
            logits, state = model(x[:, t:t + 1], state)    # (B, 1, V)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # and dropping the state between steps gives something else
    with torch.no_grad():
        stateless = torch.cat([model(x[:, t:t + 1])[0] for t in range(x.shape[1])], dim=1)
    assert not torch.allclose(stateless, full, atol=1e-3)


def test_dataset_shifts_each_tune_by_one_and_pads_the_short_ones():
    vocab = abc_tokens.Vocabulary.build(["ABC|", "AB|"], "char")
    ds = musicrnn.MusicDataset(["ABC|", "AB|"], vocab)
    x, y = ds[0]
    assert x[0] == vocab.eos_id and y[-1] == vocab.eos_id   # <eos> starts and ends a tune
    assert x[1:].tolist() == y[:-1].tolist()                 # y is x shifted by one
    assert vocab.decode(y) == "ABC|"
    xb, yb = musicrnn.collate([ds[0], ds[1]], vocab.pad_id)  # (2, 5)
    assert xb.shape == (2, 5) and yb[1, -1] == vocab.pad_id and (yb != vocab.pad_id).sum() == 9


def test_chunk_nll_sums_the_loss_of_the_real_targets_and_ignores_padding():
    pad, y = 0, torch.tensor([[3, 1, 2], [2, 4, 0]])  # (B, t): the second tune's last target is padding
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))  # (B, t, V)

    def nll(logits):  # chunk_nll with a model that outputs these logits (its input, unread: y)
        return musicrnn.chunk_nll(lambda x, state, share: (logits, state), y, y, None, pad)[0]

    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # -log softmax at each real target, summed
    assert torch.isclose(nll(logits), sum(torch.logsumexp(logits[b, t], 0) - logits[b, t, y[b, t]] for b, t in real))
    noisy = logits.clone()
    noisy[1, 2] = torch.tensor([-50.0, 80.0, 0.0, 30.0, -9.0])  # anything at the padded position
    assert torch.equal(nll(noisy), nll(logits))


def test_a_tune_far_longer_than_a_chunk_is_batched_alone_not_padded_with_others():
    """20 short tunes and one of 3 million tokens: batched together, they would be 21 x 3 million padded
    tokens (1.5 GB of indices, 21 rows through the LSTM for every chunk) where 3 million are needed."""
    lengths = np.array([300] * 20 + [3_000_000] + [300] * 20)
    batches = musicrnn.length_batches(lengths, 32, None)
    assert sorted(len(b) for b in batches) == [1, 8, 32] and [20] in [list(b) for b in batches]
    assert len(musicrnn.length_batches(np.array([4096] * 64), 32, None)) == 2  # a chunk a row: as many as fit


def test_length_batches_cover_every_tune_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(50, 1500, size=1000)
    batches = musicrnn.length_batches(lengths, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert musicrnn.padding_fraction(lengths, batches) < 0.05
    # padding every tune to the longest one wastes far more
    assert 1 - lengths.sum() / (len(lengths) * lengths.max()) > 0.4


def test_evaluate_bits_per_char_counts_every_token_and_character(fixture_tunes):
    vocab = abc_tokens.Vocabulary.build(fixture_tunes, "abc")
    ds = musicrnn.MusicDataset(fixture_tunes, vocab)
    torch.manual_seed(0)
    model = musicrnn.MusicRNN(len(vocab), 8, 16)
    metrics = musicrnn.evaluate(model, ds, vocab.pad_id, torch.device("cpu"), batch_size=3)
    assert metrics["chars"] == sum(map(len, fixture_tunes))
    assert metrics["tokens"] == sum(len(vocab.encode(t)) + 1 for t in fixture_tunes)
    nats = 0.0  # each tune alone, unpadded: read <eos> tune, scored on tune <eos>
    with torch.no_grad():
        for tune in fixture_tunes:
            ids = torch.tensor([vocab.eos_id, *vocab.encode(tune), vocab.eos_id])
            logits, _ = model.eval()(ids[None, :-1])
            nats += F.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    assert np.isclose(metrics["loss"], nats / metrics["tokens"])
    assert np.isclose(metrics["bits_per_char"], nats / np.log(2) / sum(map(len, fixture_tunes)))
    assert np.isclose(metrics["perplexity"], np.exp(nats / metrics["tokens"]))
    # an untrained model is close to uniform over the vocabulary
    assert abs(metrics["loss"] - np.log(len(vocab))) < 0.5
