"""What distributed K-FAC costs per rank at scale: ResNet-50 and BERT-large, 8 to 1024 ranks.

    python benchmarks/scale_model.py [--json benchmarks/scale_model.json]
                                     [--plot docs/scale_model.png] [--eigh-device cpu]

The layer shapes come from the library itself: each model is traced by ``KFACPreconditioner``
(default options, ``max_factor_dim=8192``) on a tiny batch and its ``blocks`` are read after
``fix_structure()``. From those shapes this script computes, for every world size ``R`` and both
distribution modes (``DistributionMode``):

- **bytes** each rank sends and receives: the factor all-reduce per factor update, the
  decomposition broadcasts per inverse update (``broadcast_decompositions``, COMM-OPT), the
  preconditioned-gradient broadcasts per step (``broadcast_gradients``, MEM-OPT), and the per-use
  gradient all-reduce of parameters with several uses (a tied embedding/LM head), every step;
- **decomposition FLOPs** per rank per inverse update, with the library's own owner assignment
  (``assignment.assign_by_cost``, LPT on ``Σ B·d³``) and ``eigh ≈ 9 d³`` per dense block, and the
  load imbalance ``max / mean`` over ranks;
- a **per-step time** on a stated GPU/network model, for factor/inverse intervals 1/10 and 10/100.

Byte model (payload, what ``kfac/bytes_communicated`` counts on each rank; ``e`` = element size):

- factor update, every rank: ``e_factor · Σ_blocks Σ_factors (n_f + 1)``, ``n_f = B·d(d+1)/2``
  for a dense ``[B, d, d]`` factor (upper triangles), ``B·d`` for a diagonal ``[B, d]`` one, ``+1``
  its count (``distributor.setup``: ``piece_numel(p, s) + 1``; ``comm.piece_numel``);
- inverse update, COMM-OPT, owner ``r``: ``e_inverse · Σ_{blocks of r} Σ_factors`` of the
  decomposition: eigen ``B·d`` eigenvalues ``+ B·d²`` eigenvectors (dense only), inverse ``B·d²``
  (dense) or ``B·d`` (diagonal) (``Block.decomposition_shapes``, ``broadcast_flat``);
- every step, MEM-OPT, owner ``r``: ``e_grad · Σ_{blocks of r} (B·d_G·d_A + 1)``, the ``[B, d_G,
  d_A]`` preconditioned matrix and one flag (``TorchDistributedDistributor.precondition``;
  unit-wise norm blocks ``[C, k, 1]``);
- every step, both modes: ``e_grad · Σ`` numel of every use of a parameter with overlapping uses
  (``average_use_gradients``).

Wire traffic: a ring all-reduce of payload ``P`` sends and receives ``2(R−1)/R · P`` per rank; in a
broadcast the owner sends its payload and every other rank receives it.

Everything under ``assumptions`` in the JSON is assumed (the network, the H100 throughputs, the
batch per GPU), everything under ``measured`` was measured by this script on this machine, the rest
is computed from the traced shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_kfac import KFACPreconditioner
from lightning_kfac.distributed.assignment import assign_by_cost
from lightning_kfac.distributed.comm import BucketedAllReduce
from lightning_kfac.kfac.calls import RecognizedCall
from lightning_kfac.kfac.kinds import KroneckerModel
from lightning_kfac.kfac.options import ComputeMethod, DistributionMode
from lightning_kfac.kfac.uses import UseSpec

WORLD_SIZES = tuple(2**k for k in range(3, 11))  # 8 ... 1024
INTERVALS = ((1, 10), (10, 100))  # (factor_update_interval, inverse_update_interval)
MODES = (DistributionMode.BROADCAST_DECOMPOSITIONS, DistributionMode.BROADCAST_GRADIENTS)
SHORT = {
    DistributionMode.BROADCAST_DECOMPOSITIONS: "comm",
    DistributionMode.BROADCAST_GRADIENTS: "mem",
}
#: Golub & Van Loan, Matrix Computations (4th ed., §8.3, symmetric QR algorithm): about 4n³/3
#: flops for the eigenvalues alone, about 9n³ with the eigenvectors.
EIGH_FLOPS_PER_D3 = 9.0


# ---------------------------------------------------------------------------------------------
# Models (written here: torchvision and transformers are not dependencies)
# ---------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision's): 1×1 → 3×3 (stride here) → 1×1 (×4), BatchNorm."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet: 7×7/2 stem, 3×3/2 max-pool, stages of widths ``base·2^i`` (the first
    block of every stage but the first strides by 2), global average pool, linear head."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        base_width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = base_width
        stages = []
        for index, count in enumerate(layers):
            width = base_width * 2**index
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(Bottleneck(channels, width, stride))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in self.layers:
            x = stage(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 for ImageNet (25.6M parameters): bottlenecks [3, 4, 6, 3], widths 64…512."""
    return ResNet((3, 4, 6, 3), 64, num_classes)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters; the defaults are BERT-large (uncased vocabulary)."""

    vocab_size: int = 30522
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12


class BertAttention(nn.Module):
    """Self-attention as in HF ``BertAttention``: separate query/key/value projections, an output
    projection, residual and LayerNorm (post-norm)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden
        self.heads = config.heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.eps)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, hidden = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x))
        )
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        return self.norm(x + self.dense(context))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = nn.Linear(config.hidden, config.intermediate)
        self.output = nn.Linear(config.intermediate, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(x)
        return self.norm(x + self.output(F.gelu(self.intermediate(x))))


class BertForPreTraining(nn.Module):
    """BERT with HF's public structure (``BertForPreTraining``): word, position and token-type
    embeddings + LayerNorm, post-norm encoder layers, tanh pooler; masked-LM head (dense, GELU,
    LayerNorm, decoder whose weight *is* the word-embedding matrix, own bias) and the
    next-sentence head. Returns ``(mlm_logits [N, L, V], nsp_logits [N, 2])``."""

    def __init__(self, config: BertConfig | None = None) -> None:
        super().__init__()
        config = config or BertConfig()
        self.config = config
        hidden = config.hidden
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=config.eps)
        self.encoder = nn.ModuleList(BertLayer(config) for _ in range(config.layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.transform = nn.Linear(hidden, hidden)
        self.transform_norm = nn.LayerNorm(hidden, eps=config.eps)
        self.decoder = nn.Linear(hidden, config.vocab_size)
        self.decoder.weight = self.word_embeddings.weight  # tied (HF: tie_word_embeddings)
        self.seq_relationship = nn.Linear(hidden, 2)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.embedding_norm(x)
        for layer in self.encoder:
            x = layer(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        mlm = self.decoder(self.transform_norm(F.gelu(self.transform(x))))
        return mlm, self.seq_relationship(pooled)


def bert_large() -> BertForPreTraining:
    """BERT-large: 24 layers, hidden 1024, 16 heads, FFN 4096, vocabulary 30522, 512 positions."""
    return BertForPreTraining(BertConfig())


def pretraining_loss(
    outputs: tuple[Tensor, Tensor], mlm_labels: Tensor, nsp_labels: Tensor
) -> Tensor:
    """Masked-LM cross-entropy over all positions plus the next-sentence cross-entropy."""
    mlm, nsp = outputs
    return F.cross_entropy(mlm.flatten(0, 1), mlm_labels.flatten()) + F.cross_entropy(
        nsp, nsp_labels
    )


# ---------------------------------------------------------------------------------------------
# Shapes of the library's blocks
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FactorShape:
    """One factor: ``blocks`` square blocks of side ``dim``, dense or diagonal."""

    dim: int
    blocks: int
    diagonal: bool

    @property
    def packed_numel(self) -> int:
        """Elements in the factor all-reduce (``comm.piece_numel``: upper triangles if dense)."""
        if self.diagonal:
            return self.blocks * self.dim
        return self.blocks * self.dim * (self.dim + 1) // 2

    def decomposition_numel(self, method: ComputeMethod = ComputeMethod.EIGEN) -> int:
        """Elements of its decomposition (``Block.decomposition_shapes``)."""
        if method == ComputeMethod.EIGEN:
            return self.blocks * self.dim * (1 if self.diagonal else 1 + self.dim)
        return self.blocks * self.dim * (1 if self.diagonal else self.dim)

    @property
    def cost(self) -> int:
        """LPT cost (``assignment.decomposition_cost``): ``B·d³``, 0 when diagonal."""
        return 0 if self.diagonal else self.blocks * self.dim**3

    @property
    def eigh_flops(self) -> float:
        return EIGH_FLOPS_PER_D3 * self.cost


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One block (one use of a parameter) as the distributor sees it.

    Attributes:
        name: The block's name in ``KFACPreconditioner.blocks``.
        kind: ``linear``, ``conv``, ``embedding`` or ``norm``.
        factors: ``(A, G)`` for Kronecker kinds, ``(F,)`` for a unit-wise norm block.
        alias_numel: Elements of this use's own gradient that are all-reduced every step (its
            parameter has other, overlapping uses: a tied embedding/head); 0 otherwise.
        rows: Rows ``N·T`` per sample of this use's input/output (Kronecker kinds; from the trace).
        weight_numel: Elements of the weight (per block, without the bias) multiplying each row.
    """

    name: str
    kind: str
    factors: tuple[FactorShape, ...]
    alias_numel: int = 0
    rows: float = 0.0
    weight_numel: int = 0

    @property
    def blocks(self) -> int:
        return self.factors[0].blocks

    @property
    def gradient_numel(self) -> int:
        """Elements of the gradient matrix ``[B, d_G, d_A]`` (unit-wise ``[C, k, 1]``)."""
        return self.blocks * math.prod(f.dim for f in self.factors)

    @property
    def allreduce_numel(self) -> int:
        return sum(f.packed_numel + 1 for f in self.factors)

    def decomposition_numel(self, method: ComputeMethod = ComputeMethod.EIGEN) -> int:
        return sum(f.decomposition_numel(method) for f in self.factors)

    @property
    def cost(self) -> float:
        return float(sum(f.cost for f in self.factors))

    @property
    def eigh_flops(self) -> float:
        return sum(f.eigh_flops for f in self.factors)

    @property
    def dense_dims(self) -> tuple[int, ...]:
        return tuple(f.dim for f in self.factors if not f.diagonal)

    # -- compute per sample (rows scale with the batch) --------------------------------------
    @property
    def forward_flops(self) -> float:
        """Forward multiply-adds ×2 per sample (the weight's GEMM; embeddings are lookups)."""
        if self.kind in ("linear", "conv"):
            return 2.0 * self.rows * self.blocks * self.weight_numel
        return 0.0

    @property
    def factor_flops(self) -> float:
        """FLOPs per sample to form the factor batch: a full GEMM ``rowsᵀ·rows`` (``2·rows·d²``,
        ``linalg.covariance_sum``) per dense side, ``2·rows·d`` per diagonal one."""
        if self.kind == "norm":
            (f,) = self.factors
            return 2.0 * f.blocks * f.dim**2  # one u uᵀ per sample and channel
        return sum(self.side_flops(self.rows))

    def side_flops(self, rows: float) -> list[float]:
        """Per factor, the FLOPs of its batch from ``rows`` rows: ``2·rows·d²`` dense, ``2·rows·d``
        diagonal."""
        return [2.0 * rows * f.blocks * f.dim * (1 if f.diagonal else f.dim) for f in self.factors]

    @property
    def precondition_flops(self) -> float:
        """FLOPs of ``Q_G [(Q_Gᵀ dW Q_A) / (e_G e_Aᵀ + λ)] Q_Aᵀ`` (``linalg.precondition_eigen``):
        ``4·B·d_G²·d_A`` for a dense G, ``4·B·d_G·d_A²`` for a dense A, plus the division."""
        if self.kind == "norm":
            (f,) = self.factors
            d_a, d_g, a_dense, g_dense = 1, f.dim, False, True
        else:
            a, g = self.factors
            d_a, d_g, a_dense, g_dense = a.dim, g.dim, not a.diagonal, not g.diagonal
        flops = 3.0 * self.blocks * d_a * d_g
        if g_dense:
            flops += 4.0 * self.blocks * d_g * d_g * d_a
        if a_dense:
            flops += 4.0 * self.blocks * d_g * d_a * d_a
        return flops


def trace(
    model: nn.Module, inputs: Sequence[Any], *, max_factor_dim: int = 8192, batch_size: int = 1
) -> list[BlockShape]:
    """The library's blocks of ``model``, traced by one training forward of ``inputs``.

    Builds ``KFACPreconditioner(model, kl_clip=None)`` (default options otherwise), runs the
    forward (capture disabled: only the uses are traced; meta tensors work) and
    ``fix_structure()``, then reads the shapes of ``pre.blocks``. ``rows`` (per sample) are the
    ``N·T`` rows of each use's calls, summed over its calls (a recurrent layer's gate
    projections: every time step), as its kind counts them (``KroneckerModel.row_count``).
    """
    pre = KFACPreconditioner(model, kl_clip=None, max_factor_dim=max_factor_dim, report=False)
    pre.capture_enabled = False  # trace the uses; no factor statistics needed
    capture, rows_of = pre.capture, {}
    recognised = capture.on_call

    def counting(call: RecognizedCall, site: str) -> Any:
        output = recognised(call, site)
        weight, bias = (
            capture.index.resolve(v) if isinstance(v, Tensor) else None
            for v in (call.weight, call.bias)
        )
        spec = UseSpec.of_call(call, site, weight, bias)
        sums = capture.uses.get(spec)
        if sums is not None and isinstance(sums.model, KroneckerModel):
            rows_of[spec] = rows_of.get(spec, 0) + sums.model.row_count(call.input)
        return output

    capture.on_call = counting  # type: ignore[method-assign]
    model.train()
    try:
        model(*inputs)
        pre.fix_structure()
    finally:
        pre.remove_hooks()
    shapes = []
    for name, block in pre.blocks.items():
        factors = tuple(FactorShape(f.dim, f.blocks, f.diagonal) for f in block.factors)
        alias = 0
        for role, view in (("weight", block.spec.weight), ("bias", block.spec.bias)):
            if view is not None and role in block.alias_parts:
                alias += math.prod(block.model.view_shape(view))
        rows, weight_numel = 0.0, 0
        model_ = block.model
        if isinstance(model_, KroneckerModel):
            rows = rows_of.get(block.spec, 0) / batch_size
            weight_numel = model_.in_features * model_.out_features
        shapes.append(BlockShape(name, str(block.spec.kind), factors, alias, rows, weight_numel))
    if pre.preconditioned_fraction != 1.0:
        warnings.warn(
            f"K-FAC preconditions only {pre.preconditioned_fraction:.3f} of {type(model).__name__}"
            f"'s parameters:\n{pre.coverage_report()}",
            stacklevel=2,
        )
    return shapes


# ---------------------------------------------------------------------------------------------
# Byte model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ElementSizes:
    """Bytes per element: factors (``factor_dtype``), decompositions (``inverse_dtype``),
    gradients (the parameters' dtype; also the per-use gradient all-reduce)."""

    factor: int = 4
    inverse: int = 4
    gradient: int = 4


def owners(blocks: Sequence[BlockShape], world_size: int) -> list[int]:
    """Owner rank of each block: the library's LPT assignment on ``Σ B·d³`` (dense factors)."""
    return assign_by_cost([b.cost for b in blocks], world_size)


def factor_allreduce_bytes(blocks: Sequence[BlockShape], sizes: ElementSizes) -> int:
    """Payload of one factor update's all-reduces (every rank the same)."""
    return sizes.factor * sum(b.allreduce_numel for b in blocks)


def use_gradient_bytes(blocks: Sequence[BlockShape], sizes: ElementSizes) -> int:
    """Payload of the per-use gradient all-reduce (every step, every rank)."""
    return sizes.gradient * sum(b.alias_numel for b in blocks)


def decomposition_bytes_by_rank(
    blocks: Sequence[BlockShape],
    owner: Sequence[int],
    world_size: int,
    sizes: ElementSizes,
    method: ComputeMethod = ComputeMethod.EIGEN,
) -> list[int]:
    """Payload each owner broadcasts per inverse update (COMM-OPT)."""
    out = [0] * world_size
    for block, rank in zip(blocks, owner, strict=True):
        out[rank] += sizes.inverse * block.decomposition_numel(method)
    return out


def gradient_bytes_by_rank(
    blocks: Sequence[BlockShape], owner: Sequence[int], world_size: int, sizes: ElementSizes
) -> list[int]:
    """Payload each owner broadcasts per step (MEM-OPT): matrix and flag per block."""
    out = [0] * world_size
    for block, rank in zip(blocks, owner, strict=True):
        out[rank] += sizes.gradient * (block.gradient_numel + 1)
    return out


def logged_bytes(
    blocks: Sequence[BlockShape],
    world_size: int,
    mode: DistributionMode | str,
    step: int,
    factor_update_interval: int,
    inverse_update_interval: int,
    sizes: ElementSizes = ElementSizes(),
    method: ComputeMethod = ComputeMethod.EIGEN,
) -> list[int]:
    """Predicted ``kfac/bytes_communicated`` of every rank at optimizer step ``step`` (0-based):
    what each rank sends as payload in that step."""
    mode = DistributionMode(mode)
    owner = owners(blocks, world_size)
    total = [use_gradient_bytes(blocks, sizes)] * world_size
    if step % factor_update_interval == 0:
        total = [t + factor_allreduce_bytes(blocks, sizes) for t in total]
    if mode == DistributionMode.BROADCAST_GRADIENTS:
        sent = gradient_bytes_by_rank(blocks, owner, world_size, sizes)
        total = [t + s for t, s in zip(total, sent, strict=True)]
    elif step % inverse_update_interval == 0:
        sent = decomposition_bytes_by_rank(blocks, owner, world_size, sizes, method)
        total = [t + s for t, s in zip(total, sent, strict=True)]
    return total


def factor_buckets(blocks: Sequence[BlockShape], sizes: ElementSizes, cap_mb: float = 25.0) -> int:
    """Number of all-reduces per factor update (the library's own bucketing)."""
    planner = BucketedAllReduce(
        [b.allreduce_numel for b in blocks],
        None,
        bucket_cap_bytes=int(cap_mb * 2**20),
        element_size=sizes.factor,
    )
    return len(planner.buckets)


# ---------------------------------------------------------------------------------------------
# Per-rank figures at one world size
# ---------------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    top = max(values)
    return {"max": top, "mean": mean, "min": min(values), "imbalance": top / mean if mean else 1.0}


def per_rank(blocks: Sequence[BlockShape], world_size: int, sizes: ElementSizes) -> dict[str, Any]:
    """Bytes and FLOPs per rank at ``world_size`` (both modes)."""
    owner = owners(blocks, world_size)
    factor_payload = factor_allreduce_bytes(blocks, sizes)
    ring = 2 * (world_size - 1) / world_size
    decomposition = decomposition_bytes_by_rank(blocks, owner, world_size, sizes)
    gradients = gradient_bytes_by_rank(blocks, owner, world_size, sizes)
    flops = [0.0] * world_size
    precondition = [0.0] * world_size
    groups: list[set[tuple[int, int]]] = [set() for _ in range(world_size)]
    for block, rank in zip(blocks, owner, strict=True):
        flops[rank] += block.eigh_flops
        precondition[rank] += block.precondition_flops
        for f in block.factors:
            if not f.diagonal:
                groups[rank].add((f.dim, 0))
    decomposition_total = sum(decomposition)
    gradient_total = sum(gradients)
    return {
        "world_size": world_size,
        "owners_with_blocks": len(set(owner)),
        "factor_update": {
            "allreduce_payload_bytes": factor_payload,
            "ring_wire_bytes_sent": ring * factor_payload,
            "ring_wire_bytes_received": ring * factor_payload,
            "collectives": factor_buckets(blocks, sizes),
        },
        "inverse_update_comm_opt": {
            "sent_bytes": _spread(decomposition),
            "received_bytes": _spread([decomposition_total - d for d in decomposition]),
            "total_broadcast_bytes": decomposition_total,
        },
        "step_mem_opt": {
            "sent_bytes": _spread(gradients),
            "received_bytes": _spread([gradient_total - g for g in gradients]),
            "total_broadcast_bytes": gradient_total,
        },
        "step_use_gradient_allreduce_payload_bytes": use_gradient_bytes(blocks, sizes),
        "decomposition_flops": _spread(flops),
        "eigh_calls": _spread([float(len(g)) for g in groups]),
        "precondition_flops_mem_opt": _spread(precondition),
        "precondition_flops_comm_opt": sum(b.precondition_flops for b in blocks),
        "_decomposition": decomposition,
        "_gradients": gradients,
        "_flops": flops,
        "_groups": [len(g) for g in groups],
    }


# ---------------------------------------------------------------------------------------------
# Time model (every number in it is an assumption, listed in ``Assumptions``)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assumptions:
    """The GPU and network model (assumed, not measured)."""

    gpus_per_node: int = 8
    nvlink_gbytes: float = 300.0  # GB/s effective per-GPU bus bandwidth inside a node
    ib_gbits: float = 200.0  # Gb/s per InfiniBand HCA
    hcas_per_node: int = 8  # one HCA per GPU (rail-optimised, as DGX A100 / HGX)
    alpha_intra_s: float = 3e-6  # latency per ring step / tree level inside a node
    alpha_inter_s: float = 6e-6  # ... when the collective spans nodes
    eigh_tflops: float = 1.0  # H100 FP32 torch.linalg.eigh (cuSOLVER syevd), under 9 d³
    eigh_call_s: float = 1e-3  # per batched eigh call (launch, workspace, convergence check)
    fp32_gemm_tflops: float = 50.0  # H100 SXM FP32 (no TF32: PyTorch's default), of 67 peak
    ddp_bucket_mb: float = 25.0
    gradient_bytes_per_parameter: int = 4  # DDP all-reduces FP32 gradients

    def bandwidth(self, world_size: int) -> float:
        """Bytes/s a rank streams in a ring/pipelined collective over ``world_size`` ranks."""
        if world_size <= self.gpus_per_node:
            return self.nvlink_gbytes * 1e9
        return min(self.nvlink_gbytes * 1e9, self.hcas_per_node * self.ib_gbits / 8 * 1e9)

    def alpha(self, world_size: int) -> float:
        return self.alpha_intra_s if world_size <= self.gpus_per_node else self.alpha_inter_s

    def allreduce_time(self, payload: float, world_size: int, collectives: int = 1) -> float:
        """α-β all-reduce: ring bandwidth term ``2(R−1)/R · P/β``; latency ``min(ring 2(R−1),
        tree 2⌈log2 R⌉)·α`` per collective (NCCL picks ring or tree)."""
        if world_size == 1 or payload == 0:
            return 0.0
        steps = min(2 * (world_size - 1), 2 * math.ceil(math.log2(world_size)))
        ring = 2 * (world_size - 1) / world_size
        return collectives * steps * self.alpha(world_size) + ring * payload / self.bandwidth(
            world_size
        )

    def broadcast_time(self, payloads: Sequence[float], world_size: int) -> float:
        """Sequential broadcasts (one per owner, as the library issues them), each pipelined:
        ``⌈log2 R⌉·α + P/β``."""
        if world_size == 1:
            return 0.0
        latency = math.ceil(math.log2(world_size)) * self.alpha(world_size)
        return sum(latency + p / self.bandwidth(world_size) for p in payloads if p > 0)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model's training step on one GPU (assumed)."""

    name: str
    batch_per_gpu: int
    sample: str
    fwd_bwd_tflops: float  # achieved BF16 AMP throughput of forward+backward


WORKLOADS = {
    "resnet50": Workload("ResNet-50", 64, "224×224 image", 200.0),
    "bert_large": Workload("BERT-large", 64, "sequence of 128 tokens", 400.0),
}


def step_times(
    blocks: Sequence[BlockShape],
    figures: dict[str, Any],
    workload: Workload,
    parameters: int,
    hw: Assumptions,
    extra_forward_flops: float = 0.0,
) -> dict[str, Any]:
    """Per-step time terms (seconds, critical path = slowest rank, no overlap: an upper bound).

    ``extra_forward_flops``: forward FLOPs per sample that are not weight GEMMs (attention).
    """
    world_size = figures["world_size"]
    batch = workload.batch_per_gpu
    fwd = (sum(b.forward_flops for b in blocks) + extra_forward_flops) * batch
    fwd_bwd = 3.0 * fwd / (workload.fwd_bwd_tflops * 1e12)
    ddp_payload = parameters * hw.gradient_bytes_per_parameter
    ddp = hw.allreduce_time(
        ddp_payload, world_size, math.ceil(ddp_payload / (hw.ddp_bucket_mb * 2**20))
    )
    gemm = hw.fp32_gemm_tflops * 1e12
    factor_form = sum(b.factor_flops for b in blocks) * batch / gemm
    factor_comm = hw.allreduce_time(
        figures["factor_update"]["allreduce_payload_bytes"],
        world_size,
        figures["factor_update"]["collectives"],
    )
    eigh = max(
        f / (hw.eigh_tflops * 1e12) + calls * hw.eigh_call_s
        for f, calls in zip(figures["_flops"], figures["_groups"], strict=True)
    )
    decomposition_comm = hw.broadcast_time(figures["_decomposition"], world_size)
    gradient_comm = hw.broadcast_time(figures["_gradients"], world_size)
    use_gradients = hw.allreduce_time(
        figures["step_use_gradient_allreduce_payload_bytes"], world_size
    )
    precondition_comm_opt = figures["precondition_flops_comm_opt"] / gemm
    precondition_mem_opt = figures["precondition_flops_mem_opt"]["max"] / gemm
    terms = {
        "fwd_bwd": fwd_bwd,
        "ddp_allreduce": ddp,
        "factor_covariances_per_update": factor_form,
        "factor_allreduce_per_update": factor_comm,
        "eigh_per_update_slowest_rank": eigh,
        "decomposition_broadcast_per_update": decomposition_comm,
        "precondition_per_step_comm_opt": precondition_comm_opt,
        "precondition_per_step_mem_opt_slowest_rank": precondition_mem_opt,
        "gradient_broadcast_per_step_mem_opt": gradient_comm,
        "use_gradient_allreduce_per_step": use_gradients,
    }
    base = fwd_bwd + ddp
    steps: dict[str, Any] = {}
    for factor_interval, inverse_interval in INTERVALS:
        for mode in MODES:
            kfac = (factor_form + factor_comm) / factor_interval + use_gradients
            kfac += eigh / inverse_interval
            if mode == DistributionMode.BROADCAST_DECOMPOSITIONS:
                kfac += decomposition_comm / inverse_interval + precondition_comm_opt
            else:
                kfac += precondition_mem_opt + gradient_comm
            steps[f"{SHORT[mode]}_{factor_interval}_{inverse_interval}"] = {
                "step_s": base + kfac,
                "kfac_s": kfac,
                "ratio_to_sgd_ddp": (base + kfac) / base,
            }
    return {"terms_s": terms, "steps": steps, "forward_flops_per_gpu": fwd}


def attention_flops(config: BertConfig, length: int) -> float:
    """Forward FLOPs per sequence of ``QKᵀ`` and ``softmax·V``: ``2 · 2·L²·H`` per layer."""
    return config.layers * 4.0 * length * length * config.hidden


# ---------------------------------------------------------------------------------------------
# eigh measured on this machine
# ---------------------------------------------------------------------------------------------
def measure_eigh(
    dims: Sequence[int], device: str = "cpu", repeats: int = 3, dtype: torch.dtype = torch.float32
) -> dict[int, float]:
    """Seconds of ``torch.linalg.eigh`` (eigenvalues and eigenvectors) of a random symmetric PSD
    ``d×d`` matrix, per ``d``: the fastest of ``repeats`` (the machine may be shared; the minimum
    is the least disturbed by other load)."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for dim in dims:
        x = torch.randn(dim, 2 * dim, generator=gen, dtype=dtype)
        matrix = (x @ x.mT / (2 * dim)).to(device)
        torch.linalg.eigh(matrix)  # warm-up (workspace, library load)
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.linalg.eigh(matrix)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[dim] = min(times)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def describe(blocks: Sequence[BlockShape]) -> dict[str, Any]:
    diagonal = [
        f"{b.name} {'AG'[i] if len(b.factors) == 2 else 'F'} (d={f.dim})"
        for b in blocks
        for i, f in enumerate(b.factors)
        if f.diagonal
    ]
    dims = sorted({d for b in blocks for d in b.dense_dims})
    kinds: dict[str, int] = {}
    for b in blocks:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
    largest = max(blocks, key=lambda b: b.cost)
    return {
        "blocks": len(blocks),
        "blocks_by_kind": kinds,
        "diagonal_factors": diagonal,
        "dense_dims": dims,
        "largest_block": {"name": largest.name, "dims": [f.dim for f in largest.factors]},
        "eigh_flops_total": sum(b.eigh_flops for b in blocks),
        "use_gradient_numel": sum(b.alias_numel for b in blocks),
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def _ms(value: float) -> str:
    return f"{1e3 * value:,.1f}"


def table(results: dict[str, Any]) -> str:
    """Markdown tables of the results (bytes in MB = 1e6 bytes, per rank)."""
    lines = []
    for model in results["models"].values():
        lines.append(
            f"\n**{model['name']}** ({model['parameters'] / 1e6:.1f}M parameters, "
            f"{model['structure']['blocks']} blocks)\n"
        )
        lines.append(
            "| ranks | factor all-reduce payload / wire (MB) | COMM-OPT per inverse update: "
            "sent max / received max (MB) | MEM-OPT per step: sent max / received max (MB) "
            "| tied all-reduce per step (MB) | eigh GFLOP per rank max / mean (imbalance) |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for row in model["per_rank"]:
            fu, co, mo = row["factor_update"], row["inverse_update_comm_opt"], row["step_mem_opt"]
            fl = row["decomposition_flops"]
            lines.append(
                f"| {row['world_size']} | {_mb(fu['allreduce_payload_bytes'])} / "
                f"{_mb(fu['ring_wire_bytes_sent'])} | {_mb(co['sent_bytes']['max'])} / "
                f"{_mb(co['received_bytes']['max'])} | {_mb(mo['sent_bytes']['max'])} / "
                f"{_mb(mo['received_bytes']['max'])} | "
                f"{_mb(row['step_use_gradient_allreduce_payload_bytes'])} | "
                f"{fl['max'] / 1e9:,.1f} / {fl['mean'] / 1e9:,.1f} ({fl['imbalance']:.1f}×) |"
            )
        lines.append(
            f"\nPer-step time (ms, assumed H100 cluster; {model['workload']['batch_per_gpu']} × "
            f"{model['workload']['sample']} per GPU), SGD+DDP step and K-FAC steps "
            "(factor/inverse intervals), ratio to SGD in brackets:\n"
        )
        names = [f"{SHORT[m]}_{f}_{i}" for f, i in INTERVALS for m in MODES]
        header = " | ".join(
            f"{'COMM' if m == MODES[0] else 'MEM'}-OPT {f}/{i}" for f, i in INTERVALS for m in MODES
        )
        lines.append(f"| ranks | SGD+DDP | {header} | eigh slowest rank | fwd+bwd |")
        lines.append("|---:|---:|" + "---:|" * len(names) + "---:|---:|")
        for row in model["time"]:
            terms = row["terms_s"]
            base = terms["fwd_bwd"] + terms["ddp_allreduce"]
            cells = " | ".join(
                f"{_ms(row['steps'][n]['step_s'])} ({row['steps'][n]['ratio_to_sgd_ddp']:.2f}×)"
                for n in names
            )
            lines.append(
                f"| {row['world_size']} | {_ms(base)} | {cells} | "
                f"{_ms(terms['eigh_per_update_slowest_rank'])} | {_ms(terms['fwd_bwd'])} |"
            )
        shown = [row for row in model["time"] if row["world_size"] in (8, 64, 1024)]
        lines.append("\nTime terms (ms; `*_per_update` once per update, the rest every step):\n")
        lines.append("| term | " + " | ".join(f"{row['world_size']} ranks" for row in shown) + " |")
        lines.append("|---|" + "---:|" * len(shown))
        for term in shown[0]["terms_s"]:
            cells = " | ".join(_ms(row["terms_s"][term]) for row in shown)
            lines.append(f"| {term} | {cells} |")
    return "\n".join(lines)


def _ring(row: dict[str, Any]) -> float:
    return 2 * (row["world_size"] - 1) / row["world_size"]


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    colors = {"resnet50": "tab:blue", "bert_large": "tab:red"}
    for key, model in results["models"].items():
        ranks = [row["world_size"] for row in model["per_rank"]]
        color = colors[key]
        name = model["name"]
        for interval_f, interval_i, style in ((1, 10, "-"), (10, 100, ":")):
            comm = [
                row["factor_update"]["ring_wire_bytes_received"] / interval_f
                + row["inverse_update_comm_opt"]["received_bytes"]["max"] / interval_i
                + _ring(row) * row["step_use_gradient_allreduce_payload_bytes"]
                for row in model["per_rank"]
            ]
            mem = [
                row["factor_update"]["ring_wire_bytes_received"] / interval_f
                + row["step_mem_opt"]["received_bytes"]["max"]
                + _ring(row) * row["step_use_gradient_allreduce_payload_bytes"]
                for row in model["per_rank"]
            ]
            left.plot(
                ranks,
                [c / 1e6 for c in comm],
                style,
                color=color,
                marker="o",
                label=f"{name} COMM-OPT {interval_f}/{interval_i}",
            )
            left.plot(
                ranks,
                [m / 1e6 for m in mem],
                style,
                color=color,
                marker="s",
                alpha=0.6,
                label=f"{name} MEM-OPT {interval_f}/{interval_i}",
            )
        eigh = [row["terms_s"]["eigh_per_update_slowest_rank"] * 1e3 for row in model["time"]]
        mean = [
            row["decomposition_flops"]["mean"] / (results["assumptions"]["eigh_tflops"] * 1e9)
            for row in model["per_rank"]
        ]
        right.plot(ranks, eigh, "-o", color=color, label=f"{name}: slowest rank (both modes)")
        right.plot(ranks, mean, "--", color=color, label=f"{name}: mean rank (perfect balance)")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="ranks",
        ylabel="MB received per rank per step (wire)",
        title="K-FAC traffic per rank per step (factors every f, inverses every i)",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="ranks",
        ylabel="ms per inverse update",
        title="Decomposition time per rank (LPT owners, assumed H100 eigh)",
    )
    for axis in (left, right):
        axis.set_xticks(WORLD_SIZES, [str(r) for r in WORLD_SIZES])
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build(name: str, length: int) -> tuple[nn.Module, tuple[Tensor, ...], float]:
    """The model (built on the meta device: shapes only), example inputs (one sample) and the
    forward FLOPs per sample that are not weight GEMMs (attention products).

    Rows per sample are traced from one sample; the position embedding's rows do not grow with
    the batch, so its (tiny) factor FLOPs are overcounted by the batch size.
    """
    with torch.device("meta"):
        if name == "resnet50":
            return resnet50(), (torch.zeros(1, 3, 224, 224),), 0.0
        model = bert_large()
        ids = torch.zeros(1, length, dtype=torch.long)
        return model, (ids,), attention_flops(model.config, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/scale_model.json")
    parser.add_argument("--plot", default="docs/scale_model.png")
    parser.add_argument("--eigh-device", default="cpu")
    parser.add_argument("--eigh-dims", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--eigh-threads", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()
    start = time.perf_counter()
    hw = Assumptions()
    sizes = ElementSizes()
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "world_sizes": list(WORLD_SIZES),
        "element_sizes": dataclasses.asdict(sizes),
        "assumptions": {
            **dataclasses.asdict(hw),
            "workloads": {k: dataclasses.asdict(w) for k, w in WORKLOADS.items()},
            "overlap": "none: every term is on the critical path (an upper bound)",
        },
        "eigh_flops_per_d3": EIGH_FLOPS_PER_D3,
        "eigh_flops_source": "Golub & Van Loan, Matrix Computations, §8.3 (symmetric QR)",
        "models": {},
    }
    for key in ("resnet50", "bert_large"):
        model, inputs, extra = build(key, args.sequence_length)
        blocks = trace(model, inputs)
        parameters = sum(p.numel() for p in model.parameters())
        workload = WORKLOADS[key]
        per = [per_rank(blocks, r, sizes) for r in WORLD_SIZES]
        times = []
        for figures in per:
            entry = step_times(blocks, figures, workload, parameters, hw, extra)
            entry["world_size"] = figures["world_size"]
            times.append(entry)
        results["models"][key] = {
            "name": workload.name,
            "parameters": parameters,
            "workload": dataclasses.asdict(workload),
            "structure": describe(blocks),
            "blocks": [
                {**dataclasses.asdict(b), "factors": [dataclasses.asdict(f) for f in b.factors]}
                for b in blocks
            ],
            "per_rank": [{k: v for k, v in p.items() if not k.startswith("_")} for p in per],
            "time": times,
        }
        for row, entry in zip(results["models"][key]["per_rank"], times, strict=True):
            row["decomposition_seconds_slowest_rank_assumed"] = entry["terms_s"][
                "eigh_per_update_slowest_rank"
            ]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.eigh_threads)
    eigh = measure_eigh(args.eigh_dims, args.eigh_device)
    torch.set_num_threads(threads)
    results["measured"] = {
        "eigh_device": args.eigh_device,
        "eigh_dtype": "float32",
        "threads": args.eigh_threads,
        "cpus": os.cpu_count(),
        "eigh_seconds": {str(d): t for d, t in eigh.items()},
        "eigh_gflops_under_9d3": {
            str(d): EIGH_FLOPS_PER_D3 * d**3 / t / 1e9 for d, t in eigh.items()
        },
    }
    dims = sorted(eigh)
    if len(dims) >= 2:
        slope = math.log(eigh[dims[-1]] / eigh[dims[-2]]) / math.log(dims[-1] / dims[-2])
        results["measured"]["eigh_time_exponent_last_two_dims"] = slope
    results["runtime_s"] = time.perf_counter() - start
    print(table(results))
    print(
        f"\neigh on {args.eigh_device}, {args.eigh_threads} thread(s), float32 "
        "(measured, fastest of 3):"
    )
    for d in dims:
        gflops = results["measured"]["eigh_gflops_under_9d3"][str(d)]
        print(f"  d={d:>5}: {1e3 * eigh[d]:9.1f} ms  = {gflops:6.1f} GFLOP/s under 9d³")
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    plot(results, args.plot)
    print(f"\nwrote {args.json} and {args.plot} in {results['runtime_s']:.1f} s")


if __name__ == "__main__":
    main()
