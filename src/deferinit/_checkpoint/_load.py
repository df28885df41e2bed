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
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.parameter import is_lazy

from .._become._become import Transaction, become
from .._declare._deferred import BUILD_LOCK, Deferred, placeholder_tensors
from .._errors import DeferredInitError
from .._naming import label, root_scope
from .._swap import exchange_or_raise
from ._sizes import infer_from_shapes, swappable, value_problem

__all__ = ["load_state_dict"]

# A state dict (tensors, and whatever a layer's get_extra_state saved) or a file.
Source = Mapping[str, Any] | str | os.PathLike[str]

_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


# --------------------------------------------------------------------------- reading


def _read(source: Source) -> tuple[dict[str, Any], str, bool]:
    """The state dict, how to name it in messages, and whether its tensors are ours."""
    if isinstance(source, Mapping):
        bad = [k for k in source if not isinstance(k, str)]
        if bad:
            raise DeferredInitError(
                f"di.load_state_dict: the state dict's keys must be strings (qualified "
                f"names such as '0.weight'); got {', '.join(repr(k) for k in bad[:5])}. "
                f"Nothing was loaded. Fix: pass model.state_dict() of the saved model."
            )
        return dict(source), "the state dict", False
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"di.load_state_dict expects a state dict, or the path of a .safetensors or "
            f"torch file, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"di.load_state_dict: no checkpoint file at {str(path)!r}")
    shown = repr(str(path))
    if path.suffix == ".safetensors":
        return _read_safetensors(path, shown), shown, True
    return _read_torch(path, shown), shown, True


def _unreadable(shown: str, kind: str, what: str, fix: str) -> DeferredInitError:
    return DeferredInitError(
        f"di.load_state_dict: {shown} cannot be read as a {kind} file: {what}. Nothing "
        f"was loaded. Fix: {fix}"
    )


