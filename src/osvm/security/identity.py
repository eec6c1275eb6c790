"""SPIFFE workload identities of components, and checks of the names that go into certificates.

A component's identity is the URI ``spiffe://<trust domain>/component/<name>``. It is the one URI
SAN of the component's certificate, and peers authorize on it rather than on DNS names.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

SPIFFE_SCHEME = "spiffe"
COMPONENT_PATH_PREFIX = "/component/"

# The component name pattern of the deployment file (osvm.config.models.NAME_PATTERN).
_COMPONENT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# One DNS label: letters, digits and hyphens, at most 63 characters, no hyphen at either end.
_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_DNS_NAME_LENGTH = 253


@dataclass(frozen=True)
class SpiffeId:
    """The SPIFFE ID of one component in one trust domain."""

    trust_domain: str
    component: str

    @property
    def uri(self) -> str:
        return f"{SPIFFE_SCHEME}://{self.trust_domain}{COMPONENT_PATH_PREFIX}{self.component}"

    def __str__(self) -> str:
        return self.uri


def _is_dns_name(name: str) -> bool:
    if not name or len(name) > _MAX_DNS_NAME_LENGTH:
        return False
    return all(_DNS_LABEL_RE.match(label) for label in name.split("."))


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain unchanged, or raise ValueError unless it is a lowercase DNS-like name."""
    if not isinstance(trust_domain, str) or not _is_dns_name(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: use a lowercase DNS-like name of letters, digits, "
            "hyphens and dots, such as \"osvm.local\""
        )
    return trust_domain


def validate_component_name(name: str) -> str:
    """Return the component name unchanged, or raise ValueError unless it matches the deployment file's names."""
    if not isinstance(name, str) or not _COMPONENT_NAME_RE.match(name):
        raise ValueError(
            f"invalid component name {name!r}: use 1 to 63 lowercase letters, digits and hyphens, "
            "starting with a letter"
        )
    return name


def normalize_dns_names(names: list[str]) -> list[str]:
    """Return the DNS names lowercased and without duplicates, in their order, or raise ValueError.

    IP addresses and wildcards are rejected because the certificate carries DNS SANs only.
    """
    normalized: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"invalid DNS name {name!r}: expected a string")
        lowered = name.strip().lower().rstrip(".")
        try:
            ipaddress.ip_address(lowered)
        except ValueError:
            pass
        else:
            raise ValueError(f"invalid DNS name {name!r}: IP addresses are not accepted as DNS SANs, use a host name")
        if not _is_dns_name(lowered):
            raise ValueError(
                f"invalid DNS name {name!r}: use labels of letters, digits and hyphens separated by dots, "
                "without wildcards"
            )
        if lowered not in normalized:
            normalized.append(lowered)
    return normalized


def parse_spiffe_id(uri: str, trust_domain: str) -> SpiffeId:
    """Parse a component's SPIFFE ID, raising ValueError with a readable reason unless it is one of trust_domain."""
    parts = urlsplit(uri)
    # Compare the raw prefix, because urlsplit lowercases the scheme and would accept "SPIFFE://".
    if not uri.startswith(f"{SPIFFE_SCHEME}://"):
        raise ValueError(f"URI SAN {uri} is not a spiffe:// identity")
    if parts.netloc != trust_domain:
        raise ValueError(f"identity {uri} is outside trust domain {trust_domain}")
    if parts.query or parts.fragment:
        raise ValueError(f"identity {uri} has a query or fragment, which SPIFFE IDs must not contain")
    component = parts.path.removeprefix(COMPONENT_PATH_PREFIX)
    if component == parts.path or not _COMPONENT_NAME_RE.match(component):
        raise ValueError(f"identity {uri} has path {parts.path or '(empty)'}, expected /component/<name>")
    return SpiffeId(trust_domain=trust_domain, component=component)
