"""Protection schemes in the runtime: same model as plain, dropouts, and what leaves a site."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.experiment import run_experiment
from fedcare.federation.aggregator import RoundReport
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.protection import build_scheme
from fedcare.protection.base import Scheme, SiteSession
from fedcare.protection.ckks import (
    CkksPayload,
    CkksScheme,
    DecryptRequest,
    KeyCheck,
    create_site_context,
    generate_keys,
)
from fedcare.protection.secagg import (
    KeyAdvertisement,
    MaskedInput,
    ShareBundle,
    UnmaskResponse,
)
from fedcare.runtime.local import LocalRuntime

pytestmark = pytest.mark.filterwarnings("ignore::fedcare.privacy.noise.InsecureNoiseWarning")


def config(scheme: str, **values: Any) -> RunConfig:
    c = RunConfig()
    c.baselines.enabled = False
    c.federation.rounds = 3
    c.protection.scheme = scheme
    c.privacy.secure = False
    for key, value in values.items():
        c.set_value(key.replace("__", "."), value)
    return c


class RecordingScheme:
    """Wraps a scheme's site sessions to keep each plaintext payload before protection."""

    def __init__(self, inner: Scheme) -> None:
        self.inner = inner
        self.name = inner.name
        self.plaintexts: list[torch.Tensor] = []

    def site_session(self, round_number: int, site: int) -> SiteSession:
        session = self.inner.site_session(round_number, site)
        outer = self

        class Recording:
            def handle(self, message: object) -> object:
                return session.handle(message)

            def protect(self, payload: torch.Tensor) -> object:
                outer.plaintexts.append(payload.clone())
                return session.protect(payload)

            def require_contributors(self, needed: int, *, cohort: int) -> None:
                session.require_contributors(needed, cohort=cohort)

        return Recording()

    def aggregator_session(self, round_number: int, cohort: Sequence[int], length: int) -> Any:
        return self.inner.aggregator_session(round_number, cohort, length)


class Wire:
    """A site as the aggregator reaches it; keeps every object the site sends."""

    def __init__(self, site: Site, fail_at: dict[int, str] | None = None) -> None:
        self.site = site
        self.sent: list[object] = []
        self.fail_at = fail_at or {}  # round -> "setup" | "fit" | "reveal"

    @property
    def name(self) -> str:
        return self.site.name

    def planned_spend(self, round_number: int, plan: Any) -> Any:
        return self.site.planned_spend(round_number, plan)

    def exchange(self, round_number: int, message: object) -> object:
        step = "reveal" if type(message).__name__ in ("UnmaskRequest", "DecryptRequest") \
            else "setup"
        if self.fail_at.get(round_number) == step:
            raise ProtocolError(f"{self.name}: connection lost ({step})")
        reply = self.site.exchange(round_number, message)
        self.sent.append(reply)
        return reply

    def fit(self, params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        if self.fail_at.get(instructions.round) == "fit":
            raise ProtocolError(f"{self.name}: connection lost (fit)")
        result = self.site.fit(params, instructions)
        self.sent.append(result)
        return result


def run(c: RunConfig, fail_at: dict[str, dict[int, str]] | None = None,
        ) -> tuple[torch.Tensor, list[RoundReport], list[Wire], RecordingScheme]:
    runtime = LocalRuntime(build_federation(c.data, private=c.privacy.level != "none"), c)
    recording = RecordingScheme(runtime.aggregator.protection)  # the same keys
    for site in runtime.sites:
        site.protection = recording
    wires = [Wire(s, (fail_at or {}).get(s.name)) for s in runtime.sites]
    reports: list[RoundReport] = []
    params = runtime.aggregator.fit(wires, runtime.initial_params(), c.federation.rounds,
                                    lambda p, r: reports.append(r))
    return params, reports, wires, recording


def test_secagg_trains_the_same_model_as_plain() -> None:
    plain, _, _, _ = run(config("plain"))
    masked, reports, _, _ = run(config("secagg"))
    # Fixed point with 32 fractional bits: each summed value is exact to 2^-32.
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-6)
    assert all(len(r.participants) == 4 for r in reports)


