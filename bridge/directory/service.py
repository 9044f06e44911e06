"""The directory: assistants, SIP trunks and numbers, with their references kept consistent.

Rules live here, not in the HTTP layer, so the API, a CLI and the call service all get them:
- ids are uuid4 strings, timestamps UTC;
- PATCH is a JSON merge patch (RFC 7396) applied to the stored object, then the whole result is
  validated again with the `*In` model: objects merge deeply, lists are replaced whole, `null`
  removes a field (an optional field becomes empty, a field with a default gets its default,
  a required one is reported missing). A trunk PATCH without `password` keeps the stored one;
- a number's `assistant_id` / `transfer_trunk_id` must exist; an assistant or trunk still used
  by a number cannot be deleted; two numbers cannot share `number`;
- after a trunk is saved or deleted the provisioning hooks run. Their failures are logged and
  swallowed: the PBX layer re-provisions every trunk when it (re)connects.
Writes are serialised by one lock so that "check, then write" is atomic for this process.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from bridge.directory.models import (
    STORED,
    Assistant,
    AssistantIn,
    Number,
    NumberIn,
    Trunk,
    TrunkIn,
)
from bridge.directory.store import DirectoryStore, RefColumn, Row, Table
from bridge.errors import Conflict, InvalidInput, NotFound
from bridge.log import get_logger
from bridge.store.db import Database

log = get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
TrunkSavedHook = Callable[[Trunk], Awaitable[None]]
TrunkDeletedHook = Callable[[str], Awaitable[None]]


# --- validation helpers (shared with the API) -------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: dicts merge recursively, `None` deletes, anything else
    (lists included) replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def field_path(loc: Sequence[int | str], data: Any) -> str:
    """A pydantic error location as the dotted path of the client's JSON.

    Pydantic puts the tag of a discriminated union into `loc` (`tools.0.transfer_call.…`);
    the client never wrote that key, so it is dropped. A tag is recognised by walking the input:
    the first location item equal to the object's `type` value, before descending into it.
    """
    parts: list[str] = []
    node: Any = data
    tag_skipped = False
    for index, item in enumerate(loc):
        # A destination without `type` is a number destination (the seed's shape): its tag
        # is "number", followed by the failing field.
        tag = (
            node.get("type", "number" if index + 1 < len(loc) else None)
            if isinstance(node, dict)
            else None
        )
        if isinstance(node, dict) and not tag_skipped and isinstance(item, str) and tag == item:
            tag_skipped = True
            continue
        parts.append(str(item))
        tag_skipped = False
        if isinstance(node, dict):
            node = node.get(item) if isinstance(item, str) else None
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


def _error_field(error: Any, data: Any) -> str:
    path = field_path(error["loc"], data)
    if error["type"] == "destination_type":
        return f"{path}.type" if path else "type"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # The discriminator itself is wrong or missing: name it.
        tag = str(error.get("ctx", {}).get("discriminator", "type")).strip("'\"")
        path = f"{path}.{tag}" if path else tag
    return path


def validation_error(exc: ValidationError, data: Any) -> InvalidInput:
    """An `InvalidInput` naming the first failing field; `errors` lists every failure.

    Inputs are never echoed back (a trunk password may be among them).
    """
    errors = [
        {
            "field": _error_field(e, data),
            "message": e["msg"].removeprefix("Value error, "),
            "type": e["type"],
        }
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid input"}
    message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return InvalidInput(message, field=first["field"] or None, errors=errors)


@overload
def validate(model: type[M], data: Any) -> M: ...
@overload
def validate(model: TypeAdapter[T], data: Any) -> T: ...
def validate(model: type[BaseModel] | TypeAdapter[Any], data: Any) -> Any:
    """`model.model_validate(data)` (or a TypeAdapter's `validate_python`), raising
    `InvalidInput` instead of `ValidationError`."""
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from None


# --- the service --------------------------------------------------------------------------------


def _stored(model: type[M], row: dict[str, Any]) -> M:
    """An object read back from the database (checks added since it was stored are skipped)."""
    return model.model_validate(row, context=STORED)


def _now() -> datetime:
    return datetime.now(UTC)


def _doc(data: BaseModel) -> dict[str, Any]:
    """The JSON document stored for an `*In` model: secrets in clear (the file is 0600)."""
    doc = data.model_dump(mode="json")
    for name in type(data).model_fields:
        value = getattr(data, name)
        if isinstance(value, SecretStr):
            doc[name] = value.get_secret_value()
    return doc


_KIND: dict[Table, str] = {"assistants": "assistant", "trunks": "SIP trunk", "numbers": "number"}


class DirectoryService:
    """Create, read, patch and delete assistants, trunks and numbers."""

    def __init__(
        self,
        db: Database,
        on_trunk_saved: TrunkSavedHook | None = None,
        on_trunk_deleted: TrunkDeletedHook | None = None,
        *,
        hook_timeout: float = 10.0,
    ) -> None:
        self._store = DirectoryStore(db)
        self._on_trunk_saved = on_trunk_saved
        self._on_trunk_deleted = on_trunk_deleted
        # speed: called with every assistant created or changed (the TTS cache primes its
        # first_message and destination messages); must not block.
        self.on_assistant_saved: Callable[[Assistant], None] | None = None
        self._hook_timeout = hook_timeout
        self._lock = asyncio.Lock()
        # speed (issue 8 §4): rows read by id, kept until any write through this service (the
        # directory changes only through the daemon's API): a transfer's policy check reads
        # its number and trunk without waiting for the database thread.
        self._rows: dict[tuple[Table, str], Row] = {}
        self._generation = 0

    # --- assistants ---

    async def create_assistant(self, data: AssistantIn) -> Assistant:
        async with self._lock:
            row = await self._insert("assistants", data)
        return self._assistant_saved(_stored(Assistant, row.fields()))

    async def get_assistant(self, assistant_id: str) -> Assistant:
        return _stored(Assistant, (await self._require("assistants", assistant_id)).fields())

    async def list_assistants(self) -> list[Assistant]:
        return [_stored(Assistant, r.fields()) for r in await self._store.list("assistants")]

    async def patch_assistant(self, assistant_id: str, patch: dict[str, Any]) -> Assistant:
        async with self._lock:
            row = await self._require("assistants", assistant_id)
            data = validate(AssistantIn, merge_patch(row.doc, _object(patch, AssistantIn)))
            row = await self._update("assistants", row, data)
        return self._assistant_saved(_stored(Assistant, row.fields()))

    def _assistant_saved(self, assistant: Assistant) -> Assistant:
        if self.on_assistant_saved is not None:
            self.on_assistant_saved(assistant)
        return assistant

    async def delete_assistant(self, assistant_id: str) -> None:
        async with self._lock:
            await self._require("assistants", assistant_id)
            await self._refuse_if_used("assistants", "assistant_id", assistant_id)
            await self._delete("assistants", assistant_id)

    # --- SIP trunks ---

    async def create_trunk(self, data: TrunkIn) -> Trunk:
        async with self._lock:
            trunk = _stored(Trunk, (await self._insert("trunks", data)).fields())
            await self._run_hook("on_trunk_saved", self._on_trunk_saved, trunk, trunk.id)
        return trunk

    async def get_trunk(self, trunk_id: str) -> Trunk:
        """The trunk; its password is a `SecretStr` that `public_dict` leaves out."""
        return _stored(Trunk, (await self._require("trunks", trunk_id)).fields())

    async def get_trunk_secret(self, trunk_id: str) -> Trunk:
        """The trunk with its password, for provisioning it on the PBX.

        Same object as `get_trunk`; the name marks the call sites that read the secret.
        """
        return await self.get_trunk(trunk_id)

    async def list_trunks(self) -> list[Trunk]:
        return [_stored(Trunk, r.fields()) for r in await self._store.list("trunks")]

    async def patch_trunk(self, trunk_id: str, patch: dict[str, Any]) -> Trunk:
        async with self._lock:
            row = await self._require("trunks", trunk_id)
            data = validate(TrunkIn, merge_patch(row.doc, _object(patch, TrunkIn)))
            trunk = _stored(Trunk, (await self._update("trunks", row, data)).fields())
            await self._run_hook("on_trunk_saved", self._on_trunk_saved, trunk, trunk.id)
        return trunk

    async def delete_trunk(self, trunk_id: str) -> None:
        async with self._lock:
            await self._require("trunks", trunk_id)
            await self._refuse_if_used("trunks", "transfer_trunk_id", trunk_id)
            await self._delete("trunks", trunk_id)
            await self._run_hook("on_trunk_deleted", self._on_trunk_deleted, trunk_id, trunk_id)

    # --- numbers ---

    async def create_number(self, data: NumberIn) -> Number:
        async with self._lock:
            await self._check_number(data, None)
            row = await self._insert("numbers", data)
        return _stored(Number, row.fields())

    async def get_number(self, number_id: str) -> Number:
        return _stored(Number, (await self._require("numbers", number_id)).fields())

    async def list_numbers(self) -> list[Number]:
        return [_stored(Number, r.fields()) for r in await self._store.list("numbers")]

    async def patch_number(self, number_id: str, patch: dict[str, Any]) -> Number:
        async with self._lock:
            row = await self._require("numbers", number_id)
            data = validate(NumberIn, merge_patch(row.doc, _object(patch, NumberIn)))
            await self._check_number(data, number_id)
            row = await self._update("numbers", row, data)
        return _stored(Number, row.fields())

    async def delete_number(self, number_id: str) -> None:
        async with self._lock:
            await self._require("numbers", number_id)
            await self._delete("numbers", number_id)

    async def find_number(self, dialled: str) -> Number | None:
        """The number a call was dialled to, or None.

        Exact match on `number` first; otherwise the same digits with the leading '+' added or
        removed, because trunks differ in whether the DID they deliver carries it.
        """
        dialled = dialled.strip()
        if not dialled:
            return None
        other = dialled[1:] if dialled.startswith("+") else f"+{dialled}"
        rows = await self._store.numbers_by_value([dialled, other])
        rows.sort(key=lambda r: r.doc.get("number") != dialled)
        return _stored(Number, rows[0].fields()) if rows else None

    # --- internals ---

    async def _require(self, table: Table, obj_id: str) -> Row:
        row = self._rows.get((table, obj_id))
        if row is not None:
            return row
        generation = self._generation
        row = await self._store.get(table, obj_id)
        if row is None:
            raise NotFound(f"{_KIND[table]} {obj_id} not found", id=obj_id)
        if generation == self._generation:  # no write meanwhile: not stale
            self._rows[(table, obj_id)] = row
        return row

    def _changed(self) -> None:
        self._generation += 1
        self._rows.clear()

    async def _delete(self, table: Table, obj_id: str) -> None:
        self._changed()
        try:
            await self._store.delete(table, obj_id)
        finally:
            self._changed()

    async def _insert(self, table: Table, data: BaseModel) -> Row:
        now = _now()
        row = Row(id=str(uuid.uuid4()), doc=_doc(data), created_at=now, updated_at=now)
        await self._write(self._store.insert, table, row)
        return row

    async def _update(self, table: Table, row: Row, data: BaseModel) -> Row:
        new = Row(id=row.id, doc=_doc(data), created_at=row.created_at, updated_at=_now())
        await self._write(self._store.update, table, new)
        return new

    async def _write(
        self, op: Callable[[Table, Row], Awaitable[Any]], table: Table, row: Row
    ) -> None:
        # The checks above make these rare (another process writing the same file); map them
        # to the same errors the checks raise.
        self._changed()
        try:
            await op(table, row)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) and table == "numbers":
                raise Conflict(
                    f"number {row.doc.get('number')} already exists", field="number"
                ) from None
            if "FOREIGN KEY" in str(exc):
                raise InvalidInput("a referenced object does not exist") from None
            raise
        finally:
            self._changed()

    async def _refuse_if_used(self, table: Table, column: RefColumn, obj_id: str) -> None:
        numbers = await self._store.numbers_referencing(column, obj_id)
        if numbers:
            listed = ", ".join(n["number"] for n in numbers)
            raise Conflict(f"{_KIND[table]} {obj_id} is used by numbers: {listed}", numbers=numbers)

    async def _check_number(self, data: NumberIn, number_id: str | None) -> None:
        if data.assistant_id is not None and not await self._store.exists(
            "assistants", data.assistant_id
        ):
            raise InvalidInput(
                f"assistant {data.assistant_id} does not exist", field="assistant_id"
            )
        if data.transfer_trunk_id is not None and not await self._store.exists(
            "trunks", data.transfer_trunk_id
        ):
            raise InvalidInput(
                f"SIP trunk {data.transfer_trunk_id} does not exist", field="transfer_trunk_id"
            )
        for row in await self._store.numbers_by_value([data.number]):
            if row.id != number_id:
                raise Conflict(f"number {data.number} already exists", field="number", id=row.id)

    async def _run_hook(
        self, name: str, hook: Callable[[Any], Awaitable[None]] | None, arg: Any, trunk_id: str
    ) -> None:
        if hook is None:
            return
        try:
            async with asyncio.timeout(self._hook_timeout):
                await hook(arg)
        except Exception:
            # Never fail the request: the PBX layer re-provisions every trunk on (re)connect.
            log.exception("trunk hook failed", hook=name, trunk_id=trunk_id)


def _object(patch: Any, model: type[BaseModel]) -> dict[str, Any]:
    """The patch as an object whose keys are all fields of `model` (`{"nmae": null}` removes
    nothing: it is a mistake, refused as a non-null unknown key is)."""
    if not isinstance(patch, dict):
        raise InvalidInput("a PATCH body must be a JSON object")
    for key in patch:
        if key not in model.model_fields:
            message = "Extra inputs are not permitted"
            raise InvalidInput(
                f"{key}: {message}",
                field=key,
                errors=[{"field": key, "message": message, "type": "extra_forbidden"}],
            )
    return patch
