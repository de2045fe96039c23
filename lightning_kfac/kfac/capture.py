"""UseCapture: routes the calls the tracer sees to the blocks of their uses.

Micro-batch boundaries come from the root module's forward: each training forward of the root
(in Lightning, the redirected ``training_step``) starts a new forward id and sets the batch size
``N`` — dimension ``batch_dim`` (default 0, Lightning's rule for batches) of the first tensor
among the forward's arguments.
All calls of one use within one forward are weight-sharing positions of that use.

Until the structure is fixed (the first ``step()``), every recognised call is recorded as a
``UseSpec``; afterwards calls of a known use are captured, and calls of an unknown use are kept
in ``unexpected`` for the preconditioner to pick up at its next inverse update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.kfac.blocks import Block, PendingCall
from lightning_kfac.kfac.tracing import (
    ParameterIndex,
    ParameterView,
    RecognizedCall,
    UseKind,
    UseListener,
    UseTracker,
    tensors_in,
)
from lightning_kfac.kfac.uses import UseSpec, make_model, spec_from_call


def first_tensor_batch_size(values: Iterable[Any], dim: int = 0) -> int | None:
    """Size of dimension ``dim`` of the first tensor found (depth first through lists, tuples
    and dicts); 1 for a tensor without that dimension."""
    for value in values:
        if isinstance(value, Tensor):
            return int(value.shape[dim]) if value.dim() > dim else 1
        if isinstance(value, dict):
            found = first_tensor_batch_size(value.values(), dim)
        elif isinstance(value, list | tuple):
            found = first_tensor_batch_size(value, dim)
        else:
            continue
        if found is not None:
            return found
    return None


class UseCapture(UseListener):
    """Receives recognised calls; creates blocks while discovering, feeds them afterwards.

    Args:
        root: The model whose training forward delimits micro-batches.
        named_parameters: The tracked (trainable, not skipped) parameters.
        make_block: Builds the ``Block`` of a spec (the preconditioner's factory).
        capturing: Whether the passes before the coming step feed the factors.
        loss_scale: The current factor between the backpropagated and the mean loss.
        on_block_complete: Called when a block's last call of the final micro-batch got its
            gradient (to start reducing its factors early).
        on_forward: Called at the start of every training forward of the root.
    """

    def __init__(
        self,
        root: nn.Module,
        named_parameters: list[tuple[str, nn.Parameter]],
        *,
        make_block: Callable[[UseSpec], Block],
        capturing: Callable[[], bool],
        loss_scale: Callable[[], float | Tensor],
        on_block_complete: Callable[[Block], None],
        on_forward: Callable[[], None],
        batch_dim: int = 0,
    ) -> None:
        self.root = root
        self.batch_dim = batch_dim
        self.index = ParameterIndex(named_parameters)
        self.make_block = make_block
        self.capturing = capturing
        self.loss_scale = loss_scale
        self.on_block_complete = on_block_complete
        self.on_forward = on_forward
        self.forward_id = 0
        self.batch_size = 1
        self.training_forwards = 0
        #: Blocks by spec: provisional while discovering, the agreed structure afterwards.
        self.blocks: dict[UseSpec, Block] = {}
        #: Specs seen while discovering, in order of first sight.
        self.discovered: dict[UseSpec, None] = {}
        #: Specs seen after the structure was fixed that are not part of it.
        self.unexpected: dict[UseSpec, None] = {}
        #: Parameter name -> operations K-FAC cannot model that used it.
        self.unsupported: dict[str, set[str]] = {}
        #: Sites of uses whose parameter has other uses: traced on every step, since each use's
        #: own gradient is needed to precondition it (``Block.needs_use_gradients``).
        self.use_gradient_sites: frozenset[str] = frozenset()
        self.root_is_site = False
        self.tracker = UseTracker(
            root, self, on_forward_start=self._forward_start, wanted=self._wanted
        )

    # -- configuration ----------------------------------------------------------------------
    @property
    def discovering(self) -> bool:
        return self.tracker.discovering

    def start_discovery(self) -> None:
        self.discovered = {}
        self.tracker.start_discovery()

    def track(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        for name, param in named_parameters:
            self.index.by_id[id(param)] = (name, param)

    def set_structure(self, blocks: dict[UseSpec, Block], sites: Iterable[str]) -> None:
        sites = list(sites)
        self.blocks = blocks
        self.unexpected = {}
        self.root_is_site = "" in sites
        self.use_gradient_sites = frozenset(
            spec.site for spec, block in blocks.items() if block.needs_use_gradients
        )
        self.tracker.set_sites(sites)

    def remove(self) -> None:
        self.tracker.remove()

    # -- forward boundaries -------------------------------------------------------------------
    def _wanted(self, site: str) -> bool:
        return self.discovering or self.capturing() or site in self.use_gradient_sites

    def _forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if not (self.root.training and torch.is_grad_enabled()):
            return False
        self.on_forward()
        self.forward_id += 1
        self.training_forwards += 1
        values = (*args, *kwargs.values())
        self.batch_size = first_tensor_batch_size(values, self.batch_dim) or 1
        return self.discovering or (self.root_is_site and self._wanted(""))

    # -- calls ----------------------------------------------------------------------------------
    def on_unsupported(self, view: ParameterView, operation: str, site: str) -> None:
        where = f" in {site!r}" if site else ""
        self.unsupported.setdefault(view.name, set()).add(f"{operation}{where}")

    def _problem(
        self, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        if call.unsupported is not None:
            return call.unsupported
        if weight is None and call.kind != UseKind.NORM:
            return "bias of a weight K-FAC does not train (frozen or skipped)"
        for view in (weight, bias):
            if view is not None and view.rows == (-1, -1):
                return f"{call.kind} with a view of the parameter that is not a row slice"
        if call.kind != UseKind.LINEAR:
            for view in (weight, bias):
                if view is not None and (view.rows is not None or view.transposed):
                    return f"{call.kind} with a slice of the parameter"
        if call.kind == UseKind.LINEAR and bias is not None and weight is not None:
            assert call.weight is not None and call.bias is not None  # both resolved
            out_rows = call.weight.shape[-1 if call.transposed_form else 0]
            if bias.transposed or call.bias.shape[0] != out_rows:
                return "linear with a bias that does not match the weight's outputs"
        return None

    def on_call(self, call: RecognizedCall, site: str) -> Any:
        index = self.index
        weight = index.resolve(call.weight) if isinstance(call.weight, Tensor) else None
        bias = index.resolve(call.bias) if isinstance(call.bias, Tensor) else None
        others = [
            view
            for tensor in tensors_in(call.args, call.kwargs)
            if tensor is not call.weight and tensor is not call.bias
            and (view := index.resolve(tensor)) is not None
        ]  # fmt: skip
        if weight is None and bias is None and not others:
            return call.run()
        operation = getattr(call.func, "__name__", str(call.func))
        for view in others:
            self.on_unsupported(view, f"{operation} (not as its weight)", site)
        problem = self._problem(call, weight, bias)
        if problem is not None:
            for view in (weight, bias):
                if view is not None:
                    self.on_unsupported(view, problem, site)
            return call.run()
        spec = spec_from_call(call, site, weight, bias)
        block = self.blocks.get(spec)
        if block is None:
            if not self.discovering:
                self.unexpected.setdefault(spec)
                return call.run()
            self.discovered.setdefault(spec)
            block = self.blocks[spec] = self.make_block(spec)
        elif self.discovering:
            self.discovered.setdefault(spec)
        weight_arg = bias_arg = None
        # While discovering, which parameters have several uses is not known yet (the structure
        # is fixed in step()): keep every use's own gradient, so that the first step can already
        # sum the uses' preconditioned gradients of a tied parameter.
        if block.needs_use_gradients or self.discovering:
            discovering = self.discovering
            weight_arg = self._alias(
                call.weight, block, "weight", always=discovering and weight is not None
            )
            bias_arg = self._alias(
                call.bias, block, "bias", always=discovering and bias is not None
            )
        output = call.run(weight_arg, bias_arg)
        if self.capturing() and isinstance(output, Tensor) and output.requires_grad:
            with torch.autocast(device_type=output.device.type, enabled=False):
                pending = block.begin_call(call.input, self.forward_id, self.batch_size, call)
            output.register_hook(functools.partial(self._output_gradient, block, pending))
        return output

    @staticmethod
    def _alias(tensor: Any, block: Block, part: str, *, always: bool = False) -> Tensor | None:
        """A view of the passed parameter whose gradient is this use's alone."""
        if not isinstance(tensor, Tensor) or not (always or part in block.alias_parts):
            return None
        alias = tensor.view_as(tensor)

        def keep(gradient: Tensor) -> None:
            held = block.use_gradients.get(part)
            if held is None:
                block.use_gradients[part] = gradient.detach().clone()
            else:
                held.add_(gradient.detach())

        alias.register_hook(keep)
        return alias

    def _output_gradient(self, block: Block, pending: PendingCall, gradient: Tensor) -> None:
        with torch.autocast(device_type=gradient.device.type, enabled=False):
            block.end_call(pending, gradient, self.loss_scale())
        if block.open_calls == 0:
            self.on_block_complete(block)

    def make_model(self, spec: UseSpec, max_dim: int) -> Any:
        shapes = {name: tuple(p.shape) for name, p in self.index.by_id.values()}
        return make_model(spec, shapes, max_dim)