@pytest.mark.parametrize("step", ["fit", "reveal"])
def test_secagg_round_survives_a_site_dropping(step: str) -> None:
    # va drops in round 2 after sharing its keys (fit) or after sending its masked
    # input (reveal): 3 of 4 sites remain, above the threshold of 3.
    dropped, reports, _, _ = run(config("secagg"), {"va": {2: step}})
    assert "va" in reports[1].failures if step == "fit" else "va" in reports[1].participants
    if step == "fit":
        reference, _, _, _ = run(config("plain"), {"va": {2: "fit"}})
        torch.testing.assert_close(dropped, reference, rtol=0, atol=1e-6)


def test_secagg_below_threshold_reveals_nothing() -> None:
    c = config("secagg", protection__threshold=1.0)
    with pytest.raises(QuorumError, match="the threshold is 4"):
        run(c, {"va": {1: "fit"}})


def test_secagg_needs_two_sites_per_round() -> None:
    c = config("secagg", data__dataset="breast-cancer", data__partition="iid", data__sites=4,
               federation__fraction=0.25)
    with pytest.raises(QuorumError, match="at least 2 selected sites"):
        run(c)


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"protection.scheme must be one of"):
        build_scheme(config("rot13").protection)


def test_secagg_carries_distributed_client_level_noise() -> None:
    c = config("secagg", data__dataset="breast-cancer", data__partition="iid", data__sites=8,
               privacy__level="site", privacy__noise="distributed", privacy__epsilon=8.0,
               privacy__clip_norm=0.5)
    params, reports, _, _ = run(c)
    assert torch.isfinite(params).all()
    assert all(r.participants for r in reports)


def sent_bytes(message: object) -> bytes:
    return pickle.dumps(message)


def encodings(plaintext: torch.Tensor) -> list[bytes]:
    """Ways a plaintext vector could appear in a byte stream."""
    x = plaintext.double()
    fixed = torch.round(x * 2.0**32).to(torch.int64)
    return [plaintext.float().numpy().tobytes(), x.numpy().tobytes(), fixed.numpy().tobytes()]


ALLOWED = {
    "plain": {FitResult: torch.Tensor},
    # ckks: the key check, the ciphertext, and (from the one site asked) the flooded sum
    "ckks": {FitResult: CkksPayload, KeyCheck: None, torch.Tensor: None},
    "secagg": {FitResult: MaskedInput, KeyAdvertisement: None, ShareBundle: None,
               UnmaskResponse: None, type(None): None},
}


@pytest.mark.parametrize("scheme", ["plain", "secagg", "ckks"])
def test_only_the_protected_payload_and_protocol_metadata_leave_a_site(scheme: str) -> None:
    _, _, wires, recording = run(config(scheme))
    assert len(recording.plaintexts) == 3 * 4
    everything = b"".join(sent_bytes(m) for w in wires for m in w.sent)
    for wire in wires:
        for message in wire.sent:
            assert type(message) in ALLOWED[scheme], (scheme, type(message))
            if isinstance(message, FitResult):
                # the payload in the scheme's form, then metadata: name, size, loss
                assert isinstance(message.payload, ALLOWED[scheme][FitResult])
                assert [f.name for f in fields(message)] == ["site", "payload", "n_examples",
                                                            "train_loss"]
                assert message.site == wire.name
    for plaintext in recording.plaintexts:
        found = any(code in everything for code in encodings(plaintext))
        assert found == (scheme == "plain"), scheme  # plain sends it: the check can fail


def test_ckks_trains_the_same_model_as_plain() -> None:
    plain, _, _, _ = run(config("plain"))
    encrypted, reports, wires, _ = run(config("ckks"))
    # Flooding adds N(0, 2^-20) to each summed value, then divided by ~486 rows.
    torch.testing.assert_close(encrypted, plain, rtol=0, atol=1e-6)
    assert all(len(r.participants) == 4 for r in reports)
    released = [m for w in wires for m in w.sent if isinstance(m, torch.Tensor)]
    assert len(released) == 3  # one decryption per round, by one site


def test_ckks_matches_plain_accuracy_on_the_default_job(tmp_path: Path) -> None:
    results = {}
    for scheme in ("plain", "ckks"):
        c = RunConfig()
        c.protection.scheme = scheme
        c.baselines.enabled = False
        summary = run_experiment(c, out=tmp_path / scheme).summary
        results[scheme] = summary["federated"]["pooled"]["accuracy"]
    assert abs(results["ckks"] - results["plain"]) <= 0.002, results


