"""Binary codecs: NumPy arrays <-> ``ArrayPayload`` dicts sent as widget buffers.

ipywidgets lifts every ``bytes`` value nested in a synced dict into a binary buffer, so a
payload ``{"dtype", "shape", "data": bytes}`` reaches the browser as a ``DataView`` beside
its dtype and shape, never as a JSON list. Maps that are only looked at are quantised to
uint8 with one scale per slice (invisible at 8-bit display depth).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from diffwidget.widget.schema import DTYPES

#: Key of a buffer written as base64 text in JSON (exported files, the base64 transport).
BASE64_KEY = "$b64"

#: Largest uint8 code; dequantised value = q / UINT8_MAX * scale.
UINT8_MAX = 255


def encode_array(array: np.ndarray, *, scale: np.ndarray | None = None) -> dict[str, Any]:
    """Return an ``ArrayPayload`` dict for ``array`` (little-endian, C order).

    Parameters
    ----------
    array : ndarray
        uint8, float32 or int32 data (other float/int types are converted).
    scale : ndarray, optional
        Per-slice scale for quantised uint8 data (see :func:`quantise_uint8`).

    Examples
    --------
    >>> payload = encode_array(np.zeros((2, 3), dtype=np.uint8))
    >>> payload["dtype"], payload["shape"], len(payload["data"])
    ('uint8', [2, 3], 6)
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        out = array
    elif np.issubdtype(array.dtype, np.floating):
        out = array.astype("<f4")
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        out = array.astype("<i4")
    else:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}; convert to float32 first")
    out = np.ascontiguousarray(out)
    payload: dict[str, Any] = {
        "dtype": {np.dtype(np.uint8): "uint8", np.dtype("<f4"): "float32"}.get(out.dtype, "int32"),
        "shape": [int(s) for s in out.shape],
        "data": out.tobytes(),
    }
    if scale is not None:
        payload["scale"] = encode_array(np.asarray(scale, dtype=np.float32))
    return payload


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`, validating dtype, shape and byte length.

    Quantised payloads are returned dequantised as float32.

    Raises
    ------
    ValueError
        When the payload is malformed (unknown dtype, wrong byte count).
    """
    if not isinstance(payload, dict) or not {"dtype", "shape", "data"} <= set(payload):
        raise ValueError("an array payload is a dict with 'dtype', 'shape' and 'data'")
    dtype = payload["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; payloads use one of {DTYPES}")
    np_dtype = np.dtype({"uint8": "u1", "float32": "<f4", "int32": "<i4"}[dtype])
    shape = tuple(int(s) for s in payload["shape"])
    data = payload["data"]
    raw = base64.b64decode(data[BASE64_KEY]) if isinstance(data, dict) else bytes(data)
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"payload holds {len(raw)} bytes but {dtype} {shape} needs {expected}")
    array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if "scale" in payload:
        scale = decode_array(payload["scale"])
        extra = array.ndim - scale.ndim
        return array.astype(np.float32) / UINT8_MAX * scale.reshape(scale.shape + (1,) * extra)
    return array


def quantise_uint8(values: np.ndarray, slice_axes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Quantise non-negative maps to uint8 with one scale (the maximum) per slice.

    Parameters
    ----------
    values : ndarray, shape (..., h, w)
        Non-negative values such as attention probabilities or saliency in [0, 1].
    slice_axes : int
        Number of trailing axes that form one slice (2: one scale per map).

    Returns
    -------
    q : ndarray of uint8, same shape
    scale : ndarray of float32, shape ``values.shape[:-slice_axes]``
        ``values ≈ q / 255 * scale``; error at most ``scale / 510`` per value.
    """
    values = np.asarray(values, dtype=np.float32)
    if not values.size:
        return values.astype(np.uint8), np.zeros(values.shape[:-slice_axes], np.float32)
    axes = tuple(range(values.ndim - slice_axes, values.ndim))
    scale = values.max(axis=axes)
    # A NaN or an infinity makes its slice's maximum NaN or infinite: one check covers both.
    if values.min() < 0 or not np.isfinite(scale).all():
        raise ValueError("quantise_uint8 expects finite, non-negative maps")
    factor = np.where(scale > 0, UINT8_MAX / np.where(scale > 0, scale, 1.0), 0.0)
    scaled = values * factor.reshape(scale.shape + (1,) * slice_axes).astype(np.float32)
    q = np.rint(scaled, out=scaled).astype(np.uint8)
    return q, scale.astype(np.float32)


def payload_nbytes(value: Any) -> int:
    """Bytes of binary data inside a (nested) payload; JSON text is not counted."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, dict):
        if set(value) == {BASE64_KEY}:
            return len(base64.b64decode(value[BASE64_KEY]))
        return sum(payload_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_nbytes(v) for v in value)
    return 0


def to_transport(value: Any, transport: str) -> Any:
    """``value`` with every buffer as bytes ("binary") or as ``{"$b64": text}`` ("base64").

    Examples
    --------
    >>> to_transport({"data": b"\\x01\\x02"}, "base64")
    {'data': {'$b64': 'AQI='}}
    >>> to_transport({"data": {"$b64": "AQI="}}, "binary")
    {'data': b'\\x01\\x02'}
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return raw if transport == "binary" else {BASE64_KEY: base64.b64encode(raw).decode("ascii")}
    if isinstance(value, dict):
        if set(value) == {BASE64_KEY} and isinstance(value[BASE64_KEY], str):
            return base64.b64decode(value[BASE64_KEY]) if transport == "binary" else value
        return {k: to_transport(v, transport) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_transport(v, transport) for v in value]
    return value


def describe_payloads(value: Any) -> Any:
    """Replace every binary buffer by ``"<bytes n>"`` (for snapshots and reprs)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<bytes {len(value)}>"
    if isinstance(value, dict):
        return {k: describe_payloads(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_payloads(v) for v in value]
    return value
