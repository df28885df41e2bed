"""``di.load_state_dict``: load a checkpoint without a random initialization first.

All or nothing, in two phases. The *plan* reads the source, builds deferred
layers on ``meta`` from the saved shapes (undoable), and checks every key, value
type, shape and dtype, collecting every problem; any problem raises with the
model unchanged. The *commit* then writes, recording an undo step for each
write, so an exception there (``KeyboardInterrupt`` included) restores the model:

- a tensor with memory is copied into in place (as torch's ``load_state_dict``:
  storage, views and ties by storage are kept), after a copy of its old values;
- a meta tensor (meta-built, or just built from the checkpoint) is given a tensor
  with memory, swapped under the same Python object (optimizers keep it); so is a
  tensor with memory that a file's tensor can replace as it is (same dtype, device
  and strides) when no other tensor shares its storage: no copy of the old values.

A dict's tensors are copied, as torch's ``load_state_dict`` does: the caller's
tensors are never shared, and two keys holding one tensor never become tied
parameters. ``assign=True`` takes the caller's tensors themselves, with their
dtype and device, as torch's ``assign=True``, but under the model's parameter
objects. A file's tensors belong to nobody else, so they are taken without a
second copy (each storage once: ties by storage saved in a torch file are copied).

A model with load hooks or a ``_load_from_state_dict`` of its own (a key-renaming
override) loads through torch's own walk, which runs them, when it is fully built
(nothing deferred, on meta or lazy); the promises above are kept around it (the old
values are kept for the undo). Before that, they are refused by name: sizes come
from the checkpoint's keys before any walk, and a hook would be silently skipped.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.parameter import is_lazy

from .._become._become import become
from .._become._initialize import run_applied
from .._become._transaction import Transaction
from .._declare._deferred import BUILD_LOCK, Deferred
from .._declare._placeholder import Holder, placeholder_tensors
from .._errors import ArgumentsError, DeferredInitError, InferenceError
from .._naming import label, root_scope
from .._random import Generators
from .._swap import exchange_or_raise
from .._tensors import own_tensors
from ._commit import Write, commit, prepare
from ._read import Source, read_source
from ._sizes import (
    counts_of,
    counts_waiting,
    infer_from_shapes,
    other_shapes,
    saved_before_build,
    swappable,
    value_problem,
)

__all__ = ["load_state_dict"]

_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


def load_state_dict(
    module: nn.Module, source: Source, *, strict: bool = True, assign: bool = False
) -> _IncompatibleKeys:
    """Load ``source`` (a state dict, a ``.safetensors`` file, or a torch file read
    with ``weights_only=True``) into a built, unbuilt or meta-built ``module``.

    Unbuilt layers take their sizes from the checkpoint; nothing is randomly
    initialized first. All or nothing: every key, value type, shape and dtype is
    checked first, every problem is listed in one ``DeferredInitError``, and any
    error (an interrupt included) leaves the model as it was. Parameter objects
    are kept. Values take the model's dtype (converted as ``Tensor.copy_``); a
    dict's tensors are copied, unless ``assign=True``, which puts the caller's
    tensors (their storage, dtype and device) under the model's parameter objects.
    With ``strict=False`` missing and unexpected keys are skipped. Returns torch's
    ``_IncompatibleKeys(missing_keys, unexpected_keys)``, as
    ``nn.Module.load_state_dict``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> saved = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)).state_dict()
    >>> net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
    >>> di.load_state_dict(net, saved)
    <All keys matched successfully>
    >>> net[0], torch.equal(net[2].weight, saved["2.weight"])
    (Linear(in_features=20, out_features=256, bias=True), True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.load_state_dict expects an nn.Module, got {type(module).__name__}. Fix: pass "
            f"the model first, then the checkpoint: di.load_state_dict(model, source)."
        )
    state, shown, owned, metadata = read_source(source)
    with BUILD_LOCK, root_scope(module):
        own = _own_loaders(module)
        if own:
            if _fully_built(module):
                return _load_with_torch(module, state, metadata, shown, strict, assign)
            sub, what = own[0]
            raise DeferredInitError(
                f"di.load_state_dict: {label(sub)} has {what}, which only a load walking "
                f"built layers runs (as torch's load_state_dict), and "
                f"{type(module).__name__} is not fully built (deferred or meta layers "
                f"take their sizes from the checkpoint's keys first): it would be "
                f"skipped. Nothing was loaded. Fix: build the model first, e.g. "
                f"di.build(model, example) (di.materialize for a model on meta), then load."
            )
        built: list[Transaction] = []
        # A layer the checkpoint leaves a tensor of is constructed for real, drawing
        # from the generators (as eager's construction before its load): a load that
        # fails after that puts them back, so that a corrected call gives eager's values.
        generators = Generators(torch.get_default_device())
        try:
            devices: dict[int, torch.device] = {}
            # Ordinary tensors even under torch.inference_mode(), as torch's loader
            # leaves them (it copies into the model's own); the writes themselves run
            # in the caller's mode, as torch's copies do.
            with torch.inference_mode(False):
                writes, extra, missing, unexpected = _plan(
                    module, state, metadata, shown, strict, built, devices
                )
                prepare(writes, devices, owned=owned, assign=assign)
            commit(writes, extra)
        except BaseException:
            for txn in reversed(built):
                txn.rollback()
            if built:
                generators.restore()
            raise
    return _IncompatibleKeys(missing, unexpected)


