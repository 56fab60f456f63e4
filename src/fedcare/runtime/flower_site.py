"""A site as a Flower ClientApp: one fedcare `Site` answering the aggregator's messages.

The node configuration of the site's SuperNode says which site it is and
where its data are (`NodeSettings`); the run configuration (``fedcare-config``,
the TOML of a `RunConfig`) says how the federation trains. Each message is
answered by the same `Site` methods the local runtime calls: ``exchange``
for the protection protocol, ``fit`` for a round's training; and ``evaluate``
(`SiteNode.evaluate`) for the new global model's counts and loss sums on the
site's test rows, protected like an update in a session of their own
(`EVALUATION_SESSIONS`). Nothing but the reply to a message leaves the node:
the reply is the protected payload, a protocol message of the scheme, or an
error text.

A site prepares its own rows only (`fedcare.data.datasets.split_sites`): the
same split, imputation and encoding as ``fedcare run`` gives it. Under federated
standardisation its rows wait for the pooled mean and std: it answers two
``sum`` messages (`MomentsRequest`, its moments protected like an update) and
then takes the statistics from a ``standardize`` message, or from the hello of
a run that computed them before it joined, and keeps them in the node state.

A SuperNode of Flower 1.42 runs every message in a new ClientApp process, so
a site's protection session (which holds that round's secrets, e.g. its
secagg private keys) is kept between the messages of a round in the node's
`Context.state`: `SessionStore` pickles it there. That state lives in the
SuperNode's memory on the site's own machine and is never sent to the
SuperLink.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import math
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcare.config import RunConfig
from fedcare.data.datasets import split_sites
from fedcare.data.preprocess import (
    Standardize,
    count_and_sums,
    encode_site,
    squared_deviations,
    standardize_sites,
)
from fedcare.data.site_data import FederatedData, SiteData
from fedcare.errors import (
    ConfigError,
    DataError,
    FedcareError,
    JobRefused,
    MessageRefused,
    ProtocolError,
    SchemaError,
)
from fedcare.evaluation import binary_metrics, metric_sums
from fedcare.federation.site import FitInstructions, Site
from fedcare.federation.training import LocalTrainer
from fedcare.models import FlatModel, build_model
from fedcare.privacy.dpsgd import RecordPrivacy
from fedcare.privacy.plan import build_privacy_plan, build_site_level_plan, noise_factory
from fedcare.privacy.policy import PolicyRefused, SitePolicy
from fedcare.privacy.site_ledger import Release, SiteLedger, training_release
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection import build_scheme
from fedcare.protection.base import AggregatorSession, Scheme, SiteSession
from fedcare.protection.identity import SiteIdentity
from fedcare.runtime.flower_wire import from_record, to_record

RUN_CONFIG_KEY = "fedcare-config"
"""Run configuration key holding the TOML of the federation's `RunConfig`."""
HEADER = "fedcare-header"
"""Config record of every message: kind, round, attempt, addressed site and its index."""
ERROR = "fedcare-error"
"""Config record of a reply that refuses: the fedcare error's class and message."""
SESSION = "fedcare-session"
"""Context state record holding this site's protection session between messages."""

STANDARDIZATION = "fedcare-standardization"
"""Context state record holding the federation's pooled mean and std (federated
standardisation), so every later message's process encodes the site's rows with them."""

HELLO, EXCHANGE, FIT, EVALUATE = ("query.fedcare_hello", "query.fedcare_exchange", "train",
                                  "evaluate")
SUM, STANDARDIZE = "sum", "standardize"
"""Message kinds of federated standardisation (sent as `EXCHANGE` messages)."""
EVALUATION_SESSIONS = 1 << 62
"""The protection session of the evaluation of round ``r``'s global model is
``EVALUATION_SESSIONS + r``: its own masks and keys (secagg binds the number into every
key), never those of a training round, whose numbers stay below it."""

SIMULATION_POLICY = SitePolicy(seeded_noise=True, central_noise=True)
"""The policy of a node in Flower's simulation engine: no hospital, no caps of its own, any
noise the configuration asks for (the local runtime's behaviour), a ledger in memory."""


