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


def redact_text(text: str, uri: str | None = None) -> str:
    """`text` (an error message of another library) with the user:password part of every URI in
    it removed, and, when the `uri` it may quote is given, that URI's password wherever it appears
    on its own (MLflow quotes request URLs and sometimes bare credentials)."""
    text = _USERINFO.sub(r"\g<scheme>", text)
    if uri is None:
        return text
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return text
    secrets = [parts.netloc.rpartition("@")[0]]  # user:password as quoted on its own
    password = parts.password or ""
    if len(password) >= 4:  # replacing a one-letter password everywhere would garble the text
        secrets += [password, urllib.parse.unquote(password)]
    for secret in sorted(set(filter(None, secrets)), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def has_userinfo(uri: str) -> bool:
    """Whether the URI carries a user name or password (`scheme://user:secret@host`)."""
    return bool(_USERINFO.match(uri.strip()))