def _plan(
    module: nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any],
    shown: str,
    strict: bool,
    built: list[Transaction],
    devices: dict[int, torch.device],
) -> tuple[list[Write], list[tuple[nn.Module, Any]], list[str], list[str]]:
    extra_keys = _extra_state_keys(module)
    # Only the values the model takes: torch skips (strict=False) or reports
    # (strict=True) the other keys, whatever they hold.
    takes = set(module.state_dict(keep_vars=True)) - extra_keys
    found = {k: value_problem(k, v) for k, v in state.items() if k in takes}
    problems = [p for p in found.values() if p is not None]
    bad = {k for k, p in found.items() if p is not None}
    problems += _build_from(module, state, bad, built, devices)
    expected = module.state_dict(keep_vars=True)
    for key in expected.keys() - takes - extra_keys:  # keys of layers built just now
        if key in state and (problem := value_problem(key, state[key])) is not None:
            problems.append(problem)
            bad.add(key)
    kept = _old_counts(module, state, metadata)
    missing = [k for k in expected if k not in state and k not in kept]
    unexpected = _unexpected(module, state)
    writes: list[Write] = []
    extra: list[tuple[nn.Module, Any]] = []
    misfit: list[str] = []
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        prefix = owner_name + "." if owner_name else ""
        tensors = own_tensors(owner)
        # A count saved into a twin left deferred waits for its build.
        waiting = (
            counts_waiting(owner, {n: state[prefix + n] for n in tensors if prefix + n in state})
            if isinstance(owner, Deferred) and not any(prefix + n in bad for n in tensors)
            else {}
        )
        for leaf, target in tensors.items():
            key = prefix + leaf
            if key not in state or key in bad or key not in expected:
                continue
            value = state[key]
            problem = _fit(module, owner, key, target, value)
            if problem:
                misfit.append(problem)
            elif leaf in waiting and is_lazy(target):
                writes.append(Write(owner, target, key, waiting[leaf]))
            elif not is_lazy(value) and not (is_lazy(target) and isinstance(owner, Deferred)):
                # (a count saved by torch's Lazy norm into a twin left deferred: its
                # build gives the count, as torch's Lazy norm's first forward does)
                writes.append(Write(owner, target, key, value))
        if prefix + _EXTRA_STATE in extra_keys and prefix + _EXTRA_STATE in state:
            extra.append((owner, state[prefix + _EXTRA_STATE]))
    problems += [f"size mismatch: {', '.join(misfit)}"] if misfit else []
    if strict:
        problems += [f"missing keys: {', '.join(missing)}"] if missing else []
        problems += [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []
    if problems:
        raise _does_not_fit(module, shown, problems)
    return writes, extra, missing, unexpected


def _does_not_fit(module: nn.Module, shown: str, problems: list[str]) -> DeferredInitError:
    return DeferredInitError(
        f"di.load_state_dict: {shown} does not fit {type(module).__name__}: "
        f"{'; '.join(problems)}. Nothing was loaded. Fix: load the checkpoint of this "
        f"model (with strict=False, missing and unexpected keys are skipped)."
    )


def _own_loaders(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The modules below ``module`` whose loading is their own: load hooks (not the
    one each torch Lazy module registers for itself, which this loader stands in for)
    or a class overriding ``_load_from_state_dict`` below the torch (or deferinit)
    class it derives from; torch's own classes (BatchNorm) override it as this
    loader already knows. With what, in words."""
    found: list[tuple[nn.Module, str]] = []
    for sub in module.modules():
        lazy = getattr(sub, "_load_hook", None) if isinstance(sub, LazyModuleMixin) else None
        pre = [k for k in sub._load_state_dict_pre_hooks if lazy is None or k != lazy.id]
        if pre or sub._load_state_dict_post_hooks:
            found.append((sub, "a load hook (register_load_state_dict_pre/post_hook)"))
            continue
        cls = type(sub)._di_cls if isinstance(sub, Deferred) else type(sub)
        for base in cls.__mro__:
            if base.__module__.split(".")[0] in ("torch", "deferinit"):
                break
            if "_load_from_state_dict" in vars(base):
                found.append((sub, f"its own {base.__name__}._load_from_state_dict"))
                break
    return found


def _fully_built(module: nn.Module) -> bool:
    """Nothing deferred, nothing on meta, no torch Lazy placeholder."""
    if any(isinstance(sub, Deferred) for sub in module.modules()):
        return False
    tensors = [*module.parameters(), *module.buffers()]
    return not any(t.is_meta or is_lazy(t) for t in tensors)


# torch's words for a saved tensor of another shape (Module._load_from_state_dict).
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>\S+): copying a param with shape "
    r"torch\.Size\(\[(?P<saved>[^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<model>[^\]]*)\]\)"
)


def _load_with_torch(
    module: nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any],
    shown: str,
    strict: bool,
    assign: bool,
) -> _IncompatibleKeys:
    """torch's own ``load_state_dict`` on a fully built ``module`` (its hooks and
    overrides run), all or nothing: every tensor object and its values before the
    load are kept and put back on any exception; problems are a DeferredInitError."""
    given: OrderedDict[str, Any] = OrderedDict(state)  # torch's walk may pop keys of it
    if metadata:
        given._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    subs = list(module.modules())
    tables: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (t, dict(t)) for sub in subs for t in (sub._parameters, sub._buffers)
    ]
    with torch.no_grad():
        kept = {
            id(t): (t, t.detach().clone())
            for _, old in tables
            for t in old.values()
            if t is not None
        }
    undo: list[Callable[[], None]] = []
    try:
        try:
            # strict=False: the keys torch's strict check would read, after the post
            # hooks, come back; the strict check is made below, in this loader's words.
            result: _IncompatibleKeys = module.load_state_dict(given, strict=False, assign=assign)
        except RuntimeError as error:
            head, *lines = str(error).split("\n\t")
            if not head.startswith("Error(s) in loading state_dict for") or not lines:
                raise
            raise _does_not_fit(
                module, shown, [_in_words(module, line) for line in lines]
            ) from None
        problems: list[str] = []
        if strict and result.missing_keys:
            problems.append(f"missing keys: {', '.join(result.missing_keys)}")
        if strict and result.unexpected_keys:
            problems.append(f"unexpected keys: {', '.join(result.unexpected_keys)}")
        if problems:
            raise _does_not_fit(module, shown, problems)
        if assign:
            with swappable(subs):
                _keep_objects(tables, undo)
    except BaseException:
        with swappable(subs), torch.no_grad():
            for step in reversed(undo):
                step()
            for table, old in tables:
                table.clear()
                table.update(old)
            for tensor, values in kept.values():
                tensor.copy_(values)
        raise
    return result


def _in_words(module: nn.Module, line: str) -> str:
    """One of torch's error lines, a shape mismatch in this loader's words."""
    found = _SIZE_MISMATCH.match(line)
    if found is None:
        return line.strip().rstrip(".")
    key = found["key"]
    saved, model = (
        tuple(int(d) for d in found[s].split(",") if d.strip()) for s in ("saved", "model")
    )
    try:
        owner = module.get_submodule(key.rpartition(".")[0])
    except AttributeError:
        return f"{key}: checkpoint {saved}, model {model}"
    return f"{_where(module, owner, key)}: checkpoint {saved}, model {model}"


def _keep_objects(
    tables: list[tuple[dict[str, Any], dict[str, Any]]], undo: list[Callable[[], None]]
) -> None:
    """After torch's ``assign=True`` (new objects), each old parameter or buffer
    object takes the assigned data and its place back: optimizers keep it."""
    for table, old in tables:
        for name, before in old.items():
            new = table.get(name)
            if before is None or new is None or new is before:
                continue
            fresh = (
                nn.Parameter(new.detach(), requires_grad=new.requires_grad)
                if isinstance(before, nn.Parameter)
                else new.detach().requires_grad_(new.requires_grad)
            )
            exchange_or_raise(
                before,
                fresh,
                f"di.load_state_dict(assign=True): tensor {name!r}",
                "drop those references (del them) and load again. The model is left as it was.",
            )
            table[name] = before
            undo.append(_exchange_back(before, fresh))


def _exchange_back(before: torch.Tensor, fresh: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        exchange_or_raise(before, fresh, "undoing di.load_state_dict: a tensor", "reload it.")

    return step


def _old_counts(module: nn.Module, state: dict[str, Any], metadata: dict[str, Any]) -> set[str]:
    """BatchNorm's exemption, as its own loader: a checkpoint saved before version 2
    (no ``_metadata``, or an older version) need not hold ``num_batches_tracked``; the
    layer keeps its own count (returned: not missing), and a count on meta (nothing
    to keep) is loaded as 0 (put in ``state``)."""
    kept: set[str] = set()
    for name, sub in module.named_modules():
        cls = type(sub)._di_cls if isinstance(sub, Deferred) else type(sub)
        if not issubclass(cls, _BatchNorm):
            continue
        count = sub._buffers.get("num_batches_tracked")  # None: no running stats
        key = (name + "." if name else "") + "num_batches_tracked"
        local = metadata.get(name)
        version = local.get("version") if isinstance(local, Mapping) else None
        if count is None or key in state or (isinstance(version, int) and version >= 2):
            continue
        if count.is_meta and not is_lazy(count):
            state[key] = torch.tensor(0, dtype=torch.long)
        else:
            kept.add(key)
    return kept


def _where(root: nn.Module, owner: nn.Module, key: str) -> str:
    if isinstance(owner, Holder):  # a sublayer of a placeholder: name the layer
        return f"{key} ({_deferred_owner(root, key)})"
    owner_name = key.rpartition(".")[0]
    kind = type(owner).__name__
    return f"{key} ({kind} layer {owner_name!r})" if owner_name else f"{key} ({kind})"


def _deferred_owner(root: nn.Module, key: str) -> str:
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        sub = root.get_submodule(".".join(parts[:i]))
        if isinstance(sub, Deferred):
            return label(sub)
    return "a deferred layer"


def _fit(
    root: nn.Module, owner: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor
) -> str | None:
    """Why ``value`` cannot go into ``target``, or None."""
    where = _where(root, owner, key)
    if is_lazy(target):
        if is_lazy(value):
            return None  # saved before the build into a layer not built: stays deferred
        if key.rpartition(".")[2] in counts_of(owner):
            return None  # torch's Lazy norm saves its count real: the layer stays deferred
        if isinstance(owner, Deferred) or any(t is target for _, t in _slots(root, key)):
            return (
                f"{where} stays unbuilt: the checkpoint does not determine its sizes "
                f"(see the other problems)"
            )
        return None  # a torch Lazy module's tensor: it takes the saved shape, as torch's
    if is_lazy(value):
        return (
            f"{where}: the checkpoint holds a placeholder (saved before the layer was "
            f"built, so it has no values), the model's layer is built"
        )
    if tuple(value.shape) != tuple(target.shape):
        return f"{where}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}"
    if value.is_complex() and not target.is_complex():
        return (
            f"{where}: checkpoint {value.dtype}, model {target.dtype} (converting would "
            f"drop the imaginary part)"
        )
    return None


def _slots(root: nn.Module, key: str) -> list[tuple[str, torch.Tensor]]:
    """The placeholders of the deferred layer that owns ``key``, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:i])
        try:
            sub = root.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(sub, Deferred):
            return placeholder_tensors(sub)
    return []


