"""Building a placeholder from a checkpoint: sizes come from the saved tensors.

Which saved dimension carries which constructor argument is learnt from the
layer itself: it is constructed on ``meta`` twice per argument with different
stand-in sizes, and a tensor dimension that moves with the argument gives a
linear relation ``dim = a * size + b`` (``4 * hidden`` for an LSTM's gates,
``in1`` and ``in2`` for a Bilinear, ``in_channels / groups`` for a grouped
convolution, so ``a`` is a fraction). Solving it for the saved shape gives the
size; a saved shape that no whole size gives is reported, never guessed.

A batch or instance norm's ``num_batches_tracked`` (:func:`counts_of`) sizes
nothing: torch's own Lazy norms hold it as a real ``tensor(0)`` before their first
forward, beside placeholders, and that first forward zeroes it. So a state dict
saved by one of them before its first forward leaves a twin deferred, as it leaves
torch's Lazy norm, and its count is not loaded (the build gives 0, as torch's does).
So does a count saved alone (part of a built layer's checkpoint), its layer's
other keys missing. Either way the count is never dropped: the count's placeholder
takes the saved value (:func:`counts_waiting`), a real tensor that the build keeps,
as it keeps a tensor assigned before it (torch's Lazy norm would zero it).

Also here, shared by ``di.load_state_dict`` and torch's own ``load_state_dict``
on a placeholder: which saved values can be loaded at all, and swapping a tensor
under a parameter object that a recurrent layer holds by weak reference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .._become._adopt import sizes_text
from .._become._become import become
from .._become._initialize import run_applied
from .._declare._deferred import Deferred
from .._declare._layout import KNOWN, probe_shapes
from .._declare._placeholder import Holder, placeholder_tensors
from .._declare._rules import MISSING, Rule, RuleError
from .._declare._signature import constructor_call
from .._naming import label
from .._swap import exchange_or_raise
from .._tensors import kind_of

__all__ = [
    "counts_waiting",
    "counts_of",
    "infer_from_shapes",
    "load_into_placeholder",
    "meta_to_empty",
    "other_shapes",
    "saved_before_build",
    "shapes_with",
    "swappable",
    "value_problem",
]


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be loaded under ``key``, or None when it can.

    A placeholder saved from an unbuilt layer (``UninitializedParameter``) is
    loadable: it carries no sizes, and the layer that takes it stays deferred.
    """
    if not isinstance(value, torch.Tensor):
        return f"{key!r} holds a {type(value).__name__}, not a tensor"
    if is_lazy(value):
        return None
    if value.is_nested:
        return f"{key!r} is a nested tensor; a parameter or buffer is a dense tensor"
    if value.layout != torch.strided:
        return f"{key!r} is a {value.layout} tensor; only dense (strided) tensors load"
    if value.device.type == "meta" or is_fake(value):
        kind = "meta" if value.device.type == "meta" else "fake"
        return (
            f"{key!r} is a {kind} tensor, which holds no values (a checkpoint must hold data: "
            f"save the model after di.materialize or after loading real values)"
        )
    return None


def counts_of(module: nn.Module) -> frozenset[str]:
    """The counts among a deferred layer's tensors (``num_batches_tracked``): torch's
    Lazy norms hold them real before their first forward, which zeroes them; they
    size nothing and the build gives them their value. Empty for anything else.

    >>> from deferinit import nn as dnn
    >>> sorted(counts_of(dnn.BatchNorm1d())), sorted(counts_of(dnn.Linear(3)))
    (['num_batches_tracked'], [])
    """
    if not isinstance(module, Deferred):
        return frozenset()
    rows = KNOWN.get(type(module)._di_cls, ())
    return frozenset(name for name, _, _, count in rows if count)


