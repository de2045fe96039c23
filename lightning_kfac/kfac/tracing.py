"""Seeing every use of a trainable parameter: a torch function mode over the forward pass.

K-FAC's curvature blocks belong to *uses* of parameters, not to module types: ``nn.Linear`` calls
``F.linear``, but so do ``nn.MultiheadAttention`` (with ``in_proj_weight``, its row slices, and
``out_proj.weight``, whose module is never called), a tied LM head, or a custom module that calls
``F.linear(x, self.weight)``; HF GPT-2's ``Conv1D`` is ``torch.addmm(bias, x, weight)``. A
``TorchFunctionMode`` sees all of them: every torch function called while it is active passes
through ``UseTracer.__torch_function__`` with its arguments.

``recognize`` maps a call to a ``RecognizedCall`` when it is a form K-FAC models:

=========================================  =========  ============================================
call                                       kind       weight as a linear map ``s = L x (+ b)``
=========================================  =========  ============================================
``F.linear(x, W, b)``                      linear     ``L = W`` (``W`` may be a row slice of a
                                                      parameter, e.g. MHA's ``in_proj_weight``)
``torch.addmm(b, x, W)`` (GPT-2 Conv1D)    linear     ``L = Wᵀ``
``x @ W``, ``torch.matmul/mm(x, W)``       linear     ``L = Wᵀ``
``F.conv1d/2d/3d(x, W, b, ...)``           conv       KFC patches (any stride, padding, dilation,
                                                      groups)
``F.embedding(ids, W, padding_idx)``       embedding  one-hot input
``F.batch_norm/layer_norm/group_norm``,    norm       unit-wise ``(γ, β)`` per channel
``F.rms_norm``
=========================================  =========  ============================================

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

import dataclasses
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_kfac.kfac.options import StrEnum


class UseKind(StrEnum):
    """The curvature model of a use."""

    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    NORM = "norm"


@dataclasses.dataclass(frozen=True)
class ParameterView:
    """How a tensor passed to a function relates to a tracked parameter.

    ``tensor == param[rows[0]:rows[1]]`` (``rows`` None: the whole parameter), transposed when
    ``transposed`` (2-D only).
    """

    name: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


class ParameterIndex:
    """Tracked parameters by identity, resolving views and casts of them to ``ParameterView``."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.by_id: dict[int, tuple[str, nn.Parameter]] = {id(p): (n, p) for n, p in named}
        #: Casts/copies of tracked parameters made in the current forward: id -> (ref, view).
        self._derived: dict[int, tuple[weakref.ref[Tensor], ParameterView]] = {}

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
    return ParameterView(name, (-1, -1))


def _rows(start: int, count: int, total: int) -> tuple[int, int] | None:
    return None if (start == 0 and count == total) else (start, start + count)


