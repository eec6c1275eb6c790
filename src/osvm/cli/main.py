"""The `osvm` command line."""

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from osvm import __version__, paths
from osvm.cli.client import STOP_TIMEOUT, Client, ClientError
from osvm.cli.output import status_table, table
from osvm.config.load import ConfigError, load_deployment
from osvm.config.models import Deployment, ImageSpec

if TYPE_CHECKING:
    from osvm.images import BuiltImage

# Exit statuses.
OK = 0
FAILED = 1
USAGE = 2

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return USAGE
    try:
        return int(args.handler(args) or OK)
    except ClientError as error:
        _error(str(error))
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return OK


# --- commands -------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    deployment = _load(args.file, args.json, check_sources=True)
    if deployment is None:
        return FAILED
    if args.json:
        _print_json({"file": args.file, "valid": True, "components": deployment.start_order()})
    else:
        names = ", ".join(deployment.start_order())
        print(f"{args.file}: valid: deployment {deployment.name!r} with {len(deployment.components)} component(s): {names}")
    return OK


def cmd_up(args: argparse.Namespace) -> int:
    deployment = _load(args.file, args.json, check_sources=True)
    if deployment is None:
        return FAILED
    client = _client(args)
    if client.ensure_daemon() and not args.json:
        print(f"started the osvm daemon (state in {client.state_dir}, log in {paths.daemon_log_path(client.state_dir)})")
    # The rollouts that ended before this apply, so an earlier rolled-back rollout is not taken for this one.
    earlier = {
        component["name"]: component["rollout"]["id"]
        for component in client.get("/v1/status")["components"]
        if component.get("rollout")
    }
    result = client.post(
        "/v1/apply",
        {"file": str(Path(args.file).absolute()), "deployment": deployment.model_dump(mode="json")},
    )
    if not args.json:
        for change in result["changes"]:
            print(f"{change['component']}: revision {change['revision']} {change['action']}")
    if args.detach:
        if args.json:
            _print_json(result)
        return OK
    # Wait for the revisions just applied: right after an update the old revision is still the one
    # running healthy, and its rollout may not have started yet.
    revisions = {change["component"]: change["revision"] for change in result["changes"] if change["action"] != "removed"}
    ok, status = _wait_healthy(
        client, list(deployment.components), args.timeout, quiet=args.json, revisions=revisions, earlier_rollouts=earlier
    )
    for component in status["components"]:
        rollout = component.get("rollout")
        if ok and rollout and rollout["state"] in ("starting", "verifying", "promoted", "draining"):
            follow = argparse.Namespace(json=args.json, detach=False, timeout=args.timeout)
            ok = _follow_rollout(client, rollout, follow) == OK and ok
            status = client.get("/v1/status")
    if args.json:
        _print_json({"apply": result, "healthy": ok, "status": status})
    else:
        print()
        print(status_table(status))
    return OK if ok else FAILED


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).get("/v1/status")
    if args.component:
        status["components"] = [c for c in status["components"] if c["name"] == args.component]
        if not status["components"]:
            _error(f"component {args.component!r} not found: run `osvm status` to list components")
            return FAILED
    if args.json:
        _print_json(status)
    elif not status["components"]:
        print("no components: apply a deployment file with `osvm up FILE`")
    else:
        print(status_table(status))
    return OK


