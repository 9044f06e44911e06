"""The trunk reconciler brings any PBX port to the directory's trunks (a fake port here; the
real Asterisk is covered by tests/integration/test_asterisk_resilience.py)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import PbxUnavailable
from bridge.pbx.ports import TrunkSpec
from bridge.trunks.reconciler import TrunkReconciler


def spec(trunk_id: str) -> TrunkSpec:
    return TrunkSpec(trunk_id, "127.0.0.1", 5060, "udp", None, None, False)


class FakePbx:
    def __init__(self, present: set[str]) -> None:
        self.present = set(present)
        self.calls: list[str] = []
        self.fail_provision: dict[str, int] = {}  # trunk id -> failures left
        self.fail_list = 0

    async def provision_trunk(self, trunk: TrunkSpec) -> None:
        self.calls.append(f"provision {trunk.id}")
        if self.fail_provision.get(trunk.id, 0) > 0:
            self.fail_provision[trunk.id] -= 1
            raise PbxUnavailable("injected")
        self.present.add(trunk.id)

    async def remove_trunk(self, trunk_id: str) -> None:
        self.calls.append(f"remove {trunk_id}")
        self.present.discard(trunk_id)

    async def provisioned_trunks(self) -> set[str]:
        if self.fail_list > 0:
            self.fail_list -= 1
            raise PbxUnavailable("injected")
        return set(self.present)


async def test_a_run_provisions_every_trunk_and_removes_the_stale_ones() -> None:
    pbx = FakePbx(present={"a", "stale"})
    desired = [spec("a"), spec("b")]

    async def directory() -> list[TrunkSpec]:
        return desired

    reconciler = TrunkReconciler(pbx, directory)
    await reconciler.run_once()
    assert pbx.present == {"a", "b"}
    assert sorted(pbx.calls) == ["provision a", "provision b", "remove stale"]


async def test_failures_are_retried_in_the_background_and_do_not_hold_other_trunks() -> None:
    pbx = FakePbx(present=set())
    pbx.fail_provision = {"bad": 2}
    pbx.fail_list = 1

    async def directory() -> list[TrunkSpec]:
        return [spec("bad"), spec("good")]

    reconciler = TrunkReconciler(pbx, directory, retry_initial=0.001, retry_max=0.01)
    reconciler.kick()  # returns at once: the caller (a reconnect) never waits on it
    assert not reconciler.settled.is_set()
    await asyncio.wait_for(reconciler.settled.wait(), 5)
    assert pbx.present == {"bad", "good"}
    # The first run failed listing, the second provisioned "good" despite "bad" failing.
    assert pbx.calls.count("provision good") >= 1
    assert pbx.calls.index("provision good") < len(pbx.calls) - 1
    await reconciler.close()


async def test_a_trunk_saved_during_a_run_is_not_taken_for_a_stale_one() -> None:
    """The directory saves (and provisions) a trunk between the run's two reads: whichever
    read comes first, the run must not remove it."""
    pbx = FakePbx(present=set())
    saved: list[TrunkSpec] = []
    reads = 0

    def read_done() -> None:
        nonlocal reads
        reads += 1
        if reads == 1:  # between the first and the second read
            saved.append(spec("new"))
            pbx.present.add("new")

    real_list = pbx.provisioned_trunks

    async def listing() -> set[str]:
        result = await real_list()
        read_done()
        return result

    async def directory() -> list[TrunkSpec]:
        result = list(saved)
        read_done()
        return result

    pbx.provisioned_trunks = listing  # type: ignore[method-assign]
    await TrunkReconciler(pbx, directory).run_once()
    assert "remove new" not in pbx.calls
    assert pbx.present == {"new"}


async def test_a_saved_or_deleted_trunk_reaches_a_connected_pbx_at_once() -> None:
    pbx = FakePbx(present={"old"})
    connected = True
    desired = [spec("new")]

    async def directory() -> list[TrunkSpec]:
        return desired

    reconciler = TrunkReconciler(pbx, directory, connected=lambda: connected)
    await reconciler.push(spec("new"))
    await reconciler.drop("old")
    assert pbx.calls == ["provision new", "remove old"] and pbx.present == {"new"}
    assert reconciler.runs == 0  # no run was needed

    connected = False  # the next connect's run does it: nothing is sent meanwhile
    await reconciler.push(spec("later"))
    await reconciler.drop("new")
    assert pbx.calls == ["provision new", "remove old"]


async def test_a_push_the_pbx_refuses_fails_the_save_and_is_retried_until_taken() -> None:
    pbx = FakePbx(present=set())
    pbx.fail_provision = {"t": 2}

    async def directory() -> list[TrunkSpec]:
        return [spec("t")]

    reconciler = TrunkReconciler(pbx, directory, retry_initial=0.001, retry_max=0.01)
    with pytest.raises(PbxUnavailable):  # the save sees the PBX's refusal
        await reconciler.push(spec("t"))
    await asyncio.wait_for(reconciler.settled.wait(), 5)  # the background run took it
    assert pbx.present == {"t"} and pbx.calls.count("provision t") == 3
    await reconciler.close()
