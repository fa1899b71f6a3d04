"""The header of a GGUF file (metadata and tensor infos) read from the first bytes of the file.

``gguf.GGUFReader`` maps the whole file and fails with an unhelpful error on a truncated one, so
this module has its own small reader of the header layout, using the ``gguf`` package's
constants (value types, quantization types and their block sizes, key names). It never needs the
tensor data: a multi-GB model is described by its first few MB, which the ``facts.gguf.GgufHeader``
fact reads on the host and the VRAM planner reads from local files (:func:`read_gguf_header`).

The constants are read from ``gguf.constants`` alone (:func:`gguf_constants`): the ``gguf`` package
imports its own reader and writer, and numpy with them (~0.1 s), which every deploy would pay for to
read a header a few kB long.

Layout (GGUF v2/v3): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 key/value count,
the key/values, the tensor infos, padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import importlib.util
import struct
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import StrictBool, StrictInt

from gpubox.quoting import shell_word
from gpubox.records import Record

if TYPE_CHECKING:
    from gguf import GGUFValueType

DEFAULT_HEAD_BYTES = 32 * 1024 * 1024
"""Enough for the header of models with a 262k-token vocabulary (several MB of token strings)."""

LOCAL_FIRST_READ = 4 * 1024 * 1024
"""A local file's first read: most headers fit (SmolLM2's is 1.7 MiB); a longer one is read on, doubling.
Reading all 32 MiB at once took 34 ms of SmolLM2's 35 ms parse in every deploy run's VRAM check; 4 MiB 16 ms."""

MAX_KEPT_ARRAY_LENGTH = 512
"""Longer arrays (tokens, scores, merges) are kept as their length only; per-layer arrays fit."""

MAGIC = b"GGUF"
"""``gguf.GGUF_MAGIC`` as the file's first four bytes."""
_SCALAR_FORMATS = {  # struct formats by ``gguf.GGUFValueType`` name
    "UINT8": "B",
    "INT8": "b",
    "UINT16": "H",
    "INT16": "h",
    "UINT32": "I",
    "INT32": "i",
    "FLOAT32": "f",
    "BOOL": "?",
    "UINT64": "Q",
    "INT64": "q",
    "FLOAT64": "d",
}

Scalar = StrictBool | StrictInt | float | str


class ArraySummary(Record):
    """A long metadata array, kept as its element type and length."""

    element_type: str
    length: int


MetadataValue = Scalar | list[Scalar] | ArraySummary


class TensorInfo(Record):
    name: str
    shape: list[int]
    ggml_type: str
    """``GGMLQuantizationType`` name, e.g. ``Q4_K``; ``UNKNOWN_<id>`` for a type newer than ``gguf``."""
    offset: int
    """From the start of the tensor data."""
    n_bytes: int | None
    """None for an unknown type."""

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class GgufFile(Record):
    version: int
    file_size: int
    architecture: str | None
    name: str | None
    alignment: int
    data_offset: int
    """Where the tensor data starts: the header's size, padding included."""
    metadata: dict[str, MetadataValue]
    tensors: list[TensorInfo]

    def get(self, key: str, default: MetadataValue | None = None) -> MetadataValue | None:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: MetadataValue | None = None) -> MetadataValue | None:
        """``arch_get("context_length")`` is ``metadata["<architecture>.context_length"]``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def arch_int(self, suffix: str) -> int | None:
        value = self.arch_get(suffix)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def block_count(self) -> int | None:
        return self.arch_int("block_count")

    @property
    def context_length(self) -> int | None:
        return self.arch_int("context_length")

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensors of known type: the weights' size in memory."""
        return sum(tensor.n_bytes or 0 for tensor in self.tensors)

    @property
    def tensor_data_end(self) -> int:
        """The byte where the last tensor ends: a complete file is at least this long."""
        ends = [tensor.offset + (tensor.n_bytes or 0) for tensor in self.tensors]
        return self.data_offset + max(ends, default=0)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((tensor for tensor in self.tensors if tensor.name == name), None)


class GgufError(ValueError):
    """The bytes are not a readable GGUF header."""


class NotGgufError(GgufError):
    """No GGUF magic at the start: another kind of file (HTML error page, safetensors, ...)."""


class TruncatedGgufError(GgufError):
    """The file itself ends inside the header, or before the tensor data it describes."""


class GgufHeadTooShortError(GgufError):
    """The head that was read ends inside the header, but the file goes on: read more of it."""


class GgufArchitectureError(ValueError):
    """The GGUF is of another architecture than the role it was given needs."""


GgufErrorKind = Literal["not_gguf", "truncated", "head_too_short", "invalid", "unreadable"]


class GgufHeaderError(Record):
    """Why a file on a host could not be read as a GGUF (the ``facts.gguf.GgufHeader`` error state)."""

    kind: GgufErrorKind
    message: str

    def exception(self, path: str) -> GgufError:
        """The error to raise in an operation, naming the file."""
        error_class = {
            "not_gguf": NotGgufError,
            "truncated": TruncatedGgufError,
            "head_too_short": GgufHeadTooShortError,
        }.get(self.kind, GgufError)
        return error_class(f"{path}: {self.message}")


