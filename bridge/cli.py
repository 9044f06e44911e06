"""`callbridge`: run the daemon, manage API keys, chat with an assistant.

The CLI and the daemon find their configuration and database the same way (`--config`, else
CALLBRIDGE_CONFIG, else /etc/callbridge/callbridge.toml; CALLBRIDGE_DATABASE wins over the
file's `database`; see `bridge.config`), so a key created here is a key the daemon accepts.
Failures that the operator must fix (configuration, database, a port in use) end the process
with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from typing import Any

from bridge.config import ConfigError, Settings, load_settings
from bridge.store.db import DatabaseRefused

EXIT_CONFIG = 2  # the configuration is invalid
EXIT_START = 1  # valid configuration, but the daemon could not start or the command failed


def _fail(message: str, status: int) -> SystemExit:
    print(f"callbridge: {message}", file=sys.stderr)
    return SystemExit(status)


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None


async def _api_key(args: argparse.Namespace, settings: Settings) -> int:
    from bridge.api.keys import create_api_key, list_api_keys, revoke_api_key
    from bridge.store.db import Database

    path = settings.database
    new = not path.exists()
    db = await Database.open(path)
    try:
        if args.action == "create":
            key = await create_api_key(db, args.name)
            print(key)
            print(f"callbridge: key stored in the database {path.resolve()}", file=sys.stderr)
            if new:
                print(
                    "callbridge: that database was just created: if the daemon uses another"
                    " one, pass the daemon's --config (or CALLBRIDGE_DATABASE)",
                    file=sys.stderr,
                )
            print("Store it now: it cannot be shown again.", file=sys.stderr)
        elif args.action == "list":
            for row in await list_api_keys(db):
                state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                print(f"{row['id']}  {row['name'] or '-':20}  {row['created_at']}  {state}")
        elif args.action == "revoke":
            if not await revoke_api_key(db, args.key):
                print("callbridge: no such key", file=sys.stderr)
                return 1
    finally:
        await db.close()
    return 0


# --- callbridge chat: the text test console in a terminal (issue 8 §1) -----------------------


def _print_turn(turn: Any) -> None:
    if turn.llm_error:
        print(f"[the model failed: {turn.llm_error} - what follows is the fallback]", flush=True)
    for reply in turn.replies:
        print(f"assistant> {reply}", flush=True)
    for action in turn.actions:
        if action["type"] == "transfer" and action.get("refused"):
            refused = action["refused"]
            print(
                f"[transfer to {action['destination']} ({action['description']})"
                f" - refused, as on a call: {refused['reason']}]",
                flush=True,
            )
        elif action["type"] == "transfer":
            print(
                f"[transfer to {action['destination']} ({action['description']})"
                " - reported, not dialled]",
                flush=True,
            )
        else:
            print("[end_call - reported]", flush=True)


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    """The console's code in this process, on the daemon's database and LLM settings: no
    daemon, API key or PBX needed. Reads the caller's lines from stdin until EOF."""
    from bridge.agent.chat import ChatConsole, first_number_of
    from bridge.agent.providers import LlmProviders
    from bridge.calls.policy import TransferPolicy
    from bridge.directory.service import DirectoryService
    from bridge.errors import BridgeError
    from bridge.log import configure_logging
    from bridge.store.db import Database

    configure_logging("console", "warning")  # stdout is the conversation
    if not settings.database.exists():  # opening it would create an empty one
        print(
            f"callbridge: no database at {settings.database}: chat reads the daemon's database"
            " (give the daemon's --config, or CALLBRIDGE_DATABASE)",
            file=sys.stderr,
        )
        return EXIT_START
    db = await Database.open(settings.database)
    llms = LlmProviders(settings)
    try:
        directory = DirectoryService(db)
        console = ChatConsole(
            directory.get_assistant,
            llms.llm_for,
            settings.agent,
            policy=TransferPolicy(settings.transfer, directory),  # as the daemon's calls
            number_of=first_number_of(directory),
        )
        try:
            assistant = await directory.get_assistant(args.assistant_id)
        except BridgeError as exc:
            known = [f"{a.id} ({a.name})" for a in await directory.list_assistants()]
            hint = (
                f"assistants in {settings.database}: {', '.join(known)}"
                if known
                else f"{settings.database} has no assistants yet (POST /api/v1/assistants)"
            )
            print(f"callbridge: {exc.message}; {hint}", file=sys.stderr)
            return EXIT_START
        print(
            f"Chatting with {assistant.name!r} ({assistant.llm_config.provider}). You are the"
            " caller; transfers and end_call are shown, not executed. Ctrl-D to stop.",
            file=sys.stderr,
        )
        conversation_id: str | None = None
        loop = asyncio.get_running_loop()
        while True:
            if sys.stdin.isatty():
                print("caller> ", end="", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            message = line.strip()
            if not message:
                continue
            try:
                turn = await console.send(args.assistant_id, message, conversation_id)
            except BridgeError as exc:
                if exc.field != "conversation_id" or conversation_id is None:
                    print(f"callbridge: {exc.message}", file=sys.stderr)  # e.g. deleted
                    continue
                # Forgotten after 30 idle minutes, or at its message limit: the line goes to
                # a new conversation (as a new call), not a traceback.
                print(f"(a new conversation: {exc.message})", file=sys.stderr)
                conversation_id = None
                turn = await console.send(args.assistant_id, message, None)
            conversation_id = turn.conversation_id
            _print_turn(turn)
            if turn.ended:
                print(
                    "(the call would end here; a new line starts a new conversation)",
                    file=sys.stderr,
                )
                conversation_id = None
    finally:
        await llms.aclose()
        await db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callbridge", description=__doc__)
    parser.add_argument("--config", help="TOML configuration file (or CALLBRIDGE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon")
    keys = sub.add_parser("api-key", help="manage API keys")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", default=None)
    key_actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = key_actions.add_parser("revoke", help="revoke a key by id or by the key")
    revoke.add_argument("key")
    chat = sub.add_parser(
        "chat", help="talk to an assistant by text (the call's conversation code, no audio)"
    )
    chat.add_argument("assistant_id")
    args = parser.parse_args(argv)
    settings = _settings(args)

    try:
        if args.command == "run":
            from bridge import eventloop
            from bridge.app import run_daemon

            try:
                eventloop.run(
                    run_daemon(settings), settings.event_loop, settings.gil_switch_interval_ms
                )
            except eventloop.EventLoopUnavailable as exc:
                raise _fail(str(exc), EXIT_CONFIG) from None
            return 0
        if args.command == "chat":
            return asyncio.run(_chat(args, settings))
        return asyncio.run(_api_key(args, settings))
    except DatabaseRefused as exc:
        raise _fail(str(exc), EXIT_START) from None
    except sqlite3.Error as exc:
        raise _fail(f"database {settings.database}: {exc}", EXIT_START) from None
    except OSError as exc:
        # A port in use, a directory we cannot create: strerror and the file, no trace.
        where = f" ({exc.filename})" if exc.filename else ""
        raise _fail(f"cannot start: {exc.strerror or exc}{where}", EXIT_START) from None


if __name__ == "__main__":
    sys.exit(main())
