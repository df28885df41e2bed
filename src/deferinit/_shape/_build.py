"""``di.build``: build every deferred layer from a shape-only pass.

Two passes. The first runs a shadow of the model (a copy of the module tree that
shares its tensors) under torch's FakeTensorMode or on meta: deferred layers
infer their sizes and the shadow's are constructed with fake parameters, so
nothing is computed, neither activations nor parameters take memory, and the
model itself is untouched, even for a thread that runs it meanwhile. The second
constructs the layers for real (or on ``meta``) in *registration* order, as
eager construction would, so the result is bitwise the eager model's under the
same seed, whatever order the forward runs them in. Either pass failing leaves
the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._become._become import become, release
from .._become._guard import Guard, guard_for
from .._become._initialize import run_registered
from .._become._memo import SHAPE_PASS, ShapeRecorder
from .._become._transaction import Transaction
from .._declare._deferred import BUILD_LOCK, Deferred
from .._declare._layout import quiet
from .._declare._recording import holds_record
from .._declare._rules import Described, describe
from .._declare._state import declared_defaults
from .._errors import ArgumentsError, DeferredInitError, NotBuiltError, device_argument
from .._lazy import refuse_lazy
from .._naming import names_by_id, qualified_name, root_scope
from .._random import Drawing, Generators
from .._tensors import has_meta_tensors
from ._config import BUILT_FROM, plan
from ._examples import check_input_dtypes, example_dtype, fakes, has_shape
from ._recurrent import RecurrentShapes
from ._valued import answer_from_shapes, reads_values

__all__ = ["ShapePass", "build", "shadow", "shape_pass"]

M = TypeVar("M", bound=nn.Module)

_META = torch.device("meta")
_CPU = torch.device("cpu")
_PLAIN = (torch.Tensor, nn.Parameter)


@dataclass
class ShapePass:
    """What a shape-only pass saw, by qualified name below the root."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # inferred arguments
    built_from: dict[str, str | Described] = field(default_factory=dict)  # their input
    outputs: dict[str, Any] = field(default_factory=dict)  # fake outputs: read shape/dtype
    # Deferred layers the pass left deferred, those a block it built declared included.
    deferred: list[str] = field(default_factory=list)


def _home(module: nn.Module) -> torch.device:
    """Where shape-only examples live: with the model's real tensors if it has
    any, else on meta (placeholders and meta tensors only)."""
    devices = {
        t.device
        for t in [*module.parameters(), *module.buffers()]
        if not isinstance(t, UninitializedTensorMixin)
    }
    real = [d for d in devices if d.type != "meta"]
    return real[0] if real else torch.device("meta")


def shape_pass(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    outputs: bool = False,
) -> ShapePass:
    """Run ``module`` on shape-only inputs; record sizes (and, with ``outputs``,
    every layer's output); change nothing.

    The pass runs on a shadow of the module tree (see :func:`shadow`), so another
    thread may run the model meanwhile: it never sees the fake parameters and
    stand-in buffers the pass puts in place. Nothing in it draws from the default
    random generators, which other threads may be drawing from: meta and fake
    tensors draw nothing, and a real tensor the forward makes (noise drawn on
    the CPU, say) draws from a private throwaway generator.

    The pass first runs on the meta device, which computes shapes fastest: the
    shadow holds a meta copy of every real parameter and buffer (ties kept), so
    real weights do not keep it off meta. If its forward needs more (it makes
    tensors on the default device, reads a value, or the model holds tensors a
    meta copy cannot stand for), it runs under torch's FakeTensorMode, in which
    real parameters take part unchanged. On either, torch's recurrent kernels are
    answered from their arguments' shapes (:class:`RecurrentShapes`), and so are
    the torch layers whose forward depends on tensor values (:mod:`._valued`).
    Shapes given as examples take :func:`example_dtype`.
    """
    with BUILD_LOCK:
        dtype = example_dtype(module)
        if _meta_copyable(module):
            try:
                return _run(module, args, kwargs, None, _META, dtype, outputs)
            except Exception:  # noqa: S110 - retried below, where the error is raised
                pass
        home = _home(module)
        if home.type == "meta":
            home = torch.get_default_device()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with _quiet_fake_log():
            return _run(module, args, kwargs, mode, home, dtype, outputs)