# --------------------------------------------------------------------------- node config
@dataclass(frozen=True)
class NodeSettings:
    """What a site's SuperNode is told about itself (``--node-config``).

    Attributes
    ----------
    site : str
        The site's name (``site="cleveland"``); in Flower's simulation engine,
        empty: the site is the one at position ``partition-id``.
    data_file : str
        This site's CSV or Parquet file (``data-file=...``); empty: the site is
        one of the bundled dataset's sites.
    epsilon_cap : float
        The site's own cap on its record-level epsilon (``epsilon-cap=0.5``);
        its DP-SGD noise is calibrated to the smaller of this and
        ``privacy.epsilon``. ``inf``: no cap of its own.
    keys : str
        Directory holding ``site.ckks`` (``keys=...``), for ``protection.scheme = "ckks"``.
    partition : int
        Simulation only: Flower's ``partition-id``.
    policy : str
        The hospital's privacy policy file (``policy=...``, `SitePolicy`), which
        names the site ledger; ``fedcare site`` writes it. Empty: in Flower's
        simulation engine `SIMULATION_POLICY`; in a deployment the default
        `SitePolicy` with no ledger, which refuses every private job.
    ca, certificate, identity_key : str
        ``ca.crt``, ``NAME.crt`` and ``NAME.key`` (``ca=... certificate=...
        identity-key=...``): the site's certified identity, with which it signs
        its secagg keys and checks every other site's (`SiteIdentity`). Empty:
        no identity (simulation, insecure loopback tests).
    """

    site: str = ""
    data_file: str = ""
    epsilon_cap: float = math.inf
    keys: str = ""
    partition: int = -1
    policy: str = ""
    ca: str = ""
    certificate: str = ""
    identity_key: str = ""

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        def text(key: str) -> str:
            value = node_config.get(key, "")
            if not isinstance(value, str):
                raise ConfigError(f"node config {key!r} must be a string (quote it: "
                                  f"{key}=\"...\"); found {value!r}.")
            return value

        cap = node_config.get("epsilon-cap", math.inf)
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not cap > 0:
            raise ConfigError(f"node config 'epsilon-cap' must be a number > 0; found {cap!r}.")
        partition = node_config.get("partition-id", -1)
        if not isinstance(partition, int):
            raise ConfigError(f"node config 'partition-id' must be an integer; found "
                              f"{partition!r}.")
        settings = cls(text("site"), text("data-file"), float(cap), text("keys"), partition,
                       text("policy"), text("ca"), text("certificate"), text("identity-key"))
        given = [bool(settings.ca), bool(settings.certificate), bool(settings.identity_key)]
        if any(given) and not all(given):
            raise ConfigError("node config 'ca', 'certificate' and 'identity-key' go together "
                              "(the site's certified identity); one is missing.")
        if not settings.site and settings.partition < 0:
            raise ConfigError("this SuperNode's node config names no site: start it with "
                              "--node-config 'site=\"NAME\" ...' (fedcare site does this).")
        return settings

    def identity(self) -> SiteIdentity | None:
        """The site's certified identity (None without one), checked to name this site."""
        if not self.certificate:
            return None
        identity = SiteIdentity.load(ca=self.ca, certificate=self.certificate,
                                     key=self.identity_key)
        if identity.name != self.site:
            raise ConfigError(f"certificate {self.certificate} names site {identity.name!r}; "
                              f"this node is site {self.site!r}.")
        return identity

    def site_policy(self) -> SitePolicy:
        """The hospital's policy, with the node's ``epsilon-cap`` folded into its job cap."""
        if self.policy:
            policy = SitePolicy.load(self.policy)
        elif self.site:
            policy = SitePolicy()
        else:
            policy = SIMULATION_POLICY
        if self.epsilon_cap < policy.epsilon:
            policy = replace(policy, epsilon=self.epsilon_cap)
        return policy

    def apply(self, config: RunConfig) -> RunConfig:
        """The federation's config as this site runs it: its data, keys and cap."""
        local = RunConfig.from_dict(config.to_dict())
        if self.data_file:
            local.data.dataset, local.data.files, local.data.data_dir = "files", [
                self.data_file], ""
        if self.keys:
            local.protection.keys = self.keys
        return local


