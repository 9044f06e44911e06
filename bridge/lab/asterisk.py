"""A real Asterisk for tests and the demo: one throwaway instance in the chroot that
`scripts/install-asterisk.sh` builds (Debian sid's Asterisk 22 needs a newer libc than the host).

Synchronous and subprocess-based so pytest session fixtures and a demo CLI can both use it.
Each instance gets its own directories and loopback ports, so several can run side by side.
Facts behind the details: docs/asterisk-ari-notes.md.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_ROOT = Path("/var/lib/callbridge/asterisk-root")
LAB_DIR_IN_ROOT = "/var/lib/callbridge-lab"  # instance dirs, as seen inside the chroot
APP_NAME = "callbridge"
_PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")


class LabUnavailable(RuntimeError):
    """The Asterisk chroot is not installed (or not usable) on this machine."""


class LabError(RuntimeError):
    """The lab Asterisk failed to start or to answer."""


def default_dialplan_dir() -> Path:
    """The repo's `dialplan/` next to the `bridge` package (editable install or checkout)."""
    return Path(__file__).resolve().parents[2] / "dialplan"


def free_port(
    kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1", avoid: set[int] | None = None
) -> int:
    """Let the kernel pick a free loopback port (UDP or TCP); never assume 5060 is free."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if avoid is None or port not in avoid:
            if kind == socket.SOCK_DGRAM and not _tcp_free(host, port):
                continue  # SIP may also be asked for TCP on the same number
            return port
    raise LabError("could not find a free loopback port")


def _tcp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# Music on hold (issue 9 §2): the lab's class plays a steady tone of this frequency, which no
# ringback (440+480 Hz), prompt or speech looks like (musiconhold.conf).
LAB_MOH_HZ = 660.0


def write_moh(directory: Path, seconds: int = 10) -> Path:
    """The lab's hold music: `seconds` of a LAB_MOH_HZ sine as signed linear 8 kHz (.sln),
    which res_musiconhold plays in a loop."""
    rate, amplitude = 8000, 0.3 * 32767
    samples = (
        round(amplitude * math.sin(2 * math.pi * LAB_MOH_HZ * n / rate))
        for n in range(rate * seconds)
    )
    path = directory / "lab-hold-tone.sln"
    path.write_bytes(array("h", samples).tobytes())
    return path


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Replace `{{NAME}}` placeholders; an unknown name is an error, not a silent blank."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise LabError(f"dialplan template uses {{{{{name}}}}} but the lab has no value")
        return str(values[name])

    return _PLACEHOLDER.sub(sub, text)


def _module_dir(root: Path) -> str:
    """The package's module dir inside the chroot (multiarch path differs per architecture)."""
    candidates = [
        *sorted(root.glob("usr/lib/*/asterisk/modules")),
        root / "usr/lib/asterisk/modules",
    ]
    for cand in candidates:
        if (cand / "chan_pjsip.so").exists():
            return "/" + str(cand.relative_to(root))
    raise LabUnavailable(
        f"no Asterisk modules under {root}/usr/lib; run scripts/install-asterisk.sh"
    )


