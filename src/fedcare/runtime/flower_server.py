"""The aggregator as a Flower ServerApp: fedcare's `Aggregator` driving sites over Flower.

The ServerApp's main loop is `serve`: it finds the sites among the connected
SuperNodes, builds the same `Aggregator` the local runtime builds, and calls
`Aggregator.run_round` with one `RemoteSite` per site. `RemoteSite` is the
`SiteClient` the aggregator already talks to: its ``exchange`` and ``fit``
become Flower messages (`fedcare.runtime.flower_wire`) and their replies, so
no training, protection or aggregation logic exists twice.

Faults. A site that does not answer within ``message_timeout`` (it
disconnected, crashed or was killed) or answers with an error is left out of
the round by the aggregator, as in the local runtime; the round completes if
``federation.min_sites`` still hold (secagg rebuilds a dropped site's masks
from the others' shares). A round below the quorum is retried, after the
nodes are looked up again, up to ``round_retries`` times; then the run stops
with the `QuorumError`, the last checkpoint intact. Under client-level DP the
`Aggregator` releases such a round from noise alone instead (whether a run
stops must not depend on which sites take part), so there is nothing to retry.

Privacy. Record level: each site calibrates its DP-SGD under its own cap and
says so in its `SiteHello`; the ledger charges each site. Site level
(client-level DP): the aggregator calibrates for the roster's K sites
(`build_site_level_plan`), checks that every site's own calibration agrees
(`check_client_level`), draws each round's Poisson cohort once
(`CohortKeeper`) and charges the federation's budget, exactly as the local
runtime does with the same `Aggregator`, `Site` and `SitePrivacy`.

Resume. After every round the run directory gets, atomically, the checkpoint
(model, strategy state, clip norm, round number), and the privacy ledger and
audit log are appended and flushed. A ServerApp started on a run directory
with a checkpoint continues after its round: the ledger discards the spends
of a round that never finished (`PrivacyLedger.resume_from`), so the released
model's budget counts no round twice, and the rounds after it run as in an
uninterrupted run. The aggregator did see the discarded attempt, so its
spends are kept and counted against the aggregator and in every cap check.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcare import __version__
from fedcare.config import RunConfig
from fedcare.errors import (
    BudgetExceeded,
    ConfigError,
    DataError,
    FedcareError,
    ProtocolError,
    QuorumError,
    SiteUnreachable,
)
from fedcare.evaluation import EVALUATION_SUMS, SITE_MEAN_AUC, Metrics, metrics_from_sums
from fedcare.federation.aggregator import Aggregator, RoundReport, relay
from fedcare.federation.site import FitInstructions, FitResult
from fedcare.federation.training import TrainingPlan
from fedcare.models import FlatModel, build_model
from fedcare.models.params import all_finite
from fedcare.privacy.ledger import LEDGER_FILE, LedgerEntry
from fedcare.privacy.plan import PrivacyPlan, build_site_level_plan, noise_factory, record_entry
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection import WHO_SEES_WHAT, build_scheme
from fedcare.protection.base import Scheme, min_contributors, wire_digest
from fedcare.report.auditlog import AUDIT_LOG_FILE, AuditLog, audit_key, payload_digests_keyed
from fedcare.report.events import close_audit_log, log_round_events, log_run_started
from fedcare.report.html import write_report
from fedcare.report.rundir import (
    CHECKPOINT_FILE,
    RunWriter,
    cohorts_public,
    evaluation_facts,
    load_checkpoint,
    result_line,
    round_facts,
    shortfall_summary,
    write_json,
)
from fedcare.runtime.flower_site import (
    ERROR,
    EVALUATE,
    EVALUATION_SESSIONS,
    EXCHANGE,
    FIT,
    HEADER,
    HELLO,
    STANDARDIZE,
    SUM,
    MomentsRequest,
    SiteHello,
    Standardization,
)
from fedcare.runtime.flower_wire import from_record, to_record, wire_bytes
from fedcare.runtime.local import build_aggregator
from fedcare.runtime.polling import Looks, quick_object_retries
from fedcare.seeding import INIT, torch_generator

_ERROR_TYPES: dict[str, type[FedcareError]] = {
    cls.__name__: cls for cls in (ProtocolError, QuorumError, BudgetExceeded, ConfigError,
                                  DataError)}


@dataclass(frozen=True)
class ServerSettings:
    """How the ServerApp runs a deployment (run configuration ``fedcare-*`` keys).

    Attributes
    ----------
    run_dir : str
        Where the run directory is (created, or resumed if it holds a checkpoint).
    roster : tuple of str
        The sites of the federation, in the order that fixes their indices
        (and so their random streams); a node claiming any other site is
        refused. Empty: every site that answers, sorted by name.
    expected_sites : int
        Sites to wait for before the first round (0: the roster's length).
    wait_timeout : float
        Seconds to wait for them; then the run starts if ``federation.min_sites``
        are there, else stops with `QuorumError`.
    message_timeout : float
        Seconds a site has to answer one message before it is left out of the round.
    round_retries : int
        Times a round below the quorum is tried again before the run stops.
    retry_wait : float
        Seconds between tries (for a dropped site to come back).
    node_keys : tuple of (str, str)
        Site -> fingerprint of the node key in its CA-signed certificate
        (`node_key_fingerprint`): a node may say it is site X only if it
        authenticated with X's key. Empty (no node authentication: insecure
        loopback tests, the simulation engine): a node's word is taken.
    """

    run_dir: str = ""
    roster: tuple[str, ...] = ()
    expected_sites: int = 0
    wait_timeout: float = 120.0
    message_timeout: float = 120.0
    round_retries: int = 2
    retry_wait: float = 5.0
    node_keys: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        roster = str(run_config.get("fedcare-sites", "")).strip()
        return cls(
            run_dir=str(run_config.get("fedcare-run-dir", "")),
            roster=tuple(s.strip() for s in roster.split(",") if s.strip()),
            expected_sites=int(run_config.get("fedcare-expected-sites", 0)),
            wait_timeout=float(run_config.get("fedcare-wait-timeout", 120.0)),
            message_timeout=float(run_config.get("fedcare-message-timeout", 120.0)),
            round_retries=int(run_config.get("fedcare-round-retries", 2)),
            retry_wait=float(run_config.get("fedcare-retry-wait", 5.0)),
            node_keys=tuple((site, key) for site, _, key in (
                pair.partition("=") for pair in
                str(run_config.get("fedcare-node-keys", "")).split(",") if pair)),
        )

    def to_run_config(self) -> dict[str, str | int | float]:
        return {"fedcare-run-dir": self.run_dir, "fedcare-sites": ",".join(self.roster),
                "fedcare-expected-sites": self.expected_sites,
                "fedcare-wait-timeout": self.wait_timeout,
                "fedcare-message-timeout": self.message_timeout,
                "fedcare-round-retries": self.round_retries,
                "fedcare-retry-wait": self.retry_wait,
                "fedcare-node-keys": ",".join(f"{site}={key}" for site, key in self.node_keys)}


def round_label(round_number: int) -> str:
    """"round 3", or "the evaluation of round 3" for its evaluation's session."""
    if round_number >= EVALUATION_SESSIONS:
        return f"the evaluation of round {round_number - EVALUATION_SESSIONS}"
    return f"round {round_number}"


