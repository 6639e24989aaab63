"""seqjax benchmark suite: speed, memory, spectrum and task tables.

Run from the repository root::

    python -m benchmarks                     # every sub-suite, full sizes
    python -m benchmarks speed --quick       # one sub-suite, quick sizes
    python -m benchmarks --quick --plot      # everything quick, with PNG figures

Each sub-suite writes ``benchmarks/results/<suite>.json`` (machine, versions, raw times)
and ``benchmarks/results/<suite>.md`` (the tables). The protocol is in
``benchmarks/README`` section of the project README: peers in the same process, compile
time apart, at least 10 timed repetitions (full mode), ratios peer / seqjax, correctness
checked against an independent peer before any time is reported.

Sub-suites (modules of this package):

- ``speed``: forward and forward+backward of Elman / LSTM / GRU against Flax, Equinox, a
  textbook ``lax.scan`` and PyTorch.
- ``profile``: where seqjax's forward+backward time goes (the per-step matmuls in a bare
  scan, the weight-gradient GEMMs, the rest) beside PyTorch's whole pass.
- ``memory``: peak memory of forward+backward against sequence length, with and without
  rematerialisation, beside PyTorch.
- ``spectrum``: step Jacobians and Lyapunov spectra against what a user would write.
- ``tasks``: adding / copy problems and real-data tasks, with the Jacobian story.
- ``analysis``: per-call time of the analysis functions (Lyapunov spectrum, step Jacobians,
  gradient norms, gradient-flow report) over a sweep of checkpoints, eager against one user
  ``jax.jit``.
- ``checks``: the cost of the opt-in in-graph ``lengths`` check (``seqjax.unroll.checked``)
  of a jitted LSTM unroll and a ``value_and_grad`` step, against the unchecked default.
"""

__all__ = ["SUITES", "main"]

SUITES = ("speed", "profile", "memory", "spectrum", "tasks", "analysis", "checks")


def main(argv=None) -> int:
    """Entry point of ``python -m benchmarks`` (see ``benchmarks.cli.main``)."""
    from benchmarks.cli import main as _main

    return _main(argv)