def _extra_state_keys(module: nn.Module) -> set[str]:
    return {
        (name + "." if name else "") + _EXTRA_STATE
        for name, sub in module.named_modules()
        if type(sub).get_extra_state is not nn.Module.get_extra_state
    }


class _KeysUnder:
    """The checkpoint's entries under each prefix (``"enc.0."``), by the rest of their
    key, grouped in one pass when first asked: a walk per layer would make loading
    a model of many layers quadratic."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.index: dict[str, dict[str, Any]] | None = None

    def get(self, prefix: str) -> Mapping[str, Any]:
        if not prefix:
            return self.state
        if self.index is None:
            self.index = {}
            for key, value in self.state.items():
                dot = key.find(".")
                while dot != -1:
                    self.index.setdefault(key[: dot + 1], {})[key[dot + 1 :]] = value
                    dot = key.find(".", dot + 1)
        return self.index.get(prefix, {})


def _unexpected(module: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Torch's unexpected keys, in torch's order (``Module._load_from_state_dict``):
    per module (preorder), each key under its prefix, other than its extra state,
    whose rest is dotted with a head naming no child, or undotted naming none of its
    persistent tensors; keys below a child set to ``None`` are nobody's. Each key
    walks down its own path (one pass over the keys, not one per module)."""
    order = {id(sub): i for i, (_, sub) in enumerate(module.named_modules())}
    locals_: dict[int, set[str]] = {}
    found: list[tuple[int, int, str]] = []  # (module's preorder place, key's place, key)
    for place, key in enumerate(state):
        sub, rest = module, key
        while rest != _EXTRA_STATE:
            head, dot, tail = rest.partition(".")
            if dot:
                if head not in sub._modules:
                    found.append((order.get(id(sub), len(order)), place, key))
                    break
                child = sub._modules[head]
                if child is None:
                    break  # torch's load never visits it
                sub, rest = child, tail
                continue
            local = locals_.get(id(sub))
            if local is None:
                local = locals_[id(sub)] = _local_keys(sub)
            if head not in local:
                found.append((order.get(id(sub), len(order)), place, key))
            break
    return [key for _, _, key in sorted(found)]