class _DropInPass(logging.Filter):
    """Drops the records of the threads running a shape-only pass (by count, as a
    pass may run inside another); every other thread's records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: dict[int, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.get_ident() not in self.passes


# FakeTensorMode logs a traceback for each meta kernel that fails before it raises
# (an eager layer rejecting the example): the pass reports that failure itself, as
# one error. Only this filter is added and removed; level, handlers and propagate
# are left as they are.
_FAKE_LOG = logging.getLogger("torch._subclasses.fake_tensor")
_DROP = _DropInPass()
_DROP_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_fake_log() -> Iterator[None]:
    me = threading.get_ident()
    with _DROP_LOCK:
        if not _DROP.passes:
            _FAKE_LOG.addFilter(_DROP)
        _DROP.passes[me] = _DROP.passes.get(me, 0) + 1
    try:
        yield
    finally:
        with _DROP_LOCK:
            _DROP.passes[me] -= 1
            if not _DROP.passes[me]:
                del _DROP.passes[me]
            if not _DROP.passes:
                _FAKE_LOG.removeFilter(_DROP)


def shadow(root: nn.Module) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A copy of the module tree below ``root`` that shares every tensor.

    Each module is copied once (a module reached twice is one copy, so sharing
    and ties are kept): a new object of the same class whose ``__dict__`` is a
    copy of the original's, with its own ``_modules``, ``_parameters``,
    ``_buffers`` and hook tables. Whatever a shape-only pass does to the copy
    (deferred layers becoming their class with fake parameters, fake stand-ins
    for buffers, attributes a forward sets) leaves the original alone, so a
    forward that another thread runs on the original meanwhile is unaffected.
    Returns the copy of ``root`` and the copies by ``id`` of their original.
    """
    copies: dict[int, nn.Module] = {}
    stack = [root]
    while stack:
        original = stack.pop()
        if id(original) in copies:
            continue
        copy = object.__new__(type(original))
        d = _copied_dict(original.__dict__)
        object.__setattr__(copy, "__dict__", d)
        copies[id(original)] = copy
        stack.extend(m for m in d["_modules"].values() if m is not None)
    for copy in copies.values():
        children = copy._modules
        for name, child in children.items():
            if child is not None:
                children[name] = copies[id(child)]
        _rebind_to_copies(copy, copies)
    return copies[id(root)], copies


_COPIED = (dict, OrderedDict, set)


def _copied_dict(d: dict[str, Any]) -> dict[str, Any]:
    # Copied in C first: a forward running meanwhile may set attributes, and a
    # Python loop over the original could then see it change size.
    copied = d.copy()
    for k, v in copied.items():
        if type(v) in _COPIED:
            copied[k] = v.copy()
    return copied


def _rebind_to_copies(copy: nn.Module, copies: Mapping[int, nn.Module]) -> None:
    """Point the copy's guarded ``forward`` and the hooks bound to modules of the
    tree at their copies, so that running the copy never runs an original."""
    d = copy.__dict__
    for key, value in d.items():
        if key == "forward" and isinstance(value, Guard):
            d[key] = guard_for(copy, type(copy))
        elif key == "forward":
            d[key] = _rebound(value, copies)
        elif key.endswith("hooks") and isinstance(value, dict):
            for k, hook in value.items():
                value[k] = _rebound(hook, copies)


def _rebound(value: Any, copies: Mapping[int, nn.Module]) -> Any:
    if isinstance(value, types.MethodType) and id(value.__self__) in copies:
        return types.MethodType(value.__func__, copies[id(value.__self__)])
    return value