# safetensors' dtype names (little-endian, as the format is).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path, shown: str) -> dict[str, Any]:
    """Every tensor of a safetensors file, read straight into memory of its own.

    Not ``safetensors.torch.load_file``: its tensors are backed by a mapping of
    the file, so the loaded parameters would change if the file were written in
    place (and fault if it were truncated). Here each tensor is read into its own
    allocation once: one copy in memory, none of it shared with the file.
    """
    size = path.stat().st_size

    def refuse(what: str) -> DeferredInitError:
        return _unreadable(
            shown,
            "safetensors",
            f"{what} ({size} bytes; it is truncated or corrupt)" if size else what,
            "save it again (safetensors.torch.save_file(model.state_dict(), path)).",
        )

    if size == 0:
        raise refuse("the file is empty")
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise refuse("no header length")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100 << 20):
            raise refuse(f"a header of {length} bytes")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise refuse(f"its header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise refuse("its header is not a JSON object")
        specs = _tensor_specs(header, size - 8 - length, refuse)
        state: dict[str, Any] = {}
        for key, (dtype, shape, begin) in sorted(specs.items(), key=lambda kv: kv[1][2]):
            tensor = torch.empty(shape, dtype=dtype)
            view = tensor.reshape(-1).view(torch.uint8).numpy()
            file.seek(8 + length + begin)
            if file.readinto(view) != view.nbytes:  # type: ignore[arg-type] # numpy: a buffer
                raise refuse(f"the data of {key!r} ends early")
            state[key] = tensor
    return {key: state[key] for key in specs}  # the header's order


def _tensor_specs(
    header: dict[str, Any], data_size: int, refuse: Callable[[str], DeferredInitError]
) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """dtype, shape and data offset of each tensor, checked as safetensors does:
    known dtypes, sizes that match the offsets, and offsets that tile the data."""
    specs: dict[str, tuple[torch.dtype, list[int], int]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"the header entry of {key!r} is malformed")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise refuse(f"{key!r} has an unknown dtype {info['dtype']!r}")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise refuse(f"the shape or offsets of {key!r} are malformed")
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize != offsets[1] - offsets[0]:
            raise refuse(f"{key!r} has shape {shape} but {offsets[1] - offsets[0]} bytes")
        specs[key] = (dtype, shape, offsets[0])
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise refuse(f"the data of {key!r} does not follow the tensor before it")
        end = stop
    if end != data_size:
        raise refuse(f"the header describes {end} bytes of data, the file holds {data_size}")
    return specs


def _read_torch(path: Path, shown: str) -> dict[str, Any]:
    fix = "save it again with torch.save(model.state_dict(), path)."
    size = path.stat().st_size
    if size == 0:
        raise _unreadable(shown, "torch", "the file is empty", fix)
    if zipfile.is_zipfile(path):
        _check_crcs(path, shown, fix)
    try:
        with warnings.catch_warnings():
            # A plain pickle of another protocol: the refusal that follows says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = _what_was_refused(str(error))
        raise DeferredInitError(
            f"di.load_state_dict: {shown} holds something other than tensors, which "
            f"weights-only loading refuses because unpickling it could run code ({first}). "
            f"Nothing was loaded and nothing in it ran. Fix: save "
            f"model.state_dict(), not the model or other objects; load files you do not "
            f"trust only this way."
        ) from error
    except Exception as error:  # noqa: BLE001 - a corrupt file breaks torch's reader in any way
        raise _unreadable(
            shown, "torch", f"{type(error).__name__}: {error} ({size} bytes)", fix
        ) from error
    if not isinstance(loaded, Mapping):
        raise DeferredInitError(
            f"di.load_state_dict: {shown} holds a {type(loaded).__name__}, not a state "
            f"dict. Nothing was loaded. Fix: save model.state_dict(), not the model."
        )
    return dict(loaded)


def _what_was_refused(message: str) -> str:
    """torch's own words on what it refused ("Unsupported global: GLOBAL getattr"),
    without its advice to allow it."""
    for line in message.splitlines():
        line = line.strip().replace("WeightsUnpickler error: ", "")
        if line and "file an issue" not in line and ("GLOBAL" in line or "nsupported" in line):
            return line.split(" was not an allowed")[0].rstrip(".")
    return "weights-only loading refused it"


def _check_crcs(path: Path, shown: str, fix: str) -> None:
    """Check every record of a torch (zip) file against its CRC-32, which torch's
    reader does not: a flipped bit in the data would otherwise load silently.

    Reads the file once more in 16 MiB pieces into one buffer (about a third of
    torch.load's own time); no more memory is held.
    """
    piece = memoryview(bytearray(16 << 20))
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as file:
            infos = archive.infolist()
            if infos and all(i.CRC == 0 for i in infos if i.file_size):
                return  # saved with torch.serialization.set_crc32_options(False)
            for info in infos:
                crc = 0
                if info.compress_type == zipfile.ZIP_STORED:  # torch's records: raw bytes
                    file.seek(info.header_offset)
                    local = file.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"record {info.filename!r} has a bad header")
                    name_size, extra_size = struct.unpack("<HH", local[26:30])
                    file.seek(info.header_offset + 30 + name_size + extra_size)
                    left = info.compress_size
                    while left:
                        got = file.readinto(piece[: min(left, len(piece))])
                        if not got:
                            raise EOFError(f"record {info.filename!r} ends early")
                        crc = zlib.crc32(piece[:got], crc)
                        left -= got
                else:
                    with archive.open(info) as record:
                        while chunk := record.read(len(piece)):
                            crc = zlib.crc32(chunk, crc)
                if crc != info.CRC:
                    raise _unreadable(
                        shown, "torch", f"record {info.filename!r} fails its CRC-32 check", fix
                    )
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        zlib.error,
        struct.error,
    ) as error:
        raise _unreadable(shown, "torch", f"{type(error).__name__}: {error}", fix) from error


# --------------------------------------------------------------------------- the plan


@dataclass
class _Write:
    """One tensor of the model and what it takes."""

    owner: nn.Module
    target: torch.Tensor
    key: str
    value: torch.Tensor
    fresh: torch.Tensor | None = None  # for a swap: the new tensor, prepared before commit


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
        raise TypeError(f"di.load_state_dict expects an nn.Module, got {type(module).__name__}")
    state, shown, owned = _read(source)
    with BUILD_LOCK, root_scope(module):
        built: list[Transaction] = []
        try:
            devices: dict[int, torch.device] = {}
            writes, extra, missing, unexpected = _plan(module, state, shown, strict, built, devices)
            _prepare(writes, devices, owned=owned, assign=assign)
            _commit(writes, extra)
        except BaseException:
            for txn in reversed(built):
                txn.rollback()
            raise
    return _IncompatibleKeys(missing, unexpected)