def node_key_fingerprint(public_key: bytes | ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of a node key's DER SubjectPublicKeyInfo; `public_key` may be the PEM
    bytes Flower's SuperLink keeps for a registered node."""
    key = (serialization.load_pem_public_key(public_key) if isinstance(public_key, bytes)
           else public_key)
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                          ).hexdigest()


@dataclass
class Traffic:
    """Bytes of fedcare messages, as Flower serialises them, per site and round."""

    sent: dict[tuple[str, int], int] = field(default_factory=dict)
    received: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, site: str, round_number: int, sent: int, received: int) -> None:
        key = (site, round_number)
        self.sent[key] = self.sent.get(key, 0) + sent
        self.received[key] = self.received.get(key, 0) + received


Request = tuple[int, str, str, object, int, int]
"""(node id, site, kind, body, round, index) of one message."""


class Messenger:
    """Sends fedcare messages to nodes, many at once, and collects the replies.

    Parameters
    ----------
    grid : Grid
    timeout : float
        Seconds to wait for the replies of one batch; a node silent by then is left out.
    poll_interval : float
        Seconds, at most, between two looks for replies. `Grid.send_and_receive` of
        Flower 1.42 looks every 3 s (``flwr/superlink/grid/http_grid.py``): 1.5 s more on
        average for each of a round's exchanges. Here the first look comes
        `polling.FIRST_LOOK` after the push and the wait doubles up to `poll_interval`;
        a reply whose content is still being uploaded is asked again after
        `polling.OBJECT_RETRY` (Flower: 1 s).
    """

    def __init__(self, grid: Grid, timeout: float, poll_interval: float = 0.5) -> None:
        self.grid = grid
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.traffic = Traffic()
        self.attempt = 0

    def ask_many(self, requests: Sequence[Request]) -> dict[str, object | FedcareError]:
        """Send every request at once; each site's reply, or the error it stands for."""
        messages: dict[int, tuple[Request, Message, int]] = {}
        for request in requests:
            node_id, site, kind, body, round_number, index = request
            content = to_record(body)
            content[HEADER] = ConfigRecord({
                "kind": kind, "site": site, "round": round_number, "index": index,
                "attempt": self.attempt})
            message_type = {"hello": HELLO, "fit": FIT, "evaluate": EVALUATE}.get(kind, EXCHANGE)
            messages[node_id] = (request, Message(content, dst_node_id=node_id,
                                                  message_type=message_type,
                                                  group_id=str(round_number)),
                                 wire_bytes(content))
        replies = self._send_and_receive({node_id: m for node_id, (_, m, _) in messages.items()})
        out: dict[str, object | FedcareError] = {}
        for node_id, ((_, site, kind, _, round_number, _), _, size) in messages.items():
            label = f"site {site!r}" if site else f"node {node_id}"
            key = site or str(node_id)
            reply = replies.get(node_id)
            if reply is None:
                self.traffic.add(site, round_number, size, 0)
                out[key] = SiteUnreachable(
                    f"{label} did not answer the {kind} message of {round_label(round_number)} "
                    f"within "
                    f"{self.timeout:g} s (too slow, or unreachable); it is left out.")
                continue
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                self.traffic.add(site, round_number, size, 0)
                out[key] = SiteUnreachable(
                    f"{label} is gone: its node stopped, or missed its heartbeats (the "
                    f"SuperLink's node state), during the {kind} message of "
                    f"{round_label(round_number)}; it is left out, and rejoins when it "
                    "reconnects.")
                continue
            if reply.has_error():
                self.traffic.add(site, round_number, size, 0)
                out[key] = ProtocolError(f"{label}: its ClientApp failed on the {kind} message "
                                         f"of {round_label(round_number)}: "
                                         f"{reply.error.reason}")
                continue
            self.traffic.add(site, round_number, size, wire_bytes(reply.content))
            refusal = reply.content.config_records.get(ERROR)
            if refusal is not None:
                error = _ERROR_TYPES.get(str(refusal.get("type")), ProtocolError)
                detail = refusal.get("message")
                text = detail if isinstance(detail, str) else repr(detail)
                out[key] = error(f"{label} refused: {text}")
                continue
            try:
                out[key] = from_record(reply.content)
            except ProtocolError as exc:
                out[key] = exc
        return out

    def _send_and_receive(self, messages: dict[int, Message]) -> dict[int, Message]:
        """`Grid.send_and_receive` (push, then pull until all replied or `timeout`), looking
        every `poll_interval` seconds; the reply of each node that answered.

        Replies are matched to messages by message id: the reply Flower's SuperLink writes
        for a node that is gone (``NODE_UNAVAILABLE``: the node deactivated itself, or its
        heartbeats stopped) comes from the SuperLink, not from that node. A message the
        SuperLink would not store (its node is unknown to it) is not waited for.
        """
        nodes = list(messages)
        pushed = list(self.grid.push_messages(list(messages.values())))
        # Flower returns no ids at all for a batch too large to push: nothing to wait for.
        node_of = {message_id: node for node, message_id in zip(nodes, pushed, strict=False)
                   if message_id}
        waiting = set(node_of)
        deadline = time.monotonic() + self.timeout
        replies: dict[int, Message] = {}
        looks = Looks(idle=self.poll_interval)
        while waiting:
            for reply in self.grid.pull_messages(waiting):
                message_id = reply.metadata.reply_to_message_id
                if message_id in waiting:
                    replies[node_of[message_id]] = reply
                    waiting.discard(message_id)
            if not waiting or time.monotonic() >= deadline:
                break
            looks.sleep()
        return replies

    def ask(self, node_id: int, site: str, kind: str, body: object, *, round_number: int = 0,
            index: int = -1) -> object:
        reply = self.ask_many([(node_id, site, kind, body, round_number, index)])
        answer = reply[site or str(node_id)]
        if isinstance(answer, FedcareError):
            raise answer
        return answer


