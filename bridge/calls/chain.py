"""Ordered fallback chains and the extension check (issue 9 §3): chains wrap runs, they do
not change them (`TransferRun` dials one destination; this module decides what comes next).

A transfer may name fallbacks (the control command's `fallbacks`, or the `fallbacks` of the
assistant's configured destination). Each attempt is its own `Transfer` (its own row, leg,
ringback and outcome), linked by `chain_id` (the first attempt's id) and `attempt` (its place
in the chain); what is left to try (`fallbacks`) and the earlier attempts' outcomes
(`attempts`) travel on the transfer, so a restarted daemon carries the chain on.

Rules:
- the next attempt starts when an attempt fails because of the destination (`MOVES_ON`:
  busy, no answer, declined, rejected, unreachable, and warm's voicemail); a local fault
  (`failed`: our PBX, daemon or route) or a caller who left ends the chain;
- the caller hears one announcement, the first destination's message, then ringback from
  one attempt to the next; the assistant's failure line comes once, when the chain is over;
- every fallback goes through the same `TransferPolicy`; a refused one is recorded
  (`transfer.refused`, `transfer.skipped`, an entry in `attempts`) and skipped; the chain
  counts as one transfer against `max_per_call`, and holds one leg at a time against
  `max_legs_per_trunk`;
- before an `extension` is dialled (chained or not), its state is asked of the PBX
  (`PbxAdapter.extension_state`): busy or offline, it is not rung; the attempt is recorded
  as failed with `skipped` saying why (outcome `busy` / `unreachable`), and the chain moves
  on. A state the PBX cannot tell (`unknown`) is dialled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.calls.model import CallEvent, TransferCommand, utcnow
from bridge.calls.transfer import Transfer, TransferEvent, TransferState
from bridge.calls.transferring import TransferDeps, TransferHost, TransferRun, open_transfer
from bridge.directory.models import destination_address
from bridge.errors import DestinationNotAllowed, InvalidInput
from bridge.pbx.ports import ExtensionState, LegOutcome

if TYPE_CHECKING:
    from bridge.config import TransferSettings
    from bridge.directory.models import Assistant

# Outcomes that are the destination's doing: the next one may do better. Strings, so that
# outcomes added by warm transfer (`voicemail`) need no change here.
MOVES_ON = frozenset({"busy", "no_answer", "declined", "rejected", "unreachable", "voicemail"})

_NOT_RUNG = {
    ExtensionState.BUSY: (LegOutcome.BUSY, "is busy (on a call)"),
    ExtensionState.OFFLINE: (LegOutcome.UNREACHABLE, "is offline (not registered)"),
}


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One fallback still to try: its address, its description (for people and the
    assistant) and its DTMF after answer."""

    destination: str
    label: str | None = None
    dtmf: str | None = None

    def doc(self) -> dict[str, Any]:
        return {"destination": self.destination, "label": self.label, "dtmf": self.dtmf}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ChainStep:
        return cls(str(doc["destination"]), doc.get("label"), doc.get("dtmf"))


@dataclass(frozen=True, slots=True)
class ChainContext:
    """What a chain needs of its call beyond `TransferHost` (the session builds it)."""

    deps: TransferDeps
    settings: TransferSettings
    assistant: Assistant | None
    new_id: Callable[[], str]
    counted: int  # transfers of the call before this chain (the policy's max_per_call)
    adopt: Callable[[TransferRun], None]  # the call runs this attempt from now on


def fallback_steps(command: TransferCommand, assistant: Assistant | None) -> list[ChainStep]:
    """The command's own fallbacks, else those configured on the assistant's destination it
    names; described (label, DTMF) from the assistant's configuration where it has them."""
    known = assistant.destinations() if assistant is not None else []
    configured = {destination_address(d): d for d in known}
    if command.fallbacks:
        addresses = list(command.fallbacks)
    else:
        first = configured.get(command.destination)
        addresses = [destination_address(f) for f in (getattr(first, "fallbacks", None) or [])]
    steps = []
    for address in addresses:
        dest = configured.get(address)
        steps.append(
            ChainStep(
                address,
                getattr(dest, "description", None),
                getattr(dest, "dtmf", None),
            )
        )
    return steps


def moves_on(transfer: Transfer) -> bool:
    """The attempt failed because of its destination: the chain tries the next one."""
    return (
        transfer.state is TransferState.FAILED
        and transfer.outcome is not None
        and transfer.outcome.value in MOVES_ON
        and not transfer.local_fault
    )


def attempt_record(transfer: Transfer) -> dict[str, Any]:
    """One attempt as `attempts` lists it."""
    return {
        "attempt": transfer.attempt,
        "transfer_id": transfer.id,
        "destination": transfer.destination,
        "outcome": transfer.outcome.value if transfer.outcome else transfer.state.value,
        "reason": transfer.reason,
        "skipped": transfer.skipped is not None,
    }


