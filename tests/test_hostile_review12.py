"""Hostile review of issue 12: ``emu state show/diff``, the pytest plugin, ``emu bench
debate`` and progress, attacked as their users and hostile files would.

Each test is a defect found in review (it failed before its fix): snapshot strings that
drove the terminal, ``emu state diff`` calling different files the same, a FIFO that hung
``emu state show``, marker and param mistakes that went unnoticed or ended in an
unrelated error, a vsock socket path too long under a long --basetemp, guest helpers that
outlived a SIGKILLed reaper, a bad ``--out`` found only after the whole run, conclusions
whose words did not follow from the figures, and debate progress that ignored
``--progress``/``--no-progress``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.state import parts
from emu.state.file import load, save
from emu.state.format import DeviceState, Part, StateError

GOLDEN = Path(__file__).parent / "golden" / "v1"
ROOT = Path(__file__).resolve().parents[1]
#: what a hostile file puts in its strings: set the window title, clear the screen, CSI
ESC = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x9b1m"


def _edit(case: str, out: Path, device=None, transport=None, extra: list[Part] = ()) -> Path:
    """A golden state with its device part and/or TRANSPORT part's JSON replaced by
    ``device(value)`` / ``transport(value)`` (bytes: that JSON text as it is): a valid
    container (checksum and all)."""
    state = load(GOLDEN / f"{case}.state")
    new = []
    for p in state.parts:
        edit = device if parts.is_device_part(p.type) else None
        edit = transport if p.type == parts.TRANSPORT else edit
        if edit is not None:
            value = edit(json.loads(p.value[4:]))
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            p = Part(p.type, p.value[:4] + raw, p.selector, p.flags)
        new.append(p)
    save(out, DeviceState(state.device_type, [*new, *extra], state.flags))
    return out


def _set(**fields):
    def edit(value: dict) -> dict:
        return {**value, **fields}

    return edit


def _cli(*args: str):
    """``emu ARGS`` as on a terminal: click keeps escape sequences when color is on."""
    return CliRunner().invoke(main, list(args), color=True)


def _controls(text: str) -> list[str]:
    """Characters a terminal acts on (C0 but newline, DEL, C1) or that reorder text."""
    return sorted({c for c in text if c != "\n" and not c.isprintable()})


# -- emu state show / diff --


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Path]:
    def conn(d: dict) -> dict:
        d["dropped"][0].update(type="\x1b[2J\x1b[H", state="\x1b]0;x\x07")
        return d

    return {
        "transport": _edit(
            "blk-split", tmp_path / "t.state", transport=_set(transport=ESC, version=ESC)
        ),
        "transport key": _edit("blk-split", tmp_path / "k.state", transport=_set(**{ESC: 1})),
        "mac": _edit("net-split", tmp_path / "m.state", device=_set(mac="\x1b[2J\x1b[H")),
        "vsock conn": _edit("vsock-split", tmp_path / "v.state", device=conn),
        "fs replied key": _edit(
            "fs-split", tmp_path / "f.state", device=_set(replied={ESC: [[1, 2]]})
        ),
        "fs dir": _edit(
            "fs-split", tmp_path / "d.state", device=_set(dir={ESC: ESC, "nodes": [{ESC: 1}]})
        ),
    }


@pytest.mark.parametrize("mode", [(), ("--breakdown",), ("--json",)], ids=["summary", "bd", "json"])
def test_state_show_never_emits_terminal_controls(hostile: dict[str, Path], mode: tuple) -> None:
    for what, path in hostile.items():
        r = _cli("state", "show", *mode, str(path))
        assert r.exit_code == 0, (what, r.output)
        assert _controls(r.output) == [], (what, r.output)


def test_state_diff_never_emits_terminal_controls(hostile: dict[str, Path]) -> None:
    for what, path in hostile.items():
        case = {"mac": "net", "vsock conn": "vsock"}.get(what, "fs" if "fs" in what else "blk")
        r = _cli("state", "diff", str(GOLDEN / f"{case}-split.state"), str(path))
        assert r.exit_code == 1, (what, r.output)
        assert _controls(r.output) == [], (what, r.output)


def test_state_show_summary_stays_short_with_huge_strings(tmp_path: Path) -> None:
    """A 64 KiB port name (the schema allows it) or a 4 KiB socket path is cut: the
    summary is a screenful, not the file."""

    def name(d: dict) -> dict:
        d["ports"][1]["name"] = "n" * 65000
        return d

    console = _edit("console-split", tmp_path / "c.state", device=name)
    vsock = _edit("vsock-split", tmp_path / "v.state", device=_set(uds="u" * 4000))
    for path in (console, vsock):
        r = _cli("state", "show", str(path))
        assert r.exit_code == 0, r.output
        assert len(r.output) < 4000, len(r.output)


@pytest.mark.parametrize(
    "a, b",
    [
        # two JSON paths that flattened to the same "a.b": the second hid the first
        ('{"a.b": 1, "a": {"b": 2}}', '{"a.b": 2, "a": {"b": 2}}'),
        # true and 1.00 are different JSON of the same length; Python calls them equal
        ('{"k": true}', '{"k": 1.00}'),
    ],
)
def test_state_diff_sees_every_difference_in_json(tmp_path: Path, a: str, b: str) -> None:
    files = []
    for name, text in (("a", a), ("b", b)):
        files.append(
            _edit("blk-split", tmp_path / f"{name}.state", transport=lambda _, t=text: t.encode())
        )
    assert files[0].read_bytes() != files[1].read_bytes()
    r = _cli("state", "diff", *map(str, files))
    assert r.exit_code == 1, r.output


def test_state_with_duplicate_parts_is_refused_not_half_shown(tmp_path: Path) -> None:
    """A restore refuses two parts of one kind; show and diff used the last and ignored
    the first, so two files differing there compared the same."""
    files = []
    for capacity in (1, 2):
        state = load(GOLDEN / "blk-split.state")
        own = next(p for p in state.parts if parts.is_device_part(p.type))
        value = {**json.loads(own.value[4:]), "capacity": capacity}
        first = Part(own.type, own.value[:4] + json.dumps(value).encode(), own.selector)
        path = tmp_path / f"{capacity}.state"
        save(path, DeviceState(state.device_type, [first, *state.parts], state.flags))
        files.append(path)
    r = _cli("state", "diff", *map(str, files))
    assert r.exit_code == 2, r.output
    assert "two DEVICE_2 parts" in r.output
    r = _cli("state", "show", str(files[0]))
    assert r.exit_code == 1 and "two DEVICE_2 parts" in r.output, r.output


def test_state_load_of_a_fifo_without_writer_does_not_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``emu state show FIFO`` with nobody writing blocked in open() for ever."""
    from emu.state import file

    monkeypatch.setattr(file, "PIPE_WAIT", 0.5)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[BaseException] = []

    def show() -> None:
        try:
            file.load(fifo)
        except BaseException as e:  # noqa: BLE001 (the test reports what it was)
            got.append(e)

    reader = threading.Thread(target=show, daemon=True)  # a hang must not hold pytest
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "load() of a FIFO without a writer hangs"
    assert len(got) == 1 and isinstance(got[0], StateError), got
    assert "without a writer" in str(got[0])


