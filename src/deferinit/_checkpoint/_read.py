"""Reading a checkpoint for ``di.load_state_dict``: a state dict as it is, a
safetensors file (header checked before any tensor is made) or a torch file
(``weights_only=True``, its zip CRCs checked first), by path or as a binary
file-like object. The format is told by the first bytes (the extension only breaks
a tie: a file too damaged to tell). Whatever is corrupt, truncated or empty is a
``DeferredInitError`` naming the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal, cast

import torch

from .._errors import ArgumentsError, DeferredInitError

__all__ = ["Source", "read_source"]

# A state dict (tensors, and whatever a layer's get_extra_state saved), a file's path,
# or a binary file-like object (what torch.load also reads).
Source = Mapping[str, Any] | str | os.PathLike[str] | IO[bytes]


def read_source(source: Source) -> tuple[dict[str, Any], str, bool, dict[str, Any]]:
    """The state dict, how to name it in messages, whether its tensors are ours, and
    its ``_metadata`` (layer versions by prefix, as ``state_dict()`` saves them; empty
    for a dict without it). Files are read outside ``torch.inference_mode()``: their
    tensors become the model's ordinary parameters."""
    with torch.inference_mode(False):
        state, shown, owned = _read(source)
    metadata = getattr(state, "_metadata", None)
    if metadata is None and isinstance(source, Mapping):
        metadata = getattr(source, "_metadata", None)
    return dict(state), shown, owned, dict(metadata) if isinstance(metadata, Mapping) else {}


def _read(source: Source) -> tuple[Mapping[str, Any], str, bool]:
    if isinstance(source, Mapping):
        bad = [k for k in source if not isinstance(k, str)]
        if bad:
            raise DeferredInitError(
                f"di.load_state_dict: the state dict's keys must be strings (qualified "
                f"names such as '0.weight'); got {', '.join(repr(k) for k in bad[:5])}. "
                f"Nothing was loaded. Fix: pass model.state_dict() of the saved model."
            )
        return source, "the state dict", False
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"di.load_state_dict: no checkpoint file at {str(path)!r}")
        shown = repr(str(path))
        with path.open("rb") as opened:
            return _read_file(opened, path, shown, path.suffix), shown, True
    if not callable(getattr(source, "read", None)):
        raise ArgumentsError(
            f"di.load_state_dict expects a state dict, the path of a safetensors or torch "
            f"file, or a binary file-like object, got {type(source).__name__}. Nothing "
            f"was loaded. Fix: pass model.state_dict() of the saved model, or a path."
        )
    name = getattr(source, "name", None)
    shown = repr(name) if isinstance(name, str) else f"the {type(source).__name__} given"
    file = _binary(source, shown)
    suffix = Path(name).suffix if isinstance(name, str) else ""
    return _read_file(file, None, shown, suffix), shown, True


def _binary(source: IO[bytes], shown: str) -> io.BufferedIOBase:
    """``source`` itself where it is binary, seekable and at its start (torch's zip
    reader and the safetensors reader seek), else the rest of its bytes in memory."""
    try:
        at_start = source.seekable() and source.tell() == 0
        first = source.read(0)
        if not isinstance(first, bytes):
            raise DeferredInitError(
                f"di.load_state_dict: {shown} is open in text mode ({type(first).__name__} "
                f"read from it); a checkpoint is binary. Nothing was loaded. Fix: open it "
                f"with open(path, 'rb')."
            )
        if at_start and callable(getattr(source, "readinto", None)):
            return cast(io.BufferedIOBase, source)  # what is used of it, checked above
        data = source.read()
    except (OSError, ValueError) as error:  # closed, unreadable, unsupported
        raise DeferredInitError(
            f"di.load_state_dict: {shown} cannot be read ({type(error).__name__}: {error}). "
            f"Nothing was loaded. Fix: pass an open binary file (open(path, 'rb')) or a path."
        ) from error
    if not isinstance(data, bytes):
        raise DeferredInitError(
            f"di.load_state_dict: {shown} gave a {type(data).__name__}, not bytes. "
            f"Nothing was loaded. Fix: pass an open binary file (open(path, 'rb'))."
        )
    return io.BytesIO(data)


