"""Test sets: which annotation files a benchmark's faces come from, and its named subsets.

A benchmark is more than one file: 300W is scored on its common and challenge halves
and on their union, WFLW on six attribute subsets flagged by each row's tags.  This
module finds the files (the names 300W's converter writes, or the one the user gives)
and reads every face once, with the subsets as boolean masks over them, so one pass of
a network scores the full set and every subset alike (:mod:`staralign.engine.evaluator`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..definitions import LandmarkDefinition, get_definition
from .annotations import WFLW_TAGS, Annotation, read_annotations

__all__ = [
    "CHALLENGE_FILE",
    "COMMON_FILE",
    "FULL",
    "TEST_FILE",
    "TestSet",
    "load_test_set",
    "tag_subsets",
]

FULL = "full"
# 300W's converter (converters.convert_300w) writes these next to test.tsv (which is their union).
COMMON_FILE, CHALLENGE_FILE, TEST_FILE = "test_common.tsv", "test_challenge.tsv", "test.tsv"


def tag_subsets(annotations: Sequence[Annotation]) -> dict[str, np.ndarray]:
    """Boolean masks of the attribute subsets, from the rows' 0/1 tags.

    Six tags are WFLW's (pose, expression, illumination, make-up, occlusion, blur);
    any other count is named ``tag0``, ``tag1``, ...  A row without tags is in none.
    """
    width = max((len(a.tags) for a in annotations), default=0)
    if width == 0:
        return {}
    flags = np.zeros((len(annotations), width), bool)
    for i, a in enumerate(annotations):
        flags[i, :len(a.tags)] = np.asarray(a.tags, bool)
    names = WFLW_TAGS if width == len(WFLW_TAGS) else tuple(f"tag{k}" for k in range(width))
    return {name: flags[:, k] for k, name in enumerate(names)}


@dataclass
class TestSet:
    """The faces to score, read once, and named subsets of them (boolean masks).

    ``full_first``: where the full set goes in tables (WFLW lists it first, 300W's
    papers list common, challenge, then full).
    """

    __test__ = False  # not a pytest test class

    annotations: list[Annotation]
    image_dir: str | None
    files: list[str]
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    full_first: bool = True

    def __len__(self) -> int:
        return len(self.annotations)

    def rows(self) -> list[str]:
        """Names of the reported sets in display order, ``"full"`` included."""
        names = list(self.subsets)
        return [FULL, *names] if self.full_first else [*names, FULL]

    def dataset(self, definition: LandmarkDefinition, input_size: int):
        """A test-mode dataset of these faces (no augmentation, no training targets)."""
        from .dataset import LandmarkDataset

        return LandmarkDataset(self.annotations, self.image_dir, definition, train=False,
                               input_size=input_size, heatmap_size=max(1, input_size // 4), targets="device")


def _find(annot_dir: str | os.PathLike | None, definition: LandmarkDefinition, name: str) -> Path | None:
    from .dataset import find_annotation_file

    if annot_dir is None:
        return None
    try:
        return find_annotation_file(annot_dir, definition.name, name)
    except FileNotFoundError:
        return None


def _read(path: Path, definition: LandmarkDefinition) -> list[Annotation]:
    return list(read_annotations(path, num_points=definition.num_points).annotations)


def load_test_set(
    definition: str | LandmarkDefinition,
    annot_dir: str | os.PathLike | None,
    image_dir: str | os.PathLike | None,
    test_file: str | os.PathLike | None = None,
) -> TestSet:
    """The test faces: ``test_file`` (a name under ``annot_dir``, or a path), else 300W's
    ``test_common.tsv`` + ``test_challenge.tsv`` when both exist, else ``test.tsv``.

    Raises ``FileNotFoundError`` naming what was looked for, and
    :class:`~staralign.data.annotations.AnnotationError` for bad rows (including a
    point count that does not match ``definition``).
    """
    d = get_definition(definition)
    img = None if image_dir is None else str(image_dir)
    if test_file is not None:
        given = Path(test_file)
        path = None if given.is_absolute() else _find(annot_dir, d, str(test_file))
        if path is None and given.is_file():
            path = given
        if path is None:
            where = f" (nor under {annot_dir})" if annot_dir is not None else ""
            raise FileNotFoundError(f"test file {str(test_file)!r} not found{where}")
        anns = _read(path, d)
        return TestSet(anns, img, [str(path)], tag_subsets(anns))
    if annot_dir is None:
        raise FileNotFoundError("no test file: give an annotation directory or a test file")
    common, challenge = _find(annot_dir, d, COMMON_FILE), _find(annot_dir, d, CHALLENGE_FILE)
    if common is not None and challenge is not None:
        a, b = _read(common, d), _read(challenge, d)
        anns = a + b
        subsets = {"common": np.arange(len(anns)) < len(a), "challenge": np.arange(len(anns)) >= len(a)}
        subsets.update(tag_subsets(anns))
        return TestSet(anns, img, [str(common), str(challenge)], subsets, full_first=False)
    path = _find(annot_dir, d, TEST_FILE)
    if path is None:
        raise FileNotFoundError(f"no {TEST_FILE} (or {COMMON_FILE} + {CHALLENGE_FILE}) in {annot_dir} "
                                f"or {Path(annot_dir) / d.name}")
    anns = _read(path, d)
    return TestSet(anns, img, [str(path)], tag_subsets(anns))