def _run(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    mode: FakeTensorMode | None,
    home: torch.device,
    dtype: torch.dtype,
    outputs: bool,
) -> ShapePass:
    result = ShapePass()
    recorder = ShapeRecorder()
    recorded = recorder.records
    copy, copies = shadow(module)
    names = names_by_id(copy)
    if outputs:
        _record_outputs(copy, names, result.outputs)
    answer_from_shapes(copies.values())
    check_input_dtypes(copies.values(), integers_only=has_shape((args, dict(kwargs))))
    token = SHAPE_PASS.set(recorder)
    try:
        # Quiet: the shadow's constructions and forward warn at the real ones.
        with root_scope(copy), quiet():
            if mode is None:
                _run_on_meta(copy, copies, args, kwargs, dtype)
            else:
                try:
                    _run_on_fakes(copy, copies, args, kwargs, mode, home, dtype)
                except Exception as error:
                    everyone = names_by_id(copy) | names
                    plainly = reads_values(error, copy, everyone) or _rejected(error, everyone)
                    if plainly is None:
                        raise
                    raise plainly from None
        names = names_by_id(copy) | names  # layers the pass constructed inside blocks
        result.deferred = [n for n, sub in copy.named_modules() if isinstance(sub, Deferred)]
        for original_id, sub in copies.items():
            if id(sub) in names:  # an original the forward reached by another path
                names.setdefault(original_id, names[id(sub)])
        for layer, values, built_from, _ in recorded:
            name = names.get(id(layer))
            if name is None:
                name = qualified_name(layer, copy) or ""
            result.values[name] = values
            result.built_from[name] = built_from
    finally:
        SHAPE_PASS.reset(token)
        # The copies are dropped; an original that the forward reached outside the
        # module tree (a layer kept in a plain list, say) was built on its own.
        for *_, txn in reversed(recorded):
            if txn is not None:
                txn.rollback()
    return result


_CALL_IMPL = nn.Module._call_impl.__code__


def _rejected(error: Exception, names: Mapping[int, str]) -> DeferredInitError | None:
    """The error for a shape-only pass whose forward failed in torch's own shape
    checks (a plain ``RuntimeError``), naming the innermost layer of ``names`` (by
    ``id``) being called and what it got; None when no such layer is found, or for
    any other failure."""
    if type(error) is not RuntimeError:
        return None
    found: tuple[nn.Module, str, tuple[Any, ...], dict[str, Any]] | None = None
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _CALL_IMPL:
            local = frame.f_locals
            layer = local.get("self")
            if isinstance(layer, nn.Module) and id(layer) in names:
                found = (layer, names[id(layer)], local.get("args", ()), local.get("kwargs", {}))
        tb = tb.tb_next
    if found is None:
        return None
    layer, name, args, kwargs = found
    kind = type(layer).__name__
    where = f"{kind} layer {name!r}" if name else kind
    got = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    shown = repr(layer)
    if "\n" in shown:  # a block: its class says enough
        shown = kind
    said = str(error).strip().rstrip(".")
    return DeferredInitError(
        f"{where} rejects the input the examples give it in the shape-only pass, as eager "
        f"torch would at the first forward: {shown} got {', '.join(got) or 'no arguments'}, "
        f"and raised RuntimeError: {said}. Nothing was built. Fix: pass examples of the input the "
        f"model takes, or correct the layer's arguments."
    )


def _record_outputs(copy: nn.Module, names: Mapping[int, str], into: dict[str, Any]) -> None:
    for sub in copy.modules():
        name = names[id(sub)]

        def hook(mod: nn.Module, _args: Any, output: Any, name: str = name) -> None:
            into.setdefault(name, output)

        sub.register_forward_hook(hook)


def _run_on_meta(
    copy: nn.Module,
    copies: Mapping[int, nn.Module],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    dtype: torch.dtype,
) -> None:
    _meta_copies(copies.values())
    meta_args, meta_kwargs = fakes(args, kwargs, contextlib.nullcontext(), _META, dtype)
    # A forward may still make real tensors (noise drawn on the CPU): their random
    # numbers come from a private generator, never from the default ones.
    with Drawing(0), RecurrentShapes(), torch.no_grad():
        copy(*meta_args, **meta_kwargs)


def _meta_copyable(module: nn.Module) -> bool:
    """Whether a meta copy can stand for every real tensor below ``module`` in the
    shape pass: plain strided tensors and Parameters can; tensor subclasses
    (DTensor shards, say), sparse and quantized tensors are left to FakeTensorMode."""
    with torch._C.DisableTorchFunctionSubclass():  # plain attribute reads on Parameters
        for t in itertools.chain(module.parameters(), module.buffers()):
            if isinstance(t, UninitializedTensorMixin):
                continue
            if type(t) not in _PLAIN or t.layout != torch.strided or t.is_quantized:
                return False
    return True