@pytest.mark.parametrize("step", ["fit", "reveal"])
def test_ckks_round_survives_a_site_dropping(step: str) -> None:
    # cleveland decrypts (first contributor); dropping it at reveal makes hungarian decrypt.
    dropped, reports, _, _ = run(config("ckks"), {"cleveland": {2: step}})
    reference, _, _, _ = run(config("plain"), {"cleveland": {2: "fit"}} if step == "fit" else None)
    torch.testing.assert_close(dropped, reference, rtol=0, atol=1e-6)
    assert "cleveland" in reports[1].failures
    assert ("cleveland" in reports[1].participants) == (step == "reveal")


def corrupt_site(c: RunConfig, name: str, how: str) -> LocalRuntime:
    """A runtime where site `name` misbehaves under ckks."""
    runtime = LocalRuntime(build_federation(c.data), c)
    site = next(s for s in runtime.sites if s.name == name)
    if how == "other keys":
        other = create_site_context()
        site.protection = CkksScheme(other, other.public())
        return runtime
    if how == "nan":  # a NaN reaches the encryption (training itself stops on NaN first)
        recording = RecordingScheme(site.protection)
        site.protection = recording
        inner = recording.site_session

        def site_session(round_number: int, index: int) -> SiteSession:
            session = inner(round_number, index)
            protect = session.protect
            session.protect = lambda payload: protect(  # type: ignore[method-assign]
                payload.index_fill(0, torch.tensor([7]), float("nan")))
            return session

        recording.site_session = site_session  # type: ignore[method-assign]
        return runtime
    original = site.fit

    def fit(params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        result = original(params, instructions)
        payload = result.payload
        assert isinstance(payload, CkksPayload)
        chunks = (payload.chunks[0][:-100], *payload.chunks[1:])
        return FitResult(result.site, CkksPayload(payload.fingerprint, payload.length, chunks),
                         result.n_examples, result.train_loss)

    site.fit = fit  # type: ignore[method-assign]
    return runtime


@pytest.mark.parametrize(("how", "message"), [
    ("other keys", "from different `fedcare keys init` runs"),
    ("truncated", "ciphertext chunk 1 of 1 cannot be read"),
    ("nan", "update value at index 7 is nan"),
])
def test_ckks_bad_payload_drops_that_site_only(how: str, message: str) -> None:
    runtime = corrupt_site(config("ckks"), "va", how)
    reports: list[RoundReport] = []
    params = runtime.aggregator.fit(runtime.sites, runtime.initial_params(), 2,
                                    lambda p, r: reports.append(r))
    assert torch.isfinite(params).all()
    for report in reports:
        assert report.participants == ["cleveland", "hungarian", "switzerland"]
        assert message in report.failures["va"]


def test_ckks_site_decrypts_once_and_never_its_own_ciphertext() -> None:
    scheme = CkksScheme.from_keys()
    site = scheme.site_session(1, 0)
    check = KeyCheck(1, create_site_context().fingerprint)
    with pytest.raises(ProtocolError, match="different `fedcare keys init` runs"):
        site.handle(check)
    with pytest.raises(ProtocolError, match="before the key check"):
        site.protect(torch.ones(5, dtype=torch.float64))
    aggregator = scheme.aggregator_session(1, [0, 1], 5)
    check = KeyCheck(1, aggregator.context.fingerprint)
    assert site.handle(check) == check
    own = site.protect(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ProtocolError, match="own ciphertext"):
        site.handle(DecryptRequest(1, own, (0, 1)))
    aggregator.add(0, own)
    aggregator.add(1, own)
    assert aggregator.total is not None
    # What the decrypting site can check of the sum: at least 2 distinct contributors,
    # itself among them (it cannot check the ciphertext is their sum).
    for contributors in [(), (0,), (0, 0), (1, 2)]:
        with pytest.raises(ProtocolError, match="decrypts only a sum of at least 2 distinct"):
            site.handle(DecryptRequest(1, aggregator.total, contributors))
    assert scheme.site_context is not None and scheme.site_context.releases.released() == 0
    revealed = site.handle(DecryptRequest(1, aggregator.total, (0, 1)))
    assert scheme.site_context.releases.released() == 1
    assert isinstance(revealed, torch.Tensor)
    torch.testing.assert_close(revealed, torch.full((5,), 2.0, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    with pytest.raises(ProtocolError, match="second time"):
        site.handle(DecryptRequest(1, aggregator.total, (0, 1)))
    with pytest.raises(ProtocolError, match="round 2 arrived in round 1"):
        site.handle(KeyCheck(2, check.fingerprint))
    with pytest.raises(ProtocolError, match="encrypted 4 values"):
        aggregator.add(1, site.protect(torch.ones(4, dtype=torch.float64)))


def test_a_ckks_site_stops_releasing_decryptions_before_the_key_sets_allowance(
        tmp_path: Path) -> None:
    from fedcare.protection.ckks import RELEASES_SUFFIX, load_site_context, release_allowance

    files = generate_keys(tmp_path / "keys")
    context = load_site_context(files.site)
    # Li-Micciancio-Schultz-Sorrell: sigma >= sqrt(24 N q) 2**(s/2) B, B = 6 sqrt(K) e.
    n, e = 8192, 2.0**11 / 2.0**70
    for sites in (2, 4, 1000):
        expected = (2.0**-20 / (6 * e * math.sqrt(sites))) ** 2 / (24 * n) / 2.0**30
        assert release_allowance(context, summands=sites) == int(expected)
    assert release_allowance(context, summands=4) > 9_000_000
    assert 30_000 < release_allowance(context, summands=1000) < 40_000

    scheme = CkksScheme(context, context.public())

    def one_round(round_number: int) -> object:
        aggregator = scheme.aggregator_session(round_number, [0, 1], 5)
        sites = [scheme.site_session(round_number, i) for i in (0, 1)]
        check = KeyCheck(round_number, aggregator.context.fingerprint)
        for i, site in enumerate(sites):
            site.handle(check)
            aggregator.add(i, site.protect(torch.ones(5, dtype=torch.float64)))
        assert aggregator.total is not None
        return sites[0].handle(DecryptRequest(round_number, aggregator.total, (0, 1)))

    one_round(1)
    counter = Path(str(files.site) + RELEASES_SUFFIX)
    assert counter.read_text() == "1\n" and counter.stat().st_mode & 0o777 == 0o600
    # A site that restarts reads its count back; at the allowance it refuses, nothing counted.
    counter.write_text(f"{release_allowance(context, summands=2)}\n")
    again = load_site_context(files.site)
    scheme = CkksScheme(again, again.public())
    with pytest.raises(ProtocolError, match="renew the key set"):
        one_round(2)
    assert again.releases.released() == release_allowance(context, summands=2)


def test_ckks_reads_keys_from_the_directory_of_keys_init(tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys")
    c = config("ckks", protection__keys=str(tmp_path / "keys"))
    _, reports, _, _ = run(c)
    assert all(len(r.participants) == 4 for r in reports)
    # The aggregator's machine holds only aggregator.ckks: it cannot act as a site.
    (tmp_path / "keys" / "site.ckks").unlink()
    aggregator_only = build_scheme(c.protection)
    with pytest.raises(ConfigError, match="cannot act as a site"):
        aggregator_only.site_session(1, 0)
    with pytest.raises(ConfigError, match="holds neither"):
        build_scheme(config("ckks", protection__keys=str(tmp_path)).protection)


def test_secagg_plus_neighbours_train_the_same_model_as_plain() -> None:
    # protection.neighbours = 10 of a round's 19 other sites (2 log2 20 = 8.6 rounds up to
    # 10): each site masks with, and shares its keys among, 10 random neighbours only.
    data = {"data__dataset": "breast-cancer", "data__partition": "iid", "data__sites": 20}
    plain, _, _, _ = run(config("plain", **data))
    masked, reports, wires, _ = run(config("secagg", protection__neighbours=10, **data))
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-6)
    assert all(len(r.participants) == 20 for r in reports)
    bundles = [m for w in wires for m in w.sent if isinstance(m, ShareBundle)]
    assert len(bundles) == 3 * 20 and all(len(b.shares) == 10 for b in bundles)


def test_the_summary_sentence_states_what_each_scheme_lets_the_coordinator_see() -> None:
    from fedcare.config import ProtectionConfig
    from fedcare.protection import who_sees_what

    assert "read every hospital's update" in who_sees_what(ProtectionConfig("plain"))
    assert "more than half" in who_sees_what(ProtectionConfig("secagg"))
    plus = who_sees_what(ProtectionConfig("secagg", neighbours=10))
    assert "neighbourhoods of 10 hospitals" in plus  # t = max(10 // 2 + 1, ceil(0.5 * 11)) = 6
    assert "unless 6 of one hospital's neighbours colluded" in plus and "lies" in plus
    assert "one colluding hospital" in who_sees_what(ProtectionConfig("ckks"))


def test_a_site_holds_the_cohort_its_noise_share_assumes() -> None:
    """Distributed DP noise: each site adds 1/needed of it; the scheme reveals no smaller sum."""
    from fedcare.protection.secagg import RoundSetup, SecAggScheme, UnmaskRequest

    scheme = SecAggScheme()
    session = scheme.site_session(1, 0)
    session.handle(RoundSetup(1, (1, 2, 3), 2, 4))
    with pytest.raises(ProtocolError, match="told that 10 sites were selected in round 1, but "
                                            "the round is set up for 3"):
        session.require_contributors(10, cohort=10)
    session.require_contributors(3, cohort=3)
    site = session._require()
    assert site.min_survivors == 3
    site._phase = site._phase.UNMASK  # as after masking, with U2 = every site
    site._u2 = frozenset({1, 2, 3})
    with pytest.raises(QuorumError, match="carries enough of the distributed DP noise only "
                                          "with 3"):
        site.unmask(UnmaskRequest((1, 2)))
    ckks = CkksScheme.from_keys()
    decrypting = ckks.site_session(1, 0)
    aggregator = ckks.aggregator_session(1, [0, 1, 2], 5)
    check = KeyCheck(1, aggregator.context.fingerprint)
    decrypting.handle(check)
    decrypting.require_contributors(3, cohort=3)
    payload = decrypting.protect(torch.ones(5, dtype=torch.float64))
    other = ckks.site_session(1, 1)
    other.handle(check)
    aggregator.add(0, payload)
    aggregator.add(1, other.protect(torch.ones(5, dtype=torch.float64)))
    assert aggregator.total is not None
    with pytest.raises(ProtocolError, match="at least 3 distinct sites"):
        decrypting.handle(DecryptRequest(1, aggregator.total, (0, 1)))


@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_a_sum_short_of_distributed_noise_shares_is_never_revealed(scheme: str) -> None:
    # Issue 14.3.1. Client-level distributed noise, tolerance 0: each of the 4 sites
    # carries a quarter of the noise. With va gone at fit, the 3 remaining shares carry
    # 3/4 of it. Before, the aggregator asked for the unmasking or decryption of that sum
    # (and the decrypting site read it), then refused the round. Now nobody is asked: the
    # round is released from noise alone and charged.
    c = config(scheme, privacy__level="site", privacy__noise="distributed",
               privacy__epsilon=8.0, federation__rounds=2)
    _, reports, wires, _ = run(c, {"va": {2: "fit"}})
    reveal_replies = (UnmaskResponse, torch.Tensor)  # secagg's shares, ckks's decryption
    answered = [[m for m in w.sent if isinstance(m, reveal_replies)] for w in wires]
    assert not reports[0].empty and reports[1].empty
    assert reports[1].participants == []
    # Round 1 was revealed (one reply for secagg from each site, one decryption for ckks),
    # round 2 never was.
    assert sum(len(a) for a in answered) == (4 if scheme == "secagg" else 1)


def test_central_noise_sum_under_ckks_is_refused_at_configuration() -> None:
    # Issue 14.3.4: the decrypting site would read the noiseless sum.
    c = config("ckks", privacy__level="site", privacy__noise="central")
    with pytest.raises(ConfigError, match=r"privacy\.noise = 'distributed'"):
        LocalRuntime(build_federation(c.data, private=True), c)
