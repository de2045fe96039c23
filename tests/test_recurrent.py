"""Recurrent layers (``kinds/recurrent.py``) against their twins: the same cells written with
``nn.Linear`` gates and unrolled in Python (weights copied), float64.

The convention (docs/design.md, "Recurrent layers"): every time step is a weight-sharing position
of the input-to-hidden and of the hidden-to-hidden use of each layer and direction, so K-FAC's
factors and step on ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (and the cells called in loops) must equal
those of the twin, which K-FAC models with the linear kind alone. The twin here is written from
PyTorch's documented equations, independently of the library's unrolled kernels.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_kfac import KFACNumericalWarning, KFACPreconditioner
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")

N, T, FEATURES, HIDDEN, CLASSES = 3, 5, 4, 3, 5
LENGTHS = [5, 2, 4]  # packed batches: only these real steps are positions


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = True
    dropout: float = 0.0
    proj_size: int = 0
    packed: bool = False
    initial_state: bool = False
    bias: bool = True


CONFIGS = {
    "lstm": Config("LSTM"),
    "lstm_2layers_dropout_seqfirst": Config("LSTM", layers=2, dropout=0.3, batch_first=False),
    "lstm_bidirectional_h0": Config("LSTM", bidirectional=True, initial_state=True),
    "lstm_proj": Config("LSTM", layers=2, proj_size=2, initial_state=True),
    "lstm_packed_bidirectional": Config("LSTM", layers=2, bidirectional=True, packed=True),
    "lstm_packed_proj_seqfirst": Config("LSTM", proj_size=2, packed=True, batch_first=False),
    "lstm_no_bias": Config("LSTM", bias=False, bidirectional=True),
    "gru": Config("GRU", layers=2, dropout=0.2),
    "gru_bidirectional_seqfirst_h0": Config(
        "GRU", bidirectional=True, batch_first=False, initial_state=True
    ),
    "gru_packed": Config("GRU", layers=2, packed=True, initial_state=True),
    "rnn_tanh": Config("RNN_TANH", layers=2, bidirectional=True),
    "rnn_relu_packed": Config("RNN_RELU", packed=True, bidirectional=True, initial_state=True),
}


def fused(config: Config) -> nn.Module:
    kwargs = dict(
        num_layers=config.layers,
        bidirectional=config.bidirectional,
        batch_first=config.batch_first,
        dropout=config.dropout,
        bias=config.bias,
    )
    if config.mode == "LSTM":
        return nn.LSTM(FEATURES, HIDDEN, proj_size=config.proj_size, **kwargs)
    if config.mode == "GRU":
        return nn.GRU(FEATURES, HIDDEN, **kwargs)
    return nn.RNN(FEATURES, HIDDEN, nonlinearity=config.mode[4:].lower(), **kwargs)


class Twin(nn.Module):
    """The cells with ``nn.Linear`` gates: ``ih[k]``, ``hh[k]`` (and ``hr[k]``) for layer-direction
    ``k = layer·D + direction``, unrolled over time on batch-first inputs; a packed batch runs, at
    step ``t``, only the sequences longer than ``t``."""

    GATES: ClassVar[dict[str, int]] = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        gates, out = self.GATES[config.mode], config.proj_size or HIDDEN
        self.directions = 2 if config.bidirectional else 1
        self.ih, self.hh, self.hr = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for layer in range(config.layers):
            for _ in range(self.directions):
                width = FEATURES if layer == 0 else out * self.directions
                self.ih.append(nn.Linear(width, gates * HIDDEN, bias=config.bias))
                self.hh.append(nn.Linear(out, gates * HIDDEN, bias=config.bias))
                if config.proj_size:
                    self.hr.append(nn.Linear(HIDDEN, config.proj_size, bias=False))

    def copy_from(self, rnn: nn.Module) -> None:
        with torch.no_grad():
            for layer in range(self.config.layers):
                for direction in range(self.directions):
                    k, suffix = layer * self.directions + direction, "_reverse" * direction
                    for mine, name in ((self.ih[k], "ih"), (self.hh[k], "hh")):
                        mine.weight.copy_(getattr(rnn, f"weight_{name}_l{layer}{suffix}"))
                        if self.config.bias:
                            mine.bias.copy_(getattr(rnn, f"bias_{name}_l{layer}{suffix}"))
                    if self.config.proj_size:
                        self.hr[k].weight.copy_(getattr(rnn, f"weight_hr_l{layer}{suffix}"))

    def twin_of(self, name: str) -> nn.Parameter:
        """The twin's parameter for a fused parameter name (``weight_ih_l1_reverse``...)."""
        what, kind, rest = name.split("_", 2)
        layer = int(rest[1:].removesuffix("_reverse"))
        k = layer * self.directions + int(rest.endswith("_reverse"))
        return getattr({"ih": self.ih, "hh": self.hh, "hr": self.hr}[kind][k], what)

    def cell(self, k: int, x: Tensor, state):
        mode = self.config.mode
        if mode == "LSTM":
            h, c = state
            i, f, g, o = (self.ih[k](x) + self.hh[k](h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if self.config.proj_size:
                h = self.hr[k](h)
            return h, (h, c)
        if mode == "GRU":
            h = state
            i_r, i_z, i_n = self.ih[k](x).chunk(3, -1)
            h_r, h_z, h_n = self.hh[k](h).chunk(3, -1)  # W_hn h + b_hn, then times r
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            return h, h
        activation = torch.tanh if mode == "RNN_TANH" else torch.relu
        h = activation(self.ih[k](x) + self.hh[k](state))
        return h, h

    def forward(self, x: Tensor, lengths: list[int], state0) -> Tensor:
        """``x`` ``(N, T, F)``; returns outputs ``(N, T, D·H_out)``, zero at padded steps."""
        out_size = self.config.proj_size or HIDDEN
        for layer in range(self.config.layers):
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                state = tuple(s[k] for s in state0) if self.config.mode == "LSTM" else state0[k]
                steps = range(T - 1, -1, -1) if direction else range(T)
                out = x.new_zeros(N, T, out_size)
                for t in steps:
                    rows = torch.tensor([n for n in range(N) if lengths[n] > t])
                    h, part = self.cell(k, x[rows, t], select(state, rows))
                    out = out.index_put((rows, torch.tensor(t)), h)
                    state = update(state, rows, part)
                outputs.append(out)
            x = torch.cat(outputs, dim=-1)
            if self.config.dropout and layer < self.config.layers - 1:
                # time-major, as the fused kernel (ATen) drops out each layer's output
                time_major = x.transpose(0, 1).contiguous()
                x = F.dropout(time_major, self.config.dropout, True).transpose(0, 1)
        return x


def select(state, rows: Tensor):
    return tuple(s[rows] for s in state) if isinstance(state, tuple) else state[rows]


def update(state, rows: Tensor, part):
    if isinstance(state, tuple):
        return tuple(s.index_put((rows,), p) for s, p in zip(state, part, strict=True))
    return state.index_put((rows,), part)


class FusedNet(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.rnn = fused(config)
        directions = 2 if config.bidirectional else 1
        self.head = nn.Linear((config.proj_size or HIDDEN) * directions, CLASSES)

    def forward(self, x: Tensor, lengths: list[int], state0) -> Tensor:
        config = self.config
        hx = tuple(state0) if config.mode == "LSTM" else state0
        if not config.initial_state:
            hx = None
        inputs = x if config.batch_first else x.transpose(0, 1)
        if config.packed:
            packed = pack_padded_sequence(
                inputs, torch.tensor(lengths), batch_first=config.batch_first, enforce_sorted=False
            )
            out, _ = self.rnn(packed, hx)
            out, _ = pad_packed_sequence(out, batch_first=config.batch_first, total_length=T)
        else:
            out, _ = self.rnn(inputs, hx)
        out = out if config.batch_first else out.transpose(0, 1)
        return self.head(out)


class TwinNet(nn.Module):
    def __init__(self, net: FusedNet) -> None:
        super().__init__()
        self.twin = Twin(net.config)
        self.twin.copy_from(net.rnn)
        self.head = nn.Linear(net.head.in_features, CLASSES)
        self.head.load_state_dict(net.head.state_dict())

    def forward(self, x: Tensor, lengths: list[int], state0) -> Tensor:
        return self.head(self.twin(x, lengths, state0))


def batch(config: Config, step: int):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(N, T, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (N, T), generator=gen)
    lengths = LENGTHS if config.packed else [T] * N
    directions = 2 if config.bidirectional else 1
    shape = (config.layers * directions, N)
    h0 = 0.5 * torch.randn(*shape, config.proj_size or HIDDEN, generator=gen)
    c0 = 0.5 * torch.randn(*shape, HIDDEN, generator=gen)
    if not config.initial_state:
        h0, c0 = torch.zeros_like(h0), torch.zeros_like(c0)
    return x, y, lengths, ((h0, c0) if config.mode == "LSTM" else h0)


def loss_of(model: nn.Module, x: Tensor, y: Tensor, lengths: list[int], state0) -> Tensor:
    logits = model(x, lengths, state0)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # real steps only
    return F.cross_entropy(logits[mask], y[mask])


def train(model: nn.Module, config: Config, steps: int, **options) -> KFACPreconditioner:
    pre = KFACPreconditioner(
        model, damping=1e-2, kl_clip=None, inverse_update_interval=1, **options
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(steps):
        x, y, lengths, state0 = batch(config, step)
        opt.zero_grad()
        torch.manual_seed(100 + step)  # the same dropout masks in both models
        loss_of(model, x, y, lengths, state0).backward()
        pre.step()
        opt.step()
    return pre


CASES = [(case, "expand") for case in sorted(CONFIGS)] + [
    (case, "reduce") for case in sorted(CONFIGS) if not CONFIGS[case].packed
]


@pytest.mark.parametrize(("case", "approximation"), CASES)
def test_fused_recurrent_layer_equals_its_linear_twin(case: str, approximation: str) -> None:
    config = CONFIGS[case]
    torch.manual_seed(0)
    net = FusedNet(config)
    twin = TwinNet(net)
    pre = train(net, config, 2, approximation=approximation)
    pre_twin = train(twin, config, 2, approximation=approximation)
    assert pre.preconditioned_fraction == pre_twin.preconditioned_fraction == 1.0
    assert len(pre.blocks) == len(pre_twin.blocks)
    for name, param in net.rnn.named_parameters():
        mine = param.detach()
        theirs = twin.twin.twin_of(name).detach()
        assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
        block, twin_block = pre.block(f"rnn.{name}"), pre_twin.block(twin.twin.twin_of(name))
        for factor, twin_factor in zip(block.factors, twin_block.factors, strict=True):
            assert_close(factor.value, twin_factor.value, rtol=1e-9, atol=1e-12)
    # the steps moved the weights: a wrong K-FAC step would show
    torch.manual_seed(0)
    fresh = FusedNet(config)
    assert any(
        not torch.allclose(p, q) for p, q in zip(net.parameters(), fresh.parameters(), strict=True)
    )


def test_packed_batches_under_reduce_are_named_an_approximation() -> None:
    """K-FAC-reduce sums each sample's positions; in a packed batch the step calls cover fewer
    and fewer samples, which cannot be aligned per sample: the user is told, not left guessing."""
    config = CONFIGS["gru_packed"]
    torch.manual_seed(0)
    with pytest.warns(KFACNumericalWarning, match="its per-sample sums cannot be aligned"):
        train(FusedNet(config), config, 1, approximation="reduce")


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_unrolled_forward_is_the_fused_forward(case: str) -> None:
    """Capture steps run the unrolled cells, other steps the fused kernel: the same function,
    dropout masks included (the unrolled kernel follows ATen's order of random draws)."""
    config = CONFIGS[case]
    torch.manual_seed(0)
    net = FusedNet(config)
    x, _, lengths, state0 = batch(config, 0)
    torch.manual_seed(7)
    fused_out = net(x, lengths, state0)
    KFACPreconditioner(net, kl_clip=None)  # traces: the next training forward runs unrolled
    torch.manual_seed(7)
    unrolled_out = net(x, lengths, state0)
    assert_close(unrolled_out, fused_out, rtol=1e-12, atol=1e-14)


def test_steps_without_capture_run_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only capture steps unroll: counting ``F.linear`` calls, a capture step makes the head's
    call and one per gate projection and time step; a step without capture only the head's."""
    config = CONFIGS["lstm"]
    torch.manual_seed(0)
    net = FusedNet(config)
    pre = KFACPreconditioner(net, kl_clip=None, factor_update_interval=2)
    calls = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    counts = []
    for step in range(4):
        x, y, lengths, state0 = batch(config, step)
        calls.clear()
        net.zero_grad()
        loss_of(net, x, y, lengths, state0).backward()
        pre.step()
        counts.append(len(calls))
    assert counts == [2 + T, 1, 2 + T, 1]  # head + W_ih (one call) + W_hh per step


CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell}


def first_layer(state0):
    """A cell's ``(N, H)`` state from a layer stack's ``(L·D, N, H)`` one."""
    return tuple(s[0] for s in state0) if isinstance(state0, tuple) else state0[0]


class CellLoop(nn.Module):
    """A cell called in a Python loop over time (a user's hand-written unrolling)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor, lengths: list[int], state0) -> Tensor:
        state, outputs = first_layer(state0), []
        for t in range(T):
            state = self.cell(x[:, t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return self.head(torch.stack(outputs, dim=1))


class CellTwin(nn.Module):
    def __init__(self, loop: CellLoop, mode: str) -> None:
        super().__init__()
        self.twin = Twin(Config(mode))
        self.twin.ih[0].load_state_dict({"weight": loop.cell.weight_ih, "bias": loop.cell.bias_ih})
        self.twin.hh[0].load_state_dict({"weight": loop.cell.weight_hh, "bias": loop.cell.bias_hh})
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.head.load_state_dict(loop.head.state_dict())

    def forward(self, x: Tensor, lengths: list[int], state0) -> Tensor:
        state, outputs = first_layer(state0), []
        for t in range(T):
            h, state = self.twin.cell(0, x[:, t], state)
            outputs.append(h)
        return self.head(torch.stack(outputs, dim=1))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CELLS))
def test_cells_called_in_a_loop_equal_their_linear_twin(case: str, approximation: str) -> None:
    mode = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH"}[case]
    torch.manual_seed(0)
    loop = CellLoop(CELLS[case](FEATURES, HIDDEN))
    twin = CellTwin(loop, mode)
    config = Config(mode, initial_state=True)
    pre = train(loop, config, 2, approximation=approximation)
    pre_twin = train(twin, config, 2, approximation=approximation)
    assert pre.preconditioned_fraction == 1.0
    pairs = {"weight_ih": twin.twin.ih[0].weight, "weight_hh": twin.twin.hh[0].weight}
    pairs |= {"bias_ih": twin.twin.ih[0].bias, "bias_hh": twin.twin.hh[0].bias}
    for name, theirs in pairs.items():
        assert_close(getattr(loop.cell, name), theirs, rtol=1e-9, atol=1e-12)
        block, twin_block = pre.block(f"cell.{name}"), pre_twin.block(theirs)
        for factor, twin_factor in zip(block.factors, twin_block.factors, strict=True):
            assert_close(factor.value, twin_factor.value, rtol=1e-9, atol=1e-12)


class PackedInputNet(nn.Module):
    """A model whose forward takes the ``PackedSequence`` itself (``N`` = its sequence count)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, packed) -> Tensor:
        return self.head(self.rnn(packed)[1][0])


def test_a_packed_sequence_batch_counts_its_sequences() -> None:
    """``G`` is built from ``N · ∂loss/∂s``: with a ``PackedSequence`` as the forward's input,
    ``N`` is its number of sequences (``batch_sizes[0]``), not its number of tokens."""
    torch.manual_seed(0)
    net = PackedInputNet()
    x, y, _, _ = batch(CONFIGS["gru_packed"], 0)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
    pre = KFACPreconditioner(net, kl_clip=None)
    F.cross_entropy(net(packed), y[:, 0]).backward()
    pre.step()
    assert pre.capture.batch_size == N
    head = pre.block("head.weight")
    h = net.rnn(packed)[1][0].detach()
    logits = net.head(h).detach()
    g = (torch.softmax(logits, -1) - F.one_hot(y[:, 0], CLASSES)) / N  # ∂loss/∂logits
    assert_close(head.g.value[0], (N * g).T @ (N * g) / N, rtol=1e-10, atol=1e-13)
