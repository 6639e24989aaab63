"""Slot filling with a bidirectional LSTM (Flax NNX modules from ``seqjax.nnx``).

A small synthetic grammar of flight-booking requests. The same word must be tagged
differently depending on a cue elsewhere in the sentence, the classic motivating example
for recurrent memory:

    i want to depart from boston to denver on friday at noon
                          ^from_city ^to_city ^date     ^depart_time
    at noon we land from boston to denver
       ^arrive_time   (the cue "land" comes *after* the time: the backward direction sees it)

"boston" is ``from_city`` or ``to_city`` by the preposition before it; "noon" is
``depart_time`` or ``arrive_time`` by a verb several words away, before or after it. A
memoryless tagger (the most frequent tag of each word) cannot do better than chance on
those words; the bidirectional LSTM reads both directions and gets them right.

The model is an ordinary ``flax.nnx`` module: ``nnx.Embed`` -> ``seqjax.nnx.Bidirectional``
(two ``seqjax.nnx.LSTM``) -> ``nnx.Linear``, trained with ``nnx.Optimizer`` and optax.

Run:  python examples/slot_filling.py
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.losses import softmax_cross_entropy
from seqjax.nnx import LSTM, Bidirectional

CITIES = ["boston", "denver", "austin", "dallas", "seattle", "chicago", "miami", "atlanta"]
TIMES = ["noon", "midnight", "5pm", "7am", "9am", "6pm", "dawn"]
DAYS = ["monday", "friday", "sunday", "tomorrow"]
DEPART = [["i", "want", "to", "depart"], ["i", "need", "to", "leave"], ["please", "depart"], ["we", "leave"]]
ARRIVE = [
    ["i", "want", "to", "arrive"],
    ["i", "need", "to", "get", "there"],
    ["please", "arrive"],
    ["we", "land"],
]
TAGS = ["O", "from_city", "to_city", "date", "depart_time", "arrive_time"]
TAG = {t: i for i, t in enumerate(TAGS)}


def sentence(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One request and its tags."""
    depart = rng.random() < 0.5
    verb = list(DEPART[rng.integers(len(DEPART))] if depart else ARRIVE[rng.integers(len(ARRIVE))])
    time_tag = "depart_time" if depart else "arrive_time"
    a, b = rng.choice(len(CITIES), 2, replace=False)
    parts = []  # (words, tags) phrases in some order
    if rng.random() < 0.85:
        parts.append((["from", CITIES[a]], ["O", "from_city"]))
    if rng.random() < 0.85 or not parts:
        parts.append((["to", CITIES[b]], ["O", "to_city"]))
    if rng.random() < 0.5:
        parts.append((["on", DAYS[rng.integers(len(DAYS))]], ["O", "date"]))
    rng.shuffle(parts)
    time_words = (["at", TIMES[rng.integers(len(TIMES))]], ["O", time_tag])
    words, tags = [], []
    if rng.random() < 0.3:  # time first: its cue comes later in the sentence
        order = [time_words, (verb, ["O"] * len(verb)), *parts]
    else:
        order = [(verb, ["O"] * len(verb)), *parts, time_words]
    for w, t in order:
        words += w
        tags += t
    if rng.random() < 0.3:
        words.append("please")
        tags.append("O")
    return words, tags


def dataset(n: int, seed: int, vocab: dict[str, int] | None = None):
    """``(ids (n, L) int32, tags (n, L) int32, lengths (n,) int32, vocab)``; padding id 0."""
    rng = np.random.default_rng(seed)
    sents = [sentence(rng) for _ in range(n)]
    if vocab is None:
        words = sorted({w for ws, _ in sents for w in ws} | set(CITIES) | set(TIMES) | set(DAYS))
        vocab = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    L = max(len(ws) for ws, _ in sents)
    ids = np.zeros((n, L), np.int32)
    tags = np.zeros((n, L), np.int32)
    lengths = np.zeros((n,), np.int32)
    for i, (ws, ts) in enumerate(sents):
        ids[i, : len(ws)] = [vocab[w] for w in ws]
        tags[i, : len(ts)] = [TAG[t] for t in ts]
        lengths[i] = len(ws)
    return ids, tags, lengths, vocab


