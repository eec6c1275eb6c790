"""The `process` runtime: an instance is a host process in its own namespaces and cgroup.

As root, every instance runs in a bubblewrap sandbox (PID, mount, UTS and IPC namespaces, read-only
system directories, private /tmp) as an unprivileged user, inside a cgroup with its memory, CPU and
pids limits, optionally in its own network namespace. Without root, instances run as plain child
processes of the daemon, and the daemon warns that they are not isolated.
"""

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

from osvm.runtimes import procinfo
from osvm.runtimes.exitwatch import watch_exit
from osvm.runtimes.base import ExitStatus, LaunchPlan, ProcessHandle
from osvm.runtimes.network import NetworkSetupError, create_instance_network, remove_instance_network
from osvm.runtimes.cgroups import Cgroup, CgroupError, CgroupLimits, detect_layout, remove_parent
from osvm.runtimes.sandbox import STATUS_FD, SandboxError, build_sandbox_argv, find_user, missing_tools

logger = logging.getLogger("osvm.runtimes.process")

DEFAULT_USER = "osvm"
STATUS_FILE = "sandbox-status.json"

# How long stop() waits for the cgroup to empty after SIGKILL before it gives up and reports.
KILL_TIMEOUT = 10.0


class ProcessRuntimeError(Exception):
    """An instance could not be prepared, started or stopped. The message gives the reason and the fix."""


