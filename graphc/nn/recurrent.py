"""Recurrent layers (RNN, LSTM, GRU) with PyTorch's parameter names, shapes and gate order.

The input projection x @ W_ih^T of every step is one matrix product over (T*N, I), outside the
time loop; only the hidden recurrence h @ W_hh^T runs per step. A scanned RNN or LSTM whose input
is narrow (at most hidden_size / FOLD_INPUT_RATIO features: MNIST's rows of 28, 7 or 1 pixels
for 128 hidden units) multiplies [x_t, h, 1] by [W_ih, W_hh, b]^T per step instead (the column
of ones adds the bias): the product's depth grows by the few features, while the all-steps
projection (a GEMM of depth 1 to 28, slow in BLAS), its (T, N, 4 * hidden) stack, its add to
each step's product and the separate gradients of W_ih and b go. The time loop itself is a
`gc.scan` (one traced cell, compiled once whatever the length) for sequences longer than
`UNROLL_MAX_STEPS`, and unrolled into one cell per step for shorter ones where that measures
faster: unless numba-cpu runs its loops in row blocks (several threads); `unroll=True/False` on
the constructor (or the attribute) forces either.

As in PyTorch, inputs are time-major (T, N, input_size) unless `batch_first` ((N, T,
input_size)), and unbatched inputs (T, input_size) are accepted. A bidirectional layer runs a
second recurrence backwards in time with its own `*_reverse` parameters and concatenates the two
outputs; `dropout` applies to every layer's output but the last's, while training.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphc.backends import get_backend
from graphc.ir.errors import ShapeError, user_location

from ..control import scan
from ..functions import concatenate, full, sigmoid, stack, tanh
from ..tensor import Tensor, as_tensor
from . import functional as F
from .layers import uniform
from .module import Module

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]

State = tuple[Tensor, ...]  # (h,) for RNN and GRU, (h, c) for LSTM

# Sequences up to this many steps unroll; longer ones run on gc.scan. Measured on numba-cpu,
# LSTM(28 -> 128), batch 64, value and gradient, medians of 3 alternated runs (2026-12); first
# calls in a fresh process on an empty kernel cache (2 threads), per call the median of 7 calls
# on 1 thread (first measured with the scan looping in Python):
#
#   steps                                8        16        28        50
#   first call, cold cache  unrolled   12.1 s    18.1 s    21.9 s    42.8 s
#                           scan       10.2 s    10.6 s     7.6 s    11.1 s
#   per call (1 thread)     unrolled   13.3 ms   25.2 ms   23.8 ms   93.2 ms
#                           scan       10.9 ms   45.0 ms   81.5 ms  146.1 ms
#
# Unrolled calls ran up to 3.4x faster then (the scan's gradient recomputed each step's cell
# from the saved carries, and its loop called the body from Python), but the unrolled compile
# grows by about 0.7 s per step while the scan's stays flat. Measured again once the scan ran in
# a compiled driver and its gradient read the forward's saved products (the whole training step
# with Adam, 1 thread, fresh kernel cache on the busy machine, then warm medians of 15 steps):
#
#   steps                                28               50
#   first call, cold cache  unrolled   16.7 s           28.0 s
#                           scan       15.1 s           10.4 s
#   per step                unrolled   15.3-15.7 ms     26.1-27.2 ms
#                           scan       17.7-20.6 ms     30.4-32.1 ms
#
# Unrolled steps are still 1.15-1.3x faster, and below ~32 steps the compiles cost about the
# same, so sequences up to 32 steps unroll (MNIST rows, 28, among them); beyond, the unrolled
# compile grows past 25 s for a gap per step of under 1.2x.
#
# On several threads, numba-cpu runs a loop whose rows are independent as one loop per block of
# rows, side by side (backends/numba_cpu/driver.py), where the unrolled steps are parallel
# kernels whose results cross between the cores every step. Measured on the 28 steps above (the
# benchmark's lstm-28, Adam, 2 threads, medians of 50 steps, alternated processes, 2026-12):
#
#                               unrolled           scan
#   per step, batch 64          5.53-5.97 ms       5.40-5.92 ms   (the machine's fast phase)
#                               10.7-11.4 ms       6.2-8.3 ms     (its slow phase)
#   per step, batch 63          5.56-6.29 ms       5.79-5.99 ms   (blocks of 32 and 31 rows)
#                               10.71 ms           7.46 ms        (slow phase)
#   per step, 1 thread          10.0-10.1 ms       11.6-12.0 ms
#   first call, cold cache      3.8-4.0 s          6.4-6.6 s
#   first call at batch 33      0.20 s             0.05-0.08 s    (after batch 64)
#
# So where the default backend splits rows, a batched loop is a scan whatever its length. The
# choice is not made per batch size, so that a ragged last batch runs the same program: chosen
# per batch, batch 33 after 64 traced to the unrolled program, whose first call took 0.34-0.38 s
# with a warm cache.
UNROLL_MAX_STEPS = 32


def _unrolls(steps: int, batch: int) -> bool:
    """Whether a layer left to choose (unroll=None) unrolls `steps` steps over `batch` rows: up
    to UNROLL_MAX_STEPS steps, unless the default backend may run the loop in row blocks."""
    if steps > UNROLL_MAX_STEPS:
        return False
    splits_rows = getattr(get_backend(), "splits_rows", None)
    return batch == 1 or splits_rows is None or not splits_rows()

# A scanned layer whose input has at most hidden_size / FOLD_INPUT_RATIO features multiplies
# [x_t, h] by [W_ih, W_hh]^T at each step instead of projecting all steps' inputs up front: each
# step's product is at most 1/4 deeper, and its backward computes the cotangent of h's columns
# only (passes/simplify.py, sliced_products). Measured (training step with Adam, medians of 50
# steps, alternated processes), projected against folded: 2 threads (row blocks), LSTM 28 -> 128
# over 28 steps (ratio 4.6) 5.06-5.47 ms against 4.91-5.08 (6 pairs); LSTM 32 -> 256 over 64
# steps (ratio 8) 20.9-25.3 against 19.5-23.3 (4 pairs, folded faster in each); 1 thread, the
# latter 40.9-41.8 against 40.8-42.4. (Before those row blocks and sliced products, at 1 thread:
# 64.2-69.8 projected, 68.1-73.6 folded.)
FOLD_INPUT_RATIO = 4


# -- one step's gates, shared by the layers and the cells ---------------------------------------
def _elman_h(gates: Tensor, nonlinearity: str) -> Tensor:
    """An Elman RNN's next h from its pre-activation."""
    return tanh(gates) if nonlinearity == "tanh" else F.relu(gates)