def _chroot_ids(root: Path, user: str = "asterisk") -> tuple[int, int]:
    """The uid/gid of `asterisk` inside the chroot (may differ from any host user)."""
    passwd = root / "etc/passwd"
    for line in passwd.read_text().splitlines():
        parts = line.split(":")
        if parts and parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise LabUnavailable(f"no user {user!r} in {passwd}; run scripts/install-asterisk.sh")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise /proc mount/unmount decisions between instances (and processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AsteriskLab:
    """One running Asterisk instance with ARI and PJSIP on free loopback ports.

    Use as a context manager or call `start()`/`stop()`. Attributes after start: `host`,
    `sip_port`, `http_port`, `uas_port` (where the lab's `sipp-uas` endpoint sends INVITEs),
    `ari_url`, `ari_username`, `ari_password`, `app_name`.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        dialplan_dir: str | Path | None = None,
        *,
        name: str | None = None,
        ari_username: str = "callbridge",
        ari_password: str | None = None,
        uas_auth_user: str = "uasuser",
        uas_auth_password: str = "uassecret",
        rtp_range: tuple[int, int] = (16000, 16999),
        fallback_dial: str = "",
        extra_values: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        keep: bool | None = None,
        modules_conf: str | None = None,
    ) -> None:
        self.root = Path(root or os.environ.get("CALLBRIDGE_ASTERISK_ROOT") or DEFAULT_ROOT)
        self.dialplan_dir = Path(
            dialplan_dir or os.environ.get("CALLBRIDGE_DIALPLAN_DIR") or default_dialplan_dir()
        )
        self.name = name or f"lab-{os.getpid()}-{secrets.token_hex(3)}"
        self.host = "127.0.0.1"
        self.ari_username = ari_username
        self.ari_password = ari_password or secrets.token_hex(8)
        self.uas_auth_user = uas_auth_user
        self.uas_auth_password = uas_auth_password
        self.rtp_range = rtp_range
        self.fallback_dial = fallback_dial
        self.extra_values = dict(extra_values or {})
        self.start_timeout = start_timeout
        # Another file of the dialplan directory to use as modules.conf (e.g.
        # "modules-minimal.conf": the `autoload = no` list the README documents).
        self.modules_conf = modules_conf
        self.keep = bool(os.environ.get("CALLBRIDGE_LAB_KEEP")) if keep is None else keep
        self.app_name = APP_NAME
        self.sip_port = 0
        self.http_port = 0
        self.uas_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.instance_in_root = f"{LAB_DIR_IN_ROOT}/{self.name}"
        self.instance_dir = self.root / self.instance_in_root.lstrip("/")

    # ------------------------------------------------------------------ properties
    @property
    def ari_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ari_ws_url(self) -> str:
        """Events websocket URL for `app_name` (api_key auth, all event sources)."""
        key = urllib.parse.quote(f"{self.ari_username}:{self.ari_password}")
        return (
            f"ws://{self.host}:{self.http_port}/ari/events?app={self.app_name}"
            f"&api_key={key}&subscribeAll=true"
        )

    @property
    def conf_path(self) -> str:
        """asterisk.conf of this instance, as seen inside the chroot (for `-C`)."""
        return f"{self.instance_in_root}/etc/asterisk.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ------------------------------------------------------------------ lifecycle
    def check_installed(self) -> None:
        """Raise `LabUnavailable` with the fix when the chroot is missing or unusable."""
        if os.geteuid() != 0:
            raise LabUnavailable("the Asterisk lab needs root (chroot, mount)")
        if not (self.root / "usr/sbin/asterisk").exists():
            raise LabUnavailable(
                f"no Asterisk in {self.root}: run scripts/install-asterisk.sh "
                "(or set CALLBRIDGE_ASTERISK_ROOT)"
            )
        if not (self.dialplan_dir / "asterisk.conf").exists():
            raise LabUnavailable(f"no dialplan templates in {self.dialplan_dir}")

    def start(self) -> AsteriskLab:
        """Render configs, start Asterisk, and wait until ARI answers."""
        self.check_installed()
        used: set[int] = set()
        self.http_port = free_port(socket.SOCK_STREAM, avoid=used)
        used.add(self.http_port)
        self.sip_port = free_port(avoid=used)
        used.add(self.sip_port)
        self.uas_port = free_port(avoid=used)
        self._ensure_hosts()
        self._render()
        self._mount_proc()
        log = open(self.instance_dir / "log" / "console.log", "wb")
        try:
            self._proc = subprocess.Popen(
                [
                    "chroot",
                    str(self.root),
                    "/usr/sbin/asterisk",
                    "-f",
                    "-U",
                    "asterisk",
                    "-G",
                    "asterisk",
                    "-n",
                    "-C",
                    self.conf_path,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # = setsid: our Ctrl-C does not reach Asterisk
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _render(self) -> None:
        uid, gid = _chroot_ids(self.root)
        values = {
            "INSTANCE_DIR": self.instance_in_root,
            "INSTANCE_NAME": self.name,
            "MOD_DIR": _module_dir(self.root),
            "HTTP_PORT": str(self.http_port),
            "SIP_PORT": str(self.sip_port),
            "UAS_PORT": str(self.uas_port),
            "ARI_USERNAME": self.ari_username,
            "ARI_PASSWORD": self.ari_password,
            "UAS_AUTH_USER": self.uas_auth_user,
            "UAS_AUTH_PASSWORD": self.uas_auth_password,
            "RTP_START": str(self.rtp_range[0]),
            "RTP_END": str(self.rtp_range[1]),
            "FALLBACK_DIAL": self.fallback_dial,
            "TONE_COUNTRY": "us",
            "APP_NAME": self.app_name,
            **self.extra_values,
        }
        if self.instance_dir.exists():
            shutil.rmtree(self.instance_dir)
        for sub in ("etc", "lib", "spool", "run", "log", "log/cdr-csv", "cache", "moh"):
            (self.instance_dir / sub).mkdir(parents=True)
        write_moh(self.instance_dir / "moh")
        for tpl in sorted(self.dialplan_dir.glob("*.conf")):
            (self.instance_dir / "etc" / tpl.name).write_text(
                render_template(tpl.read_text(), values)
            )
        if self.modules_conf:
            etc = self.instance_dir / "etc"
            (etc / "modules.conf").write_text((etc / self.modules_conf).read_text())
        for path in [self.instance_dir, *self.instance_dir.rglob("*")]:
            os.chown(path, uid, gid)

    def _ensure_hosts(self) -> None:
        """The chroot resolves this machine's name and localhost from its own /etc/hosts.
        Asterisk looks its host name (then A.ROOT-SERVERS.NET) up for every new RTP instance
        (acl.c ast_find_ourip); without the file that goes to DNS, and a resolver that does not
        answer held 4 of 60 transfer legs' INVITEs for 5.0 s (bench/bench_invite.py)."""
        hosts = self.root / "etc" / "hosts"
        if hosts.exists():
            return
        with _locked(self._lock_path()):
            if not hosts.exists():
                name = socket.gethostname()
                hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {name}\n::1 localhost\n")

    def _lock_path(self) -> Path:
        return self.root / LAB_DIR_IN_ROOT.lstrip("/") / ".lock"

    def _mount_proc(self) -> None:
        proc = self.root / "proc"
        with _locked(self._lock_path()):
            if not os.path.ismount(proc):
                subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)

    def _other_instances_alive(self) -> bool:
        """True if another lab Asterisk still runs in this chroot (it needs /proc)."""
        base = self.root / LAB_DIR_IN_ROOT.lstrip("/")
        for pidfile in base.glob("*/run/asterisk.pid"):
            if pidfile.parent.parent == self.instance_dir:
                continue
            with contextlib.suppress(ValueError, OSError):
                if _pid_alive(int(pidfile.read_text().strip())):
                    return True
        return False

    def _umount_proc_if_last(self) -> None:
        proc = self.root / "proc"
        with _locked(self._lock_path()):
            if os.path.ismount(proc) and not self._other_instances_alive():
                subprocess.run(["umount", str(proc)], check=False, capture_output=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LabError(
                    f"Asterisk exited with code {self._proc.returncode} during start-up.\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            try:
                status, _ = self.ari("GET", "/asterisk/info", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise LabError(
            f"Asterisk ARI at {self.ari_url} did not answer within {self.start_timeout:.0f} s "
            f"({last}).\n--- log tail ---\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """`core stop now`, wait for the process, kill it if needed, clean up."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._cli_raw("core stop now", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        if not self.keep and self.instance_dir.exists():
            shutil.rmtree(self.instance_dir, ignore_errors=True)
        if self.instance_dir.parent.exists():
            self._umount_proc_if_last()

    def __enter__(self) -> AsteriskLab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def _cli_raw(self, cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", self.conf_path, "-rx", cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli(self, cmd: str, timeout: float = 10.0) -> str:
        """Run an Asterisk CLI command (`asterisk -rx`) and return its output."""
        res = self._cli_raw(cmd, timeout)
        if res.returncode != 0:
            raise LabError(f"asterisk -rx {cmd!r} failed ({res.returncode}): {res.stderr}")
        return res.stdout

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Asterisk's messages.log and console output (for error reports)."""
        out: list[str] = []
        for fname in ("messages.log", "console.log"):
            path = self.instance_dir / "log" / fname
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"[{fname}]\n" + "\n".join(text))
        return "\n".join(out) or "(no Asterisk log yet)"

    def ari(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """Minimal synchronous ARI call for fixtures and scripts: returns (status, JSON|None).

        The daemon has its own asyncio client; this one only exists so the lab needs no loop.
        """
        url = f"{self.ari_url}/ari{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        token = base64.b64encode(f"{self.ari_username}:{self.ari_password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def hangup_sip_call(self, call_id: str) -> bool:
        """Hang up the PJSIP channel of the SIP dialog `call_id`; False if none has it.

        Killing a SIPp caller sends no BYE, so its channel (and whatever it dialled) stays
        in Asterisk: in the session's shared lab it outlived the test and confused later
        ones. `SippCall.terminate` ends its call through this first.
        """
        status, channels = self.ari("GET", "/channels")
        if status != 200:
            return False
        for channel in channels:
            if not channel["name"].startswith("PJSIP/"):
                continue
            status, var = self.ari(
                "GET",
                f"/channels/{channel['id']}/variable",
                {"variable": "CHANNEL(pjsip,call-id)"},
            )
            if status == 200 and var and var.get("value") == call_id:
                status, _ = self.ari("DELETE", f"/channels/{channel['id']}")
                return status in (204, 404)
        return False


def main() -> None:
    """`python -m bridge.lab.asterisk`: run a lab Asterisk until Ctrl-C (for the demo)."""
    with AsteriskLab(ari_password="callbridge") as lab:
        print(
            f"Asterisk lab {lab.name}: ARI {lab.ari_url} user {lab.ari_username} "
            f"password {lab.ari_password}; SIP udp {lab.host}:{lab.sip_port}; "
            f"sipp-uas -> {lab.host}:{lab.uas_port}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
