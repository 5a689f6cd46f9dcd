"""Who may reach the studio: the bind address, the password, and the public share link.

Rules: bind 127.0.0.1 unless --listen; a public link (--share) needs a password (--auth USER:PASS or
LOWVRAM_STUDIO_AUTH) unless the user says --insecure-share; a link that cannot be made (offline) is
reported plainly while the local address keeps working; repeated wrong passwords lock the login for a
while (``LoginGuard``), so a public link cannot be brute-forced at hundreds of guesses a second.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

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


@dataclass
class LoginGuard:
    """Gradio's ``auth`` callable: the one account, compared in constant time, with failures slowed down.

    Gradio hands the callable the form only, not the client (and behind --share every request comes
    from the share tunnel anyway), so the limit is global: after ``free_failures`` wrong logins in a
    row every login is refused unchecked for a delay that doubles with each further failure, up to
    ``max_delay_s``; a success resets it. Refusing, not sleeping, keeps Gradio's event loop free and
    makes parallel guesses useless; guesses while locked do not extend the lock.
    """

    user: str
    password: str
    free_failures: int = 3
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: int = field(default=0, init=False)
    _locked_until: float = field(default=float("-inf"), init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __call__(self, username: str, password: str) -> bool:
        with self._lock:
            now = self.clock()
            if now < self._locked_until:
                return False
            user_ok = hmac.compare_digest(username.encode("utf-8"), self.user.encode("utf-8"))
            password_ok = hmac.compare_digest(password.encode("utf-8"), self.password.encode("utf-8"))
            if user_ok and password_ok:
                self._failures = 0
                return True
            self._failures += 1
            beyond = self._failures - self.free_failures
            if beyond >= 0:
                delay = min(self.first_delay_s * 2.0 ** min(beyond, 32), self.max_delay_s)
                self._locked_until = now + delay
                logger.warning("%d wrong logins in a row; refusing every login for %.0f s", self._failures, delay)
            return False


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
