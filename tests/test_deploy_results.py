"""Results a consortium can read from a deployed run (issue 15, points 4 and 7).

Fast tests run the deployment's ServerApp and ClientApps in Flower's simulation
engine (`fedcare.runtime.flower.run_simulation`); the dead-site test starts real
processes on loopback.
"""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from loopback import SITES as SITES_3
from loopback import Loopback, rounds_done, small_config, three_site_config, wait_until

import fedcare
from fedcare.cli.main import main
from fedcare.data.datasets import build_federation
from fedcare.errors import ConfigError
from fedcare.experiment import run_experiment
from fedcare.federation.site import FitInstructions
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE
from fedcare.report.rundir import result_line
from fedcare.runtime import flower_site

pytest.importorskip("flwr")

SRC = Path(fedcare.__file__).parent


# ----------------------------------------------------------------------------- 7. structure
def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_runtime_or_report_module_imports_the_experiment() -> None:
    modules = sorted([*(SRC / "runtime").glob("*.py"), *(SRC / "report").glob("*.py")])
    assert len(modules) >= 10  # the search sees the packages
    upward = {str(path.relative_to(SRC)) for path in modules
              if any(name == "fedcare.experiment" or name.startswith("fedcare.experiment.")
                     for name in imported_modules(path))}
    assert upward == set()
    # The detector finds such an import where there is one (the CLI runs experiments).
    assert "fedcare.experiment" in imported_modules(SRC / "cli" / "main.py")


# ----------------------------------------------------------------------------- 4. results
SITES = ["cleveland", "hungarian", "switzerland", "va"]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def summary_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")))


def site_mean(metrics: dict[str, dict[str, float]]) -> float:
    aucs = [m["roc_auc"] for m in metrics.values() if m["roc_auc"] is not None]
    return sum(aucs) / len(aucs)


