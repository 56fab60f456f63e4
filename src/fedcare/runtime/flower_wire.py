"""fedcare's messages as Flower records, and back.

Everything the aggregator and a site say to each other (the protection
schemes' frozen dataclasses, `FitInstructions`, `FitResult`, tensors, byte
strings) travels in one Flower `RecordDict` of two records:

``fedcare`` (`ConfigRecord`)
    ``tree``: the message's structure as JSON, in which every byte string is
    a reference ``{"$b": i}`` to the key ``b<i>`` of the same record (bytes
    stay bytes, no base64) and every tensor a reference ``{"$t": i}``;
    tuples, dicts and dataclasses are tagged so they come back as they left.
``tensors`` (`ArrayRecord`)
    ``t<i>``: each tensor, as NumPy's ``.npy`` bytes (dtype and shape kept,
    values bit for bit).

A receiver builds only the dataclasses of `MESSAGE_TYPES`, an allowlist by
module and name: a message naming anything else is refused with
`ProtocolError` before any object is made, so the wire never chooses which
code runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedcare.errors import ProtocolError

TREE_RECORD = "fedcare"
TENSOR_RECORD = "tensors"

MESSAGE_TYPES: dict[str, tuple[str, ...]] = {
    "fedcare.federation.site": ("FitInstructions", "FitResult"),
    "fedcare.federation.training": ("TrainingPlan",),
    "fedcare.privacy.ledger": ("LedgerEntry",),
    "fedcare.privacy.dpsgd": ("RecordPrivacy",),
    "fedcare.protection.secagg": ("RoundSetup", "KeyAdvertisement", "KeyRoster",
                                  "EncryptedShare", "ShareBundle", "SharesForSite",
                                  "MaskedInput", "UnmaskRequest", "RevealedShare",
                                  "UnmaskResponse"),
    "fedcare.protection.ckks": ("KeyCheck", "DecryptRequest", "CkksPayload"),
    "fedcare.runtime.flower_site": ("SiteHello", "MomentsRequest", "Standardization"),
}
"""The dataclasses a message may carry, by module (imported only when a message names them)."""


def _type_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__qualname__ not in MESSAGE_TYPES.get(cls.__module__, ()):
        raise TypeError(f"{name} is not a fedcare wire message type (MESSAGE_TYPES)")
    return name


def _resolve(name: str) -> type:
    module, _, qualname = name.partition(":")
    if qualname not in MESSAGE_TYPES.get(module, ()):
        raise ProtocolError(f"a message names the type {name!r}, which is not one of "
                            "fedcare's wire message types; refused.")
    cls = getattr(importlib.import_module(module), qualname)
    assert isinstance(cls, type)
    return cls


def to_record(message: object) -> RecordDict:
    """`message` as a Flower `RecordDict` (see the module docstring for the layout)."""
    blobs: dict[str, bytes] = {}
    tensors: dict[str, Array] = {}

    def encode(part: object) -> Any:
        if part is None or isinstance(part, bool | str):
            return part
        if isinstance(part, int):
            return part
        if isinstance(part, float):
            # JSON has no NaN or infinity; Python's json writes them anyway, but tag them so
            # any reader can parse the tree.
            return part if math.isfinite(part) else {"$f": repr(part)}
        if isinstance(part, bytes):
            key = f"b{len(blobs)}"
            blobs[key] = part
            return {"$b": len(blobs) - 1}
        if isinstance(part, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = Array.from_numpy_ndarray(part.detach().cpu().contiguous().numpy())
            return {"$t": len(tensors) - 1}
        if isinstance(part, tuple):
            return {"$tuple": [encode(p) for p in part]}
        if isinstance(part, list):
            return [encode(p) for p in part]
        if isinstance(part, dict):
            return {"$dict": [[encode(k), encode(v)] for k, v in part.items()]}
        if dataclasses.is_dataclass(part) and not isinstance(part, type):
            fields = {f.name: encode(getattr(part, f.name))
                      for f in dataclasses.fields(part) if f.init}
            return {"$dc": _type_name(type(part)), "f": fields}
        raise TypeError(f"cannot send a {type(part).__name__} as a fedcare message")

    tree = json.dumps(encode(message), separators=(",", ":"), allow_nan=False)
    config = ConfigRecord({"tree": tree, **blobs})
    return RecordDict({TREE_RECORD: config, TENSOR_RECORD: ArrayRecord(tensors)})


def from_record(record: RecordDict) -> object:
    """The message `to_record` made; `ProtocolError` if `record` is not one."""
    try:
        config = record.config_records[TREE_RECORD]
        arrays = record.array_records[TENSOR_RECORD]
        tree = json.loads(str(config["tree"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"a message without a readable fedcare payload arrived ({exc}).") \
            from None

    def decode(node: Any) -> object:
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, list):
            return [decode(n) for n in node]
        if not isinstance(node, dict):
            raise ProtocolError(f"malformed message tree: {type(node).__name__}")
        if "$b" in node:
            blob = config[f"b{node['$b']}"]
            if not isinstance(blob, bytes):
                raise ProtocolError("malformed message: a byte-string reference holds no bytes")
            return blob
        if "$t" in node:
            array = np.array(arrays[f"t{node['$t']}"].numpy())  # a writable copy
            return torch.from_numpy(array)
        if "$f" in node:
            return float(node["$f"])
        if "$tuple" in node:
            return tuple(decode(n) for n in node["$tuple"])
        if "$dict" in node:
            return {decode(k): decode(v) for k, v in node["$dict"]}
        if "$dc" in node:
            cls = _resolve(str(node["$dc"]))
            values = {str(k): decode(v) for k, v in dict(node["f"]).items()}
            try:
                return cls(**values)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"malformed {cls.__name__} message: {exc}") from None
        raise ProtocolError(f"malformed message tree: keys {sorted(node)}")

    try:
        return decode(tree)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed fedcare message ({type(exc).__name__}: {exc}).") \
            from None


def wire_bytes(record: RecordDict) -> int:
    """Bytes Flower sends for `record`: every object it is split into, serialised once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