def error_record(error: GgufError) -> GgufHeaderError:
    kind: GgufErrorKind = "invalid"
    if isinstance(error, NotGgufError):
        kind = "not_gguf"
    elif isinstance(error, TruncatedGgufError):
        kind = "truncated"
    elif isinstance(error, GgufHeadTooShortError):
        kind = "head_too_short"
    return GgufHeaderError(kind=kind, message=str(error))


class _HeadEnded(Exception):
    pass


@functools.cache
def gguf_constants() -> ModuleType:
    """``gguf.constants`` (value and quantization types, their block sizes, key names), run from its
    file without the ``gguf`` package's ``__init__`` and its numpy; it imports nothing of ``gguf``."""
    package = importlib.util.find_spec("gguf")
    if package is None or package.origin is None:
        raise ModuleNotFoundError("gpubox reads GGUF headers with the gguf package's constants: pip install gguf")
    constants = Path(package.origin).with_name("constants.py")
    spec = importlib.util.spec_from_file_location("gpubox._gguf_constants", constants)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Reader:
    def __init__(self, head: bytes, endian: str) -> None:
        self.constants = gguf_constants()
        self.types: type[GGUFValueType] = self.constants.GGUFValueType
        self.head = head
        self.endian = endian
        self.position = 0

    def take(self, size: int) -> bytes:
        end = self.position + size
        if end > len(self.head):
            raise _HeadEnded
        chunk = self.head[self.position : end]
        self.position = end
        return chunk

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(self.endian + fmt, self.take(size))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, value_type: GGUFValueType) -> MetadataValue:
        if value_type == self.types.STRING:
            return self.string()
        if value_type == self.types.ARRAY:
            return self.array()
        scalar: Scalar = self.unpack(_SCALAR_FORMATS[value_type.name])
        return scalar

    def array(self) -> list[Scalar] | ArraySummary:
        element_type = self.types(self.unpack("I"))
        length = self.unpack("Q")
        if length > MAX_KEPT_ARRAY_LENGTH or element_type == self.types.ARRAY:
            self.skip_array(element_type, length)
            return ArraySummary(element_type=element_type.name, length=length)
        if element_type == self.types.STRING:
            return [self.string() for _ in range(length)]
        fmt = _SCALAR_FORMATS[element_type.name]
        values = struct.unpack(f"{self.endian}{length}{fmt}", self.take(length * struct.calcsize(fmt)))
        return list(values)

    def skip_strings(self, count: int) -> None:
        """Step over `count` length-prefixed strings without copying them (a vocab has 50k-260k)."""
        head, position, end = self.head, self.position, len(self.head)
        size_at = struct.Struct(self.endian + "Q").unpack_from
        for _ in range(count):
            if position + 8 > end:
                raise _HeadEnded
            position += 8 + size_at(head, position)[0]
        if position > end:
            raise _HeadEnded
        self.position = position

    def skip_array(self, element_type: GGUFValueType, length: int) -> None:
        if element_type == self.types.STRING:
            self.skip_strings(length)
        elif element_type == self.types.ARRAY:
            for _ in range(length):
                self.skip_array(self.types(self.unpack("I")), self.unpack("Q"))
        else:
            self.take(length * struct.calcsize(_SCALAR_FORMATS[element_type.name]))


def _endianness(head: bytes) -> str:
    """``<`` for the usual little-endian files, ``>`` for big-endian ones (s390x conversions)."""
    (version,) = struct.unpack("<I", head[4:8])
    return "<" if version & 0xFFFF else ">"


def _tensor_info(reader: _Reader) -> TensorInfo:
    name = reader.string()
    n_dims = reader.unpack("I")
    shape = [reader.unpack("Q") for _ in range(n_dims)]
    type_id = reader.unpack("I")
    offset = reader.unpack("Q")
    try:
        ggml_type = reader.constants.GGMLQuantizationType(type_id)
    except ValueError:
        return TensorInfo(name=name, shape=shape, ggml_type=f"UNKNOWN_{type_id}", offset=offset, n_bytes=None)
    block_size, type_size = reader.constants.GGML_QUANT_SIZES[ggml_type]
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return TensorInfo(
        name=name,
        shape=shape,
        ggml_type=ggml_type.name,
        offset=offset,
        n_bytes=n_elements // block_size * type_size,
    )


