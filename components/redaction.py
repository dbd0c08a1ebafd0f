"""Keeping credentials out of what the project prints, logs and writes.

A URI may carry `user:password@` (a tracking server, an S3-compatible endpoint); boto3 and
MLflow repeat such URIs in their error messages. Everything shown to a user or stored in a
report, a manifest or a tag goes through `redact_uri` (one URI) or `redact_text` (free text).
"""

import re
import urllib.parse

# scheme://userinfo@ : the userinfo part is what a URI's credentials live in
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")


def redact_uri(uri: str) -> str:
    """The URI with any user:password part removed, safe to print and to log."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """`text` with the user:password part of every URI in it removed (error messages of other libraries)."""
    return _USERINFO.sub(r"\g<scheme>", text)


def has_userinfo(uri: str) -> bool:
    """Whether the URI carries a user name or password (`scheme://user:secret@host`)."""
    return bool(_USERINFO.match(uri.strip()))
