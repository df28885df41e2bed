"""``di.materialize``: allocate and initialize every meta tensor below a module.

Layers that deferinit built are *constructed again* on the target device with
the arguments they were built with: their own ``__init__`` draws the random
numbers in the same order as eager construction (MultiheadAttention, say,
initializes ``out_proj`` before ``in_proj_weight``), so the values are bitwise
the eager model's under the same seed. Other modules declared under
``torch.device("meta")`` run their own ``reset_parameters`` and registered
initializer on a stand-in with fresh tensors, and their meta tensors take its
values. Registered initializers run on that fresh copy, never on the model's own
tensors, so that a failure can always be undone. Registration order throughout;
parameter objects keep their identity (whatever else refers to them); at
most one layer's worth of extra memory at a time; all or nothing (any error puts
every tensor back on meta).

Sharded (FSDP2) tensors and ``seed=`` go one tensor at a time instead
(:func:`deferinit._fill._each.each_tensor`): a rank keeps only its slice of each value,
and a seeded tensor's value depends only on the seed and its qualified name.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .._become._initialize import apply_registered, mark_initialized
from .._declare._deferred import BUILD_LOCK, Deferred, constructor_call
from .._declare._state import declared_defaults
from .._errors import DeferredInitError, NotBuiltError
from .._naming import root_scope
from ._dispatch import Generators, storage_key, written_storages
from ._each import each_tensor
from ._placing import UNDO, Owners, Undo, direct, is_meta, named, place, put, sharded_owners
from ._streams import seeded_whole

__all__ = ["materialize"]

M = TypeVar("M", bound=nn.Module)

_LARGE = 1 << 30  # show a progress bar by default beyond this many bytes


def _plan(root: nn.Module) -> tuple[list[tuple[str, str, nn.Module]], list[str], list[str]]:
    """(kind, name, module) steps in registration order, deferred names, unfit names."""
    steps: list[tuple[str, str, nn.Module]] = []
    deferred: list[str] = []
    unfit: list[str] = []
    skip: list[str] = []
    for name, sub in root.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(sub, Deferred):
            deferred.append(name)
            skip.append(name)
            continue
        state = sub.__dict__.get("_di")
        if state is not None and state.values is not None:
            tensors = [*sub.parameters(), *sub.buffers()]
            if any(is_meta(t) for t in tensors):
                steps.append(("rebuild", name, sub))
                skip.append(name)
            continue
        if any(is_meta(t) for _, t in direct(sub)):
            has_init = sub.__dict__.get("_di_meta_init") is not None
            if has_init or callable(getattr(sub, "reset_parameters", None)):
                steps.append(("reset", name, sub))
            else:
                unfit.append(f"{name or '<root>'} ({type(sub).__name__})")
    return steps, deferred, unfit


def materialize(
    module: M,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    progress: bool | None = None,
) -> M:
    """Allocate and initialize every meta parameter and buffer below ``module``.

    Deferred layers built on meta (``di.build(..., device="meta")``) and modules
    constructed under ``torch.device("meta")`` alike get memory on ``device``
    (default: torch's default device) and their registered initializer (see
    :func:`deferinit.initialize`), else their own initialization, in
    registration order: bitwise the eager model under the same seed. ``dtype``
    converts floating-point tensors, as ``module.to(dtype)`` would after eager
    construction. With ``seed`` every tensor is initialized alone, from a generator
    seeded with ``seed`` and its qualified name (below ``module``): its values do
    not depend on order, on the rest of the model, on which layers were deferred or
    on how many ranks share it; the global generator is left alone. Parameters
    sharded with FSDP2 (``fully_shard``) get the matching slice of the value a
    single process computes, and each rank allocates only its shard (plus one
    full tensor at a time while it is initialized).
    ``progress`` forces the progress bar on or off (default: on when stderr is a
    terminal and more than 1 GiB is allocated). Returns ``module``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = di.build(nn.Sequential(dnn.Linear(4), nn.ReLU()), (1, 3), device="meta")
    >>> net[0].weight.device.type
    'meta'
    >>> di.materialize(net)[0].weight.device.type
    'cpu'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"di.materialize expects an nn.Module, got {type(module).__name__}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"di.materialize: dtype must be a floating-point dtype, got {dtype}")
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type == "meta":
        raise ValueError("di.materialize: device='meta' allocates nothing; pass a real device")
    with BUILD_LOCK, root_scope(module):
        steps, deferred, unfit = _plan(module)
        if deferred:
            raise NotBuiltError(
                f"di.materialize: layer(s) {', '.join(repr(d) for d in deferred)} are still "
                f"deferred, so their sizes are unknown. Nothing was allocated. Fix: build "
                f"first, e.g. di.build(model, example, device='meta')."
            )
        if unfit:
            raise NotBuiltError(
                f"di.materialize: {', '.join(unfit)} hold meta tensors but have no "
                f"reset_parameters and no initializer registered with di.initialize, so "
                f"there is no way to fill them. Nothing was allocated. Fix: register one "
                f"(di.initialize(module, init)) or load their values (load_state_dict)."
            )
        total = sum(_bytes(sub) for _, _, sub in steps)
        show = progress if progress is not None else (sys.stderr.isatty() and total > _LARGE)
        owners = sharded_owners(module)
        undo: list[Undo] = []
        generators = Generators(target)
        token = UNDO.set(undo)
        try:
            with _progress(show, total) as advance:
                for kind, name, sub in steps:
                    seeds = _seeds(seed, name)
                    if kind == "rebuild":
                        _rebuild(sub, name, target, dtype, seeds, owners)
                    else:
                        _reset(sub, name, target, dtype, seeds, owners)
                    advance(_bytes(sub))
        except BaseException as error:
            # All or nothing: every tensor back on meta under its own object, and the
            # random generators where they were, so that a corrected call gives
            # eager's values.
            lost = [why for action in reversed(undo) if (why := action()) is not None]
            generators.restore()
            if lost:
                _report_lost(error, lost)
            raise
        finally:
            UNDO.reset(token)
    return module


