"""The ClientApp of the Flower runtime: one site answering the aggregator's messages.

Kept apart from `fedcare.runtime.flower`, whose ServerApp side imports the
experiment and reporting code: a SuperNode of Flower 1.42 starts a new
ClientApp process for every message, and each one imports this module, so
it imports only what a site needs (`fedcare.runtime.flower_site`). The
deployment's app names ``fedcare.runtime.flower_client:client_app``.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcare.config import RunConfig
from fedcare.errors import FedcareError, ProtocolError
from fedcare.privacy.plan import calibrations, remember_calibrations
from fedcare.runtime.flower_site import (
    NodeSettings,
    SiteNode,
    answer,
    error_reply,
    run_config_of,
)

CALIBRATIONS = "fedcare-calibrations"
"""Context state record: the noise multipliers this site calibrated for earlier messages.

Every message is answered in a new process, and calibrating a DP mechanism
takes the accountant 1-5 s; the node state (in the SuperNode's memory on the
site's machine, never sent to the SuperLink) keeps them for the run.
"""

_NODES: dict[tuple[str, NodeSettings], SiteNode] = {}
"""Site nodes built in this process (a simulation answers every message in one process)."""


def site_node(config: RunConfig, settings: NodeSettings) -> SiteNode:
    key = (config.to_toml(), settings)
    if key not in _NODES:
        _NODES[key] = SiteNode(config, settings)
    return _NODES[key]


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp hosting one site (the node's ``site`` / ``partition-id``).

    Parameters
    ----------
    config : RunConfig, optional
        The federation's configuration; default: the run configuration's ``fedcare-config``.
    """
    app = ClientApp()

    def handle(message: Message, context: Context) -> Message:
        try:
            recall_calibrations(context.state)
            node = site_node(run_config_of(context, config),
                             NodeSettings.from_node_config(dict(context.node_config)))
            keep_calibrations(context.state)
        except FedcareError as exc:
            site = context.node_config.get("site", "")
            return error_reply(message, exc, site if isinstance(site, str) else "")
        return answer(message, context, node)

    app.train()(handle)
    app.evaluate()(handle)
    app.query("fedcare_hello")(handle)
    app.query("fedcare_exchange")(handle)
    return app


def recall_calibrations(state: RecordDict) -> None:
    """Take the noise multipliers `keep_calibrations` left in the node state as computed."""
    record = state.config_records.get(CALIBRATIONS)
    if record is None:
        return
    try:
        entries = json.loads(str(record["entries"]))
        known = {(float(target), float(delta), float(q), int(steps), str(accountant)):
                 float(sigma) for target, delta, q, steps, accountant, sigma in entries}
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the node state's {CALIBRATIONS!r} record is unreadable ({exc}); "
                            "restart the SuperNode to clear it.") from None
    remember_calibrations(known)


def keep_calibrations(state: RecordDict) -> None:
    """Leave this process's calibrated noise multipliers in the node state (if any)."""
    known = calibrations()
    if known:
        state[CALIBRATIONS] = ConfigRecord(
            {"entries": json.dumps([[*key, sigma] for key, sigma in known.items()])})


client_app = build_client_app()
"""The ClientApp of a deployment (``fedcare.runtime.flower_client:client_app``)."""
