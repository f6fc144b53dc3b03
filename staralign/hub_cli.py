"""``staralign models``: the published files the project can download, and pre-fetching them.

``staralign models`` lists every name with its file, size and whether it is in the cache
(and the cache folder); ``staralign models download NAME...`` fetches them now, for
container builds and machines that go offline later.  The rules live in :mod:`staralign.hub`.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register", "run_models"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models`` (and ``models download``) to the ``staralign`` parser."""
    from .hub import FILES

    p = subparsers.add_parser(
        "models", help="list the published models and detector files, download them ahead of use",
        description="List the named files staralign downloads on first use (the authors' STAR weights, the "
                    "YuNet face detector): file, size, whether cached, where from. Cache folder: "
                    "$STARALIGN_CACHE, else $XDG_CACHE_HOME/staralign, else ~/.cache/staralign; "
                    "STARALIGN_MIRROR=URL fetches URL/<file>; STARALIGN_OFFLINE=1 never downloads.")
    p.add_argument("--json", action="store_true", help="print the list as JSON on standard output")
    p.set_defaults(func=run_models, action=None)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    d = sub.add_parser("download", help="download and verify named files into the cache now",
                       description="Download and verify the named files into the cache (files already "
                                   "there are kept as they are).")
    d.add_argument("names", nargs="*", metavar="NAME",
                   help=f"names to fetch: {', '.join(FILES)}, or 'all' (default: wflw and yunet, what "
                        "'staralign predict' needs)")
    d.set_defaults(func=run_download)


def _rows() -> list[dict]:
    from .hub import FILES, cache_dir

    rows = []
    for name, remote in FILES.items():
        path = cache_dir() / remote.filename
        cached = path.is_file()
        rows.append({
            "name": name,
            "file": remote.filename,
            "size": path.stat().st_size if cached else remote.size,
            "cached": cached,
            "path": str(path),
            "source": remote.page,
            "sha256": remote.sha256,
            "description": remote.description,
        })
    return rows


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def run_models(args: argparse.Namespace) -> int:
    """``staralign models``: the table (or JSON) of named files."""
    from .hub import DEFAULT_MODEL, cache_dir, is_offline

    rows = _rows()
    if args.json:
        json.dump({"cache": str(cache_dir()), "offline": is_offline(), "models": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max(len(r["file"]) for r in rows)
    print(f"{'name':<6} {'file':<{width}} {'size':>9}  cached  description")
    for r in rows:
        default = " (default)" if r["name"] == DEFAULT_MODEL else ""
        print(f"{r['name']:<6} {r['file']:<{width}} {_size(r['size']):>9}  {'yes' if r['cached'] else 'no':<6}  "
              f"{r['description']}{default}")
    print(f"cache: {cache_dir()}" + ("  (STARALIGN_OFFLINE: no downloads)" if is_offline() else ""))
    print("where they come from (the STAR files are the authors' release, github.com/ZhenglinZhou/STAR):")
    for r in rows:
        print(f"  {r['name']:<6} {r['source']}")
    if any(r["size"] is None for r in rows):
        print("sizes marked ? are not published upstream; they show once the file is cached")
    return 0


def run_download(args: argparse.Namespace) -> int:
    """``staralign models download``: fetch and verify each named file into the cache."""
    from .cli import UserError
    from .hub import DEFAULT_MODEL, FILES, fetch

    names = [n.strip().lower() for n in args.names] or [DEFAULT_MODEL, "yunet"]
    if "all" in names:
        names = list(FILES)
    unknown = [n for n in names if n not in FILES]
    if unknown:
        raise UserError(f"unknown name {unknown[0]!r}: known names are {', '.join(FILES)} (or 'all')")
    for name in dict.fromkeys(names):
        path = fetch(name)
        print(f"{name}: {path} ({_size(path.stat().st_size)})")
    return 0
