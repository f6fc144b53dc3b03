"""Running an exported ``.onnx`` network with onnxruntime, without importing torch.

The file alone is enough: :mod:`staralign.inference.export` stores the landmark
definition, input size and landmark conversions as JSON under the ONNX
``metadata_props`` key ``staralign`` (see :data:`METADATA_KEY`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..definitions import DefinitionError, LandmarkDefinition
from ..metadata import parse_record

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "OnnxBackend", "OnnxModelError"]

METADATA_KEY = "staralign"
FORMAT_NAME = "staralign.onnx"
FORMAT_VERSION = 1


class OnnxModelError(ValueError):
    """An ``.onnx`` file is unusable here; the message names the file."""


class OnnxBackend:
    """An exported STAR network in onnxruntime (CPU by default)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None, spin: bool = False) -> None:
        """``threads``: intra-op threads (default: the CPUs this process may use);
        ``spin``: let idle pool threads spin-wait for work.  Off by default: on a CPU
        shared with other work, spinning threads burn the time slices the working
        ones need (measured on a loaded 2-core VM: int8 at 2 threads took 698 ms a
        face spinning, 216 ms not, 436 ms on one thread)."""
        self.path = Path(path)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxModelError(f"{self.path}: running an ONNX model needs onnxruntime "
                                 "(pip install 'staralign[onnx]')") from exc
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: no such ONNX file")
        from ..threads import resolve_threads

        options = ort.SessionOptions()
        # onnxruntime sizes its pool from the machine's cores; use those this process may run on.
        self.threads = resolve_threads(threads or None).threads
        options.intra_op_num_threads = self.threads
        self.spin = bool(spin)
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise OnnxModelError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc
        info = self._metadata()
        try:
            self.definition = LandmarkDefinition.from_dict(info["definition"], f"{self.path} (metadata)")
            self.input_size = int(info["input_size"])
        except (KeyError, TypeError, ValueError, DefinitionError) as exc:
            raise OnnxModelError(f"{self.path}: bad staralign metadata: {exc}") from exc
        self.conversions = {k: np.asarray(v, np.float64) for k, v in info.get("conversions", {}).items()}
        nstack = (info.get("config") or {}).get("nstack")
        self.stacks = info.get("stacks", nstack)  # stacks in the graph (older files: all of them)
        self.quantization = info.get("quantization")  # the int8 check, for quantised files
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        outputs = [o.name for o in self.session.get_outputs()]
        if "landmarks" not in outputs:
            raise OnnxModelError(f"{self.path}: no 'landmarks' output (outputs: {', '.join(outputs)})")
        self.has_ambiguity = "covariance" in outputs

    def _metadata(self) -> dict[str, Any]:
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise OnnxModelError(
                f"{self.path}: not exported by staralign (no '{METADATA_KEY}' metadata: the landmark "
                "definition and input size are unknown); export with 'staralign export'")
        return parse_record(props[METADATA_KEY], source=str(self.path), key=METADATA_KEY,
                            format_name=FORMAT_NAME, max_version=FORMAT_VERSION, error=OnnxModelError)

    def run(self, batch: np.ndarray, ambiguity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Landmarks (B, N, 2) and, if asked and exported, covariances (B, N, 2, 2), normalised units."""
        batch = np.ascontiguousarray(batch, np.float32)
        want = ["landmarks"] + (["covariance"] if ambiguity and self.has_ambiguity else [])
        step = self.fixed_batch or len(batch)
        parts = []
        for i in range(0, len(batch), step):
            chunk = batch[i:i + step]
            n = len(chunk)
            if n < step:  # a file exported for a fixed batch: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            parts.append([o[:n] for o in self.session.run(want, {self.input_name: chunk})])
        landmarks = np.concatenate([p[0] for p in parts])
        cov = np.concatenate([p[1] for p in parts]) if len(want) > 1 else None
        return landmarks, cov