def cmd_logs(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.since:
        params["since"] = time.time() - _parse_since(args.since)
    if args.tail is not None:
        params["tail"] = args.tail
    if args.follow:
        params["follow"] = 1
    if args.instance:
        params["instance"] = args.instance
    with _client(args).open_stream(f"/v1/components/{args.component}/logs", **params) as response:
        if args.json:
            instance = response.headers.get("X-Osvm-Instance", "")
            for line in _lines(response.iter_raw()):
                text = line.decode("utf-8", errors="replace")
                print(json.dumps({"component": args.component, "instance": instance, "text": text}), flush=True)
            return OK
        out = sys.stdout.buffer
        for chunk in response.iter_raw():
            out.write(chunk)
            out.flush()
    return OK


def cmd_events(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.since:
        params["since"] = time.time() - _parse_since(args.since)
    if args.component:
        params["component"] = args.component
    if args.follow:
        params["follow"] = 1
    for line in _lines(_client(args).stream("/v1/events", **params)):
        if not line.strip():
            continue
        event = json.loads(line)
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            print(_format_event(event), flush=True)
    return OK


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a streamed body into lines without their newline. A last line without a newline is yielded at the end."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


def cmd_component_action(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.post(f"/v1/components/{args.component}/{args.action}", timeout=STOP_TIMEOUT)
    if args.json:
        _print_json(result)
        return OK
    if args.action == "stop":
        print(f"{args.component}: stopped")
        return OK
    print(f"{args.component}: {args.action} requested")
    if args.wait:
        ok, status = _wait_healthy(client, [args.component], args.timeout, quiet=False)
        print()
        print(status_table(status))
        return OK if ok else FAILED
    return OK


def cmd_down(args: argparse.Namespace) -> int:
    client = _client(args)
    if not client.is_running():
        if not args.json:
            print("no daemon is running on this state directory: nothing to stop")
        return OK
    result = client.post("/v1/down", timeout=STOP_TIMEOUT)
    if args.daemon:
        client.post("/v1/shutdown")
    if args.json:
        _print_json(result)
    else:
        removed = ", ".join(result["removed"]) or "none"
        print(f"stopped and removed: {removed}")
        if args.daemon:
            print("daemon stopped")
    return OK


def cmd_daemon_restart(args: argparse.Namespace) -> int:
    client = _client(args)
    before = client.get("/v1/ping")
    client.post("/v1/restart", {"force": args.force, "drain_timeout": args.drain_timeout})
    pid = before["pid"]
    log_hint = f"read {paths.daemon_log_path(_state_dir(args))} or the service's log for its errors"

    deadline = time.monotonic() + args.drain_timeout + args.timeout
    after = None
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not _process_exists(pid):
            _error(f"the daemon (pid {pid}) exited during the restart, so its endpoints are down: {log_hint}")
            return FAILED
        try:
            ping = client.get("/v1/ping")
        except ClientError:
            # The control socket is away while the daemon executes itself again.
            continue
        if ping["started_at"] != before["started_at"]:
            after = ping
            break

    if after is None:
        _error(
            f"the daemon did not respond again within {args.drain_timeout + args.timeout:g} s after the restart: {log_hint}"
        )
        return FAILED
    if after["pid"] != pid:
        _error(f"another daemon (pid {after['pid']}) took over the state directory from pid {pid}: {log_hint}")
        return FAILED
    if args.json:
        _print_json({"before": before, "after": after})
    else:
        print(f"daemon restarted: pid {after['pid']}, osvm {before['version']} -> {after['version']}")
    return OK


def cmd_deploy(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.abort:
        result = client.post(f"/v1/components/{args.component}/deploy", {"abort": True})
        if args.json:
            _print_json(result)
        else:
            print(f"{args.component}: abort requested for rollout {result['rollout']['id']}")
        return OK
    body: dict[str, Any] = {"set": args.set or []}
    if args.file:
        deployment = _load(args.file, args.json, check_sources=True)
        if deployment is None:
            return FAILED
        if args.component not in deployment.components:
            _error(f"{args.file}: no component {args.component!r} in the file (declared: {', '.join(deployment.components)})")
            return FAILED
        body["spec"] = deployment.components[args.component].model_dump(mode="json")
    elif not args.set:
        _error("nothing to deploy: give --file FILE or at least one --set KEY=VALUE")
        return USAGE
    result = client.post(f"/v1/components/{args.component}/deploy", body)
    return _follow_rollout(client, result["rollout"], args)


def cmd_rollback(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.post(f"/v1/components/{args.component}/rollback")
    return _follow_rollout(client, result["rollout"], args)


def cmd_deployments(args: argparse.Namespace) -> int:
    result = _client(args).get(f"/v1/components/{args.component}/deployments", limit=args.limit)
    if args.json:
        _print_json(result)
        return OK
    rows = []
    for rollout in result["rollouts"]:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rollout["created_at"]))
        phases = " ".join(_phase_text(phase) for phase in rollout["phases"])
        rows.append(
            [
                str(rollout["id"]),
                started,
                f"{rollout['from_revision']} -> {rollout['to_revision']}",
                rollout["state"],
                phases or "-",
                str(rollout["closed_connections"]),
                rollout["reason"],
            ]
        )
    if not rows:
        print(f"no rollouts of {args.component} yet")
        return OK
    print(table(["ID", "STARTED", "REVISIONS", "OUTCOME", "PHASES", "CLOSED", "REASON"], rows))
    return OK


def _follow_rollout(client: Client, rollout: dict[str, Any], args: argparse.Namespace) -> int:
    """Print each state change of a rollout until it ends; return OK only when it completed."""
    if not args.json:
        print(
            f"rollout {rollout['id']} of {rollout['component']}: revision {rollout['from_revision']} -> "
            f"{rollout['to_revision']} ({rollout['strategy']})",
            flush=True,
        )
    if args.detach:
        if args.json:
            _print_json({"rollout": rollout})
        return OK
    deadline = time.monotonic() + args.timeout
    shown = ""
    while True:
        rollout = client.get(f"/v1/rollouts/{rollout['id']}")["rollout"]
        line = f"  {rollout['state']}: {rollout['reason']}"
        if not args.json and line != shown:
            print(line, flush=True)
            shown = line
        if rollout["state"] in ("complete", "rolled_back", "failed"):
            break
        if time.monotonic() > deadline:
            _error(f"rollout {rollout['id']} still {rollout['state']} after {args.timeout:g} s: follow it with `osvm deployments {rollout['component']}`")
            return FAILED
        time.sleep(0.2)
    if args.json:
        _print_json({"rollout": rollout})
    else:
        print("  phases: " + " ".join(_phase_text(phase) for phase in rollout["phases"]))
    return OK if rollout["state"] == "complete" else FAILED


def _phase_text(phase: dict[str, Any]) -> str:
    if phase.get("finished_at") is None:
        return f"{phase['phase']}=running"
    return f"{phase['phase']}={phase['finished_at'] - phase['started_at']:.1f}s"


def cmd_ca(args: argparse.Namespace) -> int:
    client = _client(args)
    client.ensure_daemon()
    action = args.ca_action
    if action == "init":
        body = {"trust_domain": args.trust_domain, "key_type": args.key_type}
        root_key_path = None
        if args.root_out:
            root_key_path = Path(args.root_out).absolute()
            if root_key_path.is_dir():
                from osvm.security.ca import ROOT_KEY_FILE

                root_key_path = root_key_path / ROOT_KEY_FILE
            body["root_out"] = str(root_key_path)
        result = client.post("/v1/ca/init", body)
        if args.json:
            _print_json(result)
        else:
            print(f"created a CA for trust domain {result['trust_domain']} ({result['key_type']}) in {result['directory']}")
            if not result["root_key_online"]:
                print(f"the root key is at {root_key_path}; keep it offline, `osvm ca rotate --root-key` needs it")
        return OK
    if action == "list":
        result = client.get("/v1/ca/certificates", **({"component": args.component} if args.component else {}))
        if args.json:
            _print_json(result)
            return OK
        print(f"trust domain {result['trust_domain']} ({result['key_type']}), root key {'online' if result['root_key_online'] else 'offline'}")
        rows = [
            [item["serial"][:16], item["component"], item["instance"] or "-", item["not_after"][:19], "revoked" if item["revoked_at"] else "valid"]
            for item in result["certificates"]
        ]
        print(table(["SERIAL", "COMPONENT", "INSTANCE", "NOT AFTER (UTC)", "STATE"], rows))
        return OK
    if action == "show":
        result = client.get(f"/v1/ca/certificates/{args.serial}")
        if args.json:
            _print_json(result)
        else:
            for key in ("serial", "component", "instance", "not_before", "not_after", "revoked_at", "reason"):
                print(f"{key}: {result[key]}")
            print(result["pem"], end="")
        return OK
    if action == "revoke":
        if bool(args.serial) == bool(args.component):
            _error("give either a SERIAL or --component NAME")
            return USAGE
        body = {"reason": args.reason}
        body.update({"component": args.component} if args.component else {"serial": args.serial})
        result = client.post("/v1/ca/revoke", body)
        if args.json:
            _print_json(result)
        else:
            print(f"revoked: {', '.join(result['revoked']) or 'nothing'}")
        return OK
    if action == "renew":
        result = client.post("/v1/ca/renew", {"component": args.component})
        if args.json:
            _print_json(result)
        else:
            print(f"renewing the certificates of {', '.join(result['instances']) or 'no running instance'}; see `osvm events`")
        return OK
    if action == "rotate":
        body = {"root_key": str(Path(args.root_key).absolute())} if args.root_key else {}
        result = client.post("/v1/ca/rotate", body)
        if args.json:
            _print_json(result)
        else:
            print(f"new intermediate {result['intermediate']}; new certificates are signed by it")
        return OK
    return USAGE


def cmd_policy_check(args: argparse.Namespace) -> int:
    result = _client(args).get("/v1/policy/check", **{"from": args.source, "to": args.destination, "port": args.port})
    if args.json:
        _print_json(result)
    else:
        verdict = "ALLOW" if result["allowed"] else "DENY"
        print(f"{verdict}: {result['from']} -> {result['to']} port {result['port']}: {result['rule']}")
    return OK if result["allowed"] else FAILED


def cmd_image(args: argparse.Namespace) -> int:
    from osvm.images import ImageError, ImageInUseError, list_images, remove_image_unless_used

    cache = _state_dir(args) / "images"
    if args.image_action == "build":
        deployment = _load(args.file, args.json)
        if deployment is None:
            return FAILED
        names = [args.component] if args.component else [n for n, c in deployment.components.items() if c.image is not None]
        if not names:
            _error(f"{args.file}: no component has an [image] table")
            return FAILED
        built = []
        for name in names:
            component = deployment.components.get(name)
            if component is None or component.image is None:
                _error(f"{args.file}: component {name!r} has no [image] table")
                return FAILED
            spec = component.image
            try:
                image, was_built = _build_or_reuse(name, spec, Path(args.file).absolute().parent, cache, quiet=args.json)
            except Exception as error:  # noqa: BLE001 - an image build fails in many tools; report the reason.
                _error(f"{name}: cannot build the image: {error}")
                return FAILED
            action = "built" if was_built else "reused"
            built.append({"component": name, "digest": image.digest, "directory": str(image.directory), "action": action})
            if args.json:
                continue
            if was_built:
                print(f"{name}: built image {image.short_digest} in {image.directory}")
            else:
                print(f"{name}: reused the cached {spec.kind} image {image.short_digest} ({spec.format}) in {image.directory}")
        if args.json:
            _print_json({"images": built})
        return OK
    if args.image_action == "ls":
        images = list_images(cache)
        if args.json:
            _print_json({"images": [{"digest": i.digest, "kind": i.kind, "format": i.format, "size": i.size, "created": i.created} for i in images]})
            return OK
        rows = [
            [i.short_digest, i.kind, i.format, f"{i.size / 1048576:.1f} MiB", time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created))]
            for i in images
        ]
        print(table(["IMAGE", "KIND", "FORMAT", "SIZE", "CREATED"], rows) if rows else f"no images in {cache}")
        return OK
    if args.image_action == "rm":
        try:
            image, users = remove_image_unless_used(cache, _state_dir(args), args.digest, force=args.force)
        except ImageInUseError as error:
            _error(str(error))
            if args.json:
                _print_json({"removed": None, "digest": error.image.digest, "in_use": [user.to_json() for user in error.users]})
            return FAILED
        except ImageError as error:
            _error(str(error))
            return FAILED
        if args.json:
            _print_json({"removed": image.digest, "digest": image.digest, "in_use": [user.to_json() for user in users]})
            return OK
        if users:
            names = ", ".join(user.describe() for user in users)
            _warning(
                f"image {image.short_digest} was in use by {names}: they cannot restart until it is rebuilt, "
                f"so run `osvm image build FILE` with their deployment file"
            )
        print(f"removed image {image.short_digest}")
        return OK
    return USAGE


def _build_or_reuse(name: str, spec: ImageSpec, base_dir: Path, cache: Path, quiet: bool) -> tuple["BuiltImage", bool]:
    """Return a component's image from the cache or a new build, and whether it was built."""
    from osvm.images import build_image

    was_built = False

    def announce_build() -> None:
        nonlocal was_built
        was_built = True
        if not quiet:
            print(f"{name}: building a {spec.kind} image ({spec.format})", flush=True)

    image = build_image(spec, base_dir, cache, on_build=announce_build)
    return image, was_built


def cmd_revisions(args: argparse.Namespace) -> int:
    result = _client(args).get(f"/v1/components/{args.component}/revisions")
    if args.json:
        _print_json(result)
        return OK
    for revision in result["revisions"]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(revision["created_at"]))
        print(f"{revision['number']:>4}  {created}  {revision['spec_hash'][:12]}")
    return OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from osvm.daemon.daemon import run_daemon

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every probe request at INFO; the probes log their own state changes.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    isolation = False if args.no_isolation else None
    return run_daemon(_state_dir(args), isolation, args.subnet_pool, args.metrics_listen)


