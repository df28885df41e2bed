"""``di.materialize``: allocate and initialize every meta tensor below a module.

Layers that deferinit built are *constructed again* on the target device with
the arguments they were built with: their own ``__init__`` draws the random
numbers in the same order as eager construction (MultiheadAttention, say,
initializes ``out_proj`` before ``in_proj_weight``), so the values are bitwise
the eager model's under the same seed. Other modules declared under
``torch.device("meta")`` run their own ``reset_parameters`` and registered
initializer on a stand-in with fresh tensors, and their meta tensors take its
values, with an :class:`~deferinit._errors.UnrecordedInitWarning` where no
initializer is registered: nothing recorded what their model's ``__init__`` did
after constructing them. Registered initializers run on that fresh copy, never on the model's own
tensors, so that a failure can always be undone. Registration order throughout;
parameter objects keep their identity (whatever else refers to them); at
most one layer's worth of extra memory at a time; all or nothing (any error puts
every tensor back on meta).

Sharded (FSDP2, tensor parallel) tensors go one tensor at a time instead
(:func:`deferinit._fill._each.each_tensor`): a rank keeps only its slice of each
value, in one run of each layer's initialization. With ``seed=`` a tensor's value
depends only on the seed and its qualified name, so layers are computed by as many
threads as ``torch.get_num_threads()`` (:mod:`deferinit._fill._parallel`).

This module plans the steps and holds the undo log; filling one layer is
:mod:`deferinit._fill._layers`.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from .._declare._copies import next_operation
from .._declare._deferred import BUILD_LOCK, Deferred
from .._errors import (
    ArgumentsError,
    DeferredInitError,
    NotBuiltError,
    UnrecordedInitWarning,
    device_argument,
)
from .._lazy import refuse_lazy
from .._naming import root_scope
from .._random import Generators
from .._record import awaiting_replay, changed_on_meta, records, replay_recorded
from .._tensors import is_meta, own_tensors
from ._layers import own_reset, tensor_attributes
from ._parallel import Step, filled_in_order, threads_for
from ._placing import UNDO, Undo, sharded_owners

__all__ = ["materialize"]

M = TypeVar("M", bound=nn.Module)

_LARGE = 1 << 30  # show a progress bar by default beyond this many bytes
_NAMED = 5  # modules named in the unrecorded-init warning before "and N more"


def _plan(
    root: nn.Module, seed: int | None
) -> tuple[list[tuple[str, str, nn.Module]], list[str], list[str], list[str]]:
    """(kind, name, module) steps in registration order (deferinit's layers in
    declaration order), deferred names, unfit names,
    and the plain tensor attributes on meta that nothing can fill."""
    steps: list[tuple[str, str, nn.Module]] = []
    deferred: list[str] = []
    unfit: list[str] = []
    unknown: list[str] = []
    skip: list[str] = []
    replayed = {id(t) for t in awaiting_replay(root, seed)}  # replay_recorded fills them first
    recorded = [name for name, _ in records(root)]  # twins below: the replay draws for them
    after: list[tuple[str, tuple[str, str, nn.Module]]] = []  # (prefix, step): see below
    for name, sub in root.named_modules():
        while after and not _below(name, after[-1][0]):
            steps.append(after.pop()[1])
        if any(s == "" or name == s or name.startswith(s + ".") for s in skip):
            continue  # inside a layer already planned whole ("" is the root itself)
        if isinstance(sub, Deferred):
            deferred.append(name)
            skip.append(name)
            continue
        state = sub.__dict__.get("_di")
        if state is not None and state.values is not None:
            tensors = [*sub.parameters(), *sub.buffers()]
            plain = [t for t, _ in tensor_attributes(sub).values()]
            # Its constructor makes them, so a rebuild fills them too (a layer whose
            # parameters a checkpoint gave may still hold one on meta).
            if any(is_meta(t) and id(t) not in replayed for t in [*tensors, *plain]):
                steps.append(("rebuild", name, sub))
                skip.append(name)
            elif (
                seed is None
                and state.meta_versions is not None
                and not any(is_meta(t) for t in [*tensors, *plain])
                and not any(_below(name, prefix) for prefix in recorded)
            ):
                # Built on meta, and every tensor real since (tied to a real tensor
                # before the build, or loaded): eager's construction drew for it all
                # the same, so it is constructed again for its draws alone, the
                # values of the layers after it eager's too.
                steps.append(("rebuild", name, sub))
                skip.append(name)
            continue
        unknown += [
            f"{name + '.' if name else ''}{attribute} ({type(sub).__name__})"
            for attribute, t in _own_plain_tensors(sub)
            if is_meta(t) and id(t) not in replayed
        ]
        if (
            seed is None
            and not own_tensors(sub)
            and _whole_model_reset(sub)
            and any(is_meta(t) and id(t) not in replayed for t in sub.parameters())
        ):
            # nn.Transformer: no tensor of its own, and a _reset_parameters that
            # re-initializes its submodules' once they are constructed (eager's order).
            after.append((name, ("reset", name, sub)))
            continue
        if any(is_meta(t) and id(t) not in replayed for t in own_tensors(sub).values()):
            has_init = sub.__dict__.get("_di_meta_init") is not None
            reset = own_reset(sub)
            if reset is not None and reset.__name__ == "_reset_parameters":
                # nn.MultiheadAttention's kind runs it at the end of __init__, after its
                # submodules' construction, and it sets their tensors too (out_proj's
                # bias): after them here as well, as in eager's order.
                after.append((name, ("reset", name, sub)))
            elif has_init or reset is not None:
                steps.append(("reset", name, sub))
            else:
                unfit.append(f"{name or '<root>'} ({type(sub).__name__})")
    steps.extend(step for _, step in reversed(after))
    _rebuilds_in_declaration_order(steps)
    return steps, deferred, unfit, unknown


def _rebuilds_in_declaration_order(steps: list[tuple[str, str, nn.Module]]) -> None:
    """Put the deferinit layers' rebuilds in the order the layers were declared,
    among the places rebuilds take: eager constructs a layer declared before the
    container that registers it (d2l's ``shared`` layer) first."""
    places = [i for i, (kind, _, _) in enumerate(steps) if kind == "rebuild"]
    declared = sorted((steps[i] for i in places), key=lambda step: step[2].__dict__["_di"].seq)
    for i, step in zip(places, declared, strict=True):
        steps[i] = step


def _own_plain_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``module`` itself holds as plain attributes (not below it)."""
    registered = {id(t) for t in [*module.parameters(), *module.buffers()]}
    found = tensor_attributes(module, registered, recurse=False)
    return [(name, t) for name, (t, _) in found.items()]


def _whole_model_reset(module: nn.Module) -> bool:
    """Whether the module's own initialization is a ``_reset_parameters`` of torch's
    own class (``nn.Transformer``'s sets every submodule's weights)."""
    reset = own_reset(module)
    return (
        reset is not None
        and reset.__name__ == "_reset_parameters"
        and str(getattr(reset, "__module__", "")).startswith("torch.")
    )


def _below(name: str, prefix: str) -> bool:
    """Whether the module ``name`` is inside the one at ``prefix``."""
    return prefix == "" or name.startswith(prefix + ".")


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
    registration order (deferinit's layers in the order they were declared, as
    eager constructs them): bitwise the eager model under the same seed. ``dtype``
    converts floating-point tensors, as ``module.to(dtype)`` would after eager
    construction. With ``seed`` every tensor is initialized alone, from a generator
    seeded with ``seed`` and its qualified name (below ``module``): its values do
    not depend on order, on the rest of the model, on which layers were deferred,
    on how many ranks share it or on how many threads compute it; the global
    generator is left alone. On the CPU, ``seed=`` computes independent layers in
    ``torch.get_num_threads()`` threads at once (``torch.set_num_threads(1)``: one
    at a time); layers whose code is not torch's own (a registered initializer, a
    class of your own) are computed by the calling thread alone. Parameters sharded
    with FSDP2 (``fully_shard``) or tensor parallelism (``parallelize_module``) get
    the matching slice of the value a single process computes, and each rank
    allocates only its shard (plus one full tensor at a time while it is
    initialized).
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
    target = _target(module, device, dtype)
    seed = _seed(seed)
    refuse_lazy(module, "di.materialize")
    with BUILD_LOCK, root_scope(module):
        steps = _fillable_steps(module, seed)
        _warn_unrecorded(steps)
        total = 0
        show = progress if progress is not None else sys.stderr.isatty()
        if show:  # the sizes walk every layer's tensors: only where a bar may show
            total = sum(_bytes(sub) for _, _, sub in steps)
            total += sum(t.numel() * t.element_size() for t in awaiting_replay(module, seed))
            show = progress if progress is not None else total > _LARGE
        with _progress(show, total) as advance:
            _fill_all_or_nothing(module, steps, target, dtype, seed, advance)
    return module


def _target(
    module: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None
) -> torch.device:
    """The device to fill on; ``TypeError``/``ValueError`` for arguments that cannot be."""
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.materialize expects an nn.Module, got {type(module).__name__}. Nothing was "
            f"allocated. Fix: pass the model."
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentsError(
            f"di.materialize: dtype must be a floating-point dtype, got {dtype!r}. Nothing "
            f"was allocated. Fix: e.g. dtype=torch.bfloat16, or leave it out."
        )
    target = device_argument("di.materialize", device, "allocated")
    if target is None:
        target = torch.get_default_device()
    if target.type == "meta":
        raise ArgumentsError(
            "di.materialize: device='meta' allocates nothing; pass a real device. Nothing was "
            "allocated. Fix: e.g. device='cpu'."
        )
    return target


def _seed(seed: object) -> int | None:
    """``seed`` as an int (any integer type, e.g. numpy's), or ``None``; a
    ``TypeError`` for anything else, before anything changes.

    >>> _seed(None), _seed(7)
    (None, 7)
    """
    if seed is None:
        return None
    try:
        return operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentsError(
            f"di.materialize: seed must be an integer (or None), got "
            f"{type(seed).__name__} {seed!r}. Nothing was allocated. Fix: pass an int, "
            f"e.g. seed=0."
        ) from None


def _fillable_steps(root: nn.Module, seed: int | None) -> list[tuple[str, str, nn.Module]]:
    """:func:`_plan`'s steps, or an error, before anything is allocated, where some
    meta tensor has no way to be filled."""
    steps, deferred, unfit, unknown = _plan(root, seed)
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
    recorded = changed_on_meta(root)
    built = [n for kind, name, sub in steps if kind == "rebuild" for n in _changed(name, sub)]
    if recorded or built:
        how = []
        if recorded:
            how.append(f"{_listed(recorded)} after di.deferred_init recorded the model")
        if built:
            how.append(f"{_listed(built)} after di.build(..., device='meta') built it")
        raise DeferredInitError(
            f"di.materialize: init code changed {' and '.join(how)}: an in-place call on a "
            f"meta tensor (nn.init.zeros_, Module.apply of an init function) changes "
            f"nothing, since a meta tensor holds no values, and di.materialize cannot run "
            f"it again. Nothing was allocated. Fix: run that init code after "
            f"di.materialize, or register it before with di.initialize(model, init) "
            f"(di.materialize then runs it on each layer), or put it in the factory given "
            f"to di.deferred_init."
        )
    if unknown:
        raise NotBuiltError(
            f"di.materialize: {', '.join(unknown)} are plain tensor attributes on meta "
            f"(neither parameters nor buffers) of modules declared under "
            f"torch.device('meta'): their values were computed in __init__, which never "
            f"ran for real, and no reset_parameters sets them. Nothing was allocated. "
            f"Fix: construct the model with di.deferred_init(Model, *args), which replays "
            f"them, or make them buffers (register_buffer) that an initializer fills."
        )
    return steps


def _changed(name: str, layer: nn.Module) -> list[str]:
    """Qualified names of ``layer``'s parameters still on meta that an in-place
    operation changed since ``di.build`` built the layer on meta (buffers are left
    out: a forward in training mode on meta inputs updates running statistics)."""
    versions = layer.__dict__["_di"].meta_versions
    if not versions:
        return []
    prefix = f"{name}." if name else ""
    return [
        prefix + leaf
        for leaf, t in layer.named_parameters()
        if is_meta(t) and t._version > versions.get(leaf, t._version)
    ]


def _listed(names: list[str]) -> str:
    """``names`` quoted, the first few of them."""
    shown = ", ".join(repr(n) for n in names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


def _warn_unrecorded(steps: list[tuple[str, str, nn.Module]]) -> None:
    """One :class:`UnrecordedInitWarning` naming the modules that only their own
    ``reset_parameters`` can fill: declared on meta, neither built by deferinit
    nor recorded, with no initializer registered (that is the user's own init).
    Warned before anything is allocated, so that ``-W error`` refuses cleanly."""
    names = [
        f"{name or '<root>'} ({type(sub).__name__})"
        for kind, name, sub in steps
        if kind == "reset" and sub.__dict__.get("_di_meta_init") is None
    ]
    if not names:
        return
    shown = ", ".join(names[:_NAMED])
    if len(names) > _NAMED:
        shown += f" and {len(names) - _NAMED} more"
    warnings.warn(
        f"di.materialize: {shown}: declared under torch.device('meta') without "
        f"di.deferred_init, so nothing recorded their construction and each gets only "
        f"its own reset_parameters. The model's own initialization code (init loops in "
        f"its __init__, values computed there) is not replayed, so these values can "
        f"differ from eager construction. Fix: construct the model with "
        f"di.deferred_init(Model, *args) instead of under torch.device('meta'), or "
        f"register its init with di.initialize(module, init).",
        UnrecordedInitWarning,
        stacklevel=3,
    )


def _fill_all_or_nothing(
    root: nn.Module,
    steps: list[tuple[str, str, nn.Module]],
    target: torch.device,
    dtype: torch.dtype | None,
    seed: int | None,
    advance: Callable[[int], None] | None,
) -> None:
    """Each step in order, logging how to undo it; on any error every tensor goes
    back on meta under its own object, and the random generators where they were,
    so that a corrected call gives eager's values."""
    owners = sharded_owners(root)
    undo: list[Undo] = []
    # Without seed=, a failure puts the generators back, so that a corrected call
    # gives eager's values; with seed= nothing of them was drawn or set, and putting
    # them back would undo other threads' draws made meanwhile (DESIGN §3.6).
    generators = Generators(target) if seed is None else None
    next_operation()  # copies of a layer constructed from here draw anew (_copies)
    token = UNDO.set(undo)
    try:
        # Recorded constructions first (di.deferred_init), in program order.
        replay_recorded(root, device=target, dtype=dtype, seed=seed, undo=undo, advance=advance)
        planned = [Step(kind, name, sub, _seeds(seed, name)) for kind, name, sub in steps]
        threads = threads_for(seed is not None, target)
        with filled_in_order(planned, target, dtype, threads) as filled:
            for done in filled:
                for name, value in done.values:
                    done.fill.place(name, value, dtype, owners)
                    del value
                done.fill.finish()
                if advance is not None:
                    advance(_bytes(done.step.module))
        _filled(root)
    except BaseException as error:
        lost = [why for action in reversed(undo) if (why := action()) is not None]
        if generators is not None:
            generators.restore()
        if lost:
            _report_lost(error, lost)
        raise
    finally:
        UNDO.reset(token)


def _filled(root: nn.Module) -> None:
    """Every layer built on meta that holds no meta tensor now is filled: no longer
    one a later ``di.materialize`` constructs again (:func:`_plan`)."""
    for sub in root.modules():
        state = sub.__dict__.get("_di")
        if state is None or state.meta_versions is None:
            continue
        if not any(is_meta(t) for t in [*sub.parameters(), *sub.buffers()]):
            state.meta_versions = None


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
def _progress(show: bool, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar's ``update`` (bytes filled), or ``None`` when not shown."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm  # noqa: PLC0415 - ~0.1 s (asyncio); most calls show no bar

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="materialize")
    try:
        yield bar.update
    finally:
        bar.close()
