"""Run the SIPp scenarios of `tests/sipp/` as asyncio subprocesses against the lab.

SIPp carries only signalling here (media is `bridge.lab.rtp.RtpPeer`). Every run gets its own
temp dir with SIPp's message trace, so tests can assert on what was really sent and received
(e.g. the INVITE request line a UAS got, or the final response a caller saw).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bridge.lab.asterisk import free_port

_SEPARATOR = re.compile(r"^-{20,}.*$", re.MULTILINE)
_DIRECTION = re.compile(r"message (received|sent)", re.IGNORECASE)


class SippError(RuntimeError):
    """SIPp could not be started or did not behave as expected."""


def default_scenario_dir() -> Path:
    return Path(
        os.environ.get("CALLBRIDGE_SIPP_DIR") or Path(__file__).resolve().parents[2] / "tests/sipp"
    )


class LabLike(Protocol):
    """What the SIPp helpers need from `AsteriskLab` (kept structural for other PBXes)."""

    host: str
    sip_port: int
    uas_port: int


@dataclass(slots=True)
class SipMessage:
    """One SIP message from SIPp's trace."""

    direction: str  # "received" or "sent" (from SIPp's point of view)
    first_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""

    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/2.0")

    @property
    def method(self) -> str | None:
        return self.first_line.split(" ", 1)[0] if self.is_request else None

    @property
    def request_uri(self) -> str | None:
        parts = self.first_line.split(" ")
        return parts[1] if self.is_request and len(parts) > 1 else None

    @property
    def status_code(self) -> int | None:
        if self.is_request:
            return None
        parts = self.first_line.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    @property
    def cseq_method(self) -> str | None:
        cseq = self.header("CSeq")
        return cseq.split()[-1] if cseq else None

    def header(self, name: str) -> str | None:
        """First value of a header (case-insensitive; compact forms not expanded)."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None


def parse_message_trace(text: str) -> list[SipMessage]:
    """Parse SIPp's `-trace_msg` file into messages, in order."""
    messages: list[SipMessage] = []
    for block in _SEPARATOR.split(text):
        lines = block.strip("\r\n").splitlines()
        if not lines:
            continue
        m = _DIRECTION.search(lines[0])
        if not m:
            continue
        rest = lines[1:]
        while rest and not rest[0].strip():
            rest = rest[1:]
        if not rest:
            continue
        msg = SipMessage(direction=m.group(1).lower(), first_line=rest[0].strip())
        body_start = len(rest)
        for i, line in enumerate(rest[1:], start=1):
            if not line.strip():
                body_start = i + 1
                break
            if ":" in line:
                key, value = line.split(":", 1)
                msg.headers.append((key.strip(), value.strip()))
        msg.body = "\n".join(rest[body_start:]).strip()
        messages.append(msg)
    return messages


