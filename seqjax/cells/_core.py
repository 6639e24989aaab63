"""The cell type, its capabilities, and the helpers every family module shares.

The whole contract of a cell, in one place (``docs/design/cells.md`` has the reasoning):

```text
cell = Cell(init, initial_carry, step, *, output=None, jacobian=None,
            jacobian_diagonal=None, kernel=None, gates=None, input_size=None,
            jacobian_bound=None, recurrent_blocks=None, linear_recurrence=None,
            meta=None)
params = cell.init(key, input_size)              # a pytree of arrays
carry = cell.initial_carry(params, batch_shape)  # a pytree of zeros, leaves (*batch, ...)
carry, y_t = cell.step(params, carry, x_t)       # x_t: (*batch, input_size)
```

Optional capabilities (``None`` when absent; generic drivers use them, never a kind string;
a generic fallback computes the same thing to float tolerance):

    output(params, carry_t, x_t) -> y_t                   how y_t is read from the new carry
    jacobian(params, carry_tm1, x_t) -> (S, S)            d s_t / d s_{t-1}, one unbatched carry
    jacobian_diagonal(params, carry_tm1, x_t) -> (S,)     its diagonal
    kernel: Kernel(run, accepts)                          a fused BPTT kernel over a sequence
    gates(params, carry_tm1, x_t) -> dict                 this step's gate activations
    input_size(params) -> int                             the I the params were made for
    jacobian_bound(params) -> (sigma, gamma)              ||J_t||_2 <= sigma * gamma everywhere
    recurrent_blocks(params) -> {gate: (R, H)}            each gate's recurrent matrix W_h^g
    linear_recurrence(params, x_t) -> (A_t, b_t)          s_t = A_t s_{t-1} + b_t exactly

``s`` is the carry flattened in tree-leaf order (``seqjax.spectrum.flatten_state``).
``recurrent_blocks`` maps each gate (named as ``gates`` names it, in the cell's gate order)
to the matrix its pre-activation applies to the recurrent state, row-vector convention:
``net_g = x_t W_x^g + h_{t-1} W_h^g + b_g`` with ``W_h^g: (R, H)``, ``R`` the width of the
state it multiplies (``H``, or ``P`` for a projected LSTM). A cell documents what the block
means where the recurrent term is gated (the GRU's ``n``: ``r * (h W_h^n + b_h^n)``).
``linear_recurrence`` is carried only by a cell that is linear in its state: for one
unbatched input ``x_t: (I,)`` it returns ``A_t``, either ``(S,)`` (a diagonal, acting
elementwise) or ``(S, S)`` (dense), and ``b_t: (S,)``, such that the step is exactly
``s_t = A_t s_{t-1} + b_t`` at every carry. ``A_t`` and ``b_t`` do not depend on the carry,
so ``A_t`` (or ``diag(A_t)``) is also the step Jacobian, and one Newton (DEER) step on the
stacked residuals is exact from any guess.
Every capability is written for one ``step``: ``cell._replace(step=...)`` with a different
step drops every step capability (all but ``input_size``) not replaced in the same call, so
none goes stale; ``_replace(init=...)`` drops ``input_size`` likewise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import initializers as inits
from seqjax._util import Bound, bind, positive_int

__all__ = [
    "Cell",
    "CellMeta",
    "Kernel",
    "KERNEL_OPTIONS",
    "CAPABILITIES",
    "get_activation",
    "wrap",
]

Params = Any
Carry = Any

KERNEL_OPTIONS = frozenset({"mask", "resets", "truncate", "reverse", "trajectory"})
"""Options a kernel may accept: ``mask`` (held steps; also ``lengths``), ``resets``,
``truncate`` (the ``keep`` flags of truncated BPTT), ``reverse``, ``trajectory`` (return
every step's carry). A request with an option outside ``Kernel.accepts`` runs on autodiff."""

CAPABILITIES = (
    "output",
    "jacobian",
    "jacobian_diagonal",
    "kernel",
    "gates",
    "input_size",
    "jacobian_bound",
    "recurrent_blocks",
    "linear_recurrence",
)
_STEP_CAPABILITIES = (
    "output",
    "jacobian",
    "jacobian_diagonal",
    "kernel",
    "gates",
    "jacobian_bound",
    "recurrent_blocks",
    "linear_recurrence",
)


@dataclasses.dataclass(frozen=True)
class CellMeta:
    """A description of a cell for people (reprs, reports): never read to choose a code path.

    Attributes:
      name: e.g. ``"lstm"``; shown in reports.
      hidden_size: ``H``, the number of hidden units (output size for TDNN/NARX).
      options: the constructor's options, a tuple of ``(name, value)`` pairs (hashable).
    """

    name: str
    hidden_size: int
    options: tuple = ()

    def option(self, name: str, default: Any = None) -> Any:
        """One constructor option by name."""
        return dict(self.options).get(name, default)


class Kernel(NamedTuple):
    """A fused BPTT kernel: how a cell runs a whole sequence with its own gradient.

    Attributes:
      run: ``run(params, carry0, xs, *, mask=None, resets=None, keep=None, reverse=False,
        unroll=1, trajectory=False) -> (final_carry, ys, carries)``. Time-major, every
        floating array already in the compute dtype: ``xs: (T, *batch, I)``, ``mask`` and
        ``resets``: bool ``(T, *batch)`` or ``None``, ``keep: (T,)`` (0 where truncated BPTT
        cuts the gradient through the carry entering step ``t``) or ``None``;
        ``ys: (T, *batch, O)`` with zeros where ``mask`` is false; ``carries`` (leaves
        ``(T, *batch, ...)``) only when ``trajectory``, else ``None``. Must equal the scan of
        ``step`` under the same options (values and gradients; ``check_cell`` checks it).
      accepts: the options of ``KERNEL_OPTIONS`` it implements; a request for any other runs
        on autodiff of the plain scan instead.
    """

    run: Callable
    accepts: frozenset = KERNEL_OPTIONS


class _CellFields(NamedTuple):
    init: Callable[..., Params]
    initial_carry: Callable[..., Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    output: Callable | None = None
    jacobian: Callable | None = None
    jacobian_diagonal: Callable | None = None
    kernel: Kernel | None = None
    gates: Callable | None = None
    input_size: Callable | None = None
    jacobian_bound: Callable | None = None
    recurrent_blocks: Callable | None = None
    linear_recurrence: Callable | None = None
    meta: CellMeta | None = None


class Cell(_CellFields):
    """A recurrent cell: three pure functions and optional capabilities.

    Attributes:
      init: ``(key, input_size) -> params``, a pytree of arrays.
      initial_carry: ``(params, batch_shape=()) -> carry``, zeros with leaves
        ``(*batch_shape, ...)`` in the dtype of the params.
      step: ``(params, carry, x_t) -> (carry, y_t)`` with ``x_t: (*batch, input_size)``.
      output: ``(params, carry_t, x_t) -> y_t``: how the step's output is read from the carry
        it returns (and its input). Analysis tools differentiate through it; ``None`` when the
        output is not a function of the new carry.
      jacobian: ``(params, carry_tm1, x_t) -> J: (S, S)``, ``J[i, j] = ds_t[i]/ds_{t-1}[j]``
        at one unbatched carry and input.
      jacobian_diagonal: ``(params, carry_tm1, x_t) -> (S,)``, the diagonal of ``J``.
      kernel: a ``Kernel`` (fused BPTT).
      gates: ``(params, carry_tm1, x_t) -> dict`` of the step's gate activations.
      input_size: ``(params) -> I``.
      jacobian_bound: ``(params) -> (sigma, gamma)`` with ``||J_t||_2 <= sigma * gamma`` at
        every state and input (Pascanu et al. 2013: ``sigma = sigma_max(W_h)``,
        ``gamma = sup |f'|`` for the Elman cell).
      recurrent_blocks: ``(params) -> dict[str, (R, H)]``: gate name -> that gate's recurrent
        matrix ``W_h^g`` in the row-vector convention, ``net_g = x_t W_x^g + h_{t-1} W_h^g
        + b_g`` (``d net_g / d h_{t-1} = (W_h^g)^T``), in the cell's gate order and with the
        names of ``gates`` where the cell has both. ``R`` is the width of the state the
        block multiplies (``H``; ``P`` for an LSTM with projection). Where the recurrent
        term is gated (the GRU's ``r * (h W_h^n + b_h^n)``, the MGU's ``(f * h) W_h^n``) the
        block is the matrix inside the product, as the cell documents. Used by
        ``seqjax.spectrum.gates.gate_spectra``.
      linear_recurrence: ``(params, x_t) -> (A_t, b_t)`` for a cell linear in its state:
        with ``x_t: (I,)`` unbatched and ``s`` the flattened carry (``S``), the step is
        exactly ``s_t = A_t s_{t-1} + b_t`` at every carry, ``A_t: (S,)`` (a diagonal,
        elementwise) or ``(S, S)`` (dense), ``b_t: (S,)``. Neither depends on the carry, so
        ``A_t`` is the step Jacobian and parallel-in-time solvers are exact in one step.
      meta: a ``CellMeta`` for display; never read to choose a code path.

    Cells compare by value: built twice with the same arguments they are equal and hash
    alike, so a cell can be a static argument of ``jax.jit``.
    """

    __slots__ = ()

    def __new__(
        cls,
        init,
        initial_carry,
        step,
        *,
        output=None,
        jacobian=None,
        jacobian_diagonal=None,
        kernel=None,
        gates=None,
        input_size=None,
        jacobian_bound=None,
        recurrent_blocks=None,
        linear_recurrence=None,
        meta=None,
    ):
        if kernel is not None and not isinstance(kernel, Kernel):
            raise TypeError(
                f"Cell: kernel must be a seqjax.Kernel(run, accepts), got {type(kernel).__name__}."
            )
        if kernel is not None and not isinstance(kernel.accepts, frozenset):
            kernel = kernel._replace(accepts=frozenset(kernel.accepts))
        if kernel is not None and not kernel.accepts <= KERNEL_OPTIONS:
            raise ValueError(
                f"Cell: kernel.accepts holds unknown options {sorted(kernel.accepts - KERNEL_OPTIONS)}; "
                f"known: {sorted(KERNEL_OPTIONS)}."
            )
        return super().__new__(
            cls,
            init,
            initial_carry,
            step,
            output,
            jacobian,
            jacobian_diagonal,
            kernel,
            gates,
            input_size,
            jacobian_bound,
            recurrent_blocks,
            linear_recurrence,
            meta,
        )

    def _replace(self, **changes) -> Cell:
        """A copy with fields replaced. Replacing ``step`` drops every capability that is not
        replaced in the same call (they were written for the old step); replacing ``init``
        drops ``input_size`` likewise."""
        if "step" in changes and not _same_function(changes["step"], self.step):
            for name in _STEP_CAPABILITIES:
                changes.setdefault(name, None)
        if "init" in changes and not _same_function(changes["init"], self.init):
            changes.setdefault("input_size", None)
        return Cell(**{**self._asdict(), **changes})

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild the tuple without the keyword-only constructor.
        return (Cell._make, (tuple(self),))

    @property
    def label(self) -> str:
        """A name for messages and reports (``meta.name``, else ``"Cell"``)."""
        return self.meta.name if self.meta is not None else "Cell"

    def capabilities(self) -> tuple[str, ...]:
        """The names of the capabilities this cell carries."""
        return tuple(name for name in CAPABILITIES if getattr(self, name) is not None)

    def __repr__(self) -> str:
        caps = ", ".join(self.capabilities())
        return (
            f"{self.label}(H={self.meta.hidden_size if self.meta else '?'}; capabilities: {caps or 'none'})"
        )


def _same_function(new, old) -> bool:
    """Identity, or equal ``Bound`` values (never a user's ``__eq__``, which may return arrays)."""
    return new is old or (isinstance(new, Bound) and isinstance(old, Bound) and new == old)


# A Cell is a pytree node whose children are its fields (functions are leaves, as in 0.1);
# JAX rebuilds it with Cell._make, since the constructor's capabilities are keyword-only.
def _cell_flatten(cell: Cell) -> tuple[tuple[Any, ...], None]:
    return tuple(cell), None


def _cell_unflatten(aux: None, children: tuple[Any, ...]) -> Cell:
    del aux
    return Cell._make(children)


jax.tree_util.register_pytree_node(Cell, _cell_flatten, _cell_unflatten)


# --------------------------------------------------------------------------- activations (the one table)


def _identity(z):
    return z


def _d_tanh(h):
    return 1.0 - h * h


def _d_relu(h):
    return (h > 0).astype(h.dtype)


def _d_leaky_relu(h):
    return jnp.where(h >= 0, jnp.ones_like(h), jnp.full_like(h, 0.01))


def _d_sigmoid(h):
    return h * (1.0 - h)


def _d_identity(h):
    return jnp.ones_like(h)


# name -> (f, f' written in terms of the output h = f(net), sup |f'|); the fused kernels read
# f' off h, the gradient-flow bound uses sup |f'|.
_ACTIVATIONS: dict[str, tuple[Callable, Callable, float]] = {
    "tanh": (jnp.tanh, _d_tanh, 1.0),
    "relu": (jax.nn.relu, _d_relu, 1.0),
    "leaky_relu": (jax.nn.leaky_relu, _d_leaky_relu, 1.0),
    "identity": (_identity, _d_identity, 1.0),
    "linear": (_identity, _d_identity, 1.0),
    "sigmoid": (jax.nn.sigmoid, _d_sigmoid, 0.25),
}


def get_activation(activation: str | Callable) -> Callable[[jax.Array], jax.Array]:
    """Resolve an activation name (``tanh``, ``relu``, ``leaky_relu``, ``identity``,
    ``linear``, ``sigmoid``) or pass a callable through."""
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation][0]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}."
        ) from None


