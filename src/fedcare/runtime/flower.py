"""The Flower runtime: fedcare's Site and Aggregator as a Flower ServerApp and ClientApp.

Flower (1.42, Message API) is the network engine: SuperLink, SuperNodes,
TLS, node authentication and message delivery are Flower's; fedcare adds no
network code. The same `~fedcare.federation.site.Site`,
`~fedcare.federation.aggregator.Aggregator`, strategy, protection and DP
objects as in the local runtime do the work:

* `server_app` (`build_server_app`): the main loop is
  `fedcare.runtime.flower_server.serve`, which calls ``Aggregator.run_round``
  with one `~fedcare.runtime.flower_server.RemoteSite` per site;
* `client_app` (`build_client_app`, in `fedcare.runtime.flower_client`, which
  a deployment's ClientApp processes import alone): every message is
  answered by one `Site` built from the node's configuration
  (`fedcare.runtime.flower_site`).

Both read the federation's `RunConfig` from the Flower run configuration key
``fedcare-config`` (`fedcare serve` writes it), or take it as an argument.

`run_simulation` runs the two apps in Flower's simulation engine (its
LinkState, in-memory Grid and Fleet loop) with an in-process backend instead
of Ray, which Flower's `run_simulation` otherwise requires: every message
still goes through Flower's message path, and is serialised to Flower's
protobuf form and back on the way, as on the wire.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.serverapp import ServerApp

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.runtime.flower_client import build_client_app, client_app
from fedcare.runtime.flower_server import FlowerRunResult, ServerSettings, server_main
from fedcare.runtime.flower_site import RUN_CONFIG_KEY

__all__ = ["RUN_CONFIG_KEY", "FlowerRunResult", "ServerSettings", "build_client_app",
           "build_server_app", "client_app", "run_simulation", "server_app"]

def build_server_app(config: RunConfig | None = None,
                     on_finish: Callable[[FlowerRunResult], None] | None = None) -> ServerApp:
    """A ServerApp running the federation (`fedcare.runtime.flower_server.serve`).

    Parameters
    ----------
    config : RunConfig, optional
        Default: the run configuration's ``fedcare-config``.
    on_finish : callable, optional
        Receives the result when the last round is done.
    """
    app = ServerApp()
    app.main()(server_main(config, on_finish))
    return app


server_app = build_server_app()
"""The ServerApp of a deployment (``fedcare.runtime.flower:server_app``)."""


# --------------------------------------------------------------------------- simulation
class _InProcessBackend(Backend):
    """A Flower simulation backend that runs the ClientApp in this process, one message at a time.

    Each message and its reply go through Flower's protobuf serialisation, so
    what a site receives is what it would receive over gRPC.
    """

    def __init__(self) -> None:
        super().__init__({})
        self.app_fn: Callable[[], ClientApp] | None = None

    @property
    def num_workers(self) -> int:
        return 1

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        from flwr.common.serde import message_from_proto, message_to_proto

        assert self.app_fn is not None
        received = message_from_proto(message_to_proto(message))
        reply = self.app_fn()(received, context)
        return message_from_proto(message_to_proto(reply)), context


@contextmanager
def _in_process_backend() -> Iterator[None]:
    from flwr.server.superlink.fleet.vce import vce_api

    run_api = vce_api.run_api

    def run_in_process(app_fn: Any, backend_fn: Any, *args: Any) -> None:
        run_api(app_fn, _InProcessBackend, *args)

    with mock.patch.object(vce_api, "run_api", run_in_process):
        yield


def run_simulation(config: RunConfig, *, n_sites: int, run_dir: str | Path | None = None,
                   settings: ServerSettings | None = None) -> FlowerRunResult:
    """Run the federation in Flower's simulation engine, every site in this process.

    Parameters
    ----------
    config : RunConfig
        As for `fedcare run`; the site at partition ``i`` is the data's ``i``-th site.
    n_sites : int
        Simulated SuperNodes (the data's number of sites).
    run_dir : path, optional
        Run directory (checkpoint, ledger, audit log); default: a temporary one.
    settings : ServerSettings, optional
        Timeouts and retries (defaults suit a simulation).

    Returns
    -------
    FlowerRunResult
    """
    from flwr.simulation import run_simulation as flower_simulation

    results: list[FlowerRunResult] = []
    with tempfile.TemporaryDirectory(prefix="fedcare-flower-") as scratch:
        base = settings or ServerSettings(wait_timeout=60.0, message_timeout=600.0,
                                          round_retries=0)
        chosen = ServerSettings(**{**base.__dict__,
                                   "run_dir": str(run_dir or Path(scratch) / "run")})
        server = ServerApp()
        main = server_main(config, results.append)

        def main_with_settings(grid: Any, context: Context) -> None:
            context.run_config.update(chosen.to_run_config())
            main(grid, context)

        server.main()(main_with_settings)
        with _in_process_backend():
            flower_simulation(server_app=server, client_app=build_client_app(config),
                              num_supernodes=n_sites, backend_name="in-process")
    if not results:
        raise FedcareError("the Flower simulation ended without a result; see the log above.")
    return results[0]