def run_config_of(context: Context, default: RunConfig | None) -> RunConfig:
    """The federation's `RunConfig`: from the run configuration, else `default`."""
    text = context.run_config.get(RUN_CONFIG_KEY)
    if text is None:
        if default is None:
            raise JobRefused(f"the Flower run configuration holds no {RUN_CONFIG_KEY!r}; "
                              "start the run with `fedcare serve` (it writes it).")
        return default
    if not isinstance(text, str):
        raise JobRefused(f"run config {RUN_CONFIG_KEY!r} must be the TOML text of a fedcare "
                          "config.")
    import tomllib

    try:
        return RunConfig.from_dict(tomllib.loads(text), source=f"run config {RUN_CONFIG_KEY}")
    except tomllib.TOMLDecodeError as exc:
        raise JobRefused(f"run config {RUN_CONFIG_KEY!r} is not valid TOML: {exc}.") from None


# --------------------------------------------------------------------------- the site node
@dataclass(frozen=True)
class SiteHello:
    """A site's introduction, its answer to the aggregator's first message.

    Attributes
    ----------
    site : str
    n_features : int
        Width of the encoded inputs (fixes the model's layout; checked equal across sites).
    record_privacy : RecordPrivacy or None
        DP-SGD settings the site calibrated for itself (record level), from
        which the aggregator's ledger plans each round's spend.
    epsilon_cap : float
        The site's cap (``inf``: only ``privacy.epsilon``).
    site_privacy : dict or None
        Client-level DP settings the site calibrated for itself (the fields of
        `SitePrivacy`), with which it clips and noises its update; the
        aggregator checks them against its own before the first round.
    """

    site: str
    n_features: int
    record_privacy: RecordPrivacy | None
    epsilon_cap: float
    site_privacy: dict[str, Any] | None = None
    n_numeric: int = 0
    """Numeric columns, which federated standardisation sums moments of."""
    schema: dict[str, Any] | None = None
    """The schema the site encoded its records with (`Schema.to_dict`), for ``model.pt``."""
    feature_names: tuple[str, ...] = ()
    """The model's inputs after encoding, in order."""
    standardization: dict[str, list[float]] | None = None
    """``mean`` and ``std`` the site applied to its numeric columns, when they are no
    statistic of its own rows (the schema's bounds, or none); None when they are
    (``data.standardize = "site"``: those stay at the site) or are the federation's pooled
    ones (sent after the hello; the aggregator has them)."""
    data: str = ""
    """What the site trained and tested on, in words that name no path."""


@dataclass(frozen=True)
class MomentsRequest:
    """The aggregator asks for a site's part of a federated standardisation sum.

    Step 1: ``[n, sum x_j]`` over the site's training rows; step 2:
    ``sum (x_j - mean_j)^2`` with the pooled `mean` step 1 gave
    (`fedcare.data.preprocess.federated_mean_std`). The site protects it with
    the run's scheme; the aggregator sees only the sum.
    """

    step: int
    mean: tuple[float, ...] = ()


