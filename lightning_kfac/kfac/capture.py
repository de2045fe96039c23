"""UseCapture: routes the calls the tracer sees to the sums of their uses.

Micro-batch boundaries come from the root module's forward: each training forward of the root
(in Lightning, the redirected ``training_step``) starts a new forward id and sets the batch size
``N`` — dimension ``batch_dim`` (default 0, Lightning's rule for batches) of the first tensor
among the forward's arguments. All calls of one use within one forward are weight-sharing
positions of that use.

While discovering (the first training forward, and after parameters become trainable) every
recognised call's use is recorded (``discovered``) and gets its ``UseSums`` at once, so that the
first step already captures. Once the structure is fixed (``set_structure``) calls of a kept use
are captured, and calls of an unknown use are kept in ``unexpected`` until the preconditioner
agrees on them (``take_unexpected``, ``adopt``). The capture never builds blocks: blocks are made
from the fixed structure by the preconditioner and read these sums (``accumulation``).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_kfac.kfac.accumulation import PendingCall, RowSampler, UseSums
from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, tensors_in
from lightning_kfac.kfac.kinds import SampleLayout, kind_named, make_model
from lightning_kfac.kfac.options import KFACApproximation
from lightning_kfac.kfac.parameters import TrackedParameters
from lightning_kfac.kfac.tracing import ParameterIndex, UseListener, UseTracker
from lightning_kfac.kfac.uses import UseSpec


def first_tensor_batch_size(values: Iterable[Any], dim: int = 0) -> int | None:
    """Size of dimension ``dim`` of the first tensor found (depth first through lists, tuples
    and dicts); 1 for a tensor without that dimension; the number of sequences of a
    ``PackedSequence``."""
    for value in values:
        if isinstance(value, PackedSequence):
            return int(value.batch_sizes[0])  # batch_sizes lives on the CPU: no device sync
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


def batch_dim_hints(root: nn.Module) -> dict[str, int]:
    """The sample dimension of calls made in each module, where the model says it: inside
    ``nn.MultiheadAttention`` projections see ``(L, N, E)``; modules under a parent with a
    ``batch_first`` attribute follow it. Computed once, outside any traced forward."""
    modules = dict(root.named_modules())
    hints: dict[str, int] = {}
    for site, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            hints[site] = 1
            continue
        parts = site.split(".") if site else []
        for depth in range(len(parts), -1, -1):
            flag = getattr(modules.get(".".join(parts[:depth])), "batch_first", None)
            if isinstance(flag, bool):
                hints[site] = 0 if flag else 1
                break
    return hints


def find_padding_mask(
    option: str | Callable[[Any], Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_size: int,
) -> Tensor | None:
    """The ``[N, T]`` bool mask of real positions the ``padding_mask`` option names in a training
    forward's arguments (None: no mask; ``ValueError`` for a mask of another shape)."""
    if option is None:
        return None
    if callable(option):
        mask = option(args[0] if args else kwargs)
    else:
        mask = kwargs.get(option)
        if mask is None:
            mask = next((a[option] for a in args if isinstance(a, Mapping) and option in a), None)
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != batch_size:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"padding_mask={option!r} gave {shape}, not an [N, T] mask for this batch of "
            f"{batch_size}; pass padding_mask=None, or a callable of the batch returning one"
        )
    return mask != 0


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    """What the capture needs of the options."""

    factor_dtype: torch.dtype
    approximation: KFACApproximation
    factor_max_rows: int | None
    max_factor_dim: int
    batch_dim: int = 0
    padding_mask: str | Callable[[Any], Any] | None = None


def _expand(tensor: Tensor, dim: int, size: int) -> Tensor:
    shape = [-1] * tensor.dim()
    shape[dim] = size
    return tensor.expand(*shape)