# -- recognised calls --------------------------------------------------------------------------
@dataclasses.dataclass
class RecognizedCall:
    """A call of a function K-FAC models, with its arguments bound.

    ``weight`` / ``bias`` are the tensors passed (possibly views of tracked parameters);
    ``weight_slot`` / ``bias_slot`` say where they sit so that ``run`` can substitute aliases.
    """

    kind: UseKind
    func: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    input: Tensor
    weight: Tensor | None
    bias: Tensor | None
    weight_slot: int | str | None
    bias_slot: int | str | None
    #: Kind-specific hashable details (conv geometry, embedding padding_idx, norm type, ...).
    detail: tuple[Any, ...] = ()
    #: True when the weight acts transposed (``addmm``/``matmul``: ``L = Wᵀ``).
    transposed_form: bool = False
    #: Why K-FAC cannot model this call although the function is known (or None).
    unsupported: str | None = None
    #: Norm calls: recomputes ``x̂`` from the saved input at backward (not part of the identity).
    normalize: Callable[[Tensor], Tensor] | None = dataclasses.field(default=None, compare=False)

    def run(self, weight: Tensor | None = None, bias: Tensor | None = None) -> Any:
        """Call the function, with ``weight``/``bias`` substituted when given."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in ((self.weight_slot, weight), (self.bias_slot, bias)):
            if value is None or slot is None:
                continue
            if isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
        return self.func(*args, **kwargs)


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _slot(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str) -> int | str | None:
    if len(args) > index:
        return index
    return name if name in kwargs else None


def _recognize_linear(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
    bias = _arg(args, kwargs, 2, "bias", None)
    return RecognizedCall(
        UseKind.LINEAR, func, args, kwargs, x, weight, bias,
        _slot(args, kwargs, 1, "weight"), _slot(args, kwargs, 2, "bias"),
    )  # fmt: skip


def _recognize_addmm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    bias, x = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "mat1", None)
    weight = _arg(args, kwargs, 2, "mat2", None)
    call = RecognizedCall(
        UseKind.LINEAR, func, args, kwargs, x, weight, bias,
        _slot(args, kwargs, 2, "mat2"), _slot(args, kwargs, 0, "input"), transposed_form=True,
    )  # fmt: skip
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        call.unsupported = "addmm with alpha/beta other than 1"
    elif not isinstance(bias, Tensor) or bias.dim() != 1:
        call.unsupported = "addmm whose first argument is not a bias vector"
    return call


def _recognize_matmul(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "other", None)
    call = RecognizedCall(
        UseKind.LINEAR, func, args, kwargs, x, weight, None,
        _slot(args, kwargs, 1, "other"), None, transposed_form=True,
    )  # fmt: skip
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        call.unsupported = "matmul with a weight that is not a matrix"
    return call


def _recognize_conv(dims: int) -> Callable[..., RecognizedCall]:
    def recognize(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
        x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
        bias = _arg(args, kwargs, 2, "bias", None)
        detail = (
            dims,
            _arg(args, kwargs, 3, "stride", 1),
            _arg(args, kwargs, 4, "padding", 0),
            _arg(args, kwargs, 5, "dilation", 1),
            _arg(args, kwargs, 6, "groups", 1),
        )
        detail = tuple(tuple(v) if isinstance(v, list) else v for v in detail)
        return RecognizedCall(
            UseKind.CONV, func, args, kwargs, x, weight, bias,
            _slot(args, kwargs, 1, "weight"), _slot(args, kwargs, 2, "bias"), detail=detail,
        )  # fmt: skip

    return recognize


def _recognize_embedding(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    ids, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
    padding_idx = _arg(args, kwargs, 2, "padding_idx", None)
    if padding_idx is not None and padding_idx < 0 and isinstance(weight, Tensor):
        padding_idx += weight.shape[0]
    call = RecognizedCall(
        UseKind.EMBEDDING, func, args, kwargs, ids, weight, None,
        _slot(args, kwargs, 1, "weight"), None, detail=(padding_idx,),
    )  # fmt: skip
    if _arg(args, kwargs, 5, "scale_grad_by_freq", False):
        call.unsupported = "embedding with scale_grad_by_freq=True (not a Kronecker product)"
    elif _arg(args, kwargs, 6, "sparse", False):
        call.unsupported = "embedding with sparse=True (sparse gradients)"
    return call


def _recognize_batch_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x = _arg(args, kwargs, 0, "input", None)
    training = bool(_arg(args, kwargs, 5, "training", False))
    running = (
        _arg(args, kwargs, 1, "running_mean", None),
        _arg(args, kwargs, 2, "running_var", None),
    )
    eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
    call = RecognizedCall(
        UseKind.NORM, func, args, kwargs, x,
        _arg(args, kwargs, 3, "weight", None), _arg(args, kwargs, 4, "bias", None),
        _slot(args, kwargs, 3, "weight"), _slot(args, kwargs, 4, "bias"),
        detail=("batch",),
    )  # fmt: skip
    # x̂ is recomputed at backward: keep what normalises it (not part of the use's identity).
    call.normalize = _batch_norm_normalizer(training, running, eps)
    return call


def _batch_norm_normalizer(
    training: bool, running: tuple[Tensor | None, Tensor | None], eps: float
) -> Callable[[Tensor], Tensor]:
    if training or running[0] is None:

        def normalize(x: Tensor) -> Tensor:
            return F.batch_norm(x, None, None, training=True, eps=eps)

    else:
        mean, var = running[0].detach().clone(), running[1].detach().clone()  # type: ignore[union-attr]

        def normalize(x: Tensor) -> Tensor:
            return F.batch_norm(x, mean, var, training=False, eps=eps)

    return normalize


def _recognize_layer_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x = _arg(args, kwargs, 0, "input", None)
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape", ()))
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    call = RecognizedCall(
        UseKind.NORM, func, args, kwargs, x,
        _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None),
        _slot(args, kwargs, 2, "weight"), _slot(args, kwargs, 3, "bias"),
        detail=("layer", len(shape)),
    )  # fmt: skip
    call.normalize = lambda t: F.layer_norm(t, shape, eps=eps)
    return call


def _recognize_rms_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x = _arg(args, kwargs, 0, "input", None)
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape", ()))
    eps = _arg(args, kwargs, 3, "eps", None)
    call = RecognizedCall(
        UseKind.NORM, func, args, kwargs, x,
        _arg(args, kwargs, 2, "weight", None), None,
        _slot(args, kwargs, 2, "weight"), None, detail=("rms", len(shape)),
    )  # fmt: skip
    call.normalize = lambda t: F.rms_norm(t, shape, eps=eps)
    return call


def _recognize_group_norm(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall:
    x = _arg(args, kwargs, 0, "input", None)
    groups = int(_arg(args, kwargs, 1, "num_groups", 1))
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    call = RecognizedCall(
        UseKind.NORM, func, args, kwargs, x,
        _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None),
        _slot(args, kwargs, 2, "weight"), _slot(args, kwargs, 3, "bias"),
        detail=("group", groups),
    )  # fmt: skip
    call.normalize = lambda t: F.group_norm(t, groups, eps=eps)
    return call


RECOGNIZERS: dict[Any, Callable[[Any, list[Any], dict[str, Any]], RecognizedCall]] = {
    F.linear: _recognize_linear,
    torch.addmm: _recognize_addmm,
    torch.matmul: _recognize_matmul,
    torch.mm: _recognize_matmul,
    Tensor.matmul: _recognize_matmul,
    Tensor.mm: _recognize_matmul,
    Tensor.__matmul__: _recognize_matmul,
    F.conv1d: _recognize_conv(1),
    F.conv2d: _recognize_conv(2),
    F.conv3d: _recognize_conv(3),
    F.embedding: _recognize_embedding,
    F.batch_norm: _recognize_batch_norm,
    F.layer_norm: _recognize_layer_norm,
    F.group_norm: _recognize_group_norm,
}
if hasattr(F, "rms_norm"):
    RECOGNIZERS[F.rms_norm] = _recognize_rms_norm

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


def _without_dispatch(function: types.FunctionType) -> types.FunctionType:
    """A copy of a torch.nn.functional composite whose ``has_torch_function*`` checks are off.

    Called inside the (re-entered) mode, its body runs normally and every torch function it calls
    is seen by the mode; calling the original would dispatch back to the mode without end.
    """
    module_globals = dict(function.__globals__)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        module_globals[name] = lambda *args, **kwargs: False
    copy = types.FunctionType(
        function.__code__, module_globals, function.__name__, function.__defaults__,
        function.__closure__,
    )  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


#: Composite functions run with the mode re-entered, by the original function.
COMPOSITES: dict[Any, Callable[..., Any]] = {
    F.multi_head_attention_forward: _without_dispatch(F.multi_head_attention_forward),
}


def tensors_in(args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[Tensor]:
    """Tensors among the arguments (one level into lists and tuples, as ``torch.cat`` takes)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, Tensor):
                    yield item