def activation_derivative_from_output(activation: str | Callable) -> Callable | None:
    """``h -> f'(net)`` for a named activation (``h = f(net)``), ``None`` for a callable."""
    if callable(activation):
        return None
    get_activation(activation)
    return _ACTIVATIONS[activation][1]


# --------------------------------------------------------------------------- checks and small helpers


def activation_gamma(activation: str | Callable) -> float | None:
    """``sup |f'|`` of a named activation, ``None`` for a callable."""
    if callable(activation):
        return None
    get_activation(activation)
    return _ACTIVATIONS[activation][2]


def check_hidden(hidden_size: int, name: str = "hidden_size") -> int:
    return positive_int(hidden_size, name)


def check_input_size(input_size: int) -> int:
    return positive_int(input_size, "input_size", " (the number of features of x_t)")


def check_step_input(cell: str, x: jax.Array, fan_in: int, batch_shape: tuple[int, ...]) -> None:
    """Trace-time checks of one step's input against the params and the carry."""
    if x.ndim < 1 or x.shape[-1] != fan_in:
        raise ValueError(
            f"{cell}: x_t has shape {tuple(x.shape)} but the params expect {fan_in} features "
            f"(x_t must be (*batch, {fan_in})); check input_size at init."
        )
    if tuple(x.shape[:-1]) != tuple(batch_shape):
        raise ValueError(
            f"{cell}: x_t has batch shape {tuple(x.shape[:-1])} but the carry has batch shape "
            f"{tuple(batch_shape)}; make the carry with cell.initial_carry(params, {tuple(x.shape[:-1])})."
        )


