"""``flower-supernode`` with a short heartbeat, so the aggregator learns within seconds that a
site is gone.

Flower's SuperLink holds a node online for ``HEARTBEAT_PATIENCE`` (2) times the heartbeat
interval the node announces, and answers every message to a node that is no longer
online with a ``NODE_UNAVAILABLE`` error at once (``flwr/server/superlink/linkstate``);
the aggregator then leaves that site out of the round (`fedcare.runtime.flower_server`).
A Flower 1.42 SuperNode announces and keeps a fixed 30 s interval
(``HEARTBEAT_DEFAULT_INTERVAL``, read by ``flwr/supernode/fleet_http_connection.py`` and
``flwr/supercore/heartbeat.py``), so a site whose machine dies costs its round up to a
minute. This program is ``flower-supernode`` with `HEARTBEAT_SECONDS` instead: a heartbeat
about every 4 s, and a dead site seen within 20 s. A node that stops normally deactivates
itself and is seen at once either way.

Run as ``python -m fedcare.runtime.flower_supernode`` with ``flower-supernode``'s arguments
(`fedcare.runtime.flower_deploy.supernode_command` does).
"""

from __future__ import annotations

HEARTBEAT_SECONDS = 10.0
"""The node's announced heartbeat interval: the least a Flower 1.42 SuperLink accepts
(``HEARTBEAT_MIN_INTERVAL``). The node sends one every (10 - 5) x 0.8 s (Flower's call
timeout and jitter), and is offline 2 x 10 s after its last."""


def main() -> None:
    """Start Flower's SuperNode (its command line) with `HEARTBEAT_SECONDS`."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.cli import flower_supernode

    for module in (heartbeat, fleet_http_connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise SystemExit(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL: this "
                             "Flower is not the 1.42 fedcare was built on; run "
                             "flower-supernode itself (a dead site is then seen within a "
                             "minute).")
        module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # type: ignore[attr-defined]
    flower_supernode()


if __name__ == "__main__":
    main()