class UseListener:
    """What the tracer reports to (implemented by ``capture.UseCapture``)."""

    index: ParameterIndex

    def on_call(self, call: RecognizedCall, site: str) -> Any:  # pragma: no cover - interface
        """Handle a recognised call made inside module ``site``; return the function's result."""
        raise NotImplementedError

    def on_unsupported(self, view: ParameterView, operation: str, site: str) -> None:
        """A tracked parameter was computed with by an operation K-FAC does not model."""


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
        recognize = RECOGNIZERS.get(func)
        if recognize is not None:
            return self.listener.on_call(recognize(func, list(args), kwargs), self.sites[-1])
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
      and only when ``wanted(site)`` says the step needs that site traced.
    """

    def __init__(
        self,
        root: nn.Module,
        listener: UseListener,
        *,
        on_forward_start: Callable[[tuple[Any, ...], dict[str, Any]], bool],
        wanted: Callable[[str], bool],
    ) -> None:
        self.root = root
        self.listener = listener
        self.on_forward_start = on_forward_start
        self.wanted = wanted
        self.names = {id(module): name for name, module in root.named_modules()}
        self.site_stack: list[str] = []
        self.tracer = UseTracer(listener, self.site_stack)
        self._depth = 0  # nesting of activations of the mode
        self._site_frames: list[bool] = []
        self._root_handles: list[RemovableHandle] = []
        self._site_handles: list[RemovableHandle] = []
        self.discovering = False
        self._root_frames: list[bool] = []
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

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Root calls nest (Lightning calls training_step through the module's __call__, and
        # training_step calls self(x)): only the outermost one starts a micro-batch, and a stack
        # pairs every pre hook with its post hook.
        active = self.on_forward_start(args, kwargs) if not self._root_frames else False
        self._root_frames.append(active)
        if active:
            self._enter("")

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._root_frames and self._root_frames.pop():
            self._exit()

    def _site_pre(self, module: nn.Module, args: Any) -> None:
        site = self.names.get(id(module), "?")
        active = bool(self._depth) or (
            module.training and torch.is_grad_enabled() and self.wanted(site)
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

    def _set_hooks(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        for handle in self._site_handles:
            handle.remove()
        self._site_handles = []
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
        self._root_frames.clear()
        self._site_frames.clear()
