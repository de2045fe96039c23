"""Recurrent uses: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (tanh, relu) and their cells.

The fused ops (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu`` and the
``*_cell`` ops) compute every gate projection inside one kernel, where no ``F.linear`` call can be
seen. On the steps that capture factors (and while discovering uses) this kind runs them
**unrolled** instead, as ``F.linear`` calls and the cells' elementwise gate math, with the tracing
mode active: each gate projection is a *linear use* (``kinds/linear.py``), so

- the input-to-hidden projection ``W_ih x_t + b_ih`` and the hidden-to-hidden projection
  ``W_hh h_{t-1} + b_hh`` (and LSTM's ``W_hr`` projection) of each layer and direction are uses of
  their own, with separate blocks;
- every time step is a weight-sharing position of those uses (K-FAC for RNNs, Martens, Ba &
  Johnson 2018, under the expand convention: ``A = (1/(N·T)) Σ_{n,t} a aᵀ``,
  ``G = (1/N) Σ_{n,t} g gᵀ``; ``approximation="reduce"`` as for any shared use);
- the result is exactly the step of the same cells written with ``nn.Linear`` gates and unrolled
  in Python — the convention the tests hold it to.

The unrolled forward follows ATen's CPU kernels operation by operation (gate order ``i, f, g, o``
for LSTM and ``r, z, n`` for GRU, ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, inter-layer
dropout on each layer's whole output, ``PackedSequence`` batches that shrink step by step, so that
only real time steps are positions). On steps that capture nothing the mode is not active inside
the module and the fused kernel runs: speed where no factor is formed, the unrolled cells only
where K-FAC needs the rows (``benchmarks/step_time.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.kinds.base import Kind, SupportedUse

NAME = "recurrent"

#: One cell step: ``(input projection, state, w_hh, b_hh, w_hr) -> (output h, new state)``.
Step = Callable[[Tensor, Any, Tensor, Tensor | None, Tensor | None], tuple[Tensor, Any]]


#: The gate math involves no parameter: it runs outside the tracing mode (about 10 % of a capture
#: step's time on the benchmark LSTM went into tracing these elementwise ops).
untraced = torch._C.DisableTorchFunction


def lstm_step(
    ih: Tensor, state: tuple[Tensor, Tensor], w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    h, c = state
    hh = F.linear(h, w_hh, b_hh)
    with untraced():
        i, f, g, o = (hh + ih).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = F.linear(h, w_hr)
    return h, (h, c)


def gru_step(
    ih: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, Tensor]:
    hh = F.linear(h, w_hh, b_hh)
    with untraced():
        i_r, i_z, i_n = ih.chunk(3, -1)
        h_r, h_z, h_n = hh.chunk(3, -1)
        r = torch.sigmoid(h_r + i_r)
        z = torch.sigmoid(h_z + i_z)
        n = torch.tanh(i_n + h_n * r)
        h = (h - n) * z + n
    return h, h


def _rnn_step(activation: Callable[[Tensor], Tensor]) -> Step:
    def step(
        ih: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        hh = F.linear(h, w_hh, b_hh)
        with untraced():
            h = activation(hh + ih)
        return h, h

    return step


rnn_tanh_step, rnn_relu_step = _rnn_step(torch.tanh), _rnn_step(torch.relu)


# -- states: LSTM's (h, c) pair or a single h ---------------------------------------------------
def _narrow(state: Any, start: int, stop: int) -> Any:
    if isinstance(state, tuple):
        return tuple(s[start:stop] for s in state)
    return state[start:stop]


def _concat(states: Sequence[Any]) -> Any:
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states, strict=True))
    return torch.cat(list(states))


class _Weights:
    """One layer-direction's parameters from the fused op's flat list."""

    def __init__(self, params: Sequence[Tensor], has_biases: bool) -> None:
        self.w_ih, self.w_hh = params[0], params[1]
        self.b_ih = params[2] if has_biases else None
        self.b_hh = params[3] if has_biases else None
        rest = params[4:] if has_biases else params[2:]
        self.w_hr = rest[0] if rest else None


def _layer_weights(
    params: Sequence[Tensor], has_biases: bool, num_layers: int, directions: int
) -> list[list[_Weights]]:
    per = len(params) // (num_layers * directions)
    return [
        [
            _Weights(
                params[(layer * directions + d) * per : (layer * directions + d + 1) * per],
                has_biases,
            )
            for d in range(directions)
        ]
        for layer in range(num_layers)
    ]


def _run_full(
    step: Step, x: Tensor, state: Any, weights: _Weights, reverse: bool, time_dim: int
) -> tuple[Tensor, Any]:
    """One direction over a padded sequence: the input projection in one call (all steps are its
    positions), then one hidden projection call per step."""
    ih = F.linear(x, weights.w_ih, weights.b_ih)
    steps = ih.shape[time_dim]
    outputs: list[Tensor | None] = [None] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        out, state = step(ih.select(time_dim, t), state, weights.w_hh, weights.b_hh, weights.w_hr)
        outputs[t] = out
    return torch.stack(outputs, dim=time_dim), state  # type: ignore[arg-type]


def _run_packed(
    step: Step, data: Tensor, batch_sizes: list[int], state: Any, weights: _Weights, reverse: bool
) -> tuple[Tensor, Any]:
    """One direction over a ``PackedSequence``'s data: step ``t`` runs the ``batch_sizes[t]``
    sequences still going (ATen's ``PackedLayer`` / ``ReversedPackedLayer``), so only real time
    steps are positions; the final state of each sequence is taken where it ended."""
    offsets = [0]
    for size in batch_sizes:
        offsets.append(offsets[-1] + size)
    outputs: list[Tensor | None] = [None] * len(batch_sizes)

    def project(t: int, current: Any) -> tuple[Tensor, Any]:
        x_t = data[offsets[t] : offsets[t + 1]]
        ih = F.linear(x_t, weights.w_ih, weights.b_ih)
        return step(ih, current, weights.w_hh, weights.b_hh, weights.w_hr)

    if not reverse:
        finished: list[Any] = []
        current, last = state, batch_sizes[0]
        current = _narrow(current, 0, last)
        for t, size in enumerate(batch_sizes):
            if size < last:
                finished.append(_narrow(current, size, last))
                current = _narrow(current, 0, size)
            last = size
            outputs[t], current = project(t, current)
        return torch.cat(outputs), _concat([current, *reversed(finished)])  # type: ignore[arg-type]
    last = batch_sizes[-1]
    current = _narrow(state, 0, last)
    for t in range(len(batch_sizes) - 1, -1, -1):
        size = batch_sizes[t]
        if size > last:
            current = _concat([current, _narrow(state, last, size)])
        last = size
        outputs[t], current = project(t, current)
    return torch.cat(outputs), current  # type: ignore[arg-type]


def _stack_states(states: list[Any]) -> tuple[Tensor, ...]:
    if isinstance(states[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*states, strict=True))
    return (torch.stack(states),)


def _initial_state(hx: Any, index: int) -> Any:
    if isinstance(hx, list | tuple):
        return tuple(h[index] for h in hx)
    return hx[index]


def _unrolled(step: Step) -> Callable[..., tuple[Tensor, ...]]:
    """The fused multi-layer op (``torch.lstm``/``gru``/``rnn_*``), both overloads, unrolled."""

    def run(*args: Any) -> tuple[Tensor, ...]:
        sizes = args[1]
        if isinstance(sizes, Tensor) and sizes.dim() == 1 and not sizes.is_floating_point():
            data, _, hx, params, has_biases, layers, dropout, train, bidi = args  # packed
            return _run_layers(
                step, data, hx, params, has_biases, layers, dropout, train, bidi,
                packed=sizes.tolist(),
            )  # fmt: skip
        x, hx, params, has_biases, layers, dropout, train, bidi, batch_first = args
        return _run_layers(
            step, x, hx, params, has_biases, layers, dropout, train, bidi,
            time_dim=1 if batch_first else 0,
        )  # fmt: skip

    return run


def _run_layers(
    step: Step,
    x: Tensor,
    hx: Any,
    params: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    *,
    time_dim: int = 0,
    packed: list[int] | None = None,
) -> tuple[Tensor, ...]:
    directions = 2 if bidirectional else 1
    weights = _layer_weights(params, has_biases, num_layers, directions)
    finals: list[Any] = []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            state = _initial_state(hx, layer * directions + direction)
            reverse, w = direction == 1, weights[layer][direction]
            if packed is None:
                out, final = _run_full(step, layer_input, state, w, reverse, time_dim)
            else:
                out, final = _run_packed(step, layer_input, packed, state, w, reverse)
            outputs.append(out)
            finals.append(final)
        layer_output = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout and train and layer < num_layers - 1:
            # on the time-major output, as ATen does: the fused kernel's masks
            time_major = layer_output.transpose(0, 1).contiguous() if time_dim else layer_output
            dropped = F.dropout(time_major, dropout, True)
            layer_output = dropped.transpose(0, 1) if time_dim == 1 else dropped
        layer_input = layer_output
    return (layer_input, *_stack_states(finals))


def _unrolled_cell(step: Step) -> Callable[..., Any]:
    """A fused cell op (``torch.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh)``...) unrolled."""

    def run(
        x: Tensor,
        hx: Any,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None = None,
        b_hh: Tensor | None = None,
    ) -> Any:
        ih = F.linear(x, w_ih, b_ih)
        state = tuple(hx) if isinstance(hx, list | tuple) else hx
        _, new_state = step(ih, state, w_hh, b_hh, None)
        return new_state

    return run


KIND = Kind(
    name=NAME,
    recognizers={},
    model=None,
    supported=(
        SupportedUse(
            "`torch.lstm/gru/rnn_tanh/rnn_relu` and their `*_cell` ops",
            "`nn.LSTM` (bidirectional, `proj_size`, `PackedSequence`), `nn.GRU`, `nn.RNN`, "
            "`nn.LSTMCell/GRUCell/RNNCell` in loops",
            "each gate projection (`W_ih`, `W_hh`, `W_hr`) a linear `A ⊗ G` per layer and "
            "direction, time steps as weight-sharing positions; unrolled on capture steps only",
        ),
    ),
    composites={
        torch.lstm: _unrolled(lstm_step),
        torch.gru: _unrolled(gru_step),
        torch.rnn_tanh: _unrolled(rnn_tanh_step),
        torch.rnn_relu: _unrolled(rnn_relu_step),
        torch.lstm_cell: _unrolled_cell(lstm_step),
        torch.gru_cell: _unrolled_cell(gru_step),
        torch.rnn_tanh_cell: _unrolled_cell(rnn_tanh_step),
        torch.rnn_relu_cell: _unrolled_cell(rnn_relu_step),
    },
)