class _SippProcess:
    """Common subprocess handling: command line, temp dir, trace, exit code."""

    def __init__(
        self,
        scenario: str | Path,
        *,
        local_port: int | None = None,
        keys: Mapping[str, str | int] | None = None,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        max_seconds: float = 120.0,
    ) -> None:
        path = Path(scenario)
        if not path.is_absolute() and not path.exists():
            path = default_scenario_dir() / path
        if not path.exists():
            raise SippError(f"no SIPp scenario {path}")
        if shutil.which("sipp") is None:
            raise SippError("sipp not found: run scripts/install-asterisk.sh (package sip-tester)")
        self.scenario = path
        self.host = host
        self._own_port = local_port is None  # ours to pick again if SIPp cannot bind it
        self.local_port = local_port or free_port()
        self.keys = {k: str(v) for k, v in (keys or {}).items()}
        self.extra_args = list(extra_args)
        self.max_seconds = max_seconds
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sipp-{path.stem}-"))
        self.message_file = self.workdir / "messages.log"
        self.error_file = self.workdir / "errors.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None

    def _args(self) -> list[str]:
        args = [
            "sipp",
            "-sf",
            str(self.scenario),
            "-i",
            self.host,
            "-p",
            str(self.local_port),
            "-m",
            "1",
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(self.message_file),
            "-trace_err",
            "-error_file",
            str(self.error_file),
            "-timeout",
            f"{int(self.max_seconds)}s",
            "-timeout_error",
            "-mp",
            str(free_port()),
        ]  # SIPp binds a media port we never use
        for k, v in self.keys.items():
            args += ["-key", k, v]
        return args + self.extra_args

    async def start(self) -> None:
        """Start SIPp and wait until it holds its port. A port we picked ourselves can be
        taken between the pick and SIPp's bind (SIPp also binds media ports next to `-mp`):
        then pick again, a few times."""
        for attempt in range(3):
            try:
                await self._start_once()
                return
            except SippError:
                if not self._own_port or attempt == 2 or "Unable to bind" not in self.output():
                    raise
                self.local_port = free_port()

    async def _start_once(self) -> None:
        with open(self.workdir / "stdout.log", "wb") as out:  # noqa: ASYNC230 (tmpfs, tiny)
            self.proc = await asyncio.create_subprocess_exec(
                *self._args(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.workdir,
            )
        # Ready once SIPp holds the UDP port (we can no longer bind it).
        for _ in range(100):
            if self.proc.returncode is not None:
                break
            if not _udp_free(self.host, self.local_port):
                return
            await asyncio.sleep(0.02)
        if self.proc.returncode is not None or _udp_free(self.host, self.local_port):
            await self.wait(2)
            raise SippError(f"sipp {self.scenario.name} did not start:\n{self.output()}")

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for SIPp to exit; returns its exit code (0: the call succeeded)."""
        if self.proc is None:
            raise SippError("not started")
        self.returncode = await asyncio.wait_for(self.proc.wait(), timeout)
        return self.returncode

    async def terminate(self) -> int | None:
        """Stop SIPp now (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.returncode is not None:
            return self.returncode if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.returncode = await asyncio.wait_for(self.proc.wait(), 3)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.returncode = await self.proc.wait()
        return self.returncode

    def messages(self) -> list[SipMessage]:
        if not self.message_file.exists():
            return []
        return parse_message_trace(self.message_file.read_text(errors="replace"))

    def received_requests(self, method: str | None = None) -> list[SipMessage]:
        return [
            m
            for m in self.messages()
            if m.direction == "received" and m.is_request and (method is None or m.method == method)
        ]

    def received_responses(self, cseq_method: str | None = None) -> list[SipMessage]:
        return [
            m
            for m in self.messages()
            if m.direction == "received"
            and not m.is_request
            and (cseq_method is None or m.cseq_method == cseq_method)
        ]

    def output(self) -> str:
        """SIPp's stdout and error log (for assertion messages)."""
        parts = []
        for f in (self.workdir / "stdout.log", self.error_file):
            if f.exists():
                parts.append(f.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _udp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class SippUas(_SippProcess):
    """A background SIPp UAS (one call) on `local_port`, e.g. the lab's `uas_port`.

    `keys` fill scenario placeholders (rtp_port, auth_user, auth_pass); `ring_ms` is how long
    an answering scenario rings before 200 (SIPp's -d).
    """

    def __init__(
        self,
        scenario: str | Path,
        *,
        rtp_port: int = 0,
        ring_ms: int = 200,
        local_port: int | None = None,
        keys: Mapping[str, str | int] | None = None,
        extra_args: Sequence[str] = (),
        max_seconds: float = 120.0,
    ) -> None:
        all_keys: dict[str, str | int] = {"rtp_port": rtp_port, "auth_user": "", "auth_pass": ""}
        all_keys.update(keys or {})
        super().__init__(
            scenario,
            local_port=local_port,
            keys=all_keys,
            extra_args=["-d", str(ring_ms), *extra_args],
            max_seconds=max_seconds,
        )

    @classmethod
    def for_lab(cls, lab: LabLike, scenario: str | Path, **kwargs: object) -> SippUas:
        """A UAS on the port the lab's `sipp-uas` endpoints dial."""
        return cls(scenario, local_port=lab.uas_port, **kwargs)  # type: ignore[arg-type]

    async def stop(self) -> int | None:
        return await self.terminate()

    @property
    def invite(self) -> SipMessage | None:
        """The first INVITE received (request line, headers, SDP body)."""
        invites = self.received_requests("INVITE")
        return invites[0] if invites else None


class SippCall(_SippProcess):
    """A SIPp UAC placing one call (`tests/sipp/uac_call.xml` by default).

    It calls `service` at `remote`, identifies as `from_user`, offers media at `rtp_port`,
    and hangs up after `hold_ms` unless the other side sends BYE first.
    """

    def __init__(
        self,
        remote: tuple[str, int],
        service: str,
        *,
        rtp_port: int,
        from_user: str = "sipp-caller",
        hold_ms: int = 5000,
        scenario: str | Path = "uac_call.xml",
        local_port: int | None = None,
        keys: Mapping[str, str | int] | None = None,
        extra_args: Sequence[str] = (),
        max_seconds: float = 120.0,
    ) -> None:
        all_keys: dict[str, str | int] = {"rtp_port": rtp_port, "from_user": from_user}
        all_keys.update(keys or {})
        super().__init__(
            scenario,
            local_port=local_port,
            keys=all_keys,
            max_seconds=max_seconds,
            extra_args=[
                "-s",
                service,
                "-recv_timeout",
                str(hold_ms),
                *extra_args,
                f"{remote[0]}:{remote[1]}",
            ],
        )

    # The lab's `hangup_sip_call(call_id) -> bool` (AsteriskLab), set by `to_lab`.
    _hangup: Callable[[str], bool] | None = None

    @classmethod
    def to_lab(cls, lab: LabLike, service: str, **kwargs: object) -> SippCall:
        """A call into the lab Asterisk's PJSIP transport."""
        call = cls((lab.host, lab.sip_port), service, **kwargs)  # type: ignore[arg-type]
        call._hangup = getattr(lab, "hangup_sip_call", None)
        return call

    def call_id(self) -> str | None:
        """The Call-ID of our INVITE (None before SIPp sent it)."""
        sent = [m for m in self.messages() if m.direction == "sent" and m.method == "INVITE"]
        return sent[0].header("Call-ID") if sent else None

    async def terminate(self) -> int | None:
        """End the call and stop SIPp. A killed SIPp sends no BYE, so its channel would stay
        in Asterisk (the session shares one lab): the lab hangs the channel up first, SIPp
        answers that BYE and exits by itself; only then is it killed."""
        running = self.proc is not None and self.proc.returncode is None
        call_id = self.call_id() if running and self._hangup is not None else None
        if call_id and self._hangup is not None:
            if await asyncio.to_thread(self._hangup, call_id):
                with contextlib.suppress(TimeoutError):
                    await self.wait(5)
        return await super().terminate()

    def final_status(self) -> int | None:
        """The final (>= 200) response code to our INVITE, or None if none came."""
        for m in self.received_responses("INVITE"):
            if m.status_code is not None and m.status_code >= 200:
                return m.status_code
        return None

    def provisional_statuses(self) -> list[int]:
        return [
            m.status_code
            for m in self.received_responses("INVITE")
            if m.status_code is not None and m.status_code < 200
        ]

    def answered(self) -> bool:
        return self.final_status() == 200

    def got_bye(self) -> bool:
        """True if the far end hung up on us (we did not send the BYE)."""
        return bool(self.received_requests("BYE"))

    def sdp_port(self) -> int | None:
        """The audio port in the 200's SDP (where Asterisk wants our RTP)."""
        for m in self.received_responses("INVITE"):
            if m.status_code == 200:
                found = re.search(r"^m=audio (\d+)", m.body, re.MULTILINE)
                return int(found.group(1)) if found else None
        return None
