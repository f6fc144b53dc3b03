"""Landmark definitions: which points a dataset has and how they relate.

A definition is immutable data (points, edges, flip pairs, NME normalisation
indices, FR/AUC threshold), never a branch in code.  The built-in ones (WFLW,
300W, COFW, 300VW) ship as YAML files in ``staralign/resources/definitions``
and are read by the same loader as a user's own file, so a custom landmark set
is a first-class citizen.

File schema (YAML or JSON), one mapping::

    name: MyFaces
    num_points: 12
    edges:                      # curves drawn into edge maps (AAM)
      - {closed: false, indices: [0, 1, 2, 3], name: jaw}
    flip_pairs: [[0, 3], [1, 2]]
    flip_x_offset: -1           # flipped x = width + offset - x
    nme_ocular:  {left: 4, right: 7}
    nme_pupil:   {left: [4, 5], right: [6, 7]}   # a list is averaged
    nme_default: {left: 4, right: 7}
    fr_auc_threshold: 0.1
    five_points: [[4, 5], [6, 7], 8, 9, 10]      # optional: eyes, nose, mouth corners
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BUILTIN_DEFINITIONS",
    "NORMS",
    "DefinitionError",
    "Edge",
    "LandmarkDefinition",
    "NormIndices",
    "get_definition",
    "definition_for_num_points",
]

NORM_TYPES = ("ocular", "pupil", "default")  # the normalisations a definition names landmarks for
# Every NME normalisation (staralign.metrics): the definition's, or the landmarks' box. Here, not in
# metrics, so that the test command's --norm choices come without loading torch.
NORMS = (*NORM_TYPES, "box")
BUILTIN_DEFINITIONS = ("WFLW", "300W", "COFW", "300VW")
_BUILTIN_FILES = {"WFLW": "wflw.yaml", "300W": "300w.yaml", "COFW": "cofw.yaml", "300VW": "300vw.yaml"}


class DefinitionError(ValueError):
    """A landmark definition file or mapping is invalid; the message names the field."""


@dataclass(frozen=True)
class Edge:
    """A curve through landmarks, drawn into one edge map."""

    closed: bool
    indices: tuple[int, ...]
    name: str = ""


@dataclass(frozen=True)
class NormIndices:
    """Two groups of landmarks whose (mean) distance normalises the NME."""

    left: tuple[int, ...]
    right: tuple[int, ...]
    # The original code distinguishes an int index from a list of indices
    # (averaged); we keep the distinction so files round-trip exactly.
    left_is_list: bool = False
    right_is_list: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "left": list(self.left) if self.left_is_list else self.left[0],
            "right": list(self.right) if self.right_is_list else self.right[0],
        }


@dataclass(frozen=True)
class LandmarkDefinition:
    """Everything the pipeline needs to know about a landmark layout."""

    name: str
    num_points: int
    edges: tuple[Edge, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    flip_x_offset: int
    nme_ocular: NormIndices
    nme_pupil: NormIndices
    nme_default: NormIndices
    fr_auc_threshold: float = 0.1
    five_points: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def norm_indices(self, norm: str) -> NormIndices:
        """The landmark groups for ``norm`` in ``ocular``, ``pupil`` or ``default``."""
        if norm not in NORM_TYPES:
            raise KeyError(f"unknown NME normalisation {norm!r}; choose from {', '.join(NORM_TYPES)}")
        return getattr(self, f"nme_{norm}")

    def flip_permutation(self) -> list[int]:
        """Index map such that ``flipped[i] = points[perm[i]]`` after a horizontal flip."""
        perm = list(range(self.num_points))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def edge_point_matrix(self) -> list[list[float]]:
        """(num_points, num_edges) 0/1 incidence of points on edges (AAM's edge-to-point map)."""
        m = [[0.0] * self.num_edges for _ in range(self.num_points)]
        for e, edge in enumerate(self.edges):
            for i in edge.indices:
                m[i][e] = 1.0
        return m

    def to_dict(self) -> dict[str, Any]:
        """The file schema; ``LandmarkDefinition.from_dict(d.to_dict()) == d``."""
        out: dict[str, Any] = {
            "name": self.name,
            "num_points": self.num_points,
            "num_edges": self.num_edges,
            "edges": [
                {"closed": e.closed, "indices": list(e.indices), **({"name": e.name} if e.name else {})}
                for e in self.edges
            ],
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "flip_x_offset": self.flip_x_offset,
            "fr_auc_threshold": self.fr_auc_threshold,
        }
        for k in NORM_TYPES:
            out[f"nme_{k}"] = self.norm_indices(k).to_dict()
        if self.five_points is not None:
            out["five_points"] = [list(g) for g in self.five_points]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<mapping>") -> LandmarkDefinition:
        return _parse(data, source)


# --------------------------------------------------------------------------- parsing


def _fail(source: str, fld: str, msg: str) -> DefinitionError:
    return DefinitionError(f"{source}: field '{fld}': {msg}")


def _int(value: Any, source: str, fld: str, num_points: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, fld, f"expected an integer, got {value!r}")
    if num_points is not None and not 0 <= value < num_points:
        raise _fail(source, fld, f"index {value} out of range for num_points {num_points}")
    return value


def _index_group(value: Any, source: str, fld: str, n: int) -> tuple[tuple[int, ...], bool]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise _fail(source, fld, "empty list of indices")
        return tuple(_int(v, source, f"{fld}[{i}]", n) for i, v in enumerate(value)), True
    return (_int(value, source, fld, n),), False


def _parse(data: Mapping[str, Any], source: str) -> LandmarkDefinition:
    if not isinstance(data, Mapping):
        raise DefinitionError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known = {"name", "num_points", "num_edges", "edges", "flip_pairs", "flip_x_offset",
             "nme_ocular", "nme_pupil", "nme_default", "fr_auc_threshold", "five_points"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(source, unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    for req in ("name", "num_points", "edges", "nme_default"):
        if req not in data:
            raise _fail(source, req, "missing")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise _fail(source, "name", f"expected a non-empty string, got {name!r}")
    n = _int(data["num_points"], source, "num_points")
    if n <= 0:
        raise _fail(source, "num_points", f"must be positive, got {n}")

    edges_raw = data["edges"]
    if not isinstance(edges_raw, Sequence) or isinstance(edges_raw, str):
        raise _fail(source, "edges", "expected a list")
    edges = []
    for i, e in enumerate(edges_raw):
        fld = f"edges[{i}]"
        if not isinstance(e, Mapping):
            raise _fail(source, fld, "expected a mapping with 'closed' and 'indices'")
        closed = e.get("closed", False)
        if not isinstance(closed, bool):
            raise _fail(source, f"{fld}.closed", f"expected true/false, got {closed!r}")
        idx = e.get("indices")
        if not isinstance(idx, Sequence) or isinstance(idx, str) or len(idx) < 2:
            raise _fail(source, f"{fld}.indices", "expected a list of at least 2 point indices")
        indices = tuple(_int(v, source, f"{fld}.indices[{j}]", n) for j, v in enumerate(idx))
        ename = e.get("name", "")
        if not isinstance(ename, str):
            raise _fail(source, f"{fld}.name", "expected a string")
        edges.append(Edge(closed, indices, ename))
    if "num_edges" in data and data["num_edges"] != len(edges):
        raise _fail(source, "num_edges", f"says {data['num_edges']} but {len(edges)} edges are listed")

    pairs_raw = data.get("flip_pairs", [])
    if not isinstance(pairs_raw, Sequence) or isinstance(pairs_raw, str):
        raise _fail(source, "flip_pairs", "expected a list of [a, b] pairs")
    pairs = []
    seen: set[int] = set()
    for i, p in enumerate(pairs_raw):
        fld = f"flip_pairs[{i}]"
        if not isinstance(p, Sequence) or isinstance(p, str) or len(p) != 2:
            raise _fail(source, fld, f"expected a pair [a, b], got {p!r}")
        a, b = (_int(v, source, f"{fld}[{j}]", n) for j, v in enumerate(p))
        if a == b or a in seen or b in seen:
            raise _fail(source, fld, f"point {a if a in seen or a == b else b} appears in more than one pair")
        seen.update((a, b))
        pairs.append((a, b))

    offset = _int(data.get("flip_x_offset", -1), source, "flip_x_offset")

    norm: dict[str, NormIndices] = {}
    for k in NORM_TYPES:
        key = f"nme_{k}"
        if key not in data:
            continue
        v = data[key]
        if not isinstance(v, Mapping) or "left" not in v or "right" not in v:
            raise _fail(source, key, "expected a mapping with 'left' and 'right'")
        left, llist = _index_group(v["left"], source, f"{key}.left", n)
        right, rlist = _index_group(v["right"], source, f"{key}.right", n)
        norm[k] = NormIndices(left, right, llist, rlist)
    # Missing normalisations fall back to the default one.
    for k in NORM_TYPES:
        norm.setdefault(k, norm["default"])

    thr = data.get("fr_auc_threshold", 0.1)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr <= 1:
        raise _fail(source, "fr_auc_threshold", f"expected a number in (0, 1], got {thr!r}")

    five = data.get("five_points")
    five_points = None
    if five is not None:
        if not isinstance(five, Sequence) or isinstance(five, str) or len(five) != 5:
            raise _fail(source, "five_points", "expected 5 entries (eye, eye, nose, mouth corner, mouth corner)")
        five_points = tuple(_index_group(g, source, f"five_points[{i}]", n)[0] for i, g in enumerate(five))

    return LandmarkDefinition(
        name=name,
        num_points=n,
        edges=tuple(edges),
        flip_pairs=tuple(pairs),
        flip_x_offset=offset,
        nme_ocular=norm["ocular"],
        nme_pupil=norm["pupil"],
        nme_default=norm["default"],
        fr_auc_threshold=float(thr),
        five_points=five_points,
    )


def _load_file(path: Path) -> LandmarkDefinition:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError(f"{path}: cannot read landmark definition: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DefinitionError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return _parse(data, str(path))


_CACHE: dict[str, LandmarkDefinition] = {}


def get_definition(name_or_path: str | Path | LandmarkDefinition) -> LandmarkDefinition:
    """A built-in definition by name (case-insensitive) or a user's YAML/JSON file."""
    if isinstance(name_or_path, LandmarkDefinition):
        return name_or_path
    key = str(name_or_path)
    for builtin in BUILTIN_DEFINITIONS:
        if key.upper() == builtin:
            if builtin not in _CACHE:
                ref = resources.files("staralign") / "resources" / "definitions" / _BUILTIN_FILES[builtin]
                data = yaml.safe_load(ref.read_text(encoding="utf-8"))
                _CACHE[builtin] = _parse(data, f"<builtin {builtin}>")
            return _CACHE[builtin]
    path = Path(key)
    if not path.exists():
        raise DefinitionError(
            f"unknown landmark definition {key!r}: not one of {', '.join(BUILTIN_DEFINITIONS)} "
            f"and no such file"
        )
    return _load_file(path)


def definition_for_num_points(num_points: int) -> LandmarkDefinition:
    """The built-in definition with this many points (98 WFLW, 68 300W, 29 COFW)."""
    for name in ("WFLW", "300W", "COFW"):
        d = get_definition(name)
        if d.num_points == num_points:
            return d
    raise DefinitionError(
        f"no built-in landmark definition has {num_points} points; pass the definition explicitly"
    )
