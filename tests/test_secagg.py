"""Masked secure aggregation (Bonawitz et al. 2017): exactness under dropouts, and what leaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.protection import shamir
from fedcare.protection.base import wire_size
from fedcare.protection.secagg import (
    Aggregate,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    Phase,
    RoundSetup,
    SecAggAggregator,
    SecAggSite,
    SharesForSite,
    UnmaskRequest,
    UnmaskResponse,
    _agree,
    _pair_mask_seed,
    _self_mask_seed,
    expand_mask,
    simulate_round,
)


def _updates(setup: RoundSetup, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.normal(scale=10.0, size=setup.vector_length).astype(np.float32)
            for i in setup.site_ids}


def _plain_sum(setup: RoundSetup, updates: dict[int, np.ndarray],
               contributors: tuple[int, ...]) -> np.ndarray:
    total = np.zeros(setup.vector_length, dtype=np.uint64)
    for i in contributors:
        total += setup.encoding.encode(updates[i], site=str(i))
    return setup.encoding.decode_integers(total)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[RoundSetup, dict[int, Phase]]:
    n = draw(st.integers(3, 8))
    ids = tuple(draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True)))
    threshold = draw(st.integers(n // 2 + 1, n))
    dropouts = draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(list(Phase)),
                                    max_size=n))
    length = draw(st.integers(1, 40))
    return RoundSetup(round_number=draw(st.integers(0, 10**6)), site_ids=ids,
                      threshold=threshold, vector_length=length), dropouts


@settings(max_examples=120, deadline=None)
@given(rounds())
def test_unmasked_sum_is_the_fixed_point_sum_for_any_dropouts(
        case: tuple[RoundSetup, dict[int, Phase]]) -> None:
    setup, dropouts = case
    updates = _updates(setup, seed=setup.round_number)
    finishing = [i for i in setup.site_ids if i not in dropouts]
    if len(finishing) < setup.threshold:
        with pytest.raises(QuorumError, match=f"threshold is {setup.threshold}"):
            simulate_round(setup, updates, dropouts=dropouts)
        return
    result = simulate_round(setup, updates, dropouts=dropouts)
    # Sites that dropped only in the unmask phase sent their input: it is in the sum.
    assert result.contributors == tuple(
        i for i in setup.site_ids if dropouts.get(i, Phase.UNMASK) == Phase.UNMASK)
    np.testing.assert_array_equal(result.fixed_point, _plain_sum(setup, updates,
                                                                 result.contributors))
    np.testing.assert_array_equal(result.values, result.fixed_point / 2.0**setup.frac_bits)


class Round:
    """A round driven step by step, recording everything the aggregator receives."""

    def __init__(self, n: int = 5, threshold: int = 3, length: int = 64) -> None:
        self.setup = RoundSetup(round_number=7, site_ids=tuple(range(1, n + 1)),
                                threshold=threshold, vector_length=length)
        self.sites = {i: SecAggSite(i, self.setup, name=f"hospital-{i}")
                      for i in self.setup.site_ids}
        self.aggregator = SecAggAggregator(self.setup)
        self.updates = _updates(self.setup)
        self.received: list[object] = []

    def to_masked_inputs(self, *, drop_before_masking: tuple[int, ...] = ()
                         ) -> tuple[dict[int, SharesForSite], list[MaskedInput]]:
        adverts = [s.advertise_keys() for s in self.sites.values()]
        self.received += adverts
        roster = self.aggregator.collect_keys(adverts)
        bundles = [s.share_keys(roster) for s in self.sites.values()]
        self.received += bundles
        inboxes = self.aggregator.collect_shares(bundles)
        masked = [self.sites[v].mask_input(m, self.updates[v]) for v, m in inboxes.items()
                  if v not in drop_before_masking]
        self.received += masked
        return inboxes, masked

    def run(self, *, drop_before_masking: tuple[int, ...] = ()) -> Aggregate:
        _, masked = self.to_masked_inputs(drop_before_masking=drop_before_masking)
        request = self.aggregator.collect_masked_inputs(masked)
        responses = [self.sites[v].unmask(request) for v in request.survivors]
        self.received += responses
        return self.aggregator.collect_unmask_responses(responses)


def _byte_strings(message: object) -> Iterator[bytes]:
    if isinstance(message, bytes):
        yield message
    elif isinstance(message, tuple):
        for m in message:
            yield from _byte_strings(m)
    elif dataclasses.is_dataclass(message):
        for f in dataclasses.fields(message):
            yield from _byte_strings(getattr(message, f.name))


def test_aggregator_view_reveals_no_secret_and_no_input() -> None:
    r = Round(n=5, threshold=3, length=2000)
    r.updates[1][:] = 0.0  # the easiest input to spot, if masking failed
    result = r.run(drop_before_masking=(4,))
    seen = b"|".join(b for m in r.received for b in _byte_strings(m))
    for site in r.sites.values():
        for secret in (site._encryption_key.private_bytes_raw(),
                       site._mask_key.private_bytes_raw(), site._self_mask):
            assert secret not in seen
    masked = next(m for m in r.received if isinstance(m, MaskedInput) and m.site == 1)
    y = np.frombuffer(masked.masked, dtype="<u8")
    assert np.mean(y != r.setup.encoding.encode(r.updates[1], site="1")) > 0.999
    bits = np.unpackbits(np.frombuffer(masked.masked, dtype=np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01  # 128,000 bits: 0.01 is > 7 standard deviations
    # The aggregator object ends holding no private key (it rebuilt site 4's, then let go).
    assert not any(isinstance(v, X25519PrivateKey) for v in vars(r.aggregator).values())
    assert result.contributors == (1, 2, 3, 5)


def test_double_masking_hides_a_site_declared_dropped() -> None:
    """A late input of a 'dropped' site stays masked by PRG(b) after its key is rebuilt."""
    r = Round(n=5, threshold=3, length=500)
    _, masked = r.to_masked_inputs()
    late = next(m for m in masked if m.site == 2)
    request = r.aggregator.collect_masked_inputs(m for m in masked if m.site != 2)
    responses = [r.sites[v].unmask(request) for v in request.survivors]
    # Play the curious aggregator: rebuild site 2's mask key from the key shares...
    shares = {resp.site: shamir.share_from_bytes(resp.key_shares[0].value)
              for resp in responses}
    raw = shamir.reconstruct(shares, threshold=3).to_bytes(32, "big")
    key = X25519PrivateKey.from_private_bytes(raw)
    y = np.frombuffer(late.masked, dtype="<u8").copy()
    public = {a.site: a.mask_public_key for a in r.received if isinstance(a, KeyAdvertisement)}
    for u in request.survivors:
        shared = _agree(key, public[u], owner=u)
        mask = expand_mask(_pair_mask_seed(shared, r.setup.context, 2, u), 500)
        if u > 2:  # site 2 added the masks shared with higher ids, subtracted the others
            y -= mask
        else:
            y += mask
    encoded = r.setup.encoding.encode(r.updates[2], site="2")
    assert np.mean(y != encoded) > 0.99
    # ...only the self-mask b_2, which no honest site revealed, still hides the input.
    y -= expand_mask(_self_mask_seed(r.sites[2]._self_mask, r.setup.context, 2), 500)
    np.testing.assert_array_equal(y, encoded)
    # And the round still gives the survivors' exact sum.
    result = r.aggregator.collect_unmask_responses(responses)
    np.testing.assert_array_equal(result.fixed_point,
                                  _plain_sum(r.setup, r.updates, (1, 3, 4, 5)))


def test_a_site_never_reveals_both_shares_of_one_site() -> None:
    r = Round(n=5, threshold=3)
    _, masked = r.to_masked_inputs()
    request = r.aggregator.collect_masked_inputs(masked)
    site = r.sites[1]
    first = site.unmask(request)
    assert site.unmask(request) == first  # a retransmitted request gets the same answer
    # A lying aggregator now claims site 3 dropped, to get its key share as well.
    with pytest.raises(ProtocolError, match=r"hospital-1: refusing to unmask: site\(s\) \[3\]"):
        site.unmask(UnmaskRequest((1, 2, 4, 5)))
    # And the other way round: declared dropped first, then alive.
    other = r.sites[2]
    other.unmask(UnmaskRequest((1, 2, 4, 5)))
    with pytest.raises(ProtocolError, match="refusing to unmask"):
        other.unmask(request)


@pytest.mark.parametrize(("survivors", "error", "match"), [
    ((1, 2), QuorumError, "threshold is 3. Nothing is revealed"),
    ((1, 2, 3, 9), ProtocolError, "not distinct sites of U2"),
    ((1, 1, 2, 3), ProtocolError, "not distinct sites of U2"),
    ((2, 3, 4), ProtocolError, "declared dropped although it sent"),
])
def test_site_checks_the_unmask_request(survivors: tuple[int, ...], error: type[Exception],
                                        match: str) -> None:
    r = Round(n=5, threshold=3)
    r.to_masked_inputs()
    with pytest.raises(error, match=match):
        r.sites[1].unmask(UnmaskRequest(survivors))
    assert not r.sites[1]._revealed_key and not r.sites[1]._revealed_self_mask


def test_too_few_survivors_abort_before_anything_is_revealed() -> None:
    r = Round(n=5, threshold=4)
    _, masked = r.to_masked_inputs(drop_before_masking=(1, 2))
    with pytest.raises(QuorumError, match=r"3 site.s. sent masked inputs; the threshold is 4"):
        r.aggregator.collect_masked_inputs(masked)
    # Enough inputs, too few answers: the sum stays masked.
    r = Round(n=5, threshold=4)
    _, masked = r.to_masked_inputs()
    request = r.aggregator.collect_masked_inputs(masked)
    responses = [r.sites[v].unmask(request) for v in (1, 2, 3)]
    with pytest.raises(QuorumError, match=r"3 site.s. answered the unmask request"):
        r.aggregator.collect_unmask_responses(responses)


def test_tampered_or_replayed_shares_are_refused() -> None:
    r = Round(n=3, threshold=2)
    adverts = [s.advertise_keys() for s in r.sites.values()]
    roster = r.aggregator.collect_keys(adverts)
    inboxes = r.aggregator.collect_shares(s.share_keys(roster) for s in r.sites.values())
    inbox = inboxes[1]
    bad = dataclasses.replace(inbox.shares[0],
                              ciphertext=bytes([inbox.shares[0].ciphertext[0] ^ 1])
                              + inbox.shares[0].ciphertext[1:])
    with pytest.raises(ProtocolError, match="hospital-1: the shares from site 2 fail auth"):
        r.sites[1].mask_input(SharesForSite(1, (bad, inbox.shares[1])), r.updates[1])
    with pytest.raises(ProtocolError, match="addressed to site 2"):
        r.sites[1].mask_input(inboxes[2], r.updates[1])
    # A share re-labelled as coming from site 3 does not decrypt under site 3's key.
    relabelled = dataclasses.replace(inbox.shares[0], sender=3)
    with pytest.raises(ProtocolError, match="from site 3 fail authentication"):
        r.sites[1].mask_input(SharesForSite(1, (relabelled,)), r.updates[1])


def test_a_swapped_own_key_in_the_roster_is_refused() -> None:
    r = Round(n=3, threshold=2)
    adverts = [s.advertise_keys() for s in r.sites.values()]
    fake = X25519PrivateKey.generate().public_key().public_bytes_raw()
    adverts[0] = dataclasses.replace(adverts[0], encryption_public_key=fake)
    with pytest.raises(ProtocolError, match="hospital-1: the key roster does not carry"):
        r.sites[1].share_keys(KeyRoster(tuple(adverts)))


def test_a_corrupt_revealed_share_fails_the_round_loudly() -> None:
    r = Round(n=5, threshold=3)
    _, masked = r.to_masked_inputs(drop_before_masking=(5,))
    request = r.aggregator.collect_masked_inputs(masked)
    responses = [r.sites[v].unmask(request) for v in request.survivors]
    first = responses[0]
    corrupt = dataclasses.replace(first.self_mask_shares[0],
                                  value=shamir.share_to_bytes(12345))
    responses[0] = UnmaskResponse(first.site, (corrupt, *first.self_mask_shares[1:]),
                                  first.key_shares)
    with pytest.raises(ProtocolError, match=r"of site 1 .*a revealed share is corrupt"):
        r.aggregator.collect_unmask_responses(responses)


def test_out_of_range_update_is_refused_before_sending() -> None:
    r = Round(n=3, threshold=2, length=5)
    adverts = [s.advertise_keys() for s in r.sites.values()]
    roster = r.aggregator.collect_keys(adverts)
    inboxes = r.aggregator.collect_shares(s.share_keys(roster) for s in r.sites.values())
    with pytest.raises(ProtocolError, match="hospital-2': value 3 is 1e\\+30"):
        r.sites[2].mask_input(inboxes[2], np.array([0, 1, 2, 1e30, 1e31]))
    with pytest.raises(ProtocolError, match="update of shape \\(4,\\)"):
        r.sites[2].mask_input(inboxes[2], np.zeros(4, dtype=np.float32))


def test_phases_run_once_in_order() -> None:
    r = Round(n=3, threshold=2)
    with pytest.raises(ProtocolError, match="asked for phase UNMASK while in phase ADVERTISE"):
        r.sites[1].unmask(UnmaskRequest((1, 2, 3)))
    r.run()
    with pytest.raises(ProtocolError, match="out of order"):
        r.aggregator.collect_keys([])


def test_aggregator_refuses_strays_and_duplicates() -> None:
    r = Round(n=4, threshold=3)
    adverts = [s.advertise_keys() for s in r.sites.values()]
    with pytest.raises(ProtocolError, match="sent two key advertisements"):
        r.aggregator.collect_keys([*adverts, adverts[0]])
    with pytest.raises(QuorumError, match=r"2 site.s. advertised keys; the threshold is 3"):
        r.aggregator.collect_keys(adverts[:2])
    roster = r.aggregator.collect_keys(adverts[:3])
    with pytest.raises(ProtocolError, match=r"share bundle from site\(s\) \[4\]"):
        r.aggregator.collect_shares([r.sites[4].share_keys(KeyRoster(tuple(adverts)))])
    bundles = [r.sites[i].share_keys(roster) for i in (1, 2, 3)]
    inboxes = r.aggregator.collect_shares(bundles)
    masked = [r.sites[i].mask_input(inboxes[i], r.updates[i]) for i in (1, 2, 3)]
    short = MaskedInput(1, masked[0].masked[:-8])
    with pytest.raises(ProtocolError, match="masked input of site 1 has 504 bytes"):
        r.aggregator.collect_masked_inputs([short])


@pytest.mark.parametrize(("ids", "threshold"), [((1, 2, 3, 4), 2), ((1, 2, 3), 4),
                                                ((1,), 1), ((0, 1, 2), 2), ((1, 1, 2), 2)])
def test_setup_refuses_minority_thresholds_and_bad_ids(ids: tuple[int, ...],
                                                       threshold: int) -> None:
    with pytest.raises(ConfigError):
        RoundSetup(round_number=1, site_ids=ids, threshold=threshold, vector_length=3)


def test_keys_and_masks_are_bound_to_the_round() -> None:
    a = RoundSetup(round_number=1, site_ids=(1, 2, 3), threshold=2, vector_length=3)
    b = RoundSetup(round_number=2, site_ids=(1, 2, 3), threshold=2, vector_length=3)
    assert a.context != b.context
    assert _self_mask_seed(b"k" * 32, a.context, 1) != _self_mask_seed(b"k" * 32, b.context, 1)


def test_mask_expansion_is_deterministic_and_spread() -> None:
    m = expand_mask(b"\x01" * 32, 10_000)
    np.testing.assert_array_equal(m, expand_mask(b"\x01" * 32, 10_000))
    assert not np.array_equal(m, expand_mask(b"\x02" * 32, 10_000))
    assert len(np.unique(m)) == 10_000
    np.testing.assert_array_equal(expand_mask(b"\x01" * 32, 10), m[:10])


def test_message_sizes() -> None:
    r = Round(n=4, threshold=3, length=100)
    r.run()
    masked = next(m for m in r.received if isinstance(m, MaskedInput))
    assert wire_size(masked) == 4 + 800
    advert = r.received[0]
    assert wire_size(advert) == 4 + 3 * 32


def test_forty_sites_with_a_third_dropping_at_each_phase() -> None:
    setup = RoundSetup(round_number=1, site_ids=tuple(range(1, 41)), threshold=21,
                       vector_length=6_209)
    updates = _updates(setup)
    dropouts = {i: Phase(i % 4) for i in range(1, 41) if i % 3 == 0}
    result = simulate_round(setup, updates, dropouts=dropouts)
    np.testing.assert_array_equal(result.fixed_point,
                                  _plain_sum(setup, updates, result.contributors))


def test_values_at_the_bound_sum_without_wrapping() -> None:
    setup = RoundSetup(round_number=1, site_ids=(1, 2, 3, 4), threshold=3, vector_length=2)
    bound = setup.encoding.bound
    updates = {i: np.array([bound, -bound]) for i in setup.site_ids}
    result = simulate_round(setup, updates, dropouts={2: Phase.UNMASK})
    q = int(bound * 2**setup.frac_bits)
    assert result.fixed_point.tolist() == [4 * q, -4 * q]