def _local_keys(sub: nn.Module) -> set[str]:
    """The names under which ``sub`` itself reads keys: its persistent tensors."""
    return set(own_tensors(sub)) - sub._non_persistent_buffers_set


def _build_from(
    module: nn.Module,
    state: Mapping[str, Any],
    bad: set[str],
    built: list[Transaction],
    devices: dict[int, torch.device],
) -> list[str]:
    """Build every deferred layer that the checkpoint gives sizes for, on meta."""
    problems: list[str] = []
    saved_as: dict[int, str] = {}  # tensor id -> the first key the checkpoint holds it under
    for key, tensor in module.state_dict(keep_vars=True).items():
        if key in state and isinstance(tensor, torch.Tensor):
            saved_as.setdefault(id(tensor), key)
    under = _KeysUnder(state)
    # A live walk: a block built here may construct deferred children, next in order.
    for name, sub in module.named_modules():
        if not isinstance(sub, Deferred):
            continue
        prefix = name + "." if name else ""
        tensors = placeholder_tensors(sub)
        mine = {
            n: state[prefix + n]
            for n, _ in tensors
            if prefix + n in state and prefix + n not in bad
        }
        # A placeholder tied (before the build) to a tensor that the checkpoint holds
        # under another key counts as saved: safetensors' save_model and Hugging Face
        # store a tie once. It takes that key's sizes; the tie stays one object.
        tied = {
            n: state[alias]
            for n, t in tensors
            if prefix + n not in state
            and (alias := saved_as.get(id(t))) is not None
            and alias not in bad
        }
        mine.update(tied)
        before, mixed = saved_before_build(sub, mine)
        if not mine or before:
            continue  # nothing saved, or saved before a build: stays deferred
        if mixed:
            problems.append(
                f"{label(sub)} holds values for some of its tensors but placeholders "
                f"(saved before a build, no values) for {', '.join(prefix + n for n in mixed)}"
            )
            continue
        names = {n for n, _ in tensors}
        shapes = {
            **other_shapes(sub, under.get(prefix), "", names),  # (bad values left out there)
            **{n: tuple(v.shape) for n, v in mine.items()},
        }
        try:
            values, found = infer_from_shapes(sub, shapes)
        except DeferredInitError:
            raise
        except Exception as error:  # the class's own constructor, probed on meta
            raise InferenceError(
                f"{label(sub)}: {type(sub)._di_cls.__name__} could not be constructed while "
                f"its sizes were read off the checkpoint (keys under {prefix!r}): "
                f"{type(error).__name__}: {error}. Nothing was loaded; the layer is left "
                f"unbuilt. Fix: correct the layer's constructor arguments, or load a "
                f"checkpoint of this model."
            ) from error
        if found:
            problems.append(
                f"{label(sub)} cannot take its sizes from the checkpoint: {'; '.join(found)}"
                f" (keys under {prefix!r})"
            )
            continue
        # A tensor the checkpoint does not hold gets what eager's would: the layer's
        # own initialization, so such a layer is constructed for real (its __init__,
        # RNG use included, as eager's before its load), unless declared on meta.
        real = any(
            prefix + n not in state and n not in tied and t.device.type != "meta"
            for n, t in tensors
        )
        # Else the device each placeholder was declared on (or moved to): the built
        # tensor, on meta for now, takes its values there.
        devices.update({id(t): t.device for _, t in tensors})
        built.append(
            become(sub, values, built_from="a checkpoint", device=None if real else "meta")
        )
        # Before the values are written (commit), as eager's construct; apply; load.
        run_applied(sub)
    return problems