def _report_lost(error: BaseException, lost: list[str]) -> None:
    """Tensors that went back to meta under new objects: the failure's own code
    made references to their new data that are still alive. An interrupt stays an
    interrupt, with this as a note (Python 3.11+); any other error becomes a
    :class:`DeferredInitError` raised from it."""
    message = (
        f"di.materialize failed ({type(error).__name__}: {error}), and while putting the "
        f"model back, {'; '.join(lost)}: so it is back on meta under a new object, and "
        f"references made before (an optimizer) no longer reach it. Fix: do not keep "
        f"references to the model's tensors in initialization code; create the "
        f"optimizer again after di.materialize succeeds."
    )
    if isinstance(error, Exception):
        raise DeferredInitError(message) from error
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(message)


def _bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _seeds(seed: int | None, prefix: str) -> Callable[[str], int] | None:
    """The generator seed of each tensor of the layer at ``prefix``: from the seed
    and the tensor's qualified name."""
    if seed is None:
        return None

    def of(name: str) -> int:
        qualified = f"{prefix}.{name}" if prefix else name
        digest = hashlib.sha256(f"{seed}:{qualified}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    return of


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[int], None]]:
    if not show:
        yield lambda n: None
        return
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency
    except ImportError:
        yield lambda n: None
        return
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="materialize")
    try:
        yield bar.update
    finally:
        bar.close()


