"""Procedural synthetic faces with exact 98-point WFLW landmarks.

No real face dataset can be downloaded everywhere, so this generator is how the
project trains end to end, runs its demo and tests the paper's claim that STAR
suppresses error along the direction of semantic ambiguity.  Each face is a
parametric 2-D model with a little depth (``geometry``), posed and drawn with
OpenCV (``render``); its 98 landmarks are vertices of the very curves that are
drawn, so they lie on the drawn features exactly.  ``dataset`` writes a STAR-format
dataset; ``labels`` adds tangential label noise and computes contour tangents;
``cli`` is ``staralign data synth``.  See docs/synthetic.md.

Public API (imported lazily, so ``from staralign.data.synth import add_arguments``
does not load OpenCV)::

    render_face(params_or_rng, size) -> (image BGR uint8, landmarks (98, 2), info)
    sample_params(rng) -> FaceParams
    generate_dataset(out_dir, train=, test=, ambiguity=, seed=, size=, workers=)
    make_sample(seed, split, index, size, ambiguity) -> (image, labels, info)
    add_arguments(parser) / run(args)       (``staralign data synth``)
    ambiguous_landmarks(...), curve_tangents(...), tangents_from_landmarks(...)
"""

from __future__ import annotations

from ..._lazy import lazy_exports

_EXPORTS = {
    "add_arguments": ".cli",
    "run": ".cli",
    "GENERATOR_VERSION": ".dataset",
    "generate_dataset": ".dataset",
    "make_sample": ".dataset",
    "CORNER_IDS": ".geometry",
    "PUPIL_IDS": ".geometry",
    "point_kinds": ".geometry",
    "ambiguous_landmarks": ".labels",
    "curve_tangents": ".labels",
    "tangents_from_landmarks": ".labels",
    "TAG_THRESHOLDS": ".params",
    "FaceParams": ".params",
    "Occluder": ".params",
    "face_tags": ".params",
    "sample_params": ".params",
    "render_face": ".render",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