def check_carry_width(cell: str, name: str, arr: jax.Array, width: int) -> None:
    if arr.ndim < 1 or arr.shape[-1] != width:
        raise ValueError(f"{cell}: carry {name} has shape {tuple(arr.shape)} but needs (*batch, {width}).")


def add_bias(z: jax.Array, b: jax.Array) -> jax.Array:
    """``z + b`` with ``b: (N,)`` broadcast explicitly over the batch dims of ``z: (*batch, N)``
    (no implicit rank promotion, so cells work under ``jax_numpy_rank_promotion="raise"``)."""
    return z + b.reshape((1,) * (z.ndim - 1) + b.shape)


def param_dtype(params: Any) -> jnp.dtype:
    """The promoted dtype of the floating leaves of ``params`` (float32 when there are none)."""
    leaves = [
        a for a in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
    ]
    return jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)


def batch_shape_of(batch_shape) -> tuple[int, ...]:
    if isinstance(batch_shape, (int, np.integer)):
        return (int(batch_shape),)
    return tuple(int(b) for b in batch_shape)


def resolve_init(init, fallback):
    """A user's initialiser, or ``fallback`` when ``None``."""
    return fallback if init is None else inits._as_initializer(init, "initializer")


def gated_params(
    key,
    input_size: int,
    hidden_size: int,
    gates: int,
    kernel_init,
    recurrent_init,
    bias_init,
    hidden_bias: bool,
    recurrent_rows: int | None = None,
) -> dict[str, jax.Array]:
    """``{"w_x": (I, G*H), "w_h": (R, G*H), "b": (G*H,)[, "b_h": (G*H,)]}`` (PyTorch's defaults)."""
    input_size = check_input_size(input_size)
    u = inits.pytorch_uniform(hidden_size)
    kernel_init, recurrent_init, bias_init = (
        resolve_init(kernel_init, u),
        resolve_init(recurrent_init, u),
        resolve_init(bias_init, u),
    )
    rows = hidden_size if recurrent_rows is None else recurrent_rows
    k_x, k_h, k_b, k_bh = jax.random.split(key, 4)
    params = {
        "w_x": kernel_init(k_x, (input_size, gates * hidden_size), jnp.float32),
        "w_h": recurrent_init(k_h, (rows, gates * hidden_size), jnp.float32),
        "b": bias_init(k_b, (gates * hidden_size,), jnp.float32),
    }
    if hidden_bias:
        params["b_h"] = bias_init(k_bh, (gates * hidden_size,), jnp.float32)
    return params