def _rebuild(
    layer: nn.Module,
    prefix: str,
    device: torch.device,
    dtype: torch.dtype | None,
    seeds: Callable[[str], int] | None,
    owners: Owners,
) -> None:
    """A layer deferinit built on meta: constructed again for real with the arguments
    it was built with, its registered initializer applied to that copy (user code
    never holds the model's own tensors mid-way, so a failure can always be undone),
    and the values placed under the layer's tensors."""
    state = layer.__dict__["_di"]
    args, kwargs = constructor_call(state.deferred, state.arguments, state.values)
    explicit_device = "device" in kwargs
    cls = state.deferred._di_cls
    registered = state.init
    old = {n: t for n, t in named(layer).items() if is_meta(t)}

    def declared() -> contextlib.AbstractContextManager[Any]:
        # The default dtype (and grad mode) of the declaration, as the build on meta
        # had (DESIGN §3.10); the device is whichever the caller is filling on.
        return declared_defaults(state, torch.get_default_device())

    def construct() -> nn.Module:
        with declared():
            if explicit_device:
                kwargs["device"] = torch.get_default_device()
            module: nn.Module = cls(*args, **kwargs)
        return module

    def make() -> nn.Module:
        with declared():
            module = construct()
            if registered is not None:
                names = set(named(module))
                apply_registered(module, registered, recurse=True, name=prefix)
                _check_unchanged(layer, prefix, names, set(named(module)))
        return module

    if seeds is None and not any(isinstance(t, DTensor) for t in old.values()):
        with torch.device(device):
            new = named(make())
        _check_known(layer, prefix, old, new)
        for name, tensor in old.items():
            put(layer, name, tensor, new[name], device, dtype, owners, prefix)
    elif not _place_whole(layer, prefix, old, make, construct, device, dtype, seeds, owners):
        generators = Generators(device)
        try:  # a dry run: each_tensor needs every name to be one the layer makes
            with torch.device("meta"):
                _check_known(layer, prefix, old, named(construct()))
        finally:
            generators.restore()
        for name, value in each_tensor(make, list(old), device, seeds, construct=construct):
            put(layer, name, old[name], value, device, dtype, owners, prefix)
            del value
    if registered is not None:
        mark_initialized(layer)


def _place_whole(
    layer: nn.Module,
    prefix: str,
    old: dict[str, torch.Tensor],
    make: Callable[[], nn.Module],
    construct: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype | None,
    seeds: Callable[[str], int] | None,
    owners: Owners,
) -> bool:
    """``seed=`` on tensors that are not sharded: one run with a generator per tensor
    (the values each_tensor gives, at the cost of one initialization)."""
    if seeds is None or any(isinstance(t, DTensor) for t in old.values()):
        return False
    whole = seeded_whole(make, device, seeds, construct=construct)
    if whole is None:
        return False
    new = named(whole)
    _check_known(layer, prefix, old, new)
    for name, tensor in old.items():
        put(layer, name, tensor, new[name], device, dtype, owners, prefix)
    return True


def _check_known(
    layer: nn.Module, prefix: str, old: dict[str, torch.Tensor], made: dict[str, torch.Tensor]
) -> None:
    """Every meta tensor of a rebuilt layer must be one its constructor makes: one
    added after the build (a reparametrization applied on meta) has no known value."""
    unknown = [name for name in old if name not in made]
    if unknown:
        raise NotBuiltError(
            f"di.materialize: {prefix or '<root>'} ({type(layer).__name__}) holds "
            f"{', '.join(repr(u) for u in unknown)} on meta, which its constructor does not "
            f"make (added after it was built), so their values are unknown. The model is "
            f"left as it was. Fix: apply such changes (e.g. weight_norm) after "
            f"di.materialize, or load their values (load_state_dict)."
        )


def _check_unchanged(layer: nn.Module, prefix: str, declared: set[str], now: set[str]) -> None:
    """The registered initializer runs on a copy whose values are placed into the
    layer's own tensors: a tensor it adds (a reparametrization such as weight_norm)
    would be lost, so it is an error, never silently dropped."""
    added = sorted(now - declared)
    if added:
        raise DeferredInitError(
            f"di.materialize: {prefix or '<root>'} ({type(layer).__name__}): its registered "
            f"initializer adds {', '.join(repr(a) for a in added)}; materialize fills the "
            f"tensors the layer declares and cannot add new ones. The model is left as it "
            f"was. Fix: keep the initializer to filling tensors, and apply such changes "
            f"(e.g. torch.nn.utils.parametrizations.weight_norm) after di.materialize."
        )