@dataclass(frozen=True)
class Standardization:
    """The federation's pooled mean and std of the numeric columns, sent to every site."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


class SiteNode:
    """What a site process builds once: its policy, data, model, trainer, privacy and protection.

    The federation's configuration is the coordinator's; the site runs it only as
    far as its own `SitePolicy` allows (`SitePolicy.admit`), calibrates its own
    noise from its own cap, and charges each release to its own `SiteLedger`
    before computing it (`charge`).

    Parameters
    ----------
    config : RunConfig
        The federation's configuration (as the aggregator sent it).
    settings : NodeSettings

    Raises
    ------
    PolicyRefused
        If the job would weaken the site's policy.
    """

    def __init__(self, config: RunConfig, settings: NodeSettings) -> None:
        self.settings = settings
        self.policy = policy = settings.site_policy()
        self.job = job_id(config)
        self.ledger = SiteLedger(Path(policy.ledger) if policy.ledger else None, policy)
        self.config = local = settings.apply(policy.admit(config))
        private = local.privacy.level != "none"
        if private and settings.site and self.ledger.path is None:
            raise PolicyRefused(
                "the job is private, but this site keeps no ledger of what it releases: start "
                "it with `fedcare site` (or give its SuperNode --node-config policy=FILE, a "
                "site policy naming a ledger).")
        torch.set_num_threads(local.threads)
        split = split_sites(local.data, private=private)
        names = split.names
        if settings.site:
            if settings.site not in names:
                raise ConfigError(f"this node is site {settings.site!r}, but its data hold "
                                  f"site(s) {names}; check --node-config site= and data-file=.")
            position = names.index(settings.site)
        else:
            if not 0 <= settings.partition < len(names):
                raise ConfigError(f"partition-id {settings.partition} is not a site of the "
                                  f"{len(names)} in the data.")
            position = settings.partition
        # Only this site's rows from here on (a simulation node loads the bundled sites).
        self.tables = split.splits[position]
        self.schema = split.schema
        self.standardize = split.standardize
        self.name = self.tables[0].name
        self.standardization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        """The mean and std this site's numeric columns are standardised with (None: the
        federation's pooled ones have not arrived yet)."""
        self._data: SiteData | None = None
        if split.standardize is not Standardize.FEDERATED or not split.schema.numeric:
            [self._data], stats = standardize_sites([self.tables], split.schema,
                                                    split.standardize)
            self.standardization = (tuple(stats[self.name]["mean"]),
                                    tuple(stats[self.name]["std"]))
        self.n_features = len(split.schema.encoded_feature_names())
        self.source = ("its own data file (the path stays at the site)"
                       if local.data.dataset_name == "files"
                       else f"its part of {split.description}")
        data = FederatedData(split.schema, split.schema.encoded_feature_names(),
                             [] if self._data is None else [self._data], split.description,
                             {})
        self.trainer = LocalTrainer(FlatModel(build_model(local.model, self.n_features)),
                                    local.privacy.clipping)
        self.record_privacy: RecordPrivacy | None = None
        self.site_privacy: SitePrivacy | None = None
        self.noise_for = None
        if local.privacy.level == "site":
            plan = build_site_level_plan(local, names)
            assert plan.site is not None
            self.site_privacy = plan.site
            self.noise_for = noise_factory(local)
        elif private:
            self.record_privacy = self._record_level(local, data)
            self.noise_for = noise_factory(local)
        self.epsilon_cap = min(local.privacy.epsilon,
                               local.privacy.site_epsilon.get(self.name, math.inf))
        self.protection = build_scheme(local.protection, identity=settings.identity())

    def _record_level(self, config: RunConfig, data: FederatedData) -> RecordPrivacy:
        """This site's DP-SGD, calibrated here to its own cap (`SitePolicy.admit` lowered it).

        A ``privacy.noise_multiplier`` in the job is taken only if it is larger than the
        site's own calibration: more noise never weakens the site's guarantee.
        """
        asked = config.privacy.noise_multiplier
        own = RunConfig.from_dict(config.to_dict())
        own.privacy.noise_multiplier = 0.0
        cap = min(own.privacy.epsilon, own.privacy.site_epsilon.get(self.name, math.inf))
        own.privacy.site_epsilon = {self.name: cap}
        plan = build_privacy_plan(own, data)
        assert plan is not None
        calibrated = plan.record[self.name]
        if asked > calibrated.noise_multiplier:
            return replace(calibrated, noise_multiplier=asked)
        return calibrated

    @property
    def data(self) -> SiteData:
        """This site's encoded records; under federated standardisation, once the pooled
        statistics arrived (`standardize_with`)."""
        if self._data is None:
            raise ProtocolError(f"site {self.name!r} has not received the federation's "
                                "standardisation (data.standardize = \"federated\") yet; the "
                                "aggregator sends it before the first round.")
        return self._data

    def moments(self, request: MomentsRequest) -> np.ndarray:
        """This site's contribution to a federated standardisation sum, from its own rows."""
        if self.standardize is not Standardize.FEDERATED:
            raise ProtocolError(f"site {self.name!r} standardises with "
                                f"{self.standardize.value!r}, not from federated moments; its "
                                "configuration differs from the aggregator's.")
        train = self.tables[0]
        if request.step == 1:
            return count_and_sums(train)
        mean = np.asarray(request.mean, dtype=np.float64)
        if request.step != 2 or mean.shape != (len(self.schema.numeric),) \
                or not np.isfinite(mean).all():
            raise ProtocolError(f"site {self.name!r}: a moments request must be step 1, or "
                                f"step 2 with {len(self.schema.numeric)} finite means; got "
                                f"step {request.step} with {mean.shape[0]} value(s).")
        return squared_deviations(train, mean)

    def standardize_with(self, stats: Standardization) -> None:
        """Encode this site's rows with the federation's pooled mean and std."""
        mean, std = (np.asarray(v, dtype=np.float64) for v in (stats.mean, stats.std))
        p = len(self.schema.numeric)
        if self.standardize is not Standardize.FEDERATED or mean.shape != (p,) \
                or std.shape != (p,) or not (np.isfinite(mean).all()
                                             and (np.isfinite(std) & (std > 0)).all()):
            raise ProtocolError(f"site {self.name!r}: refused a standardisation of "
                                f"{mean.shape[0]} means and {std.shape[0]} standard deviations "
                                f"(expected {p} finite means and positive deviations, under "
                                "data.standardize = \"federated\").")
        if self.standardization == (stats.mean, stats.std):
            return
        self._data = encode_site(*self.tables, self.schema, mean, std)
        self.standardization = (stats.mean, stats.std)

    def release(self, round_number: int, *, local_epochs: int,
                cohort: int) -> Release | None:
        """What a round of training releases from this site (`training_release`)."""
        return training_release(self.job, round_number, record=self.record_privacy,
                                site=self.site_privacy, local_epochs=local_epochs,
                                cohort=cohort, protection=self.config.protection.scheme)

    def hello(self) -> SiteHello:
        """The site's introduction, once the whole job is shown to fit its policy's caps."""
        f = self.config.federation
        worst_cohort = self.site_privacy.n_sites if self.site_privacy is not None else 0
        planned = [self.release(r, local_epochs=f.local_epochs, cohort=worst_cohort)
                   for r in range(1, f.rounds + 1)]
        self.ledger.check_job(self.job, [r for r in planned if r is not None])
        client_level = None if self.site_privacy is None else asdict(self.site_privacy)
        return SiteHello(self.name, self.n_features, self.record_privacy, self.epsilon_cap,
                         client_level, len(self.schema.numeric), self.schema.to_dict(),
                         tuple(self.schema.encoded_feature_names()), self._applied(),
                         self.source)

    def _applied(self) -> dict[str, list[float]] | None:
        """The standardisation the hello names: none of the site's own statistics."""
        if self.standardize in (Standardize.SITE, Standardize.FEDERATED) or \
                self.standardization is None:
            return None
        mean, std = self.standardization
        return {"mean": list(mean), "std": list(std)}

    def charge(self, instructions: FitInstructions) -> None:
        """Charge a round to the site ledger before training; refuse what the policy forbids."""
        policy = self.policy
        if policy.max_rounds and instructions.round > policy.max_rounds:
            raise PolicyRefused(f"round {instructions.round} was asked; this site's policy "
                                f"allows at most {policy.max_rounds} (max_rounds).")
        if policy.max_local_epochs and instructions.plan.epochs > policy.max_local_epochs:
            raise PolicyRefused(f"round {instructions.round} asks for "
                                f"{instructions.plan.epochs} local epochs; this site's policy "
                                f"allows at most {policy.max_local_epochs} (max_local_epochs).")
        release = self.release(instructions.round, local_epochs=instructions.plan.epochs,
                               cohort=instructions.cohort)
        if release is not None:
            self.ledger.charge([release])

    def evaluate(self, params: torch.Tensor, round_number: int) -> torch.Tensor:
        """`metric_sums` of the global model of `round_number` on this site's test rows.

        The site's own metrics go to its own log (stderr), for its operator; only their
        protected sum leaves the site.
        """
        model = self.trainer.model
        model.load(params)
        logits = model.predict_logits(self.data.x_test)
        metrics = binary_metrics(logits, self.data.y_test)
        print(f"fedcare: site {self.name!r}: the global model of round {round_number} on its "
              f"{metrics['n']} test patients: accuracy {metrics['accuracy']:.3f}, ROC AUC "
              f"{metrics['roc_auc']:.3f}", file=sys.stderr, flush=True)
        return metric_sums(logits, self.data.y_test)

    def site(self, index: int, protection: Scheme) -> Site:
        return Site(self.data, self.trainer, index=index, seed=self.config.seed,
                    protection=protection, record_privacy=self.record_privacy,
                    site_privacy=self.site_privacy, noise_for=self.noise_for)