def _meta_copies(modules: Iterable[nn.Module]) -> None:
    """Put a meta copy (same shape, strides, dtype, class and ``requires_grad``)
    in the copies' tables for every real parameter and buffer, one per tensor so
    that ties stay ties: the pass stays on meta and the real tensors are neither
    read nor written. An RNN's forward finds its weights changed and takes the
    copies as its flat weights, in the shadow only."""
    made: dict[int, torch.Tensor] = {}
    with torch._C.DisableTorchFunctionSubclass():
        for sub in modules:
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is None or isinstance(t, UninitializedTensorMixin):
                        continue
                    if t.device.type == "meta":
                        continue
                    copy = made.get(id(t))
                    if copy is None:
                        copy = torch.empty_strided(
                            tuple(t.shape), t.stride(), dtype=t.dtype, device=_META
                        )
                        if isinstance(t, nn.Parameter):
                            copy = nn.Parameter(copy, requires_grad=t.requires_grad)
                        made[id(t)] = copy
                    table[name] = copy  # type: ignore[assignment]


def _run_on_fakes(
    copy: nn.Module,
    copies: Mapping[int, nn.Module],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    mode: FakeTensorMode,
    home: torch.device,
    dtype: torch.dtype,
) -> None:
    _stand_ins(copies.values(), mode, home)
    fake_args, fake_kwargs = fakes(args, kwargs, mode, home, dtype)
    with mode, RecurrentShapes(), torch.no_grad():
        copy(*fake_args, **fake_kwargs)


def _stand_ins(modules: Iterable[nn.Module], mode: FakeTensorMode, home: torch.device) -> None:
    """Put fake stand-ins in the copies for real buffers (a training-mode forward
    updates BatchNorm statistics in place) and for meta tensors, which stand for
    tensors on ``home`` beside the real ones (an eager layer declared on meta)."""
    made: dict[int, torch.Tensor] = {}
    for sub in modules:
        for table, is_buffer in ((sub._parameters, False), (sub._buffers, True)):
            for name, t in table.items():
                if t is None or isinstance(t, UninitializedTensorMixin):
                    continue
                on_meta = t.device.type == "meta"
                if not (on_meta or is_buffer):
                    continue  # real parameters take part unchanged
                fake = made.get(id(t))
                if fake is None:
                    fake = _fake_of(t, mode, home if on_meta else t.device)
                    made[id(t)] = fake
                table[name] = fake  # type: ignore[assignment]


def _fake_of(t: torch.Tensor, mode: FakeTensorMode, device: torch.device) -> torch.Tensor:
    fake: torch.Tensor
    if t.device == device:
        fake = mode.from_tensor(t)
    else:
        with mode:
            fake = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device=device)
    if isinstance(t, nn.Parameter):
        fake = nn.Parameter(fake, requires_grad=t.requires_grad)
    return fake