def test_state_show_reads_a_pipe_with_a_writer() -> None:
    """What the FIFO fix must keep: ``emu state show <(cat FILE)``, a pipe as /dev/fd/N
    whose writer starts late."""
    data = (GOLDEN / "blk-split.state").read_bytes()
    r, w = os.pipe()

    def write() -> None:
        time.sleep(1)
        with open(w, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys; from emu.cli import main; sys.argv[0] = 'emu'; main()"
    try:
        p = subprocess.run(
            [sys.executable, "-c", code, "state", "show", f"/dev/fd/{r}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            pass_fds=[r],
        )
    finally:
        writer.join(10)
        os.close(r)
    assert p.returncode == 0 and p.stdout.startswith("blk device"), p.stderr


# -- the pytest plugin --


def test_guest_marker_positional_kind_with_keywords_is_not_dropped() -> None:
    from emu.testing.guest_session import GuestParam
    from emu.testing.pytest_plugin import _marker_spec

    mark = pytest.mark.emu_guest("microvm", blk="qemu").mark
    assert GuestParam.parse(_marker_spec(mark)) == GuestParam("microvm", "qemu")
    with pytest.raises(ValueError, match="one"):
        _marker_spec(pytest.mark.emu_guest("uml", "microvm").mark)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(extra="rng"), "list"),
        (dict(disk_mib=-1), "disk_mib"),
        (dict(disk_mib="16"), "disk_mib"),
        (dict(mem_mib=0), "mem_mib"),
        (dict(mem_mib=True), "mem_mib"),
    ],
)
def test_guest_param_mistakes_are_named(fields: dict, words: str) -> None:
    from emu.testing.guest_session import GuestParam

    with pytest.raises(ValueError, match=words):
        GuestParam(**fields)


