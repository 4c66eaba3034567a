"""Where work runs and writes: device names and output folders, checked before any work
starts (shared by the CLI and the library, so no core module imports the CLI)."""
from __future__ import annotations

import contextlib

from .errors import DisconError

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(value, *, what: str = "--device"):
    """auto|cpu|cuda|cuda:N (or a torch.device) -> torch.device; a clear error when the device
    does not exist here, before any work starts."""
    import torch

    if value is None or str(value) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DisconError(f"{what} {value!r}: expected {DEVICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DisconError(f"{what} {value!r}: expected {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DisconError(f"{what} {value}: CUDA is not available on this machine; use "
                              f"{what} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DisconError(f"{what} {value}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_output_dir(path, *, what: str = "--out"):
    """``path`` as a writable folder (created if needed), checked before any work starts."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DisconError(f"{what} {path} is an existing file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DisconError(f"{what} {path} is not a writable folder: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def output_dir(path, *, what: str = "--out"):
    """:func:`check_output_dir` for the span of a command: a folder it created is removed again
    when the command fails before writing anything into it (a failed run leaves nothing)."""
    from pathlib import Path

    created = not Path(path).exists()
    out = check_output_dir(path, what=what)
    try:
        yield out
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
