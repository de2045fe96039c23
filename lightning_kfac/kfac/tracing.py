"""Seeing every use of a trainable parameter: a torch function mode over the forward pass.

K-FAC's curvature blocks belong to *uses* of parameters, not to module types: ``nn.Linear`` calls
``F.linear``, but so do ``nn.MultiheadAttention`` (with ``in_proj_weight``, its row slices, and
``out_proj.weight``, whose module is never called), a tied LM head, or a custom module that calls
``F.linear(x, self.weight)``; HF GPT-2's ``Conv1D`` is ``torch.addmm(bias, x, weight)``. A
``TorchFunctionMode`` sees all of them: every torch function called while it is active passes
through ``UseTracer.__torch_function__`` with its arguments.

Each kind of use (``kinds/``) registers the functions it models; a call of one of them is bound
into a ``RecognizedCall`` by the kind's recogniser and handed to the listener (the capture). This
module knows no kind: the supported calls are listed by ``kinds.supported_uses_markdown()``.

Composite functions whose body calls those (``F.multi_head_attention_forward``) run with the mode
re-entered, so the calls inside are seen too. Any other function that *computes* with a tracked
parameter (its result requires grad and is not a view of the parameter, e.g. ``x + pos_emb``) is an
``unsupported`` use; views (``W.split``, ``W.t()``) and casts (``W.to(dtype)``) are followed to
the use that consumes them.

Why a function mode and not only module hooks: module hooks never see ``out_proj`` inside MHA, a
functional tied head, or ``Conv1D``; a mode sees every use by construction. Its cost is a Python
call per torch function while it is active, so ``UseTracker`` keeps it active only (a) over the
whole training forward while discovering uses (the first training step, and after the set of
trainable parameters changes), and (b) afterwards only inside the modules where supported uses were
found, on the steps that need it (``benchmarks/capture_overhead.py`` measures it).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, tensors_in
from lightning_kfac.kfac.kinds import COMPOSITES, RECOGNIZERS, recognize


class ParameterIndex:
    """Tracked parameters by identity, resolving views and casts of them to ``ParameterView``."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.by_id: dict[int, tuple[str, nn.Parameter]] = {id(p): (n, p) for n, p in named}
        #: Casts/copies of tracked parameters made in the current forward: id -> (ref, view).
        self._derived: dict[int, tuple[weakref.ref[Tensor], ParameterView]] = {}

    def track(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        """Add parameters (e.g. unfrozen during training)."""
        for name, param in named:
            self.by_id[id(param)] = (name, param)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tracked parameter name -> shape."""
        return {name: tuple(param.shape) for name, param in self.by_id.values()}

    def clear_derived(self) -> None:
        self._derived.clear()

    def resolve(self, tensor: Tensor) -> ParameterView | None:
        """The parameter ``tensor`` is (a row slice / transpose / cast of), or None.

        A view of a tracked parameter that is neither a row slice nor a transposed row slice
        resolves to a view with ``rows=(-1, -1)`` (a use K-FAC cannot model).
        """
        entry = self.by_id.get(id(tensor))
        if entry is not None:
            return ParameterView(entry[0])
        derived = self._derived.get(id(tensor))
        if derived is not None and derived[0]() is tensor:
            return derived[1]
        base = tensor._base
        if base is None:
            return None
        entry = self.by_id.get(id(base))
        if entry is None:
            return None
        return _view_geometry(entry[0], entry[1], tensor)

    def note_derived(self, result: Any, source: ParameterView) -> None:
        if isinstance(result, Tensor):
            self._derived[id(result)] = (weakref.ref(result), source)


def _view_geometry(name: str, param: Tensor, view: Tensor) -> ParameterView:
    """Classify ``view`` of ``param`` as a row slice or a transposed row slice."""
    stride, pstride = view.stride(), param.stride()
    offset = view.storage_offset() - param.storage_offset()
    row_stride = pstride[0] if param.dim() else 1
    aligned = bool(row_stride) and offset % row_stride == 0
    start = offset // row_stride if aligned else 0
    same_layout = stride == pstride and view.shape[1:] == param.shape[1:]
    if aligned and view.dim() == param.dim() and same_layout:
        return ParameterView(name, _rows(start, view.shape[0], param.shape[0]))
    transposed = stride == pstride[::-1] and view.shape[0] == param.shape[1]
    if aligned and view.dim() == param.dim() == 2 and transposed:
        return ParameterView(name, _rows(start, view.shape[1], param.shape[0]), transposed=True)
    if offset == 0 and _is_broadcast(param, view):
        return ParameterView(name, broadcast=True)
    if param.dim() == 3:  # stacked matrices (experts): one, or all with the last two swapped
        if aligned and view.dim() == 2 and view.shape == param.shape[1:] and stride == pstride[1:]:
            return ParameterView(name, (start, start + 1), selected=True)
        swapped = (pstride[0], pstride[2], pstride[1])
        shape = (param.shape[0], param.shape[2], param.shape[1])
        if offset == 0 and view.dim() == 3 and stride == swapped and tuple(view.shape) == shape:
            return ParameterView(name, transposed=True)
    return ParameterView(name, (-1, -1))


def _is_broadcast(param: Tensor, view: Tensor) -> bool:
    """``view`` is ``param.expand(...)``: ``param``'s dims (right-aligned) with stride 0 where it
    is expanded, and new leading dims of stride 0."""
    extra = view.dim() - param.dim()
    if extra < 0 or not any(s == 0 for s in view.stride()):
        return False
    if any(view.stride()[i] != 0 for i in range(extra)):
        return False
    for size, stride, psize, pstride in zip(
        view.shape[extra:], view.stride()[extra:], param.shape, param.stride(), strict=True
    ):
        if (stride, size) != (pstride, psize) and not (stride == 0 and psize == 1):
            return False
    return True


def _rows(start: int, count: int, total: int) -> tuple[int, int] | None:
    return None if (start == 0 and count == total) else (start, start + count)


#: Functions whose result is a plain copy of a parameter (gradient flows through unchanged).
CASTS = frozenset(
    {
        Tensor.to,
        Tensor.float,
        Tensor.double,
        Tensor.half,
        Tensor.bfloat16,
        Tensor.type_as,
        Tensor.contiguous,
        Tensor.clone,
    }
)


class UseListener:
    """What the tracer reports to (implemented by ``capture.UseCapture``)."""

    index: ParameterIndex

    def on_call(self, call: RecognizedCall, site: str) -> Any:  # pragma: no cover - interface
        """Handle a recognised call made inside module ``site``; return the function's result."""
        raise NotImplementedError

    def on_unsupported(self, view: ParameterView, operation: str, site: str) -> None:
        """A tracked parameter was computed with by an operation K-FAC does not model."""

    def on_forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """The root module's forward starts; return whether to trace all of it."""
        return False

    def wants(self, site: str) -> bool:
        """Whether the coming calls inside module ``site`` need tracing (after discovery)."""
        return False

    def traces(self) -> bool:
        """Whether the training forward that just started traces any site."""
        return False


class UseTracer(TorchFunctionMode):
    """The function mode: recognised calls go to the listener, other calls are checked for
    unsupported uses of tracked parameters."""

    def __init__(self, listener: UseListener, sites: list[str]) -> None:
        super().__init__()
        self.listener = listener
        #: Qualified names of the modules whose forward is running (innermost last).
        self.sites = sites

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in RECOGNIZERS:
            call = recognize(func, list(args), kwargs)
            if call is not None:
                return self.listener.on_call(call, self.sites[-1])
        composite = COMPOSITES.get(func)
        if composite is not None:
            with self:
                return composite(*args, **kwargs)
        result = func(*args, **kwargs)
        self._check_other(func, args, kwargs, result)
        return result

    def _check_other(
        self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Follow casts; report computations with tracked parameters that K-FAC does not model."""
        index = self.listener.index
        sources = [view for t in tensors_in(args, kwargs) if (view := index.resolve(t)) is not None]
        if not sources:
            return
        if func in CASTS and len(sources) == 1 and sources[0] == index.resolve(args[0]):
            index.note_derived(result, sources[0])
            return
        outputs = result if isinstance(result, list | tuple) else (result,)
        for output in outputs:
            if not isinstance(output, Tensor) or not output.requires_grad:
                continue
            if output._base is not None and index.resolve(output) is not None:
                continue  # a view of the parameter: its consumer is the use
            name = getattr(func, "__name__", None) or repr(func)
            for view in sources:
                self.listener.on_unsupported(view, name, self.sites[-1])
            return


class UseTracker:
    """Installs module hooks that activate the ``UseTracer`` where needed.

    - The root module's forward marks micro-batch boundaries (``on_forward_start``) and, while
      ``discovering``, runs entirely under the mode, with every submodule's name on the site stack.
    - Afterwards, only the ``sites`` (modules where supported uses were found) activate the mode,
      and only when the listener ``wants`` that site traced in this step.
    - ``torch.compile``: a training forward that traces anything runs eagerly
      (``torch.compiler.set_stance("force_eager")``: the mode and the capture are Python, which
      compiled code must not contain), and the sites' hooks are on the modules only for such
      forwards, so a forward that traces nothing runs the compiled graphs, hook-free, unchanged.
    """

    def __init__(self, root: nn.Module, listener: UseListener) -> None:
        self.root = root
        self.listener = listener
        self.names = {id(module): name for name, module in root.named_modules()}
        self.site_stack: list[str] = []
        self.tracer = UseTracer(listener, self.site_stack)
        self._depth = 0  # nesting of activations of the mode
        self._site_frames: list[bool] = []
        self._root_handles: list[RemovableHandle] = []
        self._site_handles: list[RemovableHandle] = []
        self.discovering = False
        self._root_frames: list[bool] = []
        self._site_modules: list[tuple[str, nn.Module]] = []
        self._eager: list[Any] = []  # the force_eager stance of the running traced forward
        self._root_handles.append(
            root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True)
        )
        self._root_handles.append(root.register_forward_hook(self._root_post, always_call=True))

    # -- activation -------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        self.site_stack.append(name)
        if self._depth == 0:
            self.tracer.__enter__()
        self._depth += 1

    def _exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.tracer.__exit__(None, None, None)
            self.listener.index.clear_derived()
        self.site_stack.pop()

    # The root's hooks never run inside a compiled graph (a compiled root module: they break the
    # graph there and run eagerly), so that they can switch the forward to eager mode.
    @torch.compiler.disable
    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Root calls nest (Lightning calls training_step through the module's __call__, and
        # training_step calls self(x)): only the outermost one starts a micro-batch, and a stack
        # pairs every pre hook with its post hook.
        outermost = not self._root_frames
        active = self.listener.on_forward_start(args, kwargs) if outermost else False
        self._root_frames.append(active)
        if outermost:
            traced = module.training and torch.is_grad_enabled() and self.listener.traces()
            self._arm_sites(traced)
            if traced:
                stance = torch.compiler.set_stance("force_eager")
                stance.__enter__()
                self._eager.append(stance)
        if active:
            self._enter("")

    @torch.compiler.disable
    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._root_frames and self._root_frames.pop():
            self._exit()
        if not self._root_frames and self._eager:
            self._eager.pop().__exit__(None, None, None)

    def _site_pre(self, module: nn.Module, args: Any) -> None:
        site = self.names.get(id(module), "?")
        active = bool(self._depth) or (
            module.training and torch.is_grad_enabled() and self.listener.wants(site)
        )
        # Pre and post hooks of module calls nest, so a stack pairs them (a flag on the module
        # would be shared with any other tracker on the same model).
        self._site_frames.append(active)
        if active:
            self._enter(site)

    def _site_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._site_frames and self._site_frames.pop():
            self._exit()

    # -- configuration ----------------------------------------------------------------------
    def start_discovery(self) -> None:
        """Trace whole training forwards (every module on the site stack) until ``set_sites``."""
        self.discovering = True
        self._set_hooks(list(self.root.named_modules())[1:])

    def set_sites(self, site_names: Sequence[str]) -> None:
        """Stop discovering; trace only inside the modules named (``""``: the root)."""
        self.discovering = False
        modules = dict(self.root.named_modules())
        self._set_hooks([(name, modules[name]) for name in site_names if name and name in modules])

    def _arm_sites(self, traced: bool) -> None:
        """The sites' hooks on the modules for a forward that traces, off for one that does not."""
        if traced and not self._site_handles:
            self._install(self._site_modules)
        elif not traced and self._site_handles:
            self._remove_site_hooks()

    def _set_hooks(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self._site_modules = list(modules)
        self._remove_site_hooks()
        self._install(self._site_modules)

    def _remove_site_hooks(self) -> None:
        for handle in self._site_handles:
            handle.remove()
        self._site_handles = []

    def _install(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        for _, module in modules:
            self._site_handles.append(module.register_forward_pre_hook(self._site_pre))
            self._site_handles.append(
                module.register_forward_hook(self._site_post, always_call=True)
            )

    def remove(self) -> None:
        for handle in self._root_handles + self._site_handles:
            handle.remove()
        self._root_handles, self._site_handles = [], []
        while self._depth:  # removed mid-forward (an exception): never leave the mode pushed
            self._exit()
        while self._eager:
            self._eager.pop().__exit__(None, None, None)
        self._root_frames.clear()
        self._site_frames.clear()
