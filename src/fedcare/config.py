"""Run configuration: TOML files, ``--set key=value`` overrides, validation.

Every key has a default, so an empty config is the default job (the bundled
heart-disease data across its 4 hospitals). Keys are dotted paths into the
sections below, e.g. ``federation.rounds`` or ``data.partition``.

A relative path in a config file (`PATH_KEYS`) is relative to the file's own
folder, wherever the command runs; a path given on the command line
(``--set``, ``--data-dir``) is relative to the working directory. Both are
stored absolute, so the ``config.toml`` a run writes names the same files
from anywhere (``fedcare run --resume``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcare.errors import ConfigError
from fedcare.toml_writer import toml_value


@dataclass
class DataConfig:
    dataset: str = ""
    """Bundled dataset (``heart-disease``, ``breast-cancer``, ``synthetic``) or ``files``;
    empty: ``files`` when data_dir or files is set, else ``heart-disease``."""
    protocol: str = "flamby"
    """Preprocessing protocol of a bundled dataset (heart-disease: ``flamby`` or ``impute``)."""
    data_dir: str = ""
    """Directory with one CSV/Parquet file per site (dataset = "files")."""
    files: list[str] = field(default_factory=list)
    """Explicit data files (dataset = "files"); alternative to data_dir."""
    schema: str = ""
    """Schema TOML for user files (see ``fedcare schema infer``)."""
    sites: int = 0
    """Number of simulated sites for data without natural sites (0: dataset default)."""
    partition: str = "natural"
    """natural | iid | dirichlet | quantity."""
    alpha: float = 0.5
    """Dirichlet concentration for the dirichlet and quantity partitions (smaller = more skew)."""
    test_fraction: float = -1.0
    """Share of each site's rows held out for testing (negative: dataset default)."""
    split_seed: int = 0
    """Seed of the train/test split and the partition, kept apart from the training seed."""
    split: str = "auto"
    """auto | stratified | keyed. keyed: each record to train or test by a keyed hash of its
    own row (independent of other records); stratified: a seeded stratified shuffle per
    site. auto: keyed in a private run, stratified otherwise."""
    missing: str = "drop"
    """drop | impute | fail: what to do with missing feature values."""
    standardize: str = "auto"
    """auto | federated | site | bounds | none. auto: bounds (the schema's public ranges)
    in a private run, federated otherwise."""
    n_patients: int = 100_000
    """Cohort size of the generated ``synthetic`` dataset."""

    @property
    def dataset_name(self) -> str:
        """The dataset this config selects, with the empty default resolved."""
        if self.dataset:
            return self.dataset
        return "files" if self.data_dir or self.files else "heart-disease"


@dataclass
class ModelConfig:
    name: str = "logreg"
    """logreg | mlp."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the MLP."""


