"""Named third-party files: the authors' published STAR weights and OpenCV's YuNet detector.

This module is the one home for files the project does not ship but downloads at run time.
Each is known by a short name (``wflw``, ``300w``, ``cofw``, ``yunet``); :func:`fetch` returns
its local path, downloading it on first use.

Rules (the same for every file):

* The cache folder is ``$STARALIGN_CACHE``, else ``$XDG_CACHE_HOME/staralign``, else
  ``~/.cache/staralign``.  A file already at the cache's top level under its upstream
  file name is used as it is, with no network access at all (copy files there by hand
  on machines without internet).
* ``STARALIGN_MIRROR=URL`` fetches every file as ``URL/<file name>`` instead of upstream
  (sites without internet, tests); ``STARALIGN_OFFLINE=1`` never downloads.
* A download goes to a temporary file in the cache folder, is checked (length against
  the server's Content-Length, then the file's own check: SHA-256 for YuNet, the official
  key set and shapes for STAR weights, loaded with ``weights_only=True``), and only then
  renamed to its final name.  A file that fails is deleted: an interrupted or refused
  download never leaves a file that looks complete.
* When a file is not cached and cannot be downloaded, :class:`Unavailable` says, on one
  line, which file, where it comes from and the exact path to put it.

Google Drive answers large files with an HTML confirmation page instead of the bytes;
:func:`_google_drive_confirmation` reads that page's form (or its older ``confirm=`` link
or ``download_warning`` cookie) and the request is repeated with it.  This is a few lines
of standard-library code rather than a dependency on ``gdown``: the project needs exactly
one public file per id, gdown would add a dependency (and its own requests/bs4 stack) for
that, and our own handler keeps the temporary-file, length and verification rules above
in one place.

The module imports neither torch nor numpy; STAR verification loads torch when it runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import urllib.request

from .cli import UserError

__all__ = [
    "DEFAULT_MODEL",
    "FILES",
    "STAR_MODELS",
    "RemoteFile",
    "Unavailable",
    "VerificationError",
    "WEIGHTS_HELP",
    "cache_dir",
    "cached_path",
    "fetch",
    "is_offline",
    "official_layout",
    "resolve_weights",
    "verify_star_checkpoint",
]

DEFAULT_MODEL = "wflw"
# The --weights help of every command that reads a model (predict, serve, export, test).
WEIGHTS_HELP = ("a published model's name (wflw, 300w, cofw; downloaded once into the cache, see "
                "'staralign models') or a weights file: official .pkl, staralign .safetensors")
_CHUNK = 1 << 16
_TIMEOUT_S = 60.0
_USER_AGENT = "staralign (https://github.com/ZhenglinZhou/STAR weights fetcher)"


class Unavailable(UserError):
    """A named file is not cached and cannot be downloaded (offline, no network, refused)."""


class VerificationError(UserError):
    """A downloaded file is not the expected one (checksum, size or layout); it was deleted."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file.

    ``page`` is the link a person follows to get it by hand; ``url`` is what we download
    (Google Drive files are fetched from their ``uc?export=download`` address).
    ``dataset`` names the landmark definition of STAR weights (None for other files).
    """

    name: str
    filename: str
    page: str
    url: str
    description: str
    size: int | None = None  # bytes, when upstream publishes the file exactly
    sha256: str | None = None
    dataset: str | None = None

    @property
    def is_star_model(self) -> bool:
        return self.dataset is not None


def _drive(file_id: str) -> tuple[str, str]:
    return (f"https://drive.google.com/file/d/{file_id}/view",
            f"https://drive.google.com/uc?export=download&id={file_id}")


_STAR_REPO = "https://github.com/ZhenglinZhou/STAR"
_YUNET_DIR = "https://github.com/opencv/opencv_zoo/tree/main/models/face_detection_yunet"
# GitHub's /raw/ address, not raw.githubusercontent.com: the zoo keeps its .onnx files in Git
# LFS, where raw.githubusercontent.com serves the LFS pointer; /raw/ redirects to the content.
_YUNET_RAW = ("https://github.com/opencv/opencv_zoo/raw/main/models/"
              "face_detection_yunet/face_detection_yunet_2026may.onnx")

FILES: dict[str, RemoteFile] = {
    "wflw": RemoteFile(
        "wflw", "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl",
        *_drive("1aOx0wYEZUfBndYy_8IYszLPG_D2fhxrT"),
        description="STAR weights trained on WFLW (98 points), the authors' release",
        dataset="WFLW"),
    "300w": RemoteFile(
        "300w", "300W_STARLoss_NME_2_87.pkl",
        *_drive("1NFcZ9jzql_jnn3ulaSzUlyhS05HWB9n_"),
        description="STAR weights trained on 300W (68 points), the authors' release",
        dataset="300W"),
    "cofw": RemoteFile(
        "cofw", "COFW_STARLoss_NME_4_62.pkl",
        *_drive("1Fiu3hjjkQRdKsWE9IgyNPdiJSz9_MzA5"),
        description="STAR weights trained on COFW (29 points), the authors' release",
        dataset="COFW"),
    "yunet": RemoteFile(
        "yunet", "face_detection_yunet_2026may.onnx", _YUNET_DIR, _YUNET_RAW,
        description="OpenCV Zoo YuNet face detector (MIT licence)",
        size=229_738,
        sha256="ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"),
}
STAR_MODELS = tuple(name for name, f in FILES.items() if f.is_star_model)


# --------------------------------------------------------------------------- settings


def cache_dir() -> Path:
    """``$STARALIGN_CACHE``, else ``$XDG_CACHE_HOME/staralign``, else ``~/.cache/staralign``."""
    explicit = os.environ.get("STARALIGN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "staralign"
    return Path.home() / ".cache" / "staralign"


def is_offline() -> bool:
    """True when ``STARALIGN_OFFLINE`` is set to anything but empty, 0, false or no."""
    return os.environ.get("STARALIGN_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _mirror() -> str | None:
    url = os.environ.get("STARALIGN_MIRROR", "").strip()
    return url.rstrip("/") if url else None


def _lookup(name: str) -> RemoteFile:
    key = name.strip().lower()
    if key not in FILES:
        raise UserError(f"unknown model name {name!r}: known names are {', '.join(FILES)}")
    return FILES[key]


def cached_path(name: str) -> Path:
    """Where the named file lives in the cache (whether or not it is there yet)."""
    return cache_dir() / _lookup(name).filename


# --------------------------------------------------------------------------- public entry points


def fetch(name: str, *, progress: bool = True) -> Path:
    """The local path of the named file, downloaded and verified first if it is not cached.

    A file already in the cache is returned without any network access.  Raises
    :class:`Unavailable` when it is not cached and cannot be had, and
    :class:`VerificationError` when the downloaded bytes are not the expected file.
    """
    remote = _lookup(name)
    target = cache_dir() / remote.filename
    if target.is_file():
        return target
    mirror = _mirror()
    url = f"{mirror}/{urllib.parse.quote(remote.filename)}" if mirror else remote.url
    if is_offline():
        raise _unavailable(remote, target, "STARALIGN_OFFLINE is set")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the cache folder {target.parent}: {exc}") from exc
    _download(remote, url, target, progress=progress)
    return target


def resolve_weights(spec: str | os.PathLike | None, *, progress: bool = True) -> Path:
    """A weights file from a path or a published model's name (None: ``wflw``).

    An existing file wins over a name; a string that is neither an existing file nor a
    known name is a :class:`~staralign.cli.UserError` saying both.
    """
    if spec is None or str(spec).strip() == "":
        return fetch(DEFAULT_MODEL, progress=progress)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    key = str(spec).strip().lower()
    if key in STAR_MODELS:
        return fetch(key, progress=progress)
    if path.exists():
        raise UserError(f"{path}: not a weights file (it is a folder)")
    raise UserError(
        f"{spec}: no such weights file, and not a published model name "
        f"(names: {', '.join(STAR_MODELS)}; see 'staralign models')"
    )


def _unavailable(remote: RemoteFile, target: Path, why: str) -> Unavailable:
    return Unavailable(
        f"{remote.filename} is not cached and cannot be downloaded ({why}); "
        f"get it from {remote.page} and put it at {target}"
    )


# --------------------------------------------------------------------------- downloading


def _download(remote: RemoteFile, url: str, target: Path, *, progress: bool) -> None:
    import http.client  # here, not at the top: urllib.request is slow to import for --help
    import urllib.error

    _remove_stale_parts(target)
    tmp = target.with_name(f".{target.name}.part{os.getpid()}")
    try:
        try:
            _fetch_to(url, tmp, remote, progress=progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
            raise _unavailable(remote, target, f"download from {_short(url)} failed: {reason}") from exc
        _verify(remote, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_parts(target: Path) -> None:
    """Delete partial downloads of ``target`` left by processes that were killed (POSIX only:
    elsewhere there is no safe test of whether a process id is alive)."""
    if os.name != "posix":
        return
    for part in target.parent.glob(f".{target.name}.part*"):
        pid = part.name.rsplit(".part", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except OSError:  # alive but another user's, or not ours to test: leave it
            pass


def _short(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _opener() -> urllib.request.OpenerDirector:
    import http.cookiejar
    import urllib.request

    # A cookie jar: Google Drive's confirmation flow may set its token as a cookie.
    return urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def _fetch_to(url: str, tmp: Path, remote: RemoteFile, *, progress: bool) -> None:
    import urllib.request

    opener = _opener()
    for _attempt in range(3):  # the file, or a confirmation page then the file
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with opener.open(request, timeout=_TIMEOUT_S) as response:
            content_type = response.headers.get("Content-Type", "")
            if content_type.startswith("text/html"):
                page = response.read(1 << 20).decode("utf-8", "replace")
                confirmed = _google_drive_confirmation(page, response.geturl(), opener)
                if confirmed is None:  # quota exceeded, file removed, a login page, ...
                    raise OSError(f"the server answered with a web page, not the file "
                                  f"({_page_title(page) or 'no title'})")
                url = confirmed
                continue
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with open(tmp, "wb") as out:
                written = _copy(response, out, expected, remote.filename, progress)
            if expected is not None and written != expected:
                raise OSError(f"connection closed after {written} of {expected} bytes")
            return
    raise OSError("the server kept answering with web pages, not the file")


class _FormParser(HTMLParser):
    """The action and fields of the page's download form (Google Drive's virus-scan warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _page_title(page: str) -> str:
    parser = _FormParser()
    parser.feed(page)
    return " ".join(parser.title.split())


