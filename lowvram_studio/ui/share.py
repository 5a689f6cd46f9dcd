"""Who may reach the studio: the bind address, the password, and the public share link.

Rules: bind 127.0.0.1 unless --listen; a public link (--share) needs a password (--auth USER:PASS or
LOWVRAM_STUDIO_AUTH) unless the user says --insecure-share; a link that cannot be made (offline) is
reported plainly while the local address keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

AUTH_ENV = "LOWVRAM_STUDIO_AUTH"
LOCAL_HOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


class ShareError(ValueError):
    """A serving choice that is unsafe or malformed; the message says what to do."""


@dataclass(frozen=True)
class ServeOptions:
    server_name: str
    share: bool
    auth: tuple[str, str] | None


def parse_auth(text: str) -> tuple[str, str]:
    """'user:pass' -> ('user', 'pass'); the password may itself contain ':'."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ShareError("--auth must look like USER:PASS with both parts non-empty; e.g. --auth me:long-secret")
    return user, password


def serve_options(
    listen: bool, share: bool, auth: str | None, insecure_share: bool, environ: Mapping[str, str] | None = None
) -> ServeOptions:
    """Apply the rules above to the ``ui`` flags (and the environment)."""
    environ = os.environ if environ is None else environ
    text = auth or environ.get(AUTH_ENV) or None
    credentials = parse_auth(text) if text else None
    if share and credentials is None and not insecure_share:
        raise ShareError(
            "--share makes the studio reachable from the internet, so it needs a password: add --auth USER:PASS "
            f"(or set {AUTH_ENV}=USER:PASS); to share without one anyway, add --insecure-share"
        )
    return ServeOptions(ALL_INTERFACES if listen else LOCAL_HOST, share, credentials)


def share_report(requested: bool, share_url: str | None, local_url: str) -> str | None:
    """The line to tell the user about the public link, or None when none was asked for."""
    if not requested:
        return None
    if share_url:
        return f"Public link: {share_url} (password protected unless you chose --insecure-share)"
    return (
        "Could not create a public share link (no internet connection, or Gradio's share server is unreachable); "
        f"the studio still works locally at {local_url}"
    )
