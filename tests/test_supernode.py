"""fedcare's SuperNode wrapper: warm ClientApp processes, a quicker poll, Flower's isolation kept.

The loopback deployments of tests/test_flower.py and tests/test_deploy_*.py all run
through it; these tests pin what it changes in Flower's behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedcare.runtime import supernode


def test_a_site_takes_only_clientapp_tasks() -> None:
    from flwr.supercore.constant import TaskType

    executor = supernode.WarmExecutor.__new__(supernode.WarmExecutor)  # no fork server needed
    offered = {TaskType.CLIENT_APP, TaskType.SERVER_APP, TaskType.AGENT_APP}
    assert executor.get_eligible_capacity(offered) == ({TaskType.CLIENT_APP}, set())


def remember(path: str) -> None:
    """In a forked ClientApp process: write this process's id and what it found of the last."""
    import fedcare.runtime.flower_client as client_module
    from fedcare.privacy.noise import noise_source

    seen = getattr(client_module, "_left_by_an_earlier_task", None)
    client_module._left_by_an_earlier_task = path  # type: ignore[attr-defined]
    noise = float(noise_source(secure=True).gaussian(1, 1.0)[0])
    Path(path).write_text(f"{os.getpid()} {seen} {os.getppid()} {noise!r}")


@pytest.mark.slow
def test_each_message_runs_in_a_fresh_copy_of_the_warm_process(tmp_path: Path) -> None:
    """Nothing one ClientApp leaves in memory reaches the next: each is a new fork."""
    executor = supernode.WarmExecutor()
    try:
        outputs = [tmp_path / f"task-{i}" for i in range(3)]
        for output in outputs:
            process = executor._context.Process(target=remember, args=(str(output),))
            process.start()
            process.join(timeout=120)
            assert process.exitcode == 0
        found = [output.read_text().split() for output in outputs]
        assert len({pid for pid, _, _, _ in found}) == 3
        assert all(seen == "None" for _, seen, _, _ in found)
        # All forked from one fork server (not from this process, not started anew).
        assert len({parent for _, _, parent, _ in found}) == 1
        assert found[0][2] != str(os.getpid())
        # Copies of one process, yet each draws its own secure noise.
        assert len({noise for _, _, _, noise in found}) == 3
    finally:
        executor.close()