def _google_drive_confirmation(
    page: str, page_url: str, opener: urllib.request.OpenerDirector
) -> str | None:
    """The URL that confirms a Google Drive download, read from its warning page; None if
    the page offers none (quota exceeded, access denied, not a confirmation page)."""
    import urllib.request

    parser = _FormParser()
    parser.feed(page)
    # Today's page: a GET form whose hidden fields (id, export, confirm, uuid) make the link.
    for action, fields in sorted(parser.forms, key=lambda form: "confirm" not in form[1]):
        if "confirm" in fields or ("id" in fields and "export" in fields):
            base = urllib.parse.urljoin(page_url, action or page_url)
            return f"{base.split('?')[0]}?{urllib.parse.urlencode(fields)}"
    match = re.search(r"confirm=([0-9A-Za-z_-]+)", page)  # older pages: a link with the token
    token = match.group(1) if match else None
    if token is None:  # oldest: the token in a download_warning cookie
        jar = next((h.cookiejar for h in opener.handlers
                    if isinstance(h, urllib.request.HTTPCookieProcessor)), None)
        for cookie in jar or ():
            if cookie.name.startswith("download_warning"):
                token = cookie.value
    if token is None:
        return None
    parts = urllib.parse.urlsplit(page_url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["confirm"] = token
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _copy(src: IO[bytes], out: IO[bytes], total: int | None, label: str, progress: bool) -> int:
    report = _progress(total, label) if progress else (lambda n, done=False: None)
    written = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            break
        out.write(chunk)
        written += len(chunk)
        report(written)
    report(written, done=True)
    return written


def _progress(total: int | None, label: str) -> Callable[..., None]:
    """A progress reporter on stderr in bytes: tqdm or plain lines every few seconds, chosen as
    every progress display is (:func:`staralign.progress.mode_for`, ``STARALIGN_PROGRESS``)."""
    from .progress import mode_for

    mode = mode_for(sys.stderr)
    if mode == "off":
        return lambda n, done=False: None
    if mode == "bar":
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"downloading {label}", file=sys.stderr, leave=True)
            state = {"n": 0}

            def update(n: int, done: bool = False) -> None:
                bar.update(n - state["n"])
                state["n"] = n
                if done:
                    bar.close()

            return update
    start = time.monotonic()
    last = {"t": start}

    def line(n: int, done: bool = False) -> None:
        now = time.monotonic()
        if not done and now - last["t"] < 5.0:
            return
        last["t"] = now
        rate = n / max(now - start, 1e-6)
        of = f" of {_size(total)}" if total else ""
        state = "downloaded" if done else "downloading"
        print(f"{state} {label}: {_size(n)}{of} at {_size(rate)}/s", file=sys.stderr, flush=True)

    return line


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# --------------------------------------------------------------------------- verification


