"""The ClientApp of the Flower runtime: one site answering the aggregator's messages.

Kept apart from `fedcare.runtime.flower`, whose ServerApp side imports the
experiment and reporting code: a SuperNode of Flower 1.42 starts a new
ClientApp process for every message, and each one imports this module, so
it imports only what a site needs (`fedcare.runtime.flower_site`). The
deployment's app names ``fedcare.runtime.flower_client:client_app``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.runtime.flower_site import (
    NodeSettings,
    SiteNode,
    answer,
    error_reply,
    run_config_of,
)

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
            node = site_node(run_config_of(context, config),
                             NodeSettings.from_node_config(dict(context.node_config)))
        except FedcareError as exc:
            return error_reply(message, exc)
        return answer(message, context, node)

    app.train()(handle)
    app.query("fedcare_hello")(handle)
    app.query("fedcare_exchange")(handle)
    return app


client_app = build_client_app()
"""The ClientApp of a deployment (``fedcare.runtime.flower_client:client_app``)."""
