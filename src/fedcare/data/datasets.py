"""Bundled datasets (no download) and the path from a `DataConfig` to a `FederatedData`.

The registry maps the ``data.dataset`` config value to a loader. Each loader
returns the shared schema, validated site tables and whether those sites are
natural (real hospitals) or one cohort to be partitioned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TypeVar

import numpy as np

from fedcare.config import DataConfig
from fedcare.data.loaders import (
    MissingPolicy,
    RowAccount,
    SiteTable,
    drop_missing,
    find_site_files,
    load_sites,
    parse_table,
)
from fedcare.data.partition import Partition, assign_rows, check_nonempty, site_proportions
from fedcare.data.preprocess import (
    Standardize,
    SumVectors,
    impute_sites,
    keyed_split,
    resolve_standardize,
    site_rng,
    split_key,
    split_rows,
    standardize_sites,
)
from fedcare.data.schema import Schema
from fedcare.data.site_data import FederatedData
from fedcare.data.tables import read_table
from fedcare.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    """What a dataset loader returns."""

    schema: Schema
    tables: list[SiteTable]
    natural_sites: bool
    description: str
    default_test_fraction: float
    default_sites: int = 1
    accounts: list[RowAccount] = field(default_factory=list)
    """Per source table (a natural site, or the one cohort of a partitioned data set):
    rows read, dropped and why, used."""


# ---------------------------------------------------------------- heart disease
HEART_COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
                 "oldpeak", "slope", "ca", "thal", "num"]
HEART_HOSPITALS = {
    "cleveland": "Cleveland Clinic Foundation",
    "hungarian": "Hungarian Institute of Cardiology, Budapest",
    "switzerland": "University Hospitals Zurich and Basel",
    "va": "V.A. Medical Center, Long Beach",
}
# FLamby's Fed-Heart-Disease: columns slope, ca, thal dropped (mostly missing
# outside Cleveland), cp and restecg one-hot with the first level dropped,
# num > 0 is disease, 66/34 stratified split per hospital.
HEART_SCHEMA = Schema(
    numeric=("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"),
    categorical={"cp": ("1", "2", "3", "4"), "restecg": ("0", "1", "2")},
    target="num",
    positive=("1", "2", "3", "4"),
    negative=("0",),
    drop_first=True,
    # Clinical plausibility ranges, written without looking at the data, for
    # private runs (data.standardize = "bounds"). chol starts at 0 because the
    # Swiss file codes an unmeasured cholesterol as 0 (UCI documentation).
    bounds={"age": (18, 100), "sex": (0, 1), "trestbps": (80, 200), "chol": (0, 600),
            "fbs": (0, 1), "thalach": (60, 220), "exang": (0, 1), "oldpeak": (-3, 7)},
    # The codebook (UCI heart-disease.names, attribute documentation; bundled README).
    labels={"sex": {"0": "female", "1": "male"},
            "cp": {"1": "typical angina", "2": "atypical angina", "3": "non-anginal pain",
                   "4": "asymptomatic"},
            "fbs": {"0": "fasting blood sugar <= 120 mg/dl",
                    "1": "fasting blood sugar > 120 mg/dl"},
            "restecg": {"0": "normal", "1": "ST-T wave abnormality",
                        "2": "left ventricular hypertrophy"},
            "exang": {"0": "no exercise-induced angina", "1": "exercise-induced angina"},
            "num": {"0": "no disease: < 50% diameter narrowing",
                    **{v: "disease: > 50% diameter narrowing" for v in "1234"}}},
)
HEART_PROTOCOLS = {
    "flamby": MissingPolicy.DROP,  # FLamby drops rows with a missing value: 740 of 920 rows
    "impute": MissingPolicy.IMPUTE,  # keep all 920 rows, impute from each hospital's own data
}


def bundled_path(*parts: str) -> Path:
    return Path(str(resources.files("fedcare.data").joinpath("bundled", *parts)))


def heart_disease(config: DataConfig) -> Source:
    if config.protocol not in HEART_PROTOCOLS:
        raise ConfigError(f"data.protocol must be one of {sorted(HEART_PROTOCOLS)} for "
                          f"heart-disease; got {config.protocol!r}.")
    tables = []
    for name in HEART_HOSPITALS:
        table = read_table(bundled_path("heart_disease", f"processed.{name}.data"),
                           header=HEART_COLUMNS)
        tables.append(parse_table(table, HEART_SCHEMA, name))
    kept, accounts = _drop_missing(tables, HEART_SCHEMA, HEART_PROTOCOLS[config.protocol])
    return Source(
        schema=HEART_SCHEMA,
        tables=kept,
        natural_sites=True,
        description=f"UCI Heart Disease, 4 hospitals, protocol {config.protocol}",
        default_test_fraction=0.34,
        accounts=accounts,
    )


def _drop_missing(tables: Sequence[SiteTable], schema: Schema,
                  policy: MissingPolicy) -> tuple[list[SiteTable], list[RowAccount]]:
    """`drop_missing` on every table: the kept tables and their row accounts."""
    pairs = [drop_missing(t, schema, policy) for t in tables]
    return [t for t, _ in pairs], [a for _, a in pairs]


# ---------------------------------------------------------------- breast cancer
# Each feature's (min, max) from the dataset's published summary statistics
# (scikit-learn's DESCR, from the UCI documentation): public, but read off the
# data, which suits a benchmark; a deployment writes clinical ranges instead.
BREAST_CANCER_RANGES = [
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
]


def breast_cancer(config: DataConfig) -> Source:
    from sklearn.datasets import load_breast_cancer  # ships the CSV: no download

    bunch = load_breast_cancer()
    names = tuple(str(n) for n in bunch.feature_names)
    # scikit-learn codes 0 = malignant; the clinically positive class is malignant.
    target = (bunch.target == 0).astype(np.float64)
    schema = Schema(numeric=names, categorical={}, target="malignant", positive=("1",),
                    negative=("0",),
                    bounds=dict(zip(names, BREAST_CANCER_RANGES, strict=True)))
    table = _array_table("breast-cancer", "scikit-learn load_breast_cancer",
                         bunch.data.astype(np.float64), target)
    return Source(schema, [table], natural_sites=False,
                  description="Wisconsin Diagnostic Breast Cancer (scikit-learn copy)",
                  default_test_fraction=0.2, default_sites=10,
                  accounts=[RowAccount(table.name, len(table))])


# ---------------------------------------------------------------- synthetic cohort
SYNTHETIC_FEATURES = 30


def synthetic_cohort(n_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A generated cohort: correlated vitals and labs, a non-linear risk, ~30% prevalence.

    Data generation is simulation, not privacy: it is seeded (``data.split_seed``).
    """
    if n_patients < 2:
        raise ConfigError(f"data.n_patients must be >= 2; got {n_patients}.")
    rng = np.random.default_rng(seed)
    d = SYNTHETIC_FEATURES
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n_patients, d)) @ (np.eye(d) + 0.5 * mixing)
    weights = rng.normal(size=d) * (rng.random(d) < 0.5)
    logit = x @ weights + 0.8 * x[:, 0] * x[:, 1] - 0.5 * x[:, 2] ** 2 - 0.8
    y = (rng.random(n_patients) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return x, y


def synthetic(config: DataConfig) -> Source:
    x, y = synthetic_cohort(config.n_patients, config.split_seed)
    names = tuple(f"x{i:02d}" for i in range(x.shape[1]))
    # The generator's features have standard deviation about 1.1 (see above):
    # +-4 holds all but a few in 10^4 values, known from the code, not the data.
    schema = Schema(numeric=names, categorical={}, target="outcome", positive=("1",),
                    negative=("0",),
                    bounds=dict.fromkeys(names, (-4.0, 4.0)))
    table = _array_table("synthetic", f"generated cohort (seed {config.split_seed})", x, y)
    return Source(schema, [table], natural_sites=False,
                  description=f"generated cohort of {config.n_patients} patients",
                  default_test_fraction=0.2, default_sites=100,
                  accounts=[RowAccount(table.name, len(table))])


def _array_table(name: str, source: str, x: np.ndarray, y: np.ndarray) -> SiteTable:
    return SiteTable(name, source, np.arange(len(y)), None, x,
                     np.zeros((len(y), 0), dtype=np.int64), y)


# ---------------------------------------------------------------- user files
def user_files(config: DataConfig) -> Source:
    if not config.schema:
        raise ConfigError("data.schema is required for dataset = \"files\"; write one with "
                          "`fedcare schema infer DATA... --target COLUMN --out schema.toml`.")
    schema = Schema.load(config.schema)
    if config.files and config.data_dir:
        raise ConfigError("Give data.files or data.data_dir, not both.")
    if config.files:
        paths: list[Path] = [Path(f) for f in config.files]
    elif config.data_dir:
        paths = find_site_files(config.data_dir)
    else:
        raise ConfigError("dataset = \"files\" needs data.data_dir (one file per site) or "
                          "data.files.")
    policy = _enum(MissingPolicy, config.missing, "data.missing")
    tables, accounts = _drop_missing(load_sites(paths, schema), schema, policy)
    return Source(schema, tables, natural_sites=True,
                  description=f"{len(tables)} sites from {config.data_dir or 'files'}",
                  default_test_fraction=0.2, accounts=accounts)


DATASETS: dict[str, Callable[[DataConfig], Source]] = {
    "heart-disease": heart_disease,
    "breast-cancer": breast_cancer,
    "synthetic": synthetic,
    "files": user_files,
}


E = TypeVar("E", MissingPolicy, Partition, Standardize)


def _enum(kind: type[E], value: str, key: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key} must be one of {[m.value for m in kind]}; got {value!r}.") \
            from None


def standardize_method(config: DataConfig, *, private: bool) -> Standardize:
    """The standardisation a run uses (``data.standardize``, ``auto`` resolved)."""
    return resolve_standardize(_enum(Standardize, config.standardize, "data.standardize"),
                               private=private)


SPLITS = ("auto", "stratified", "keyed")
"""``data.split``: see `fedcare.config.DataConfig.split` and `keyed_split`."""


@dataclass(frozen=True)
class SplitSites:
    """Every site's imputed (train, test) tables, before encoding and standardisation.

    Attributes
    ----------
    schema : Schema
    splits : list of (SiteTable, SiteTable)
        Each site's rows, split and imputed from its own training rows only.
    description : str
    standardize : Standardize
        The method the run uses (``auto`` resolved).
    """

    schema: Schema
    splits: list[tuple[SiteTable, SiteTable]]
    description: str
    standardize: Standardize
    accounts: list[RowAccount] = field(default_factory=list)
    """Per source table: rows read, dropped and why, used (`Source.accounts`)."""

    @property
    def names(self) -> list[str]:
        return [train.name for train, _ in self.splits]


def build_federation(config: DataConfig, sum_vectors: SumVectors | None = None, *,
                     private: bool = False) -> FederatedData:
    """Load, validate, split, partition and encode the data the config names.

    `private` (a differentially private run) makes preprocessing independent
    of the data (see `fedcare.data.preprocess`) and splits each record into
    train or test by itself (`keyed_split`), not by a stratified shuffle.
    `sum_vectors` totals the sites' contributions to federated standardisation
    (default: plain summation; a run passes its protection scheme's,
    `fedcare.runtime.local.protected_sum`).
    """
    split = split_sites(config, private=private)
    check_both_classes(split.splits, split.schema)
    sites, standardization = standardize_sites(split.splits, split.schema, split.standardize,
                                               sum_vectors)
    return FederatedData(split.schema, split.schema.encoded_feature_names(), sites,
                         split.description, standardization, split.accounts)


class OneClassSiteWarning(UserWarning):
    """A site's rows hold one class of the outcome only (`warn_one_class_sites`)."""


def warn_one_class_sites(tables: Sequence[SiteTable], schema: Schema) -> None:
    """Warn, naming them, about sites whose rows all have the same outcome.

    Such a site can still help the federation, but it pulls the model towards
    its one class, cannot be evaluated alone (no ROC AUC) and, more often than
    not, means its file or the schema's positive/negative lists are wrong.
    """
    for table in tables:
        classes = np.unique(table.target)
        if len(classes) == 1:
            which = "positive" if classes[0] == 1 else "negative"
            values = schema.positive if classes[0] == 1 else schema.negative
            warnings.warn(
                f"site {table.name!r} ({table.source}) holds one class only: every one of its "
                f"{len(table)} rows has a {which} {schema.target!r} ({which} = {list(values)}). "
                "Check its file and the schema's positive/negative lists; its own test "
                "metrics such as ROC AUC are undefined.", OneClassSiteWarning, stacklevel=2)


def check_both_classes(splits: Sequence[tuple[SiteTable, SiteTable]], schema: Schema) -> None:
    """Refuse a federation whose rows, or whose training rows, hold one class only.

    A model trained on one class predicts it for everyone and scores the
    prevalence as its accuracy (1.000 when the test rows share the class): a
    wrong schema, not a result.
    """
    lists = f"positive = {list(schema.positive)}, negative = {list(schema.negative)}"
    for what, tables in (("rows", [t for pair in splits for t in pair]),
                         ("training rows", [train for train, _ in splits])):
        labels = np.concatenate([t.target for t in tables]) if tables else np.zeros(0)
        classes = np.unique(labels)
        if len(classes) >= 2:
            continue
        found = "no row" if len(classes) == 0 else (
            f"every one of the {len(labels)} {what} across {len(splits)} site(s) has a "
            f"{'positive' if classes[0] == 1 else 'negative'} {schema.target!r}")
        raise DataError(
            f"The training data hold one class of the outcome only: {found} ({lists}). A model "
            "needs both classes to learn; check that the target column and the schema's "
            "positive and negative lists match the data's values.")


def split_sites(config: DataConfig, *, private: bool = False) -> SplitSites:
    """Load, validate, split and partition the data, and impute each site from its own rows.

    Natural sites (hospitals, user files) are split each by itself: the keyed
    split (`keyed_split`, private runs) or a stratified split drawn from the
    site's own generator (`site_rng`: ``data.split_seed`` and the site's name).
    So a site gets the same rows whether it is loaded alone (a deployed node
    reading its own file) or with every other site (``fedcare run
    --data-dir``). A partitioned cohort (``iid``, ``dirichlet``, ``quantity``:
    one data set spread over simulated sites) is split once, then partitioned.
    """
    dataset = config.dataset_name
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {sorted(DATASETS)}; got {dataset!r}.")
    if (config.data_dir or config.files) and dataset != "files":
        raise ConfigError(f"data.data_dir/data.files are for dataset = \"files\"; the config "
                          f"names the bundled dataset {dataset!r}.")
    source = DATASETS[dataset](config)
    partition = _enum(Partition, config.partition, "data.partition")
    standardize = standardize_method(config, private=private)
    test_fraction = (source.default_test_fraction if config.test_fraction < 0
                     else config.test_fraction)
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in [0, 1); got {test_fraction}.")
    if config.split not in SPLITS:
        raise ConfigError(f"data.split must be one of {list(SPLITS)}; got {config.split!r}.")
    if private and config.split == "stratified":
        raise ConfigError("data.split = \"stratified\" is refused in a private run: it moves "
                          "other patients between train and test when one label changes, so "
                          "exact test metrics would reveal training labels. Use \"keyed\" "
                          "(the default, \"auto\").")
    keyed = config.split == "keyed" or (config.split == "auto" and private)

    def split(table: SiteTable, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if keyed:
            return keyed_split(table.rows, test_fraction,
                               key=split_key(config.split_seed, table.name))
        return split_rows(table.target, test_fraction, rng)

    if partition is Partition.NATURAL:
        if not source.natural_sites:
            raise ConfigError(f"{dataset} has no natural sites; choose data.partition = "
                              "\"iid\", \"dirichlet\" or \"quantity\" (and data.sites).")
        if config.sites:
            raise ConfigError("data.sites sets the number of simulated sites; with the natural "
                              "partition the data decide it. Remove data.sites or choose another "
                              "partition.")
        # Partitioned cohorts are not warned about: one-class simulated sites are what a
        # label-skew partition asks for.
        warn_one_class_sites(source.tables, source.schema)
        splits = []
        for table in source.tables:
            train, test = split(table, site_rng(config.split_seed, table.name))
            if len(train) == 0:
                raise DataError(f"{table.source}: site {table.name!r} has no training rows left "
                                f"after holding out {test_fraction:.0%} for testing.")
            splits.append((table.subset(train), table.subset(test)))
    else:
        rng = np.random.default_rng(config.split_seed)
        n_sites = config.sites or source.default_sites
        pooled = _concat(source.tables, dataset)
        train, test = split(pooled, rng)
        proportions = site_proportions(partition, n_sites, 2, config.alpha, rng)
        width = len(str(n_sites - 1))
        names = [f"site-{i:0{width}d}" for i in range(n_sites)]
        train_parts = assign_rows(pooled.target[train].astype(np.int64), proportions, rng)
        test_parts = assign_rows(pooled.target[test].astype(np.int64), proportions, rng)
        check_nonempty(train_parts, names, partition, config.alpha)
        splits = []
        for name, tr, te in zip(names, train_parts, test_parts, strict=True):
            splits.append((replace(pooled.subset(train[tr]), name=name),
                           replace(pooled.subset(test[te]), name=name)))

    description = source.description
    if partition is not Partition.NATURAL:
        description += f", {len(splits)} sites ({partition.value} partition)"
    return SplitSites(source.schema, impute_sites(splits, source.schema, private=private),
                      description, standardize, source.accounts)


def _concat(tables: list[SiteTable], dataset: str) -> SiteTable:
    if len(tables) == 1:
        return tables[0]
    return SiteTable(dataset, "+".join(t.source for t in tables),
                     np.arange(sum(len(t) for t in tables)), None,
                     np.concatenate([t.numeric for t in tables]),
                     np.concatenate([t.categorical for t in tables]),
                     np.concatenate([t.target for t in tables]))