class UseCapture(UseListener):
    """Receives recognised calls and feeds the sums of their uses.

    Args:
        root: The model whose training forward delimits micro-batches.
        parameters: The tracked parameters (rescanned at each training forward).
        settings: Dtype, approximation, row sampling and factor sides.
        loss_scale: The current factor between the backpropagated and the mean loss.
        on_complete: Called with a use's spec when its last call of a backward got its
            gradient (the preconditioner may start reducing its sums early).
    """

    def __init__(
        self,
        root: nn.Module,
        parameters: TrackedParameters,
        settings: CaptureSettings,
        *,
        loss_scale: Callable[[], float | Tensor],
        on_complete: Callable[[UseSpec], None],
    ) -> None:
        self.root = root
        self.parameters = parameters
        self.settings = settings
        self.loss_scale = loss_scale
        self.on_complete = on_complete
        self.index = ParameterIndex(list(parameters.tracked.items()))
        self.batch_dim_hints = batch_dim_hints(root)
        #: Whether the passes before the coming step feed the factors (``arm``).
        self.capturing = True
        self.forward_id = 0
        self.batch_size = 1
        #: The running forward's ``[N, T]`` mask of real (not padding) positions, or None.
        self.positions: Tensor | None = None
        #: Outputs of this forward's recognised calls, by id: (output, use, pending capture).
        self._outputs: dict[int, tuple[weakref.ref[Tensor], UseSpec, PendingCall | None]] = {}
        self.training_forwards = 0
        #: The sums of every known use: discovered ones, then the agreed structure's.
        self.uses: dict[UseSpec, UseSums] = {}
        #: Specs seen while discovering, in order of first sight.
        self.discovered: dict[UseSpec, None] = {}
        #: Specs seen after the structure was fixed that are not part of it.
        self.unexpected: dict[UseSpec, None] = {}
        #: Parameter name -> operations K-FAC cannot model that used it.
        self.unsupported: dict[str, set[str]] = {}
        #: Parts of each kept use whose own gradient is collected (parameters with several uses).
        self.alias_parts: Mapping[UseSpec, frozenset[str]] = {}
        #: Sites of uses whose parameter has other uses: traced on every step, since each use's
        #: own gradient is needed to precondition it.
        self.use_gradient_sites: frozenset[str] = frozenset()
        self.root_is_site = False
        self.tracker = UseTracker(root, self)

    # -- configuration ----------------------------------------------------------------------
    @property
    def discovering(self) -> bool:
        return self.tracker.discovering

    def start_discovery(self) -> None:
        self.discovered = {}
        self.tracker.start_discovery()

    def set_structure(
        self,
        kept: Iterable[UseSpec],
        alias_parts: Mapping[UseSpec, frozenset[str]],
        sites: Iterable[str],
    ) -> None:
        """The agreed structure: capture only ``kept`` uses, trace only ``sites``."""
        sites = list(sites)
        self.uses = {spec: self.sums_of(spec) for spec in kept}
        self.alias_parts = alias_parts
        self.unexpected = {}
        self.root_is_site = "" in sites
        self.use_gradient_sites = frozenset(
            spec.site for spec, parts in alias_parts.items() if parts
        )
        self.tracker.set_sites(sites)

    def arm(self, capturing: bool) -> None:
        """Whether the passes before the coming step feed the factors (set before each step)."""
        self.capturing = capturing

    def sums_of(self, spec: UseSpec) -> UseSums:
        """The sums of ``spec`` (made now for a use this rank has not called yet)."""
        sums = self.uses.get(spec)
        if sums is None:
            settings = self.settings
            model = make_model(spec, self.index.shapes, settings.max_factor_dim)
            sums = self.uses[spec] = UseSums(
                model,
                settings.factor_dtype,
                approximation=settings.approximation,
                sampler=RowSampler(settings.factor_max_rows, spec.stable_seed()),
                batch_dim=self.batch_dim_hints.get(spec.site),
                layout_dim=settings.batch_dim,
            )
        return sums

    def adopt(self, specs: Iterable[UseSpec]) -> None:
        """Uses agreed on elsewhere (other ranks, a checkpoint) join the discovered ones."""
        for spec in specs:
            self.discovered.setdefault(spec)
            self.sums_of(spec)

    def take_unexpected(self) -> list[UseSpec]:
        unexpected, self.unexpected = list(self.unexpected), {}
        return unexpected

    def discard(self) -> None:
        """Forget what was captured since the last step."""
        for sums in self.uses.values():
            sums.discard()

    def remove(self) -> None:
        self.tracker.remove()

    # -- forward boundaries (UseListener) -----------------------------------------------------
    def wants(self, site: str) -> bool:
        return self.discovering or self.capturing or site in self.use_gradient_sites

    def traces(self) -> bool:
        return self.discovering or self.capturing or bool(self.use_gradient_sites)

    def on_forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if not (self.root.training and torch.is_grad_enabled()):
            return False
        new = self.parameters.refresh()
        if new:  # parameters became trainable: trace their uses in this forward
            self.index.track(new)
            self.start_discovery()
        self.forward_id += 1
        self.training_forwards += 1
        self._outputs.clear()
        values = (*args, *kwargs.values())
        self.batch_size = first_tensor_batch_size(values, self.settings.batch_dim) or 1
        self.positions = find_padding_mask(
            self.settings.padding_mask, args, kwargs, self.batch_size
        )
        return self.discovering or (self.root_is_site and self.wants(""))

    # -- calls (UseListener) ------------------------------------------------------------------
    def on_unsupported(self, view: ParameterView, operation: str, site: str) -> None:
        where = f" in {site!r}" if site else ""
        self.unsupported.setdefault(view.name, set()).add(f"{operation}{where}")

    @staticmethod
    def _problem(
        call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        if call.unsupported is not None:
            return call.unsupported
        for view in (weight, bias):
            if view is not None and view.is_unmodellable:
                return f"{call.kind} with a view of the parameter that is not a row slice"
        model = kind_named(call.kind).model
        assert model is not None  # a recognised call's kind has a model
        return model.problem(call, weight, bias)

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
        for view in others:
            self.on_unsupported(view, f"{call.operation} (not as its weight)", site)
        problem = self._problem(call, weight, bias)
        if problem is not None:
            for view in (weight, bias):
                if view is not None:
                    self.on_unsupported(view, problem, site)
            return call.run()
        model = kind_named(call.kind).model
        assert model is not None
        spec = model.use_of(call, site, weight, bias)
        if call.absorbs is not None and not self._absorb(call.absorbs, spec):
            self.on_unsupported(
                spec.first_part, f"{call.kind} whose first half was not traced", site
            )
            return call.run()
        discovering = self.discovering
        if spec not in self.uses and not discovering:
            self.unexpected.setdefault(spec)
            return self._remember(call.run(), spec, None)
        sums = self.sums_of(spec)
        layout = self._sample_layout(sums, call)
        if isinstance(layout, str):  # no per-sample gradient: the use cannot be a block
            self.on_unsupported(spec.first_part, layout, site)
            return call.run()
        if discovering:
            self.discovered.setdefault(spec)
        # While discovering, which parameters have several uses is not known yet (the structure
        # is fixed in step()): keep every use's own gradient, so that the first step can already
        # sum the uses' preconditioned gradients of a tied parameter.
        aliased = self.alias_parts.get(spec, frozenset())
        weight_arg = bias_arg = None
        if aliased or discovering:
            weight_arg = self._alias(
                call.weight, sums, "weight", "weight" in aliased or (discovering and bool(weight))
            )
            bias_arg = self._alias(
                call.bias, sums, "bias", "bias" in aliased or (discovering and bool(bias))
            )
        output = call.run(weight_arg, bias_arg)
        if self.capturing and isinstance(output, Tensor) and output.requires_grad:
            layer_input = call.input
            if layout is SampleLayout.BROADCAST:
                # The use's output is shared by the samples and broadcast against them later:
                # expanded to the micro-batch here (the same values downstream), its gradient
                # is per sample, and its input counts once per sample.
                dim = sums.batch_dim_of(layer_input, self.batch_size)
                output = _expand(output, dim, self.batch_size)
                layer_input = _expand(layer_input, dim, self.batch_size)
            with torch.autocast(device_type=output.device.type, enabled=False):
                pending = sums.begin_call(
                    layer_input, self.forward_id, self.batch_size, call, self.positions
                )
            output.register_hook(functools.partial(self._output_gradient, spec, sums, pending))
            return self._remember(output, spec, pending)
        return self._remember(output, spec, None)

    def _remember(self, output: Any, spec: UseSpec, pending: PendingCall | None) -> Any:
        """Note the output of a recognised call (a later call may absorb it)."""
        if isinstance(output, Tensor):
            self._outputs[id(output)] = (weakref.ref(output), spec, pending)
        return output

    def _absorb(self, earlier: Tensor, spec: UseSpec) -> bool:
        """Withdraw the use that produced ``earlier`` from this forward (a later call models it
        together with its own parameter); False if no traced call produced it."""
        entry = self._outputs.pop(id(earlier), None)
        if entry is None or entry[0]() is not earlier:
            return False
        _, absorbed, pending = entry
        if absorbed == spec:
            return True
        sums = self.uses.get(absorbed)
        if pending is not None and sums is not None:
            sums.cancel(pending)
        self.unexpected.pop(absorbed, None)
        if self.discovering:
            self.discovered.pop(absorbed, None)
            if sums is not None and not sums.open_calls:
                self.uses.pop(absorbed, None)
        return True

    def _sample_layout(self, sums: UseSums, call: RecognizedCall) -> SampleLayout | str:
        x = call.input
        if not isinstance(x, Tensor):
            return SampleLayout.SAMPLES
        dim = sums.batch_dim_of(x, self.batch_size)
        return sums.model.sample_layout(x, dim, self.batch_size)

    @staticmethod
    def _alias(tensor: Any, sums: UseSums, part: str, wanted: Any) -> Tensor | None:
        """A view of the passed parameter whose gradient is this use's alone."""
        if not isinstance(tensor, Tensor) or not wanted:
            return None
        alias = tensor.view_as(tensor)
        alias.register_hook(functools.partial(sums.keep_use_gradient, part))
        return alias

    def _output_gradient(
        self, spec: UseSpec, sums: UseSums, pending: PendingCall, gradient: Tensor
    ) -> None:
        with torch.autocast(device_type=gradient.device.type, enabled=False):
            sums.end_call(pending, gradient, self.loss_scale())
        if sums.open_calls == 0:
            self.on_complete(spec)
