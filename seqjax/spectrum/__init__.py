r"""Jacobian spectra of recurrent cells: step Jacobians, stable products, Lyapunov exponents.

The recurrent state ``s`` is the *whole* carry flattened to a vector (leaves in tree order,
each raveled): for the Elman RNN ``s = h`` (``S = H``), for the LSTM ``s = [h, c]``
(``S = 2H``; a Jacobian of ``h`` alone would miss the cell-state path
``dc_t/dc_{t-1} = diag(f_t)``), for a user's cell whatever its carry holds. Along a
trajectory ``s_t = F(s_{t-1}, x_t)`` the objects are:

```text
J_t   = ds_t/ds_{t-1}            (S, S)   step Jacobian, J[i, j] = ds_t[i]/ds_{t-1}[j]
B_t   = ds_t/dx_t                (S, I)   input Jacobian
ds_T/ds_k = J_T J_{T-1} ... J_{k+1}        the factor that carries gradients back in time
```

Our cells act on row vectors (``h_t = f(x_t W_x + h_{t-1} W_h + b)``), so for the Elman
RNN ``J_t = diag(f'(net_t)) W_h^T``. Backpropagated errors obey
``dE/ds_k = dE/ds_T · ds_T/ds_k``: the norms of these products decide whether gradients
vanish or explode (Pascanu, Mikolov & Bengio 2013). Their asymptotic growth rates are the
Lyapunov exponents ``lambda_1 >= ... >= lambda_S`` (per step, natural log), computed here by
the QR method of Benettin et al. (1980) and Shimada & Nagashima (1979), never by forming the
raw product, which overflows float32 within a few hundred steps of a chaotic network and
underflows for a contracting one.

Everything is a pure JAX function: it runs under ``jit`` on CPU and GPU, batched over
sequences, in float32 or float64 (``jax.config.update("jax_enable_x64", True)`` and float64
params). The trajectory comes from ``seqjax.trajectory`` (``seqjax.unroll``, the one place a
cell is scanned over a sequence); the functions here then scan over the precomputed states
(QR iterations) or ``vmap`` over them (Jacobians).

General (non-symmetric) eigendecomposition exists in JAX on CPU and GPU only. On TPU,
``eigvals``/``eig`` here (and every function that uses them) compute it on the host
through ``jax.pure_callback`` and NumPy; pass ``host=True`` to force that anywhere.
Everything else (QR, SVD, Lyapunov exponents, norms) runs on every backend.

Fixed and slow points of the autonomous map ``s -> F(s, x)`` and their linearisation
(Sussillo & Barak 2013) live here too (``find_fixed_points``).

Modules (every public name is re-exported here; import from ``seqjax.spectrum``):

- ``state``: the state vector: ``flatten_state``, ``unflatten_state``, ``state_size``, and
  the flattened step ``F(s, x)``;
- ``jacobians``: step and input Jacobians along a trajectory: ``step_jacobian``,
  ``input_jacobian``, ``step_jacobians``, ``StepJacobians``;
- ``linalg``: eigen/singular spectra of matrices (host fallback on TPU): ``eigvals``,
  ``eig``, ``step_spectra``, ``spectral_radii``;
- ``products``: stable products of Jacobians: ``lag_log_norms``,
  ``product_singular_values``, ``product_eigenvalues``;
- ``lyapunov``: Lyapunov exponents (QR method): ``lyapunov_spectrum``,
  ``lyapunov_from_jacobians``, ``LyapunovSpectrum``;
- ``matrix_free``: spectra of one Jacobian from JVPs: ``top_singular_values``,
  ``top_eigenvalues``;
- ``report``: ``gradient_flow_report``, ``GradientFlowReport``;
- ``fixed_points``: fixed and slow points: ``find_fixed_points``, ``FixedPoints``,
  ``sample_states``, ``speed``, ``linearize``;
- ``gates``: the recurrent spectra of each gate's block: ``gate_spectra``, ``GateSpectrum``;
- ``models``: the recurrent cores of a whole model (``many_to_one``, ``encoder_decoder``,
  layers, NNX modules), which every trajectory-based tool accepts in place of a cell:
  ``recurrent_cores``, ``over_cores``, ``Core``;
- ``dynamics``: quantities of a spectrum and of a trajectory, with error bars from the
  windows: ``kaplan_yorke_dimension``, ``entropy_rate``, ``participation_ratio``,
  ``participation_ratio_from_states``, ``Estimate``;
- ``clv``: covariant Lyapunov vectors (Ginelli's method) and the angles between unstable
  and stable subspaces: ``covariant_lyapunov_vectors``, ``clvs_from_jacobians``,
  ``clv_angles``, ``CovariantLyapunovVectors``;
- ``flossing``: the differentiable top-k exponents and the gradient-flossing loss
  (Engelken 2023): ``flossing_loss``, ``flossing_exponents``;
- ``parallel``: whether parallel-in-time solvers (``seqjax.solvers.DEER``, ``QuasiDEER``)
  converge and in how many iterations, from ``lambda_max`` (Gonzalez et al. 2025):
  ``parallel_convergence``, ``ParallelPrediction``.

Imports point one way: ``state`` <- ``jacobians`` <- ``linalg``/``products`` <-
``lyapunov``/``matrix_free`` <- ``report``/``fixed_points``/``dynamics``/``clv``/``flossing``/
``parallel``.

References:
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013. Benettin, Galgani, Giorgilli & Strelcyn, Meccanica 15 (1980). Eckmann &
  Ruelle, Rev. Mod. Phys. 57 (1985). Engelken, Wolf & Abbott, "Lyapunov spectra of chaotic
  recurrent neural networks", 2020. Vogt et al., "On Lyapunov exponents for RNNs", 2022.
"""

