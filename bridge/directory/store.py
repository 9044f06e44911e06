"""SQL for the directory tables: each object is a JSON document plus bookkeeping columns.

Only this module knows the table layout. `numbers` also keeps `number`, `assistant_id` and
`transfer_trunk_id` in their own columns (copied from the document on every write) so that
look-ups by dialled number and reference checks use indexes and foreign keys.
The store checks nothing: `DirectoryService` owns the rules and maps `sqlite3.IntegrityError`.
"""

from __future__ import annotations

import builtins  # `list` is also a method of DirectoryStore
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiosqlite

from bridge.store.db import Database

Table = Literal["assistants", "trunks", "numbers"]
RefColumn = Literal["assistant_id", "transfer_trunk_id"]

_TABLES: frozenset[str] = frozenset({"assistants", "trunks", "numbers"})
_REF_COLUMNS: frozenset[str] = frozenset({"assistant_id", "transfer_trunk_id"})


@dataclass(frozen=True)
class Row:
    """A stored object: its document (the `*In` fields, secrets included) and bookkeeping."""

    id: str
    doc: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    def fields(self) -> dict[str, Any]:
        """The document with id and timestamps: what the `Assistant`/`Trunk`/`Number` models
        validate."""
        return {
            **self.doc,
            "id": self.id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _table(table: str) -> str:
    # Table names cannot be bound parameters: accept only the three we know.
    if table not in _TABLES:
        raise ValueError(f"unknown directory table {table!r}")
    return table


def _row(record: aiosqlite.Row) -> Row:
    return Row(
        id=record["id"],
        doc=json.loads(record["doc"]),
        created_at=datetime.fromisoformat(record["created_at"]),
        updated_at=datetime.fromisoformat(record["updated_at"]),
    )


def _iso(value: datetime) -> str:
    # Fixed width, so that ORDER BY on the text column is chronological.
    return value.isoformat(timespec="microseconds")


def _number_columns(doc: dict[str, Any]) -> tuple[Any, Any, Any]:
    return doc["number"], doc.get("assistant_id"), doc.get("transfer_trunk_id")


class DirectoryStore:
    """Reads and writes rows of assistants, trunks and numbers; every write commits."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, table: Table, obj_id: str) -> Row | None:
        record = await self._db.fetchone(
            f"SELECT id, doc, created_at, updated_at FROM {_table(table)} WHERE id = ?",
            (obj_id,),
        )
        return _row(record) if record else None

    async def exists(self, table: Table, obj_id: str) -> bool:
        record = await self._db.fetchone(f"SELECT 1 FROM {_table(table)} WHERE id = ?", (obj_id,))
        return record is not None

    async def list(self, table: Table) -> list[Row]:
        records = await self._db.fetchall(
            f"SELECT id, doc, created_at, updated_at FROM {_table(table)} ORDER BY created_at, id"
        )
        return [_row(r) for r in records]

    async def insert(self, table: Table, row: Row) -> None:
        doc = json.dumps(row.doc, separators=(",", ":"))
        created, updated = _iso(row.created_at), _iso(row.updated_at)
        if table == "numbers":
            await self._db.execute(
                "INSERT INTO numbers (id, number, assistant_id, transfer_trunk_id, doc,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.id, *_number_columns(row.doc), doc, created, updated),
            )
        else:
            await self._db.execute(
                f"INSERT INTO {_table(table)} (id, doc, created_at, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (row.id, doc, created, updated),
            )

    async def update(self, table: Table, row: Row) -> bool:
        doc = json.dumps(row.doc, separators=(",", ":"))
        updated = _iso(row.updated_at)
        if table == "numbers":
            count = await self._db.execute(
                "UPDATE numbers SET number = ?, assistant_id = ?, transfer_trunk_id = ?,"
                " doc = ?, updated_at = ? WHERE id = ?",
                (*_number_columns(row.doc), doc, updated, row.id),
            )
        else:
            count = await self._db.execute(
                f"UPDATE {_table(table)} SET doc = ?, updated_at = ? WHERE id = ?",
                (doc, updated, row.id),
            )
        return count > 0

    async def delete(self, table: Table, obj_id: str) -> bool:
        return await self._db.execute(f"DELETE FROM {_table(table)} WHERE id = ?", (obj_id,)) > 0

    async def numbers_referencing(
        self, column: RefColumn, obj_id: str
    ) -> builtins.list[dict[str, str]]:
        """The numbers whose `column` names `obj_id`, as `{"id", "number"}` pairs."""
        if column not in _REF_COLUMNS:
            raise ValueError(f"unknown reference column {column!r}")
        records = await self._db.fetchall(
            f"SELECT id, number FROM numbers WHERE {column} = ? ORDER BY number", (obj_id,)
        )
        return [{"id": r["id"], "number": r["number"]} for r in records]

    async def numbers_by_value(self, values: builtins.list[str]) -> builtins.list[Row]:
        """Numbers whose `number` column equals one of `values` (indexed: UNIQUE)."""
        if not values:
            return []
        marks = ", ".join("?" for _ in values)
        records = await self._db.fetchall(
            f"SELECT id, doc, created_at, updated_at FROM numbers WHERE number IN ({marks})",
            tuple(values),
        )
        return [_row(r) for r in records]
