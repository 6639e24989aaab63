"""Character-level language model with text generation.

An LSTM reads text one character at a time (one-hot inputs) and predicts the next
character through a linear readout on every step (``many_to_many``). The text is Python
standard-library source code (offline, always available). We report bits per character on
held-out text against the memoryless (unigram) baseline, then sample new text with
``seqjax.seq2seq.generate`` (one ``unroll`` under ``jit``, the sampled character fed back).

Run:  python examples/char_lm.py            (about two minutes on 2 CPU cores)
      python examples/char_lm.py --steps 3000 --hidden 256   (better text, longer)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import seqjax as sj
from seqjax import tasks
from seqjax.layers import dense
from seqjax.losses import softmax_cross_entropy
from seqjax.seq2seq import generate, many_to_many
from seqjax.train import Logging, clipped_adam, fit


def main(
    steps: int = 1500,
    hidden: int = 128,
    seq_len: int = 64,
    batch: int = 32,
    max_chars: int = 300_000,
    gen_chars: int = 300,
    prompt: str = "def ",
    temperature: float = 0.7,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the character model and generate text.

    Args:
      steps: Adam steps.
      hidden: LSTM units.
      seq_len: characters per training window (truncated BPTT length).
      batch: windows per step.
      max_chars: use the first ``max_chars`` characters of the corpus.
      gen_chars: characters to generate.
      prompt: the text the generation starts from.
      temperature: sampling temperature (0: greedy).
      seed: random seed.
      progress: show a progress bar.

    Returns:
      ``{"valid_bpc", "unigram_bpc", "sample"}``.
    """
    text = tasks.stdlib_text()[:max_chars]
    corpus = tasks.char_corpus(text)
    V = len(corpus.vocab)
    print(f"corpus: {len(text):,} characters of Python source, vocabulary {V}")

    cell = sj.lstm(hidden, forget_bias=1.0)
    model = many_to_many(cell, dense(V))
    k_init, k_fit, k_gen = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init, V)

    def loss_fn(p, batch):
        x, y = batch  # (B, T) int ids each; y is x shifted by one character
        logits = model.apply(p, jax.nn.one_hot(x, V))
        return softmax_cross_entropy(logits, y)  # nats per character

    data = tasks.char_windows(corpus.train, seq_len)
    result = fit(
        loss_fn,
        clipped_adam(3e-3),
        params,
        data,
        key=k_fit,
        steps=steps,
        batch_size=min(batch, len(data[0])),
        logging=Logging(every=max(1, steps // 10), progress=progress),
        mesh=None,
    )
    params = result.state.params

    vx, vy = tasks.char_windows(corpus.valid, min(seq_len, len(corpus.valid) - 1))
    bpc = jax.jit(lambda p, x, y: tasks.bits_per_char(model.apply(p, jax.nn.one_hot(x, V)), y))
    valid_bpc = float(bpc(params, vx, vy))
    unigram = tasks.unigram_bits_per_char(corpus.train, corpus.valid, V)
    print(f"validation: {valid_bpc:.3f} bits/char (unigram baseline {unigram:.3f})")

    lut = {c: i for i, c in enumerate(corpus.vocab)}
    prompt = "".join(c for c in prompt if c in lut) or corpus.vocab[0]
    prompt_ids = jnp.asarray([lut[c] for c in prompt], jnp.int32)
    head = dense(V)

    @jax.jit
    def sample(p, key):
        return generate(
            cell,
            p["body"],
            lambda y: head.apply(p["head"], y),
            jax.nn.one_hot(prompt_ids, V)[None],  # (1, P, V)
            gen_chars,
            key=key,
            temperature=temperature,
        )[1]

    tokens = sample(params, k_gen)[0]
    generated = "".join(corpus.vocab[int(t)] for t in tokens)
    print("sample:\n" + prompt + generated)
    return {"valid_bpc": valid_bpc, "unigram_bpc": unigram, "sample": generated}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--gen-chars", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.7)
    a = ap.parse_args()
    main(steps=a.steps, hidden=a.hidden, seq_len=a.seq_len, gen_chars=a.gen_chars, temperature=a.temperature)
