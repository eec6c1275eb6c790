"""Certificates for instances: issue at creation, renew at two-thirds of the lifetime, revoke at the end.

Every instance gets a leaf from the internal CA with the identity spiffe://<trust-domain>/component/<name>.
Its files live in <data dir>/tls, owned by the instance's user, and the instance finds them through
OSVM_TLS_CERT, OSVM_TLS_KEY and OSVM_TLS_CA.
"""

import asyncio
import datetime as dt
import logging
import os
import pwd
import random
import ssl
from pathlib import Path
from typing import Awaitable, Callable

from osvm.config.models import Component
from osvm.security.ca import CAError, CertificateAuthority, IssuedCertificate
from osvm.security.instance_certs import renewal_delay, write_instance_files
from osvm.store.events import EventBus

logger = logging.getLogger("osvm.reconcile.certificates")

DEFAULT_LIFETIME = 86400.0
TLS_DIR = "tls"
# A failed renewal is retried after this long, well inside the last third of the lifetime.
RENEWAL_RETRY = 30.0

# Called after the files are swapped. It returns a description of the reload that was done.
ReloadCallback = Callable[[], Awaitable[str]]


class CertificateManager:
    """Own the CA of a state directory and the certificates of its instances."""

    def __init__(self, ca_dir: Path, events: EventBus):
        self.ca_dir = ca_dir
        self.events = events
        self.ca: CertificateAuthority | None = None
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()

    # --- the CA ------------------------------------------------------------------------------

    def open(self) -> None:
        """Load the CA when the state directory has one."""
        if (self.ca_dir / "ca.json").exists():
            self.ca = CertificateAuthority.load(self.ca_dir)
            logger.info("loaded CA for trust domain %s from %s", self.ca.trust_domain, self.ca_dir)

    def init(self, trust_domain: str, key_type: str, root_out: Path | None) -> CertificateAuthority:
        """Create the CA; raises CAExistsError when there is one."""
        self.ca = CertificateAuthority.init(self.ca_dir, trust_domain, key_type, root_out)
        where = f"; the root key was written to {root_out} and is offline" if root_out else ""
        self.events.publish("ca.created", f"created a CA for trust domain {trust_domain} ({key_type}){where}")
        return self.ca

    def ensure(self) -> CertificateAuthority:
        """Return the CA, creating one with the defaults when there is none yet."""
        if self.ca is None:
            self.open()
        if self.ca is None:
            self.init("osvm.local", "ecdsa-p256", None)
        assert self.ca is not None
        return self.ca

    # --- instances ---------------------------------------------------------------------------

    def issue_for_instance(self, component: str, instance_id: str, spec: Component, data_dir: Path, user: str | None) -> dict[str, str]:
        """Issue the instance's certificate, write its files, and return the OSVM_TLS_* variables.

        Raises CAError or ValueError when the CA cannot issue, and KeyError when the user is unknown.
        """
        ca = self.ensure()
        issued = ca.issue(component, self._dns_names(component, spec), self._lifetime(spec), instance_id)
        env = self._write(issued, data_dir, user)
        self.events.publish(
            "certificate.issued",
            f"issued certificate {issued.serial} for {issued.identity.uri}, valid until {issued.not_after:%Y-%m-%d %H:%M:%S} UTC",
            component,
            instance_id,
        )
        return env

    def tls_env(self, data_dir: Path) -> dict[str, str]:
        """Return the OSVM_TLS_* variables for an instance whose files already exist."""
        directory = data_dir / TLS_DIR
        return {
            "OSVM_TLS_CERT": str(directory / "cert.pem"),
            "OSVM_TLS_KEY": str(directory / "key.pem"),
            "OSVM_TLS_CA": str(directory / "ca.pem"),
        }

    def schedule_renewal(
        self,
        component: str,
        instance_id: str,
        spec: Component,
        data_dir: Path,
        user: str | None,
        reload: ReloadCallback,
        now: bool = False,
    ) -> None:
        """Renew the instance's certificate at two-thirds of its lifetime, again and again, until cancelled.

        With `now`, the first renewal happens at once (`osvm ca renew`).
        """
        self.cancel_renewal(instance_id)
        self._renewals[instance_id] = asyncio.create_task(
            self._renew_loop(component, instance_id, spec, data_dir, user, reload, now), name=f"renew-{instance_id}"
        )

    def cancel_renewal(self, instance_id: str) -> None:
        task = self._renewals.pop(instance_id, None)
        if task is not None:
            task.cancel()

    def revoke_instance(self, component: str, instance_id: str) -> None:
        """Revoke every unexpired certificate of an instance that has ended."""
        self.cancel_renewal(instance_id)
        if self.ca is None:
            return
        now = dt.datetime.now(dt.timezone.utc)
        for record in self.ca.list(component):
            if record.instance_id == instance_id and not record.revoked and record.not_after > now:
                try:
                    self.ca.revoke(record.serial, "cessationOfOperation")
                except CAError as error:
                    logger.error("cannot revoke certificate %s of instance %s: %s", record.serial, instance_id, error)

    def endpoint_context(self, component: str, mutual: bool, endpoint_dir: Path) -> ssl.SSLContext:
        """Return a TLS server context for a component's endpoint, renewed like instance certificates.

        The endpoint presents a certificate with the component's identity and the DNS names
        `<component>` and `localhost`. With `mutual`, clients must present a certificate that
        chains to the CA root.
        """
        ca = self.ensure()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if mutual:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=ca.trust_bundle().decode())
        self._load_endpoint_certificate(component, context, endpoint_dir)
        key = f"endpoint:{component}"
        self.cancel_renewal(key)
        self._renewals[key] = asyncio.create_task(
            self._renew_endpoint_loop(component, context, endpoint_dir), name=f"renew-endpoint-{component}"
        )
        return context

    def _load_endpoint_certificate(self, component: str, context: ssl.SSLContext, endpoint_dir: Path) -> IssuedCertificate:
        ca = self.ensure()
        issued = ca.issue(component, [component, "localhost"], DEFAULT_LIFETIME, f"endpoint:{component}")
        endpoint_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_instance_files(endpoint_dir, issued, os.getuid(), os.getgid())
        context.load_cert_chain(str(endpoint_dir / "cert.pem"), str(endpoint_dir / "key.pem"))
        return issued

    async def _renew_endpoint_loop(self, component: str, context: ssl.SSLContext, endpoint_dir: Path) -> None:
        while True:
            current = self._latest(component, f"endpoint:{component}")
            delay = renewal_delay(current[0], current[1], self._rng) if current else RENEWAL_RETRY
            await asyncio.sleep(delay)
            try:
                issued = await asyncio.to_thread(self._load_endpoint_certificate, component, context, endpoint_dir)
            except (CAError, ValueError, OSError, ssl.SSLError) as error:
                self.events.publish(
                    "certificate.renewal_failed", f"endpoint certificate renewal failed: {error}", component, level=logging.ERROR
                )
                await asyncio.sleep(RENEWAL_RETRY)
                continue
            self.events.publish("certificate.renewed", f"endpoint certificate {issued.serial} loaded", component)

    async def shutdown(self) -> None:
        tasks = list(self._renewals.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._renewals.clear()

    # --- private helpers ---------------------------------------------------------------------

    async def _renew_loop(
        self,
        component: str,
        instance_id: str,
        spec: Component,
        data_dir: Path,
        user: str | None,
        reload: ReloadCallback,
        now: bool,
    ) -> None:
        while True:
            current = self._latest(component, instance_id)
            if current is None or now:
                delay = 0.0
            else:
                delay = renewal_delay(current[0], current[1], self._rng)
            now = False
            await asyncio.sleep(delay)
            try:
                ca = self.ensure()
                issued = await asyncio.to_thread(
                    ca.issue, component, self._dns_names(component, spec), self._lifetime(spec), instance_id
                )
                await asyncio.to_thread(self._write, issued, data_dir, user)
            except (CAError, ValueError, OSError, KeyError) as error:
                self.events.publish(
                    "certificate.renewal_failed",
                    f"renewal failed: {error}; retrying in {RENEWAL_RETRY:g} s",
                    component,
                    instance_id,
                    logging.ERROR,
                )
                await asyncio.sleep(RENEWAL_RETRY)
                continue
            # The superseded certificate is not revoked: peers that have not reloaded yet still use
            # it, and it expires at the end of its lifetime.
            detail = await reload()
            self.events.publish(
                "certificate.renewed",
                f"renewed: certificate {issued.serial} valid until {issued.not_after:%Y-%m-%d %H:%M:%S} UTC; {detail}",
                component,
                instance_id,
            )

    def _latest(self, component: str, instance_id: str) -> tuple[dt.datetime, dt.datetime] | None:
        if self.ca is None:
            return None
        records = [
            record for record in self.ca.list(component) if record.instance_id == instance_id and not record.revoked
        ]
        if not records:
            return None
        newest = max(records, key=lambda record: record.not_after)
        return newest.not_before, newest.not_after

    def _write(self, issued: IssuedCertificate, data_dir: Path, user: str | None) -> dict[str, str]:
        data_dir.mkdir(parents=True, exist_ok=True)
        if user is None:
            uid, gid = os.getuid(), os.getgid()
        else:
            entry = pwd.getpwnam(user)
            uid, gid = entry.pw_uid, entry.pw_gid
        return write_instance_files(data_dir / TLS_DIR, issued, uid, gid)

    @staticmethod
    def _dns_names(component: str, spec: Component) -> list[str]:
        names = [component]
        if spec.tls is not None:
            names += [name for name in spec.tls.dns_names if name not in names]
        return names

    @staticmethod
    def _lifetime(spec: Component) -> float:
        return spec.tls.lifetime if spec.tls is not None else DEFAULT_LIFETIME
