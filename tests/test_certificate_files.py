"""Tests of an instance's certificate files over its life: written at start, deleted when it ends."""

from e2e import SLEEPER, Osvm, python_command, wait_for


def test_ended_instance_loses_its_key(osvm: Osvm) -> None:
    osvm.cli("ca", "init")
    osvm.up(osvm.write_deployment({"worker": {"command": python_command(SLEEPER), "stop_grace_period": "1s"}}))
    instance = osvm.instance("worker")
    tls_dir = osvm.tls_dir(instance["id"])
    assert sorted(path.name for path in tls_dir.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]

    osvm.cli("down")

    wait_for(lambda: not tls_dir.exists() or None, f"{tls_dir} to be removed")
    # Nothing else was in the data directory, so it went too.
    assert not tls_dir.parent.exists()
    records = osvm.cli_json("ca", "list")["certificates"]
    worker = [record for record in records if record["instance"] == instance["id"]]
    assert worker
    assert all(record["revoked_at"] is not None for record in worker)
