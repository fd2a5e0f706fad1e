"""Contract 1, the manifest schema: every key a reader needs, typed and ranged (docs/BUNDLE.md
section 3), and the modes table parsed into :class:`Mode`.

Split from :mod:`edgesplit.bundle` (which loads and verifies bundles on disk and re-exports these
names), so that each stays readable. Like it, this module imports neither torch nor onnxruntime:
only the wire library and the torch-free family registry. It names no family: the manifest's
``family`` is looked up in the registry, which says which file roles and serving shape apply, and
the family's own section (``"edvit"`` for ED-ViT, docs/BUNDLE.md section 7) is checked by the
family's ``manifest_check``, run through :meth:`~edgesplit.families.registry.Family.check_manifest`.

Modes are uniform (packed codes, PROTOCOL.md §4.1-4.2) unless they name ``"codec": "ans"``: then
the wire tensor travels entropy-coded with a table set of the bundle's ``cdf`` file (PROTOCOL.md
§4.4, BUNDLE.md §7.2). The file's own contents are checked when the bundle is loaded
(:meth:`edgesplit.bundle.Bundle.load`), since this schema sees only the manifest.

A U-shaped bundle (serving shape ``"u-shaped"``, SFPrompt, BUNDLE.md §7.3) sends a token tensor
``[T, D]``: its wire is ``{"name", "shape": [T, D]}`` and each mode names the ``dtype`` the tokens
travel in (float32, float16, or 8-bit codes whose range the sender measures per tensor) instead of
channels and fixed quantization parameters, and may state the ``answer``: the encoding of the body's
output coming back, one of the same dtypes, float32 when absent (:func:`_validate_u_shaped`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .families.registry import FAMILY_DEFINED_SHAPES, Family, UnknownFamilyError, get_family
from .wire.ans_codec import ANS_BITS, ANS_CODEC
from .wire.codec import PACKED_BITS
from .wire.errors import is_int, is_num

SCHEMA_VERSION = 1
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # lowercase only: the hash is compared as a string
MAX_MODE_ID = (1 << 31) - 1  # a request's ``mode`` is an int32 on the wire
MAX_SIDE = 1 << 16
MAX_FILE_BYTES = 1 << 40
UNIFORM = "raw"  # a mode without "codec": packed uniform codes (zstd on top is the agent's choice)
CDF_ROLE = "cdf"  # the file of the ans modes' table sets
# U-shaped bundles (BUNDLE.md §7.3): the dtypes a token tensor travels in and their bits (PROTOCOL.md §15.3)
TOKEN_DTYPES = {"float32": 32, "float16": 16, "uint8": 8}
DEFAULT_ANSWER_DTYPE = "float32"  # a U-shaped mode without "answer": the body's output comes back float32
U_SHAPED = "u-shaped"


class BundleError(Exception):
    """A bundle that cannot be used as it is: missing, malformed, or altered."""


@dataclass(frozen=True)
class Mode:
    """One operating point of a bundle: which wire tensor variant is sent and what it costs.

    ``codec`` is ``"raw"`` for the uniform modes and ``"ans"`` for entropy-coded ones; an ans mode
    names its table set (``tables``, with its digest ``tables_sha256``), has ``bits`` 32 and
    zero point 0, and its ``bytes_per_frame`` is the measured mean of its variable-length frames,
    ``bytes_p95`` their 95th percentile (uniform modes: None, every frame has the same size).

    A U-shaped bundle's mode (:meth:`from_token_dict`) has a ``dtype`` (the token tensor's wire
    dtype: float32, float16 or uint8 codes, ``bits`` 32, 16 or 8); every token row is sent, so
    ``channels`` is the tensor's ``T``, and ``scale``/``zero_point`` are unused (8-bit codes carry
    their own per tensor); ``answer_dtype`` is the encoding of the body's output in its results
    (PROTOCOL.md §15.6.1; float32 when the manifest states none). Both are None for every other mode."""

    id: int
    name: str
    channels: int
    bits: int
    scale: float
    zero_point: int
    bytes_per_frame: float
    accuracy: float | None
    head_ms: dict[str, float]
    head: str = "head"  # the file role of the head this mode runs (slimmable: one per width)
    codec: str = UNIFORM
    tables: str | None = None
    tables_sha256: str | None = None
    bytes_p95: float | None = field(default=None)
    dtype: str | None = None  # U-shaped bundles only: the token tensor's wire dtype
    answer_dtype: str | None = None  # U-shaped bundles only: the body output's dtype in a result

    @property
    def answer_bits(self) -> int | None:
        """The bits of :attr:`answer_dtype` (32, 16 or 8); None for a head-tail mode."""
        return None if self.answer_dtype is None else TOKEN_DTYPES[self.answer_dtype]

    @property
    def entropy_coded(self) -> bool:
        return self.codec == ANS_CODEC

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mode":
        try:
            ent = d.get("entropy") or {}
            return cls(
                id=int(d["id"]),
                name=str(d["name"]),
                channels=int(d["channels"]),
                bits=int(d["bits"]),
                scale=float(d["quant"]["scale"]),
                zero_point=int(d["quant"]["zero_point"]),
                bytes_per_frame=float(d.get("bytes_per_frame", 0.0)),
                accuracy=None if d.get("accuracy") is None else float(d["accuracy"]),
                head_ms={str(k): float(v) for k, v in d.get("head_ms", {}).items()},
                head=str(d.get("head", "head")),
                codec=str(d.get("codec", UNIFORM)),
                tables=None if not ent else str(ent["tables"]),
                tables_sha256=None if not ent else str(ent["sha256"]),
                bytes_p95=None if d.get("bytes_p95") is None else float(d["bytes_p95"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest: malformed mode entry {d!r}: {e}") from None

    @classmethod
    def from_token_dict(cls, d: dict[str, Any], rows: int) -> "Mode":
        """A U-shaped bundle's mode (validated by :func:`_validate_u_shaped`); ``rows``: the wire's ``T``."""
        return cls(
            id=int(d["id"]),
            name=str(d["name"]),
            channels=int(rows),
            bits=int(d["bits"]),
            scale=1.0,
            zero_point=0,
            bytes_per_frame=float(d.get("bytes_per_frame", 0.0)),
            accuracy=None if d.get("accuracy") is None else float(d["accuracy"]),
            head_ms={str(k): float(v) for k, v in d.get("head_ms", {}).items()},
            dtype=str(d["dtype"]),
            answer_dtype=str((d.get("answer") or {}).get("dtype", DEFAULT_ANSWER_DTYPE)),
        )


def _require(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """``d[key]`` of JSON type ``typ`` (a bool is no int), else an error naming ``where + key``."""
    if key not in d:
        raise BundleError(f"manifest: missing '{where}{key}'")
    v = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise BundleError(f"manifest: '{where}{key}' must be {names}, got {type(v).__name__}")
    return v


def _require_int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    """An integer (JSON ``8``; not ``8.0``, ``"8"`` or ``true``) in ``[lo, hi]``."""
    v = _require(d, key, int, where)
    if not lo <= v <= hi:
        raise BundleError(f"manifest: '{where}{key}' must be in [{lo}, {hi}], got {v}")
    return v


def _require_number(d: dict, key: str, where: str, positive: bool = False) -> float:
    v = _require(d, key, (int, float), where)
    if not math.isfinite(v) or (positive and v <= 0):
        raise BundleError(f"manifest: '{where}{key}' must be a finite number{' > 0' if positive else ''}, got {v}")
    return float(v)


def _require_numbers(d: dict, key: str, where: str, n: int, positive: bool = False) -> None:
    v = _require(d, key, list, where)
    if len(v) != n or not all(is_num(x) and (not positive or x > 0) for x in v):
        what = "positive finite numbers" if positive else "finite numbers"
        raise BundleError(f"manifest: '{where}{key}' must be a list of {n} {what}, got {v!r}")


def _require_dims(d: dict, key: str, where: str) -> list[int]:
    v = _require(d, key, list, where)
    if len(v) != 3 or not all(is_int(x) and x > 0 for x in v):
        raise BundleError(f"manifest: '{where}{key}' must be a list of 3 positive integers, got {v!r}")
    return v


def _validate_input(m: dict[str, Any]) -> None:
    inp = _require(m, "input", dict, "")
    shape = _require_dims(inp, "shape", "input.")
    if shape[0] != 3 or shape[1] != shape[2]:
        raise BundleError(f"manifest: 'input.shape' must be [3, S, S] (RGB, square), got {shape}")
    _require_numbers(inp, "mean", "input.", 3)
    _require_numbers(inp, "std", "input.", 3, positive=True)
    _require_int(inp, "resize", "input.", 1, MAX_SIDE)


def _validate_codec(d: dict, where: str) -> int:
    """The mode's ``codec`` (absent: uniform) and its bit depth: packed bits for a uniform mode,
    32 for an ans mode, which also names its table set (``entropy``) and may give ``bytes_p95``."""
    bits = _require(d, "bits", int, where)
    if "codec" not in d:
        if bits not in PACKED_BITS:
            raise BundleError(
                f"manifest: '{where}bits' must be one of {list(PACKED_BITS)} (the wire's bit depths), got {bits}"
            )
        return bits
    codec = _require(d, "codec", str, where)
    if codec != ANS_CODEC:
        raise BundleError(
            f"manifest: '{where}codec' must be '{ANS_CODEC}' (absent: uniform codes), got {codec!r}: "
            "this edgesplit knows no other mode codec"
        )
    if bits != ANS_BITS:
        raise BundleError(f"manifest: '{where}bits' of an '{ANS_CODEC}' mode must be {ANS_BITS}, got {bits}")
    ent = _require(d, "entropy", dict, where)
    _require(ent, "tables", str, where + "entropy.")
    digest = _require(ent, "sha256", str, where + "entropy.")
    if not SHA256_HEX.match(digest):
        raise BundleError(f"manifest: '{where}entropy.sha256' must be 64 lowercase hex characters, got {digest!r}")
    if "bytes_p95" in d and not (is_num(d["bytes_p95"]) and d["bytes_p95"] >= 0):
        raise BundleError(f"manifest: '{where}bytes_p95' must be a number >= 0, got {d['bytes_p95']!r}")
    return bits


def _validate_mode(d: Any, i: int, wire_channels: int) -> None:
    """Every key of one mode entry, with the ranges the codec and the wire tensor allow."""
    if not isinstance(d, dict):
        raise BundleError(f"manifest: 'modes[{i}]' must be an object, got {type(d).__name__}")
    mode_id = _require_int(d, "id", f"modes[{i}].", 0, MAX_MODE_ID)
    where = f"modes[{i}] (id {mode_id})."
    _require(d, "name", str, where)
    _require_int(d, "channels", where, 1, wire_channels)
    bits = _validate_codec(d, where)
    quant = _require(d, "quant", dict, where)
    _require_number(quant, "scale", where + "quant.", positive=True)
    _require_int(quant, "zero_point", where + "quant.", 0, 0 if "codec" in d else (1 << bits) - 1)
    if "head" in d:
        _require(d, "head", str, where)
    if "bytes_per_frame" in d and not (is_num(d["bytes_per_frame"]) and d["bytes_per_frame"] >= 0):
        raise BundleError(f"manifest: '{where}bytes_per_frame' must be a number >= 0, got {d['bytes_per_frame']!r}")
    acc = d.get("accuracy")
    if acc is not None and not (is_num(acc) and 0 <= acc <= 1):
        raise BundleError(f"manifest: '{where}accuracy' must be null or a number in [0, 1], got {acc!r}")
    head_ms = d.get("head_ms", {})
    if not isinstance(head_ms, dict) or not all(is_num(v) for v in head_ms.values()):
        raise BundleError(f"manifest: '{where}head_ms' must map device profile names to numbers, got {head_ms!r}")


def _validate_file_entry(family: Family, role: str, entry: Any) -> None:
    if not family.allows_role(role):
        raise BundleError(
            f"manifest: unknown file role '{role}' for family {family.name} (known: {', '.join(family.role_names())})"
        )
    if not isinstance(entry, dict):
        raise BundleError(f"manifest: 'files.{role}' must be an object, got {type(entry).__name__}")
    path = _require(entry, "path", str, f"files.{role}.")
    if not path or "/" in path or "\\" in path or path.startswith("."):
        raise BundleError(f"manifest: 'files.{role}.path' must be a plain file name, got {path!r}")
    digest = _require(entry, "sha256", str, f"files.{role}.")
    if not SHA256_HEX.match(digest):
        raise BundleError(
            f"manifest: 'files.{role}.sha256' must be 64 lowercase hex characters (docs/BUNDLE.md section 2), "
            f"got {digest!r}"
        )
    if "bytes" in entry:
        _require_int(entry, "bytes", f"files.{role}.", 0, MAX_FILE_BYTES)


def validate_manifest(m: dict[str, Any]) -> None:
    """Check the manifest against docs/BUNDLE.md section 3: required keys, their JSON types and
    ranges; raise :class:`BundleError` naming the first problem found (the key, and the mode id or
    file role it belongs to)."""
    if not isinstance(m, dict):
        raise BundleError("manifest: top level must be a JSON object")
    version = _require(m, "schema_version", int, "")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"manifest: schema_version {version} is not supported (this edgesplit reads {SCHEMA_VERSION})"
        )
    try:
        family = get_family(_require(m, "family", str, ""))
    except UnknownFamilyError as e:
        raise BundleError(f"manifest: {e}") from None
    _require(m, "name", str, "")
    classes = _require(m, "classes", list, "")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError("manifest: 'classes' must be a non-empty list of names")
    _validate_input(m)
    if family.serving in FAMILY_DEFINED_SHAPES:  # modes and parts: the family's manifest_check alone
        files = _validate_files(m, family)
    elif family.serving == U_SHAPED:
        files = _validate_u_shaped(m, family)
    else:
        files = _validate_head_tail(m, family)
    try:
        family.check_manifest(m, files)
    except ValueError as e:  # the family's own section (docs/BUNDLE.md section 7), key named
        raise BundleError(f"manifest: {e}") from None


def _validate_files(m: dict[str, Any], family: Family) -> dict[str, Any]:
    files = _require(m, "files", dict, "")
    for role in family.required_files:
        if role not in files:
            raise BundleError(f"manifest: 'files' has no '{role}' entry")
    for role, entry in files.items():
        _validate_file_entry(family, role, entry)
    return files


def _validate_head_tail(m: dict[str, Any], family: Family) -> dict[str, Any]:
    """The wire tensor, the quantized modes and the heads they run (sections 3.3, 6); the files."""
    wire = _require(m, "wire", dict, "")
    _require(wire, "name", str, "wire.")
    wire_channels = _require_dims(wire, "shape", "wire.")[0]
    modes = _require(m, "modes", list, "")
    if not modes:
        raise BundleError("manifest: 'modes' must list at least one mode")
    for i, x in enumerate(modes):
        _validate_mode(x, i, wire_channels)
    parsed = [Mode.from_dict(x) for x in modes]
    ids = [x.id for x in parsed]
    if len(set(ids)) != len(ids):
        raise BundleError(f"manifest: mode ids must be unique, got {ids}")
    if "default_mode" in m:
        default = _require(m, "default_mode", int, "")
        if default not in ids:
            raise BundleError(f"manifest: 'default_mode' {default} names no mode (modes: {', '.join(map(str, ids))})")
    files = _validate_files(m, family)
    for x in parsed:
        if not family.is_head_role(x.head):
            raise BundleError(
                f"manifest: mode {x.id} names head '{x.head}', which is not a head role of family "
                f"{family.name} ({'head or head.<tag>' if family.head_per_mode else 'head'})"
            )
        if x.head not in files:
            raise BundleError(f"manifest: mode {x.id} runs head '{x.head}' but 'files' has no such entry")
        if x.entropy_coded and CDF_ROLE not in files:
            raise BundleError(
                f"manifest: mode {x.id} is '{ANS_CODEC}'-coded but 'files' has no '{CDF_ROLE}' entry (BUNDLE.md 7.2)"
            )
    return files


def _validate_u_shaped(m: dict[str, Any], family: Family) -> dict[str, Any]:
    """A U-shaped bundle (BUNDLE.md §7.3): the token wire ``[T, D]``, modes naming the dtype the
    tokens travel in (bits to match), their ids and the default; the files (head, body, tail)."""
    wire = _require(m, "wire", dict, "")
    _require(wire, "name", str, "wire.")
    shape = _require(wire, "shape", list, "wire.")
    if len(shape) != 2 or not all(is_int(x) and 0 < x <= MAX_SIDE for x in shape):
        raise BundleError(
            f"manifest: 'wire.shape' of a U-shaped bundle must be [T, D] (2 positive integers), got {shape!r}"
        )
    modes = _require(m, "modes", list, "")
    if not modes:
        raise BundleError("manifest: 'modes' must list at least one mode")
    ids = []
    for i, d in enumerate(modes):
        if not isinstance(d, dict):
            raise BundleError(f"manifest: 'modes[{i}]' must be an object, got {type(d).__name__}")
        mode_id = _require_int(d, "id", f"modes[{i}].", 0, MAX_MODE_ID)
        where = f"modes[{i}] (id {mode_id})."
        _require(d, "name", str, where)
        dtype = _require(d, "dtype", str, where)
        if dtype not in TOKEN_DTYPES:
            raise BundleError(f"manifest: '{where}dtype' must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
        bits = _require(d, "bits", int, where)
        if bits != TOKEN_DTYPES[dtype]:
            raise BundleError(f"manifest: '{where}bits' of a {dtype} mode must be {TOKEN_DTYPES[dtype]}, got {bits}")
        if "answer" in d:  # PROTOCOL.md §15.6.1: the body output's encoding in this mode's results
            answer = _require(d, "answer", dict, where)
            a_dtype = _require(answer, "dtype", str, f"{where}answer.")
            if a_dtype not in TOKEN_DTYPES:
                raise BundleError(f"manifest: '{where}answer.dtype' must be one of {', '.join(TOKEN_DTYPES)}")
            if _require(answer, "bits", int, f"{where}answer.") != TOKEN_DTYPES[a_dtype]:
                raise BundleError(
                    f"manifest: '{where}answer.bits' of a {a_dtype} answer must be {TOKEN_DTYPES[a_dtype]}"
                )
        for key in ("codec", "channels", "quant", "head"):  # head-tail keys that mean nothing here
            if key in d:
                raise BundleError(f"manifest: '{where}{key}' is not a key of a U-shaped mode (BUNDLE.md 7.3)")
        for key in ("bytes_per_frame", "bytes_down_per_frame"):
            if key in d and not (is_num(d[key]) and d[key] >= 0):
                raise BundleError(f"manifest: '{where}{key}' must be a number >= 0, got {d[key]!r}")
        acc = d.get("accuracy")
        if acc is not None and not (is_num(acc) and 0 <= acc <= 1):
            raise BundleError(f"manifest: '{where}accuracy' must be null or a number in [0, 1], got {acc!r}")
        for key in ("head_ms", "tail_ms"):
            ms = d.get(key, {})
            if not isinstance(ms, dict) or not all(is_num(v) for v in ms.values()):
                raise BundleError(f"manifest: '{where}{key}' must map device profile names to numbers, got {ms!r}")
        ids.append(mode_id)
    if len(set(ids)) != len(ids):
        raise BundleError(f"manifest: mode ids must be unique, got {ids}")
    if "default_mode" in m and _require(m, "default_mode", int, "") not in ids:
        raise BundleError(
            f"manifest: 'default_mode' {m['default_mode']} names no mode (modes: {', '.join(map(str, ids))})"
        )
    return _validate_files(m, family)
