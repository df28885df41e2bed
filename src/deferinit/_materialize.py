"""``di.materialize``: allocate and initialize every meta tensor below a module.

Layers that deferinit built are *constructed again* on the target device with
the arguments they were built with: their own ``__init__`` draws the random
numbers in the same order as eager construction (MultiheadAttention, say,
initializes ``out_proj`` before ``in_proj_weight``), so the values are bitwise
the eager model's under the same seed. Other modules declared under
``torch.device("meta")`` get ``to_empty`` and their registered initializer or
their own ``reset_parameters``. Registration order throughout; parameter objects
keep their identity; at most one layer's worth of extra memory at a time.

Sharded (FSDP2) tensors and ``seed=`` go one tensor at a time instead
(:func:`deferinit._each.each_tensor`): a rank keeps only its slice of each value,
and a seeded tensor's value depends only on the seed and its qualified name.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ._deferred import BUILD_LOCK, Deferred, constructor_call
from ._each import Generators, each_tensor, seeded_whole, storage_key, written_storages
from ._errors import NotBuiltError
from ._naming import root_scope

__all__ = ["materialize"]

M = TypeVar("M", bound=nn.Module)

_LARGE = 1 << 30  # show a progress bar by default beyond this many bytes

# What to do, newest first, to put every tensor materialize replaced back.
_UNDO: ContextVar[list[Callable[[], None]] | None] = ContextVar("_UNDO", default=None)


def _on_undo(action: Callable[[], None]) -> None:
    log = _UNDO.get()
    if log is not None:
        log.append(action)


def _direct(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(n, p) for n, p in module._parameters.items() if p is not None]
    return out + [(n, b) for n, b in module._buffers.items() if b is not None]


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


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
            if any(_is_meta(t) for t in tensors):
                steps.append(("rebuild", name, sub))
                skip.append(name)
            continue
        if any(_is_meta(t) for _, t in _direct(sub)):
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
        owners = _sharded_owners(module)
        undo: list[Callable[[], None]] = []
        generators = Generators(target)
        token = _UNDO.set(undo)
        try:
            with _progress(show, total) as advance:
                for kind, name, sub in steps:
                    seeds = _seeds(seed, name)
                    if kind == "rebuild":
                        _rebuild(sub, target, dtype, seeds, owners)
                    else:
                        _reset(sub, name, target, dtype, seeds, owners)
                    advance(_bytes(sub))
        except BaseException:
            # All or nothing: every tensor back on meta, under the same objects where
            # it can be (each undo step runs even if another fails), and the random
            # generators where they were, so that a corrected call gives eager's values.
            for action in reversed(undo):
                with contextlib.suppress(Exception):
                    action()
            generators.restore()
            raise
        finally:
            _UNDO.reset(token)
    return module


# Every (module, leaf) holding a sharded tensor, by the tensor's id: a tied sharded
# tensor is replaced (not swapped) when filled, under each of its names at once.
_Owners = dict[int, list[tuple[nn.Module, str]]]


def _sharded_owners(root: nn.Module) -> _Owners:
    owners: _Owners = {}
    for sub in root.modules():
        for leaf, t in _direct(sub):
            if isinstance(t, DTensor) and _is_meta(t):
                owners.setdefault(id(t), []).append((sub, leaf))
    return owners


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


def _place(
    owner: nn.Module, leaf: str, old: torch.Tensor, new: torch.Tensor, dtype: torch.dtype | None
) -> None:
    """Put ``new``'s values under the ``old`` Python object, so that optimizers and
    other references made before materialization see them."""
    want = dtype if dtype is not None and new.is_floating_point() else old.dtype
    data = new.detach().to(dtype=want) if new.dtype != want else new.detach()
    fresh: torch.Tensor
    if isinstance(old, nn.Parameter):
        fresh = nn.Parameter(data, requires_grad=old.requires_grad)
    else:
        fresh = data
    for attempt in range(2):
        try:
            torch.utils.swap_tensors(old, fresh)
        except RuntimeError:
            # A weak reference blocks the swap (e.g. a finished fake-tensor pass
            # that is not collected yet): collect once and retry.
            if attempt == 0:
                gc.collect()
            continue
        _on_undo(functools.partial(_swap_back, owner, leaf, old, fresh))
        return
    _replace([(owner, leaf)], fresh)  # last resort: identity is lost


def _swap_back(owner: nn.Module, leaf: str, old: torch.Tensor, fresh: torch.Tensor) -> None:
    """Undo a swap; where a live view or weak reference blocks it, put the meta tensor
    (now under ``fresh``) back in the table instead: identity is lost, not the state."""
    try:
        torch.utils.swap_tensors(old, fresh)
    except RuntimeError:
        table: dict[str, Any] = owner._parameters if leaf in owner._parameters else owner._buffers
        table[leaf] = fresh


def _replace(places: list[tuple[nn.Module, str]], fresh: torch.Tensor) -> None:
    """``fresh`` under each (module, name), undoably."""
    for owner, leaf in places:
        table: dict[str, Any] = owner._parameters if leaf in owner._parameters else owner._buffers
        before = table[leaf]
        table[leaf] = fresh
        _on_undo(functools.partial(table.__setitem__, leaf, before))


def _rebuild(
    layer: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    seeds: Callable[[str], int] | None,
    owners: _Owners,
) -> None:
    from ._initialize import apply_registered, mark_initialized, run_registered  # noqa: PLC0415

    state = layer.__dict__["_di"]
    args, kwargs = constructor_call(state.deferred, state.arguments, state.values)
    explicit_device = "device" in kwargs
    cls = state.deferred._di_cls
    old = {n: t for n, t in _named(layer).items() if _is_meta(t)}
    if seeds is None and not any(isinstance(t, DTensor) for t in old.values()):
        if explicit_device:
            kwargs["device"] = device
        with torch.device(device):
            fresh = cls(*args, **kwargs)
        new = _named(fresh)
        for name, tensor in old.items():
            if name in new:
                _put(layer, name, tensor, new[name], device, dtype, owners)
        run_registered(layer)
        return

    def make() -> nn.Module:
        if explicit_device:
            kwargs["device"] = torch.get_default_device()
        module: nn.Module = cls(*args, **kwargs)
        if state.init is not None:
            apply_registered(module, state.init, recurse=True)
        return module

    if _place_whole(layer, old, make, device, dtype, seeds, owners):
        if state.init is not None:
            mark_initialized(layer)
        return
    for name, value in each_tensor(make, list(old), device, seeds):
        _put(layer, name, old[name], value, device, dtype, owners)
        del value
    if state.init is not None:
        mark_initialized(layer)


def _place_whole(
    layer: nn.Module,
    old: dict[str, torch.Tensor],
    make: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype | None,
    seeds: Callable[[str], int] | None,
    owners: _Owners,
) -> bool:
    """``seed=`` on tensors that are not sharded: one run with a generator per tensor
    (the values each_tensor gives, at the cost of one initialization)."""
    if seeds is None or any(isinstance(t, DTensor) for t in old.values()):
        return False
    whole = seeded_whole(make, device, seeds)
    if whole is None:
        return False
    new = _named(whole)
    for name, tensor in old.items():
        _put(layer, name, tensor, new[name], device, dtype, owners)
    return True


def _named(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


def _put(
    layer: nn.Module,
    name: str,
    old: torch.Tensor,
    value: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    owners: _Owners,
) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(owner_name)
    if isinstance(old, DTensor):
        places = owners.get(id(old), [(owner, leaf)])
        if _is_meta(old):  # a tied tensor is filled once, under its first name
            _fill_shard(places, old, value, device, dtype)
    else:
        _place(owner, leaf, old, value, dtype)


def _fill_shard(
    places: list[tuple[nn.Module, str]],
    sharded: DTensor,
    full: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """A sharded (FSDP2 / DTensor) tensor: this rank keeps only its own shard, a
    copy of the matching slice of the single-process value, under every name the
    tensor has."""
    shape, offset = compute_local_shape_and_global_offset(
        sharded.shape, sharded.device_mesh, sharded.placements
    )
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    want = dtype if dtype is not None and full.is_floating_point() else sharded.dtype
    # copy=True: a slice along dim 0 is a view, which would keep the full tensor alive.
    local = full.detach()[index].to(device=device, dtype=want, copy=True).contiguous()
    value = DTensor.from_local(
        local,
        sharded.device_mesh,
        sharded.placements,
        run_check=False,
        shape=sharded.shape,
        stride=sharded.stride(),
    )
    # A new parameter object, as load_state_dict(assign=True) makes: FSDP2 re-pads
    # and re-registers it at its lazy init. Create optimizers after materializing.
    fresh: torch.Tensor = value
    if isinstance(sharded, nn.Parameter):
        fresh = nn.Parameter(value, requires_grad=sharded.requires_grad)
    _replace(places, fresh)


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
    owners: _Owners,
) -> None:
    """A module declared on meta: its own initialization (``reset_parameters``, then
    a registered initializer) runs on a stand-in whose direct tensors are fresh, in
    their declared dtype and strides, and only the meta tensors take its values:
    tensors that are real already (loaded, or tied to a filled one) keep theirs.
    A meta tensor that this initialization does not set (a buffer computed in
    ``__init__``, which never ran for real) is an error, not garbage."""
    from ._initialize import apply_registered, mark_initialized  # noqa: PLC0415

    registered = module.__dict__.get("_di_meta_init")
    declared = [
        (table, leaf, t)
        for table in ("_parameters", "_buffers")
        for leaf, t in getattr(module, table).items()
    ]
    old: dict[str, torch.Tensor] = {}  # meta tensors, each under its first name (ties)
    for _, leaf, t in declared:
        if t is not None and _is_meta(t) and all(t is not o for o in old.values()):
            old[leaf] = t

    def make() -> nn.Module:
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
        # Kept alive with their storages, so no new tensor can reuse their addresses.
        fresh = {leaf: (t, t.untyped_storage()) for leaf, t in _direct(stand_in) if leaf in old}
        stand_reset = getattr(stand_in, "reset_parameters", None)
        with written_storages() as written:
            if callable(stand_reset):
                stand_reset()
            if registered is not None:
                apply_registered(stand_in, registered, recurse=False)
        unset = [
            leaf
            for leaf, t in _direct(stand_in)
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
            new = dict(_direct(make()))
        for leaf, tensor in old.items():
            _place(module, leaf, tensor, new[leaf], dtype)
    elif not _place_whole(module, old, make, device, dtype, seeds, owners):
        for leaf, value in each_tensor(make, list(old), device, seeds):
            _put(module, leaf, old[leaf], value, device, dtype, owners)
            del value
    if registered is not None:
        mark_initialized(module, recurse=False)