# Messages the aggregator sends, in a round, to exactly these sites (by index) and to no
# others, identical for each: `FanOut` sends them to all at once when the first is asked.
def _broadcast_recipients(message: object, cohort: Sequence[int]) -> list[int] | None:
    from fedcare.protection import secagg

    if isinstance(message, secagg.RoundSetup):
        return [i - 1 for i in message.site_ids]
    if isinstance(message, secagg.KeyRoster):
        return [k.site - 1 for k in message.keys]
    if isinstance(message, secagg.UnmaskRequest):
        return [i - 1 for i in message.survivors]
    if type(message).__name__ == "KeyCheck":  # ckks: every selected site
        return list(cohort)
    return None


def _deferred(message: object) -> bool:
    """A message whose reply is always None: delivered with the site's next message."""
    from fedcare.protection import secagg

    return isinstance(message, secagg.SharesForSite)


class FanOut:
    """Runs the aggregator's per-site calls of a round in parallel, with the same results.

    `Aggregator.run_round` asks its sites one after the other; over Flower each
    ask is a round trip of seconds (a SuperNode starts a process per message).
    So when the aggregator asks one site a question it asks every site of the
    round identically (a fit, or a broadcast protocol message:
    `_broadcast_recipients`), all of them are asked at once and the other
    replies are kept for the aggregator's next calls, which then return
    without waiting. A message whose reply is always None (secagg's shares
    for one site) rides along with that site's next message. A reply nobody
    asks for is dropped; a call whose question differs from the one sent
    ahead is sent on its own.
    """

    def __init__(self, messenger: Messenger, cohort: Callable[[int], list[int]]) -> None:
        self.messenger = messenger
        self.cohort = cohort
        self.sites: list[RemoteSite] = []
        self._ahead: dict[tuple[str, int, str], tuple[str, object | FedcareError]] = {}
        self._queued: dict[tuple[str, int], list[object]] = {}
        self._failed: set[tuple[str, int]] = set()

    def call(self, site: RemoteSite, kind: str, body: object, round_number: int) -> object:
        digest = wire_digest(body)
        ahead = self._ahead.pop((site.name, round_number, kind), None)
        if ahead is not None and ahead[0] == digest:
            return self._result(site, round_number, ahead[1])
        if kind == "exchange" and _deferred(body):
            self._queued.setdefault((site.name, round_number), []).append(body)
            return None
        if kind in ("fit", "evaluate", SUM):
            targets = [i for i in self.cohort(round_number)
                       if (self.sites[i].name, round_number) not in self._failed]
        else:
            targets = _broadcast_recipients(body, self.cohort(round_number)) or []
        others = [self.sites[i] for i in targets
                  if 0 <= i < len(self.sites) and self.sites[i] is not site
                  and self.sites[i].node_id is not None]
        requests = []
        for target in [site, *others]:
            if target.node_id is None:
                continue
            before = tuple(self._queued.pop((target.name, round_number), ()))
            requests.append((target.node_id, target.name, kind, (before, body), round_number,
                             target.index))
        if site.node_id is None:
            return self._result(site, round_number,
                                ProtocolError(f"site {site.name!r} is not connected."))
        replies = self.messenger.ask_many(requests)
        for target in others:
            if target.name in replies:
                self._ahead[(target.name, round_number, kind)] = (digest, replies[target.name])
        return self._result(site, round_number, replies[site.name])

    def _result(self, site: RemoteSite, round_number: int,
                answer: object | FedcareError) -> object:
        if isinstance(answer, FedcareError):
            self._failed.add((site.name, round_number))
            raise answer
        return answer


class RemoteSite:
    """A site reached through Flower: the `SiteClient` the aggregator drives.

    Parameters
    ----------
    name : str
    index : int
        Position in the federation (keys the site's random streams and secagg id).
    fan_out : FanOut
    """

    def __init__(self, name: str, index: int, fan_out: FanOut) -> None:
        self._name = name
        self.index = index
        self.fan_out = fan_out
        self.node_id: int | None = None
        self.hello: SiteHello | None = None

    @property
    def name(self) -> str:
        return self._name

    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        result = self.fan_out.call(self, "fit", (global_params, instructions),
                                   instructions.round)
        if not isinstance(result, FitResult) or result.site != self.name:
            raise ProtocolError(f"site {self.name!r} answered a fit with "
                                f"{type(result).__name__} instead of its own FitResult.")
        return result

    def exchange(self, round_number: int, message: object) -> object:
        return self.fan_out.call(self, "exchange", message, round_number)

    def evaluate(self, params: torch.Tensor, session: int) -> object:
        """The site's protected `metric_sums` of `params` on its test rows (`session`: the
        evaluation's protection session, `EVALUATION_SESSIONS` + the round)."""
        return self.fan_out.call(self, "evaluate", params, session)

    def planned_spend(self, round_number: int, plan: TrainingPlan) -> list[LedgerEntry]:
        privacy = None if self.hello is None else self.hello.record_privacy
        if privacy is None:
            return []
        return [record_entry(round_number, self.name, privacy, plan.epochs)]


