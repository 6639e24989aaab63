"""Record the golden float64 numerics of seqjax 0.1 (run once, on the 0.1 code, before the redesign).

    python scripts/make_golden.py        # writes tests/data/golden_0_1.npz

What is recorded and how it is recomputed lives in ``tests/golden.py``.
"""

import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)
root = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "tests"))

import numpy as np  # noqa: E402
from golden import compute_all  # noqa: E402

if __name__ == "__main__":
    arrays = compute_all()
    path = root / "tests" / "data" / "golden_0_1.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {len(arrays)} arrays to {path}")
