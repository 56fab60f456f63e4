"""Bundled datasets through `build_federation`: sizes, layouts and seeded determinism."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcare.config import DataConfig
from fedcare.data.datasets import HEART_SCHEMA, build_federation
from fedcare.data.site_data import FederatedData
from fedcare.errors import ConfigError

WriteCsv = Callable[[str, str], Path]


def total_rows(data: FederatedData) -> int:
    return sum(site.n_train + site.n_test for site in data.sites)


def assert_well_formed(data: FederatedData) -> None:
    for site in data.sites:
        assert site.x_train.shape == (site.n_train, data.n_features)
        assert site.x_test.shape == (site.n_test, data.n_features)
        assert torch.isfinite(site.x_train).all()
        assert torch.isfinite(site.x_test).all()
        assert set(np.unique(site.y_train.numpy()).tolist()) <= {0.0, 1.0}
        assert set(np.unique(site.y_test.numpy()).tolist()) <= {0.0, 1.0}


def assert_same_tensors(first: FederatedData, second: FederatedData) -> None:
    assert [s.name for s in first.sites] == [s.name for s in second.sites]
    for a, b in zip(first.sites, second.sites, strict=True):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_heart_disease_flamby_protocol_has_four_hospitals() -> None:
    data = build_federation(DataConfig(dataset="heart-disease", protocol="flamby"))

    assert [s.name for s in data.sites] == ["cleveland", "hungarian", "switzerland", "va"]
    assert total_rows(data) == 740
    assert data.n_features == 13
    assert data.feature_names == HEART_SCHEMA.encoded_feature_names()
    assert_well_formed(data)
    for site in data.sites:
        # FLamby holds out about a third of each hospital's rows for testing.
        assert site.n_test == pytest.approx(0.34 * (site.n_train + site.n_test), abs=2)


def test_heart_disease_is_the_default_dataset() -> None:
    data = build_federation(DataConfig())

    assert [s.name for s in data.sites] == ["cleveland", "hungarian", "switzerland", "va"]
    assert total_rows(data) == 740


def test_heart_disease_impute_protocol_keeps_every_row() -> None:
    data = build_federation(DataConfig(dataset="heart-disease", protocol="impute"))

    assert len(data.sites) == 4
    assert total_rows(data) == 920
    assert data.n_features == 13
    assert_well_formed(data)


def test_heart_disease_unknown_protocol_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.protocol must be one of") as excinfo:
        build_federation(DataConfig(dataset="heart-disease", protocol="mine"))

    assert "'mine'" in str(excinfo.value)


@pytest.fixture(scope="module")
def breast_cancer_iid() -> FederatedData:
    return build_federation(DataConfig(dataset="breast-cancer", partition="iid", sites=10))


def test_breast_cancer_iid_partition(breast_cancer_iid: FederatedData) -> None:
    data = breast_cancer_iid

    assert len(data.sites) == 10
    assert [s.name for s in data.sites][:2] == ["site-0", "site-1"]
    assert total_rows(data) == 569
    assert data.n_features == 30
    assert_well_formed(data)
    sizes = [s.n_train for s in data.sites]
    assert max(sizes) - min(sizes) <= 2  # at most one row apart per class


def test_breast_cancer_has_no_natural_sites() -> None:
    with pytest.raises(ConfigError, match="breast-cancer has no natural sites"):
        build_federation(DataConfig(dataset="breast-cancer", partition="natural"))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_synthetic_cohort_split_into_twenty_sites(partition: str) -> None:
    data = build_federation(DataConfig(dataset="synthetic", n_patients=2000, sites=20,
                                       partition=partition, alpha=1.0))

    assert len(data.sites) == 20
    assert [s.name for s in data.sites][:2] == ["site-00", "site-01"]
    assert total_rows(data) == 2000
    assert data.n_features == 30
    assert_well_formed(data)


def test_same_split_seed_gives_identical_tensors() -> None:
    config = DataConfig(dataset="heart-disease", split_seed=3)

    assert_same_tensors(build_federation(config), build_federation(config))


def test_other_split_seed_gives_other_split() -> None:
    first = build_federation(DataConfig(dataset="heart-disease", split_seed=3))
    second = build_federation(DataConfig(dataset="heart-disease", split_seed=4))

    assert total_rows(first) == total_rows(second)
    assert any(not torch.equal(a.x_train, b.x_train)
               for a, b in zip(first.sites, second.sites, strict=True))


def test_synthetic_same_seed_same_tensors_other_seed_other_tensors() -> None:
    def build(seed: int) -> FederatedData:
        return build_federation(DataConfig(dataset="synthetic", n_patients=500, sites=5,
                                           partition="iid", split_seed=seed))

    assert_same_tensors(build(1), build(1))
    assert not torch.equal(build(1).sites[0].x_train, build(2).sites[0].x_train)


def test_sites_setting_refused_with_natural_partition() -> None:
    with pytest.raises(ConfigError, match=r"data\.sites"):
        build_federation(DataConfig(dataset="heart-disease", sites=3))


@pytest.mark.parametrize(
    ("change", "match"),
    [({"dataset": "mnist"}, "data.dataset must be one of"),
     ({"partition": "random"}, "data.partition must be one of"),
     ({"standardize": "minmax"}, "data.standardize must be one of"),
     ({"test_fraction": 1.0}, r"data.test_fraction must be in \[0, 1\)")],
    ids=["dataset", "partition", "standardize", "test-fraction"],
)
def test_bad_data_config_refused(change: dict[str, object], match: str) -> None:
    config = DataConfig(**change)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=match):
        build_federation(config)


def test_user_files_end_to_end(write_csv: WriteCsv, tmp_path: Path) -> None:
    header = "age,cp,y\n"
    rng = np.random.default_rng(0)
    for name in ("north", "south"):
        rows = [f"{rng.normal(55, 8):.1f},{1 + i % 3},{i % 2}\n" for i in range(20)]
        write_csv(f"sites/{name}.csv", header + "".join(rows))
    schema = tmp_path / "schema.toml"
    schema.write_text('target = "y"\npositive = ["1"]\nnegative = ["0"]\n'
                      '[numeric]\ncolumns = ["age"]\n'
                      '[categorical]\ncp = ["1", "2", "3"]\n', encoding="utf-8")

    data = build_federation(DataConfig(data_dir=str(tmp_path / "sites"), schema=str(schema)))

    assert [s.name for s in data.sites] == ["north", "south"]
    assert total_rows(data) == 40
    assert data.feature_names == ["age", "cp=1", "cp=2", "cp=3"]
    assert_well_formed(data)
