"""The sandbox command line: what is private, what stays visible."""

from pathlib import Path

from osvm.runtimes.sandbox import SandboxUser, _paths_under_private_dirs, build_sandbox_argv

USER = SandboxUser("osvm", 999, 999)


def test_program_under_tmp_stays_visible(tmp_path: Path) -> None:
    checkout = Path("/tmp") / tmp_path.relative_to("/tmp").parts[0]
    program = tmp_path / "bin" / "node"
    program.parent.mkdir()
    program.write_text("")
    assert tmp_path.is_relative_to("/tmp")

    shown = _paths_under_private_dirs([str(program), "--port", "1"], None)

    assert shown == [checkout]


def test_script_argument_under_tmp_stays_visible(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text("")

    shown = _paths_under_private_dirs(["/usr/bin/python3", str(script)], None)

    assert shown == [Path("/tmp") / tmp_path.relative_to("/tmp").parts[0]]


def test_data_arguments_stay_hidden(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text("{}")

    shown = _paths_under_private_dirs(["/usr/bin/python3", "-c", "print(1)", str(data)], None)

    assert shown == []


def test_state_dir_hidden_inside_bound_tree(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text("")
    state_dir = tmp_path / "state"

    argv = build_sandbox_argv(
        ["/usr/bin/python3", str(script)],
        hostname="x",
        user=USER,
        data_dir=state_dir / "data" / "x-1-abc",
        workdir=None,
        hidden_dirs=[state_dir],
        procs_files=[],
        netns_path=None,
        open_files=None,
    )

    top = str(Path("/tmp") / tmp_path.relative_to("/tmp").parts[0])
    bind = argv.index(top)
    hide = argv.index(str(state_dir))
    assert argv[bind - 1] == "--ro-bind"
    assert argv[hide - 1] == "--tmpfs"
    assert bind < hide


def test_missing_or_system_paths_add_nothing() -> None:
    assert _paths_under_private_dirs(["/usr/bin/python3", "/tmp/does-not-exist-osvm"], "/tmp") == []


def test_sandbox_binds_visible_path_after_private_tmp(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text("")
    data_dir = Path("/var/lib/osvm/data/x-1-abc")

    argv = build_sandbox_argv(
        ["/usr/bin/python3", str(script)],
        hostname="x",
        user=USER,
        data_dir=data_dir,
        workdir=None,
        hidden_dirs=[Path("/var/lib/osvm")],
        procs_files=[],
        netns_path=None,
        open_files=None,
    )

    top = str(Path("/tmp") / tmp_path.relative_to("/tmp").parts[0])
    private_tmp = argv.index("/tmp")
    bind = argv.index("--ro-bind", argv.index("--ro-bind") + 1)
    assert argv[bind + 1] == top
    assert bind > private_tmp
    assert argv[-2:] == ["/usr/bin/python3", str(script)]


def test_sandbox_drops_privileges_last() -> None:
    argv = build_sandbox_argv(
        ["/bin/true"],
        hostname="x",
        user=USER,
        data_dir=Path("/var/lib/osvm/data/x-1-abc"),
        workdir=None,
        hidden_dirs=[Path("/var/lib/osvm")],
        procs_files=[Path("/sys/fs/cgroup/pids/osvm/x-1-abc/cgroup.procs")],
        netns_path="/run/netns/osvm-x-1-abc",
        open_files=1024,
    )

    assert argv.index("nsenter") < argv.index("prlimit") < argv.index("bwrap") < argv.index("setpriv")
    assert "--nofile=1024:1024" in argv
    assert "--no-new-privs" in argv
    assert "--reuid=999" in argv