def _verify(remote: RemoteFile, path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise VerificationError(
                f"{remote.filename}: the server sent a Git LFS pointer, not the file; refused and not kept")
    if remote.size is not None and path.stat().st_size != remote.size:
        raise VerificationError(
            f"{remote.filename}: downloaded file has {path.stat().st_size} bytes, expected "
            f"{remote.size}; refused and not kept")
    if remote.sha256 is not None:
        digest = _sha256(path)
        if digest != remote.sha256:
            raise VerificationError(
                f"{remote.filename}: checksum differs (SHA-256 {digest}, expected "
                f"{remote.sha256}); refused and not kept")
    if remote.is_star_model:
        verify_star_checkpoint(path, remote.dataset or "", label=remote.filename)


_LFS_POINTER = b"version https://git-lfs"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def official_layout(dataset: str) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' published checkpoint for ``dataset`` and its shape, from our
    own network built with the official configuration (``ModelConfig()``) and that dataset's
    landmark definition (on the meta device: no memory, no initialisation)."""
    import torch

    from .config import ModelConfig
    from .definitions import get_definition
    from .models.hourglass import StackedHourglassNet

    with torch.device("meta"):
        model = StackedHourglassNet(ModelConfig(definition=dataset), get_definition(dataset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_star_checkpoint(path: str | os.PathLike, dataset: str, *, label: str | None = None) -> None:
    """Refuse (:class:`VerificationError`) anything but an official STAR checkpoint for
    ``dataset``: loaded with ``weights_only=True``, its weights (``net``, or a bare state
    dict) must have exactly :func:`official_layout`'s keys and shapes, all finite."""
    import torch

    from .models.checkpoint import CheckpointError, read_state_dict

    label = label or str(path)
    try:
        state, info = read_state_dict(path)
    except CheckpointError as exc:
        raise VerificationError(f"{label}: not a STAR checkpoint: {exc}; refused and not kept") from exc
    if info is not None:
        raise VerificationError(f"{label}: a staralign file, not the authors' checkpoint; refused and not kept")
    problem = _layout_difference(official_layout(dataset), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise VerificationError(
            f"{label}: not the official {dataset} STAR checkpoint ({problem}); refused and not kept")
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise VerificationError(f"{label}: key {key!r} holds NaN or infinite values; refused and not kept")


def _layout_difference(expected: dict[str, tuple], got: dict[str, tuple]) -> str | None:
    missing = sorted(set(expected) - set(got))
    if missing:
        return f"missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = sorted(set(got) - set(expected))
    if extra:
        return f"unexpected key {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    for key, shape in expected.items():
        if got[key] != shape:
            return f"key {key!r} has shape {list(got[key])}, expected {list(shape)}"
    return None