async def open_chain(
    host: TransferHost,
    ctx: ChainContext,
    command: TransferCommand,
    *,
    source: str,
    label: str | None,
) -> TransferRun:
    """Authorise the first destination (a refusal raises, as for any transfer) and attach the
    chain's fallbacks to it. The host adopts the run, then `launch`es it."""
    run = await _open(host, ctx, command, source=source, label=label)
    transfer = run.transfer
    # An explicit blind transfer has no chain (callbridge never sees its outcome; the API
    # refuses `fallbacks` with it); a blind default gives way to bridging when there is one.
    steps = fallback_steps(command, ctx.assistant) if command.mode != "blind" else []
    if steps:
        transfer.chain_id = transfer.id
        if transfer.mode == "blind":
            transfer.mode = "bridge"
        transfer.fallbacks = [step.doc() for step in steps]
    return run


async def _open(
    host: TransferHost,
    ctx: ChainContext,
    command: TransferCommand,
    *,
    source: str,
    label: str | None,
) -> TransferRun:
    """One attempt through the toll-fraud policy: the chain counts as one transfer."""
    return await open_transfer(
        host,
        ctx.deps,
        command,
        transfer_id=ctx.new_id(),
        settings=ctx.settings,
        assistant=ctx.assistant,
        source=source,
        label=label,
        transfers_in_call=ctx.counted,
    )


async def launch(host: TransferHost, ctx: ChainContext, run: TransferRun) -> None:
    """Start an attempt: an extension the PBX reports busy or offline is not rung (the
    attempt fails at once, and `next_attempt` moves on); anything else begins."""
    transfer = run.transfer
    if transfer.chain_id is not None:
        await host.record(
            "transfer.attempt",
            transfer_id=transfer.id,
            chain_id=transfer.chain_id,
            attempt=transfer.attempt,
            destination=transfer.destination,
        )
    endpoint = transfer.target.endpoint
    if endpoint and transfer.mode != "blind":  # blind: the dialplan decides
        state = await ctx.deps.pbx.extension_state(endpoint)
        if state in _NOT_RUNG:
            outcome, why = _NOT_RUNG[state]
            transfer.skipped = f"extension {endpoint} {why}: not rung"
            host.log.info("transfer.skipped", transfer_id=transfer.id, state=state.value)
            await host.record(
                "transfer.skipped",
                transfer_id=transfer.id,
                chain_id=transfer.chain_id,
                attempt=transfer.attempt,
                destination=transfer.destination,
                state=state.value,
                reason=transfer.skipped,
            )
            await run.fail(TransferEvent.ERROR, outcome, reason=transfer.skipped)
            return
    await run.begin()


async def next_attempt(host: TransferHost, ctx: ChainContext, failed: Transfer) -> bool:
    """`failed` is final and FAILED: start the chain's next attempt and return True, or
    complete the chain's record (every attempt on its last transfer) and return False: the
    caller is then back with the assistant, which is told once."""
    if failed.chain_id is None:
        return False
    attempts = [*failed.attempts, attempt_record(failed)]
    if moves_on(failed):
        steps = [ChainStep.from_doc(doc) for doc in failed.fallbacks]
        # Not dialled (skipped): the announcement was not heard yet; the next attempt says it.
        announcement = failed.message if failed.skipped else None
        for index, step in enumerate(steps):
            number = failed.attempt + 1 + index
            command = TransferCommand(
                type="transfer",
                destination=step.destination,
                message=announcement,
                mode=failed.mode,  # the chain's (never blind: see `open_chain`)
                ring_timeout=failed.ring_timeout,
                summary=failed.summary,
            )
            try:
                run = await _open(host, ctx, command, source=failed.source, label=step.label)
            except (DestinationNotAllowed, InvalidInput) as exc:
                rule = exc.details.get("rule") if isinstance(exc.details, dict) else None
                attempts.append(
                    {
                        "attempt": number,
                        "transfer_id": None,
                        "destination": step.destination,
                        "outcome": "refused",
                        "reason": exc.message,
                        "rule": rule,
                        "skipped": True,
                    }
                )
                await host.record(
                    "transfer.skipped",
                    chain_id=failed.chain_id,
                    attempt=number,
                    destination=step.destination,
                    rule=rule,
                    reason=exc.message,
                )
                continue
            transfer = run.transfer
            transfer.chain_id, transfer.attempt = failed.chain_id, number
            transfer.fallbacks = [s.doc() for s in steps[index + 1 :]]
            transfer.attempts = attempts
            transfer.dtmf = step.dtmf or transfer.dtmf
            ctx.adopt(run)
            await launch(host, ctx, run)
            return True
    # The chain is over: its last transfer holds every attempt, itself included.
    failed.attempts = attempts
    over = CallEvent(
        "transfer.attempts_ended",
        utcnow(),
        {"transfer_id": failed.id, "chain_id": failed.chain_id, "attempts": len(attempts)},
    )
    await host.save(failed, event=over)
    return False
