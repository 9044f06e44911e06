"""`callbridge`: run the daemon, manage API keys."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError

from bridge.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ValidationError as exc:
        print(f"callbridge: invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc


async def _api_key(args: argparse.Namespace) -> int:
    from bridge.api.keys import create_api_key, list_api_keys, revoke_api_key
    from bridge.store.db import Database

    db = await Database.open(_settings(args).database)
    try:
        if args.action == "create":
            key = await create_api_key(db, args.name)
            print(key)
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
    args = parser.parse_args(argv)

    if args.command == "run":
        from bridge.app import run_daemon

        asyncio.run(run_daemon(_settings(args)))
        return 0
    return asyncio.run(_api_key(args))


if __name__ == "__main__":
    sys.exit(main())
