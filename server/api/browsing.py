"""Starting the memory browser (``apcm.server.browser``) the way the settings say.

``auto`` serves it only on a loopback ``--browser-host``, and a port that is taken
then costs a warning, not the server: the browser is a convenience of
``make serve``. ``on`` serves it wherever it is told and fails start-up if it
cannot.
"""

from __future__ import annotations

import logging

from ..browser.http import Authorize, MemoryBrowser
from ..config import Settings
from ..domain.service import MemoryService
from ..errors import FailedPrecondition
from .auth import keyring_from_settings
from .preflight import is_loopback

log = logging.getLogger("apcm")


def authorizer(settings: Settings) -> Authorize:
    """The role ("rw" / "ro") of a bearer token under the server's API keys; None when
    no key is configured (the browser is open, as gRPC is)."""
    keyring = keyring_from_settings(settings)
    if not len(keyring):
        return None

    def role(token: str | None) -> str | None:
        found = keyring.role_of(token) if token else None
        return found.value if found is not None else None

    return role


def start_browser(settings: Settings, service: MemoryService) -> tuple[MemoryBrowser, int] | None:
    """The running browser and its port, or None when the settings leave it off."""
    loopback = is_loopback(settings.browser_host)
    if settings.browser == "off" or (settings.browser == "auto" and not loopback):
        return None
    browser = MemoryBrowser(service, authorizer(settings))
    try:
        port = browser.start(settings.browser_host, settings.browser_port, loopback)
    except OSError as e:
        where = f"{settings.browser_host}:{settings.browser_port}"
        if settings.browser == "on":
            raise FailedPrecondition(
                f"cannot serve the memory browser on {where}: {e.strerror or e}; choose "
                "another --browser-port (env APCM_BROWSER_PORT) or --browser off") from e
        log.warning("memory browser not started: %s is taken (%s); set --browser-port",
                    where, e.strerror or e)
        return None
    host = settings.browser_host
    log.info("memory browser on http://%s:%d/", f"[{host}]" if ":" in host else host, port)
    return browser, port
