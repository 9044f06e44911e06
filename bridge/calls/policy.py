"""The toll-fraud policy: where a transfer may go, by which route, and how many at once.

Every transfer (control API, the assistant's tool, `POST /destinations/test`) asks
`TransferPolicy.authorize` first. It is fail-closed:

1. a call makes at most `transfer.max_per_call` transfers;
2. a SIP URI must pass the grammar of `bridge.sip` (no dialplan or routing characters, no
   routing parameters unless `transfer.allowed_uri_params` names them);
2b. a destination inside the PBX (`extension:`, `queue:`, `dialplan:`; issue 9) must be
   configured on the assistant, always: `allow_any` and the allow-lists do not open them;
3. with `transfer.allow_any = true`, anything that passes 1-2 may be dialled;
   with an allow-list (`allowed_prefixes`, `allowed_sip_domains`), every destination must match
   it: a number one of the prefixes, a SIP URI's host exactly one of the domains
   (case-insensitive); a kind with no list is refused (prefixes alone refuse every SIP URI);
   with neither, only the destinations configured on the call's assistant (or on the tested
   number's assistant, or on any assistant for an unbound test) may be dialled;
4. a number goes through the number's transfer trunk (looked up now), else
   `transfer.default_route`; a trunk with its own `allowed_prefixes` accepts only those, and
   they replace the global prefixes for that trunk;
5. the route must have a free leg (`transfer.max_legs_per_trunk`): checked here, so that a
   full trunk is refused like any other rule (403 to the API, `transfer.refused` on the call)
   rather than accepted and failed later.

A refusal raises `DestinationNotAllowed` whose `rule` detail names the setting that refused it;
the policy logs every refusal, the caller records it (`transfer.refused`). `claim_leg`/
`release_leg` count the concurrent legs per trunk; `claim_leg` refuses again (same rule) when
the last free leg went between `authorize` and the dial (during the transfer's message).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from bridge.calls.destinations import is_internal, parse_internal
from bridge.directory.models import E164, destination_address
from bridge.errors import DestinationNotAllowed, InvalidInput, NotFound
from bridge.log import get_logger
from bridge.pbx.ports import DialTarget
from bridge.sip import SipUriError, is_sip_uri, parse_sip_uri

if TYPE_CHECKING:
    from bridge.config import TransferSettings
    from bridge.directory.models import Assistant
    from bridge.directory.service import DirectoryService

log = get_logger(__name__)

# Rules named in refusals (the `rule` detail of the error and of `transfer.refused` events).
RULE_MAX_PER_CALL = "transfer.max_per_call"
RULE_GRAMMAR = "sip_uri.grammar"
RULE_URI_PARAMS = "transfer.allowed_uri_params"
RULE_PREFIXES = "transfer.allowed_prefixes"
RULE_DOMAINS = "transfer.allowed_sip_domains"
RULE_CONFIGURED = "assistant.destinations"
RULE_MAX_LEGS = "transfer.max_legs_per_trunk"
RULE_INTERNAL_GRAMMAR = "internal.grammar"


def trunk_rule(trunk_id: str) -> str:
    return f"sip_trunks.{trunk_id}.allowed_prefixes"


class TransferLimitReached(DestinationNotAllowed):
    """Too many legs at once on a trunk (`transfer.max_legs_per_trunk`)."""


class TransferPolicy:
    def __init__(self, settings: TransferSettings, directory: DirectoryService) -> None:
        self.settings = settings
        self.directory = directory
        self._legs: Counter[str] = Counter()
        self._params = frozenset(settings.allowed_uri_params)
        self._domains = frozenset(d.lower() for d in settings.allowed_sip_domains)
        self._prefixes = tuple(settings.allowed_prefixes)

    # --- the decision -----------------------------------------------------------------------

    async def authorize(
        self,
        destination: str,
        *,
        number_id: str | None,
        assistant: Assistant | None,
        source: str,
        transfers_in_call: int,
    ) -> DialTarget:
        """The route for `destination`, or DestinationNotAllowed (with `rule`) / InvalidInput
        (not a destination, or no route for a number)."""
        try:
            if transfers_in_call >= self.settings.max_per_call:
                raise self._refusal(
                    f"this call has already made {transfers_in_call} transfers "
                    f"(transfer.max_per_call = {self.settings.max_per_call})",
                    RULE_MAX_PER_CALL,
                )
            if is_internal(destination):
                target = await self._authorize_internal(destination, number_id, assistant, source)
            elif is_sip_uri(destination):
                target = await self._authorize_uri(destination, number_id, assistant, source)
            else:
                target = await self._authorize_number(destination, number_id, assistant, source)
            self._check_free_leg(target)
            return target
        except DestinationNotAllowed as exc:
            log.warning(
                "transfer.refused",
                rule=exc.details.get("rule"),
                destination=destination,
                source=source,
                reason=exc.message,
            )
            raise

    async def _authorize_internal(
        self, destination: str, number_id: str | None, assistant: Assistant | None, source: str
    ) -> DialTarget:
        """A destination inside the PBX (extension, queue, dialplan target): only those
        configured on the assistant, whatever `allow_any` and the allow-lists say (a dialplan
        target may lead anywhere the PBX can dial, trunks included)."""
        try:
            target = parse_internal(destination)
        except ValueError as exc:
            raise self._refusal(str(exc), RULE_INTERNAL_GRAMMAR) from exc
        if destination not in await self._configured(number_id, assistant, source):
            raise self._refusal(
                "destinations inside the PBX must be configured on the assistant "
                "(allow_any and the allow-lists do not open them)",
                RULE_CONFIGURED,
            )
        return target

    async def _authorize_uri(
        self, destination: str, number_id: str | None, assistant: Assistant | None, source: str
    ) -> DialTarget:
        try:
            uri = parse_sip_uri(destination, allowed_params=self._params)
        except SipUriError as exc:
            rule = RULE_URI_PARAMS if "parameter" in str(exc) else RULE_GRAMMAR
            raise self._refusal(str(exc), rule) from exc
        if self._domains:
            if uri.host not in self._domains:
                raise self._refusal(
                    f"SIP host {uri.host} is not in transfer.allowed_sip_domains", RULE_DOMAINS
                )
        elif self._prefixes:
            raise self._refusal(
                "SIP URIs are refused: transfer.allowed_prefixes is set and "
                "transfer.allowed_sip_domains is not",
                RULE_DOMAINS,
            )
        elif not self.settings.allow_any:
            configured = await self._configured(number_id, assistant, source)
            if not any(_same_uri(uri, c) for c in configured if is_sip_uri(c)):
                raise self._not_configured()
        return DialTarget(sip_uri=destination)

    async def _authorize_number(
        self, destination: str, number_id: str | None, assistant: Assistant | None, source: str
    ) -> DialTarget:
        if not E164.match(destination):
            raise InvalidInput(
                "must be an E.164 number (+31612345678) or a SIP URI (sip:...)",
                field="destination",
            )
        target = await self._route(number_id, destination)
        trunk_prefixes = await self._trunk_prefixes(target.trunk_id)
        if trunk_prefixes:
            assert target.trunk_id is not None
            if not destination.startswith(trunk_prefixes):
                raise self._refusal(
                    f"number is not in the allowed_prefixes of trunk {target.trunk_id}",
                    trunk_rule(target.trunk_id),
                )
        elif self._prefixes:
            if not destination.startswith(self._prefixes):
                raise self._refusal("number is not in transfer.allowed_prefixes", RULE_PREFIXES)
        elif self._domains:
            raise self._refusal(
                "numbers are refused: transfer.allowed_sip_domains is set and "
                "transfer.allowed_prefixes is not",
                RULE_PREFIXES,
            )
        elif not self.settings.allow_any:
            if destination not in await self._configured(number_id, assistant, source):
                raise self._not_configured()
        return target

    async def _route(self, number_id: str | None, destination: str) -> DialTarget:
        """E.164 goes through the number's transfer trunk (looked up now: a PATCH during the
        call counts), else the default route."""
        trunk_id = None
        if number_id:
            try:
                trunk_id = (await self.directory.get_number(number_id)).transfer_trunk_id
            except NotFound:
                trunk_id = None
        if trunk_id:
            return DialTarget(number=destination, trunk_id=trunk_id)
        route = self.settings.default_route
        if route:
            return DialTarget(number=destination, route=route)
        raise InvalidInput(
            "no route for this number: give the call's number a transfer_trunk_id, "
            "set transfer.default_route, or transfer to a SIP URI",
            field="destination",
        )

    async def _trunk_prefixes(self, trunk_id: str | None) -> tuple[str, ...]:
        if not trunk_id:
            return ()
        try:
            trunk = await self.directory.get_trunk(trunk_id)
        except NotFound:
            return ()  # the PBX refuses a leg through a trunk that no longer exists
        return tuple(getattr(trunk, "allowed_prefixes", None) or ())

    async def _configured(
        self, number_id: str | None, assistant: Assistant | None, source: str
    ) -> list[str]:
        """The destinations configured where this transfer comes from: the call's assistant;
        for a test, the tested number's assistant, or every assistant when no number is
        named."""
        if assistant is None and number_id:
            try:
                number = await self.directory.get_number(number_id)
                if number.assistant_id:
                    assistant = await self.directory.get_assistant(number.assistant_id)
            except NotFound:
                assistant = None
        assistants = [assistant] if assistant is not None else []
        if assistant is None and number_id is None and source == "test":
            assistants = await self.directory.list_assistants()
        return [destination_address(d) for a in assistants for d in a.destinations()]

    def _not_configured(self) -> DestinationNotAllowed:
        return self._refusal(
            "not one of the assistant's transfer destinations (no allow-list is set and "
            "transfer.allow_any is false)",
            RULE_CONFIGURED,
        )

    @staticmethod
    def _refusal(reason: str, rule: str) -> DestinationNotAllowed:
        return DestinationNotAllowed(
            f"refused by the transfer policy ({rule}): {reason}", field="destination", rule=rule
        )

    # --- concurrent legs --------------------------------------------------------------------

    def claim_leg(self, target: DialTarget) -> None:
        """Count one more leg on the target's trunk; TransferLimitReached over the cap."""
        try:
            self._check_free_leg(target)
        except TransferLimitReached as exc:
            log.warning("transfer.refused", rule=RULE_MAX_LEGS, reason=exc.message)
            raise
        self._legs[_leg_key(target)] += 1

    def _check_free_leg(self, target: DialTarget) -> None:
        key = _leg_key(target)
        cap = self.settings.max_legs_per_trunk
        if cap is not None and self._legs[key] >= cap:
            raise TransferLimitReached(
                f"refused by the transfer policy ({RULE_MAX_LEGS}): {self._legs[key]} legs "
                f"already up on {key}",
                field="destination",
                rule=RULE_MAX_LEGS,
            )

    def release_leg(self, target: DialTarget) -> None:
        key = _leg_key(target)
        if self._legs[key] > 1:
            self._legs[key] -= 1
        else:
            self._legs.pop(key, None)

    def legs(self, target: DialTarget) -> int:
        return self._legs[_leg_key(target)]

    # --- start-up ---------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        s = self.settings
        if s.allow_any:
            mode = "allow_any"
        elif self._prefixes or self._domains:
            mode = "allow_lists"
        else:
            mode = "assistant_destinations"
        return {
            "mode": mode,
            "allowed_prefixes": list(self._prefixes),
            "allowed_sip_domains": sorted(self._domains),
            "sip_uris": "refused" if self._prefixes and not self._domains else "allowed",
            "allowed_uri_params": sorted(self._params),
            "trunk_prefixes": "a trunk's own allowed_prefixes replace allowed_prefixes",
            "max_per_call": s.max_per_call,
            "max_legs_per_trunk": s.max_legs_per_trunk,
            "default_route": s.default_route,
        }

    def log_start(self) -> None:
        """The policy in force, once at start-up; `allow_any` loudly."""
        info: dict[str, Any] = self.describe()
        if self.settings.allow_any:
            log.warning(
                "transfer.policy_open",
                message="transfer.allow_any = true: ANY destination may be dialled through "
                "your trunks by any API key holder or assistant (toll-fraud risk)",
                **info,
            )
        else:
            log.info("transfer.policy", **info)


def _same_uri(uri: Any, configured: str) -> bool:
    try:
        return bool(parse_sip_uri(configured, allowed_params=[p for p, _ in uri.params]) == uri)
    except SipUriError:
        return False


def _leg_key(target: DialTarget) -> str:
    if target.trunk_id:
        return f"trunk:{target.trunk_id}"
    if target.internal:
        return "internal"
    if target.sip_uri:
        try:
            return f"sip:{parse_sip_uri(target.sip_uri.split(';', 1)[0]).host}"
        except SipUriError:
            return "sip:?"
    return f"route:{target.route}"