def job_id(config: RunConfig) -> str:
    """The job's identity at a site: a digest of the coordinator's configuration.

    The same job restarted by the coordinator keeps it, so the policy's per-job cap
    spans every attempt; a changed configuration is another job, bounded by the
    site's lifetime cap.
    """
    return hashlib.sha256(config.to_toml().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- session state
def _x25519_private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def _reduce_x25519(key: X25519PrivateKey) -> tuple[Callable[[bytes], X25519PrivateKey],
                                                   tuple[bytes]]:
    return _x25519_private_key, (key.private_bytes_raw(),)


_SAFE_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "bytes", "bytearray"})


class _SessionUnpickler(pickle.Unpickler):
    """Rebuilds only fedcare objects: the state is the node's own, but a bug never runs code."""

    def __init__(self, data: bytes, shared: dict[str, object]) -> None:
        super().__init__(io.BytesIO(data))
        self.shared = shared

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("fedcare.") or (module == "builtins" and name in _SAFE_BUILTINS):
            return super().find_class(module, name)
        raise ProtocolError(f"the saved protection session names {module}.{name}; refused.")

    def persistent_load(self, pid: Any) -> object:
        return self.shared[str(pid)]


class SessionStore:
    """A `Scheme` (site side) whose round session survives from one message to the next.

    The session is pickled into ``context.state`` after each message and
    restored by the next message of the same round and attempt. The scheme's
    own key material (e.g. the CKKS secret-key context) is not copied into
    the state: it is referred to and taken from the scheme again.

    Parameters
    ----------
    scheme : Scheme
    state : RecordDict
        The node's `Context.state`.
    attempt : int
        Which try of the round this is; a retried round starts a fresh session.
    """

    def __init__(self, scheme: Scheme, state: RecordDict, attempt: int) -> None:
        self.scheme = scheme
        self.name = scheme.name
        self.state = state
        self.attempt = attempt
        self._live: tuple[int, int, SiteSession] | None = None
        self._shared = {name: value for name, value in vars(scheme).items()
                        if not isinstance(value, str | bytes | int | float | bool | type(None))}

    def site_session(self, round_number: int, site: int) -> SiteSession:
        if self._live is None or self._live[:2] != (round_number, site):
            self._live = (round_number, site, self._restore(round_number, site)
                          or self.scheme.site_session(round_number, site))
        return self._live[2]

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> AggregatorSession:
        raise ProtocolError("a site does not aggregate")

    def _restore(self, round_number: int, site: int) -> SiteSession | None:
        record = self.state.config_records.get(SESSION)
        if record is None or (record.get("round"), record.get("attempt"), record.get("site")) \
                != (round_number, self.attempt, site):
            return None
        data = record.get("session")
        assert isinstance(data, bytes)
        session = _SessionUnpickler(data, self._shared).load()
        return session  # type: ignore[no-any-return]

    def save(self) -> None:
        """Keep the live session in the node state (nothing to do if there is none)."""
        if self._live is None:
            return
        round_number, site, session = self._live
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = copyreg.dispatch_table.copy()
        pickler.dispatch_table[type(X25519PrivateKey.generate())] = _reduce_x25519
        by_id = {id(value): name for name, value in self._shared.items()}
        pickler.persistent_id = lambda obj: by_id.get(id(obj))  # type: ignore[method-assign]
        pickler.dump(session)
        self.state[SESSION] = ConfigRecord({"round": round_number, "attempt": self.attempt,
                                            "site": site, "session": buffer.getvalue()})


