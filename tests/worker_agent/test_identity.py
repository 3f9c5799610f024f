"""The persisted identity: generated once, private, survives restarts, WORKER_ID wins."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from worker_agent.identity import Identity, IdentityStore


def test_generated_once_and_persisted_privately(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = IdentityStore(state).load()
    assert first.worker_id.startswith("w-")
    path = state / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    first.worker_token = "token-" + "x" * 40
    IdentityStore(state).save(first)
    again = IdentityStore(state).load()
    assert again.worker_id == first.worker_id
    assert again.worker_token == first.worker_token
    assert "token-" not in repr(again)


def test_same_object_for_every_part_of_the_agent(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    assert store.load() is store.load()


def test_configured_worker_id_wins_and_drops_the_old_token(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    identity = store.load()
    identity.worker_token = "t" * 40
    identity.coordinator_id = "coord-1"
    store.save(identity)
    renamed = IdentityStore(tmp_path, "gpu-box-1").load()
    assert renamed.worker_id == "gpu-box-1"
    assert renamed.worker_token is None
    assert renamed.coordinator_id == "coord-1"
    assert IdentityStore(tmp_path).load().worker_id == "gpu-box-1"


def test_corrupt_or_hostile_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    path.write_text("{not json")
    with capture_logs() as logs:
        identity = IdentityStore(tmp_path).load()
    assert identity.worker_id.startswith("w-")
    assert (tmp_path / "identity.json.corrupt").exists()
    assert any(e["event"] == "identity_corrupt" for e in logs)

    path.write_text(json.dumps({"worker_id": "../../etc", "worker_token": "x"}))
    assert IdentityStore(tmp_path).load().worker_id.startswith("w-")

    path.write_text(json.dumps({"worker_id": "ok-id", "worker_token": "short", "extra": 1}))
    loaded = IdentityStore(tmp_path).load()
    assert loaded == Identity(worker_id="ok-id")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_state_dir_keeps_the_identity_in_memory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    store = IdentityStore(locked / "state")
    with capture_logs() as logs:
        identity = store.load()
    assert identity.worker_id
    assert not store.persistent
    assert any(e["event"] == "identity_not_persisted" for e in logs)


def test_state_dir_that_is_a_file_keeps_the_identity_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = IdentityStore(blocker / "state")
    with capture_logs() as logs:
        identity = store.load()
    assert identity.worker_id
    assert not store.persistent
    assert "identity_not_persisted" in [e["event"] for e in logs]
