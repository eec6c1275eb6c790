"""The control API: JSON over HTTP on a Unix socket that only root (the socket's owner) can open.

Every error has one shape: {"error": {"message": "...", ...}} with an HTTP status that fits.
"""

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from osvm import __version__, paths
from osvm.config.load import ConfigError, issues_from_validation_error
from osvm.config.models import Deployment
from osvm.deploy.manager import DeployError
from osvm.daemon.handover import MAX_RESTART_DRAIN_TIMEOUT, RESTART_DRAIN_TIMEOUT, check_installed_code
from osvm.security.ca import CAError, CAExistsError, CertificateNotFound
from osvm.metrics.registry import CONTENT_TYPE
from osvm.logs.files import follow_log, read_logs
from osvm.reconcile.reconciler import REMOVED, RUNNING, STOPPED, ApplyError

if TYPE_CHECKING:
    from osvm.daemon.daemon import Daemon

logger = logging.getLogger("osvm.api")

SOCKET_MODE = 0o600


def error_response(status: int, message: str, **details: Any) -> web.Response:
    return web.json_response({"error": {"message": message, **details}}, status=status)


class ApiServer:
    """HTTP handlers over the daemon's reconciler, store and event bus."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.app = web.Application(middlewares=[self._errors])
        self.app.add_routes(
            [
                web.get("/v1/ping", self.ping),
                web.post("/v1/apply", self.apply),
                web.get("/v1/status", self.status),
                web.post("/v1/components/{name}/start", self.start_component),
                web.post("/v1/components/{name}/stop", self.stop_component),
                web.post("/v1/components/{name}/restart", self.restart_component),
                web.get("/v1/components/{name}/logs", self.logs),
                web.get("/v1/components/{name}/revisions", self.revisions),
                web.post("/v1/components/{name}/deploy", self.deploy),
                web.post("/v1/components/{name}/rollback", self.rollback),
                web.get("/v1/components/{name}/deployments", self.deployments),
                web.get("/v1/rollouts/{id}", self.rollout),
                web.post("/v1/ca/init", self.ca_init),
                web.get("/v1/ca/certificates", self.ca_list),
                web.get("/v1/ca/certificates/{serial}", self.ca_show),
                web.post("/v1/ca/revoke", self.ca_revoke),
                web.post("/v1/ca/rotate", self.ca_rotate),
                web.post("/v1/ca/renew", self.ca_renew),
                web.get("/v1/ca/crl", self.ca_crl),
                web.get("/v1/policy/check", self.policy_check),
                web.post("/v1/down", self.down),
                web.get("/v1/events", self.events),
                web.post("/v1/shutdown", self.shutdown),
                web.post("/v1/restart", self.restart),
                web.get("/metrics", self.metrics),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._socket: tuple[Path, int] | None = None
        # The handlers of `logs -f` and `events -f`, which stop() ends before it closes the server.
        self._followers: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._metrics_runner: web.AppRunner | None = None

    async def start(self, path: Path) -> None:
        """Listen on the Unix socket at `path` with mode 0600."""
        path.unlink(missing_ok=True)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        old_umask = os.umask(0o177)
        try:
            site = web.UnixSite(self._runner, str(path))
            await site.start()
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        self._socket = (path, path.stat().st_ino)
        logger.info("control API listening on %s", path)

    async def start_metrics(self, host: str, port: int) -> None:
        """Serve only GET /metrics over TCP, for Prometheus, which cannot scrape a Unix socket."""
        app = web.Application()
        app.add_routes([web.get("/metrics", self.metrics)])
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        try:
            await web.TCPSite(self._metrics_runner, host, port).start()
        except OSError as error:
            raise OSError(f"cannot listen for metrics on {host}:{port}: {error.strerror}: choose another --metrics-listen") from None
        logger.info("metrics on http://%s:%d/metrics", host, port)

    async def stop(self) -> None:
        """Close the listener and remove the socket file, unless another daemon has replaced it."""
        # A follower never ends on its own, and the server waits for its handlers before closing.
        self._stopping = True
        for task in list(self._followers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._socket is not None:
            path, inode = self._socket
            try:
                if path.stat().st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass

    # --- handlers ----------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        runtime = self.daemon.runtime
        return web.json_response(
            {
                "version": __version__,
                "pid": os.getpid(),
                "state_dir": str(self.daemon.state_dir),
                "isolated": runtime.isolated,
                "cgroup_layout": getattr(runtime, "cgroup_layout", None),
                "started_at": self.daemon.started_at,
            }
        )

    async def apply(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        file = body.get("file") or "request"
        document = body.get("deployment")
        try:
            deployment = Deployment.model_validate(document)
        except ValidationError as error:
            config_error = ConfigError(file, issues_from_validation_error(error, document if isinstance(document, dict) else {}))
            return error_response(422, str(config_error), **config_error.to_json())
        try:
            self.daemon.reconciler.check_applicable(deployment)
        except ApplyError as error:
            return error_response(422, str(error))
        changes = self.daemon.reconciler.apply(deployment, file)
        return web.json_response({"deployment": deployment.name, "changes": changes})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.daemon.status())

    async def start_component(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._require_component(name)
        component = self.daemon.store.component(name)
        if component is not None and component.status in ("failed", "exited", "stopped"):
            self.daemon.store.set_component_status(name, "pending", "start requested")
        self.daemon.reconciler.set_desired(name, RUNNING)
        return web.json_response({"component": name, "desired": RUNNING})

    async def stop_component(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._require_component(name)
        self.daemon.reconciler.set_desired(name, STOPPED)
        await self.daemon.reconciler.reconcile_once()
        return web.json_response({"component": name, "desired": STOPPED})

    async def restart_component(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._require_component(name)
        await self.daemon.reconciler.restart_component(name)
        return web.json_response({"component": name, "desired": RUNNING})

    async def down(self, request: web.Request) -> web.Response:
        names = [record.name for record in self.daemon.store.components()]
        for name in names:
            self.daemon.store.set_desired(name, REMOVED)
        await self.daemon.reconciler.reconcile_once()
        self.daemon.events.publish("deployment.down", f"stopped and removed {len(names)} component(s)")
        return web.json_response({"removed": names})

    async def deploy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await _json_body(request)
        if body.get("abort"):
            record = self.daemon.deployer.abort(name)
            return web.json_response({"rollout": record.to_json()})
        spec = body.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise _HttpError(400, "spec must be a JSON object")
        settings = body.get("set") or []
        if not isinstance(settings, list) or not all(isinstance(item, str) for item in settings):
            raise _HttpError(400, "set must be a list of KEY=VALUE strings")
        record = self.daemon.deployer.deploy(name, spec, settings, str(body.get("trigger") or "osvm deploy"))
        return web.json_response({"rollout": record.to_json()})

    async def rollback(self, request: web.Request) -> web.Response:
        record = self.daemon.deployer.rollback(request.match_info["name"])
        return web.json_response({"rollout": record.to_json()})

    async def deployments(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._require_component(name)
        limit = _int_query(request, "limit") or 50
        return web.json_response(
            {"component": name, "rollouts": [record.to_json() for record in self.daemon.store.rollouts(name, limit)]}
        )

    async def rollout(self, request: web.Request) -> web.Response:
        try:
            rollout_id = int(request.match_info["id"])
        except ValueError:
            raise _HttpError(400, f"rollout id {request.match_info['id']!r} is not a number") from None
        record = self.daemon.store.rollout(rollout_id)
        if record is None:
            raise _HttpError(404, f"rollout {rollout_id} not found: run `osvm deployments COMPONENT` to list them")
        return web.json_response({"rollout": record.to_json()})

    async def policy_check(self, request: web.Request) -> web.Response:
        source = request.query.get("from", "")
        destination = request.query.get("to", "")
        port = request.query.get("port", "")
        if not (source and destination and port):
            raise _HttpError(400, "give from, to and port, such as from=indexer&to=rpc&port=rpc")
        components = {record.name for record in self.daemon.store.components()}
        for role, name in (("source", source), ("destination", destination)):
            if name not in components:
                raise _HttpError(404, f"{role} component {name!r} not found (known: {', '.join(sorted(components)) or 'none'})")
        decision = self.daemon.reconciler.policy.decide(source, destination, port)
        return web.json_response(
            {"from": source, "to": destination, "port": port, "allowed": decision.allowed, "kind": decision.kind, "rule": decision.rule}
        )

    # --- certificate authority ---------------------------------------------------------------

    async def ca_init(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        root_out = body.get("root_out")
        ca = await asyncio.to_thread(
            self.daemon.certificates.init,
            str(body.get("trust_domain") or "osvm.local"),
            str(body.get("key_type") or "ecdsa-p256"),
            Path(root_out) if root_out else None,
        )
        return web.json_response(_ca_summary(ca))

    async def ca_list(self, request: web.Request) -> web.Response:
        ca = self._ca()
        component = request.query.get("component")
        records = await asyncio.to_thread(ca.list, component)
        return web.json_response({**_ca_summary(ca), "certificates": [_certificate_json(record) for record in records]})

    async def ca_show(self, request: web.Request) -> web.Response:
        details = await asyncio.to_thread(self._ca().show, request.match_info["serial"])
        return web.json_response({**_certificate_json(details.record), "pem": details.cert_pem.decode()})

    async def ca_revoke(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ca = self._ca()
        reason = str(body.get("reason") or "unspecified")
        if body.get("component"):
            serials = await asyncio.to_thread(ca.revoke_component, str(body["component"]), reason)
        elif body.get("serial"):
            record = await asyncio.to_thread(ca.revoke, str(body["serial"]), reason)
            serials = [record.serial]
        else:
            raise _HttpError(400, "give serial or component to revoke")
        self.daemon.events.publish("certificate.revoked", f"revoked {', '.join(serials) or 'nothing'} ({reason})", str(body.get("component") or ""))
        return web.json_response({"revoked": serials})

    async def ca_rotate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        root_key = body.get("root_key")
        serial = await asyncio.to_thread(self._ca().rotate, Path(root_key) if root_key else None)
        self.daemon.events.publish("ca.rotated", f"new intermediate {serial}")
        return web.json_response({"intermediate": serial})

    async def ca_renew(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = str(body.get("component") or "")
        self._require_component(name)
        self._ca()
        instances = self.daemon.reconciler.renew_certificates(name)
        return web.json_response({"component": name, "instances": instances})

    async def ca_crl(self, request: web.Request) -> web.Response:
        crl = await asyncio.to_thread(self._ca().crl_pem)
        return web.Response(body=crl, headers={"Content-Type": "application/x-pem-file"})

    def _ca(self) -> Any:
        ca = self.daemon.certificates.ca
        if ca is None:
            raise _HttpError(404, "this daemon has no CA yet: create one with `osvm ca init`")
        return ca

    async def revisions(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._require_component(name)
        return web.json_response({"component": name, "revisions": self.daemon.store.revisions(name)})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        instance_id = request.query.get("instance")
        instances = self.daemon.store.instances(name, limit=1000)
        if instance_id:
            instances = [record for record in instances if record.id == instance_id]
        if not instances:
            raise _HttpError(404, f"no instance of component {name!r} found: run `osvm status` to list components")
        record = instances[0]
        path = paths.output_log(self.daemon.state_dir, record.id)
        since = _float_query(request, "since")
        tail = _int_query(request, "tail")
        data, offset = await asyncio.to_thread(read_logs, path, since, tail)

        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "X-Osvm-Instance": record.id})
        await response.prepare(request)
        try:
            await response.write(data)
            if request.query.get("follow") in ("1", "true"):
                async with self._following():
                    async for chunk in follow_log(path, offset):
                        await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client stopped following (Ctrl-C on `osvm logs -f`): a normal end of the stream.
            pass
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        after = _int_query(request, "after") or 0
        since = _float_query(request, "since")
        component = request.query.get("component")
        limit = _int_query(request, "limit") or 1000
        follow = request.query.get("follow") in ("1", "true")
        queue = self.daemon.events.follow() if follow else None
        try:
            past = self.daemon.store.events(after, since, component, limit)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            last_id = after
            try:
                for event in past:
                    await response.write(_ndjson(event.to_json()))
                    last_id = event.id
                if queue is not None:
                    async with self._following():
                        while True:
                            event = await queue.get()
                            if event.id <= last_id or (component and event.component != component):
                                continue
                            await response.write(_ndjson(event.to_json()))
                    # stop() ended the follow: send the events published before it, such as daemon.stopping.
                    while not queue.empty():
                        event = queue.get_nowait()
                        if event.id > last_id and (not component or event.component == component):
                            await response.write(_ndjson(event.to_json()))
                await response.write_eof()
            except ConnectionError:
                # The client stopped following (Ctrl-C on `osvm events -f`): a normal end of the stream.
                pass
            return response
        finally:
            if queue is not None:
                self.daemon.events.unfollow(queue)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.daemon.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def shutdown(self, request: web.Request) -> web.Response:
        # Read the body first: aiohttp's graceful stop otherwise waits up to its lingering time
        # (10 s) for the unread body of this request, which can arrive after the stop began.
        await request.read()
        self.daemon.request_shutdown("shutdown requested through the API")
        return web.json_response({"shutting_down": True})

    async def restart(self, request: web.Request) -> web.Response:
        body = await _json_body(request) if await request.read() else {}
        force = body.get("force") is True
        drain_timeout = body.get("drain_timeout", RESTART_DRAIN_TIMEOUT)
        if not isinstance(drain_timeout, (int, float)) or not 0 < drain_timeout <= MAX_RESTART_DRAIN_TIMEOUT:
            raise _HttpError(400, f"invalid drain_timeout {drain_timeout!r}: give seconds above 0 and at most {MAX_RESTART_DRAIN_TIMEOUT:g}")
        problem = await check_installed_code()
        if problem:
            raise _HttpError(
                500,
                f"the daemon keeps running, because the installed osvm does not start: {problem}: "
                f"fix the installation, then restart again",
            )
        # Checked after the import check, with no await before the restart, so no rollout starts in between.
        rollouts = self.daemon.deployer.describe_running()
        if rollouts and not force:
            raise _HttpError(
                409,
                f"{'; '.join(rollouts)} in progress, which a restart rolls back: wait for it to end, or restart with --force",
            )
        self.daemon.request_restart_rolling_back("restart requested through the API", float(drain_timeout))
        return web.json_response({"restarting": True, "started_at": self.daemon.started_at, "pid": os.getpid()})

    # --- helpers -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _following(self) -> AsyncIterator[None]:
        """Register the handler as a follower, and end its stream without an error when stop() cancels it."""
        task = asyncio.current_task()
        self._followers.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Cancelled by stop(): the handler goes on to end the stream.
            task.uncancel()
        finally:
            self._followers.discard(task)

    def _require_component(self, name: str) -> None:
        if self.daemon.store.component(name) is None:
            known = ", ".join(record.name for record in self.daemon.store.components()) or "none"
            raise _HttpError(404, f"component {name!r} not found (known: {known})")

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except _HttpError as error:
            return error_response(error.status, error.message)
        except ApplyError as error:
            return error_response(422, str(error))
        except DeployError as error:
            return error_response(error.status, str(error))
        except CAExistsError as error:
            return error_response(409, str(error))
        except (CertificateNotFound,) as error:
            return error_response(404, str(error))
        except (CAError, ValueError) as error:
            return error_response(422, str(error))
        except web.HTTPException:
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 - every failure reaches the client in the error shape.
            logger.exception("request %s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {error}")


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as error:
        raise _HttpError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise _HttpError(400, "request body must be a JSON object")
    return body


def _float_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise _HttpError(400, f"query parameter {name}={value!r} is not a number") from None


def _int_query(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _HttpError(400, f"query parameter {name}={value!r} is not a whole number") from None


def _ca_summary(ca: Any) -> dict[str, Any]:
    return {
        "trust_domain": ca.trust_domain,
        "key_type": ca.key_type,
        "directory": str(ca.directory),
        "root_key_online": ca.root_key_online,
        "root_not_after": ca.root_certificate.not_valid_after_utc.isoformat(),
        "intermediate_not_after": ca.intermediate_certificate.not_valid_after_utc.isoformat(),
    }


def _certificate_json(record: Any) -> dict[str, Any]:
    return {
        "serial": record.serial,
        "component": record.component,
        "instance": record.instance_id,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "reason": record.reason,
    }


def _ndjson(value: dict[str, Any]) -> bytes:
    return (json.dumps(value) + "\n").encode()