# --------------------------------------------------------------------------- answering
CATEGORIES: tuple[tuple[type[FedcareError], str], ...] = (
    (SchemaError, "its data do not match the federation's schema"),
    (DataError, "its data cannot be used as given"),
    (ConfigError, "it cannot run the job with its local setup"),
    (ProtocolError, "a protocol check failed at the site"),
)
"""What the coordinator is told of a site's error that is not `FedcareError.public`."""


def error_reply(message: Message, exc: FedcareError, site: str = "") -> Message:
    """The site's refusal: the whole message in its own log, to the coordinator only what
    is public (a bad cell's value, an overflow's coordinate or a file's path is not)."""
    where = f"site {site!r}" if site else "the site"
    if exc.public:
        text = str(exc)
    else:
        category = next((words for kind, words in CATEGORIES if isinstance(exc, kind)),
                        "it refused the message")
        text = (f"{where}: {category} ({type(exc).__name__}); the details, which may name "
                "its records or files, are in the site's own log.")
    print(f"fedcare: {where} refused a {message.metadata.message_type} message: "
          f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    content = RecordDict({ERROR: ConfigRecord({"type": type(exc).__name__, "message": text})})
    return Message(content, reply_to=message)


def receive_standardization(body: object, node: SiteNode, state: RecordDict) -> object:
    """Take the federation's pooled statistics if `body` carries them (a ``standardize``
    message, or the hello of a site that joins after they were computed); keep them in the
    node state. Returns `body`, the acknowledgement."""
    if body is None:
        return None
    if not isinstance(body, Standardization):
        raise MessageRefused(f"a hello or standardize message carries a "
                             f"{type(body).__name__}; expected a Standardization or nothing.")
    node.standardize_with(body)
    state[STANDARDIZATION] = ConfigRecord({"mean": list(body.mean), "std": list(body.std)})
    return body


def recall_standardization(state: RecordDict, node: SiteNode) -> None:
    """Encode the site's rows with the pooled statistics an earlier message left in the
    node state (each message runs in a new process)."""
    record = state.config_records.get(STANDARDIZATION)
    if record is None or node.standardization is not None:
        return
    mean, std = record.get("mean"), record.get("std")
    if not (isinstance(mean, list) and isinstance(std, list)):
        raise ProtocolError(f"the node state's {STANDARDIZATION!r} record is unreadable; "
                            "restart the SuperNode to clear it.")
    node.standardize_with(Standardization(tuple(float(v) for v in mean),
                                          tuple(float(v) for v in std)))


def answer(message: Message, context: Context, node: SiteNode) -> Message:
    """The site's reply to one message of the aggregator (see the module docstring)."""
    header = message.content.config_records.get(HEADER)
    try:
        if header is None:
            raise MessageRefused("a message without a fedcare header arrived; refused.")
        addressed = str(header["site"])
        if addressed and addressed != node.name:
            raise MessageRefused(f"this node is site {node.name!r}, but the message was "
                                f"addressed to site {addressed!r}; refused.")
        kind = str(header["kind"])
        recall_standardization(context.state, node)
        if kind in ("hello", STANDARDIZE):
            reply: object = receive_standardization(from_record(message.content), node,
                                                    context.state)
            if kind == "hello":
                reply = node.hello()
        else:
            round_number, index = int(header["round"]), int(header["index"])  # type: ignore[arg-type]
            sessions = SessionStore(node.protection, context.state, int(header["attempt"]))  # type: ignore[arg-type]
            body = from_record(message.content)
            if not (isinstance(body, tuple) and len(body) == 2 and isinstance(body[0], tuple)):
                raise MessageRefused("a fedcare message must carry (earlier messages, body).")
            before, body = body
            for earlier in before:  # delivered late, in order (their replies are None)
                if sessions.site_session(round_number, index).handle(earlier) is not None:
                    raise MessageRefused(f"{type(earlier).__name__} was sent ahead but needs "
                                        "a reply.")
            evaluation = round_number >= EVALUATION_SESSIONS
            if kind == "exchange":
                reply = sessions.site_session(round_number, index).handle(body)
            elif kind == "evaluate":
                if not (evaluation and isinstance(body, torch.Tensor)):
                    raise MessageRefused("an evaluation message must carry the global "
                                         "parameters, in an evaluation session.")
                sums = node.evaluate(body, round_number - EVALUATION_SESSIONS)
                reply = sessions.site_session(round_number, index).protect(sums)
            elif evaluation:
                raise MessageRefused(f"a {kind} message in an evaluation session; refused.")
            elif kind == SUM:
                if not isinstance(body, MomentsRequest):
                    raise MessageRefused("a sum message must carry a MomentsRequest.")
                reply = sessions.site_session(round_number, index).protect(
                    torch.from_numpy(node.moments(body)))
            elif kind == "fit":
                if not (isinstance(body, tuple) and len(body) == 2
                        and isinstance(body[0], torch.Tensor)
                        and isinstance(body[1], FitInstructions)):
                    raise MessageRefused("a fit message must carry (global parameters, "
                                        "FitInstructions).")
                params, instructions = body
                if instructions.round != round_number:
                    raise MessageRefused(f"fit instructions of round {instructions.round} "
                                        f"arrived in round {round_number}.")
                node.charge(instructions)
                reply = node.site(index, sessions).fit(params, instructions)
            else:
                raise MessageRefused(f"unknown fedcare message kind {kind!r}.")
            sessions.save()
    except FedcareError as exc:
        return error_reply(message, exc, node.name)
    content = to_record(reply)
    return Message(content, reply_to=message)
