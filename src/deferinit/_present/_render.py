"""How a :class:`~deferinit._present._summary.Summary` looks: a plain-text table, HTML for
Jupyter and a ``rich`` renderable, all from the same cells and footer lines, and
the JSON-able rows of ``to_dict``.

Nothing here collects data: the functions take the rows, totals and tensors that
``_summary`` gathered and only format them. Unknown sizes show as ``?`` in text
and as ``None`` in JSON.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._summary import Row, TensorInfo

__all__ = [
    "dtype_name",
    "footer_lines",
    "html_table",
    "plain",
    "plain_table",
    "rich_group",
    "row_dict",
    "table_cells",
    "tensor_dict",
]

_LAZY_SHOWN = 8  # Lazy modules named in the footer

_HEADERS = ("name", "layer", "arguments", "output", "parameters", "count", "state")

_Cells = tuple[tuple[str, ...], list[tuple[str, ...]]]  # (headers, one tuple per row)


def table_cells(rows: Iterable[Row]) -> _Cells:
    """Headers and cell text of the table: every column always, ``?`` for an output
    no example gave (none given, or a layer the examples did not reach)."""
    cells = []
    for row in rows:
        full = {
            "name": row.name or "(root)",
            "layer": row.layer,
            "arguments": ", ".join(f"{k}={v!r}" for k, v in row.arguments.items()),
            "output": "?" if row.output is None else _text(row.output),
            "parameters": ", ".join(f"{p.name} {_shape_text(p.shape)}" for p in row.parameters),
            "count": _count_text(row.count),
            "state": row.state,
        }
        cells.append(tuple(full[h] for h in _HEADERS))
    return _HEADERS, cells


def footer_lines(
    totals: Mapping[str, Any],
    parameters: Iterable[TensorInfo],
    buffers: Iterable[TensorInfo],
    *,
    output: Any,
    lazy: Sequence[str] = (),
) -> list[str]:
    """The lines under the table: parameter counts, bytes by dtype and the output.

    ``parameters`` and ``buffers`` are the distinct tensors the totals count; those of
    unknown size add ``+ ?`` to their figures. ``output`` is the model's output shapes
    or ``None``. ``lazy`` names the torch ``nn.Lazy*`` modules, which only
    ``di.adopt`` lets examples size.
    """
    parameters, buffers = list(parameters), list(buffers)
    unknown = totals["unknown"]
    more = " + ?" if unknown else ""
    trainable_unknown = any(p.numel is None and p.requires_grad for p in parameters)
    more_trainable = " + ?" if trainable_unknown else ""
    lines = [
        f"Parameters: {totals['parameters']:,}{more} "
        f"({totals['trainable']:,}{more_trainable} trainable)"
    ]
    if unknown:
        how = "call di.adopt(model), then pass" if lazy else "pass"
        lines[0] += f"; {unknown} of unknown size ({how} example inputs to infer them)"
    lines.append("Parameter bytes: " + _bytes_text(totals["bytes"], _partial(parameters)))
    if totals["buffer_bytes"]:
        lines.append("Buffer bytes: " + _bytes_text(totals["buffer_bytes"], _partial(buffers)))
    if output is not None:
        lines.append(f"Output: {_text(output)}")
    if lazy:
        shown = ", ".join(name or "(root)" for name in lazy[:_LAZY_SHOWN])
        more = f" and {len(lazy) - _LAZY_SHOWN} more" if len(lazy) > _LAZY_SHOWN else ""
        lines.append(
            f"torch.nn.Lazy* modules: {shown}{more}. Only their own first forward sizes "
            f"them; call di.adopt(model) to make them deferinit layers."
        )
    return lines


def plain_table(cells: _Cells, footer: Iterable[str]) -> str:
    """An aligned text table (``count`` right-aligned), ruled above and below, then
    the footer lines."""
    headers, rows = cells
    widths = [max(len(c) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(values: tuple[str, ...]) -> str:
        padded = [
            v.rjust(w) if h == "count" else v.ljust(w)
            for h, v, w in zip(headers, values, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, rows), rule, *footer])


def html_table(cells: _Cells, footer: Iterable[str]) -> str:
    """An HTML ``<table>`` and a ``<p>`` of footer lines, every text escaped."""
    headers, rows = cells
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    footer_html = "<br>".join(esc(line) for line in footer)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><p>{footer_html}</p>"


def rich_group(cells: _Cells, footer: Iterable[str]) -> Any:
    """A ``rich`` ``Group`` of a ``Table`` and the footer lines (needs ``rich``)."""
    from rich.console import Group  # noqa: PLC0415 - rich is optional
    from rich.table import Table  # noqa: PLC0415 - rich is optional
    from rich.text import Text  # noqa: PLC0415 - rich is optional

    headers, rows = cells
    table = Table()
    for h in headers:
        table.add_column(h, justify="right" if h == "count" else "left")
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    return Group(table, *(Text(line) for line in footer))


# -- formatting helpers ------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the summary names it.

    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def plain(value: Any) -> Any:
    """A JSON-able copy of an argument or of nested output shapes (``?`` for unknown)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(value)  # UNKNOWN included: "?"


def row_dict(row: Row) -> dict[str, Any]:
    """A row of :meth:`Summary.to_dict <deferinit._present._summary.Summary.to_dict>`;
    an output no example gave is ``None``, as an unknown tensor shape is."""
    return {
        "name": row.name,
        "layer": row.layer,
        "arguments": {k: plain(v) for k, v in row.arguments.items()},
        "output_shape": plain(row.output),
        "parameters": [tensor_dict(p) for p in row.parameters],
        "buffers": [tensor_dict(b) for b in row.buffers],
        "count": row.count,
        "state": row.state,
    }


def tensor_dict(info: TensorInfo) -> dict[str, Any]:
    """A parameter or buffer as JSON-able data; unknown sizes are ``None``."""
    shape = None if info.shape is None else list(info.shape)
    return {
        "name": info.name,
        "shape": shape,
        "dtype": dtype_name(info.dtype),
        "numel": info.numel,
    }


def _partial(tensors: Iterable[TensorInfo]) -> set[str]:
    """The dtypes of the tensors whose size is not known yet."""
    return {dtype_name(t.dtype) for t in tensors if t.numel is None}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return _shape_text(value)
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _shape_text(shape: tuple[int | None, ...] | None) -> str:
    """A shape as torch prints it, ``?`` for unknown sizes.

    >>> _shape_text((256, None)), _shape_text((10,)), _shape_text(None)
    ('(256, ?)', '(10,)', '?')
    """
    if shape is None:
        return "?"
    sizes = ["?" if s is None else str(s) for s in shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def _count_text(count: int | None) -> str:
    return "?" if count is None else f"{count:,}"


def _bytes_text(by_dtype: Mapping[str, int], partial: set[str]) -> str:
    if not by_dtype:
        return "0"
    parts = []
    for name, n in by_dtype.items():
        more = " + ?" if name in partial else ""
        parts.append(f"{name} {n:,}{more} ({_human(n)}{more})")
    return ", ".join(parts)


def _human(n: int) -> str:
    """Bytes in binary units.

    >>> _human(512), _human(31784), _human(3 * 1024**3)
    ('512 B', '31.0 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
