"""`callbridge chat ASSISTANT_ID` as a real process: the caller's lines on stdin, the replies
and reported actions on stdout, on the daemon's database (no daemon, key or PBX needed)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from bridge.cli import main
from bridge.directory.models import AssistantIn
from bridge.directory.service import DirectoryService
from bridge.store.db import Database


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`main(["chat", ...])` in this process configures logging onto the captured stderr,
    which is closed after the test: later tests would log into a closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def _run(env: dict[str, str], *args: str, stdin: bytes) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_chat_in_a_terminal(tmp_path: Path) -> None:
    database = tmp_path / "cb.sqlite3"
    db = await Database.open(database)
    assistant = await DirectoryService(db).create_assistant(
        AssistantIn.model_validate(
            {
                "name": "Acme",
                "first_message": "Welcome to Acme.",
                "llm_config": {
                    "provider": "local",
                    "tools": [
                        {
                            "type": "transfer_call",
                            "destinations": [
                                {"number": "+31612345678", "description": "Sales team"},
                                {"number": "+31698765432", "description": "Billing department"},
                            ],
                        }
                    ],
                },
                "knowledge": [{"question": "When are you open?", "answer": "Nine to five."}],
            }
        )
    )
    await db.close()
    env = {**os.environ, "CALLBRIDGE_DATABASE": str(database), "PYTHONPATH": os.getcwd()}
    code, out, err = await _run(
        env, "chat", assistant.id, stdin=b"What are your opening hours?\nbilling please\n"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["assistant> Welcome to Acme.", "assistant> Nine to five."]
    assert "[transfer to +31698765432 (Billing department) - reported, not dialled]" in lines
    assert "not executed" in err

    code, out, err = await _run(env, "chat", "nope", stdin=b"hi\n")
    assert code == 1 and "nope" in err and out == ""


def test_chat_without_the_database_says_so_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong --config must not leave an empty database behind and blame the assistant."""
    missing = tmp_path / "nope" / "cb.sqlite3"
    monkeypatch.setenv("CALLBRIDGE_DATABASE", str(missing))
    assert main(["chat", "a1"]) == 1
    err = capsys.readouterr().err
    assert f"no database at {missing}" in err and "CALLBRIDGE_DATABASE" in err
    assert not missing.parent.exists()


async def test_chat_with_an_unknown_assistant_lists_the_known_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "cb.sqlite3"
    db = await Database.open(database)
    await db.close()
    monkeypatch.setenv("CALLBRIDGE_DATABASE", str(database))
    assert await asyncio.to_thread(main, ["chat", "a1"]) == 1
    assert "has no assistants yet" in capsys.readouterr().err
    db = await Database.open(database)
    acme = await DirectoryService(db).create_assistant(
        AssistantIn.model_validate({"name": "Acme", "llm_config": {"provider": "local"}})
    )
    await db.close()
    assert await asyncio.to_thread(main, ["chat", "a1"]) == 1
    err = capsys.readouterr().err
    assert "a1" in err and f"{acme.id} (Acme)" in err


async def test_a_forgotten_conversation_starts_a_new_one_instead_of_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After 30 idle minutes (or 100 messages) the console forgets the conversation: the
    terminal session goes on with a new one."""
    from bridge.agent.chat import ChatConsole, ChatTurn
    from bridge.errors import NotFound

    database = tmp_path / "cb.sqlite3"
    db = await Database.open(database)
    acme = await DirectoryService(db).create_assistant(
        AssistantIn.model_validate({"name": "Acme", "llm_config": {"provider": "local"}})
    )
    await db.close()
    sent: list[str | None] = []

    async def send(
        self: ChatConsole, assistant_id: str, message: str, conversation_id: str | None = None
    ) -> ChatTurn:
        sent.append(conversation_id)
        if conversation_id == "conv_1":
            raise NotFound("no conversation 'conv_1'", field="conversation_id")
        return ChatTurn(f"conv_{len(sent)}", replies=[f"heard {message}"])

    monkeypatch.setattr(ChatConsole, "send", send)
    monkeypatch.setenv("CALLBRIDGE_DATABASE", str(database))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nstill there?\n"))
    assert await asyncio.to_thread(main, ["chat", acme.id]) == 0
    out, err = capsys.readouterr()
    assert sent == [None, "conv_1", None]
    assert out.splitlines() == ["assistant> heard hello", "assistant> heard still there?"]
    assert "(a new conversation: no conversation 'conv_1')" in err