def saved_before_build(module: nn.Module, saved: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether ``saved`` (a deferred layer's tensors by name within it) was saved
    before a build, so the layer stays deferred, and the names saved as
    placeholders when others hold values (a mix that cannot load).

    Counts (:func:`counts_of`) do not tell: torch's Lazy norms save them real.
    """
    counts = counts_of(module)
    lazy = sorted(n for n, v in saved.items() if is_lazy(v))
    sized = [n for n, v in saved.items() if n not in counts and not is_lazy(v)]
    if sized:
        return False, lazy
    return bool(saved), []


def counts_waiting(module: nn.Module, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The counts (:func:`counts_of`) among ``saved`` (a deferred layer's tensors by
    name within it) that wait for the build, as scalars: those saved real when no
    other tensor of the layer is saved with values (the layer stays deferred)."""
    counts = counts_of(module)
    if any(n not in counts and not is_lazy(v) for n, v in saved.items()):
        return {}  # sized: the layer is built from the checkpoint and loads it
    return {
        n: v.reshape(())
        for n, v in saved.items()
        if n in counts and not is_lazy(v) and v.numel() == 1
    }


def fill_count(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` under the placeholder ``name`` of deferred ``module``: the same
    object becomes a real tensor, which the build keeps."""
    target = module._buffers[name]
    assert target is not None and is_lazy(target)
    fresh = torch.empty((), dtype=target.dtype, device=target.device)
    with torch.no_grad():
        fresh.copy_(value)
    exchange_or_raise(
        target,
        fresh,
        functools.partial(_what, module, target, name),
        "drop those references (del them) and load again.",
    )
    target.__class__ = target.cls_to_become  # type: ignore[union-attr] # a plain tensor


def other_shapes(
    module: Deferred, state: Mapping[str, Any], prefix: str, names: set[str]
) -> dict[str, tuple[int, ...]]:
    """The shapes of the saved tensors under ``prefix`` that ``module``'s placeholders
    do not name (a layout its arguments change: MultiheadAttention's
    ``q_proj_weight`` when ``kdim`` differs), for rules that read a value off them;
    keys of a submodule of its own are its submodule's. Empty when no rule of the
    layer reads values off shapes (the common case: no walk over the checkpoint)."""
    rules = type(module)._di_rules.values()
    if all(type(r).from_shapes is Rule.from_shapes for r in rules):
        return {}
    children = {
        n for n, m in module._modules.items() if m is not None and not isinstance(m, Holder)
    }
    return {
        rest: tuple(v.shape)
        for k, v in state.items()
        if k.startswith(prefix)
        and (rest := k[len(prefix) :]) not in names
        and rest.split(".", 1)[0] not in children
        and isinstance(v, torch.Tensor)
        and value_problem(k, v) is None
        and not is_lazy(v)
    }


def _flat(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def infer_from_shapes(
    module: Deferred, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """Constructor values solved from saved tensor shapes, and the problems found."""
    cls = type(module)
    state = module._di
    assert state.layout is not None  # a placeholder always has a layout
    size = state.layout.size
    base = {
        n: state.explicit[n] if n in state.explicit else r.provisional(size, state.options)
        for n, r in cls._di_rules.items()
    }

    values = dict(state.explicit)
    problems: list[str] = []
    # Values a rule reads off the saved shapes directly (a rank-generic twin's
    # spatial_dims is its weight's rank), before the linear relations below, whose
    # probes construct the layer with them.
    read_off = False
    for name, rule in cls._di_rules.items():
        if name in values:
            continue
        try:
            read = rule.from_shapes(shapes, state.options)
        except RuleError as error:
            problems.append(
                f"{name} cannot be read off it: expected {error.expected}, got {error.got}"
            )
            continue
        if read is not MISSING:
            values[name] = base[name] = read
            read_off = True
    if problems:
        return values, problems
    base_shapes = shapes_with(module, base) if read_off else state.layout.shapes
    for name in cls._di_rules:
        if name in values:
            continue
        flat = _flat(base[name])
        if flat is None:  # e.g. MultiheadAttention's kdim=None: "same as embed_dim"
            values[name] = base[name]
            continue
        solved: list[int] = []
        for i, v0 in enumerate(flat):
            moved = list(flat)
            moved[i] = 2 * v0
            trial = dict(base)
            trial[name] = moved[0] if isinstance(base[name], int) else type(base[name])(moved)
            found = _solve(base_shapes, shapes_with(module, trial), shapes, v0, 2 * v0)
            problem = _unsolved(name, found, shapes)
            if problem is not None:
                # Not linear in every dimension (``in_features // 4``): a size that one
                # dimension gives, checked against the layer built with it.
                exact, misfit = _checked(module, base, name, i, found, shapes)
                if exact is None:
                    problems.append(misfit or problem)
                    break
                solved.append(exact)
                continue
            solved.append(next(v for v in found.values() if v is not None))
        else:
            values[name] = solved[0] if isinstance(base[name], int) else type(base[name])(solved)
    return values, problems


def shapes_with(module: Deferred, values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of every tensor ``module`` would hold, built with ``values``
    (constructed on meta: no memory, no random numbers)."""
    cls = type(module)
    arguments = dict(module._di.arguments)
    if "device" in arguments:
        arguments["device"] = "meta"
    args, kwargs = constructor_call(cls, arguments, values)
    return probe_shapes(lambda: cls._di_cls(*args, **kwargs))


def _solve(
    base: Any,
    moved: dict[str, tuple[int, ...]],
    saved: dict[str, tuple[int, ...]],
    v0: int,
    v1: int,
) -> dict[str, int | None]:
    """The size each saved dimension gives, by ``"key[d]"``, for every dimension
    that moved from ``base`` (the argument at ``v0``) to ``moved`` (at ``v1``):
    ``None`` where no whole positive size gives the saved one, and under ``key`` a
    saved tensor of another rank. Rational arithmetic: a dimension may move by a
    fraction of the size (``in_channels / groups``)."""
    found: dict[str, int | None] = {}
    for key, shape0 in base.items():
        shape1 = moved.get(key)
        if key not in saved or shape1 is None or len(shape0) != len(shape1):
            continue
        if shape0 == shape1:
            continue  # says nothing of this argument (its shape is checked at the load)
        if len(saved[key]) != len(shape0):
            found[key] = None  # a rank mismatch
            continue
        for d, (s0, s1) in enumerate(zip(shape0, shape1, strict=True)):
            if s0 == s1:
                continue
            slope = Fraction(s1 - s0, v1 - v0)  # not zero: the dimension moved
            size = v0 + (saved[key][d] - s0) / slope
            whole = size.denominator == 1 and size > 0
            found[f"{key}[{d}]"] = int(size) if whole else None
    return found


def _checked(
    module: Deferred,
    base: dict[str, Any],
    name: str,
    i: int,
    found: dict[str, int | None],
    saved: dict[str, tuple[int, ...]],
) -> tuple[int | None, str | None]:
    """The one size among those the saved dimensions give (``found``, by
    ``"key[d]"``) for item ``i`` of argument ``name`` with which the layer, built on
    meta, has every one of those dimensions as saved; else None, and where only one
    size was given, which saved tensors the layer built with it does not fit."""
    fits: list[int] = []
    sizes = sorted({v for v in found.values() if v is not None})
    misfit: str | None = None
    for size in sizes:
        flat = _flat(base[name])
        assert flat is not None  # only called for a size or a tuple of sizes
        flat[i] = size
        trial = dict(base)
        trial[name] = flat[0] if isinstance(base[name], int) else type(base[name])(flat)
        try:
            built = shapes_with(module, trial)
        except Exception:  # the class refuses this size
            continue
        wrong = [at for at in found if not _dimension_fits(at, built, saved)]
        if not wrong:
            fits.append(size)
        elif len(sizes) == 1:
            keys = dict.fromkeys(at.partition("[")[0] for at in wrong)
            given = ", ".join(at for at, v in found.items() if v == size)
            misfit = f"{name} = {size} (from {given}) does not fit " + ", ".join(
                f"{key}: checkpoint {saved[key]}, built {built.get(key)}" for key in keys
            )
    return (fits[0], None) if len(fits) == 1 else (None, misfit)


def _dimension_fits(
    at: str, built: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]]
) -> bool:
    key, _, rest = at.partition("[")
    shape = built.get(key)
    if not rest or shape is None or len(shape) != len(saved[key]):
        return False  # a tensor of another rank
    d = int(rest[:-1])
    return shape[d] == saved[key][d]


def _unsolved(
    name: str, found: dict[str, int | None], shapes: dict[str, tuple[int, ...]]
) -> str | None:
    """Why the saved shapes do not give ``name`` one whole size, or None."""
    if not found:
        return f"no saved tensor determines {name}"
    sizes = {v for v in found.values() if v is not None}
    if len(sizes) == 1 and None not in found.values():
        return None

    def shown(at: str, size: int | None) -> str:
        key = at.split("[")[0]
        if size is not None:
            return f"{at} says {size}"
        if at == key:
            return f"{key} has shape {shapes[key]}, of another rank than the layer's"
        return f"{key} has shape {shapes[key]}, which no whole {name} gives"

    detail = ", ".join(shown(at, size) for at, size in found.items())
    if len(sizes) > 1:
        return f"saved tensors disagree on {name}: {detail}"
    return f"{name} cannot be determined: {detail}"


@contextmanager
def swappable(modules: list[nn.Module]) -> Iterator[None]:
    """Rebuild the flat weights of recurrent layers among ``modules`` after their
    tensors were swapped, as torch's own ``Module._apply`` does around its swaps
    (their weak references do not block :func:`deferinit._swap.exchange`, but the
    flat-weight list must be made again from the new tensors)."""
    rnns = [m for m in modules if isinstance(m, nn.RNNBase)]
    for rnn in rnns:
        rnn._flat_weight_refs = []
    try:
        yield
    finally:
        for rnn in rnns:
            rnn._init_flat_weights()


def meta_to_empty(module: nn.Module, devices: dict[int, torch.device]) -> None:
    """Give every meta tensor of ``module`` (not its children) uninitialized memory
    on its device in ``devices`` (by tensor id), keeping the tensor objects: ordinary
    tensors, even under ``torch.inference_mode()``. Only for tensors that the loader
    that follows writes whole."""
    with swappable([module]), torch.no_grad(), torch.inference_mode(False):
        for table in (module._parameters, module._buffers):
            for leaf, tensor in table.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                device = devices.get(id(tensor), torch.device("cpu"))
                empty = torch.empty_strided(
                    tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device
                )
                fresh = (
                    nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, nn.Parameter)
                    else empty.requires_grad_(tensor.requires_grad)
                )
                exchange_or_raise(
                    tensor,
                    fresh,
                    # Worded only if refused (naming a layer walks the model).
                    functools.partial(_what, module, tensor, leaf),
                    "drop those references (del them) and load again.",
                )


def _what(module: nn.Module, tensor: torch.Tensor, leaf: str) -> str:
    return f"di.load_state_dict: {kind_of(tensor)} {leaf!r} of {label(module)}"


def _misfits(
    module: Deferred, values: dict[str, Any], saved: dict[str, tuple[int, ...]]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(name, saved shape, built shape)`` for each saved tensor that the layer
    built with ``values`` would not fit (checked before the build, so that a failed
    load leaves the layer deferred)."""
    try:
        built = shapes_with(module, values)
    except Exception:  # the class refuses these sizes: the build says so, by name
        return []
    return [
        (name, shape, built[name])
        for name, shape in saved.items()
        if name in built and built[name] != shape and not _old_scalar(shape, built[name])
    ]


def _old_scalar(saved: tuple[int, ...], built: tuple[int, ...]) -> bool:
    """A one-element vector saved for a scalar (``num_batches_tracked`` in
    checkpoints of torch 0.3), which torch's loader accepts."""
    return built == () and saved == (1,)


@torch.inference_mode(False)
def load_into_placeholder(
    module: Deferred,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``Module._load_from_state_dict`` for a placeholder (torch's own
    ``model.load_state_dict``): build from the saved shapes on ``meta``, give the
    tensors memory (no random initialization, as torch's Lazy modules), then load
    as the built layer would. A layer whose saved values are all placeholders (a
    state dict saved before the build) stays deferred, as torch's Lazy modules do.

    Outside ``torch.inference_mode()`` (the decorator): placeholders made now and the
    built layer's tensors are ordinary tensors, as eager's construction made them.
    """
    placeholders = placeholder_tensors(module)
    names = {name for name, _ in placeholders}
    mine = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
    # Named by the prefix torch's walk gives (the qualified name below the model
    # being loaded), not searched for.
    where = f"{type(module).__name__} layer at {prefix[:-1] or 'the root'!r}"
    # Keys of this layer that it does not have: torch reports them for the layer
    # that owns the prefix; once built, the built class's own loader does that.
    # Children of its own (a submodule a user added to an adopted Lazy module) load
    # their keys themselves.
    children = {
        n for n, m in module._modules.items() if m is not None and not isinstance(m, Holder)
    }
    unexpected = [
        k
        for k in state_dict
        if k.startswith(prefix)
        and k[len(prefix) :] not in names
        and k[len(prefix) :].split(".", 1)[0] not in children
    ]
    if strict:
        unexpected_keys.extend(unexpected)
    problems = [p for n, v in mine.items() if (p := value_problem(prefix + n, v)) is not None]
    if problems:
        error_msgs.append(f"{where} cannot load: {'; '.join(problems)}")
        return
    before, mixed = saved_before_build(module, mine)
    # Not in the checkpoint, in registration order, as torch lists them; without a
    # BatchNorm's count in a checkpoint saved before version 2, as its loader exempts.
    old = issubclass(type(module)._di_cls, _BatchNorm) and local_metadata.get("version", 1) < 2
    absent = [
        n for n, _ in placeholders if n not in mine and not (old and n == "num_batches_tracked")
    ]
    if before or mixed:
        missing_keys.extend(prefix + n for n in absent)
        if not mixed:
            for name, value in counts_waiting(module, mine).items():
                fill_count(module, name, value)
        if mixed:
            error_msgs.append(
                f"{where} is not built, and the checkpoint holds values for some of its "
                f"tensors but placeholders (saved before a build) for {', '.join(mixed)}. "
                f"Fix: save the checkpoint after the model is built."
            )
        return  # saved before the build: the layer stays deferred
    # A tensor with sizes already (tied before the build to a layer built earlier in
    # this load: safetensors' save_model and Hugging Face store a tie once) sizes the
    # layer as a saved one would; the tie stays one object, its key missing as torch's.
    counts = counts_of(module)
    held = {n: t for n, t in placeholders if n not in mine and n not in counts and not is_lazy(t)}
    shapes = {n: tuple(v.shape) for n, v in {**held, **mine}.items()}
    shapes = {**other_shapes(module, state_dict, prefix, names), **shapes} if shapes else {}
    values, problems = infer_from_shapes(module, shapes)
    if problems:
        # As torch: missing keys are listed (strict loading raises on them, a
        # non-strict load leaves the layer deferred). Keys that are there but do
        # not determine the sizes are an error either way.
        missing_keys.extend(prefix + n for n in absent)
        if not shapes:
            return
        error_msgs.append(
            f"{where} is not built and cannot take its sizes from the checkpoint: "
            f"{'; '.join(problems)}. Fix: load a checkpoint that holds this layer's "
            f"tensors, or build the model first with a forward pass."
        )
        return
    misfit = _misfits(module, values, shapes)
    if misfit:
        # torch's own words for each key, then why and what is left.
        error_msgs.extend(
            f"size mismatch for {prefix}{name}: copying a param with shape "
            f"{torch.Size(saved)} from checkpoint, the shape in current model is "
            f"{torch.Size(built)} ({where} is left unbuilt: the sizes the checkpoint "
            f"gives, {sizes_text(values)}, do not fit this tensor. Fix: load the "
            f"checkpoint of a layer declared with the same arguments)."
            for name, saved, built in misfit
        )
        return
    devices = {
        id(t): t.device if t.device.type != "meta" else mine.get(n, t).device
        for n, t in placeholders
    }
    if strict:
        del unexpected_keys[len(unexpected_keys) - len(unexpected) :]
    # A tensor the checkpoint does not hold gets what eager's would: the layer's own
    # initialization, so such a layer is constructed for real (its __init__, RNG use
    # included, as eager's before its load), unless declared on meta. Else on meta,
    # and every tensor is given memory that the loader below writes whole.
    real = any(n not in mine and n not in held and t.device.type != "meta" for n, t in placeholders)
    txn = become(module, values, built_from="a checkpoint", device=None if real else "meta")
    try:
        if not real:
            for sub in module.modules():
                meta_to_empty(sub, devices)
        # Before the values are written, as eager's construct; apply; load.
        run_applied(module)
        type(module)._load_from_state_dict(  # the built class's own loader
            module,
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
    except BaseException:
        # Its load hooks run in there (Ctrl-C included): the layer goes back to
        # deferred, never left built on memory that nothing wrote.
        txn.rollback()
        raise