def build(
    module: M,
    *example_args: Any,
    device: torch.device | str | None = None,
    config: Mapping[str, Any] | None = None,
    **example_kwargs: Any,
) -> M:
    """Build every deferred layer below ``module`` from a shape-only pass, or from
    a build config.

    The examples, ``example_args`` and ``example_kwargs``, are what the forward
    takes, each a tensor, a shape (a tuple of ints or ``torch.Size``: a tensor in the
    dtype of the model's first floating parameter, a deferred layer's as declared,
    else torch's default dtype), or a meta/fake tensor (``torch.empty(2, 16,
    dtype=torch.long, device="meta")`` for token ids; a shape is token ids where the
    model's first leaf layer is an ``nn.Embedding`` or ``nn.EmbeddingBag``). A shape
    with a negative or non-int size is an ``InferenceError``; so is a tensor example
    whose dtype a ``deferinit.nn`` layer's eager forward refuses (integers into a
    float layer, float64 into a float32 Linear), as the first forward would. Without
    examples (or ``config=``), a model with nothing deferred comes back unchanged and
    one with deferred layers is a ``NotBuiltError`` naming them. Nothing is computed
    and no activation memory is used. A layer whose forward depends on tensor values
    (``nn.AdaptiveLogSoftmaxWithLoss``) is answered from shapes; any other such
    forward is an ``InferenceError`` naming it.
    ``config=`` (what :func:`deferinit.build_config` returned for the same model,
    JSON included) gives every layer's inferred arguments instead: no examples, no
    checkpoint, no forward; a config that does not fit the model (an unknown or
    missing layer, another class, other argument names) is a ``DeferredInitError``
    listing every difference.
    Layers are constructed in the order they were declared, as eager code would
    (registration order, save for a layer declared before the container that
    registers it), so the model equals the eager one under the same seed.
    ``device="meta"`` builds without allocating any parameter (then
    :func:`deferinit.materialize`).
    All-or-nothing: on any error the model is left as it was. Returns ``module``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = di.build(nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10)), (2, 20))
    >>> net[0], di.is_built(net)
    (Linear(in_features=20, out_features=256, bias=True), True)
    >>> again = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
    >>> di.build(again, config=di.build_config(net), device="meta")[2]
    Linear(in_features=256, out_features=10, bias=True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.build expects an nn.Module, got {type(module).__name__}. Fix: pass the "
            f"model first, then example inputs: di.build(model, x)."
        )
    device = device_argument("di.build", device, "built")
    refuse_lazy(module, "di.build")
    if holds_record(module) and (device is None or torch.device(device).type != "meta"):
        raise DeferredInitError(
            f"di.build: {type(module).__name__} holds a construction recorded by "
            f"di.deferred_init, which di.materialize replays in program order: its deferred "
            f"layers must be built on meta, so that the replay constructs them at their "
            f"place. Nothing was built. Fix: di.build(model, example, device='meta'), then "
            f"di.materialize(model)."
        )
    if config is not None and (example_args or example_kwargs):
        raise ArgumentsError(
            "di.build takes examples or config=, not both: the config already gives "
            "every inferred size. Nothing was built. Fix: drop the examples, or config=."
        )
    with BUILD_LOCK, root_scope(module):
        if config is not None:
            _build_from_config(module, config, device)
            return module
        if not example_args and not example_kwargs:
            _nothing_to_build(module)
            return module
        seen = shape_pass(module, example_args, example_kwargs)
        unreached = [
            name
            for name, sub in module.named_modules()
            if isinstance(sub, Deferred) and name not in seen.values
        ]
        # A twin that a deferred block declares in its __init__ exists only in the pass.
        unreached += [n for n in seen.deferred if n not in seen.values and n not in unreached]
        if unreached:
            listed = ", ".join(repr(n) for n in unreached)
            raise NotBuiltError(
                f"di.build: the examples did not reach the deferred layer(s) {listed}, so "
                f"their sizes are unknown (a branch not taken, an unused head?). Nothing was "
                f"built. Fix: pass examples that run through them, or give their sizes "
                f"explicitly (e.g. dnn.Linear(10, in_features=256))."
            )

        def sized(
            name: str, layer: Deferred
        ) -> tuple[dict[str, Any], str | Described | None] | None:
            if name not in seen.values:
                return None
            return seen.values[name], seen.built_from[name]

        _construct_in_eager_order(module, sized, device)
    return module


def _nothing_to_build(module: nn.Module) -> None:
    """``di.build(module)`` without examples: a no-op where nothing is deferred, a
    ``NotBuiltError`` naming the deferred layers otherwise (their sizes are unknown)."""
    deferred = [name for name, sub in module.named_modules() if isinstance(sub, Deferred)]
    if deferred:
        listed = ", ".join(repr(n) for n in deferred)
        raise NotBuiltError(
            f"di.build: no examples were given, so the sizes of the deferred layer(s) "
            f"{listed} are unknown. Nothing was built. Fix: pass examples of the forward's "
            f"input (di.build(model, (2, 16)) for a shape, or a tensor), or config= with "
            f"what di.build_config returned for the same model."
        )


def _build_from_config(
    module: nn.Module, config: Mapping[str, Any], device: torch.device | str | None
) -> None:
    """Every difference the model as it stands shows is reported before anything
    is built; those only the build can show (layers a block constructs) undo it."""
    checked = plan(module, config)
    checked.raise_if_any()

    def sized(name: str, layer: Deferred) -> tuple[dict[str, Any], str | Described | None] | None:
        values = checked.values_of(name, layer)
        return None if values is None else (values, BUILT_FROM)

    _construct_in_eager_order(module, sized, device, finish=checked.finish)


# The sizes of a deferred layer met by the walk (by qualified name), and the input
# they came from; None leaves it deferred.
Sizes = Callable[[str, Deferred], tuple[dict[str, Any], str | Described | None] | None]


def _construct_in_eager_order(
    module: nn.Module,
    sizes: Sizes,
    device: torch.device | str | None,
    *,
    finish: Callable[[], None] | None = None,
) -> None:
    """Construct every deferred layer ``sizes`` sizes, in eager's order, each
    followed by its registered initializer, as if the eager code initialized each
    layer where it constructs it; the first forward and ``di.materialize``
    initialize in the same order, so all three give the same values. A block is
    initialized once the deferred layers it constructs are built too. ``finish``
    runs last, while every build can still be undone. Any failure (Ctrl-C
    included) undoes every layer and puts the random generators back, so that a
    corrected call gives eager's values."""
    generators = Generators(torch.device(device) if device is not None else _CPU)
    done: list[Transaction] = []
    waiting: list[tuple[str, nn.Module]] = []  # built, their deferred children not yet
    try:
        # Live walks: named_modules reads a layer's children after yielding it, so
        # the deferred children that a just-built block constructs come next, in
        # eager's registration order.
        for prefix, top in _walks(module):
            for name, sub in top.named_modules(prefix=prefix):
                _initialize_finished(waiting, name)
                if not isinstance(sub, Deferred):
                    continue
                sized = sizes(name, sub)
                if sized is not None:
                    values, built_from = sized
                    # Held: a forward from another thread waits until it is initialized.
                    txn = become(sub, values, built_from=built_from, device=device, hold=True)
                    done.append(txn)
                    waiting.append((name, sub))
        _initialize_finished(waiting, None)
        if finish is not None:
            finish()
        if device is not None and torch.device(device).type == "meta":
            for txn in done:
                _remember_versions(txn.module)
    except BaseException:
        for txn in reversed(done):
            txn.rollback()
        if done:
            generators.restore()
        raise