def test_device_param_of_a_wrong_type_is_named() -> None:
    from emu.testing.device_param import DeviceParam

    with pytest.raises(TypeError, match="device param 5"):
        DeviceParam.parse(5)  # type: ignore[arg-type]


def test_emu_device_vsock_under_a_long_workdir(tmp_path: Path) -> None:
    """pytest's tmp_path under a long --basetemp: the host socket path must still bind
    (AF_UNIX paths hold 107 bytes)."""
    from emu.testing.device_param import open_device

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with open_device("vsock", deep) as dev:
        assert Path(dev.host).exists()
        host = Path(dev.host)
    assert not host.exists()


def test_guest_helpers_do_not_outlive_a_sigkilled_reaper(tmp_path: Path) -> None:
    """``emu_guest.pid`` is the reaper; a test that kills it (a guest "crash") with
    SIGKILL used to leave UML behind for good: UML calls setsid() and forks helpers, which
    only the reaper could find. ``stop`` must still end them."""
    from emu.guest.proc import start, stop

    pidfile = tmp_path / "helper.pid"
    like_uml = textwrap.dedent(
        f"""
        import os, time
        os.setsid()
        if os.fork() == 0:
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            time.sleep(600)
            os._exit(0)
        time.sleep(600)
        """
    )
    proc = start([sys.executable, "-c", like_uml])
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the helper did not start"
        time.sleep(0.05)
    helper = int(pidfile.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    stop(proc)
    deadline = time.monotonic() + 10
    while _alive(helper):
        if time.monotonic() > deadline:
            os.kill(helper, signal.SIGKILL)
            pytest.fail("the guest's helper outlived its reaper and stop()")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- emu bench debate --


def test_debate_refuses_an_unusable_out_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emu.debate import report
    from emu.testing import nbdkit

    ran = []
    monkeypatch.setattr(report, "collect", lambda quick: ran.append(quick) or {})
    monkeypatch.setattr(nbdkit, "nbdkit_missing", lambda: None)
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = CliRunner().invoke(main, ["bench", "debate", "--quick", "--out", str(afile / "sub")])
    assert r.exit_code != 0 and ran == [], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "sub" in r.output


def _by_depth(p50: dict[tuple[str, str], tuple[float, float]]) -> list[dict]:
    rows = []
    for (iface, policy), (at0, at128) in p50.items():
        for depth, value in ((0, at0), (128, at128)):
            rows.append(
                dict(interface=iface, policy=policy, depth=depth, p50_us=value, backend="nbd1ms")
            )
    return rows


def _stops(seq: float, together: float) -> dict:
    p50 = {
        ("stop-bit", "report"): (10, 100),
        ("stop-bit", "drain"): (10, 3000),
        ("vmm", "report"): (10, 100),
        ("vmm", "drain"): (10, 3000),
        ("vhost-user", "report"): (10, 500),
        ("vhost-user", "drain"): (10, 4000),
        ("suspend", "drain"): (10, 3000),
    }
    many = []
    for policy in ("drain", "report"):
        for order, value in (("one after another", seq), ("all at once", together)):
            many.append(dict(policy=policy, order=order, p50_us=value, devices=4, depth=32))
    return dict(by_depth=_by_depth(p50), many_devices=many)


def test_debate_many_devices_says_which_order_was_faster() -> None:
    """All at once 3 times slower than one after another is not "about as much"."""
    from emu.debate import conclude

    lines = [x for x in conclude.stops(_stops(seq=100, together=300)) if "devices with" in x]
    assert lines and all("about as much" not in x for x in lines), lines


def _policies(read_drain: float, write_report: float, write_drain: float, lo_drain: float) -> dict:
    rows = []
    for backend, latency in (("tmpfs", 0.0), ("nbd0ms", 0.0), ("nbd10ms", 10.0)):
        for op in ("read", "write"):
            for policy in ("report", "drain"):
                value = 100.0
                if backend == "nbd10ms":
                    value = {
                        ("read", "drain"): read_drain,
                        ("write", "report"): write_report,
                        ("write", "drain"): write_drain,
                    }.get((op, policy), 100.0)
                if backend == "nbd0ms" and (op, policy) == ("read", "drain"):
                    value = lo_drain
                rows.append(
                    dict(
                        backend=backend,
                        latency_ms=latency,
                        op=op,
                        policy=policy,
                        interface="vmm",
                        p50_us=value,
                    )
                )
    fence = [dict(backend="nbd10ms", interface="vmm", fence_us=write_report - 100.0)]
    down = [
        dict(backend="nbd10ms", interface="vmm", op=op, drain_us=1.0, report_us=1.0)
        for op in ("read", "write")
    ]
    cost = dict(save_us=1.0, restore_us=1.0, bytes=700)
    return dict(stops=rows, fence=fence, downtime=down, state_cost=cost)


def test_debate_write_conclusion_does_not_call_a_loss_saved() -> None:
    from emu.debate import conclude

    text = " ".join(conclude.policies(_policies(5000, 20000, 10000, 1000)))
    assert "saved -" not in text, text
    assert "report saved" not in text, text


def test_debate_latency_conclusion_does_not_say_grew_when_it_shrank() -> None:
    from emu.debate import conclude

    text = " ".join(conclude.policies(_policies(500, 10000, 10000, 5000)))
    assert "grew" not in text, text


# -- progress --


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_debate_progress_obeys_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """``emu --no-progress bench debate`` on a terminal: no bar (EMU_PROGRESS=0)."""
    from emu.progress import steps

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("EMU_PROGRESS", "0")
    assert list(steps([1, 2, 3], "label", str)) == [1, 2, 3]
    assert tty.getvalue() == ""


def test_debate_progress_obeys_progress_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """``emu --progress bench debate 2>log``: progress lines in the log, as other long
    work gives them."""
    from emu.progress import steps

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv("EMU_PROGRESS", "1")
    assert list(steps([1, 2], "the label")) == [1, 2]
    assert "the label" in log.getvalue()


# -- emu_guest's run(), against its guest shell run by the host's sh --


@pytest.fixture
def console(tmp_path: Path):
    """emu.testing.guest_shell's loop as the guest runs it, here in the host's sh (its
    /tmp and /root moved into tmp_path), behind the Console that ``emu_guest.run`` uses."""
    import re

    from emu.testing.guest_shell import SHELL, Console

    script = SHELL.replace("/tmp/", f"{tmp_path}/").replace("cd /root", f"cd {tmp_path}")
    sh = subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert sh.stdin is not None and sh.stdout is not None
    con = Console(sh.stdin, sh.stdout)
    try:
        con.wait_for(re.compile("EMU-SHELL-READY"), 0, 10)
        yield con
    finally:
        sh.kill()
        sh.wait()
        con.close()


def test_guest_run_does_not_keep_a_copy_of_each_output(console) -> None:
    """Every output's base64 lines stayed in the console's lines for the guest's life: a
    test running chatty commands held 1.5 times their output, each time."""
    rc, out = console.run("head -c 2000000 /dev/zero | tr '\\0' x", 60)
    assert (rc, len(out)) == (0, 2_000_000)
    assert sum(len(line) for line in console.lines) < 10_000
    assert console.run("echo after", 10) == (0, "after\n")


def test_guest_run_after_a_timeout_says_the_shell_is_busy(console) -> None:
    from emu.testing.guest_shell import GuestError

    with pytest.raises(GuestError):
        console.run("sleep 3", 0.5)
    with pytest.raises(GuestError, match="command 1, which timed out before, may still be"):
        console.run("echo next", 0.5)
    assert console.run("echo later", 10) == (0, "later\n")  # queued behind it, as before
