"""Masked secure aggregation (Bonawitz et al. 2017): exactness under dropouts, and what leaks."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.config import ProtectionConfig
from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.protection import build_scheme, shamir
from fedcare.protection.base import wire_size
from fedcare.protection.secagg import (
    _DOMAIN,
    Aggregate,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    Phase,
    RoundSetup,
    SecAggAggregator,
    SecAggScheme,
    SecAggSite,
    ShareBundle,
    SharesForSite,
    UnmaskRequest,
    UnmaskResponse,
    _agree,
    _pair_mask_seed,
    _self_mask_seed,
    expand_mask,
    graph_bounds,
    min_neighbours,
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


# --- SecAgg+ (Bell et al. 2020): sparse random neighbourhoods -----------------------------

SEED = bytes(range(32))


def _plus_contributors(setup: RoundSetup, dropouts: dict[int, Phase]) -> tuple[int, ...] | None:
    """What a SecAgg+ round must give, from the rules alone: U3, or None for a QuorumError.

    Each phase needs ``threshold`` sites, and every secret the round still needs
    (a survivor's self-mask seed, the mask key of a dropped site that a survivor
    masked with) needs ``neighbour_threshold`` of its neighbourhood present.
    """
    present = [frozenset(i for i in setup.site_ids if dropouts.get(i, Phase.UNMASK + 1) > p)
               for p in Phase]
    u2, u3 = present[Phase.SHARE_KEYS], present[Phase.MASKED_INPUT]

    def enough(owners: frozenset[int], there: frozenset[int]) -> bool:
        return len(there) >= setup.threshold and all(
            len(there.intersection(setup.neighbourhood(v))) >= setup.neighbour_threshold
            for v in owners)

    needed = u3 | {d for d in u2 - u3 if u3.intersection(setup.neighbourhood(d))}
    if (len(present[Phase.ADVERTISE_KEYS]) >= setup.threshold and enough(u2, u2)
            and enough(needed, u3) and enough(needed, present[Phase.UNMASK])):
        return tuple(sorted(u3))
    return None


@st.composite
def plus_rounds(draw: st.DrawFn) -> tuple[RoundSetup, dict[int, Phase]]:
    n = draw(st.integers(5, 14))
    k = 2 * draw(st.integers(1, (n - 1) // 2))
    ids = tuple(draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True)))
    dropouts = draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(list(Phase)),
                                    max_size=n // 2))
    return RoundSetup(round_number=draw(st.integers(0, 10**6)), site_ids=ids,
                      threshold=draw(st.integers(n // 2 + 1, n)),
                      vector_length=draw(st.integers(1, 30)), neighbours=k,
                      neighbour_threshold=draw(st.integers(k // 2 + 1, k + 1)),
                      graph_seed=draw(st.binary(min_size=32, max_size=32))), dropouts


@settings(max_examples=80, deadline=None)
@given(plus_rounds())
def test_secagg_plus_sum_is_the_fixed_point_sum_or_nothing_for_any_dropouts(
        case: tuple[RoundSetup, dict[int, Phase]]) -> None:
    setup, dropouts = case
    updates = _updates(setup, seed=setup.round_number)
    contributors = _plus_contributors(setup, dropouts)
    if contributors is None:
        with pytest.raises(QuorumError, match=r"threshold is \d+"):
            simulate_round(setup, updates, dropouts=dropouts)
        return
    result = simulate_round(setup, updates, dropouts=dropouts)
    assert result.contributors == contributors
    np.testing.assert_array_equal(result.fixed_point, _plain_sum(setup, updates, contributors))


def test_secagg_plus_sixty_sites_with_a_tenth_dropping_at_each_phase() -> None:
    setup = RoundSetup(round_number=3, site_ids=tuple(range(1, 61)), threshold=31,
                       vector_length=6_209, neighbours=min_neighbours(60), graph_seed=SEED)
    assert (setup.neighbours, setup.neighbour_threshold) == (12, 7)
    updates = _updates(setup)
    dropouts = {i: Phase(i % 4) for i in range(1, 61) if i % 10 == 0}
    result = simulate_round(setup, updates, dropouts=dropouts)
    assert _plus_contributors(setup, dropouts) == result.contributors
    np.testing.assert_array_equal(result.fixed_point,
                                  _plain_sum(setup, updates, result.contributors))


def test_secagg_plus_graph_is_public_deterministic_and_k_regular() -> None:
    ids = tuple(range(1, 31))
    a = RoundSetup(round_number=1, site_ids=ids, threshold=16, vector_length=3, neighbours=6,
                   graph_seed=SEED)
    # Every party rebuilds the setup from the message it received: same seed, same graph.
    for copy in (RoundSetup(round_number=1, site_ids=ids[::-1], threshold=16, vector_length=3,
                            neighbours=6, graph_seed=SEED), pickle.loads(pickle.dumps(a))):
        assert copy == a and copy.context == a.context
        assert [copy.neighbourhood(i) for i in ids] == [a.neighbourhood(i) for i in ids]
    other = dataclasses.replace(a, graph_seed=bytes(32))
    assert [other.neighbourhood(i) for i in ids] != [a.neighbourhood(i) for i in ids]
    assert other.context != a.context  # shares made under one graph fail under another
    for u in ids:
        hood = a.neighbourhood(u)
        assert len(hood) == 7 and u in hood and hood == tuple(sorted(hood))
        assert all(u in a.neighbourhood(v) for v in hood)  # symmetric
    # Random, not the identity ordering: some site has a neighbour more than 3 ids away.
    assert any(abs(u - v) % 27 > 3 for u in ids for v in a.neighbourhood(u))
    fresh = RoundSetup(round_number=1, site_ids=ids, threshold=16, vector_length=3,
                       neighbours=6)
    assert len(fresh.graph_seed) == 32 and fresh.graph_seed != SEED  # drawn from the CSPRNG
    with pytest.raises(ConfigError, match="site id 99 is not in"):
        a.neighbourhood(99)


def test_complete_graph_context_is_unchanged() -> None:
    """neighbours = 0 keeps the Bonawitz round bit for bit: same context, all sites hold shares."""
    setup = RoundSetup(round_number=5, site_ids=(3, 1, 2), threshold=2, vector_length=7)
    digest = hashlib.sha256(_DOMAIN + struct.pack(">QIQI", 5, 2, 7, 32))
    for i in (1, 2, 3):
        digest.update(struct.pack(">I", i))
    assert setup.context == digest.digest()
    assert setup.neighbourhood(2) == (1, 2, 3) and setup.share_threshold == 2


def test_secagg_plus_sends_and_masks_only_along_the_graph() -> None:
    r = Round(n=12, threshold=7, length=300)
    r.setup = RoundSetup(round_number=7, site_ids=tuple(range(1, 13)), threshold=7,
                         vector_length=300, neighbours=4, graph_seed=SEED)
    r.sites = {i: SecAggSite(i, r.setup, name=f"hospital-{i}") for i in r.setup.site_ids}
    r.aggregator = SecAggAggregator(r.setup)
    result = r.run(drop_before_masking=(5,))
    hood = {u: set(r.setup.neighbourhood(u)) - {u} for u in r.setup.site_ids}
    bundles = [m for m in r.received if isinstance(m, ShareBundle)]
    assert len(bundles) == 12
    for bundle in bundles:
        assert len(bundle.shares) == 4  # k shares, one per neighbour
        assert {s.recipient for s in bundle.shares} == hood[bundle.site]
    for response in (m for m in r.received if isinstance(m, UnmaskResponse)):
        owners = {s.owner for s in (*response.self_mask_shares, *response.key_shares)}
        assert owners == (hood[response.site] | {response.site})
        assert 5 not in {s.owner for s in response.self_mask_shares}
    # y_u = x_u + PRG(b_u) + sum over u's neighbours only of +-PRG(s_uv).
    public = {a.site: a.mask_public_key for a in r.received if isinstance(a, KeyAdvertisement)}
    for u in (1, 6):
        site = r.sites[u]
        y = np.frombuffer(next(m.masked for m in r.received
                               if isinstance(m, MaskedInput) and m.site == u), dtype="<u8")
        expected = r.setup.encoding.encode(r.updates[u], site=str(u))
        expected += expand_mask(_self_mask_seed(site._self_mask, r.setup.context, u), 300)
        for v in sorted(hood[u]):
            mask = expand_mask(_pair_mask_seed(_agree(site._mask_key, public[v], owner=v),
                                               r.setup.context, u, v), 300)
            expected = expected + mask if u < v else expected - mask
        np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(result.fixed_point, _plain_sum(
        r.setup, r.updates, tuple(i for i in r.setup.site_ids if i != 5)))


def _plus_round(n: int = 12, k: int = 4) -> Round:
    r = Round(n=3, threshold=2)
    r.setup = RoundSetup(round_number=7, site_ids=tuple(range(1, n + 1)), threshold=n // 2 + 1,
                         vector_length=20, neighbours=k, graph_seed=SEED)
    r.sites = {i: SecAggSite(i, r.setup, name=f"hospital-{i}") for i in r.setup.site_ids}
    r.aggregator = SecAggAggregator(r.setup)
    r.updates = _updates(r.setup)
    return r


def test_secagg_plus_refuses_a_neighbourhood_below_its_threshold_before_revealing() -> None:
    r = _plus_round()
    victim = 1
    others = [v for v in r.setup.neighbourhood(victim) if v != victim]
    # Drop 2 of its 4 neighbours: 3 of 5 remain, exactly t = 3: the round still works.
    assert r.setup.neighbour_threshold == 3
    _, masked = r.to_masked_inputs(drop_before_masking=tuple(others[:2]))
    request = r.aggregator.collect_masked_inputs(masked)
    assert victim in request.survivors
    # One more neighbour silent: the aggregator refuses before any unmask request goes out.
    r = _plus_round()
    _, masked = r.to_masked_inputs(drop_before_masking=tuple(others[:3]))
    with pytest.raises(QuorumError, match=rf"neighbourhood of site {victim}, .* 2 site\(s\) "
                                          r"sent masked inputs .*threshold is 3.*nothing is"):
        r.aggregator.collect_masked_inputs(masked)
    # A site asked anyway (a forged request) refuses too, and reveals nothing.
    survivors = tuple(i for i in r.setup.site_ids if i not in others[:3])
    site = r.sites[others[3]]
    with pytest.raises(QuorumError, match=rf"hospital-{others[3]}: the neighbourhood of site "
                                          rf"{victim} has 2 survivor.* Nothing is revealed"):
        site.unmask(UnmaskRequest(survivors))
    assert not site._revealed_key and not site._revealed_self_mask
    # Enough inputs, then too few of the victim's neighbourhood answer: the sum stays masked.
    r = _plus_round()
    _, masked = r.to_masked_inputs()
    request = r.aggregator.collect_masked_inputs(masked)
    responses = [r.sites[v].unmask(request) for v in request.survivors if v not in others[:3]]
    with pytest.raises(QuorumError, match=rf"neighbourhood of site {victim}, .*answered the "
                                          "unmask request"):
        r.aggregator.collect_unmask_responses(responses)


def test_secagg_plus_site_never_reveals_both_shares_and_checks_the_graph() -> None:
    r = _plus_round()
    _, masked = r.to_masked_inputs()
    request = r.aggregator.collect_masked_inputs(masked)
    site = r.sites[1]
    neighbour = next(v for v in r.setup.neighbourhood(1) if v != 1)
    site.unmask(request)
    lying = UnmaskRequest(tuple(v for v in request.survivors if v != neighbour))
    with pytest.raises(ProtocolError, match=rf"refusing to unmask: site\(s\) \[{neighbour}\]"):
        site.unmask(lying)
    # A survivor outside the selected sites is refused; one beyond its neighbourhood is fine.
    other = r.sites[neighbour]
    with pytest.raises(ProtocolError, match="are not distinct sites of the selected"):
        other.unmask(UnmaskRequest((*request.survivors, 99)))


def test_secagg_plus_aggregator_refuses_shares_off_the_graph() -> None:
    r = _plus_round()
    adverts = [s.advertise_keys() for s in r.sites.values()]
    roster = r.aggregator.collect_keys(adverts)
    bundles = [s.share_keys(roster) for s in r.sites.values()]
    stranger = next(v for v in r.setup.site_ids if v not in r.setup.neighbourhood(1))
    forged = dataclasses.replace(bundles[0].shares[0], recipient=stranger)
    bundles[0] = ShareBundle(1, (forged, *bundles[0].shares[1:]))
    with pytest.raises(ProtocolError, match=r"site 1 sent shares for .*expected one for each "
                                            r"neighbour in U1"):
        r.aggregator.collect_shares(bundles)


@pytest.mark.parametrize(("n", "k", "t", "seed"), [
    (10, 3, 0, SEED), (10, 10, 0, SEED), (10, 12, 0, SEED), (10, 4, 2, SEED), (10, 4, 6, SEED),
    (10, 4, 0, b"short"), (10, 0, 3, b""), (10, 0, 0, SEED), (10, -2, 0, SEED)])
def test_secagg_plus_setup_refuses_bad_parameters(n: int, k: int, t: int, seed: bytes) -> None:
    with pytest.raises(ConfigError, match=r"secagg (neighbours|neighbour_threshold|graph_seed)"):
        RoundSetup(round_number=1, site_ids=tuple(range(1, n + 1)), threshold=n // 2 + 1,
                   vector_length=3, neighbours=k, neighbour_threshold=t, graph_seed=seed)


@pytest.mark.parametrize("k", [3, -2, 1, True])
def test_protection_neighbours_refuses_odd_or_negative(k: int) -> None:
    with pytest.raises(ConfigError, match=r"protection.neighbours must be 0 .* or an even"):
        SecAggScheme(neighbours=k)


@pytest.mark.parametrize(("k", "cohort", "fits"), [
    (8, 20, r"an even number in \[10, 18\]"), (20, 20, r"an even number in \[10, 18\]"),
    (14, 100, None), (98, 100, None), (4, 4, "no SecAgg\\+ graph"), (12, 100, r"\[14, 98\]")])
def test_protection_neighbours_must_fit_the_cohort(k: int, cohort: int,
                                                    fits: str | None) -> None:
    scheme = build_scheme(ProtectionConfig(scheme="secagg", neighbours=k))
    assert isinstance(scheme, SecAggScheme) and scheme.neighbours == k
    if fits is None:
        setup = scheme.aggregator_session(3, list(range(cohort)), 5).setup_message
        assert (setup.neighbours, setup.neighbour_threshold) == (k, k // 2 + 1)
        return
    with pytest.raises(ConfigError, match=rf"protection.neighbours = {k} does not fit round 3's "
                                          rf"cohort of {cohort} selected sites: .*{fits}"):
        scheme.aggregator_session(3, list(range(cohort)), 5)


def test_neighbour_threshold_follows_protection_threshold() -> None:
    assert SecAggScheme(threshold=0.5).neighbour_threshold(14) == 8  # Bell et al.'s k/2 + 1
    assert SecAggScheme(threshold=0.8).neighbour_threshold(14) == 12  # ceil(0.8 * 15)
    assert min_neighbours(100) == 14 and min_neighbours(300) == 18 and min_neighbours(20) == 10


def test_a_site_refuses_a_setup_with_another_graph_degree() -> None:
    scheme = SecAggScheme(neighbours=10)
    setup = scheme.aggregator_session(1, list(range(20)), 5).setup_message
    assert isinstance(scheme.site_session(1, 0).handle(setup), KeyAdvertisement)
    complete = SecAggScheme().aggregator_session(1, list(range(20)), 5).setup_message
    with pytest.raises(ProtocolError, match=r"asks for 0 neighbours per site; this site is "
                                            r"configured with protection.neighbours = 10"):
        scheme.site_session(1, 0).handle(complete)
    with pytest.raises(ProtocolError, match="asks for 10 neighbours"):
        SecAggScheme().site_session(1, 0).handle(setup)


def _connected_without(setup: RoundSetup, removed: set[int]) -> bool:
    rest = [u for u in setup.site_ids if u not in removed]
    seen, todo = {rest[0]}, [rest[0]]
    while todo:
        for v in setup.neighbourhood(todo.pop()):
            if v not in removed and v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(rest)


def test_graph_bounds_hold_against_sampled_graphs() -> None:
    """The union bounds of the docstring's table are above the rates seen on random graphs."""
    n, k, t, colluding, dropped = 40, 8, 5, 8, 8
    exposed, split, aborted = graph_bounds(n, k, t, colluding=colluding, dropped=dropped)
    assert 0.05 < exposed < 0.5 and 0.05 < split < 0.5 and 0.05 < aborted < 0.5
    rng = np.random.default_rng(1)
    trials, seen = 300, {"exposed": 0, "split": 0, "aborted": 0}
    for _ in range(trials):
        setup = RoundSetup(round_number=1, site_ids=tuple(range(1, n + 1)), threshold=21,
                           vector_length=1, neighbours=k, graph_seed=rng.bytes(32))
        bad = (rng.permutation(n)[:colluding + dropped] + 1).tolist()
        corrupt, gone = set(bad[:colluding]), set(bad[colluding:])
        seen["exposed"] += any(len(corrupt.intersection(setup.neighbourhood(u))) >= t
                               for u in setup.site_ids if u not in corrupt)
        seen["split"] += not _connected_without(setup, corrupt | gone)
        seen["aborted"] += _plus_contributors(
            setup, dict.fromkeys(gone, Phase.MASKED_INPUT)) is None
    # 300 trials: +0.05 is more than 2 standard deviations of each sampled rate.
    assert seen["exposed"] / trials <= exposed + 0.05
    assert seen["split"] / trials <= split + 0.05
    assert seen["aborted"] / trials <= aborted + 0.05
    # Fewer colluding sites than t, fewer removed than k: nothing can go wrong, whatever graph.
    assert graph_bounds(100, 14, 8, colluding=5, dropped=5) == (0.0, 0.0, 0.0)