@dataclass
class FlowerRunResult:
    """What `serve` leaves: the final model, the last round, the run directory, the traffic."""

    params: torch.Tensor
    rounds_completed: int
    run_dir: Path | None
    reports: list[RoundReport]
    traffic: Traffic
    round_seconds: list[float]
    started: float
    first_round_at: float | None


class Roster:
    """Which node is which site: asks every new node for its `SiteHello`."""

    def __init__(self, config: RunConfig, settings: ServerSettings, messenger: Messenger,
                 fan_out: FanOut, log: Callable[[str], None]) -> None:
        self.config = config
        self.settings = settings
        self.messenger = messenger
        self.fan_out = fan_out
        self.log = log
        self.by_node: dict[int, SiteHello | None] = {}
        self.sites: list[RemoteSite] = []
        self.standardization: Standardization | None = None
        """Federated standardisation's statistics, once computed: a node that joins later
        gets them with its hello (`share_standardization`)."""
        self.refusals: dict[int, str] = {}
        """Node -> why it was not let in (its own refusal, or ours), for the operator."""
        self.activated: dict[int, str] = {}
        """Node -> when it connected, as the SuperLink says, when it was last asked."""

    def refresh(self, grid: Grid) -> None:
        """Introduce new nodes, forget nodes that left, and point each site at its node."""
        infos = {info.node_id: info for info in grid.get_nodes()}
        nodes = set(infos)
        for node_id, info in infos.items():
            # A refused node that connected again since (its operator fixed the cause and
            # restarted it: same key, same node id) is asked again.
            if self.by_node.get(node_id, "") is None and \
                    self.activated.get(node_id) != info.last_activated_at:
                del self.by_node[node_id]
                self.refusals.pop(node_id, None)
        new = sorted(nodes - set(self.by_node))
        replies = self.messenger.ask_many([(node_id, "", "hello", self.standardization, 0, -1)
                                           for node_id in new]) if new else {}
        for node_id in new:
            hello = replies[str(node_id)]
            if isinstance(hello, SiteUnreachable):
                # Not an answer: a node that was offline or slow when asked (e.g. still
                # reconnecting after the aggregator restarted) is asked again next time.
                refusal = f"node {node_id} did not introduce itself yet: {hello}"
                if self.refusals.get(node_id) != refusal:
                    self.log(refusal)
                self.refusals[node_id] = refusal
                continue
            self.by_node[node_id] = None
            self.activated[node_id] = infos[node_id].last_activated_at
            if isinstance(hello, FedcareError):
                refusal = f"node {node_id} refused or failed to introduce itself: {hello}"
            elif not isinstance(hello, SiteHello):
                refusal = f"node {node_id} answered hello with {type(hello).__name__}; ignored"
            elif self.settings.roster and hello.site not in self.settings.roster:
                refusal = (f"node {node_id} says it is site {hello.site!r}, which is not in "
                           f"the roster {list(self.settings.roster)}; refused.")
            elif not self._authenticated_as(hello.site, infos[node_id].public_key):
                refusal = (f"node {node_id} says it is site {hello.site!r}, but it did not "
                           f"authenticate with the node key of {hello.site!r}'s certificate; "
                           "refused.")
            else:
                self.by_node[node_id] = hello
                self.refusals.pop(node_id, None)
                continue
            self.refusals[node_id] = refusal
            self.log(refusal)
        for gone in set(self.by_node) - nodes:
            del self.by_node[gone]
            self.activated.pop(gone, None)
        for gone in set(self.refusals) - nodes:
            del self.refusals[gone]
        self._place()

    def _authenticated_as(self, site: str, public_key: bytes) -> bool:
        """Whether a node that authenticated with `public_key` may be `site`."""
        if not self.settings.node_keys:
            return True
        expected = dict(self.settings.node_keys).get(site)
        try:
            return expected is not None and bool(public_key) and \
                node_key_fingerprint(public_key) == expected
        except ValueError:  # not a PEM key
            return False

    def _place(self) -> None:
        claims: dict[str, list[int]] = {}
        for node_id, hello in sorted(self.by_node.items()):
            if hello is not None:
                claims.setdefault(hello.site, []).append(node_id)
        if not self.sites:
            names = list(self.settings.roster) or sorted(claims)
            self.sites = [RemoteSite(name, i, self.fan_out) for i, name in enumerate(names)]
            self.fan_out.sites = self.sites
        for site in self.sites:
            nodes = claims.get(site.name, [])
            if len(nodes) > 1:
                self.log(f"site {site.name!r} is claimed by nodes {nodes}; the newest is used")
            site.node_id = nodes[-1] if nodes else None
            site.hello = self.by_node[nodes[-1]] if nodes else site.hello

    def connected(self) -> list[str]:
        return [s.name for s in self.sites if s.node_id is not None]


def _wait_for_sites(grid: Grid, roster: Roster, config: RunConfig, settings: ServerSettings,
                    log: Callable[[str], None]) -> None:
    wanted = settings.expected_sites or len(settings.roster) or config.federation.min_sites
    deadline = time.monotonic() + settings.wait_timeout
    while True:
        roster.refresh(grid)
        here = roster.connected()
        if len(here) >= wanted:
            return
        if time.monotonic() > deadline:
            if len(here) >= config.federation.min_sites and roster.sites:
                log(f"{len(here)} of {wanted} sites connected after {settings.wait_timeout:g} s "
                    f"({here}); starting with them (federation.min_sites = "
                    f"{config.federation.min_sites}).")
                return
            missing = sorted(set(settings.roster) - set(here)) if settings.roster else []
            raise QuorumError(
                f"only {len(here)} site(s) connected ({here}) after waiting "
                f"{settings.wait_timeout:g} s; the federation needs {wanted}"
                + (f" (missing: {missing})" if missing else "")
                + f" and at least federation.min_sites = {config.federation.min_sites}. "
                + (f"Refused: {' '.join(roster.refusals.values())} " if roster.refusals
                   else "")
                + "Check that each site's `fedcare site` is running, that it reaches the "
                "aggregator, and that its certificate and node key are registered.")
        time.sleep(1.0)


