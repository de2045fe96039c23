"""Dense references and comparison helpers for the tests."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close(
    actual: Tensor, expected: Tensor, *, rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    """``torch.testing.assert_close`` that also prints the worst entries when it fails."""
    actual, expected = actual.detach(), expected.detach().to(actual.dtype)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bool(bad.any()):
        diff = (actual - expected).abs()
        worst = torch.topk(diff.flatten(), k=min(5, diff.numel())).indices
        rows = []
        for flat in worst.tolist():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
            rows.append(
                f"  at {index}: actual {actual[index].item():.6e}"
                f" expected {expected[index].item():.6e}"
            )
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} entries differ (rtol={rtol}, atol={atol}); worst:\n"
            + "\n".join(rows)
        )


def vec(matrix: Tensor) -> Tensor:
    """Column-major vec of a ``[rows, cols]`` matrix."""
    return matrix.mT.reshape(-1)


def unvec(vector: Tensor, rows: int, cols: int) -> Tensor:
    return vector.reshape(cols, rows).mT


def dense_damped_kron_solve(A: Tensor, G: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``unvec((A ⊗ G + λ I)^-1 vec(grad))`` by ``torch.linalg.solve`` on the explicit matrix."""
    kron = torch.kron(A, G)
    eye = torch.eye(kron.shape[0], dtype=kron.dtype)
    return unvec(torch.linalg.solve(kron + damping * eye, vec(grad)), grad.shape[0], grad.shape[1])


def random_spd(
    dim: int, *, rank: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """A random symmetric PSD matrix (rank-deficient when ``rank < dim``) in float64."""
    rank = dim if rank is None else rank
    x = torch.randn(dim, rank, dtype=torch.float64, generator=generator)
    return x @ x.T / rank


def per_sample_factors(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn,
    *,
    bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense per-sample reference for one layer: ``A``, ``G`` and ``dW`` by a loop over samples.

    For each sample ``n`` the model runs alone; ``x`` is the layer input reshaped to
    ``[T, d_in]`` (a ``1`` appended with bias), ``g = ∂l_n/∂s`` the gradient of that sample's loss
    w.r.t. the layer output (``[T, d_out]``). Then ``A = Σ a a^T / (N T)``, ``G = Σ g g^T / N``,
    ``dW = Σ g a^T / N`` — docs/design.md §2 with the sums over ``t`` written out. Valid for
    layers whose output rows correspond to input rows (Linear); Conv2d has its own loop in
    ``test_conv2d``.
    """
    captured: dict[str, Tensor] = {}

    def hook(module, inputs_, output):
        captured["x"] = inputs_[0]
        output.retain_grad()
        captured["s"] = output

    handle = layer.register_forward_hook(hook)
    count = inputs.shape[0]
    a_sum = g_sum = grad_sum = None
    positions = 1
    try:
        for n in range(count):
            loss = loss_fn(model(inputs[n : n + 1]), targets[n : n + 1])
            (g,) = torch.autograd.grad(loss, captured["s"])
            x = captured["x"].detach().reshape(-1, captured["x"].shape[-1])
            g = g.reshape(-1, g.shape[-1])
            positions = x.shape[0]
            if bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            a_n, g_n, w_n = x.T @ x, g.T @ g, g.T @ x
            a_sum = a_n if a_sum is None else a_sum + a_n
            g_sum = g_n if g_sum is None else g_sum + g_n
            grad_sum = w_n if grad_sum is None else grad_sum + w_n
    finally:
        handle.remove()
    return a_sum / (count * positions), g_sum / count, grad_sum / count
