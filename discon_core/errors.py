"""The one exception type that discon raises for bad input.

The CLI prints a DisconError as a single line (no traceback unless --debug); anything
else escaping the CLI is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DisconError(Exception):
    """Bad input or a failed precondition, with an actionable message."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest names, or '' when nothing is close."""
    found = difflib.get_close_matches(word, sorted(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