def _parse(head: bytes, file_size: int) -> GgufFile:
    reader = _Reader(head, _endianness(head))
    keys = reader.constants.Keys.General
    reader.take(4)
    version = reader.unpack("I")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count = reader.unpack("Q")
    kv_count = reader.unpack("Q")
    metadata: dict[str, MetadataValue] = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.types(reader.unpack("I")))
    tensors = [_tensor_info(reader) for _ in range(tensor_count)]
    alignment = metadata.get(keys.ALIGNMENT, reader.constants.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise GgufError(f"invalid {keys.ALIGNMENT}: {alignment!r}")
    data_offset = -(-reader.position // alignment) * alignment
    architecture = metadata.get(keys.ARCHITECTURE)
    name = metadata.get(keys.NAME)
    return GgufFile(
        version=version,
        file_size=file_size,
        architecture=architecture if isinstance(architecture, str) else None,
        name=name if isinstance(name, str) else None,
        alignment=alignment,
        data_offset=data_offset,
        metadata=metadata,
        tensors=tensors,
    )


def parse_gguf_header(head: bytes, file_size: int) -> GgufFile:
    """Parse a GGUF header from ``head``, the first bytes (or all) of a file of ``file_size`` bytes.

    Raises NotGgufError (no magic), TruncatedGgufError (the file ends inside its header, or before
    the end of the tensor data the header describes), GgufHeadTooShortError (the file goes on past
    ``head``: read more), or GgufError (an unsupported version, or garbage in the header).
    """
    if len(head) < 8 or head[:4] != MAGIC:
        if len(head) < 4 and file_size == len(head) and MAGIC.startswith(head):
            raise TruncatedGgufError(f"file of {file_size} bytes is too short to be a GGUF")
        raise NotGgufError(f"not a GGUF file: it starts with {head[:8]!r}, not {MAGIC!r}")
    try:
        header = _parse(head, file_size)
    except _HeadEnded:
        if len(head) >= file_size:
            raise TruncatedGgufError(
                f"truncated GGUF: the file ends after {file_size} bytes, inside its header "
                "(an interrupted download or copy?)"
            ) from None
        raise GgufHeadTooShortError(
            f"the GGUF header is longer than the {len(head)} bytes read of this {file_size}-byte file: "
            "read a bigger head"
        ) from None
    except (ValueError, KeyError, UnicodeDecodeError, struct.error, OverflowError) as error:
        raise GgufError(f"corrupt GGUF header: {error}") from error
    if header.tensors and header.tensor_data_end > file_size:
        raise TruncatedGgufError(
            f"truncated GGUF: its tensors end at byte {header.tensor_data_end} but the file has "
            f"{file_size} bytes (an interrupted download or copy?)"
        )
    return header


def read_gguf_header(path: str | Path, head_bytes: int = LOCAL_FIRST_READ) -> GgufFile:
    """Parse the header of a local GGUF file, reading only its head (more only if the header needs it)."""
    file_size = Path(path).stat().st_size
    with open(path, "rb") as file:
        head = file.read(head_bytes)
        while True:
            try:
                return parse_gguf_header(head, file_size)
            except GgufHeadTooShortError:
                head += file.read(max(len(head), 1 << 20))


def header_from_fact(data: GgufFile | dict[str, Any]) -> GgufFile:
    """A typed header from ``host.get_fact(GgufFile, ...)`` or from its JSON form."""
    return data if isinstance(data, GgufFile) else GgufFile.model_validate(data)


def check_architecture(header: GgufFile, expected: str, *, role: str = "model", path: str | None = None) -> None:
    """Refuse a GGUF whose ``general.architecture`` is not ``expected``.

    ``role`` names what the GGUF is meant to be (``drafter``, ``model``) in the message.
    """
    if header.architecture == expected:
        return
    source = f"{path}" if path else f"the GGUF {header.name!r}" if header.name else "the GGUF"
    raise GgufArchitectureError(
        f"{source} is a `{header.architecture}` GGUF, not a `{expected}` {role}: "
        f"point it at a GGUF whose general.architecture is `{expected}`"
    )


GGUF_UNREADABLE = "GGUF_UNREADABLE"


def gguf_head_command(path: str, head_bytes: int = DEFAULT_HEAD_BYTES) -> str:
    """Print the file's size, then its first ``head_bytes`` bytes gzipped and base64'd on one line.

    Prints nothing when there is no file at ``path``.
    """
    quoted = shell_word(path)
    return (
        f"! test -f {quoted} || if test -r {quoted}; then stat -L -c %s {quoted} && "
        f"head -c {int(head_bytes)} {quoted} | gzip -c | base64 -w0 && echo; "
        f"else echo {GGUF_UNREADABLE}; fi"
    )


def parse_gguf_head_output(lines: Sequence[str]) -> GgufFile | GgufHeaderError | None:
    """Output of :func:`gguf_head_command`: the header, an error record, or None (no file)."""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return None
    if lines[0] == GGUF_UNREADABLE:
        return GgufHeaderError(kind="unreadable", message="the file cannot be read by this user")
    if len(lines) != 2 or not lines[0].isdigit():
        return GgufHeaderError(kind="invalid", message=f"unexpected output of the head command: {lines[:2]!r}")
    try:
        head = gzip.decompress(base64.b64decode(lines[1], validate=True))
    except (binascii.Error, OSError, EOFError) as error:
        return GgufHeaderError(kind="invalid", message=f"could not decode the file's head: {error}")
    try:
        return parse_gguf_header(head, int(lines[0]))
    except GgufError as error:
        return error_record(error)
