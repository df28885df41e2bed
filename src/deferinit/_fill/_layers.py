"""Filling one layer's meta tensors, the two ways ``di.materialize`` knows.

* :class:`Rebuild`: a layer deferinit built on meta is constructed again for real
  with the arguments it was built with, so its own ``__init__`` draws the random
  numbers in eager order.
* :class:`ResetOnStandIn`: a module declared under ``torch.device("meta")`` runs
  its ``reset_parameters`` and registered initializer on a stand-in with fresh
  tensors.

Either way user code runs on a copy, never on the model's own tensors, so that a
failure can always be undone. A :class:`Fill` computes the values
(:meth:`Fill.values`, which touches nothing of the model, so that ``seed=`` can
compute several layers at once in worker threads), then places them under the
model's own objects (:meth:`Fill.place`, :mod:`deferinit._fill._placing`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Hashable, Iterator
from typing import Any

import torch
from torch import nn

from .._become._initialize import Registration, apply_registered, mark_initialized
from .._declare._copies import CopyDraw, constructed_as_copy
from .._declare._deferred import Deferred
from .._declare._layout import quiet
from .._declare._pending import Call, pending_calls, run_pending
from .._declare._signature import constructor_call
from .._declare._state import declared_defaults, default_device, on_device
from .._errors import DeferredInitError, NotBuiltError
from .._random import Drawing
from .._shards import is_dtensor
from .._tensors import construct_on_meta, is_meta, own_tensors, tensors_by_name
from ._dispatch import saved_generators, storage_key, written_storages
from ._each import each_tensor
from ._hugepages import huge_pages
from ._once import Scratch
from ._placing import Owners, Slot, local_part, place_attribute, place_by_name
from ._streams import seeded_whole

__all__ = ["Fill", "Rebuild", "ResetOnStandIn", "tensor_attributes"]

_CPU = torch.device("cpu")
Seeds = Callable[[str], int] | None  # a tensor's generator seed by its name (seed=)


class Fill:
    """One layer's meta tensors (``old``, by name below ``module``, which sits at
    ``prefix``): their values, computed by ``make`` (constructed and initialized;
    ``construct``: constructed only, for dry runs on meta), then placed."""

    recurse = True  # the registered initializer ran on the submodules too
    key: Hashable | None = None  # what construct constructs, where it says (seed=)

    def __init__(
        self,
        module: nn.Module,
        prefix: str,
        old: dict[str, torch.Tensor],
        make: Callable[[], nn.Module],
        construct: Callable[[], nn.Module],
        registered: Registration | None,
    ) -> None:
        self.module = module
        self.prefix = prefix
        self.old = old
        self.make = make
        self.construct = construct
        self.registered = registered

    def values(
        self, device: torch.device, dtype: torch.dtype | None, seeds: Seeds, scratch: Scratch
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, value)`` for every tensor of ``old``: the whole value, or for a
        sharded tensor this rank's slice (:func:`local_part`). Reads the model,
        never changes it. ``scratch`` lends the memory in which a tensor is written
        before its slice is kept."""
        keep = functools.partial(self._keep, device, dtype)
        sharded = any(is_dtensor(t) for t in self.old.values())
        if seeds is None and not sharded:
            with huge_pages(self.old.values(), device, populate=True):
                new = self._made(device)
            for name in self.old:
                yield name, new[name]
            return
        # seed= in one run with a generator per tensor, at the cost of one
        # initialization. Sharded tensors take this path only where a registered
        # initializer must run once per layer (the whole layer is then held for a
        # moment); otherwise one tensor at a time, for memory.
        if seeds is not None and (not sharded or self.registered is not None):
            with huge_pages(self.old.values(), device, populate=True):
                whole = seeded_whole(
                    self.make, device, seeds, construct=self.construct, key=self.key
                )
            if whole is not None:
                new = tensors_by_name(whole)
                _check_known(self.module, self.prefix, self.old, new)
                for name in self.old:
                    yield name, keep(name, new[name])
                return
        # The kept parts are computed under the advice, then handed on: a torch
        # function mode must not stay entered while the caller places them.
        with huge_pages(self.old.values(), device):
            kept = list(
                each_tensor(
                    self.make,
                    list(self.old),
                    device,
                    seeds,
                    construct=self.construct,
                    keep=keep,
                    scratch=scratch,
                    known=functools.partial(self._known, device, seeds is not None),
                )
            )
        yield from kept

    def _keep(
        self, device: torch.device, dtype: torch.dtype | None, name: str, full: torch.Tensor
    ) -> torch.Tensor:
        return local_part(self.old[name], full, device, dtype)

    def _made(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every tensor of one real run of ``make``, by name."""
        raise NotImplementedError

    def _known(self, device: torch.device, seeded: bool, made: set[str] | None) -> None:
        """Checks, before going one tensor at a time, of the names a dry run on meta
        made (``None``: the dry run failed); ``seeded``: under ``seed=``."""

    def place(
        self, name: str, value: torch.Tensor, dtype: torch.dtype | None, owners: Owners
    ) -> None:
        """One of :meth:`values` under the model's tensor (undoably)."""
        place_by_name(self.module, name, self.old[name], value, dtype, owners, self.prefix)

    def finish(self) -> None:
        """After every value is placed: the registered initializer counts as run."""
        if self.registered is not None:
            mark_initialized(self.module, recurse=self.recurse)


class Rebuild(Fill):
    """A layer deferinit built on meta: constructed again for real with the arguments
    it was built with, its registered initializer applied to that copy (user code
    never holds the model's own tensors mid-way, so a failure can always be undone),
    and the values placed under the layer's tensors, its plain tensor attributes on
    meta included (``self.scale = torch.full(...)`` in its ``__init__``)."""

    def __init__(self, layer: nn.Module, prefix: str) -> None:
        again = self.again = _ConstructAgain(layer, prefix)
        again.tensors = tensors_by_name(layer)  # walked once: _waiting reads it too
        old = {n: t for n, t in again.tensors.items() if is_meta(t)}
        super().__init__(layer, prefix, old, again.make, again.construct, again.registered)
        self.key = again.key()
        registered = {id(t) for t in again.tensors.values()}
        held = tensor_attributes(layer, registered)
        self.attributes = {n: (t, slot) for n, (t, slot) in held.items() if is_meta(t)}
        self.made_attributes: dict[str, torch.Tensor] | None = None  # by _made's run

    def values(
        self, device: torch.device, dtype: torch.dtype | None, seeds: Seeds, scratch: Scratch
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`Fill.values`, then each meta tensor attribute's. Without ``seed=``
        those are eager's: from the one run that gives the other tensors, or, where
        the other tensors come a part at a time (sharded), from a whole run made first
        from the same generator state (the layer held whole for a moment)."""
        # Without seed=, deep copies of one unbuilt layer start out equal (_copies).
        self.again.as_copy = seeds is None
        if not self.attributes:
            yield from super().values(device, dtype, seeds, scratch)
            return
        whole_run = seeds is None and not any(is_dtensor(t) for t in self.old.values())
        alone = None if whole_run else self._attributes_alone(device, seeds)
        yield from super().values(device, dtype, seeds, scratch)
        made = alone if alone is not None else self.made_attributes
        assert made is not None  # whole_run: Fill.values took its values from _made
        for name in self.attributes:
            yield name, made[name]

    def place(
        self, name: str, value: torch.Tensor, dtype: torch.dtype | None, owners: Owners
    ) -> None:
        held = self.attributes.get(name)
        if held is None:
            super().place(name, value, dtype, owners)
            return
        owner = self.module.get_submodule(name.split("[", 1)[0].rpartition(".")[0])
        qualified = f"{self.prefix}.{name}" if self.prefix else name
        place_attribute(owner, held[0], value, held[1], qualified)

    def _made(self, device: torch.device) -> dict[str, torch.Tensor]:
        with on_device(device):
            module = self.make()
        new = tensors_by_name(module)
        _check_known(self.module, self.prefix, self.old, new)
        if self.attributes:
            self.made_attributes = self._attributes_of(module)
        return new

    def _attributes_alone(self, device: torch.device, seeds: Seeds) -> dict[str, torch.Tensor]:
        """The tensor attributes of a run of their own, the default generators left as
        they are. Without ``seeds``, from their state now, where the run giving the
        other tensors starts too: eager's values. With ``seeds``, from the run
        :func:`seeded_whole` makes (a generator per registered tensor) where it can,
        else drawing from the layer's own stream (``seeds("")``): the same values
        whether the layer is sharded or not."""
        if seeds is None:
            generators = saved_generators(device)
            try:
                with on_device(device):
                    module = self.make()
            finally:
                generators.restore()
        else:
            whole = seeded_whole(self.make, device, seeds, construct=self.construct, key=self.key)
            if whole is None:
                with Drawing(seeds("")), on_device(device):
                    whole = self.make()
            module = whole
        return self._attributes_of(module)

    def _attributes_of(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s tensor attributes by name, each of :attr:`attributes` checked
        to be one its constructor makes."""
        made = {n: t for n, (t, _) in tensor_attributes(module).items()}
        _check_attributes(self.module, self.prefix, self.attributes, made)
        return made

    def _known(self, device: torch.device, seeded: bool, made: set[str] | None) -> None:
        if made is None and seeded:
            # Construct again, for the error the dry run met. Under seed= the
            # process-wide generators are never put back (another thread's draws
            # meanwhile would be undone); on meta nothing is drawn from them.
            made = set(tensors_by_name(construct_on_meta(self.construct)))
        elif made is None:
            generators = saved_generators(device)
            try:
                made = set(tensors_by_name(construct_on_meta(self.construct)))
            finally:
                generators.restore()
        _check_known(self.module, self.prefix, self.old, made)  # each name one it makes


# torch's own tables in a module's __dict__: parameters, buffers, submodules; and an
# RNN's _flat_weights, its parameters listed again (refreshed by torch itself at the
# next forward or .to(), and after a build on meta it may still list the objects its
# constructor made there).
_TABLES = frozenset({"_parameters", "_buffers", "_modules", "_flat_weights"})


def tensor_attributes(
    module: nn.Module, registered: set[int] | None = None, *, recurse: bool = True
) -> dict[str, tuple[torch.Tensor, Slot]]:
    """The tensors held below ``module`` as plain attributes (neither parameters nor
    buffers: ``registered`` holds their ids, default all of ``module``'s), in a
    module's ``__dict__`` or one level inside a list, tuple or dict there, with
    where each is held; by qualified name, a tensor object under its first name.
    ``recurse=False``: in ``module``'s own ``__dict__`` only.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> net[0].scale, net[0].table = torch.ones(2), [net[0].weight, torch.zeros(1)]
    >>> list(tensor_attributes(net))
    ['0.scale', '0.table[1]']
    """
    if registered is None:
        registered = {id(t) for t in tensors_by_name(module).values()}
    seen = set(registered)
    found: dict[str, tuple[torch.Tensor, Slot]] = {}
    for prefix, sub in module.named_modules() if recurse else [("", module)]:
        for key, value in sub.__dict__.items():
            if key in _TABLES or key.startswith("_di"):  # deferinit's own state
                continue
            name = f"{prefix}.{key}" if prefix else key
            for suffix, tensor, slot in _held(sub.__dict__, key, value):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    found[name + suffix] = (tensor, slot)
    return found


def _held(
    holder: dict[str, Any], key: str, value: object
) -> Iterator[tuple[str, torch.Tensor, Slot]]:
    """(name suffix, tensor, slot) for ``value`` held at ``holder[key]`` when it is a
    tensor, and for each tensor directly inside it when it is a list, tuple or dict."""
    if isinstance(value, torch.Tensor):
        yield "", value, (holder, key)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"[{i}]", item, (value, i) if isinstance(value, list) else None
    elif isinstance(value, dict):
        for k, item in value.items():
            if isinstance(item, torch.Tensor):
                yield f"[{k!r}]", item, (value, k)


def _check_attributes(
    layer: nn.Module,
    prefix: str,
    attributes: dict[str, tuple[torch.Tensor, Slot]],
    made: dict[str, torch.Tensor],
) -> None:
    """Every meta tensor attribute of a rebuilt layer must be one its constructor
    makes, of the same shape and dtype: one set after the build has no known value."""
    unknown = []
    for name, (old, _) in attributes.items():
        new = made.get(name)
        if new is None or new.shape != old.shape or new.dtype != old.dtype:
            unknown.append(name)
    if unknown:
        raise NotBuiltError(
            f"di.materialize: {prefix or '<root>'} ({type(layer).__name__}) holds the plain "
            f"tensor attribute(s) {', '.join(repr(u) for u in unknown)} on meta (neither "
            f"parameters nor buffers), which its constructor does not make as they are (set "
            f"or replaced after it was built), so their values are unknown. The model is "
            f"left as it was. Fix: set such attributes after di.materialize, or give them "
            f"real tensors (e.g. module.extra = torch.zeros(...))."
        )


class _ConstructAgain:
    """A built layer's real class, constructed with the arguments it was built
    with, in the default dtype (and grad mode) of its declaration as the build on
    meta had (docs/design.md §3.10), on whichever device the caller is filling on."""

    def __init__(self, layer: nn.Module, prefix: str) -> None:
        self.layer = layer
        self.prefix = prefix
        self.state = layer.__dict__["_di"]
        self.registered = self.state.init
        self.args, self.kwargs = constructor_call(
            self.state.deferred, self.state.arguments, self.state.values
        )
        self.explicit_device = "device" in self.kwargs
        self.tensors: dict[str, torch.Tensor] | None = None  # the layer's, by name
        self.as_copy = False  # constructed as one of several copies (exact values)
        self.draw: CopyDraw | None = None  # how the last construction drew, as a copy

    def key(self) -> Hashable | None:
        """What :meth:`construct` constructs (class, arguments, dtype), where it is
        hashable: layers with equal keys register their tensors in the same order."""
        key = (
            self.state.deferred._di_cls,
            self.args,
            tuple(self.kwargs.items()),
            self.state.dtype,
            self.state.device,
            _inner_sizes(self.layer),  # twins its __init__ declares take the model's sizes
        )
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _declared(self) -> contextlib.AbstractContextManager[Any]:
        return declared_defaults(self.state, default_device() or _CPU)

    def _own(self) -> nn.Module:
        """The layer as its own constructor leaves it: twins it declares inside
        (a ``di.defer`` block's ``dnn.Linear``) still unbuilt. Quietly: its build (on
        meta) warned as eager construction does; constructing it again must not warn
        again."""
        with self._declared(), quiet():
            if self.explicit_device:
                self.kwargs["device"] = default_device() or _CPU
            self.draw = None
            if not self.as_copy or self.state.copies is None:
                module: nn.Module = self.state.deferred._di_cls(*self.args, **self.kwargs)
            else:
                device = torch.device(self.kwargs.get("device") or default_device() or _CPU)
                with constructed_as_copy(self.layer, self.state.values, device) as draw:
                    module = self.state.deferred._di_cls(*self.args, **self.kwargs)
                self.draw = draw
        return module

    def construct(self) -> nn.Module:
        """The layer as its build leaves it: constructed, then each twin declared
        inside constructed with the sizes the model's own was built with."""
        module = self._own()
        _build_inside(module, self.layer, self.prefix, initialize=False)
        return module

    def make(self) -> nn.Module:
        """The layer as a build for real leaves it: constructed, the init calls
        that waited on its placeholders (made before its build on meta), then each
        twin declared inside made the same way, in registration order, then its
        registered initializer (the order of ``di.build``'s walk)."""
        with self._declared():
            module = self._own()
            inner = [name for name, _, _ in _inner_twins(module)]  # each runs its own
            calls, held = _waiting(self.layer, self.tensors, skip=inner)
            if calls:
                new = tensors_by_name(module)
                swap = {i: new[n] for i, n in held.items() if n in new}
                if self.draw is not None:  # one of several copies: as the first one drew
                    self.draw.run(calls, swap)
                else:
                    run_pending(calls, swap)
            _build_inside(module, self.layer, self.prefix, initialize=True)
            if self.registered is not None:
                names = set(tensors_by_name(module))
                apply_registered(module, self.registered, recurse=True, name=self.prefix)
                _check_unchanged(self.layer, self.prefix, names, set(tensors_by_name(module)))
        return module


def _inner_twins(module: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, parent, leaf) of each unbuilt twin below ``module``, in registration
    order, not looking inside one (its own build constructs what is inside)."""
    seen: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        for leaf, child in parent._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{leaf}" if prefix else leaf
            if isinstance(child, Deferred):
                yield name, parent, child
            else:
                yield from walk(child, name)

    yield from walk(module, "")


def _build_inside(module: nn.Module, layer: nn.Module, prefix: str, *, initialize: bool) -> None:
    """Each twin that ``module`` (a fresh construction of ``layer``) declares
    inside, unbuilt there, replaced by one constructed again from the model's own
    twin at that name (its ``values``, declared defaults, init calls and, with
    ``initialize``, its registered initializer), in registration order, as
    ``di.build`` does right after constructing the block."""
    for name, parent, twin in list(_inner_twins(module)):
        own = _built_at(layer, prefix, name, twin)
        again = _ConstructAgain(own, f"{prefix}.{name}" if prefix else name)
        parent._modules[name.rpartition(".")[2]] = again.make() if initialize else again.construct()


def _built_at(layer: nn.Module, prefix: str, name: str, twin: nn.Module) -> nn.Module:
    """The model's layer at ``name`` below ``layer``, built by deferinit, whose
    sizes the fresh ``twin`` there takes; an error where there is none, never a
    twin's empty placeholders in place of its values."""
    try:
        own = layer.get_submodule(name)
    except AttributeError:
        own = None
    state = None if own is None else own.__dict__.get("_di")
    if own is None or state is None or state.values is None:
        qualified = f"{prefix}.{name}" if prefix else name
        found = "nothing" if own is None else f"a {type(own).__name__} not built by deferinit"
        raise NotBuiltError(
            f"di.materialize: {prefix or '<root>'} ({type(layer).__name__}) declares the "
            f"twin {qualified!r} ({type(twin).__name__}) in its __init__, but the model holds "
            f"{found} there, so the sizes to construct it with are unknown. The model is left "
            f"as it was. Fix: build the model with di.build (or load a checkpoint) before "
            f"di.materialize, and keep the layers its blocks construct in place."
        )
    return own


def _inner_sizes(layer: nn.Module) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """The sizes each deferinit layer below ``layer`` was built with, by name."""
    sizes = []
    for name, sub in layer.named_modules():
        state = sub.__dict__.get("_di")
        if name and state is not None and state.values is not None:
            sizes.append((name, tuple(sorted(state.values.items()))))
    return tuple(sizes)


def _waiting(
    layer: nn.Module,
    tensors: dict[str, torch.Tensor] | None = None,
    skip: Collection[str] = (),
) -> tuple[list[Call], dict[int, str]]:
    """The init calls waiting on a layer built on meta, and the names of the tensor
    objects they refer to, by ``id``: those a build on meta kept (``State.queued``),
    as FSDP2, tensor parallelism or a copy may have given the layer new tensors
    without them, else those on the layer's own tensors. Not those below the
    layers named in ``skip`` (twins inside, which ran their own)."""
    queued: dict[str, tuple[torch.Tensor, list[Call]]] = layer.__dict__["_di"].queued or {}
    calls: list[Call] = []
    names: dict[int, str] = {}
    for name, tensor in (tensors if tensors is not None else tensors_by_name(layer)).items():
        if any(name.startswith(s + ".") for s in skip):
            continue
        held, queue = queued.get(name) or (tensor, pending_calls(tensor))
        calls += queue
        names[id(held)] = name
    return calls, names


def _check_known(
    layer: nn.Module, prefix: str, old: dict[str, torch.Tensor], made: Collection[str]
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


def own_reset(module: nn.Module) -> Callable[[], None] | None:
    """The module's own initialization, for a module declared on meta:
    ``reset_parameters``, or where it has none ``_reset_parameters`` (the name
    ``nn.MultiheadAttention`` and code modelled on it use); ``None`` for neither.

    >>> from torch import nn
    >>> own_reset(nn.MultiheadAttention(4, 2)).__name__
    '_reset_parameters'
    >>> own_reset(nn.ReLU()) is None
    True
    """
    for name in ("reset_parameters", "_reset_parameters"):
        reset = getattr(module, name, None)
        if callable(reset):
            return reset  # type: ignore[no-any-return]
    return None


def _unset_error(module: nn.Module, name: str, unset: list[str], registered: bool) -> NotBuiltError:
    by = "reset_parameters or the registered initializer" if registered else "reset_parameters"
    return NotBuiltError(
        f"di.materialize: {name or '<root>'} ({type(module).__name__}) was declared on meta, "
        f"and its {by} does not set {', '.join(repr(u) for u in unset)}: such a tensor is "
        f"computed in __init__, which never ran for real, so its values are unknown. The "
        f"model is left as it was. Fix: construct this module for real, set the tensor in "
        f"an initializer registered with di.initialize(module, init), or load its values."
    )


# A module's own tensors as declared: (is a parameter, leaf name, tensor or None),
# parameters first, in table order.
Declared = list[tuple[bool, str, torch.Tensor | None]]


class ResetOnStandIn(Fill):
    """A module declared on meta: its own initialization (``reset_parameters``, then
    a registered initializer) runs on a stand-in whose own tensors are fresh, in
    their declared dtype and strides, and only the meta tensors take its values:
    tensors that are real already (loaded, or tied to a filled one) keep theirs.
    A meta tensor that this initialization does not set (a buffer computed in
    ``__init__``, which never ran for real) is an error, not garbage."""

    recurse = False  # the module's own tensors only

    def __init__(self, module: nn.Module, name: str) -> None:
        declared: Declared = [(True, leaf, t) for leaf, t in module._parameters.items()]
        declared += [(False, leaf, t) for leaf, t in module._buffers.items()]
        old = _meta_under_first_name(declared)
        registered = module.__dict__.get("_di_meta_init")
        construct = functools.partial(_stand_in, module, declared)
        make = functools.partial(
            _initialized_stand_in, module, name, declared, set(old), registered
        )
        super().__init__(module, name, old, make, construct, registered)

    def _made(self, device: torch.device) -> dict[str, torch.Tensor]:
        with on_device(device):
            return own_tensors(self.make())


def _meta_under_first_name(declared: Declared) -> dict[str, torch.Tensor]:
    """The declared meta tensors by leaf name, a tied one under its first name only."""
    old: dict[str, torch.Tensor] = {}
    for _, leaf, t in declared:
        if t is not None and is_meta(t) and all(t is not o for o in old.values()):
            old[leaf] = t
    return old


def _stand_in(module: nn.Module, declared: Declared) -> nn.Module:
    """A copy of ``module`` (same class and attributes, its ``__init__`` not run:
    FSDP's classes run it) whose own tensors are fresh, uninitialized ones of the
    declared shapes, strides and dtypes on the default device; ties kept."""
    stand_in = object.__new__(type(module))
    stand_in.__dict__.update(module.__dict__)
    stand_in._parameters = {}
    stand_in._buffers = {}
    blanks: dict[int, torch.Tensor] = {}  # declared tensor -> its blank (ties kept)
    for is_parameter, leaf, tensor in declared:
        if tensor is None:  # e.g. bias=False: kept as None
            (stand_in._parameters if is_parameter else stand_in._buffers)[leaf] = None
            continue
        blank = blanks.get(id(tensor))
        if blank is None:
            blank = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
            if is_parameter:
                blank = nn.Parameter(blank, tensor.requires_grad)
            blanks[id(tensor)] = blank
        if is_parameter:
            stand_in.register_parameter(leaf, blank)  # type: ignore[arg-type]
        else:
            persistent = leaf not in module._non_persistent_buffers_set
            stand_in.register_buffer(leaf, blank, persistent=persistent)
    return stand_in


class _Blank:
    """A stand-in's fresh tensor as it was before initialization, kept alive with
    its storage so that no tensor made meanwhile can reuse their addresses."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.storage = tensor.untyped_storage()

    def left_unset(self, now: torch.Tensor, written: set[int]) -> bool:
        """Whether initialization left ``now`` (the stand-in's tensor under this
        name afterwards) holding garbage: the same object, still viewing its blank
        storage (no ``.data = ...``), which no operation wrote to."""
        return (
            now is self.tensor
            and not now.is_meta
            and now.numel() > 0  # torch.nn.init leaves empty tensors alone
            and storage_key(now) == self.storage._cdata
            and storage_key(now) not in written
        )


def _initialized_stand_in(
    module: nn.Module, name: str, declared: Declared, wanted: set[str], registered: Any
) -> nn.Module:
    """A :func:`_stand_in` after ``reset_parameters`` and the registered
    initializer; an error where they leave a ``wanted`` tensor unset."""
    stand_in = _stand_in(module, declared)
    blanks = {leaf: _Blank(t) for leaf, t in own_tensors(stand_in).items() if leaf in wanted}
    reset = own_reset(stand_in)
    with written_storages() as written:
        if reset is not None:
            reset()
        if registered is not None:
            before = set(own_tensors(stand_in))
            apply_registered(stand_in, registered, recurse=False, name=name)
            _check_unchanged(module, name, before, set(own_tensors(stand_in)))
    unset = [
        leaf
        for leaf, t in own_tensors(stand_in).items()
        if leaf in blanks and blanks[leaf].left_unset(t, written)
    ]
    if unset:
        raise _unset_error(module, name, unset, registered is not None)
    return stand_in