# --- helpers --------------------------------------------------------------------------------


def _wait_healthy(
    client: Client,
    names: list[str],
    timeout: float,
    quiet: bool,
    revisions: dict[str, int] | None = None,
    earlier_rollouts: dict[str, int] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Show progress until every named component runs healthy, one fails, or the timeout passes.

    For a component in `revisions`, only an instance of that revision counts, and a rollout to it
    that rolled back or failed counts as a failure, unless it is the one in `earlier_rollouts`.
    """
    revisions = revisions or {}
    earlier_rollouts = earlier_rollouts or {}
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    while True:
        status = client.get("/v1/status")
        by_name = {component["name"]: component for component in status["components"]}
        done = True
        failed = []
        for name in names:
            component = by_name.get(name)
            if component is None:
                done = False
                continue
            line = _progress_line(component)
            if not quiet and shown.get(name) != line:
                print(line, flush=True)
                shown[name] = line
            if component["status"] in ("failed", "exited"):
                failed.append(name)
            expected_revision = revisions.get(name)
            rollout = component.get("rollout")
            if (
                expected_revision is not None
                and rollout
                and rollout["id"] != earlier_rollouts.get(name)
                and rollout["to_revision"] == expected_revision
                and rollout["state"] in ("rolled_back", "failed")
            ):
                failed.append(name)
            healthy = component["status"] == "running" and any(
                instance["health"] == "healthy" and (expected_revision is None or instance["revision"] == expected_revision)
                for instance in component["instances"]
            )
            done = done and healthy
        if failed:
            if not quiet:
                _error(f"{', '.join(failed)} failed: see `osvm events` and `osvm logs {failed[0]}`")
            return False, status
        if done:
            return True, status
        if time.monotonic() > deadline:
            if not quiet:
                _error(f"timed out after {timeout:g} s waiting for components to become healthy: see `osvm status`")
            return False, status
        time.sleep(0.2)


def _progress_line(component: dict[str, Any]) -> str:
    health = ""
    if component["instances"]:
        instance = component["instances"][0]
        health = f" ({instance['health']})" if instance["health"] not in ("unknown", "none") else ""
    reason = f": {component['reason']}" if component["reason"] else ""
    return f"  {component['name']}: {component['status']}{health}{reason}"


def _format_event(event: dict[str, Any]) -> str:
    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    subject = event["instance"] or event["component"] or "daemon"
    return f"{moment}  {subject:<24}  {event['kind']:<20}  {event['reason']}"


def _load(file: str, as_json: bool, check_sources: bool = False) -> Deployment | None:
    """Load and validate a deployment file, reporting its errors; None when it is invalid.

    With check_sources, the host files that images copy are checked too. They are checked here and
    not in the model, which the daemon also uses for stored revisions.
    """
    from osvm.images.sources import image_source_issues

    try:
        deployment = load_deployment(file)
    except ConfigError as error:
        _report_config_error(error, as_json)
        return None
    base_dir = Path(file).absolute().parent
    deployment = deployment.with_paths_resolved(str(base_dir))
    if check_sources:
        issues = image_source_issues(deployment, base_dir)
        if issues:
            _report_config_error(ConfigError(file, issues), as_json)
            return None
    return deployment


def _report_config_error(error: ConfigError, as_json: bool) -> None:
    if as_json:
        _print_json({"valid": False, **error.to_json()})
    else:
        for issue in error.issues:
            _error(issue.render(error.file))


def _parse_since(value: str) -> float:
    match = _SINCE.match(value.strip())
    if match is None:
        raise ClientError(f"invalid --since {value!r}: write a number with a unit s, m, h or d, such as 10m")
    return float(match.group(1)) * _SINCE_UNITS[match.group(2)]


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).absolute() if args.state_dir else paths.default_state_dir()


def _client(args: argparse.Namespace) -> Client:
    return Client(_state_dir(args))


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: write a number such as 10") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: give a number above 0 and at most 3600")
    return value


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The daemon runs as another user, which a CLI without root may not signal.
        return True
    try:
        # A daemon that exited stays a zombie until its parent reaps it, which may never happen.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _error(message: str) -> None:
    print(f"osvm: error: {message}", file=sys.stderr)


def _warning(message: str) -> None:
    print(f"osvm: warning: {message}", file=sys.stderr)


def _common_options() -> argparse.ArgumentParser:
    """Return a parent parser with the options accepted both before and after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help="state directory of the daemon (default: $OSVM_STATE_DIR, /var/lib/osvm for root, ~/.local/state/osvm otherwise)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text")
    return common