def _walks(module: nn.Module) -> Sequence[tuple[str, nn.Module]]:
    """Where the live walks of a build start, in eager's construction order: the
    whole model at once where its deferred layers' registration order is their
    declaration order (the common case), else each deferred layer (with what its
    build constructs below it) in the order their constructors ran: a layer
    declared before the container that registers it (d2l's ``shared`` layer used
    twice in a ``Sequential``) is constructed first, as eager's would be."""
    twins = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, Deferred)]
    declared = sorted(twins, key=lambda pair: pair[1]._di.seq)
    # Preorder: a layer's descendants come right after it.
    nested = any(b.startswith(a + ".") or a == "" for (a, _), (b, _) in itertools.pairwise(twins))
    if declared == twins or nested:
        return [("", module)]
    return declared


def _remember_versions(layer: nn.Module) -> None:
    """Keep the version counter of each of ``layer``'s parameters, just built on
    meta, for :func:`deferinit.materialize` to tell init code that changes them in
    place before it (which it cannot run again: a meta tensor holds no values)."""
    state = layer.__dict__.get("_di")
    if state is not None:
        state.meta_versions = {leaf: t._version for leaf, t in layer.named_parameters()}


def _initialize_finished(waiting: list[tuple[str, nn.Module]], reached: str | None) -> None:
    """Initialize the layers whose part of the tree the walk has left on reaching
    ``reached`` (every one, for ``None``): ``waiting`` runs from outer to inner."""
    while waiting:
        prefix, layer = waiting[-1]
        if reached is not None and (prefix == "" or reached.startswith(prefix + ".")):
            return
        waiting.pop()
        _initialize(layer)
        release(layer)


def _initialize(layer: nn.Module) -> None:
    """Run the initializer registered on ``layer``, unless it was built on meta: it
    has no values yet (an initializer that reads one would fail), and
    di.materialize runs the initializer when it gives the layer memory."""
    state = layer.__dict__["_di"]
    if state.init is None or _on_meta(layer):
        return
    with declared_defaults(state):
        run_registered(layer)


def _on_meta(layer: nn.Module) -> bool:
    """Whether any tensor in ``layer`` or below is on meta."""
    with torch._C.DisableTorchFunctionSubclass():  # plain .device reads on Parameters
        return any(has_meta_tensors(sub) for sub in layer.modules())
