"""End-to-end: what an isolated instance can observe, and network mode "namespace"."""

import ipaddress
import json
import os
import pwd
import tempfile
from pathlib import Path

import pytest

from e2e import HTTP_SERVER, Osvm, http_request, link_names, netns_names, python_command, wait_for
from osvm.runtimes.netns import short_id

pytestmark = pytest.mark.root

# Writes what the instance observes to $OSVM_DATA_DIR/facts.json, then sleeps. Arguments: a file in
# the host's /tmp, and the daemon's state directory.
FACTS = """
import errno, json, os, resource, socket, subprocess, sys, time

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split()[1]

host_tmp_file, state_dir = sys.argv[1], sys.argv[2]
facts = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "hostname": socket.gethostname(),
    "pid": int(open("/proc/self/stat").read().split()[0]),
    "pids_visible": sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()),
    "usr_read_only": bool(os.statvfs("/usr").f_flag & os.ST_RDONLY),
    "host_tmp_file_visible": os.path.exists(host_tmp_file),
    "tmp_entries": os.listdir("/tmp"),
    "state_dir_entries": os.listdir(state_dir) if os.path.isdir(state_dir) else None,
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "ulimit_n": subprocess.run(["/bin/sh", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip(),
    "cap_eff": status_field("CapEff"),
    "no_new_privs": status_field("NoNewPrivs"),
    "env": dict(os.environ),
    "cwd": os.getcwd(),
}
try:
    open("/usr/osvm-write-test", "w").close()
    facts["usr_write"] = "succeeded"
except OSError as error:
    facts["usr_write"] = errno.errorcode[error.errno]
with open("/tmp/written-inside", "w") as file:
    file.write("private")
facts["tmp_write"] = os.path.exists("/tmp/written-inside")

path = os.path.join(os.environ["OSVM_DATA_DIR"], "facts.json")
with open(path + ".partial", "w") as file:
    json.dump(facts, file)
os.rename(path + ".partial", path)
print("facts written to", path, flush=True)
while True:
    time.sleep(3600)
"""


def test_instance_is_isolated(osvm: Osvm):
    host_tmp = Path(tempfile.mkdtemp(prefix="osvm-host-", dir="/tmp"))
    host_tmp_file = host_tmp / "visible-on-host"
    try:
        host_tmp_file.write_text("host only")
        path = osvm.write_deployment(
            {
                "sandboxed": {
                    "command": python_command(FACTS) + [str(host_tmp_file), str(osvm.state_dir)],
                    "env": {"GREETING": "hello"},
                    "resources": {"open_files": 256},
                }
            }
        )
        osvm.up(path)
        instance = osvm.instance("sandboxed")
        facts_path = osvm.data_dir(instance["id"]) / "facts.json"
        wait_for(facts_path.exists, f"{facts_path} to be written")
        facts = json.loads(facts_path.read_text())
    finally:
        host_tmp_file.unlink(missing_ok=True)
        host_tmp.rmdir()

    assert instance["isolated"] is True
    assert facts["uid"] != 0
    assert facts["uid"] == pwd.getpwnam("osvm").pw_uid
    assert facts["hostname"] == "sandboxed"
    # Its own PID namespace: bubblewrap's init is pid 1 and the command a low pid after it.
    assert facts["pid"] <= 3
    assert 1 in facts["pids_visible"]
    assert max(facts["pids_visible"]) < 100
    assert facts["usr_read_only"] is True
    assert facts["usr_write"] == "EROFS"
    assert facts["host_tmp_file_visible"] is False
    assert host_tmp.name not in facts["tmp_entries"]
    assert facts["tmp_write"] is True
    assert not (Path("/tmp") / "written-inside").exists()
    assert facts["state_dir_entries"] is not None
    assert "state.db" not in facts["state_dir_entries"]
    assert "osvm.sock" not in facts["state_dir_entries"]
    assert facts["nofile"] == [256, 256]
    assert facts["ulimit_n"] == "256"
    assert int(facts["cap_eff"], 16) == 0
    assert facts["no_new_privs"] == "1"
    data_dir = str(osvm.data_dir(instance["id"]))
    assert facts["cwd"] == data_dir
    env = facts["env"]
    assert env["GREETING"] == "hello"
    assert env["HOME"] == data_dir
    assert env["OSVM_DATA_DIR"] == data_dir
    assert env["OSVM_COMPONENT"] == "sandboxed"
    assert env["OSVM_INSTANCE"] == instance["id"]
    assert env["OSVM_ADDRESS"] == "127.0.0.1"
    # The daemon's own environment is not passed on: pytest sets this variable for the daemon.
    assert "PYTEST_CURRENT_TEST" in os.environ
    assert "PYTEST_CURRENT_TEST" not in env


def test_network_namespace_mode(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "web": {
                "command": python_command(HTTP_SERVER),
                "ports": {"http": 0},
                "network": {"mode": "namespace"},
                "probes": [{"type": "http", "port": "http", "path": "/"}],
            }
        }
    )
    osvm.up(path)
    instance = osvm.wait_healthy("web")
    address = instance["address"]
    port = instance["ports"]["http"]

    assert ipaddress.ip_address(address) in ipaddress.ip_network("10.213.0.0/16")
    assert ipaddress.ip_address(address) in ipaddress.ip_network(osvm.subnet_pool)
    assert instance["netns"] == f"osvm-{instance['id']}"
    assert instance["netns"] in netns_names()
    veth = f"ov-{short_id(instance['id'])}"
    assert veth in link_names()
    (probe,) = instance["probes"]
    assert probe["state"] == "healthy"
    status, body = http_request(f"http://{address}:{port}/")
    assert status == 200
    reply = json.loads(body)
    assert reply["component"] == "web"
    assert reply["instance"] == instance["id"]

    osvm.cli("down")

    assert instance["netns"] not in netns_names()
    assert veth not in link_names()
    assert osvm.processes() == []