def _read_file(
    file: io.BufferedIOBase, path: Path | None, shown: str, suffix: str
) -> Mapping[str, Any]:
    """A safetensors or torch checkpoint, told by its first bytes."""
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    kind = _sniff(file.read(9), size)
    file.seek(0)
    if kind is None and suffix == ".safetensors":
        kind = "safetensors"  # damaged: its own reader says where
    elif kind is None and size:
        raise _unreadable(
            shown,
            "safetensors or torch",
            f"its first bytes are neither a safetensors header nor a torch file's (zip or "
            f"pickle) ({size} bytes; it is truncated, corrupt or of another format)",
            "save it again (torch.save(model.state_dict(), path) or "
            "safetensors.torch.save_file(model.state_dict(), path)).",
        )
    if kind == "safetensors":
        return _read_safetensors(file, size, shown)
    return _read_torch(file, path, size, shown)


def _sniff(head: bytes, size: int) -> Literal["safetensors", "torch"] | None:
    """The format the first bytes say, or None where they say neither (an empty
    or damaged file). safetensors: an 8-byte little-endian header length that fits
    the file, then the header's ``{``; torch: a zip file (``PK\\x03\\x04``) or, in
    its legacy format, a pickle (``\\x80``, the protocol opcode)."""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


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


def _read_safetensors(file: io.BufferedIOBase, size: int, shown: str) -> dict[str, Any]:
    """Every tensor of a safetensors file, read straight into memory of its own.

    Not ``safetensors.torch.load_file``: its tensors are backed by a mapping of
    the file, so the loaded parameters would change if the file were written in
    place (and fault if it were truncated). Here each tensor is read into its own
    allocation once: one copy in memory, none of it shared with the file.
    """

    def refuse(what: str) -> DeferredInitError:
        return _unreadable(
            shown,
            "safetensors",
            f"{what} ({size} bytes; it is truncated or corrupt)" if size else what,
            "save it again (safetensors.torch.save_file(model.state_dict(), path)).",
        )

    if size == 0:
        raise refuse("the file is empty")
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


def _read_torch(
    file: io.BufferedIOBase, path: Path | None, size: int, shown: str
) -> Mapping[str, Any]:
    fix = "save it again with torch.save(model.state_dict(), path)."
    if size == 0:
        raise _unreadable(shown, "torch", "the file is empty", fix)
    if zipfile.is_zipfile(file):
        _check_crcs(file, shown, fix)
    file.seek(0)
    try:
        with warnings.catch_warnings():
            # A plain pickle of another protocol: the refusal that follows says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # By path where there is one (torch's reader reads the file itself), but
            # not one named .safetensors, which torch.load reads as safetensors.
            by_path = path is not None and path.suffix != ".safetensors"
            loaded = torch.load(
                path if by_path and path else cast(IO[bytes], file),
                map_location="cpu",
                weights_only=True,
            )
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
    return loaded


def _what_was_refused(message: str) -> str:
    """torch's own words on what it refused ("Unsupported global: GLOBAL getattr"),
    without its advice to allow it."""
    for line in message.splitlines():
        line = line.strip().replace("WeightsUnpickler error: ", "")
        if line and "file an issue" not in line and ("GLOBAL" in line or "nsupported" in line):
            return line.split(" was not an allowed")[0].rstrip(".")
    return "weights-only loading refused it"


def _check_crcs(file: io.BufferedIOBase, shown: str, fix: str) -> None:
    """Check every record of a torch (zip) file against its CRC-32, which torch's
    reader does not: a flipped bit in the data would otherwise load silently.

    Reads the file once more in 16 MiB pieces into one buffer (about a third of
    torch.load's own time); no more memory is held.
    """
    piece = memoryview(bytearray(16 << 20))
    try:
        with zipfile.ZipFile(cast(IO[bytes], file)) as archive:
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
