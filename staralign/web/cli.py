"""``staralign serve``: the web page to try a model, on http://127.0.0.1:8000/ by default.

The model is loaded and the port bound before anything is served, so a bad
checkpoint, a missing face detector or a busy port is a one-line error.  Binding
a non-loopback address prints a warning: the server has no authentication.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

__all__ = ["bind_socket", "is_loopback", "register", "run_serve"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``staralign`` parser."""
    from ..hub import DEFAULT_MODEL, WEIGHTS_HELP
    from ..inference.faces import DETECTOR_NAMES

    p = subparsers.add_parser(
        "serve", help="a local web page to try a model: upload a photo or use the webcam",
        description="Serve a web page (and a JSON API) that finds faces, landmarks and ambiguity ellipses in "
                    "uploaded photos or webcam frames. Listens on 127.0.0.1 only unless --host says otherwise. "
                    "Needs the web extra: pip install 'staralign[web]'.")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help=f"{WEIGHTS_HELP}, or an exported .onnx; default: {DEFAULT_MODEL}")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default="yunet",
                   help="default face detector (the page can choose another per image): yunet (downloaded "
                        "once; falls back to opencv with a warning), opencv (Haar cascade), "
                        "none (the whole image is one face), "
                        "dlib or mediapipe (if installed)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="PyTorch device")
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                   help="largest accepted upload (default 10)")
    p.add_argument("--max-megapixels", type=float, default=40.0, metavar="MP",
                   help="largest accepted image, checked from its header before decoding (default 40)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code: trusted files only)")
    p.add_argument("--ema", action="store_true", help="use a training checkpoint's EMA weights")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept uploads from pages of this site, e.g. http://localhost:3000 (repeatable; "
                        "by default only this server's own page may POST)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="most faces of concurrent requests run through the network in one call (1 turns "
                        "batching off; default 8)")
    p.add_argument("--upload-timeout", type=float, default=10.0, metavar="S",
                   help="close an upload that sends nothing for this many seconds (default 10; a whole body "
                        "must arrive within 6 times that)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=run_serve)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port); OSError if that is impossible."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def run_serve(args: argparse.Namespace) -> int:
    """``staralign serve``: load the model, bind, warn if exposed, serve until Ctrl+C."""
    from ..cli import UserError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the web page needs FastAPI and uvicorn: pip install 'staralign[web]' ({exc})") from exc
    if not args.max_upload_mb > 0 or not args.max_megapixels > 0:
        raise UserError("--max-upload-mb and --max-megapixels must be positive")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if not 1 <= args.max_batch <= 256:
        raise UserError(f"--max-batch must be between 1 and 256, got {args.max_batch}")
    if not 0 < args.upload_timeout <= 3600:
        raise UserError(f"--upload-timeout must be between 0 and 3600 seconds, got {args.upload_timeout:g}")
    from .guard import GuardSettings, normalise_origin

    try:
        origins = tuple(normalise_origin(o) for o in args.allow_origin)
    except ValueError as exc:
        raise UserError(f"--allow-origin: {exc}") from None

    from ..hub import resolve_weights
    from ..inference.detector import LandmarkDetector
    from ..inference.faces import FaceDetectorError
    from ..inference.report import face_detector_name
    from .app import Limits, create_app

    args.weights = str(resolve_weights(args.weights))  # a name is fetched into the cache once
    try:
        det = LandmarkDetector.from_checkpoint(args.weights, device=args.device, detector=args.detector,
                                               allow_pickle=args.allow_pickle, ema=args.ema)
        limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20),
                        max_pixels=int(args.max_megapixels * 1e6))
        loopback = is_loopback(args.host)
        allowed = sorted({*LOOPBACK_NAMES, args.host.strip("[]").lower()}) if loopback else None
        guard = GuardSettings(allowed_origins=origins, body_idle_s=args.upload_timeout,
                              body_deadline_s=6 * args.upload_timeout)
        app = create_app(det, weights_name=Path(args.weights).name, limits=limits, allowed_hosts=allowed,
                         guard=guard, max_batch=args.max_batch)
    except (ValueError, FaceDetectorError, OSError) as exc:
        raise UserError(str(exc)) from exc

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
                        "choose another --port (0 picks a free one)") from exc
    port = sock.getsockname()[1]
    if not loopback:
        print(f"staralign serve: warning: listening on {args.host}, not loopback: anyone who can reach this "
              "machine can use the model and upload images (there is no authentication). The webcam works only "
              "on http://localhost or over HTTPS.", file=sys.stderr, flush=True)
    url = _url(args.host, port)
    backend = det.backend
    device = getattr(backend, "device", None)
    print(f"staralign serve: {Path(args.weights).name} ({det.definition.name}, {det.definition.num_points} points, "
          f"{backend.name}{'' if device is None else ' on ' + str(device)}, detector {face_detector_name(det)})",
          flush=True)  # the one in use: the Haar cascade when YuNet could not be had
    print(f"staralign serve: open {url}  (Ctrl+C to stop)", flush=True)
    if args.open:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, [url]).start()
    from .server import make_server

    make_server(app).run(sockets=[sock])
    return 0