def _lstm_h_c(gates: Tensor, c: Tensor, H: int) -> State:
    """An LSTM's next (h, c) from its gates' pre-activations (N, 4 H), in the order (i, f, g, o)."""
    i, f, o = (sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
    g = tanh(gates[:, 2 * H:3 * H])
    c = f * c + i * g
    return o * tanh(c), c


def _gru_h(projected_x: Tensor, h: Tensor, weight_hh_t: Tensor, bias_hh: Tensor | None,
           H: int) -> Tensor:
    """A GRU's next h from its input projected by W_ih (with b_ih) and h; b_hn sits inside
    r * (h W_hn^T + b_hn), so bias_hh is added here."""
    projected_h = h @ weight_hh_t
    if bias_hh is not None:
        projected_h = projected_h + bias_hh
    rz = sigmoid(projected_x[:, :2 * H] + projected_h[:, :2 * H])
    r, z = rz[:, :H], rz[:, H:]
    n = tanh(projected_x[:, 2 * H:] + r * projected_h[:, 2 * H:])
    return n + z * (h - n)


class _RecurrentBase(Module):
    """Multi-layer recurrence, scanned or unrolled; subclasses define the gates and the cell."""

    gates = 1  # gate blocks stacked along the rows of weight_ih/weight_hh
    folds_input = True  # the gates are x W_ih^T + h W_hh^T + one bias (not GRU's)
    state_size = 1  # tensors in a layer's state: h, or h and c

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, unroll: bool | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:  # PyTorch refuses them too
            raise ValueError(f"{name}: input_size, hidden_size and num_layers must be positive, got "
                             f"{input_size}, {hidden_size} and {num_layers}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be a probability in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.has_bias, self.batch_first = bias, batch_first
        self.dropout, self.bidirectional = dropout, bidirectional
        self.unroll = unroll  # None: _unrolls decides
        self.directions = ("", "_reverse") if bidirectional else ("",)
        bound = 1 / math.sqrt(hidden_size)
        rows = self.gates * hidden_size
        for k in range(num_layers):  # PyTorch's order: per layer, forward then reverse
            layer_input = input_size if k == 0 else hidden_size * len(self.directions)
            for suffix in self.directions:
                setattr(self, f"weight_ih_l{k}{suffix}", uniform((rows, layer_input), bound))
                setattr(self, f"weight_hh_l{k}{suffix}", uniform((rows, hidden_size), bound))
                if bias:
                    setattr(self, f"bias_ih_l{k}{suffix}", uniform((rows,), bound))
                    setattr(self, f"bias_hh_l{k}{suffix}", uniform((rows,), bound))

    # -- what subclasses define ------------------------------------------------------------
    def _input_bias(self, bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
        """The bias folded into the all-steps input projection (both, unless the cell needs
        bias_hh apart, as GRU does)."""
        return bias_ih + bias_hh

    def _cell(self, projected_x: Tensor, state: State, weight_hh_t: Tensor,
              bias_hh: Tensor | None) -> State:
        """One step from its input projected by W_ih (biases added): the gates' pre-activations
        are that plus h @ W_hh^T (GRU, whose bias_hh sits inside a gate, overrides this)."""
        return self._activate(projected_x + state[0] @ weight_hh_t, state)

    def _activate(self, gates: Tensor, state: State) -> State:
        """The next state from the gates' pre-activations (N, gates * hidden)."""
        raise NotImplementedError

    # -- the recurrence ----------------------------------------------------------------
    def forward(self, x: Any, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(output, h_n): output (T, N, D * hidden) ((N, T, ...) with batch_first) holds the last
        layer's h at every step, D = 2 directions when bidirectional, else 1; h_n
        (num_layers * D, N, hidden) every layer's and direction's last h; hx is h_0, shaped
        like h_n (zeros if None)."""
        if isinstance(hx, (tuple, list)):
            raise ShapeError(f"{type(self).__name__}: the initial state is one tensor h_0 of shape "
                             f"(num_layers * directions, N, hidden), got a {type(hx).__name__} (an "
                             f"LSTM takes the pair (h_0, c_0)) (at {user_location()})")
        output, (h_n,) = self._run(x, None if hx is None else (hx,))
        return output, h_n

    def _run(self, x: Any, initial: tuple[Tensor, ...] | None) -> tuple[Tensor, State]:
        """(output, final states stacked over layers and directions) for x and optional
        initial states (each (num_layers * D, N, hidden), or (num_layers * D, hidden) for
        unbatched input)."""
        x = as_tensor(x)
        self._check_input(x)
        batched = x.ndim == 3
        # Time-major inside: each step reads a contiguous (N, ·) block.
        seq = (x.transpose(0, 1) if self.batch_first else x) if batched else x.unsqueeze(1)
        states = iter(self._initial_states(initial, seq.shape[1], x.dtype, batched))
        finals = []
        for k in range(self.num_layers):
            if k and self.dropout:
                seq = F.dropout(seq, self.dropout, self.training)
            outputs = []
            for suffix in self.directions:
                output, final = self._run_layer(f"l{k}{suffix}", seq, next(states),
                                                reverse=bool(suffix))
                outputs.append(output)
                finals.append(final)
            seq = concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]
        stacked = tuple(stack([f[i] for f in finals]) for i in range(self.state_size))
        if not batched:
            return seq.squeeze(1), tuple(s.squeeze(1) for s in stacked)
        return (seq.transpose(0, 1) if self.batch_first else seq), stacked

    def _run_layer(self, name: str, seq: Tensor, state: State, reverse: bool) -> tuple[Tensor, State]:
        """One layer's direction (parameters `*_{name}`, "l1_reverse") over a time-major
        (T, N, features) sequence, backwards in time if `reverse`: ((T, N, hidden) in the
        sequence's order, final state)."""
        weight_ih, weight_hh = getattr(self, f"weight_ih_{name}"), getattr(self, f"weight_hh_{name}")
        bias_ih = getattr(self, f"bias_ih_{name}") if self.has_bias else None
        bias_hh = getattr(self, f"bias_hh_{name}") if self.has_bias else None
        steps, batch, features = seq.shape
        input_bias = (self._input_bias(as_tensor(bias_ih), as_tensor(bias_hh)) if self.has_bias
                      else None)
        unroll = _unrolls(steps, batch) if self.unroll is None else self.unroll
        if not unroll and self.folds_input and features * FOLD_INPUT_RATIO <= self.hidden_size:
            # [x_t, h, 1] @ [W_ih, W_hh, b]^T: one product per step adds the bias too, no
            # (T, N, gates * hidden) projection stored, and one weight-gradient product after
            # the backward loop gives the bias's gradient as one more column
            columns = [as_tensor(weight_ih), as_tensor(weight_hh)]
            if input_bias is not None:
                columns.append(input_bias.reshape(input_bias.shape[0], 1))
            weight_t = concatenate(columns, axis=1).T
            ones = [full((batch, 1), 1, dtype=seq.dtype)] if input_bias is not None else []

            def folded_step(state: State, x: Tensor) -> tuple[State, Tensor]:
                state = self._activate(concatenate([x, state[0], *ones], axis=1) @ weight_t, state)
                return state, state[0]

            state, outputs = scan(folded_step, state, seq, reverse=reverse)
            return outputs, state
        projected = F.linear(seq.reshape(steps * batch, features), weight_ih, input_bias)
        # (the size given: -1 is ambiguous for an empty batch)
        projected = projected.reshape(steps, batch, projected.shape[-1])
        weight_hh_t = as_tensor(weight_hh).T
        if not unroll:
            def step(state: State, projected_x: Tensor) -> tuple[State, Tensor]:
                state = self._cell(projected_x, state, weight_hh_t, bias_hh)
                return state, state[0]

            state, outputs = scan(step, state, projected, reverse=reverse)
            return outputs, state
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        outputs = []
        for t in order:
            state = self._cell(projected[t], state, weight_hh_t, bias_hh)
            outputs.append(state[0])
        return stack(outputs[::-1] if reverse else outputs), state

    def _initial_states(self, initial: tuple[Tensor, ...] | None, batch: int, dtype: str,
                        batched: bool) -> list[State]:
        """Per layer and direction, the (N, hidden) state tensors: zeros, or the given ones split
        by layer and direction."""
        count = self.num_layers * len(self.directions)
        if initial is None:
            zeros = as_tensor(np.zeros((batch, self.hidden_size), dtype=np.dtype(dtype)))
            return [(zeros,) * self.state_size] * count
        expected = (count,) + ((batch,) if batched else ()) + (self.hidden_size,)
        tensors = []
        for s in initial:
            s = as_tensor(s)
            if s.shape != expected:
                raise ShapeError(f"{type(self).__name__}: initial states must have shape "
                                 f"{expected}, got {s.shape} (at {user_location()})")
            tensors.append(s if batched else s.unsqueeze(1))
        return [tuple(s[k] for s in tensors) for k in range(count)]

    def _check_input(self, x: Tensor) -> None:
        layout = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            raise ShapeError(f"{type(self).__name__}: expects input {layout} or (T, input_size) "
                             f"with input_size={self.input_size}, got shape {x.shape} "
                             f"(at {user_location()})")
        if x.shape[1 if x.ndim == 3 and self.batch_first else 0] == 0:
            raise ShapeError(f"{type(self).__name__}: the input sequence is empty, shape {x.shape} "
                             f"(at {user_location()})")

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.has_bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}")


class RNN(_RecurrentBase):
    """Elman RNN: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh or relu.
    forward(x, hx=None) -> (output, h_n)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 unroll: bool | None = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, unroll=unroll)
        self.nonlinearity = nonlinearity

    def _activate(self, gates, state):
        return (_elman_h(gates, self.nonlinearity),)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"


class LSTM(_RecurrentBase):
    """Long short-term memory, gates (i, f, g, o) stacked in that order:
    c' = f*c + i*g, h' = o*tanh(c'). forward(x, hx=None) -> (output, (h_n, c_n))."""

    gates, state_size = 4, 2

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *, unroll: bool | None = None) -> None:
        if proj_size:
            raise NotImplementedError(f"LSTM: projections are not supported "
                                      f"(got proj_size={proj_size})")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, unroll=unroll)

    def forward(self, x: Any, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(output, (h_n, c_n)), with hx = (h_0, c_0) shaped like (h_n, c_n) (zeros if None)."""
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ShapeError(f"LSTM: the initial state must be a pair (h_0, c_0), got "
                             f"{type(hx).__name__} (at {user_location()})")
        output, (h_n, c_n) = self._run(x, hx)
        return output, (h_n, c_n)

    def _activate(self, gates, state):
        return _lstm_h_c(gates, state[1], self.hidden_size)


class GRU(_RecurrentBase):
    """Gated recurrent unit, gates (r, z, n) stacked in that order:
    n = tanh(x_n + r*(h W_hn^T + b_hn)), h' = (1-z)*n + z*h.
    forward(x, hx=None) -> (output, h_n)."""

    gates = 3
    folds_input = False

    def _input_bias(self, bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
        return bias_ih  # b_hn sits inside r * (...), so bias_hh is added per step

    def _cell(self, projected_x, state, weight_hh_t, bias_hh):
        return (_gru_h(projected_x, state[0], weight_hh_t, bias_hh, self.hidden_size),)


# -- cells: one step, the caller looping ------------------------------------------------------
class _CellBase(Module):
    """One step of a recurrence, with PyTorch's parameter names (weight_ih, weight_hh, bias_ih,
    bias_hh), shapes and initialisation. forward(input, hx=None): input (N, input_size) or
    unbatched (input_size,); the state shaped (N, hidden_size) (or (hidden_size,)), zeros if None."""

    gates = 1
    state_size = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"{name}: input_size and hidden_size must be positive, got "
                             f"{input_size} and {hidden_size}")
        self.input_size, self.hidden_size = input_size, hidden_size
        bound = 1 / math.sqrt(hidden_size)
        rows = self.gates * hidden_size
        self.weight_ih = uniform((rows, input_size), bound)
        self.weight_hh = uniform((rows, hidden_size), bound)
        for bias_name in ("bias_ih", "bias_hh"):
            if bias:
                setattr(self, bias_name, uniform((rows,), bound))
            else:  # registered as absent, as in PyTorch
                self.register_parameter(bias_name, None)

    def _step(self, x: Any, hx: Any) -> tuple[State, bool]:
        """The next state (each (N, hidden)) for input x and state hx (a tuple of
        state_size tensors, or None), and whether x was unbatched."""
        name = type(self).__name__
        x = as_tensor(x)
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ShapeError(f"{name}: expects input (N, {self.input_size}) or "
                             f"({self.input_size},), got shape {x.shape} (at {user_location()})")
        batched = x.ndim == 2
        x = x if batched else x.unsqueeze(0)
        expected = ((x.shape[0],) if batched else ()) + (self.hidden_size,)
        if hx is None:
            state = (as_tensor(np.zeros((x.shape[0], self.hidden_size), np.dtype(x.dtype))),) * self.state_size
        else:
            state = tuple(as_tensor(s) for s in hx)
            for s in state:
                if s.shape != expected:
                    raise ShapeError(f"{name}: the state must have shape {expected} for an input "
                                     f"of shape {tuple(x.shape) if batched else x.shape[1:]}, "
                                     f"got {s.shape} (at {user_location()})")
            state = state if batched else tuple(s.unsqueeze(0) for s in state)
        return self._next(x, state), batched

    def _next(self, x: Tensor, state: State) -> State:
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(state[0], self.weight_hh, self.bias_hh)
        return self._activate(gates, state)

    def _activate(self, gates: Tensor, state: State) -> State:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}"


class RNNCell(_CellBase):
    """One Elman step: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh or relu.
    forward(input, hx=None) -> h'."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias)
        self.nonlinearity = nonlinearity

    def forward(self, input: Any, hx: Any = None) -> Tensor:
        (h,), batched = self._step(input, None if hx is None else (hx,))
        return h if batched else h.squeeze(0)

    def _activate(self, gates, state):
        return (_elman_h(gates, self.nonlinearity),)


class LSTMCell(_CellBase):
    """One LSTM step, gates (i, f, g, o) as LSTM's. forward(input, hx=None) -> (h', c'), hx
    the pair (h, c)."""

    gates, state_size = 4, 2

    def forward(self, input: Any, hx: Any = None) -> tuple[Tensor, Tensor]:
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ShapeError(f"LSTMCell: the state must be a pair (h, c), got {type(hx).__name__} "
                             f"(at {user_location()})")
        (h, c), batched = self._step(input, hx)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def _activate(self, gates, state):
        return _lstm_h_c(gates, state[1], self.hidden_size)


class GRUCell(_CellBase):
    """One GRU step, gates (r, z, n) as GRU's. forward(input, hx=None) -> h'."""

    gates = 3

    def forward(self, input: Any, hx: Any = None) -> Tensor:
        if isinstance(hx, (tuple, list)):
            raise ShapeError(f"GRUCell: the state is one tensor h, got a {type(hx).__name__} "
                             f"(at {user_location()})")
        (h,), batched = self._step(input, None if hx is None else (hx,))
        return h if batched else h.squeeze(0)

    def _next(self, x, state):
        projected_x = F.linear(x, self.weight_ih, self.bias_ih)
        return (_gru_h(projected_x, state[0], as_tensor(self.weight_hh).T, self.bias_hh,
                       self.hidden_size),)
