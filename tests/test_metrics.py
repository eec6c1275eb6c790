"""Prometheus metrics of a running daemon, scraped from its control socket."""

import re

import httpx

from e2e import HTTP_SERVER, Osvm, python_command


def scrape(osvm: Osvm) -> str:
    transport = httpx.HTTPTransport(uds=str(osvm.state_dir / "osvm.sock"))
    with httpx.Client(transport=transport, base_url="http://osvm", timeout=10, trust_env=False) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    """Return the value of one sample whose labels include `labels`."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} with {labels} in:\n{text}")


def test_metrics_describe_instances(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "web": {
                "command": python_command(HTTP_SERVER),
                "ports": {"http": 0},
                "probes": [{"type": "http", "port": "http", "path": "/", "startup_interval": "0.1s"}],
            }
        }
    )
    osvm.up(path)

    text = scrape(osvm)

    assert sample(text, "osvm_instance_up", component="web") == 1.0
    assert sample(text, "osvm_instance_healthy", component="web") == 1.0
    assert sample(text, "osvm_instance_restarts_total", component="web") == 0.0
    assert sample(text, "osvm_events_total", kind="instance.started") >= 1.0
    assert re.search(r'^osvm_events_total\{kind="revision.created"\} 1\.0$', text, re.MULTILINE)
