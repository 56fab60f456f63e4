"""Run configuration: defaults, ``--set`` overrides, TOML files and the TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.config import DataConfig, FederationConfig, RunConfig
from fedcare.errors import ConfigError


# ----------------------------------------------------------------- defaults
def test_empty_config_is_the_default_heart_disease_job() -> None:
    config = RunConfig.from_dict({})

    assert config.to_dict() == RunConfig().to_dict()
    assert config.data.dataset_name == "heart-disease"
    assert config.federation == FederationConfig()
    assert config.baselines.enabled == "auto"  # on without DP, off in a private run


@pytest.mark.parametrize(("data", "name"), [
    (DataConfig(), "heart-disease"), (DataConfig(data_dir="d"), "files"),
    (DataConfig(files=["a.csv"]), "files"), (DataConfig(dataset="synthetic"), "synthetic"),
])
def test_dataset_name_resolves_the_empty_default(data: DataConfig, name: str) -> None:
    assert data.dataset_name == name


def test_defaults_are_not_shared_between_configs() -> None:
    first, second = RunConfig(), RunConfig()

    first.set("model.hidden=[8]")

    assert second.model.hidden == [64, 64]


# ----------------------------------------------------------------- --set values
@pytest.mark.parametrize(("assignment", "attribute", "expected"), [
    ("federation.rounds=50", ("federation", "rounds"), 50),
    ("seed=7", ("seed",), 7),
    ("federation.lr=0.25", ("federation", "lr"), 0.25),
    ("federation.lr=1", ("federation", "lr"), 1.0),  # an int is a valid float
    ("federation.tau=1e-6", ("federation", "tau"), 1e-6),
    ("data.dataset=breast-cancer", ("data", "dataset"), "breast-cancer"),  # bare string
    ('data.dataset="synthetic"', ("data", "dataset"), "synthetic"),  # quoted string
    ("data.schema=/conf/a=b.toml", ("data", "schema"), "/conf/a=b.toml"),  # '=' in the value
    ("data.protocol=7", ("data", "protocol"), "7"),  # a number is accepted as text
    ("name=", ("name",), ""),
    ("  federation.rounds =  3 ", ("federation", "rounds"), 3),
    ("model.hidden=[32, 16]", ("model", "hidden"), [32, 16]),
    ("model.hidden=8", ("model", "hidden"), [8]),  # one value is a list of one
    ('data.files=["/a.csv", "/b.csv"]', ("data", "files"), ["/a.csv", "/b.csv"]),
    ("baselines.enabled=false", ("baselines", "enabled"), False),
    ("baselines.enabled=true", ("baselines", "enabled"), True),
    ("baselines.enabled=auto", ("baselines", "enabled"), "auto"),
    ('baselines.enabled="auto"', ("baselines", "enabled"), "auto"),
])
def test_set_parses_values_as_toml(assignment: str, attribute: tuple[str, ...],
                                   expected: object) -> None:
    config = RunConfig()

    config.set(assignment)

    value: object = config
    for part in attribute:
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_set_changes_only_the_named_key() -> None:
    config = RunConfig()

    config.set("federation.mu=0.5")

    expected = RunConfig().to_dict()
    expected["federation"]["mu"] = 0.5
    assert config.to_dict() == expected


def test_later_set_wins() -> None:
    config = RunConfig()

    config.set("federation.rounds=5")
    config.set("federation.rounds=9")

    assert config.federation.rounds == 9


@pytest.mark.parametrize(("assignment", "pieces"), [
    ("federation.rounds=abc", ["'federation.rounds' must be int", "found 'abc' (str)"]),
    ("federation.rounds=2.5", ["'federation.rounds' must be int", "found 2.5 (float)"]),
    ("federation.rounds=true", ["'federation.rounds' must be int", "(bool)"]),
    ("federation.lr=fast", ["'federation.lr' must be float", "found 'fast'"]),
    ("baselines.enabled=1", ["'baselines.enabled' must be true, false or \"auto\"",
                             "found 1 (int)"]),
    ("baselines.enabled=yes", ["'baselines.enabled' must be true, false or \"auto\"",
                               "found 'yes'"]),
    ("data.dataset=false", ["'data.dataset' must be str", "found False (bool)"]),
    ('model.hidden=[8, "x"]', ["'model.hidden[1]' must be int", "found 'x'"]),
    ("federation=3", ["'federation' is a section", "found 3"]),
])
def test_wrong_type_names_the_key_and_the_value(assignment: str, pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        RunConfig().set(assignment)

    message = str(excinfo.value)
    assert message.startswith("--set: ")
    for piece in pieces:
        assert piece in message


def test_unknown_nested_key_lists_the_valid_keys_of_its_section() -> None:
    with pytest.raises(ConfigError) as excinfo:
        RunConfig().set("federation.round=3")

    message = str(excinfo.value)
    assert "unknown key 'federation.round'" in message
    for key in ("federation.rounds", "federation.strategy", "federation.min_sites",
                "federation.server_lr"):
        assert f"'{key}'" in message


def test_unknown_top_level_key_lists_sections_and_keys() -> None:
    with pytest.raises(ConfigError) as excinfo:
        RunConfig().set("epochs=3")

    message = str(excinfo.value)
    assert "unknown key 'epochs'" in message
    for key in RunConfig().to_dict():
        assert f"'{key}'" in message


def test_too_deep_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'federation.rounds' must be int"):
        RunConfig().set("federation.rounds.max=3")


@pytest.mark.parametrize("assignment", ["federation.rounds", "=3", "  =3", ""])
def test_set_needs_key_equals_value(assignment: str) -> None:
    with pytest.raises(ConfigError, match=r"--set expects key=value"):
        RunConfig().set(assignment)


def test_failed_set_of_a_list_leaves_the_old_value() -> None:
    config = RunConfig()

    with pytest.raises(ConfigError):
        config.set('model.hidden=[8, "x"]')

    assert config.model.hidden == [64, 64]


# ----------------------------------------------------------------- TOML files
def test_load_reads_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[federation]\nstrategy = "fedadam"\nrounds = 4\n'
                    '[model]\nname = "mlp"\nhidden = [16]\n', encoding="utf-8")

    config = RunConfig.load(path)

    assert (config.seed, config.federation.strategy, config.federation.rounds) == (3, "fedadam", 4)
    assert (config.model.name, config.model.hidden) == ("mlp", [16])
    assert config.federation.lr == FederationConfig().lr


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml does not exist"):
        RunConfig.load(missing)

    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\nrounds = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.toml is not valid TOML"):
        RunConfig.load(broken)

    typo = tmp_path / "typo.toml"
    typo.write_text("[federation]\nrouns = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"typo.toml: unknown key 'federation.rouns'"):
        RunConfig.load(typo)


def changed_config() -> RunConfig:
    config = RunConfig()
    for assignment in (
        "seed=12345", "out=runs/é dir", 'name="quote \\" and back\\\\slash"',
        "data.dataset=breast-cancer", "data.partition=dirichlet", "data.alpha=0.1",
        "data.sites=7", "data.test_fraction=0.25", 'data.files=["x y.csv", "z.parquet"]',
        "model.name=mlp", "model.hidden=[3, 5, 8]",
        "federation.strategy=fedyogi", "federation.tau=1e-20", "federation.lr=0.1",
        "federation.beta2=0.999", "federation.server_lr=1e16", "baselines.enabled=false",
    ):
        config.set(assignment)
    return config


@pytest.mark.parametrize("config", [RunConfig(), changed_config()], ids=["default", "changed"])
def test_to_toml_round_trips_through_load(tmp_path: Path, config: RunConfig) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml(), encoding="utf-8")

    expected = config.to_dict()  # relative paths in a file are relative to its folder
    expected["out"] = str(tmp_path / config.out)
    expected["data"]["files"] = [str(tmp_path / name) for name in config.data.files]
    assert RunConfig.load(path).to_dict() == expected


def test_to_toml_is_sectioned_toml() -> None:
    parsed = tomllib.loads(changed_config().to_toml())

    assert set(parsed) == set(RunConfig().to_dict())
    assert {"seed", "data", "model", "federation", "baselines"} <= set(parsed)
    assert parsed["federation"]["strategy"] == "fedyogi"
    assert parsed["name"] == 'quote " and back\\slash'


def test_to_toml_round_trips_control_characters() -> None:
    config = RunConfig()
    config.name = "tab\there\nnewline\x01"

    assert RunConfig.from_dict(tomllib.loads(config.to_toml())).name == config.name


# Any text TOML can hold: everything but lone surrogates.
TOML_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(name=TOML_TEXT, files=st.lists(TOML_TEXT, max_size=3),
       lr=st.floats(min_value=1e-300, max_value=1e300),
       hidden=st.lists(st.integers(1, 2**31), min_size=1, max_size=4),
       seed=st.integers(0, 2**63 - 1), enabled=st.sampled_from([True, False, "auto"]))
def test_to_toml_round_trips_any_values(name: str, files: list[str], lr: float,
                                        hidden: list[int], seed: int,
                                        enabled: bool | str) -> None:
    config = RunConfig(seed=seed, name=name)
    config.data.files = files
    config.federation.lr = lr
    config.model.hidden = hidden
    config.baselines.enabled = enabled

    assert RunConfig.from_dict(tomllib.loads(config.to_toml())).to_dict() == config.to_dict()


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_set_reads_back_any_float_written_with_repr(value: float) -> None:
    config = RunConfig()

    config.set(f"federation.lr={value!r}")

    assert config.federation.lr == value


def test_to_toml_round_trips_the_delete_character() -> None:
    config = RunConfig()
    config.name = "run\x7f1"

    assert RunConfig.from_dict(tomllib.loads(config.to_toml())).name == config.name


# ----------------------------------------------------------------- settings that do nothing
def test_privacy_keys_in_a_file_without_a_level_are_refused_naming_the_file(
        tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[privacy]\nepsilon = 3.0\nclip_norm = 0.5\n", encoding="utf-8")
    config = RunConfig.load(path)

    with pytest.raises(ConfigError, match=r"privacy.epsilon \(.*job.toml\), privacy.clip_norm"):
        config.check_settings()

    config.set("privacy.level=record")
    config.check_settings()  # the same keys in a private run are fine


def test_a_runs_own_config_toml_passes_the_check() -> None:
    # A non-private run's config.toml spells out every privacy default: not "given".
    written = RunConfig.from_dict(tomllib.loads(RunConfig().to_toml()), source="config.toml")

    written.check_settings()


def test_a_default_value_given_on_the_command_line_still_counts() -> None:
    config = RunConfig()
    config.set_value("privacy.epsilon", 1.0, source="--epsilon")

    with pytest.raises(ConfigError, match=r"privacy.epsilon \(--epsilon\).*--privacy record"):
        config.check_settings()


def test_distributed_noise_with_record_level_is_refused() -> None:
    config = RunConfig()
    config.set("privacy.level=record")
    config.set("privacy.noise=distributed")

    with pytest.raises(ConfigError, match="site-level privacy only"):
        config.check_settings()

    config.set("privacy.level=site")
    config.check_settings()


def test_copy_remembers_the_given_keys() -> None:
    config = RunConfig()
    config.set("privacy.delta=1e-6")

    twin = config.copy()

    assert twin.to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        twin.check_settings()