def test_secagg_plus_falls_to_an_aggregator_that_lies_about_dropouts() -> None:
    """Documented limitation (module threat model): SecAgg+ is for an honest-but-curious
    aggregator. Telling each site a different survivor list, a malicious one rebuilds the
    self-mask seed of site u from neighbours told u survived and the mask keys of all u's
    neighbours from sites told they dropped. Every honest site's checks pass: no site reveals
    both shares of one site, and no neighbourhood it reveals for is below its threshold."""
    r = _plus_round(n=20, k=4)
    setup, u, t = r.setup, 1, r.setup.neighbour_threshold
    _, masked = r.to_masked_inputs()
    everyone = set(setup.site_ids)
    targets = [v for v in setup.neighbourhood(u) if v != u]
    self_mask: dict[int, int] = {}
    keys: dict[int, dict[int, int]] = {v: {} for v in targets}
    for w in setup.site_ids:
        declared_dropped: set[int] = set()
        for v in sorted(targets, key=lambda v: len(keys[v])):  # the neediest first
            if v == w or w not in setup.neighbourhood(v) or len(keys[v]) >= t:
                continue
            survivors = everyone - declared_dropped - {v}
            if all(len(survivors.intersection(setup.neighbourhood(o))) >= t
                   for o in setup.neighbourhood(w)):  # what w checks before answering
                declared_dropped.add(v)
        response = r.sites[w].unmask(UnmaskRequest(tuple(sorted(everyone - declared_dropped))))
        for share in response.self_mask_shares:
            if share.owner == u:
                self_mask[w] = shamir.share_from_bytes(share.value)
        for share in response.key_shares:
            keys[share.owner][w] = shamir.share_from_bytes(share.value)
    y = np.frombuffer(next(m.masked for m in masked if m.site == u), dtype="<u8").copy()
    b = shamir.reconstruct(self_mask, threshold=t).to_bytes(32, "big")
    y -= expand_mask(_self_mask_seed(b, setup.context, u), setup.vector_length)
    public = r.sites[u]._mask_key.public_key().public_bytes_raw()
    for v in targets:
        key = X25519PrivateKey.from_private_bytes(
            shamir.reconstruct(keys[v], threshold=t).to_bytes(32, "big"))
        mask = expand_mask(_pair_mask_seed(_agree(key, public, owner=u), setup.context, u, v),
                           setup.vector_length)
        y = y - mask if u < v else y + mask
    np.testing.assert_array_equal(y, setup.encoding.encode(r.updates[u], site=str(u)))


