"""CKKS aggregation: precision of the sum, flooding, key files, and what is refused."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.cli.keys import add_keys_parser
from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.noise import InsecureNoiseWarning, SecureNoise, SeededNoise
from fedcare.protection.ckks import (
    DEFAULT_FLOODING_STD,
    DEFAULT_GRID,
    KEY_FILE_MAGIC,
    KEY_SET_ID_BYTES,
    MAX_ABS_VALUE,
    AggregatorContext,
    CkksParameters,
    CkksPayload,
    KeyFiles,
    SiteContext,
    add,
    create_site_context,
    decrypt,
    encrypt,
    generate_keys,
    load_aggregator_context,
    load_context,
    load_site_context,
)

SLOTS = 4096
LENGTH = 3 * SLOTS + 7
"""Four chunks, the last holding 7 values."""

EXACT_BOUND = 1e-9
"""Stated bound on |CKKS sum - numpy sum| for up to 1,000 payloads of magnitude <= 1e3."""


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def site(key_files: KeyFiles) -> SiteContext:
    return load_site_context(key_files.site)


@pytest.fixture(scope="module")
def aggregator(key_files: KeyFiles) -> AggregatorContext:
    return load_aggregator_context(key_files.aggregator)


@pytest.fixture(scope="module")
def other_site() -> SiteContext:
    """A second key set with the same parameters."""
    return create_site_context()


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1e3, 1e3, LENGTH) for _ in range(3)]


@pytest.fixture(scope="module")
def payloads(site: SiteContext, updates: list[np.ndarray]) -> list[CkksPayload]:
    return [encrypt(site, update, site=f"site-{i}") for i, update in enumerate(updates)]


@pytest.fixture(scope="module")
def aggregate(aggregator: AggregatorContext, payloads: list[CkksPayload]) -> CkksPayload:
    return _sum(aggregator, payloads)


@pytest.fixture
def seeded() -> Iterator[SeededNoise]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureNoiseWarning)
        yield SeededNoise(7)


def _sum(aggregator: AggregatorContext, payloads: list[CkksPayload]) -> CkksPayload:
    total = None
    for i, payload in enumerate(payloads):
        total = add(aggregator, total, payload, site=f"site-{i}")
    assert total is not None
    return total


def _exact(site: SiteContext, payload: CkksPayload) -> np.ndarray:
    """The unflooded decryption, which `decrypt` never returns (test-only)."""
    slots = [ts.ckks_vector_from(site.context, chunk).decrypt() for chunk in payload.chunks]
    return np.concatenate(slots)[:payload.length]


def _replace_chunk(payload: CkksPayload, index: int, chunk: bytes) -> CkksPayload:
    chunks = list(payload.chunks)
    chunks[index] = chunk
    return dataclasses.replace(payload, chunks=tuple(chunks))


# Precision and flooding ---------------------------------------------------------------------

def test_sum_of_three_payloads_equals_numpy_sum_within_bound(
        site: SiteContext, updates: list[np.ndarray], aggregate: CkksPayload) -> None:
    assert len(aggregate.chunks) == 4
    assert aggregate.length == LENGTH
    error = np.abs(_exact(site, aggregate) - np.sum(updates, axis=0))
    assert error.max() <= EXACT_BOUND


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=5, max_size=5), min_size=1, max_size=4))
def test_any_sum_of_small_payloads_is_within_bound(
        site: SiteContext, aggregator: AggregatorContext, vectors: list[list[float]]) -> None:
    total = _sum(aggregator, [encrypt(site, v, site="s") for v in vectors])
    assert np.abs(_exact(site, total) - np.sum(vectors, axis=0)).max() <= EXACT_BOUND


@pytest.mark.slow
def test_sum_of_a_thousand_payloads_is_within_bound(
        site: SiteContext, aggregator: AggregatorContext) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.uniform(-1e3, 1e3, (1000, SLOTS))
    total = _sum(aggregator, [encrypt(site, v, site="s") for v in vectors])
    assert np.abs(_exact(site, total) - vectors.sum(axis=0)).max() <= EXACT_BOUND


def test_decrypt_adds_flooding_of_the_stated_std_and_rounds_to_the_grid(
        site: SiteContext, updates: list[np.ndarray], aggregate: CkksPayload,
        seeded: SeededNoise) -> None:
    out = decrypt(site, aggregate, noise=seeded)

    deviation = out - np.sum(updates, axis=0)
    # Rounding to a grid 16x finer than the noise adds grid**2/12 to the variance: 0.02%.
    assert abs(deviation.std() / DEFAULT_FLOODING_STD - 1) < 0.05
    assert abs(deviation.mean()) < 5 * DEFAULT_FLOODING_STD / math.sqrt(LENGTH)
    assert np.abs(deviation).max() < 6 * DEFAULT_FLOODING_STD + DEFAULT_GRID / 2
    assert np.array_equal(np.rint(out / DEFAULT_GRID) * DEFAULT_GRID, out)


def test_decrypt_draws_its_flooding_in_float64(site: SiteContext,
                                               aggregate: CkksPayload) -> None:
    asked: list[torch.dtype] = []

    class Recorder:
        secure = True

        def gaussian(self, n: int, std: float, *, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
            asked.append(dtype)
            return SecureNoise().gaussian(n, std, dtype=dtype)

    decrypt(site, aggregate, noise=Recorder())  # type: ignore[arg-type]
    assert asked == [torch.float64]


def test_decrypt_honours_flooding_std_and_grid(
        site: SiteContext, updates: list[np.ndarray], aggregate: CkksPayload,
        seeded: SeededNoise) -> None:
    out = decrypt(site, aggregate, noise=seeded, flooding_std=1e-2, grid=2.0**-4)

    deviation = out - np.sum(updates, axis=0)
    assert abs(deviation.std() / math.hypot(1e-2, 2.0**-4 / math.sqrt(12)) - 1) < 0.05
    assert np.array_equal(np.rint(out * 16) / 16, out)


def test_exact_decryptions_repeat_but_flooded_ones_do_not(
        site: SiteContext, aggregate: CkksPayload) -> None:
    # The exact error pattern is a fixed function of key and ciphertext: what
    # Li-Micciancio solve for. Each flooded release hides it under fresh noise.
    assert np.array_equal(_exact(site, aggregate), _exact(site, aggregate))
    noise = SecureNoise()
    first = decrypt(site, aggregate, noise=noise)
    second = decrypt(site, aggregate, noise=noise)
    assert np.mean(first != second) > 0.9


@pytest.mark.parametrize(("flooding_std", "grid", "match"), [
    (0.0, DEFAULT_GRID, "flooding_std"),
    (1e-15, DEFAULT_GRID, "flooding_std"),
    (math.nan, DEFAULT_GRID, "flooding_std"),
    (DEFAULT_FLOODING_STD, 1e-6, "power of two"),
    (DEFAULT_FLOODING_STD, 0.0, "power of two"),
])
def test_decrypt_refuses_exact_release_settings(
        site: SiteContext, aggregate: CkksPayload, seeded: SeededNoise,
        flooding_std: float, grid: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        decrypt(site, aggregate, noise=seeded, flooding_std=flooding_std, grid=grid)


# Keys ---------------------------------------------------------------------------------------

def test_aggregator_context_cannot_decrypt(
        aggregator: AggregatorContext, aggregate: CkksPayload, seeded: SeededNoise) -> None:
    assert not aggregator.context.is_private()
    assert not aggregator.context.has_secret_key()
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(aggregator.context, aggregate.chunks[0]).decrypt()
    with pytest.raises(ConfigError, match="decrypt needs the SiteContext"):
        decrypt(aggregator, aggregate, noise=seeded)  # type: ignore[arg-type]


def test_aggregator_context_cannot_encrypt(aggregator: AggregatorContext) -> None:
    # Symmetric key sets: without the secret key nobody can make a ciphertext of their choosing.
    with pytest.raises(ValueError, match="doesn't support encryption"):
        ts.ckks_vector(aggregator.context, np.ones(SLOTS))
    with pytest.raises(ConfigError, match="encrypt needs the SiteContext"):
        encrypt(aggregator, np.ones(3), site="aggregator")  # type: ignore[arg-type]


def test_a_public_key_context_is_refused_to_sites_and_aggregator() -> None:
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                         coeff_mod_bit_sizes=[60, 60, 60])
    context.global_scale = 2.0**70
    key_set = bytes(KEY_SET_ID_BYTES)
    with pytest.raises(ConfigError, match="public-key CKKS context"):
        SiteContext(context, key_set=key_set)
    public = ts.context_from(context.serialize(save_public_key=True, save_secret_key=False,
                                               save_galois_keys=False, save_relin_keys=False))
    with pytest.raises(ConfigError, match="holds a public key"):
        AggregatorContext(public, key_set=key_set)


def test_key_files_are_0600_and_only_the_site_file_holds_the_secret_key(
        key_files: KeyFiles, site: SiteContext, aggregator: AggregatorContext) -> None:
    for path in (key_files.site, key_files.aggregator):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public_bytes = key_files.aggregator.read_bytes()
    secret_bytes = key_files.site.read_bytes()
    head = len(KEY_FILE_MAGIC) + KEY_SET_ID_BYTES
    assert public_bytes[:head] == secret_bytes[:head] == KEY_FILE_MAGIC + site.key_set
    assert not ts.context_from(public_bytes[head:]).is_private()
    assert ts.context_from(secret_bytes[head:]).is_private()
    assert len(public_bytes) < 200  # parameters and id: no key of any kind
    assert (key_files.fingerprint == site.fingerprint == aggregator.fingerprint
            == hashlib.sha256(public_bytes).hexdigest())
    manifest = json.loads(key_files.manifest.read_text())
    assert manifest["fingerprint"] == key_files.fingerprint
    assert manifest["poly_modulus_degree"] == 8192
    assert manifest["coeff_mod_bit_sizes"] == [60, 60, 60]
    assert key_files.manifest.stat().st_size < 2000  # parameters only, no key material
    assert sorted(p.name for p in key_files.site.parent.iterdir()) == [
        "aggregator.ckks", "keys.json", "site.ckks"]


def test_generate_keys_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = generate_keys(tmp_path)
    with pytest.raises(ConfigError, match=r"refusing to overwrite.*overwrite=True"):
        generate_keys(tmp_path)
    assert load_aggregator_context(first.aggregator).fingerprint == first.fingerprint

    second = generate_keys(tmp_path, overwrite=True)
    assert second.fingerprint != first.fingerprint  # same parameters, another key-set id
    assert load_site_context(second.site).fingerprint == second.fingerprint
    assert stat.S_IMODE(second.site.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "aggregator.ckks", "keys.json", "site.ckks"]  # no temporary files left


def test_a_site_key_is_refused_to_the_aggregator_and_vice_versa(
        key_files: KeyFiles, site: SiteContext) -> None:
    with pytest.raises(ConfigError, match="refusing to give the aggregator a secret key"):
        load_aggregator_context(key_files.site)
    with pytest.raises(ConfigError, match="refusing to give the aggregator a secret key"):
        AggregatorContext(site.context, key_set=site.key_set)
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_site_context(key_files.aggregator)
    assert isinstance(load_context(key_files.site), SiteContext)
    assert isinstance(load_context(key_files.aggregator), AggregatorContext)


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated", "bfv", "no-header",
                                     "missing"])
def test_bad_key_files_are_refused_naming_the_path(
        tmp_path: Path, key_files: KeyFiles, content: str) -> None:
    path = tmp_path / "aggregator.ckks"
    if content == "garbage":
        path.write_bytes(os.urandom(1000))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        path.write_bytes(key_files.site.read_bytes()[:5000])
    elif content == "bfv":
        path.write_bytes(KEY_FILE_MAGIC + bytes(KEY_SET_ID_BYTES)
                         + ts.context(ts.SCHEME_TYPE.BFV, 4096, 1032193).serialize())
    elif content == "no-header":  # a bare TenSEAL context, as fedcare wrote before key-set ids
        path.write_bytes(key_files.site.read_bytes()[len(KEY_FILE_MAGIC) + KEY_SET_ID_BYTES:])
    with pytest.raises(ConfigError) as caught:
        load_aggregator_context(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, ["coeff_mod_bit_sizes", "240", "218"]),
    ({"poly_modulus_degree": 4096}, ["coeff_mod_bit_sizes", "180", "109", "4096"]),
    ({"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": (60,) * 8}, ["480", "438"]),
    ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (30, 30)}, ["60", "54"]),
    ({"poly_modulus_degree": 1024, "coeff_mod_bit_sizes": (20, 20)}, ["40", "27"]),
    ({"poly_modulus_degree": 3000}, ["poly_modulus_degree", "3000"]),
    ({"coeff_mod_bit_sizes": (61, 60, 60)}, ["coeff_mod_bit_sizes", "61"]),
    ({"coeff_mod_bit_sizes": (60,)}, ["coeff_mod_bit_sizes", "at least two"]),
    ({"global_scale_bits": 73}, ["global_scale_bits", "73", "<= 72"]),
    ({"global_scale_bits": 30}, ["global_scale_bits", "30", ">= 40"]),
])
def test_parameters_below_128_bit_security_or_headroom_are_refused(
        kwargs: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        CkksParameters(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(caught.value)


def test_parameters_at_the_security_bound_are_accepted() -> None:
    assert CkksParameters(coeff_mod_bit_sizes=(60, 60, 49, 49)).slots == 4096
    assert CkksParameters(poly_modulus_degree=32768).slots == 16384


# What add and decrypt refuse ----------------------------------------------------------------

def test_add_refuses_a_payload_of_another_key_set_naming_the_site(
        aggregator: AggregatorContext, other_site: SiteContext, aggregate: CkksPayload) -> None:
    rogue = encrypt(other_site, np.ones(LENGTH), site="rogue")
    with pytest.raises(ProtocolError, match=r"site 'rogue'.*key set"):
        add(aggregator, aggregate, rogue, site="rogue")
    with pytest.raises(ProtocolError, match=r"site 'rogue'.*key set"):
        add(aggregator, None, rogue, site="rogue")


def test_another_key_sets_ciphertext_with_a_copied_fingerprint_is_refused_at_decrypt(
        site: SiteContext, aggregator: AggregatorContext, other_site: SiteContext,
        aggregate: CkksPayload, seeded: SeededNoise) -> None:
    forged = dataclasses.replace(encrypt(other_site, np.ones(LENGTH), site="rogue"),
                                 fingerprint=site.fingerprint)
    total = add(aggregator, aggregate, forged, site="rogue")  # undetectable without the key
    with pytest.raises(ProtocolError, match=r"decrypts beyond.*Nothing was released"):
        decrypt(site, total, noise=seeded)


@pytest.mark.parametrize("damage", ["truncated", "extended", "garbage", "empty", "other-scale"])
def test_add_refuses_a_damaged_chunk_naming_site_and_chunk(
        site: SiteContext, aggregator: AggregatorContext, payloads: list[CkksPayload],
        damage: str) -> None:
    chunk = payloads[1].chunks[1]
    if damage == "truncated":
        chunk = chunk[:len(chunk) // 2]
    elif damage == "extended":
        chunk += b"\x00"
    elif damage == "garbage":
        chunk = np.random.default_rng(0).bytes(len(chunk))
    elif damage == "empty":
        chunk = b""
    else:
        # Same ring and moduli (so the same SEAL parms_id), another scale.
        context = site.context.copy()
        context.global_scale = 2.0**60
        chunk = ts.ckks_vector(context, np.ones(SLOTS)).serialize()
    with pytest.raises(ProtocolError, match=r"site 'st-olav'.*chunk 2 of 4"):
        add(aggregator, payloads[0], _replace_chunk(payloads[1], 1, chunk), site="st-olav")


@pytest.mark.parametrize("change", ["chunk-dropped", "chunk-added", "length-too-long",
                                    "length-off-by-one", "length-zero"])
def test_add_refuses_wrong_length_or_chunk_count(
        aggregator: AggregatorContext, payloads: list[CkksPayload], change: str) -> None:
    payload = payloads[1]
    if change == "chunk-dropped":
        payload = dataclasses.replace(payload, chunks=payload.chunks[:-1])
    elif change == "chunk-added":
        payload = dataclasses.replace(payload, chunks=(*payload.chunks, payload.chunks[0]))
    elif change == "length-too-long":
        payload = dataclasses.replace(payload, length=LENGTH + SLOTS)
    elif change == "length-off-by-one":
        payload = dataclasses.replace(payload, length=LENGTH - 1)
    else:
        payload = dataclasses.replace(payload, length=0)
    with pytest.raises(ProtocolError, match="site 'st-olav'"):
        add(aggregator, payloads[0], payload, site="st-olav")


@settings(max_examples=30, deadline=None)
@given(position=st.integers(0, 262_200), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused_or_harmless_never_silently_wrong(
        site: SiteContext, aggregator: AggregatorContext, payloads: list[CkksPayload],
        updates: list[np.ndarray], position: int, bit: int) -> None:
    chunk = bytearray(payloads[1].chunks[3])
    chunk[position % len(chunk)] ^= 1 << bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureNoiseWarning)
        noise = SeededNoise(0)
    try:
        total = add(aggregator, payloads[0], _replace_chunk(payloads[1], 3, bytes(chunk)),
                    site="s")
        out = decrypt(site, total, noise=noise)
    except ProtocolError:
        return
    expected = updates[0] + updates[1]
    assert np.abs(out - expected).max() < 6 * DEFAULT_FLOODING_STD + DEFAULT_GRID


def test_encrypt_refuses_non_finite_values_naming_site_and_index(site: SiteContext) -> None:
    vector = np.zeros(LENGTH)
    vector[5000] = np.nan
    with pytest.raises(ProtocolError, match=r"site 'st-olav'.*index 5000 is nan"):
        encrypt(site, vector, site="st-olav")
    vector[5000], vector[9] = 0.0, -np.inf
    with pytest.raises(ProtocolError, match=r"site 'st-olav'.*index 9 is -inf"):
        encrypt(site, vector, site="st-olav")


@pytest.mark.parametrize("vector", [np.full(3, 2 * MAX_ABS_VALUE), np.zeros((2, 3)), np.zeros(0)])
def test_encrypt_refuses_what_it_cannot_sum(site: SiteContext, vector: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="site 'st-olav'"):
        encrypt(site, vector, site="st-olav")


def test_add_needs_the_public_context(site: SiteContext, payloads: list[CkksPayload]) -> None:
    with pytest.raises(ConfigError, match="add needs the AggregatorContext"):
        add(site, None, payloads[0], site="s")  # type: ignore[arg-type]


# Command line -------------------------------------------------------------------------------

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedcare")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_keys_init_and_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    assert _run(["keys", "init", str(directory)]) == 0
    out = capsys.readouterr().out
    fingerprint = json.loads((directory / "keys.json").read_text())["fingerprint"]
    assert f"{directory / 'site.ckks'}" in out
    assert out.count("-rw-------") == 2
    assert fingerprint in out

    for name in ("site.ckks", "aggregator.ckks"):
        assert _run(["keys", "fingerprint", str(directory / name)]) == 0
        printed = capsys.readouterr()
        assert f"fingerprint {fingerprint}" in printed.out
        assert printed.err == ""

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        _run(["keys", "init", str(directory)])
    assert _run(["keys", "init", str(directory), "--overwrite",
                 "--poly-modulus-degree", "16384"]) == 0
    assert "poly_modulus_degree 16384" in capsys.readouterr().out
    assert load_site_context(directory / "site.ckks").slots == 8192


def test_keys_fingerprint_warns_about_a_readable_site_key(
        key_files: KeyFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exposed = tmp_path / "site.ckks"
    exposed.write_bytes(key_files.site.read_bytes())
    exposed.chmod(0o644)
    assert _run(["keys", "fingerprint", str(exposed)]) == 0
    assert "chmod 600" in capsys.readouterr().err


def test_decrypt_returns_no_view_of_the_exact_padding(
        site: SiteContext, aggregate: CkksPayload, seeded: SeededNoise) -> None:
    # The padding slots decrypt to the bare key-dependent error of zero.
    assert decrypt(site, aggregate, noise=seeded).base is None


def test_coefficient_sizes_from_a_config_list_become_a_tuple() -> None:
    params = CkksParameters(coeff_mod_bit_sizes=[60, 60, 60])  # type: ignore[arg-type]
    assert params == CkksParameters()


def test_generate_keys_reports_an_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the key files"):
        generate_keys(blocker / "keys")
