"""Protection schemes in the runtime: same model as plain, dropouts, and what leaves a site."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import pytest
import torch

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.federation.aggregator import RoundReport
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.protection import build_scheme
from fedcare.protection.base import Scheme, SiteSession
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
        step = "reveal" if type(message).__name__ in ("UnmaskRequest", "CkksPayload") \
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
    recording = RecordingScheme(build_scheme(c.protection))
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
    "secagg": {FitResult: MaskedInput, KeyAdvertisement: None, ShareBundle: None,
               UnmaskResponse: None, type(None): None},
}


@pytest.mark.parametrize("scheme", ["plain", "secagg"])
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