class Tagger(nnx.Module):
    """``nnx.Embed`` -> bidirectional LSTM (``seqjax.nnx``) -> ``nnx.Linear`` per step."""

    def __init__(self, vocab_size: int, num_tags: int, *, embed: int, hidden: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, embed, rngs=rngs)
        self.bi = Bidirectional(LSTM(embed, hidden, rngs=rngs), LSTM(embed, hidden, rngs=rngs))
        self.out = nnx.Linear(2 * hidden, num_tags, rngs=rngs)

    def __call__(self, ids, lengths):
        _, ys = self.bi(self.embed(ids), lengths=lengths)  # (B, T, 2H)
        return self.out(ys)  # (B, T, num_tags)


def main(
    steps: int = 400,
    hidden: int = 32,
    embed: int = 16,
    batch: int = 32,
    train_size: int = 2000,
    test_size: int = 500,
    seed: int = 0,
) -> dict:
    """Train the tagger and compare it with the memoryless baseline on the ambiguous words.

    Args:
      steps: Adam steps.
      hidden: LSTM units per direction.
      embed: word-embedding size.
      batch: sentences per step.
      train_size, test_size: numbers of generated sentences.
      seed: random seed.

    Returns:
      ``{"slot_accuracy", "time_accuracy", "city_accuracy", "baseline_time_accuracy",
      "baseline_city_accuracy", "example"}`` on the test sentences.
    """
    ids, tags, lengths, vocab = dataset(train_size, seed)
    t_ids, t_tags, t_len, _ = dataset(test_size, seed + 1, vocab)
    model = Tagger(len(vocab), len(TAGS), embed=embed, hidden=hidden, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, ids, tags, lengths):
        def loss_fn(m):
            return softmax_cross_entropy(m(ids, lengths), tags, lengths=lengths)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed + 2)
    for step in range(steps):
        idx = rng.integers(0, train_size, min(batch, train_size))
        loss = train_step(model, opt, ids[idx], tags[idx], lengths[idx])
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    pred = np.asarray(nnx.jit(lambda m, i, l: jnp.argmax(m(i, l), axis=-1))(model, t_ids, t_len))
    valid = np.arange(t_ids.shape[1])[None, :] < t_len[:, None]

    # memoryless baseline: each word's most frequent training tag
    counts = np.zeros((len(vocab), len(TAGS)), np.int64)
    tr_valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    np.add.at(counts, (ids[tr_valid], tags[tr_valid]), 1)
    base = np.argmax(counts, axis=1)[t_ids]

    def acc(p, which):
        m = valid & np.isin(t_tags, [TAG[t] for t in which])
        return float(np.mean(p[m] == t_tags[m]))

    slots = TAGS[1:]
    res = {
        "slot_accuracy": acc(pred, slots),
        "time_accuracy": acc(pred, ["depart_time", "arrive_time"]),
        "city_accuracy": acc(pred, ["from_city", "to_city"]),
        "baseline_time_accuracy": acc(base, ["depart_time", "arrive_time"]),
        "baseline_city_accuracy": acc(base, ["from_city", "to_city"]),
    }
    inv = {i: w for w, i in vocab.items()}
    n0 = int(t_len[0])
    res["example"] = " ".join(
        f"{inv[int(w)]}/{TAGS[int(t)]}" if t else inv[int(w)]
        for w, t in zip(t_ids[0, :n0], pred[0, :n0], strict=True)
    )
    print(f"slot tokens: accuracy {res['slot_accuracy']:.3f}")
    print(
        f"times (depart vs arrive, cue far away): {res['time_accuracy']:.3f} "
        f"(memoryless baseline {res['baseline_time_accuracy']:.3f})"
    )
    print(
        f"cities (from vs to): {res['city_accuracy']:.3f} "
        f"(memoryless baseline {res['baseline_city_accuracy']:.3f})"
    )
    print("example: " + res["example"])
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=32)
    a = ap.parse_args()
    main(steps=a.steps, hidden=a.hidden)