def _plan(
    module: nn.Module,
    state: dict[str, Any],
    shown: str,
    strict: bool,
    built: list[Transaction],
    devices: dict[int, torch.device],
) -> tuple[list[_Write], list[tuple[nn.Module, Any]], list[str], list[str]]:
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
    missing = [k for k in expected if k not in state]
    unexpected = _unexpected(module, state)
    writes: list[_Write] = []
    extra: list[tuple[nn.Module, Any]] = []
    misfit: list[str] = []
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        prefix = owner_name + "." if owner_name else ""
        for leaf, target in [*owner._parameters.items(), *owner._buffers.items()]:
            key = prefix + leaf
            if target is None or key not in state or key in bad or key not in expected:
                continue
            value = state[key]
            problem = _fit(module, owner, key, target, value)
            if problem:
                misfit.append(problem)
            elif not is_lazy(value):
                writes.append(_Write(owner, target, key, value))
        if prefix + _EXTRA_STATE in extra_keys and prefix + _EXTRA_STATE in state:
            extra.append((owner, state[prefix + _EXTRA_STATE]))
    problems += [f"size mismatch: {', '.join(misfit)}"] if misfit else []
    if strict:
        problems += [f"missing keys: {', '.join(missing)}"] if missing else []
        problems += [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []
    if problems:
        raise DeferredInitError(
            f"di.load_state_dict: {shown} does not fit {type(module).__name__}: "
            f"{'; '.join(problems)}. Nothing was loaded. Fix: load the checkpoint of this "
            f"model (with strict=False, missing and unexpected keys are skipped)."
        )
    return writes, extra, missing, unexpected


def _where(owner: nn.Module, key: str) -> str:
    owner_name = key.rpartition(".")[0]
    kind = type(owner).__name__
    return f"{key} ({kind} layer {owner_name!r})" if owner_name else f"{key} ({kind})"


def _fit(
    root: nn.Module, owner: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor
) -> str | None:
    """Why ``value`` cannot go into ``target``, or None."""
    where = _where(owner, key)
    if is_lazy(target):
        if is_lazy(value):
            return None  # saved before the build into a layer not built: stays deferred
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


def _unexpected(module: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Torch's unexpected keys, in torch's order: per module (preorder), each key
    under its prefix that names neither a child nor a tensor of that module."""
    out: list[str] = []
    for name, sub in module.named_modules():
        prefix = name + "." if name else ""
        local = {n for n, t in [*sub._parameters.items(), *sub._buffers.items()] if t is not None}
        local -= sub._non_persistent_buffers_set
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            local.add(_EXTRA_STATE)
        for key in state:
            if not key.startswith(prefix):
                continue
            head = key[len(prefix) :].split(".", 1)[0]
            if head not in sub._modules and head not in local:
                out.append(key)
            elif head in sub._modules and sub._modules[head] is None:
                out.append(key)
    return out


def _build_from(
    module: nn.Module,
    state: Mapping[str, Any],
    bad: set[str],
    built: list[Transaction],
    devices: dict[int, torch.device],
) -> list[str]:
    """Build every deferred layer that the checkpoint gives sizes for, on meta."""
    problems: list[str] = []
    # A live walk: a block built here may construct deferred children, next in order.
    for name, sub in module.named_modules():
        if not isinstance(sub, Deferred):
            continue
        prefix = name + "." if name else ""
        mine = {
            n: state[prefix + n]
            for n, _ in placeholder_tensors(sub)
            if prefix + n in state and prefix + n not in bad
        }
        lazy = sorted(prefix + n for n, v in mine.items() if is_lazy(v))
        if not mine or len(lazy) == len(mine):
            continue  # nothing saved, or saved before a build: stays deferred
        if lazy:
            problems.append(
                f"{label(sub)} holds values for some of its tensors but placeholders "
                f"(saved before a build, no values) for {', '.join(lazy)}"
            )
            continue
        shapes = {n: tuple(v.shape) for n, v in mine.items()}
        values, found = infer_from_shapes(sub, shapes)
        if found:
            problems.append(
                f"{label(sub)} cannot take its sizes from the checkpoint: {'; '.join(found)}"
                f" (keys under {prefix!r})"
            )
            continue
        # The device each placeholder was declared on (or moved to): the built
        # tensor, on meta for now, takes its values there.
        devices.update({id(t): t.device for _, t in placeholder_tensors(sub)})
        built.append(become(sub, values, built_from="a checkpoint", device="meta"))
    return problems


# --------------------------------------------------------------------------- writing


def _prepare(
    writes: list[_Write], devices: dict[int, torch.device], *, owned: bool, assign: bool
) -> None:
    """Make every new tensor before the model is touched (allocation may fail)."""
    taken: set[int] = set()  # storages of file tensors already taken

    def own(value: torch.Tensor) -> bool:
        # A torch file keeps ties by storage: two keys over one storage get two copies.
        if not owned or value.untyped_storage().data_ptr() in taken:
            return False
        taken.add(value.untyped_storage().data_ptr())
        return True

    with torch.no_grad():
        for w in writes:
            target, value = w.target, w.value
            if assign:
                new = value.detach()
            elif is_lazy(target):  # a torch Lazy module's: the saved shape, its dtype and device
                if (
                    (value.dtype, value.device) == (target.dtype, target.device)
                    and value.is_contiguous()
                    and value.storage_offset() == 0
                    and own(value)
                ):
                    new = value.detach()
                else:
                    new = torch.empty(value.shape, dtype=target.dtype, device=target.device)
                    new.copy_(value)
            elif target.device.type != "meta":
                if not (_fits(value, target, target.device) and _alone(target) and own(value)):
                    continue  # copied into at commit, in place
                new = value.detach()  # the file's tensor replaces a storage no one shares
            else:
                device = devices.get(id(target), value.device)
                if device.type == "meta":
                    device = value.device
                if _fits(value, target, device) and own(value):
                    new = value.detach()  # the file's own tensor: no second copy
                else:
                    new = torch.empty_strided(
                        target.shape, target.stride(), dtype=target.dtype, device=device
                    )
                    new.copy_(value)
            w.fresh = (
                nn.Parameter(new, requires_grad=target.requires_grad)
                if isinstance(target, nn.Parameter)
                else new.requires_grad_(target.requires_grad)
                if new.is_floating_point() or new.is_complex()
                else new
            )


def _fits(value: torch.Tensor, target: torch.Tensor, device: torch.device) -> bool:
    """Whether ``value`` can become ``target`` as it is (a file's tensor, unconverted)."""
    return (
        value.dtype == target.dtype
        and value.device == device
        and value.stride() == target.stride()
        and value.storage_offset() == 0
    )


def _alone(target: torch.Tensor) -> bool:
    """Whether ``target`` is the only tensor over its storage (no views, no ties by
    storage, nothing saved for backward): then a new storage under it is the same
    as writing into the old one, and the old values need no copy for the undo."""
    # One reference is the temporary storage object made to ask.
    count: int = torch._C._storage_Use_Count(target.untyped_storage()._cdata)
    return count == 2


def _commit(writes: list[_Write], extra: list[tuple[nn.Module, Any]]) -> None:
    undo: list[Callable[[], None]] = []
    swapped: set[int] = set()
    # The last key wins for a tensor the model holds under two keys, as torch's copies.
    last = {id(w.target): w for w in writes if w.fresh is not None}
    owners = [w.owner for w in writes if w.fresh is not None]
    try:
        with swappable(owners), torch.no_grad():
            for w in writes:
                if w.fresh is None:
                    backup = w.target.detach().clone()
                    undo.append(_restore(w.target, backup))
                    w.target.copy_(w.value)
                elif last[id(w.target)] is w and id(w.target) not in swapped:
                    undo.append(_swap_in(w))
                    swapped.add(id(w.target))
            # Last: extra state cannot be undone (what set_extra_state did before
            # it raised stays), the tensors before it can.
            for owner, value in extra:
                owner.set_extra_state(value)
    except BaseException:
        with swappable(owners), torch.no_grad():
            for step in reversed(undo):
                step()
        raise


def _restore(target: torch.Tensor, backup: torch.Tensor) -> Callable[[], None]:
    def undo() -> None:
        target.copy_(backup)

    return undo


def _swap_in(w: _Write) -> Callable[[], None]:
    """``w.fresh``'s data under ``w.target``'s object (which keeps its identity, class,
    attributes, hooks and weak references); returns the undo."""
    assert w.fresh is not None
    target, fresh = w.target, w.fresh
    exchange_or_raise(
        target,
        fresh,
        f"di.load_state_dict: {_kind(target)} {w.key!r} of {label(w.owner)}",
        "drop those references (del them) and load again. The model is left as it was.",
    )
    cls = type(target)
    if is_lazy(target):  # a torch Lazy module's placeholder becomes what it stands for
        target.__class__ = target.cls_to_become  # type: ignore[union-attr]

    def undo() -> None:
        # Nothing made since holds the loaded data (no forward ran in between), so
        # this cannot be refused; if it were, raising beats a half-undone model.
        exchange_or_raise(target, fresh, "undoing di.load_state_dict: a tensor", "reload it.")
        target.__class__ = cls

    return undo


def _kind(t: torch.Tensor) -> str:
    return "parameter" if isinstance(t, nn.Parameter) else "buffer"
