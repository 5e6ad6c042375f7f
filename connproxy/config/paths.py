"""The rules for host names and URL paths that both the configuration (virtual hosts, resource paths) and the
connector's access decision (:mod:`connproxy.connector.acl`, per stream) apply, so that the two never disagree.

They live here because the configuration may not import the connector (layering), and a resource path is judged
by the same rule as a requested path.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Final
from urllib.parse import unquote

__all__ = ["normalize_host", "path_problem"]

#: Non-standard escapes some servers decode: IIS ``%uXXXX``, overlong UTF-8 (``%c0``/``%c1`` two-byte forms,
#: ``%e0%80``-``%e0%9f`` three-byte and ``%f0%80``-``%f0%8f`` four-byte forms) that a lax decoder turns into
#: ``.`` or ``/``.
_ODD_ENCODINGS: Final = re.compile(r"%u[0-9a-f]{4}|%c[01]|%e0%[89][0-9a-f]|%f0%8[0-9a-f]", re.IGNORECASE)
_SEPARATORS: Final = re.compile(r"[/\\]")
#: Decodings tried before a path that still changes is refused (a backend may decode more than once).
_MAX_DECODINGS: Final = 4


def normalize_host(host: str) -> str:
    """Canonical form for comparing virtual hosts: IP literals compressed and without brackets, names lower-case
    without a trailing dot."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = host.lower()
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def _dot_segment(text: str) -> bool:
    return any(segment.split(";", 1)[0] in (".", "..") for segment in _SEPARATORS.split(text))


def path_problem(path: str) -> str | None:
    """Why the URL path ``path`` (without query) could lead a backend out of an allowed subtree, or ``None``.

    Refused: ``.`` and ``..`` segments, also behind ``\\`` or before ``;params``, also percent-encoded (decoded
    up to four times, since a backend may decode twice; a path still changing after that is refused), also after
    Unicode NFKC normalisation of what the escapes decode to (``%ef%bc%8e`` is FULLWIDTH FULL STOP, ``%e2%80%a5``
    TWO DOT LEADER: a backend that normalises Unicode reads them as ``.`` and ``..``), and the non-standard
    ``%uXXXX`` and overlong UTF-8 escapes some servers decode.
    """
    if _ODD_ENCODINGS.search(path):
        return "contains a non-standard or overlong escape (%uXXXX, %c0, %c1, ...)"
    candidate = path
    for _ in range(_MAX_DECODINGS):
        normal = candidate if candidate.isascii() else unicodedata.normalize("NFKC", candidate)
        if _dot_segment(candidate) or (normal is not candidate and _dot_segment(normal)):
            return "contains a '.' or '..' segment (also percent-encoded or Unicode-normalised)"
        decoded = unquote(normal)
        if decoded == candidate:
            return None
        candidate = decoded
    return "is still changing after four percent-decodings"