def _unset_error(module: nn.Module, name: str, unset: list[str], registered: bool) -> NotBuiltError:
    by = "reset_parameters or the registered initializer" if registered else "reset_parameters"
    return NotBuiltError(
        f"di.materialize: {name or '<root>'} ({type(module).__name__}) was declared on meta, "
        f"and its {by} does not set {', '.join(repr(u) for u in unset)}: such a tensor is "
        f"computed in __init__, which never ran for real, so its values are unknown. The "
        f"model is left as it was. Fix: construct this module for real, set the tensor in "
        f"an initializer registered with di.initialize(module, init), or load its values."
    )


def _reset(
    module: nn.Module,
    name: str,
    device: torch.device,
    dtype: torch.dtype | None,
    seeds: Callable[[str], int] | None,
    owners: Owners,
) -> None:
    """A module declared on meta: its own initialization (``reset_parameters``, then
    a registered initializer) runs on a stand-in whose direct tensors are fresh, in
    their declared dtype and strides, and only the meta tensors take its values:
    tensors that are real already (loaded, or tied to a filled one) keep theirs.
    A meta tensor that this initialization does not set (a buffer computed in
    ``__init__``, which never ran for real) is an error, not garbage."""
    registered = module.__dict__.get("_di_meta_init")
    declared = [
        (table, leaf, t)
        for table in ("_parameters", "_buffers")
        for leaf, t in getattr(module, table).items()
    ]
    old: dict[str, torch.Tensor] = {}  # meta tensors, each under its first name (ties)
    for _, leaf, t in declared:
        if t is not None and is_meta(t) and all(t is not o for o in old.values()):
            old[leaf] = t

    def construct() -> nn.Module:
        stand_in = object.__new__(type(module))  # no __init__ (FSDP's classes run it)
        stand_in.__dict__.update(module.__dict__)
        stand_in._parameters = {}
        stand_in._buffers = {}
        blanks: dict[int, torch.Tensor] = {}  # declared tensor -> its blank (ties kept)
        for table, leaf, tensor in declared:
            if tensor is None:  # e.g. bias=False: kept as None
                getattr(stand_in, table)[leaf] = None
                continue
            blank = blanks.get(id(tensor))
            if blank is None:
                empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
                blank = empty
                if table == "_parameters":
                    blank = nn.Parameter(empty, tensor.requires_grad)
                blanks[id(tensor)] = blank
            if table == "_parameters":
                stand_in.register_parameter(leaf, blank)  # type: ignore[arg-type]
            else:
                persistent = leaf not in module._non_persistent_buffers_set
                stand_in.register_buffer(leaf, blank, persistent=persistent)
        return stand_in

    def make() -> nn.Module:
        stand_in = construct()
        # Kept alive with their storages, so no new tensor can reuse their addresses.
        fresh = {leaf: (t, t.untyped_storage()) for leaf, t in direct(stand_in) if leaf in old}
        stand_reset = getattr(stand_in, "reset_parameters", None)
        with written_storages() as written:
            if callable(stand_reset):
                stand_reset()
            if registered is not None:
                declared = {leaf for leaf, _ in direct(stand_in)}
                apply_registered(stand_in, registered, recurse=False, name=name)
                _check_unchanged(module, name, declared, {leaf for leaf, _ in direct(stand_in)})
        unset = [
            leaf
            for leaf, t in direct(stand_in)
            if leaf in fresh
            and t is fresh[leaf][0]
            and not t.is_meta
            and t.numel() > 0  # torch.nn.init leaves empty tensors alone
            and t.untyped_storage()._cdata == fresh[leaf][1]._cdata  # no .data = ...
            and storage_key(t) not in written
        ]
        if unset:
            raise _unset_error(module, name, unset, registered is not None)
        return stand_in

    if seeds is None and not any(isinstance(t, DTensor) for t in old.values()):
        with torch.device(device):
            new = dict(direct(make()))
        for leaf, tensor in old.items():
            place(module, tensor, new[leaf], dtype, f"{name}.{leaf}" if name else leaf)
    elif not _place_whole(module, name, old, make, construct, device, dtype, seeds, owners):
        for leaf, value in each_tensor(make, list(old), device, seeds, construct=construct):
            put(module, leaf, old[leaf], value, device, dtype, owners, name)
            del value
    if registered is not None:
        mark_initialized(module, recurse=False)
