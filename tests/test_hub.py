"""Named models and downloads: cache, mirror, offline, verification, Google Drive's confirmation.

Every download here comes from a local HTTP server on 127.0.0.1 (a thread); tests that must
not touch the network at all make any socket connection fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from staralign import hub
from staralign.cli import UserError, build_parser, main
from staralign.config import ModelConfig
from staralign.data.synth import render_face
from staralign.models import build_model, save_model

from .conftest import SHARED_MODELS_DIR, reference_path

YUNET = hub.FILES["yunet"]
WFLW = hub.FILES["wflw"]


# --------------------------------------------------------------------------- helpers


class LocalServer:
    """A tiny HTTP server on 127.0.0.1: ``routes[path](query, headers) -> (status, headers, body)``.

    A response header ``X-Cut: N`` is not sent; instead only the first N bytes of the body go
    out (with the full Content-Length) and the connection is closed: a dropped download.
    """

    def __init__(self) -> None:
        self.routes: dict = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                route = server.routes.get(urllib.parse.unquote(parts.path))
                if route is None:
                    self.send_error(404)
                    return
                status, headers, body = route(dict(urllib.parse.parse_qsl(parts.query)), self.headers)
                headers = dict(headers)
                cut = headers.pop("X-Cut", None)
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body if cut is None else body[:int(cut)])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve_file(self, name: str, body: bytes, **headers: str) -> None:
        self.routes[f"/{name}"] = lambda q, h: (200, {"Content-Type": "application/octet-stream", **headers}, body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed (conftest makes every test offline by default)."""
    monkeypatch.delenv("STARALIGN_OFFLINE", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def official_wflw(tmp_path_factory) -> bytes:
    """A file in the authors' format for WFLW (4 stacks, float16 tensors under 'net'), random weights."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), "WFLW").eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("official") / WFLW.filename
    torch.save({"net": state, "epoch": 0}, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    return save_model(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


def yunet_bytes() -> bytes:
    path = SHARED_MODELS_DIR / YUNET.filename
    if not path.is_file():
        pytest.skip(f"YuNet test file not available: {path} is absent")
    return path.read_bytes()


def cache_files() -> list[str]:
    folder = hub.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), render_face(np.random.default_rng(0), 160)[0])
    return path


# --------------------------------------------------------------------------- cache, names, settings


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STARALIGN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STARALIGN_CACHE")
    assert hub.cache_dir() == tmp_path / "xdg" / "staralign"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "staralign"


def test_cached_files_are_used_without_any_network(online, no_network):
    cache = hub.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for remote in hub.FILES.values():
        (cache / remote.filename).write_bytes(b"placed here by hand")
    for name, remote in hub.FILES.items():
        assert hub.fetch(name) == cache / remote.filename
    assert hub.resolve_weights(None) == cache / WFLW.filename
    assert hub.resolve_weights("COFW") == cache / hub.FILES["cofw"].filename


def test_resolve_weights_prefers_files_and_names_the_choices(tmp_path, monkeypatch):
    own = tmp_path / "wflw"  # a file whose name is also a model name: the file wins
    own.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_weights("wflw") == Path("wflw")
    with pytest.raises(UserError, match=r"no such weights file, and not a published model name.*wflw, 300w, cofw"):
        hub.resolve_weights(str(tmp_path / "missing.pkl"))
    with pytest.raises(UserError, match="unknown model name"):
        hub.fetch("nope")


def test_official_layout_is_the_published_one():
    truth = json.loads(reference_path("official_state_dict_layout.json").read_text())
    for dataset in ("WFLW", "300W", "COFW"):
        assert hub.official_layout(dataset) == {k: tuple(v) for k, v in truth[dataset].items()}


# --------------------------------------------------------------------------- downloads


def test_mirror_download_then_offline_use(server, online, monkeypatch, official_wflw):
    body = yunet_bytes()
    server.serve_file(YUNET.filename, body)
    server.serve_file(WFLW.filename, official_wflw)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url + "/")
    yunet_path, weights_path = hub.fetch("yunet"), hub.fetch("wflw", progress=False)
    assert yunet_path.read_bytes() == body and weights_path.read_bytes() == official_wflw
    assert cache_files() == sorted([YUNET.filename, WFLW.filename])  # no temporary files left
    served = len(server.requests)
    monkeypatch.delenv("STARALIGN_MIRROR")
    monkeypatch.setenv("STARALIGN_OFFLINE", "1")
    assert hub.fetch("yunet") == yunet_path and hub.resolve_weights(None) == weights_path
    assert len(server.requests) == served


def test_download_reports_progress_with_bytes_and_rate(server, online, monkeypatch, capsys):
    body = yunet_bytes()
    server.serve_file(YUNET.filename, body)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    hub.fetch("yunet")
    err = capsys.readouterr().err  # not a terminal: plain lines
    assert "downloaded face_detection_yunet_2026may.onnx: 224.4 KiB of 224.4 KiB at" in err and "/s" in err


def test_download_progress_follows_staralign_progress(server, online, monkeypatch, capsys, tmp_path):
    server.serve_file(YUNET.filename, yunet_bytes())
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    monkeypatch.setenv("STARALIGN_PROGRESS", "off")  # as for every other progress display
    hub.fetch("yunet")
    assert "download" not in capsys.readouterr().err


def test_truncated_download_leaves_nothing_that_looks_complete(server, online, monkeypatch, official_wflw):
    server.serve_file(WFLW.filename, official_wflw, **{"X-Cut": str(len(official_wflw) // 2)})
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    with pytest.raises(hub.Unavailable, match=r"closed after \d+ of \d+ bytes"):
        hub.fetch("wflw", progress=False)
    assert cache_files() == []


def test_partial_downloads_of_dead_processes_are_removed(server, online, monkeypatch):
    body = yunet_bytes()
    server.serve_file(YUNET.filename, body)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    cache = hub.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (cache / f".{YUNET.filename}.part{dead}").write_bytes(b"killed half way")
    (cache / f".{YUNET.filename}.part1").write_bytes(b"pid 1 is alive: another download, left alone")
    hub.fetch("yunet")
    assert cache_files() == sorted([YUNET.filename, f".{YUNET.filename}.part1"])


def test_truncated_download_without_length_is_refused_by_verification(server, online, monkeypatch):
    # No Content-Length to compare against: the file's own check (size, SHA-256) refuses it.
    body = hashlib.sha256(b"x").digest() * 100
    server.routes[f"/{YUNET.filename}"] = lambda q, h: (200, {"Content-Length": ""}, body)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    with pytest.raises(hub.VerificationError, match="expected 229738; refused and not kept"):
        hub.fetch("yunet")
    assert cache_files() == []


def test_a_git_lfs_pointer_is_named_and_not_kept(server, online, monkeypatch):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + YUNET.sha256.encode() + b"\nsize 229738\n"
    server.serve_file(YUNET.filename, pointer)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    with pytest.raises(hub.VerificationError, match="a Git LFS pointer, not the file"):
        hub.fetch("yunet")
    assert cache_files() == []


def test_yunet_with_another_checksum_is_refused_and_not_kept(server, online, monkeypatch):
    corrupt = bytes(np.random.default_rng(0).integers(0, 256, YUNET.size, dtype=np.uint8))
    server.serve_file(YUNET.filename, corrupt)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    with pytest.raises(hub.VerificationError, match="checksum differs"):
        hub.fetch("yunet")
    assert cache_files() == []
    rc = main(["models", "download", "yunet"])  # and through the CLI: exit 2, the same reason
    assert rc == 2 and cache_files() == []


@pytest.mark.parametrize("kind", ["small-network", "needs-pickle", "not-torch"])
def test_a_file_that_is_not_the_official_checkpoint_is_refused_and_deleted(server, online, monkeypatch,
                                                                          tmp_path, kind):
    path = tmp_path / "file.pkl"
    if kind == "small-network":  # a STAR network, but not the published one
        model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW")
        torch.save({"net": model.state_dict(), "epoch": 0}, path)
    elif kind == "needs-pickle":  # would run code if unpickled fully
        torch.save({"net": argparse.Namespace(weights=1)}, path)
    else:
        path.write_bytes(b"<not a checkpoint>" * 100)
    server.serve_file(WFLW.filename, path.read_bytes())
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    with pytest.raises(hub.VerificationError, match="refused and not kept"):
        hub.fetch("wflw", progress=False)
    assert cache_files() == []


def test_verification_checks_the_dataset_and_finite_values(tmp_path, official_wflw):
    path = tmp_path / "w.pkl"
    path.write_bytes(official_wflw)
    hub.verify_star_checkpoint(path, "WFLW")
    with pytest.raises(hub.VerificationError, match="not the official 300W STAR checkpoint"):
        hub.verify_star_checkpoint(path, "300W")
    state = torch.load(path, weights_only=True)
    state["net"]["pre.0.conv.bias"][3] = float("nan")
    torch.save(state, path)
    with pytest.raises(hub.VerificationError, match="'pre.0.conv.bias' holds NaN"):
        hub.verify_star_checkpoint(path, "WFLW")


# --------------------------------------------------------------------------- Google Drive


def _drive(monkeypatch, server: LocalServer, body: bytes) -> None:
    """Point 'yunet' at a Google-Drive-like address on the local server, expecting ``body``."""
    remote = dataclasses.replace(YUNET, url=f"{server.url}/uc?export=download&id=FILEID", size=len(body),
                                 sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(hub.FILES, "yunet", remote)


@pytest.mark.parametrize("style", ["form", "link", "cookie"])
def test_google_drive_confirmation_page_is_followed(server, online, monkeypatch, style):
    body = bytes(range(256)) * 512
    _drive(monkeypatch, server, body)
    html = {"Content-Type": "text/html; charset=utf-8"}

    def uc(query, headers):
        if style == "form":  # today's page: a form to another host's /download
            page = ('<html><head><title>Google Drive - Virus scan warning</title></head><body>'
                    '<form id="download-form" action="/download" method="get">'
                    '<input type="submit" value="Download anyway"/>'
                    '<input type="hidden" name="id" value="FILEID">'
                    '<input type="hidden" name="export" value="download">'
                    '<input type="hidden" name="confirm" value="t">'
                    '<input type="hidden" name="uuid" value="u-1"></form></body></html>')
            return 200, html, page.encode()
        if query.get("confirm") == "TOKEN" and (style == "link" or "download_warning" in headers.get("Cookie", "")):
            return 200, {"Content-Type": "application/octet-stream"}, body
        if style == "link":
            page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=TOKEN&amp;id=FILEID">Download</a>'
            return 200, html, page.encode()
        return 200, {**html, "Set-Cookie": "download_warning_13058876669334088843=TOKEN; Path=/"}, b"<p>large file</p>"

    def download(query, headers):
        ok = query == {"id": "FILEID", "export": "download", "confirm": "t", "uuid": "u-1"}
        return (200, {"Content-Type": "application/octet-stream"}, body) if ok else (403, {}, b"no")

    server.routes["/uc"] = uc
    server.routes["/download"] = download
    assert hub.fetch("yunet").read_bytes() == body
    assert len(server.requests) == 2 and cache_files() == [YUNET.filename]


def test_google_drive_page_without_a_way_through_is_a_clear_error(server, online, monkeypatch):
    _drive(monkeypatch, server, b"whatever")
    page = b"<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"
    server.routes["/uc"] = lambda q, h: (200, {"Content-Type": "text/html"}, page)
    with pytest.raises(hub.Unavailable, match=r"answered with a web page, not the file \(Google Drive - "
                                              r"Quota exceeded\)\); get it from .* and put it at"):
        hub.fetch("yunet")
    assert cache_files() == []


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("command", [
    ["predict", "{photo}"],
    ["serve"],
    ["export", "--onnx", "{tmp}/m.onnx"],
    ["test", "--test-file", "{tmp}/test.tsv"],
])
def test_offline_with_an_empty_cache_is_one_line_exit_2(tmp_path, capsys, command):
    args = [a.format(photo=photo(tmp_path), tmp=tmp_path) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    target = hub.cache_dir() / WFLW.filename
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"staralign {command[0]}: error: {WFLW.filename} is not cached and cannot be downloaded")
    assert f"get it from {WFLW.page} and put it at {target}" in err
    assert not (tmp_path / "m.onnx").exists()


def test_weights_is_optional_everywhere_a_model_is_read():
    parser = build_parser()
    for args in (["predict", "x.jpg"], ["serve"], ["export", "--onnx", "m.onnx"], ["test", "--test-file", "t"]):
        assert parser.parse_args(args).weights is None


def test_models_lists_names_files_and_cache_state(capsys, tmp_path):
    (hub.cache_dir()).mkdir(parents=True, exist_ok=True)
    (hub.cache_dir() / YUNET.filename).write_bytes(b"\0" * 2048)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, remote in hub.FILES.items():
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert remote.filename in line
        assert re.search(r"\s(yes|no)\s", line).group(1) == ("yes" if name == "yunet" else "no")
    assert f"cache: {hub.cache_dir()}" in out and WFLW.page in out
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["cache"] == str(hub.cache_dir()) and listed["offline"] is True
    rows = {r["name"]: r for r in listed["models"]}
    assert rows["yunet"]["cached"] and rows["yunet"]["size"] == 2048
    assert not rows["wflw"]["cached"] and rows["wflw"]["size"] is None


def test_models_download_fetches_into_the_cache(server, online, monkeypatch, capsys):
    body = yunet_bytes()
    server.serve_file(YUNET.filename, body)
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    assert main(["models", "download", "yunet"]) == 0
    assert f"yunet: {hub.cache_dir() / YUNET.filename}" in capsys.readouterr().out
    assert cache_files() == [YUNET.filename]
    assert main(["models", "download", "yunet", "bogus"]) == 2
    assert "unknown name 'bogus'" in capsys.readouterr().err


@pytest.mark.slow  # two runs of the full-size 4-stack network: 16 s on the shared 2-core VM (load 13)
def test_predict_downloads_from_a_mirror_then_runs_offline(tmp_path, server, online, monkeypatch, capsys,
                                                          official_wflw):
    # As a new user runs it: no --weights, the default face detector. First through a mirror
    # (both files downloaded), then offline with every network connection refused.
    yunet = SHARED_MODELS_DIR / YUNET.filename
    server.serve_file(WFLW.filename, official_wflw)
    if yunet.is_file():
        server.serve_file(YUNET.filename, yunet.read_bytes())
    monkeypatch.setenv("STARALIGN_MIRROR", server.url)
    image, out = photo(tmp_path), tmp_path / "faces.json"
    for online_run in (True, False):
        if not online_run:
            monkeypatch.delenv("STARALIGN_MIRROR")
            monkeypatch.setenv("STARALIGN_OFFLINE", "1")
            refuse = lambda *a, **k: pytest.fail("network access attempted")  # noqa: E731
            monkeypatch.setattr(socket.socket, "connect", refuse)
        capsys.readouterr()
        assert main(["predict", str(image), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["weights"] == str(hub.cache_dir() / WFLW.filename) and report["num_points"] == 98
        assert all(len(face["landmarks"]) == 98 for face in report["inputs"][0]["faces"])
        if yunet.is_file():  # the detector's file came the same way (no fallback to Haar)
            assert report["detector"] == "yunet" and "warning" not in capsys.readouterr().err
    assert cache_files() == sorted([WFLW.filename] + ([YUNET.filename] if yunet.is_file() else []))


def test_from_pretrained_reads_the_cache(tiny_weights, no_network):
    from staralign.inference.detector import LandmarkDetector

    cache = hub.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / WFLW.filename).write_bytes(tiny_weights.read_bytes())
    det = LandmarkDetector.from_pretrained(detector="none", device="cpu")
    assert det.definition.name == "WFLW"
    with pytest.raises(hub.Unavailable, match="300W_STARLoss_NME_2_87.pkl is not cached"):
        LandmarkDetector.from_pretrained("300w")


def test_hub_and_models_command_import_neither_torch_nor_numpy():
    code = ("import sys, staralign.hub, staralign.hub_cli; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_progress_on_a_terminal_is_a_tqdm_bar_with_bytes_and_rate(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    report = hub._progress(3 * 2**20, "file.bin")
    for n in (2**20, 2 * 2**20, 3 * 2**20):
        report(n)
    report(3 * 2**20, done=True)
    shown = terminal.getvalue()
    assert "downloading file.bin" in shown and "3.00M/3.00M" in shown and "B/s" in shown