class ProcessRuntime:
    """Start, watch, stop and adopt host processes, isolated when the daemon runs as root."""

    name = "process"

    def __init__(self, state_dir: Path, isolation: bool | None = None):
        self.state_dir = state_dir
        if isolation is None:
            isolation = os.geteuid() == 0
        self.isolated = isolation
        self.cgroup_parent = cgroup_parent_for(state_dir)
        self.cgroup_layout = detect_layout() if isolation else None
        if isolation:
            missing = missing_tools()
            if missing:
                raise ProcessRuntimeError(
                    f"isolation needs {', '.join(missing)} on PATH: install the Debian packages "
                    f"bubblewrap and util-linux, or run the daemon without root to run without isolation"
                )
            if self.cgroup_layout is None:
                logger.warning("no usable cgroup hierarchy under /sys/fs/cgroup: memory, CPU and pids limits are off")
        else:
            logger.warning(
                "the daemon is not running as root, so components run WITHOUT isolation: no namespaces, "
                "no cgroup limits and no separate user. Run the daemon as root for isolation"
            )

    # --- public interface --------------------------------------------------------------------

    async def prepare(self, plan: LaunchPlan) -> None:
        """Create the instance's directories and its cgroup.

        Raises ProcessRuntimeError when the user is missing or the cgroup cannot be created.
        """
        plan.instance_dir.mkdir(parents=True, exist_ok=True)
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.isolated:
            return
        try:
            user = find_user(plan.spec.user or DEFAULT_USER)
        except SandboxError as error:
            raise ProcessRuntimeError(str(error)) from None
        os.chown(plan.data_dir, user.uid, user.gid)
        os.chmod(plan.data_dir, 0o750)
        if plan.netns_name is not None and plan.addressing is not None:
            await asyncio.to_thread(self._create_network, plan)
        if self.cgroup_layout is not None:
            resources = plan.spec.resources
            limits = CgroupLimits(memory=resources.memory, cpus=resources.cpus, pids=resources.pids)
            existing = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
            if existing is not None:
                existing.remove()
            try:
                Cgroup.create(plan.instance_id, limits, parent=self.cgroup_parent)
            except CgroupError as error:
                raise ProcessRuntimeError(f"cannot create the cgroup of instance {plan.instance_id}: {error}") from None

    async def start(self, plan: LaunchPlan) -> ProcessHandle:
        """Spawn the instance process and return its handle.

        Raises ProcessRuntimeError when the program cannot be started.
        """
        status_path = plan.instance_dir / STATUS_FILE
        status_path.unlink(missing_ok=True)
        log = open(plan.log_path, "ab", buffering=0)
        status_file = open(status_path, "wb") if self.isolated else None
        try:
            status_fd = status_file.fileno() if status_file is not None else None
            argv = self._full_argv(plan, status_fd)
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=plan.env,
                cwd=str(plan.data_dir) if self.isolated else (plan.spec.workdir or str(plan.data_dir)),
                start_new_session=True,
                pass_fds=(status_fd,) if status_fd is not None else (),
                close_fds=True,
            )
        except FileNotFoundError as error:
            raise ProcessRuntimeError(f"cannot start {plan.argv[0]!r}: {error.strerror}: check the command path") from None
        except PermissionError as error:
            raise ProcessRuntimeError(f"cannot start {plan.argv[0]!r}: {error.strerror}: check its permissions") from None
        finally:
            log.close()
            if status_file is not None:
                status_file.close()
        start_time = procinfo.start_time(process.pid) or 0
        handle = ProcessHandle(pid=process.pid, start_time=start_time)
        handle.extra["popen"] = process
        handle.extra["exited"] = watch_exit(process.pid)
        logger.info("started instance %s of %s: pid %d", plan.instance_id, plan.component, process.pid)
        return handle

    async def wait(self, handle: ProcessHandle, plan: LaunchPlan) -> ExitStatus:
        """Wait until the instance process exits, without polling, and return how it ended."""
        exited = handle.extra["exited"]
        assert isinstance(exited, asyncio.Future)
        await asyncio.shield(exited)

        popen = handle.extra.get("popen")
        code: int | None = None
        if isinstance(popen, subprocess.Popen):
            raw = popen.wait()
            code = raw if raw >= 0 else 128 - raw
        if self.isolated:
            reported = _read_sandbox_status(plan.instance_dir / STATUS_FILE).get("exit-code")
            if isinstance(reported, int):
                code = reported
        oom_killed = self._oom_kills(plan.instance_id) > int(handle.extra.get("oom_kills_at_start", 0))
        return ExitStatus(code=code, reason=_describe_exit(code, oom_killed), oom_killed=oom_killed)

    async def stop(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        """Send the stop signal, wait the grace period, then SIGKILL everything left.

        Returns once the instance process has exited and, when isolated, its cgroup is empty.
        """
        stop_signal = signal.Signals[plan.spec.stop_signal]
        target = self._signal_target(handle, plan)
        logger.info(
            "stopping instance %s of %s: %s to pid %d, grace %.1fs",
            plan.instance_id, plan.component, stop_signal.name, target, plan.spec.stop_grace_period,
        )
        _send_signal(target, stop_signal, group=not self.isolated)
        exited = await self._wait_gone(handle, plan.spec.stop_grace_period)
        if not exited:
            logger.warning(
                "instance %s of %s did not exit within %.1fs of %s: sending SIGKILL",
                plan.instance_id, plan.component, plan.spec.stop_grace_period, stop_signal.name,
            )
        # The cgroup kill loop sleeps between passes, so it runs in a thread, away from the endpoints.
        await asyncio.to_thread(self._kill_everything, handle, plan)
        await self._wait_gone(handle, KILL_TIMEOUT)

    def adopt(self, plan: LaunchPlan, pid: int, start_time: int) -> ProcessHandle | None:
        """Take over an instance process that a previous daemon started.

        Returns None when the pid is gone, was reused by another process, or is outside the
        instance's cgroup, so it cannot be trusted as that instance.
        """
        if not procinfo.is_alive(pid, start_time):
            return None
        if self.isolated and self.cgroup_layout is not None:
            cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
            if cgroup is None or not cgroup.contains(pid):
                logger.warning("pid %d is not in the cgroup of instance %s: not adopting it", pid, plan.instance_id)
                return None
        exited = watch_exit(pid)
        if exited.done():
            return None
        handle = ProcessHandle(pid=pid, start_time=start_time, adopted=True)
        handle.extra["exited"] = exited
        handle.extra["oom_kills_at_start"] = self._oom_kills(plan.instance_id)
        logger.info("adopted instance %s of %s: pid %d", plan.instance_id, plan.component, pid)
        return handle

    def send_signal(self, handle: ProcessHandle, plan: LaunchPlan, name: str) -> None:
        """Send a signal by name to the instance's command, such as SIGHUP after a certificate renewal."""
        _send_signal(self._signal_target(handle, plan), signal.Signals[name], group=not self.isolated)

    def exec_prefix(self, handle: ProcessHandle, plan: LaunchPlan) -> tuple[str, ...]:
        """Return the command prefix that runs a program inside the instance, for exec probes."""
        if not self.isolated:
            return ()
        target = self._signal_target(handle, plan)
        user = find_user(plan.spec.user or DEFAULT_USER)
        return (
            "nsenter", f"--target={target}", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
            "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--no-new-privs", "--",
        )

    async def cleanup(self, plan: LaunchPlan) -> None:
        """Kill whatever is left in the instance's cgroup, then remove the cgroup and network namespace."""
        if not self.isolated:
            return
        cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent) if self.cgroup_layout is not None else None
        if cgroup is not None:
            try:
                await asyncio.to_thread(cgroup.remove)
            except CgroupError as error:
                logger.error("cannot remove the cgroup of instance %s: %s", plan.instance_id, error)
        if plan.netns_name is not None:
            await asyncio.to_thread(remove_instance_network, plan.instance_id)

    def sweep_orphans(self, live_instance_ids: set[str]) -> list[str]:
        """Kill and remove cgroups of this state directory that belong to no live instance.

        Such cgroups are left when a daemon dies between creating a cgroup and recording its instance.
        """
        if not self.isolated or self.cgroup_layout is None:
            return []
        removed = []
        for name in Cgroup.list_names(parent=self.cgroup_parent):
            if name in live_instance_ids:
                continue
            cgroup = Cgroup.open(name, parent=self.cgroup_parent)
            if cgroup is None:
                continue
            try:
                cgroup.remove()
                removed.append(name)
            except CgroupError as error:
                logger.error("cannot remove orphan cgroup %s: %s", name, error)
        return removed

    def remove_cgroup_parent(self) -> None:
        """Remove this state directory's cgroup parent once no instance cgroup is left in it."""
        if self.isolated and self.cgroup_layout is not None:
            remove_parent(self.cgroup_parent)

    def record_start(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        handle.extra["oom_kills_at_start"] = self._oom_kills(plan.instance_id)

    # --- private helpers ---------------------------------------------------------------------

    def _create_network(self, plan: LaunchPlan) -> None:
        try:
            create_instance_network(plan)
        except NetworkSetupError as error:
            raise ProcessRuntimeError(str(error)) from None

    def _full_argv(self, plan: LaunchPlan, status_fd: int | None) -> list[str]:
        if not self.isolated:
            return plan.argv
        user = find_user(plan.spec.user or DEFAULT_USER)
        cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent) if self.cgroup_layout is not None else None
        return build_sandbox_argv(
            plan.argv,
            hostname=plan.component,
            user=user,
            data_dir=plan.data_dir,
            workdir=plan.spec.workdir,
            hidden_dirs=[self.state_dir],
            procs_files=cgroup.procs_files() if cgroup else [],
            netns_path=plan.netns_path,
            open_files=plan.spec.resources.open_files,
            status_fd=status_fd if status_fd is not None else STATUS_FD,
        )

    def _signal_target(self, handle: ProcessHandle, plan: LaunchPlan) -> int:
        if not self.isolated:
            return handle.pid
        # bwrap reports the pid of its init process in the new PID namespace. That init does not
        # forward signals, so the stop signal goes to the command, which is the init's only child.
        namespace_init = _read_sandbox_status(plan.instance_dir / STATUS_FILE).get("child-pid")
        if isinstance(namespace_init, int) and procinfo.is_alive(namespace_init):
            commands = procinfo.children(namespace_init)
            if commands:
                return min(commands)
            return namespace_init
        return handle.pid

    def _kill_everything(self, handle: ProcessHandle, plan: LaunchPlan) -> None:
        if self.isolated and self.cgroup_layout is not None:
            cgroup = Cgroup.open(plan.instance_id, parent=self.cgroup_parent)
            if cgroup is not None:
                try:
                    killed = cgroup.kill_all(KILL_TIMEOUT)
                    if killed:
                        logger.info("killed %d process(es) left in instance %s", killed, plan.instance_id)
                except CgroupError as error:
                    logger.error("cannot empty the cgroup of instance %s: %s", plan.instance_id, error)
                return
        _send_signal(handle.pid, signal.SIGKILL, group=True)

    async def _wait_gone(self, handle: ProcessHandle, timeout: float) -> bool:
        exited = handle.extra.get("exited")
        if not isinstance(exited, asyncio.Future):
            return not procinfo.is_alive(handle.pid, handle.start_time)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            return False
        return True

    def _oom_kills(self, instance_id: str) -> int:
        if not self.isolated or self.cgroup_layout is None:
            return 0
        cgroup = Cgroup.open(instance_id, parent=self.cgroup_parent)
        return cgroup.oom_kills() if cgroup else 0


def cgroup_parent_for(state_dir: Path) -> str:
    """Return the cgroup parent directory name for a state directory.

    Each state directory gets its own parent, so two daemons never touch each other's cgroups.
    """
    if state_dir == Path("/var/lib/osvm"):
        return "osvm"
    return "osvm-" + hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]


def _read_sandbox_status(path: Path) -> dict[str, object]:
    """Merge the JSON objects bwrap wrote to its status file (child pid first, exit code last)."""
    merged: dict[str, object] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return merged
    decoder = json.JSONDecoder()
    position = 0
    while position < len(text):
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            break
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        if isinstance(value, dict):
            merged.update(value)
    return merged


def _send_signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        logger.error("cannot send %s to pid %d: %s", sig.name, pid, error)


def _describe_exit(code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return "killed by the kernel OOM killer at the memory limit"
    if code is None:
        return "exited (status unknown: the process was adopted after a daemon restart)"
    if code == 0:
        return "exited with status 0"
    if code > 128 and code - 128 < signal.NSIG:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"killed by {name}"
    if code == 127:
        return "exited with status 127: the command was not found (check its path, and that the component's user can reach it)"
    if code == 126:
        return "exited with status 126: the command is not executable by the component's user"
    return f"exited with status {code}"
