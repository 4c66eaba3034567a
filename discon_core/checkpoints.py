"""Checkpoint I/O in one place: safe loading, official-format unwrapping, strict key
reports, atomic saving, and downloads (the Hugging Face Hub client or a URL) with sha256
verification, trust on first use, and provenance records.

Nothing here unpickles arbitrary objects: ``.pt/.pth/.bin/.ckpt`` files go through
``torch.load(weights_only=True)`` with a narrow allow-list of harmless non-tensor objects that
official files carry (``argparse.Namespace`` in MAR's training checkpoints); ``.safetensors``
through safetensors.

How a component steers loading (plain class attributes, all optional):

* ``checkpoint_prefix``: take only keys under this prefix and strip it (MAR's head lives under
  ``diffloss.`` in the same file as the backbone);
* ``checkpoint_drop``: named prefixes of keys that official files carry for training only
  (VA-VAE's ``loss.``, ``foundation_model.``, ``linear_proj.``); dropped deliberately, never by
  ``strict=False``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import one_line, read_json
from .errors import DisconError

HOME_ENV = "DISCON_HOME"
SAFE_GLOBALS = [argparse.Namespace]
# Official wrappers, in order of preference: the EMA weights win where a file holds both.
WRAPPER_KEYS = ("model_ema", "model", "state_dict", "module")
MAX_LISTED = 12


def discon_home() -> Path:
    """Cache root: ``$DISCON_HOME`` or ``~/.cache/discon``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "discon")