class CohortKeeper(Aggregator):
    """An `Aggregator` that draws each round's cohort once and keeps it.

    `FanOut` asks a round's sites ahead, so it must know the cohort the
    aggregator drew. Under client-level DP that cohort is a Poisson draw from
    the secure noise source (`SitePrivacy.select`): drawing again would give
    another cohort, and sites that were not selected would be asked to train
    and send an update. A retried round keeps its cohort too: drawing until
    enough sites answer would condition the sample on its size, which the
    accountant's Poisson subsampling does not cover.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drawn: tuple[int, list[int]] | None = None

    def select(self, n_sites: int, round_number: int) -> list[int]:
        if self._drawn is None or self._drawn[0] != round_number:
            self._drawn = (round_number, super().select(n_sites, round_number))
        return list(self._drawn[1])

    def cohort(self, round_number: int) -> list[int]:
        """The sites drawn for `round_number`, the round under way."""
        if self._drawn is None or self._drawn[0] != round_number:
            raise ProtocolError(f"no cohort was drawn for round {round_number}.")
        return list(self._drawn[1])


STANDARDIZATION_FILE = "standardization.json"
"""Run directory file of federated standardisation's pooled mean and std (a resumed run
reuses them: under ckks a second computation would differ by its flooding noise)."""


class RemoteContributor:
    """A connected site as a `~fedcare.federation.summation.Contributor` of a sum."""

    def __init__(self, site: RemoteSite, fan_out: FanOut) -> None:
        self.site = site
        self.fan_out = fan_out

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def index(self) -> int:
        return self.site.index

    def exchange(self, round_number: int, message: object) -> object:
        return self.fan_out.call(self.site, "exchange", message, round_number)

    def contribute(self, round_number: int, request: object) -> object:
        return self.fan_out.call(self.site, SUM, request, round_number)


def share_standardization(config: RunConfig, roster: Roster, messenger: Messenger,
                          run_dir: Path | None, log: Callable[[str], None]) -> None:
    """Federated standardisation: sum the sites' moments under the run's scheme, send the
    pooled mean and std to every site.

    Two protected sums (`fedcare.federation.summation.protected_sum`) over every connected
    site, as `fedcare.runtime.local.load_federation` runs them in one process: ``[n, sum
    x]``, then ``sum (x - mean)^2``. Both are protocol runs of round
    `~fedcare.runtime.local.STANDARDIZATION_ROUND`, told apart at the sites by the
    header's attempt (their sessions are kept by round and attempt). Every site must take
    part, or the run does not start. A resumed run sends the statistics its run directory
    kept. Nothing happens under any other ``data.standardize``.
    """
    from fedcare.data.datasets import standardize_method
    from fedcare.data.preprocess import Standardize, pooled_mean, pooled_std
    from fedcare.federation.summation import protected_sum
    from fedcare.runtime.local import MOMENTS, STANDARDIZATION_ROUND

    private = config.privacy.level != "none"
    widths = {s.hello.n_numeric for s in roster.sites if s.hello is not None}
    if standardize_method(config.data, private=private) is not Standardize.FEDERATED \
            or widths == {0}:
        return
    if len(widths) != 1:
        raise ProtocolError(f"the sites have different numbers of numeric columns {widths}; "
                            "they must share the schema.")
    p = widths.pop()
    sites = [s for s in roster.sites if s.node_id is not None]
    saved = None if run_dir is None else run_dir / STANDARDIZATION_FILE
    if saved is not None and saved.exists():
        kept = json.loads(saved.read_text())
        stats = Standardization(tuple(kept["mean"]), tuple(kept["std"]))
    else:
        scheme = build_scheme(config.protection)

        def total(request: MomentsRequest, length: int) -> np.ndarray:
            messenger.attempt = request.step - 1
            fan_out = FanOut(messenger, lambda _: [s.index for s in sites])
            fan_out.sites = roster.sites
            try:
                return protected_sum(scheme, [RemoteContributor(s, fan_out) for s in sites],
                                     request, length=length, what=MOMENTS,
                                     round_number=STANDARDIZATION_ROUND).double().numpy()
            finally:
                messenger.attempt = 0

        first = total(MomentsRequest(1), p + 1)
        mean = pooled_mean(first)
        std = pooled_std(first, total(MomentsRequest(2, tuple(mean.tolist())), p))
        stats = Standardization(tuple(mean.tolist()), tuple(std.tolist()))
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_json(saved, {"mean": list(stats.mean), "std": list(stats.std)})
        log(f"federated standardisation: pooled mean and std of {p} column(s) from "
            f"{len(sites)} sites, summed under {config.protection.scheme}")
    roster.standardization = stats
    replies = messenger.ask_many([(s.node_id, s.name, STANDARDIZE, stats, 0, s.index)
                                  for s in sites if s.node_id is not None])
    refused = {site: str(reply) for site, reply in replies.items() if reply != stats}
    if refused:
        raise ProtocolError(f"site(s) refused the federation's standardisation: {refused}")


def _privacy_plan(config: RunConfig, sites: Sequence[RemoteSite]) -> PrivacyPlan | None:
    """The run's privacy plan from the sites' introductions (None without DP).

    Record level: each site calibrated its DP-SGD itself (`SiteHello.record_privacy`,
    under its own cap). Site level: the aggregator calibrates client-level DP for the
    roster's K sites and checks that every site clips and noises as it expects.
    """
    p = config.privacy
    missing = [s.name for s in sites if s.hello is None]
    if p.level in ("record", "site") and missing:
        raise ProtocolError(f"site(s) {missing} have not told their DP settings; a private run "
                            "needs every site (at least once) before it starts.")
    if p.level == "site":
        plan = build_site_level_plan(config, [s.name for s in sites])
        assert plan.site is not None
        for site in sites:
            assert site.hello is not None
            check_client_level(site.name, site.hello.site_privacy, plan.site)
        return plan
    if p.level != "record":
        return None
    plan = PrivacyPlan("record", p.delta, p.accountant, config.federation.rounds,
                       config.protection.scheme, secure=p.secure)
    for site in sites:
        assert site.hello is not None
        if site.hello.record_privacy is None:
            raise ProtocolError(f"site {site.name!r} has not told its DP-SGD settings; a "
                                "private run needs every site (at least once) before it "
                                "starts.")
        plan.record[site.name] = site.hello.record_privacy
        plan.caps[site.name] = min(p.epsilon, site.hello.epsilon_cap,
                                   p.site_epsilon.get(site.name, math.inf))
    return plan


def check_client_level(site: str, told: dict[str, Any] | None, ours: SitePrivacy) -> None:
    """Refuse to start if `site` would clip or noise its update otherwise than planned."""
    if told is None:
        raise ProtocolError(f"site {site!r} has not told its client-level DP settings; it runs "
                            "another configuration than privacy.level = 'site'.")
    try:
        theirs = SitePrivacy(**told)
    except (TypeError, FedcareError) as exc:
        raise ProtocolError(f"site {site!r} told unreadable client-level DP settings "
                            f"({exc}).") from None
    same = replace(theirs, n_sites=ours.n_sites) == ours and (
        not ours.adaptive or theirs.update_noise_multiplier == ours.update_noise_multiplier)
    if same:
        return
    hint = ""
    if ours.adaptive and not ours.count_noise and theirs.n_sites != ours.n_sites:
        hint = (f" Adaptive clipping's default count noise is the expected cohort / 20, and "
                f"the site counts {theirs.n_sites} site(s) in the federation instead of "
                f"{ours.n_sites} (a site with its own data file knows only itself): set "
                "privacy.count_noise explicitly.")
    raise ConfigError(f"site {site!r} would clip and noise its update with {theirs}, but the "
                      f"aggregator plans {ours} for the federation's {ours.n_sites} sites; "
                      f"every site must run the federation's [privacy] settings.{hint}")


def evaluate_global(round_number: int, params: torch.Tensor, sites: Sequence[RemoteSite],
                    protection: Scheme, cohorts: dict[int, list[int]]) -> Metrics:
    """Pooled test metrics of the global model of `round_number`, from the sites' sums.

    Every connected site evaluates `params` on its held-out rows and sends its
    `metric_sums` through the run's protection scheme, in a protection session of
    its own (`EVALUATION_SESSIONS` + the round: fresh masks and keys): under
    ``secagg`` and ``ckks`` the aggregator learns only their sum, as of an
    update. Accuracy, balanced accuracy, Brier score and log loss follow
    exactly (`metrics_from_sums`); ROC AUC is the mean of the sites' AUCs.

    Parameters
    ----------
    cohorts : dict
        Session -> site indices asked; this evaluation's cohort is put there for
        the `FanOut`.

    Raises
    ------
    QuorumError
        If fewer sites answered than the scheme reveals a sum of (`min_contributors`).
    FedcareError
        If the protocol failed (nothing was revealed).
    """
    session_number = EVALUATION_SESSIONS + round_number
    cohort = [s.index for s in sites if s.node_id is not None]
    least = min_contributors(protection)
    if len(cohort) < least:
        raise QuorumError(f"{len(cohort)} site(s) connected; {protection.name} reveals only a "
                          f"sum of at least {least}.")
    cohorts[session_number] = cohort
    failures: dict[str, str] = {}

    exchange = relay(sites, session_number, failures)

    session = protection.aggregator_session(session_number, cohort, len(EVALUATION_SUMS))
    ready = set(session.setup(exchange))
    added = 0
    for i in cohort:
        if i not in ready:
            continue
        try:
            payload = sites[i].evaluate(params, session_number)
            if isinstance(payload, torch.Tensor) and not (
                    payload.shape == (len(EVALUATION_SUMS),) and all_finite(payload)):
                # Readable (plain): checked here, as `Aggregator.check_payload` does updates.
                raise ProtocolError(f"site {sites[i].name!r} sent test metrics of shape "
                                    f"{tuple(payload.shape)}, or non-finite; expected "
                                    f"{len(EVALUATION_SUMS)} finite sums.")
            session.add(i, payload)
            added += 1
        except FedcareError as exc:
            failures[sites[i].name] = str(exc)
    if added < least:
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise QuorumError(f"{added} site(s) sent their test metrics; {protection.name} reveals "
                          f"only a sum of at least {least} ({detail}).")
    return metrics_from_sums(session.reveal(exchange).to(torch.float64))


def evaluation_record(round_number: int, params: torch.Tensor, sites: Sequence[RemoteSite],
                      protection: Scheme, cohorts: dict[int, list[int]], *, public: bool,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """What ``metrics.jsonl`` and ``summary.json`` say of the evaluation of a round's model.

    ``pooled`` (`evaluate_global`'s metrics) and an empty ``sites`` (the
    aggregator sees no site's own metrics; each site logs its own), or, if it
    failed, ``evaluation_error``: the reason, which may name sites, only when
    cohorts are public (`cohorts_public`); the run goes on either way.
    """
    try:
        return {"pooled": evaluate_global(round_number, params, sites, protection, cohorts),
                "sites": {}}
    except FedcareError as exc:
        log(f"round {round_number}: the global model could not be evaluated: {exc}")
        return {"evaluation_error": str(exc) if public else
                "the evaluation failed; why (which may name sites) is in the coordinator's "
                "log only, since site-level DP protects who takes part."}


def evaluation_note(config: RunConfig) -> str:
    """How to read a deployed run's test metrics (``summary.json``, ``federated.note``)."""
    note = ("Accuracy, balanced accuracy, Brier score and log loss are those of all sites' "
            "test patients together, summed through the protection scheme. " + SITE_MEAN_AUC)
    level = config.privacy.level
    if level != "none":
        note += (f" Test metrics are exact measurements on the sites' held-out patients, not "
                 f"covered by the {level}-level differential privacy guarantee.")
    return note


def model_meta(config: RunConfig, model: FlatModel, sites: Sequence[RemoteSite],
               pooled: Standardization | None = None) -> dict[str, Any]:
    """What ``model.pt`` holds beside the parameters, as `fedcare run` writes it.

    The schema and input layout are the sites' (`SiteHello`; all must agree);
    ``standardization`` has each site whose standardisation is no statistic of
    its own rows: the schema's bounds or none (from its hello), or the
    federation's `pooled` moments (federated standardisation). The others keep
    theirs, and say so in ``standardization_note``.
    """
    hellos = [s.hello for s in sites if s.hello is not None]
    schemas = {json.dumps(h.schema, sort_keys=True) for h in hellos}
    layouts = {h.feature_names for h in hellos}
    if len(schemas) > 1 or len(layouts) > 1:
        raise ProtocolError("the sites encode their records with different schemas or input "
                            "layouts; they must share the federation's schema (and its "
                            "vocabularies).")
    standardization = {s.name: s.hello.standardization for s in sites
                       if s.hello is not None and s.hello.standardization is not None}
    if pooled is not None:
        standardization = {s.name: {"mean": list(pooled.mean), "std": list(pooled.std)}
                           for s in sites}
    meta: dict[str, Any] = {
        "spec": model.spec.to_dict(), "model": config.to_dict()["model"],
        "schema": hellos[0].schema if hellos else None,
        "feature_names": list(hellos[0].feature_names) if hellos else [],
        "standardization": standardization}
    kept = [s.name for s in sites if s.name not in standardization]
    if kept:
        meta["standardization_note"] = (
            f"site(s) {kept} standardise with the means and standard deviations of their own "
            "rows (data.standardize = \"site\"), which stay at the site.")
    return meta


def data_used(sites: Sequence[RemoteSite]) -> dict[str, Any]:
    """``summary.json``'s ``data``: what each site trained and tested on (no path), and a
    digest of the schema they share."""
    hellos = [s.hello for s in sites if s.hello is not None]
    schema = hellos[0].schema if hellos else None
    return {"schema_sha256": None if schema is None else hashlib.sha256(
                json.dumps(schema, sort_keys=True).encode()).hexdigest(),
            "sites": {s.name: s.hello.data if s.hello is not None else "unknown"
                      for s in sites}}


def previous_short_rounds(run_dir: Path | None, first_round: int) -> list[dict[str, Any]]:
    """Rounds before `first_round` that ran short of sites, from ``metrics.jsonl`` (a resumed
    run; only where the rounds' cohorts are public)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"round": r["round"], "sites": len(r.get("participants", [])),
             "of": len(r.get("participants", [])) + len(r["failures"]),
             "missing": sorted(r["failures"])}
            for r in rows if r.get("failures") and r["round"] < first_round]


def round_retries(settings: ServerSettings, privacy: PrivacyPlan | None) -> int:
    """How often a round below the quorum is tried again.

    Never with distributed client-level noise under plain protection: each
    site's noised update is readable by the aggregator, and asking it again
    would give a second noisy look that the epsilon against the aggregator
    (`PrivacyPlan.guarantee`) does not count.
    """
    if privacy is not None and privacy.site is not None and \
            privacy.site.noise == "distributed" and privacy.protection == "plain":
        return 0
    return settings.round_retries


def serve(grid: Grid, config: RunConfig, settings: ServerSettings,
          log: Callable[[str], None] = print,
          on_round: Callable[[torch.Tensor, RoundReport], None] | None = None
          ) -> FlowerRunResult:
    """Run (or resume) the federation of `config` over the nodes of `grid`."""
    started = time.perf_counter()
    f = config.federation
    if f.rounds < 1:
        raise ConfigError(f"federation.rounds must be >= 1; got {f.rounds}.")
    torch.set_num_threads(config.threads)
    messenger = Messenger(grid, settings.message_timeout)
    # The cohort the aggregator drew for the round tells the fan-out whom to ask ahead
    # (a random draw under client-level DP: `CohortKeeper`).
    # An evaluation's cohort is every site connected then (`evaluate_global`).
    evaluations: dict[int, list[int]] = {}
    fan_out = FanOut(messenger, lambda r: evaluations[r] if r in evaluations
                     else aggregator.cohort(r))
    roster = Roster(config, settings, messenger, fan_out, log)
    _wait_for_sites(grid, roster, config, settings, log)
    sites = roster.sites
    if f.min_sites > len(sites):
        raise ConfigError(f"federation.min_sites is {f.min_sites} but the federation has "
                          f"{len(sites)} site(s).")
    widths = {s.hello.n_features for s in sites if s.hello is not None}
    if len(widths) != 1:
        raise ProtocolError(f"the sites encode their records with different widths {widths}; "
                            "they must share the schema (and its vocabularies).")
    model = FlatModel(build_model(config.model, widths.pop()))
    params = model.init_params(torch_generator(config.seed, INIT))
    share_standardization(config, roster, messenger,
                          Path(settings.run_dir) if settings.run_dir else None, log)
    meta = model_meta(config, model, sites, roster.standardization)
    privacy = _privacy_plan(config, sites)
    protection = build_scheme(config.protection)
    aggregator = build_aggregator(config, model.spec, sites,
                                  protection=protection, privacy=privacy,
                                  noise_for=None if privacy is None else noise_factory(config),
                                  kind=CohortKeeper)
    ledger = aggregator.ledger
    retries = round_retries(settings, privacy)
    if retries < settings.round_retries:
        log("a round below the quorum is not retried: with distributed noise and plain "
            "protection the aggregator would read each site's noised update twice.")

    run_dir = Path(settings.run_dir) if settings.run_dir else None
    writer = audit = None
    payload_key: bytes | None = None
    first_round = 1
    if run_dir is not None:
        resuming = (run_dir / CHECKPOINT_FILE).exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if resuming:
            checkpoint = load_checkpoint(run_dir)
            first_round = int(checkpoint["round"]) + 1
            params = checkpoint["params"]
            aggregator.strategy.load_state_dict(checkpoint["strategy"])
            aggregator.clip_norm = float(checkpoint["clip_norm"])
            writer = RunWriter(run_dir, config, resume_round=first_round - 1)
            if ledger is not None:
                ledger.resume_from(run_dir / LEDGER_FILE, first_round - 1)
            log(f"resuming {run_dir} after round {first_round - 1}")
        else:
            writer = RunWriter(run_dir, config)
            if ledger is not None:
                ledger.persist_to(run_dir / LEDGER_FILE)
        audit = AuditLog(run_dir / AUDIT_LOG_FILE, resume=resuming)
        payload_key = audit_key(run_dir) if payload_digests_keyed(config) else None
        if resuming:
            audit.append("run_resumed", after_round=first_round - 1)
        else:
            log_run_started(audit, config, [s.name for s in sites], payload_key,
                            runtime="flower")

    reports: list[RoundReport] = []
    seconds: list[float] = []
    first_round_at: float | None = None
    public = cohorts_public(config)
    summary: dict[str, Any] = {
        "fedcare_version": __version__, "runtime": "flower", "status": "running",
        "dataset": config.data.dataset_name,
        "description": f"{config.data.dataset_name} data at {len(sites)} sites (deployed)",
        "data": data_used(sites),
        "strategy": f.strategy, "model": config.model.name,
        "n_parameters": model.spec.size, "seed": config.seed,
        "sites": [s.name for s in sites], "rounds_completed": first_round - 1,
        "protection": {"scheme": config.protection.scheme,
                       "sentence": WHO_SEES_WHAT[config.protection.scheme]},
    }
    short: list[dict[str, Any]] = previous_short_rounds(run_dir, first_round)

    def finish(status: str, error: str | None = None) -> None:
        if run_dir is None or writer is None or audit is None:
            return
        if error is not None:
            audit.append("run_failed", error=error)
        else:
            audit.append("run_completed", rounds=summary["rounds_completed"])
        writer.save_model(params, meta)
        summary.update(status=status, elapsed_seconds=time.perf_counter() - started,
                       audit_log=close_audit_log(audit), config=config.to_dict())
        summary.update(shortfall_summary(short, public=public))
        if public:
            # Bytes per site and round name each round's cohort: not under site-level DP.
            summary["traffic"] = traffic_summary(messenger.traffic)
        if error is not None:
            summary["error"] = error
        if privacy is not None and ledger is not None:
            summary["privacy"] = privacy.guarantee(ledger)
        writer.write_summary(summary)
        writer.close()
        write_report(run_dir)
        log(result_line(run_dir))

    try:
        for round_number in range(first_round, f.rounds + 1):
            tic = time.perf_counter()
            if round_number > first_round:
                roster.refresh(grid)  # a site that is gone is not asked; one back rejoins
            for attempt in range(retries + 1):
                messenger.attempt = attempt
                try:
                    params, report = aggregator.run_round(round_number, sites, params)
                    break
                except QuorumError as exc:
                    if attempt == retries:
                        raise QuorumError(f"{exc} Tried {attempt + 1} time(s); the run stops "
                                          f"after round {round_number - 1}, which is "
                                          "checkpointed: start the aggregator again to "
                                          "resume.") from None
                    log(f"round {round_number}: {exc} Retrying in {settings.retry_wait:g} s "
                        f"(try {attempt + 2} of {retries + 1}).")
                    time.sleep(settings.retry_wait)
                    roster.refresh(grid)
            if first_round_at is None:
                first_round_at = time.perf_counter()
            evaluation = evaluation_record(report.round, params, sites, protection,
                                           evaluations, public=public, log=log)
            if "pooled" in evaluation:
                summary["federated"] = {**evaluation, "note": evaluation_note(config)}
            seconds.append(time.perf_counter() - tic)
            reports.append(report)
            if report.failures:
                short.append({"round": report.round, "sites": len(report.participants),
                              "of": len(report.selected), "missing": sorted(report.failures)})
            if writer is not None and audit is not None:
                writer.log_round({**round_facts(report, public=public),
                                  **evaluation_facts(evaluation, public=public),
                                  "seconds": seconds[-1]})
                log_round_events(audit, report, params, ledger, payload_key)
                writer.save_checkpoint(report.round, params, aggregator.strategy.state_dict(),
                                       aggregator.clip_norm)
            summary["rounds_completed"] = report.round
            pooled = evaluation.get("pooled") or {}
            log(f"round {report.round}: " + (
                "released from noise alone (too few sites for a sum)" if report.empty else
                f"{len(report.participants)} of {len(report.selected)} sites, train loss "
                f"{report.train_loss:.4f}")
                + (f", accuracy {pooled['accuracy']:.3f}, ROC AUC (site mean) "
                   f"{pooled['roc_auc']:.3f}" if pooled else "")
                + (f", left out: {report.failures}" if report.failures else ""))
            if on_round is not None:
                on_round(params, report)
    except FedcareError as exc:
        finish("failed", str(exc))
        raise
    finish("completed")
    return FlowerRunResult(params, int(summary["rounds_completed"]), run_dir, reports,
                           messenger.traffic, seconds, started, first_round_at)


def traffic_summary(traffic: Traffic) -> dict[str, Any]:
    """Bytes per site and round, both directions (for summary.json and the benchmark)."""
    rows: dict[str, dict[str, dict[str, int]]] = {}
    for (site, round_number), sent in sorted(traffic.sent.items()):
        key = str(round_number) if round_number < EVALUATION_SESSIONS else \
            f"{round_number - EVALUATION_SESSIONS} (evaluation)"
        rows.setdefault(site or "(hello)", {})[key] = {
            "to_site": sent, "from_site": traffic.received.get((site, round_number), 0)}
    return rows


def server_main(config: RunConfig | None,
                on_finish: Callable[[FlowerRunResult], None] | None = None
                ) -> Callable[[Grid, Context], None]:
    """The ServerApp's main function: `serve` with the run configuration of the Flower run."""
    from fedcare.runtime.flower_site import run_config_of

    def main(grid: Grid, context: Context) -> None:
        quick_object_retries()
        run_config = run_config_of(context, config)
        settings = ServerSettings.from_run_config(dict(context.run_config))
        result = serve(grid, run_config, settings, log=_log)
        if on_finish is not None:
            on_finish(result)

    return main


def _log(text: str) -> None:
    from logging import INFO

    from flwr.supercore import log

    log(INFO, "[fedcare] %s", text)


def write_traffic(path: Path, traffic: Traffic) -> None:
    write_json(path, traffic_summary(traffic))
