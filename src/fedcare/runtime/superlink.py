"""The coordinator's SuperLink, with only its Fleet API open to other machines.

Flower 1.42's SuperLink serves three APIs on one HTTP port: the Fleet API
(``/v1/fleet/...``: SuperNodes fetch messages and send replies, each request
signed with a registered node key), the Control API (``/v1/control/...``:
register node keys, submit, list, stop and read the logs of runs) and the
runtime API (``/v1/runtime/...``: the ServerApp's link). The open-source
Control API has no account authentication, so anyone who can reach the port
could register a node key of their own, join as a hospital, read the
aggregator's log or stop the run.

``python -m fedcare.runtime.superlink ARGS`` runs ``flower-superlink ARGS``
with one ASGI middleware in front of Flower's own (`LoopbackOnly`): a
request from another machine reaches the SuperLink only if its path is the
Fleet API's; everything else is answered 403 unless it comes from this
machine's loopback address. The check uses the TCP peer address, which a
remote party cannot choose (uvicorn trusts forwarding headers only from
127.0.0.1, where the coordinator's own tools run).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
"""The only paths served to other machines: what a SuperNode needs."""

REFUSAL = ("the SuperLink's Control and runtime APIs are served to the coordinator's own "
           "machine only (fedcare serve); a site needs only the Fleet API")


def from_loopback(client: Sequence[Any] | None) -> bool:
    """Whether an ASGI ``client`` (host, port) is this machine's loopback address."""
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


def allowed(path: str, client: Sequence[Any] | None) -> bool:
    """Whether a request for `path` from `client` may reach the SuperLink."""
    return path.startswith(FLEET_PREFIX) or from_loopback(client)


class LoopbackOnly:
    """ASGI middleware: the Fleet API for everyone, the rest for loopback only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not allowed(
                str(scope.get("path", "")), scope.get("client")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": REFUSAL}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``flower-superlink`` with `argv`, `LoopbackOnly` first among its middleware."""
    from flwr.superlink import extensions
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from starlette.middleware import Middleware

    flower_middleware = extensions.get_middleware

    def middleware() -> tuple[Middleware, ...]:
        return (Middleware(LoopbackOnly), *flower_middleware())

    # Flower's hook for SuperLink extensions: `superlink.main.create_app` asks it for
    # the middleware to put outermost.
    extensions.get_middleware = middleware
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