@dataclass
class FederationConfig:
    strategy: str = "fedavg"
    """fedavg | fedprox | fedadam | fedyogi | fedadagrad."""
    rounds: int = 20
    fraction: float = 1.0
    """Share of sites sampled each round (at least min_sites)."""
    min_sites: int = 1
    """Quorum: a round with fewer participating sites is not aggregated."""
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    """Local SGD learning rate."""
    momentum: float = 0.0
    """Local SGD momentum (reset every round)."""
    mu: float = 0.01
    """FedProx proximal weight."""
    server_lr: float = 0.0
    """Server learning rate; 0 takes the strategy's default (1.0 fedavg/fedprox,
    0.03 fedadam/fedyogi, 0.1 fedadagrad)."""
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity of FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021)."""


AUTO = "auto"
"""The value of an on/off switch (a ``bool | str`` field) that lets the run decide."""

PATH_KEYS = ("out", "data.data_dir", "data.files", "data.schema", "protection.keys")
"""Keys holding file or folder paths (`RunConfig.load` anchors them at the file's folder)."""

PRIVACY_ONLY_KEYS = ("privacy.epsilon", "privacy.delta", "privacy.clip_norm",
                     "privacy.noise_multiplier", "privacy.noise", "privacy.dropout_tolerance",
                     "privacy.target_quantile", "privacy.site_epsilon")
"""Keys that change nothing unless ``privacy.level`` is ``record`` or ``site``: given
without it they would leave the run non-private without a word (`RunConfig.check_settings`)."""


@dataclass
class BaselineConfig:
    enabled: bool | str = AUTO
    """Also train pooled (centralised) and each-site-alone models on the same budget:
    true | false | "auto" (on without DP, off in a private run). They are trained without
    DP on the same rows, so their exact metrics are covered by no guarantee: in a private
    run they exist only when asked for explicitly (true), labelled NOT private."""

    def wanted(self, *, private: bool) -> bool:
        """Whether this run trains the baselines (`private`: privacy.level is not none)."""
        if self.enabled == AUTO:
            return not private
        if isinstance(self.enabled, bool):
            return self.enabled
        raise ConfigError(f"baselines.enabled must be true, false or \"auto\"; found "
                          f"{self.enabled!r}.")


@dataclass
class PrivacyConfig:
    level: str = "none"
    """none | record (DP-SGD: each patient at each site) | site (client-level DP: each
    hospital's whole contribution)."""
    epsilon: float = 1.0
    """Target epsilon for the whole run (> 0); the noise multiplier is calibrated to it."""
    delta: float = 1e-5
    """Target delta, in (0, 1); keep it well below 1 / (records per site) or 1 / sites."""
    clip_norm: float = 1.0
    """C: bound on each record's gradient (record) or each site's update (site), L2."""
    noise_multiplier: float = 0.0
    """sigma; 0 calibrates it from epsilon, delta and the training plan."""
    noise: str = "central"
    """site level: central (the aggregator adds the noise) | distributed (each site adds
    its share, so the aggregator only ever sees noised sums)."""
    dropout_tolerance: int = 0
    """Distributed noise: sites per round that may drop out while the sum keeps the full
    noise (each site over-noises by selected / (selected - tolerance))."""
    accountant: str = "pld"
    """pld (tight, default) | rdp."""
    secure: bool = True
    """Noise and sampling from a CSPRNG (ChaCha20). false: seeded, reproducible and NOT
    private (tests only; warns)."""
    clipping: str = "auto"
    """Record level: per-record gradients by auto | linear (fast, Linear-layer models) | vmap."""
    target_quantile: float = 0.0
    """Site level: adaptive clipping (Andrew et al. 2021) moves clip_norm each round toward
    this quantile of the sites' update norms, e.g. 0.5; 0 keeps clip_norm fixed."""
    clip_lr: float = 0.2
    """Site level, adaptive clipping: step size of the geometric update of clip_norm."""
    count_noise: float = 0.0
    """Site level, adaptive clipping: noise std on the count of clipped sites (0: the
    expected number of sites per round / 20, as Andrew et al. suggest)."""
    site_epsilon: dict[str, float] = field(default_factory=dict)
    """Record level: a site's own cap on its epsilon, e.g. {cleveland = 0.5}; the site's
    noise is calibrated to the smaller of this and epsilon."""


@dataclass
class ProtectionConfig:
    scheme: str = "plain"
    """plain (the aggregator reads each update) | secagg (pairwise masks, Bonawitz et al.
    2017: the aggregator learns only the sum) | ckks (homomorphic encryption: the
    aggregator sums ciphertexts)."""
    threshold: float = 0.5
    """secagg: share of each round's selected sites that must stay to the end; always
    more than half (more tolerates fewer dropouts, resists more colluding sites)."""
    neighbours: int = 0
    """secagg: 0 (every site masks with every other) or SecAgg+ (Bell et al. 2020): each
    site masks with only this many random neighbours, O(n log n) work instead of O(n^2).
    An even number >= 2 log2 n of the cohort (14 for 100 sites; about 40 to resist 10%
    colluding sites). Weaker than 0: the aggregator sees a site's update if more than half
    of its neighbours collude with it, or if it lies about dropouts (fedcare.protection.secagg)."""
    keys: str = ""
    """ckks: directory of `fedcare keys init` (sites read site.ckks, the aggregator
    aggregator.ckks); empty generates a fresh key set for a one-process simulation."""


@dataclass
class RunConfig:
    seed: int = 0
    threads: int = 1
    """Intra-op threads for torch. Batches of tabular models are too small to split
    across cores: one thread is fastest, and more threads spin against any other load."""
    out: str = "runs"
    """Parent directory of run directories: a run's directory is ``out/name``.
    ``fedcare run --out PARENT/NAME`` sets both keys (and refuses a non-empty folder)."""
    name: str = ""
    """Run directory name under ``out`` (default: <dataset>-<strategy>-<time>; a taken
    name gets a -2, -3... suffix)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)

    def __post_init__(self) -> None:
        self._given: dict[str, str] = {}
        """Keys set explicitly (by a file, ``--set`` or a flag) and where: `check_settings`."""

    # ------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> RunConfig:
        config = cls()
        config._note_given(raw, source, file=True)
        _merge(config, raw, prefix="", source=source)
        return config

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None
        _anchor_paths(raw, path.resolve().parent)
        return cls.from_dict(raw, source=str(path))

    def anchored(self, folder: Path) -> RunConfig:
        """A copy whose relative paths (`PATH_KEYS`, e.g. the default ``out``) are made
        absolute against `folder`: what a run directory's ``config.toml`` holds."""
        raw = tomllib.loads(self.to_toml())
        _anchor_paths(raw, folder)
        return type(self).from_dict(raw, source="the run's configuration")

    def set(self, assignment: str) -> None:
        """Apply one ``key=value`` override; the value is read as TOML, else as a string."""
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. federation.rounds=50); "
                              f"got {assignment!r}.")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        self.set_value(key.strip(), value, source="--set")

    def set_value(self, key: str, value: Any, source: str = "config") -> None:
        """Set the dotted `key` to an already typed `value` (validated like a file's).

        A relative path (`PATH_KEYS`) is made absolute against the working directory, so
        the run directory's ``config.toml`` names the same files from anywhere.
        """
        *sections, leaf = key.split(".")
        nested: dict[str, Any] = {leaf: value}
        for section in reversed(sections):
            nested = {section: nested}
        _anchor_paths(nested, Path.cwd())
        self._note_given(nested, source, file=False)
        _merge(self, nested, prefix="", source=source)

    def copy(self) -> RunConfig:
        """An independent copy that remembers which keys were given (`check_settings`)."""
        twin = type(self).from_dict(self.to_dict())
        twin._given = dict(self._given)
        return twin

    def _note_given(self, raw: Mapping[str, Any], source: str, *, file: bool) -> None:
        """Record the privacy-only keys `raw` sets (`check_settings`).

        In a file, a value equal to the default is not counted: it changes nothing, and a
        run directory's ``config.toml`` spells out every key, defaults included.
        """
        section = raw.get("privacy")
        if not isinstance(section, Mapping):
            return
        defaults = PrivacyConfig()
        for leaf, value in section.items():
            key = f"privacy.{leaf}"
            if key not in PRIVACY_ONLY_KEYS:
                continue
            if file and value == getattr(defaults, leaf, object()):
                continue
            self._given[key] = source

    def check_settings(self) -> None:
        """Refuse settings that would silently do nothing.

        Raises
        ------
        ConfigError
            A privacy setting (`PRIVACY_ONLY_KEYS`, e.g. ``privacy.epsilon``) given
            while ``privacy.level = "none"``: the run would not be private at all.
            ``privacy.noise = "distributed"`` with record-level privacy, where each
            site already noises its own gradients and the setting is not used.
        """
        if self.privacy.level == "none":
            given = [k for k in PRIVACY_ONLY_KEYS if k in self._given]
            if given:
                where = ", ".join(f"{k} ({self._given[k]})" for k in given)
                raise ConfigError(
                    f"{where} only applies to a private run, and privacy.level is \"none\": "
                    "this run would not be private at all. Add --privacy record (each "
                    "patient) or --privacy site (each hospital), i.e. privacy.level = "
                    "\"record\" or \"site\"; or remove the setting.")
        if self.privacy.level == "record" and self.privacy.noise == "distributed":
            raise ConfigError(
                "privacy.noise = \"distributed\" applies to site-level privacy only; with "
                "privacy.level = \"record\" each site already adds the noise to its own "
                "gradients (DP-SGD). Remove --noise, or use --privacy site.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML (loadable with `load`)."""
        lines: list[str] = []
        sections: list[tuple[str, dict[str, Any]]] = []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                sections.append((key, value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
        for name, values in sections:
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"


def _anchor_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of `PATH_KEYS` in a file's `raw` table relative to `folder`."""

    def anchor(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value  # a wrong type is reported by _merge, naming the key
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else folder / path)

    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        table = raw.get(section) if section else raw
        if isinstance(table, dict) and leaf in table:
            value = table[leaf]
            table[leaf] = [anchor(v) for v in value] if isinstance(value, list) else anchor(value)


def _merge(target: Any, raw: Mapping[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key {path!r}; expected one of "
                              f"{sorted(prefix + k for k in known)}.")
        expected = hints[key]
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {path!r} is a section; expected a table of keys, "
                                  f"found {value!r}.")
            _merge(current, value, prefix=f"{path}.", source=source)
            continue
        setattr(target, key, _coerce(value, expected, path, source))


def _coerce(value: Any, expected: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(expected)
    if origin is dict:
        _, item = typing.get_args(expected)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {path!r} must be a table of name = value; found "
                              f"{value!r}.")
        return {str(k): _coerce(v, item, f"{path}.{k}", source) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(expected, types.UnionType):
        if set(typing.get_args(expected)) != {bool, str}:
            raise TypeError("config fields are not unions, except switches (bool | str)")
        # A switch: on, off, or "auto" (the run decides, e.g. from the privacy level), so
        # that an explicit choice can be told from the default.
        if isinstance(value, bool) or value == AUTO:
            return value
        raise ConfigError(f'{source}: {path!r} must be true, false or "auto"; found {value!r} '
                          f"({type(value).__name__}).")
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {path!r} must be {expected.__name__}; found {value!r} "
                      f"({type(value).__name__}).")
