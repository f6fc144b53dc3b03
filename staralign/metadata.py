"""The JSON record staralign stores inside its model files, read without torch.

Weights files (``.safetensors``, :mod:`staralign.models.checkpoint`) and exported
``.onnx`` files (:mod:`staralign.inference.onnx_backend`) both carry one JSON
object under a metadata key, tagged with a ``format`` name and an integer
``version``.  :func:`parse_record` checks the tag and the version the same way
for both, raising the caller's error type with a message naming the file and
the field.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_record"]


def parse_record(text: Any, *, source: str, key: str, format_name: str, max_version: int,
                 error: type[Exception] = ValueError) -> dict[str, Any]:
    """The record in ``text`` (JSON), checked to be a ``format_name`` record of a version we read.

    ``source`` names the file in messages, ``key`` the metadata entry; every
    problem raises ``error``: not JSON, not a mapping, another ``format``, a
    ``version`` missing, not a positive integer, or newer than ``max_version``.
    """
    where = f"{source}: metadata '{key}'"
    try:
        info = json.loads(text)
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise error(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != format_name:
        raise error(f"{where} is not a {format_name} record")
    if "version" not in info:
        raise error(f"{where}: field 'version' is missing")
    version = info["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(f"{where}: field 'version' must be a positive integer, got {version!r}")
    if version > max_version:
        raise error(f"{where}: field 'version': format version {version} is newer than this staralign "
                    f"reads ({max_version}); upgrade staralign")
    return info
