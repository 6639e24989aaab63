"""Float64 NumPy references written from each cell's equations, one step at a time.

Independent of seqjax's implementation: plain loops over time, written from the
docstring equations (row-vector convention ``x @ W``). Used as oracles by the tests.
"""

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


ACT = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z >= 0, z, 0.01 * z),
    "identity": lambda z: z,
}


def np_params(params):
    """Params pytree -> dict of float64 NumPy arrays (dicts only)."""
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def rnn_step(p, h, x, activation="tanh"):
    net = x @ p["w_x"] + h @ p["w_h"] + p["b"] + p.get("b_h", 0.0)
    return ACT[activation](net)


def lstm_step(p, h, c, x):
    H = c.shape[-1]
    z = x @ p["w_x"] + h @ p["w_h"] + p["b"] + p.get("b_h", 0.0)
    i, f, g, o = (z[..., k * H : (k + 1) * H] for k in range(4))
    i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
    c = f * c + i * g
    h = o * np.tanh(c)
    if "w_p" in p:
        h = h @ p["w_p"]
    return h, c


def gru_step(p, h, x):
    H = h.shape[-1]
    W_xr, W_xz, W_xn = (p["w_x"][:, k * H : (k + 1) * H] for k in range(3))
    W_hr, W_hz, W_hn = (p["w_h"][:, k * H : (k + 1) * H] for k in range(3))
    b_r, b_z, b_n = (p["b"][k * H : (k + 1) * H] for k in range(3))
    b_hr, b_hz, b_hn = (p["b_h"][k * H : (k + 1) * H] for k in range(3))
    r = sigmoid(x @ W_xr + b_r + h @ W_hr + b_hr)
    z = sigmoid(x @ W_xz + b_z + h @ W_hz + b_hz)
    n = np.tanh(x @ W_xn + b_n + r * (h @ W_hn + b_hn))
    return (1 - z) * n + z * h


def mgu_step(p, h, x):
    H = h.shape[-1]
    f = sigmoid(x @ p["w_x"][:, :H] + h @ p["w_h"][:, :H] + p["b"][:H])
    n = np.tanh(x @ p["w_x"][:, H:] + (f * h) @ p["w_h"][:, H:] + p["b"][H:])
    return (1 - f) * h + f * n


def janet_step(p, h, x, beta=1.0):
    H = h.shape[-1]
    s = x @ p["w_x"][:, :H] + h @ p["w_h"][:, :H] + p["b"][:H]
    ct = np.tanh(x @ p["w_x"][:, H:] + h @ p["w_h"][:, H:] + p["b"][H:])
    return sigmoid(s) * h + (1 - sigmoid(s - beta)) * ct


def tdnn_run(p, xs, K, activation="tanh"):
    """xs: (B, T, I) -> ys (B, T, H): y_t = f([x_{t-K+1}..x_t] W + b), zeros before t=0."""
    B, T, I = xs.shape
    pad = np.concatenate([np.zeros((B, K - 1, I)), xs], axis=1)
    ys = []
    for t in range(T):
        win = pad[:, t : t + K, :].reshape(B, K * I)
        ys.append(ACT[activation](win @ p["w"] + p["b"]))
    return np.stack(ys, axis=1)


def narx_run(p, xs, K, L, activation="tanh"):
    B, T, I = xs.shape
    O = p["b"].shape[0]
    pad = np.concatenate([np.zeros((B, K - 1, I)), xs], axis=1)
    past = [np.zeros((B, O)) for _ in range(L)]  # oldest first
    ys = []
    for t in range(T):
        xw = pad[:, t : t + K, :].reshape(B, K * I)
        yw = np.concatenate(past[-L:], axis=-1)
        y = ACT[activation](xw @ p["w_x"] + yw @ p["w_y"] + p["b"])
        ys.append(y)
        past.append(y)
    return np.stack(ys, axis=1)


def run_h(step, p, xs, h0, **kw):
    """Run a single-state step over xs: (B, T, I); returns (h_T, ys: (B, T, H))."""
    h = h0
    ys = []
    for t in range(xs.shape[1]):
        h = step(p, h, xs[:, t], **kw)
        ys.append(h)
    return h, np.stack(ys, axis=1)
