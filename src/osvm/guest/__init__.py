"""The guest agent that runs as PID 1 in a microVM, built from agent.c at image build time."""

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

AGENT_SOURCE = Path(__file__).with_name("agent.c")
COMPILE_FLAGS = ("-static", "-O2", "-s", "-Wall")


class AgentBuildError(Exception):
    """The agent could not be compiled; the message contains the compiler's error."""


def agent_digest() -> str:
    """Return the sha256 of the agent's source and compiler flags, which names the compiled agent."""
    digest = hashlib.sha256(AGENT_SOURCE.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    return digest.hexdigest()


def build_agent(cache_dir: Path) -> Path:
    """Compile the agent with `gcc -static` into cache_dir/agents/<digest>/osvm-agent, once per source.

    Raises AgentBuildError when gcc is missing or the static glibc (libc6-dev) is not installed.
    """
    target = cache_dir / "agents" / agent_digest() / "osvm-agent"
    if target.exists():
        return target
    compiler = shutil.which("gcc")
    if compiler is None:
        raise AgentBuildError("building the guest agent needs gcc: install the Debian packages gcc and libc6-dev")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        output = Path(scratch) / "osvm-agent"
        result = subprocess.run(
            [compiler, *COMPILE_FLAGS, "-o", str(output), str(AGENT_SOURCE)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise AgentBuildError(f"gcc failed to build the guest agent:\n{result.stderr.strip()}")
        output.rename(target)
    return target
