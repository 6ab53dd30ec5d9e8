"""Files that are what they claim: atomic writes, artifacts committed by a checksummed manifest written last, and
input paths in YAML files resolved next to the YAML."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from ditquant import interrupt
from ditquant.errors import UserError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename. The
    temporary name is fixed per target, so a write killed by SIGKILL leaves at most one ``<name>.tmp`` that the next
    write of the same file replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        # a plain file's permissions: some writers (safetensors) create their file owner-only
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the ``*.tmp`` files ``atomic_write`` leaves when a write is SIGKILLed (any other stop cleans up)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def committed_folder(folder: str | Path, files: tuple[str, ...]) -> Iterator[Path]:
    """Write an artifact's ``files`` into ``folder``; the artifact counts as written only once ``manifest.json``
    (their SHA-256 sums) is renamed into place, last. The old manifest goes first, so a write killed half-way leaves
    a folder that ``verify_folder`` refuses, never a mix of old and new files that passes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    yield folder
    interrupt.check()  # a stop requested while writing leaves the artifact uncommitted
    sums = {name: file_sha256(folder / name) for name in files}
    with atomic_write(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"files": sums}, indent=1) + "\n")


def verify_folder(folder: str | Path, files: tuple[str, ...], option: str) -> None:
    """Refuse an artifact folder whose manifest is missing (never committed: its write was interrupted) or whose
    files differ from it (edited, truncated, or half-replaced)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{option}: {folder} is incomplete (no {MANIFEST}: the run that wrote it was interrupted, or "
                        "it predates checksummed artifacts); write it again")
    try:
        sums = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{option}: {manifest} is damaged; write the folder again") from None
    for name in files:
        if not (folder / name).is_file():
            raise UserError(f"{option}: {folder / name} is missing")
        if sums.get(name) != file_sha256(folder / name):
            raise UserError(f"{option}: {folder / name} does not match its checksum in {MANIFEST} (changed or "
                            "damaged after it was written); write the folder again")


class InputPath(str):
    """An input path option (model source, VAE, a saved model): relative paths given in a YAML file are looked up
    next to that YAML first (the CLI registers ``resolve_input_path`` with jsonargparse)."""


def resolve_input_path(value: str) -> str:
    """jsonargparse deserializer of ``InputPath``: inside a config file, ``value`` relative to that file's folder if
    something exists there; otherwise unchanged (a path relative to the working directory, a hub id, ``bundled``)."""
    from jsonargparse._paths import _current_path_dir  # the folder of the config file being parsed, if any

    base = _current_path_dir.get()
    if isinstance(value, str) and value and base and not os.path.isabs(value) and not value.startswith("~"):
        candidate = Path(base) / value
        if candidate.exists():
            return str(candidate)
    return value


def check_writable_dir(path: Path, option: str) -> None:
    """An output folder that is a file, or that could not be created or written, is an error before any work
    (nothing is created here: a run that fails its checks leaves no trace)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option}: {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option}: cannot create {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option}: {existing} is not writable")


def check_same(saved: dict, expected: dict, where: str) -> None:
    """Refuse ``saved`` (what an artifact or checkpoint was made with) unless it equals ``expected`` (what this
    command is configured with), naming the first differing option by its path, e.g. ``model.quant.weight.bits``."""
    def first_difference(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(b) + [k for k in a if k not in b]:
                found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
                if found:
                    return found
            return None
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                if found := first_difference(x, y, f"{path}[{i}]"):
                    return found
            return None
        return None if a == b else (path, a, b)

    found = first_difference(saved, expected, "")
    if found:
        path, a, b = found
        parts = path.split("[")[0].split(".")
        what = parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]  # model.quant... -> quant
        raise UserError(f"{where} was made for a different {what}: {path} is {a!r} there but {b!r} in this "
                        "command's config; use the config it was made with, or make a new one")


def yaml_plain(obj):
    """Tuples as lists, recursively: what a header looks like after a round trip through a checkpoint."""
    if isinstance(obj, dict):
        return {k: yaml_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [yaml_plain(v) for v in obj]
    return obj