# ----------------------------------------------------------------------------- signed keys
@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three certified sites of one federation, and a site certified by another CA."""
    from fedcare.protection.identity import SiteIdentity
    from fedcare.runtime.flower_deploy import make_certificates

    ours = make_certificates(tmp_path_factory.mktemp("pki"), ["a", "b", "c"])
    theirs = make_certificates(tmp_path_factory.mktemp("other"), ["d"])
    made: dict[str, object] = {
        name: SiteIdentity.load(ca=ours.ca, certificate=cert, key=key)
        for name, (cert, key) in ours.sites.items()}
    made["outsider"] = SiteIdentity.load(ca=theirs.ca, certificate=theirs.sites["d"][0],
                                         key=theirs.sites["d"][1])
    made["aggregator"] = ours.aggregator
    made["ca"] = ours.ca
    return made


def _signed_sites(identities: dict[str, object], setup: RoundSetup) -> dict[int, SecAggSite]:
    from fedcare.protection.identity import SiteIdentity

    names = ("a", "b", "c")  # sites 1-3; a fourth id, if any, is left to the aggregator
    return {i: SecAggSite(i, setup, identity=identities[name])  # type: ignore[arg-type]
            for i, name in zip(setup.site_ids[:3], names, strict=True)
            if isinstance(identities[name], SiteIdentity)}


def test_signed_keys_give_the_same_sum(identities: dict[str, object]) -> None:
    setup = RoundSetup(round_number=1, site_ids=(1, 2, 3), threshold=2, vector_length=5)
    sites = _signed_sites(identities, setup)
    aggregator = SecAggAggregator(setup)
    roster = aggregator.collect_keys([s.advertise_keys() for s in sites.values()])
    assert all(k.signature and k.certificate for k in roster.keys)
    inboxes = aggregator.collect_shares([s.share_keys(roster) for s in sites.values()])
    updates = _updates(setup)
    request = aggregator.collect_masked_inputs(
        [sites[i].mask_input(inboxes[i], updates[i]) for i in sites])
    total = aggregator.collect_unmask_responses([sites[i].unmask(request) for i in sites])
    np.testing.assert_array_equal(total.fixed_point, _plain_sum(setup, updates, (1, 2, 3)))


def test_an_aggregator_that_substitutes_or_invents_keys_is_detected(
        identities: dict[str, object]) -> None:
    """Bonawitz et al.'s malicious-model PKI: each site's keys are signed by its certificate."""
    from fedcare.protection.identity import SiteIdentity

    setup = RoundSetup(round_number=7, site_ids=(1, 2, 3, 4), threshold=3, vector_length=5)
    sites = _signed_sites(identities, setup)
    honest = [sites[i].advertise_keys() for i in (1, 2, 3)]
    mine = X25519PrivateKey.generate().public_key().public_bytes_raw()

    def refused(roster: list[KeyAdvertisement], match: str) -> None:
        site = SecAggSite(1, setup, identity=identities["a"])  # type: ignore[arg-type]
        own = site.advertise_keys()
        with pytest.raises(ProtocolError, match=match):
            site.share_keys(KeyRoster((own, *roster[1:])))

    # Key substitution: site 2's encryption key replaced by the aggregator's own.
    swapped = dataclasses.replace(honest[1], encryption_public_key=mine)
    refused([honest[0], swapped, honest[2]],
            "the keys of site 2 in round 7: the signature does not match site 'b'")
    # A Sybil: a fourth "site" whose keys are not signed at all...
    fake = KeyAdvertisement(4, mine, X25519PrivateKey.generate().public_key()
                            .public_bytes_raw(), b"\0" * 32)
    refused([*honest, fake], "the keys of site 4 in round 7 are not signed")
    # ...signed with a certificate from another CA...
    outsider = identities["outsider"]
    assert isinstance(outsider, SiteIdentity)
    from fedcare.protection.secagg import signed_keys

    forged = dataclasses.replace(fake, certificate=outsider.certificate,
                                 signature=outsider.sign(signed_keys(fake, setup.context)))
    refused([*honest, forged], "site 4 in round 7: the certificate was not issued by the "
                               "federation's CA")
    # ...or with a real site's certificate and key under a second id: one site counted twice.
    b = identities["b"]
    assert isinstance(b, SiteIdentity)
    twice = dataclasses.replace(fake, certificate=b.certificate,
                                signature=b.sign(signed_keys(fake, setup.context)))
    refused([*honest, twice], "site 'b' signed the keys of both site 2 and site 4")
    # A signature of another round does not carry over.
    earlier = RoundSetup(round_number=6, site_ids=(1, 2, 3, 4), threshold=3, vector_length=5)
    replayed = _signed_sites(identities, earlier)[2].advertise_keys()
    refused([honest[0], replayed, honest[2]], "the signature does not match site 'b'")


def test_the_aggregators_own_certificate_is_not_a_site(identities: dict[str, object]) -> None:
    from fedcare.protection.identity import SiteIdentity

    a = identities["a"]
    assert isinstance(a, SiteIdentity)
    cert_path, _ = identities["aggregator"]  # type: ignore[misc]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    with pytest.raises(ProtocolError, match="not a site's"):
        a.verify_certificate(der, where="the aggregator")