def _build_parser() -> argparse.ArgumentParser:
    # A parent shares its option objects with every parser built from it, and set_defaults below
    # changes their defaults. The top-level parser therefore gets its own copy: with a shared one,
    # each command would reset `--state-dir DIR` and `--json` given before it to the defaults.
    parser = argparse.ArgumentParser(
        prog="osvm",
        description="Run blockchain infrastructure as isolated components and keep it healthy.",
        parents=[_common_options()],
    )
    common = _common_options()
    parser.set_defaults(state_dir=None, json=False)
    parser.add_argument("--version", action="version", version=f"osvm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        parents=[common],
        help="check a deployment file, and the image paths it names on this host, without applying it",
    )
    validate.add_argument("file", help="deployment file (TOML)")
    validate.set_defaults(handler=cmd_validate)

    up = commands.add_parser(
        "up", parents=[common], help="start the daemon if needed, apply a deployment file and wait until healthy"
    )
    up.add_argument("file", help="deployment file (TOML)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all components to become healthy (default 300)")
    up.add_argument("-d", "--detach", action="store_true", help="apply the file and return without waiting")
    up.set_defaults(handler=cmd_up)

    status = commands.add_parser("status", parents=[common], help="show components and their instances")
    status.add_argument("component", nargs="?", help="show only this component")
    status.set_defaults(handler=cmd_status)

    logs = commands.add_parser(
        "logs",
        parents=[common],
        help="print a component's stdout and stderr (with --json, one object per line with the instance id and the text)",
    )
    logs.add_argument("component")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--since", help="only output written in this recent time, such as 10m, 2h or 30s")
    logs.add_argument("-n", "--tail", type=int, help="only the last N lines")
    logs.add_argument("--instance", help="an instance id (default: the newest instance)")
    logs.set_defaults(handler=cmd_logs)

    events = commands.add_parser("events", parents=[common], help="print lifecycle events with their reasons")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--since", help="only events in this recent time, such as 10m")
    events.add_argument("--component", help="only events of this component")
    events.add_argument("--limit", type=int, default=200, help="at most this many past events (default 200)")
    events.set_defaults(handler=cmd_events)

    for action, text in (
        ("start", "start a stopped component"),
        ("stop", "stop a component (stop signal, grace period, then SIGKILL)"),
        ("restart", "restart a component, or start it again after it failed"),
    ):
        sub = commands.add_parser(action, parents=[common], help=text)
        sub.add_argument("component")
        if action != "stop":
            sub.add_argument("--wait", action="store_true", help="wait until the component is healthy again")
            sub.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait (default 300)")
        sub.set_defaults(handler=cmd_component_action, action=action, wait=False, timeout=300.0)

    down = commands.add_parser("down", parents=[common], help="stop and remove every component")
    down.add_argument("--daemon", action="store_true", help="also stop the daemon")
    down.set_defaults(handler=cmd_down)

    daemon_restart = commands.add_parser(
        "daemon-restart",
        parents=[common],
        help="execute the running daemon again, to load an upgraded osvm: endpoints keep listening and instances keep running",
        description=(
            "Restart the daemon in place, with the same pid, after checking that the installed osvm starts. "
            "Endpoints keep their listening sockets, so new connections wait instead of being refused, "
            "for as long as the slowest request in flight takes (at most --drain-timeout) plus the start "
            "of the new process. TCP-mode and WebSocket connections are closed."
        ),
    )
    daemon_restart.add_argument(
        "--drain-timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds requests in flight get to complete; those still running then get 502 (default 10)",
    )
    daemon_restart.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        help="seconds to wait, after the drain, for the restarted daemon to respond (default 60)",
    )
    daemon_restart.add_argument(
        "--force", action="store_true", help="restart even while a rollout runs, which rolls the rollout back"
    )
    daemon_restart.set_defaults(handler=cmd_daemon_restart)

    deploy = commands.add_parser(
        "deploy",
        parents=[common],
        help="move a component to a new revision: blue-green with a health gate, switch, watch, drain",
    )
    deploy.add_argument("component")
    deploy.add_argument("--file", "-f", help="take the component's new spec from this deployment file")
    deploy.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change one key of the current spec, such as env.LOG_LEVEL=debug or command[0]=/opt/node/bin/node (repeatable)",
    )
    deploy.add_argument("--abort", action="store_true", help="stop the rollout in progress and keep the old revision")
    deploy.add_argument("-d", "--detach", action="store_true", help="start the rollout and return without following it")
    deploy.add_argument("--timeout", type=float, default=900.0, help="seconds to follow the rollout (default 900)")
    deploy.set_defaults(handler=cmd_deploy)

    rollback = commands.add_parser("rollback", parents=[common], help="deploy the previous revision by the same procedure")
    rollback.add_argument("component")
    rollback.add_argument("-d", "--detach", action="store_true", help="start the rollback and return without following it")
    rollback.add_argument("--timeout", type=float, default=900.0, help="seconds to follow the rollback (default 900)")
    rollback.set_defaults(handler=cmd_rollback)

    deployments = commands.add_parser("deployments", parents=[common], help="list a component's rollouts: outcome, reason, phase durations")
    deployments.add_argument("component")
    deployments.add_argument("--limit", type=int, default=20, help="at most this many rollouts (default 20)")
    deployments.set_defaults(handler=cmd_deployments)

    policy = commands.add_parser("policy", parents=[common], help="explain network policy decisions")
    policy_actions = policy.add_subparsers(dest="policy_action", metavar="ACTION", required=True)
    check = policy_actions.add_parser(
        "check", parents=[common], help="print whether FROM may reach port PORT of TO, and the rule that decides (exit 1 when denied)"
    )
    check.add_argument("source", metavar="FROM", help="source component")
    check.add_argument("destination", metavar="TO", help="destination component")
    check.add_argument("port", metavar="PORT", help="port name of the destination")
    check.set_defaults(handler=cmd_policy_check)

    ca = commands.add_parser("ca", parents=[common], help="the internal certificate authority")
    ca_actions = ca.add_subparsers(dest="ca_action", metavar="ACTION", required=True)
    ca_init = ca_actions.add_parser("init", parents=[common], help="create the root and intermediate CA")
    ca_init.add_argument("--trust-domain", default="osvm.local", help="SPIFFE trust domain of identities (default osvm.local)")
    ca_init.add_argument("--key-type", default="ecdsa-p256", choices=["ecdsa-p256", "ed25519"], help="key type (default ecdsa-p256)")
    ca_init.add_argument(
        "--root-out",
        metavar="DIR",
        help="write the root key to DIR/root-key.pem (or to this file path) and keep only the intermediate online",
    )
    ca_list = ca_actions.add_parser("list", parents=[common], help="list issued certificates")
    ca_list.add_argument("--component", help="only this component's certificates")
    ca_show = ca_actions.add_parser("show", parents=[common], help="show one certificate")
    ca_show.add_argument("serial")
    ca_revoke = ca_actions.add_parser("revoke", parents=[common], help="revoke a certificate, or every certificate of a component")
    ca_revoke.add_argument("serial", nargs="?")
    ca_revoke.add_argument("--component", help="revoke every unexpired certificate of this component")
    ca_revoke.add_argument("--reason", default="unspecified", help="RFC 5280 reason, such as keyCompromise (default unspecified)")
    ca_renew = ca_actions.add_parser("renew", parents=[common], help="renew the certificates of a component's instances now")
    ca_renew.add_argument("component")
    ca_rotate = ca_actions.add_parser("rotate", parents=[common], help="make a new intermediate signed by the root")
    ca_rotate.add_argument("--root-key", metavar="PATH", help="the offline root key, when `ca init --root-out` was used")
    ca.set_defaults(handler=cmd_ca)

    image = commands.add_parser("image", parents=[common], help="guest images for runtime \"microvm\"")
    image_actions = image.add_subparsers(dest="image_action", metavar="ACTION", required=True)
    image_build = image_actions.add_parser(
        "build",
        parents=[common],
        help="build the images of a deployment file, or reuse a cached image with the same digest",
        description=(
            "Build the image of each component with an [image] table, or reuse the cached image with the "
            "same digest. The output says which happened; with --json, each entry has \"action\": "
            "\"built\" or \"reused\"."
        ),
    )
    image_build.add_argument("file", help="deployment file (TOML)")
    image_build.add_argument("component", nargs="?", help="only this component's image")
    image_actions.add_parser("ls", parents=[common], help="list cached images")
    image_rm = image_actions.add_parser(
        "rm",
        parents=[common],
        help="remove a cached image, which is rejected while a live microVM instance uses it unless --force is given",
        description=(
            "Remove a cached image. A microVM instance reads its image again at every restart, so the "
            "command is rejected while a live instance (one that has not stopped, exited or failed) uses "
            "the image, and the error names each such component and instance. The check reads the state "
            "directory, so it works whether or not the daemon runs. With --json, the output is "
            "{\"removed\": DIGEST or null, \"digest\": DIGEST, \"in_use\": [{\"component\", \"instance\", \"state\"}]}."
        ),
    )
    image_rm.add_argument("digest", help="image digest or a unique prefix of it")
    image_rm.add_argument(
        "--force",
        action="store_true",
        help="remove the image even if live instances use it, which then fail at their next restart until it is rebuilt",
    )
    image.set_defaults(handler=cmd_image)

    revisions = commands.add_parser("revisions", parents=[common], help="list the stored revisions of a component")
    revisions.add_argument("component")
    revisions.set_defaults(handler=cmd_revisions)

    daemon = commands.add_parser("daemon", parents=[common], help="run the daemon in the foreground (for systemd)")
    daemon.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="daemon log level (default info)")
    daemon.add_argument(
        "--no-isolation", action="store_true", help="run components as plain processes even as root (for development only)"
    )
    daemon.add_argument(
        "--subnet-pool",
        default="10.213.0.0/16",
        help="IPv4 pool that network-namespace instances get /30 subnets from (default 10.213.0.0/16)",
    )
    daemon.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve Prometheus metrics at http://HOST:PORT/metrics (they are always at /metrics on the socket)",
    )
    daemon.set_defaults(handler=cmd_daemon)
    return parser