def portable(obj: Any) -> Any:
    """``obj`` (a result: dicts, lists, strings) with every path under the cache root written
    as ``$DISCON_HOME/...``: results kept in git carry no path of the machine that made them."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    home = str(discon_home())
    if isinstance(obj, str) and (obj == home or obj.startswith(home + os.sep)):
        return "$" + HOME_ENV + obj[len(home):]
    return obj


def load_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely; every failure is a DisconError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DisconError(f"checkpoint {path} is a directory, expected a checkpoint file")
    if not path.is_file():
        raise DisconError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise DisconError(f"checkpoint {path} is empty (0 bytes): re-download or re-save it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as st_load
        try:
            return st_load(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise DisconError(f"checkpoint {path} is not a readable safetensors file "
                              f"(corrupt or truncated?): {e}") from None
    corrupt = (f"checkpoint {path} is not a checkpoint torch can read: corrupt, truncated or "
               "another kind of file; re-download or re-save it")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        raise DisconError(f"checkpoint {path} is truncated or corrupt (a damaged zip archive); "
                          "re-download or re-save it")
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip nor its legacy pickle
        raise DisconError(corrupt)
    try:
        # torch warns (and advises weights_only=False) before the refusal below: never repeat that
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files; classify them
        msg = str(e)
        pickled = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5
        if "Unsupported global" in msg or (pickled and "Weights only load failed" in msg):
            detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln),
                          "unsupported pickle content")
            raise DisconError(
                f"refused to unpickle {path}: it is not a plain tensor checkpoint (tensors, "
                f"containers, argparse.Namespace): {detail}. Nothing in it was executed. If you "
                "trust the file, re-save just its tensors: torch.save(obj['state_dict'], "
                "'clean.pth')"
            ) from None
        if "zip archive" in msg or "central directory" in msg or isinstance(e, EOFError):
            raise DisconError(f"checkpoint {path} is truncated or corrupt ({msg.splitlines()[0]});"
                              " re-download or re-save it") from None
        raise DisconError(corrupt) from None


def check_finite(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse NaN/inf weights at load, naming the first tensors (they would sample black or
    crash far from the cause)."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and v.device.type != "meta" and not bool(torch.isfinite(v).all())]
    if bad:
        raise DisconError(f"checkpoint {path} holds non-finite values (NaN/inf) in {len(bad)} "
                          f"tensor(s): {_listing(bad)}; it is corrupt or from a diverged run")


def unwrap(obj: Any, path: str | os.PathLike = "<memory>") -> dict[str, torch.Tensor]:
    """The state dict inside an official file: plain, ``{'model'}``, ``{'model','model_ema'}``
    (EMA used), Lightning ``{'state_dict'}``."""
    if not isinstance(obj, Mapping):
        raise DisconError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DisconError(f"checkpoint {path} holds no tensors at the top level nor under any of "
                          f"{', '.join(WRAPPER_KEYS)}; top-level keys: "
                          f"{', '.join(map(str, list(obj)[:MAX_LISTED]))}")
    if len(tensors) != len(obj):
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise DisconError(f"checkpoint {path} mixes tensors with other entries "
                          f"({', '.join(map(str, others[:MAX_LISTED]))}); not a state dict")
    return tensors


def select(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the module's ``checkpoint_prefix`` and ``checkpoint_drop`` to a state dict."""
    prefix = getattr(module, "checkpoint_prefix", "")
    drop = tuple(getattr(module, "checkpoint_drop", ()))
    out = {}
    for key, value in state.items():
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        if drop and key.startswith(drop):
            continue
        out[key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def key_report(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``module`` exactly, else a readable list of what does not."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): {_listing(misshaped)}")
    return "\n".join(lines)


def load_into(module: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a checkpoint file strictly into ``module`` (after prefix selection and drop-lists)."""
    state = select(module, unwrap(load_file(path), path))
    check_finite(state, path)
    report = key_report(module, state)
    if report:
        prefix = getattr(module, "checkpoint_prefix", "")
        note = f" (keys under {prefix!r})" if prefix else ""
        raise DisconError(f"checkpoint {path} does not fit {type(module).__name__}{note}:\n"
                          f"{report}")
    module.load_state_dict(state, strict=True)
    return module


def file_target(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_path` writes ``path``: itself, or the regular file a symlink points to
    (replacing the link would cut it from its file); refuses anything else standing there."""
    path = Path(path)
    if path.is_symlink() and path.resolve().is_file():
        path = path.resolve()
    if os.path.lexists(path) and not path.is_file():
        raise DisconError(f"{path} exists and is not a regular file (a device, folder, FIFO or "
                          "broken link): refusing to replace it; give a file path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``: write to it in the ``with`` block; on success it is
    fsynced and renamed over ``path``, on any failure it is removed. A crash or a full disk
    therefore leaves the previous file at ``path`` intact. Only a regular file is replaced
    (through a symlink: the file it points to); anything else standing there (a device such as
    /dev/full, a folder, a FIFO) is refused, never replaced."""
    path = file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | os.PathLike,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``obj`` through :func:`atomic_path`, by the suffix of ``path``: ``.json`` (numbers
    such as numpy floats as floats), ``.safetensors`` (a dict of tensors, with ``metadata``),
    ``.npz`` (a dict of arrays), anything else ``torch.save``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(obj, indent=1, default=_json_value))
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in obj.items()}, str(tmp), metadata=metadata)
        elif path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **obj)
        else:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
    return path


def _json_value(obj: Any) -> Any:
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str,
                  fix: str = "delete it and run again to download it afresh",
                  got: str | None = None) -> str:
    """The sha256 of ``path`` (``got`` where already known), refused unless it is ``expected``
    (None: any) in one line naming ``what`` (the file), both digests and ``fix``."""
    got = got or sha256_of(path)
    if expected is not None and got != expected.lower():
        raise DisconError(f"{what} is corrupted: sha256 {got}, expected {expected}; {fix}")
    return got


def download(url: str, dest: str | os.PathLike, sha256: str | None = None,
             progress: bool = True, what: str = "download") -> Path:
    """Fetch ``url`` (http(s) or file://) to ``dest``: temp file, sha256 check, atomic rename.

    On a checksum mismatch the download is deleted and the error gives expected vs got.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DisconError(f"{what}: cannot download {url} to {dest}: "
                          f"{getattr(e, 'reason', e)}") from None
    with atomic_path(dest) as tmp:
        with response, open(tmp, "wb") as out, tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                unit_scale=True, desc=dest.name, disable=not progress) as bar:
            while block := response.read(1 << 20):
                bar.update(out.write(block))
        verify_sha256(tmp, sha256, f"{what}: {url}", "the download was deleted")
    return dest


PACKAGE_SCHEME = "package:"


def package_file(url: str, sha256: str | None = None, what: str = "file") -> Path:
    """A file shipped inside an installed package, ``package:PKG/REL/PATH``, verified against
    ``sha256`` at every use (the embedded default weights: a few MB, milliseconds to hash)."""
    import importlib.util
    pkg, _, rel = url[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(pkg) if pkg else None
    if spec is None or not spec.submodule_search_locations or not rel:
        raise DisconError(f"{what}: {url} names no installed package file (package:PKG/PATH)")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise DisconError(f"{what}: embedded file {path} is missing; reinstall discon "
                          "(pip install -e .)")
    if sha256 is not None:
        verify_sha256(path, sha256, f"{what}: embedded file {path}",
                      "reinstall discon or re-export it")
    return path


OFFLINE_ENV = ("HF_HUB_OFFLINE", "DISCON_OFFLINE")  # read at each fetch (the Hub client: at import)
HF_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
HASHES = "hashes.json"  # under $DISCON_HOME/checkpoints: the trust-on-first-use record
_ORIGINS: dict[Path, dict] = {}  # provenance of each file fetch() handed out in this process


def cache_path(file: str, what: str) -> Path:
    """``$DISCON_HOME/checkpoints/<file>``; a ``file`` that would land outside it is refused."""
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise DisconError(f"{what} must be a relative path inside $DISCON_HOME/checkpoints "
                          f"(no '..', not absolute), got {file!r}")
    return discon_home() / "checkpoints" / file


def _trusted(path: Path, expected: str | None, what: str, source: str | None,
             revision: str | None) -> Path:
    """Trust on first use: a cached file's sha256 is recorded (with its source and revision) in
    ``$DISCON_HOME/checkpoints/hashes.json`` the first time; every use checks it against
    ``expected`` (the registry's) or else the record. The check is cached by (size, mtime_ns):
    an unchanged file costs a stat, not a hash."""
    home = discon_home()
    book = home / "checkpoints" / HASHES
    records = read_json(book, "checksum record") if book.is_file() else {}
    key, st = os.path.relpath(path, home), path.stat()
    rec, stamp = records.get(key, {}), [st.st_size, st.st_mtime_ns]
    if home / "hub" in path.parents:  # hub/models--ORG--NAME/snapshots/COMMIT/...: the commit
        revision = path.relative_to(home / "hub").parts[2]
    got = verify_sha256(path, expected or rec.get("sha256"), f"{what}: {path}",
                        f"delete {path.resolve()} and run again to download it afresh",
                        got=rec["sha256"] if rec.get("stamp") == stamp else None)
    new = {"sha256": got, "stamp": stamp, "source": source, "revision": revision}
    if rec != new:
        with contextlib.suppress(OSError):  # a read-only shared cache: hashed again next time
            save_atomic({**records, key: new}, book)
    _ORIGINS[path] = {"file": portable(str(path)), "sha256": got, "revision": revision,
                      "source": source}
    return path


def provenance(path: str | os.PathLike | None) -> dict | None:
    """What sample.json (and a saved pipeline) records of a component's weights: None (random
    init), {file, sha256, revision, source} for released weights (a file :func:`fetch` handed out
    in this process; ``file`` as ``$DISCON_HOME/...`` or ``package:...``, so a shared record
    names no path of this machine), else {file, sha256} (a local checkpoint, as given)."""
    if path is None:
        return None
    return dict(_ORIGINS.get(Path(path)) or {"file": str(path), "sha256": sha256_of(path)})


def _hub(repo: str, filename: str, revision: str | None, what: str, local: bool) -> Path | None:
    """``filename`` of the Hub repo ``repo`` through the Hub client (resumable, ``HF_TOKEN``),
    cached in ``$DISCON_HOME/hub``; ``local``: from that cache only (None where it is not)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local,
                                    cache_dir=discon_home() / "hub"))
    except Exception as e:  # the client raises many types (HTTP, auth, validation, cache)
        if local and isinstance(e, LocalEntryNotFoundError):
            return None
        raise DisconError(f"{what}: cannot download {filename} from the Hub repo {repo} "
                          f"(revision {revision or 'main'}): {one_line(e)}") from None


def fetch(file: str, url: str | None = None, sha256: str | None = None,
          what: str = "file", check_only: bool = False, *, repo: str | None = None,
          filename: str | None = None, revision: str | None = None) -> Path | None:
    """A cached file: ``$DISCON_HOME/checkpoints/<file>`` (a file you put there is used as is),
    else ``filename`` of the Hub ``repo`` at ``revision`` (cached in ``$DISCON_HOME/hub``; a
    ``https://huggingface.co/.../resolve/...`` ``url`` counts as one), else ``url`` downloaded to
    ``<file>``; ``package:`` URLs are files inside an installed package (checked, never copied).
    Every file passes the sha256 check of :func:`_trusted`. With ``check_only`` nothing is
    downloaded: it checks that the file is here or can be downloaded (None: not here yet)."""
    if url is not None and url.startswith(PACKAGE_SCHEME):
        path = package_file(url, sha256, what)
        _ORIGINS[path] = {"file": url, "sha256": sha256 or sha256_of(path),
                          "revision": None, "source": url}
        return path
    dest = cache_path(file, f"{what}: file")
    if hub := HF_URL.fullmatch(url or ""):
        repo, revision, filename = hub.groups()
    source = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filename}" if repo \
        else url

    def cached() -> Path | None:
        return dest if dest.is_file() else _hub(repo, filename, revision, what, True) if repo \
            else None

    def get(download_ok: bool) -> Path | None:
        if (path := cached()) is None:
            if url is None and repo is None:
                raise DisconError(f"{what}: expected file {dest} is missing and no download URL "
                                  "is known; put the file there or pass its path")
            if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_ENV):
                raise DisconError(f"{what}: {filename or dest.name} is not cached and downloads "
                                  f"are off ({' or '.join(OFFLINE_ENV)} is set): run once with "
                                  f"network, or put the file at {dest}")
            if not download_ok:
                return None
            path = (_hub(repo, filename, revision, what, False) if repo
                    else download(url, dest, sha256, what=what))
        return _trusted(path, sha256, what, source, revision)

    dist = torch.distributed
    if check_only or not (dist.is_available() and dist.is_initialized()):
        return get(not check_only)
    # Under torchrun, local rank 0 of each node fetches first while the others wait; every rank
    # passes both barriers whatever its cache holds, so that the calls always pair up.
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if not first:
        dist.barrier()
    try:
        if first:
            return get(True)
    finally:  # also when rank 0 failed: the others then try, and say why
        if first:
            dist.barrier()
    return get(True)


def fetch_preset_checkpoint(preset, check_only: bool = False) -> Path | None:
    """The local path of a preset's official weights (downloaded on first use); ``check_only``
    as in :func:`fetch` (a pipeline checks every preset this way before loading any)."""
    src = preset.checkpoint
    what = f"{preset.kind} preset {preset.name!r}"
    if src is None:
        raise DisconError(f"{what} has no published checkpoint; train one with `discon train` "
                          f"and pass its path (--{preset.kind}-checkpoint PATH)")
    try:
        return fetch(src.file, src.url, src.sha256, what=what, check_only=check_only,
                     repo=src.repo, filename=src.filename, revision=src.revision)
    except DisconError as e:
        where = f" (get it from {src.url})" if src.url else (f" ({src.note})" if src.note else "")
        raise DisconError(f"{e}{where}") from None
