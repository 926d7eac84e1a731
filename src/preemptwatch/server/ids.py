"""Run IDs and file names: normalisation and validation shared by server and client."""

from __future__ import annotations

import re
import secrets
import string

from ..errors import BadRequest

MAX_RUN_ID = 64
MAX_FILE_NAME = 255
_NON_WORD = re.compile(r"[^\w]")
_ALPHABET = string.ascii_lowercase + string.digits
_NAME_PART = re.compile(r"^[A-Za-z0-9_.\-+=@]+$")


def normalize_run_id(raw: str, *, field: str = "id") -> str:
    """Turn every non-word character into a dash; refuse empty or over-long results."""
    run_id = _NON_WORD.sub("-", raw)
    if not run_id:
        raise BadRequest(f"{field}: a run ID must not be empty", field=field)
    if len(run_id) > MAX_RUN_ID:
        raise BadRequest(
            f"{field}: run ID {run_id[:80]!r} is {len(run_id)} characters; the limit is "
            f"{MAX_RUN_ID}",
            field=field,
        )
    return run_id


def generate_run_id() -> str:
    """A fresh run ID: 8 lowercase letters and digits."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(8))


def check_file_name(name: str) -> str:
    """A checkpoint file name: ``/``-separated parts of letters, digits and ``_.-+=@``,
    never ``.`` or ``..`` (no path traversal), at most 255 characters."""
    problem = None
    if not name:
        problem = "must not be empty"
    elif len(name) > MAX_FILE_NAME:
        problem = f"is {len(name)} characters; the limit is {MAX_FILE_NAME}"
    else:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                problem = "must not be absolute or contain empty, '.' or '..' parts"
                break
            if not _NAME_PART.match(part):
                problem = "may only contain letters, digits, '/' and '_.-+=@'"
                break
    if problem:
        raise BadRequest(f"file name {name[:300]!r} {problem}", field="name")
    return name