def test_sums_over_sites_give_the_pooled_metrics_and_the_mean_of_the_sites_aucs() -> None:
    from fedcare.evaluation import binary_metrics, metric_sums, metrics_from_sums

    generator = torch.Generator().manual_seed(0)
    sites = [(torch.randn(n, generator=generator) * 3,
              (torch.rand(n, generator=generator) < 0.4).float()) for n in (40, 25, 60)]
    sites.append((torch.randn(9, generator=generator), torch.ones(9)))  # one class: no AUC
    sites.append((torch.zeros(0), torch.zeros(0)))  # no test rows
    total = torch.stack([metric_sums(z, y) for z, y in sites]).sum(dim=0)
    got = metrics_from_sums(total)
    pooled = binary_metrics(torch.cat([z for z, _ in sites]), torch.cat([y for _, y in sites]))
    for key in ("accuracy", "balanced_accuracy", "brier", "log_loss"):
        assert got[key] == pytest.approx(pooled[key], rel=1e-12), key
    assert (got["n"], got["sites"], got["roc_auc_sites"]) == (134, 5, 3)
    aucs = [binary_metrics(z, y)["roc_auc"] for z, y in sites[:3]]
    assert got["roc_auc"] == pytest.approx(sum(aucs) / 3, rel=1e-12)
    assert got["roc_auc"] != pytest.approx(pooled["roc_auc"], abs=1e-3)
    # ckks's flooding noise (std 2**-20) on the sum leaves the counts exact.
    noisy = metrics_from_sums(total + torch.randn(total.shape, generator=generator,
                                                  dtype=torch.float64) * 2.0**-20)
    assert (noisy["n"], noisy["accuracy"]) == (got["n"], got["accuracy"])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A plain deployed run (Flower simulation) and `fedcare run` of the same config."""
    from fedcare.runtime.flower import run_simulation

    root = tmp_path_factory.mktemp("deployed")
    config = small_config("plain", rounds=2)
    run_simulation(config, n_sites=4, run_dir=root / "deployed")
    run_experiment(config, out=root / "local")
    return root / "deployed", root / "local"


@pytest.mark.slow
def test_a_deployed_run_reports_each_rounds_metrics_as_fedcare_run_does(
        deployed: tuple[Path, Path]) -> None:
    run_dir, local_dir = deployed
    ours, theirs = rows(run_dir), rows(local_dir)
    assert [r["round"] for r in ours] == [1, 2]
    for mine, local in zip(ours, theirs, strict=True):
        pooled, expected = mine["pooled"], local["pooled"]
        # Counts summed over the sites give the pooled test set's metrics exactly ...
        for key in ("accuracy", "balanced_accuracy", "n"):
            assert pooled[key] == expected[key]
        for key in ("brier", "log_loss"):
            assert pooled[key] == pytest.approx(expected[key], rel=1e-9)
        # ... and the AUC is the mean of the sites' own: switzerland's 15 test patients
        # hold one class only, so 3 sites count.
        assert pooled["roc_auc"] == pytest.approx(site_mean(local["sites"]), rel=1e-9)
        assert pooled["roc_auc"] != pytest.approx(expected["roc_auc"], abs=1e-3)
        assert (pooled["roc_auc_sites"], pooled["sites"]) == (3, 4)
    summary = summary_of(run_dir)
    assert summary["federated"]["pooled"] == ours[-1]["pooled"]
    assert "not the AUC of the pooled test set" in summary["federated"]["note"]
    # model.pt carries what `fedcare run`'s does, to use the model on new patients.
    meta = torch.load(run_dir / "model.pt", weights_only=True)
    reference = torch.load(local_dir / "model.pt", weights_only=True)
    for key in ("spec", "model", "schema", "feature_names", "standardization"):
        assert meta[key] == reference[key], key
    assert torch.allclose(meta["params"], reference["params"], atol=1e-6, rtol=0)
    # The data each site used, in words that name no path.
    assert set(summary["data"]["sites"]) == set(SITES)
    assert all("UCI Heart Disease" in text for text in summary["data"]["sites"].values())
    assert len(summary["data"]["schema_sha256"]) == 64
    assert summary["short_rounds"] == []


@pytest.mark.slow
def test_fedcare_report_runs_and_serve_show_a_deployed_run(
        deployed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "deployed"
    shutil.copytree(deployed[0], run_dir)
    (run_dir / REPORT_FILE).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert main(["verify", str(run_dir)]) == 0  # the audit log, in report/events.py's words
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    accuracy = summary_of(run_dir)["federated"]["pooled"]["accuracy"]
    assert f"accuracy <b>{accuracy:.3f}</b>" in page
    assert "mean of 3 sites&#x27; AUCs, not the pooled AUC" in page
    assert "Training, round by round" in page and "acc@" not in page  # no per-site metrics
    card = (run_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert "| all sites (pooled) | 250 |" in card
    assert "not the AUC of the pooled test set" in card
    assert "| cleveland | its part of UCI Heart Disease" in card
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert f"{accuracy:.3f}" in listing and "(site mean)" in listing
    assert "not the AUC of the pooled test set" in listing
    line = result_line(run_dir)
    assert line.startswith("run completed, 2 of 2 rounds; accuracy ")
    assert "(mean of 3 sites' AUCs) on 250 test patients" in line
    assert str(run_dir.resolve()) in line and "report.html" in line


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_the_aggregator_learns_only_the_sum_of_the_sites_test_metrics(
        scheme: str, deployed: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcare.evaluation import metric_sums
    from fedcare.protection.ckks import CkksPayload, generate_keys
    from fedcare.protection.secagg import MaskedInput
    from fedcare.runtime import flower_server
    from fedcare.runtime.flower import run_simulation

    received: list[tuple[str, object]] = []
    sums: list[torch.Tensor] = []
    evaluate, site_sums = flower_server.RemoteSite.evaluate, flower_site.SiteNode.evaluate

    def aggregator_reads(self: flower_server.RemoteSite, params: torch.Tensor,
                         session: int) -> object:
        payload = evaluate(self, params, session)
        received.append((self.name, payload))
        return payload

    def site_computes(self: flower_site.SiteNode, params: torch.Tensor,
                      round_number: int) -> torch.Tensor:
        sums.append(site_sums(self, params, round_number))
        return sums[-1]

    monkeypatch.setattr(flower_server.RemoteSite, "evaluate", aggregator_reads)
    monkeypatch.setattr(flower_site.SiteNode, "evaluate", site_computes)
    config = small_config(scheme, rounds=2)
    if scheme == "ckks":
        generate_keys(tmp_path / "keys")
        config.protection.keys = str(tmp_path / "keys")
    run_simulation(config, n_sites=4, run_dir=tmp_path / "run")
    # Every site's metrics reached the aggregator masked or encrypted, never as they are.
    kind = MaskedInput if scheme == "secagg" else CkksPayload
    assert len(received) == 8 and all(isinstance(p, kind) for _, p in received)
    assert all(s.shape == metric_sums(torch.zeros(1), torch.zeros(1)).shape for s in sums)
    if scheme == "secagg":
        for (_, payload), plain in zip(received, sums, strict=True):
            assert isinstance(payload, MaskedInput)
            encoded = (plain * 2.0**32).round().to(torch.int64).numpy().astype("<u8").tobytes()
            assert payload.masked != encoded
    # ... and their sum gives what the plain deployment reports (ckks: counts rounded
    # after the flooding noise, the rest to about 1e-6).
    for mine, plain_row in zip(rows(tmp_path / "run"), rows(deployed[0]), strict=True):
        for key in ("accuracy", "balanced_accuracy", "n", "roc_auc_sites", "sites"):
            assert mine["pooled"][key] == plain_row["pooled"][key]
        for key in ("brier", "log_loss", "roc_auc"):
            assert mine["pooled"][key] == pytest.approx(plain_row["pooled"][key], abs=1e-5)


def failing_in_round(monkeypatch: pytest.MonkeyPatch, site: str, round_number: int) -> None:
    """`site` refuses its fit of `round_number` (a fault at the site, as a dead node's)."""
    charge = flower_site.SiteNode.charge

    def refusing(self: flower_site.SiteNode, instructions: FitInstructions) -> None:
        if self.name == site and instructions.round == round_number:
            raise ConfigError("the site's disk is full")
        charge(self, instructions)

    monkeypatch.setattr(flower_site.SiteNode, "charge", refusing)


@pytest.mark.slow
def test_rounds_short_of_sites_are_named_in_every_artefact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fedcare.runtime.flower import run_simulation

    failing_in_round(monkeypatch, "va", 2)
    run_dir = tmp_path / "run"
    result = run_simulation(small_config("plain", rounds=2), n_sites=4, run_dir=run_dir)
    assert result.rounds_completed == 2  # min_sites = 1: the run went on quietly with 3 of 4
    summary = summary_of(run_dir)
    assert summary["short_rounds"] == [{"round": 2, "sites": 3, "of": 4, "missing": ["va"]}]
    assert rows(run_dir)[1]["pooled"]["sites"] == 4  # va still evaluated the model
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert "1 of 2 rounds ran short of sites: round 2: 3 of 4 sites (missing va)" in page
    assert "round 2: 3 of 4" in result_line(run_dir)
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    assert "2 (1 short)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_site_level_private_deployment_names_no_cohort_and_no_test_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from fedcare.runtime.flower import run_simulation

    config = small_config("secagg", rounds=2)
    config.federation.fraction = 0.75
    config.privacy.level, config.privacy.noise = "site", "distributed"
    config.privacy.epsilon, config.privacy.secure = 4.0, False  # seeded: the same cohorts
    failing_in_round(monkeypatch, "va", 2)
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded noise warns
        result = run_simulation(config, n_sites=4, run_dir=run_dir)
    assert result.rounds_completed == 2
    # There is something to hide: a round whose cohort left a site out.
    assert any(len(report.participants) < len(SITES) for report in result.reports)
    sizes = build_federation(config.data, private=True).sites
    texts = {name: (run_dir / name).read_text(encoding="utf-8") for name in
             ("summary.json", "metrics.jsonl", REPORT_FILE, MODEL_CARD_FILE)}
    for name, text in texts.items():
        assert '"participants"' not in text and '"failures"' not in text, name
        assert '"n_test"' not in text and "short of sites" not in text, name
        for site in sizes:
            assert f"| {site.name} | {site.n_test} |" not in text, name
        for report in result.reports:  # no round's cohort
            assert json.dumps(report.selected) not in text, name
    # Per round, no pooled test count: its changes would give an absent site's test size.
    assert all("accuracy" in row["pooled"] and "n" not in row["pooled"]
               and "sites" not in row["pooled"] for row in rows(run_dir))
    summary = summary_of(run_dir)
    assert summary["short_rounds"] is None
    for text in (summary["federated"]["note"], texts[REPORT_FILE], texts[MODEL_CARD_FILE]):
        assert "not covered by the site-level differential privacy guarantee" in text


# ----------------------------------------------------------------------------- dead sites
@pytest.mark.slow
def test_a_dead_site_is_seen_within_seconds_and_rejoins_when_back(
        tmp_path: Path, loopback_factory: Callable[..., Loopback]) -> None:
    from fedcare.runtime.flower_server import ServerSettings

    config = three_site_config("plain", rounds=6)
    net = loopback_factory(tls=False)
    net.start_superlink()
    for site in SITES_3:
        net.start_site(site)
    run_dir = tmp_path / "run"
    timeout = 300.0  # `fedcare serve`'s default --message-timeout
    run = net.run(config, ServerSettings(run_dir=str(run_dir), roster=tuple(SITES_3),
                                         wait_timeout=240, message_timeout=timeout,
                                         round_retries=0), 900)
    wait_until(lambda: len(rounds_done(run_dir)) >= 1, 600, "round 1", net)
    net.stop("site-2")  # SIGKILL of its SuperNode: no goodbye, only silence
    wait_until(lambda: len(rounds_done(run_dir)) >= 3, 600, "round 3", net)
    net.start_site("site-2")  # back, as a new node
    wait_until(lambda: run.poll() is not None, 900, "the run to finish", net)
    rounds = rounds_done(run_dir)
    assert summary_of(run_dir)["status"] == "completed"
    gone = [r for r in rounds if "site-2" in r["failures"]]
    # The round it died in learnt it from the SuperLink's node state (two missed
    # heartbeats, 2 x HEARTBEAT_SECONDS), not by waiting out the message timeout; later
    # rounds did not ask it. (Round times are not compared: on a loaded machine a round
    # takes a minute and more; on a quiet one about 15 s.)
    assert "is gone" in gone[0]["failures"]["site-2"]
    assert gone[0]["seconds"] < timeout
    assert len(gone) >= 2 and all("not connected" in r["failures"]["site-2"]
                                  for r in gone[1:])
    # Back, it takes part again.
    assert rounds[-1]["participants"] == SITES_3
    short = summary_of(run_dir)["short_rounds"]
    assert [r["round"] for r in short] == [r["round"] for r in gone]
    assert all(r["pooled"]["sites"] == (2 if r in gone else 3) for r in rounds[1:])


def test_a_node_offline_when_first_asked_is_asked_again_not_refused() -> None:
    """A node still reconnecting when a restarted aggregator says hello joins at the next look.

    (Seen in a loopback restart: the node was offline for an instant, Flower answered
    ``NODE_UNAVAILABLE``, and the aggregator waited for that site until its deadline.)
    """
    import math

    from flwr.proto.node_pb2 import NodeInfo

    from fedcare.config import RunConfig
    from fedcare.errors import SiteUnreachable
    from fedcare.runtime.flower_server import FanOut, Roster, ServerSettings
    from fedcare.runtime.flower_site import SiteHello

    class Grid:
        def get_nodes(self) -> list[Any]:
            return [NodeInfo(node_id=7, last_activated_at="t0")]

    answers: list[object] = [SiteUnreachable("node 7 is gone"),
                             SiteHello("va", 13, None, math.inf)]

    class Messenger:
        def ask_many(self, requests: list[Any]) -> dict[str, object]:
            return {str(r[0]): answers.pop(0) for r in requests}

    logged: list[str] = []
    fan_out = FanOut(Messenger(), lambda round_number: [])  # type: ignore[arg-type]
    roster = Roster(RunConfig(), ServerSettings(roster=("va",)),
                    Messenger(), fan_out, logged.append)  # type: ignore[arg-type]
    roster.refresh(Grid())  # type: ignore[arg-type]
    assert roster.connected() == [] and "did not introduce itself yet" in roster.refusals[7]
    roster.refresh(Grid())  # type: ignore[arg-type]  # same node, same activation time
    assert roster.connected() == ["va"] and roster.refusals == {}
    assert len(logged) == 1