def column_blocks(params: Mapping, *, names: tuple[str, ...], key: str = "w_h") -> dict[str, jax.Array]:
    """``params[key]: (R, G*H)`` split into its ``G = len(names)`` column blocks ``(R, H)``,
    block ``k`` named ``names[k]``: the ``recurrent_blocks`` of a cell that stores its gates'
    recurrent matrices side by side (its own layout, read by its own module)."""
    w = params[key]
    H = w.shape[-1] // len(names)
    return {name: w[:, k * H : (k + 1) * H] for k, name in enumerate(names)}


def zeros_carry(params, batch_shape, *widths):
    dtype = param_dtype(params)
    batch_shape = batch_shape_of(batch_shape)
    return [jnp.zeros(batch_shape + (w,), dtype) for w in widths]


def rows_of(params: Mapping, *, key: str = "w_x", per: int = 1) -> int:
    """``params[key].shape[0] // per``: the input size read off a kernel."""
    return int(params[key].shape[0]) // per


def carry_h(params, carry, x):
    """The output rule ``y_t = h_t`` of a carry that is ``h`` itself."""
    del params, x
    return carry


def carry_field_h(params, carry, x):
    """The output rule ``y_t = carry.h``."""
    del params, x
    return carry.h


# ---------------------------------------------------------------- wrap: capabilities through a wrapper