from seqjax.spectrum.clv import (
    CovariantLyapunovVectors,
    clv_angles,
    clvs_from_jacobians,
    covariant_lyapunov_vectors,
)
from seqjax.spectrum.dynamics import (
    Estimate,
    entropy_rate,
    kaplan_yorke_dimension,
    participation_ratio,
    participation_ratio_from_states,
)
from seqjax.spectrum.fixed_points import FixedPoints, find_fixed_points, linearize, sample_states, speed
from seqjax.spectrum.flossing import flossing_exponents, flossing_loss
from seqjax.spectrum.gates import GateSpectrum, gate_spectra
from seqjax.spectrum.jacobians import StepJacobians, input_jacobian, step_jacobian, step_jacobians
from seqjax.spectrum.linalg import eig, eigvals, spectral_radii, step_spectra
from seqjax.spectrum.lyapunov import LyapunovSpectrum, lyapunov_from_jacobians, lyapunov_spectrum
from seqjax.spectrum.matrix_free import top_eigenvalues, top_singular_values
from seqjax.spectrum.models import Core, over_cores, recurrent_cores
from seqjax.spectrum.parallel import ParallelPrediction, parallel_convergence
from seqjax.spectrum.products import lag_log_norms, product_eigenvalues, product_singular_values
from seqjax.spectrum.report import GradientFlowReport, gradient_flow_report
from seqjax.spectrum.state import flatten_state, state_size, unflatten_state

__all__ = [
    "flatten_state",
    "unflatten_state",
    "state_size",
    "step_jacobian",
    "input_jacobian",
    "step_jacobians",
    "StepJacobians",
    "eigvals",
    "eig",
    "step_spectra",
    "spectral_radii",
    "lag_log_norms",
    "product_singular_values",
    "product_eigenvalues",
    "lyapunov_spectrum",
    "lyapunov_from_jacobians",
    "LyapunovSpectrum",
    "top_singular_values",
    "top_eigenvalues",
    "gradient_flow_report",
    "GradientFlowReport",
    "FixedPoints",
    "find_fixed_points",
    "sample_states",
    "speed",
    "linearize",
    "gate_spectra",
    "GateSpectrum",
    "recurrent_cores",
    "over_cores",
    "Core",
    "kaplan_yorke_dimension",
    "entropy_rate",
    "participation_ratio",
    "participation_ratio_from_states",
    "Estimate",
    "covariant_lyapunov_vectors",
    "clvs_from_jacobians",
    "clv_angles",
    "CovariantLyapunovVectors",
    "flossing_loss",
    "flossing_exponents",
    "parallel_convergence",
    "ParallelPrediction",
]
