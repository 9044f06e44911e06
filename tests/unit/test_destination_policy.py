"""Where a transfer may go: routing by the number's trunk, and the toll-fraud guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.calls.service import CallService
from bridge.calls.store import CallStore
from bridge.config import Settings
from bridge.directory.models import NumberIn, TrunkIn
from bridge.directory.service import DirectoryService
from bridge.errors import DestinationNotAllowed, InvalidInput
from bridge.pbx.ports import DialTarget
from bridge.store.db import Database


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    db = await Database.open(tmp_path / "cb.sqlite3")
    directory = DirectoryService(db)
    yield db, directory
    await db.close()


def service(directory: DirectoryService, db: Database, **transfer: Any) -> CallService:
    settings = Settings(transfer=transfer)
    return CallService(
        settings=settings,
        pbx=None,  # type: ignore[arg-type]  # routing never touches the PBX
        pbx_name="asterisk",
        store=CallStore(db),
        directory=directory,
        tts=None,  # type: ignore[arg-type]
    )


async def test_e164_goes_through_the_numbers_trunk_then_the_default_route(world: Any) -> None:
    db, directory = world
    trunk = await directory.create_trunk(TrunkIn(name="t", host="pbx.example.com"))
    number = await directory.create_number(NumberIn(number="+31201234567"))
    svc = service(directory, db, default_route="PJSIP/{number}@carrier")
    assert await svc.resolve_destination(number.id, "+31612345678") == DialTarget(
        number="+31612345678", route="PJSIP/{number}@carrier"
    )
    await directory.patch_number(number.id, {"transfer_trunk_id": trunk.id})
    assert await svc.resolve_destination(number.id, "+31612345678") == DialTarget(
        number="+31612345678", trunk_id=trunk.id
    )
    assert await svc.resolve_destination(None, "sip:bob@example.com") == DialTarget(
        sip_uri="sip:bob@example.com"
    )
    with pytest.raises(InvalidInput) as info:
        await service(directory, db).resolve_destination(None, "+31612345678")
    assert info.value.field == "destination"


async def test_toll_fraud_guard(world: Any) -> None:
    db, directory = world
    svc = service(
        directory,
        db,
        default_route="PJSIP/{number}@carrier",
        allowed_prefixes=["+316", "+3120"],
        allowed_sip_domains=["pbx.example.com"],
    )
    await svc.resolve_destination(None, "+31612345678")
    await svc.resolve_destination(None, "sip:alice@PBX.example.com:5060;transport=udp")
    for bad in ("+900123456789", "+4420123456", "sip:alice@evil.example.net"):
        with pytest.raises(DestinationNotAllowed) as info:
            await svc.resolve_destination(None, bad)
        assert info.value.field == "destination"