def _identity_params(p):
    return p


def _wrapped_step(params, carry, x, *, cell, get, inputs):
    return cell.step(get(params), carry, x if inputs is None else inputs(x))


def _wrapped_cap(params, carry, x, *, cap, get, inputs):
    return cap(get(params), carry, x if inputs is None else inputs(x))


def _wrapped_linear(params, x, *, cap, get, inputs):
    return cap(get(params), x if inputs is None else inputs(x))


def _wrapped_initial_carry(params, batch_shape=(), *, cell, get):
    return cell.initial_carry(get(params), batch_shape)


def _wrapped_params_only(params, *, cap, get):
    return cap(get(params))


def _wrapped_run(params, carry0, xs, *, run, get, inputs, **options):
    return run(get(params), carry0, xs if inputs is None else inputs(xs), **options)


def wrap(
    cell: Cell,
    *,
    params: Callable | None = None,
    inputs: Callable | None = None,
    init: Callable | None = None,
    initial_carry: Callable | None = None,
    meta: CellMeta | None = None,
) -> Cell:
    r"""A cell around ``cell`` that maps its params and inputs, keeping every capability.

    The new step is ``cell.step(params(p), carry, inputs(x_t))``; each capability of
    ``cell`` (output rule, Jacobian, its diagonal, fused kernel, gates) is passed through with
    the same substitution, so it stays exact: the Jacobian with respect to the carry does not
    change when the params or the input are mapped (the chain rule only adds factors for
    them, which ``jax.grad`` handles through ``params``/``inputs``). ``linear_recurrence``
    becomes ``cell.linear_recurrence(params(p), inputs(x_t))``: the step is still
    ``A s + b`` with the same substituted ``A`` and ``b``. The params-only
    capabilities (``jacobian_bound``, ``recurrent_blocks``) read ``params(p)``: mapping the
    input does not touch the recurrent term ``h_{t-1} W_h``. This is the
    ``optax.chain`` of cells: ``learnable_carry`` is built with it, and so can a user's
    wrapper (input scaling, weight sharing, a params layout of one's own).

    Args:
      cell: the inner cell.
      params: ``outer_params -> inner_params`` (default: the same params).
      inputs: ``x -> x'`` acting on the last axis of ``(..., I)`` arrays (it is applied to
        one step's ``(*batch, I)`` and to a whole ``(T, *batch, I)`` sequence alike). When it
        changes the number of features, pass ``init`` for the outer input size too; the
        ``input_size`` capability is dropped whenever ``inputs`` is given.
      init: ``(key, input_size) -> outer_params`` (default ``cell.init``; needed when
        ``params`` is given).
      initial_carry: ``(outer_params, batch_shape) -> carry`` (default: the inner cell's on
        ``params(p)``).
      meta: a description (default the inner cell's).

    Returns:
      A ``Cell`` carrying every capability of ``cell`` (``jacobian_bound`` and
      ``recurrent_blocks`` through ``params``, ``linear_recurrence`` through both maps).
      Built twice with equal arguments (the same functions), the results are equal.

    Examples:
      >>> import seqjax
      >>> doubled = seqjax.cells.wrap(seqjax.lstm(4), inputs=lambda x: 2.0 * x)
      >>> doubled.kernel is not None          # the fused LSTM kernel is kept
      True
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"wrap: cell must be a seqjax.Cell, got {type(cell).__name__}.")
    if params is not None and init is None:
        raise ValueError("wrap: a params map needs init=(key, input_size) -> outer params.")
    get = _identity_params if params is None else params
    caps: dict[str, Any] = {}
    for name in ("output", "jacobian", "jacobian_diagonal", "gates"):
        cap = getattr(cell, name)
        caps[name] = None if cap is None else bind(_wrapped_cap, cap=cap, get=get, inputs=inputs)
    if cell.kernel is not None:
        caps["kernel"] = Kernel(
            bind(_wrapped_run, run=cell.kernel.run, get=get, inputs=inputs), cell.kernel.accepts
        )
    if cell.input_size is not None and inputs is None:
        caps["input_size"] = bind(_wrapped_params_only, cap=cell.input_size, get=get)
    for name in ("jacobian_bound", "recurrent_blocks"):
        cap = getattr(cell, name)
        if cap is not None:
            caps[name] = bind(_wrapped_params_only, cap=cap, get=get)
    if cell.linear_recurrence is not None:
        caps["linear_recurrence"] = bind(_wrapped_linear, cap=cell.linear_recurrence, get=get, inputs=inputs)
    return Cell(
        cell.init if init is None else init,
        bind(_wrapped_initial_carry, cell=cell, get=get) if initial_carry is None else initial_carry,
        bind(_wrapped_step, cell=cell, get=get, inputs=inputs),
        meta=cell.meta if meta is None else meta,
        **caps,
    )
