"""Prometheus metrics (prometheus-client), fed by what callbridge already records.

Calls, transfers and the agent's turn timings come from the call store's commits (contract 1:
`CallStore.subscribe`, after commit), so a metric counts exactly what the database holds.
API requests come from the API middleware, the PBX connection from the adapter's connected
flag and its `on_connected` callback. Each daemon has its own registry (tests run several).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from bridge.calls import policy as _policy
from bridge.calls.model import CallStatus
from bridge.calls.store import StoreChange
from bridge.calls.transfer import Transfer, TransferState
from bridge.llm.tools import END_CALL, TRANSFER_CALL

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "end_reason_label"]

# Seconds. Transfers ring for up to tens of seconds; turns take a fraction of one.
_RING_BUCKETS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)
_TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10)

# Calls whose assistant label is kept for their `call.ended` (far above the calls one daemon
# carries at once): a call that never records `call.ended` in this process (another instance
# ended it, a lost record) must not stay in memory for ever.
MAX_TRACKED_CALLS = 10_000
# Calls saved as ended whose `call.ended` event comes in a later commit (a save, then the
# event): their label waits here, a short bounded while.
MAX_ENDING_CALLS = 1_000

_FINAL_KINDS = frozenset(
    {"transfer.completed", "transfer.failed", "transfer.cancelled", "transfer.handed_off"}
)

# Free-text end reasons mapped to a few label values (a label must not take unbounded values).
_END_REASONS: tuple[tuple[str, str], ...] = (
    ("caller hung up", "caller_hung_up"),
    ("ended by command", "ended_by_command"),
    ("handed off", "handed_off"),
    ("destination hung up", "destination_hung_up"),
    ("internal error", "internal_error"),
    ("unknown number", "unknown_number"),
    ("number has no assistant", "no_assistant"),
    ("overload", "refused_overload"),
    ("refused", "refused_overload"),
    ("channel gone", "channel_gone"),
    ("missed", "missed"),
    ("fallback", "sent_to_fallback"),
)


def end_reason_label(reason: str | None) -> str:
    text = (reason or "").lower()
    for needle, label in _END_REASONS:
        if needle in text:
            return label
    return "other" if text else "unknown"


def _seconds_between(
    history: list[tuple[TransferState, datetime]],
    start: set[TransferState],
    end: set[TransferState],
) -> float | None:
    started = next((at for s, at in history if s in start), None)
    ended = next((at for s, at in history if s in end), None)
    if started is None or ended is None or ended < started:
        return None
    return (ended - started).total_seconds()


class _Live(Collector):
    """Gauges read when scraped: active calls per assistant, the PBX connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        active = GaugeMetricFamily(
            "callbridge_calls_active", "Calls served now, by assistant", labels=["assistant"]
        )
        for assistant, n in sorted(self.metrics.active_source().items()):
            active.add_metric([assistant], n)
        yield active
        pbx = GaugeMetricFamily(
            "callbridge_pbx_connected", "1 when the PBX control connection is up", labels=["pbx"]
        )
        pbx.add_metric([self.metrics.pbx_name], 1.0 if self.metrics.connected_source() else 0.0)
        yield pbx

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    def __init__(
        self,
        pbx_name: str = "asterisk",
        *,
        active: Callable[[], Mapping[str, int]] | None = None,
        connected: Callable[[], bool] | None = None,
        max_tracked: int = MAX_TRACKED_CALLS,
        max_ending: int = MAX_ENDING_CALLS,
    ) -> None:
        self.pbx_name = pbx_name
        self.max_tracked = max_tracked
        self.max_ending = max_ending
        self.active_source: Callable[[], Mapping[str, int]] = active or dict
        self.connected_source: Callable[[], bool] = connected or (lambda: False)
        # call id -> assistant label, while the call lasts (bounded, least recent out first)
        self._assistant_of: OrderedDict[str, str] = OrderedDict()
        self._ending: OrderedDict[str, str] = OrderedDict()  # ended, call.ended not seen yet
        self._connects = 0
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.calls_started = Counter(
            "callbridge_calls_started",
            "Calls that arrived, by assistant",
            ["assistant"],
            registry=r,
        )
        self.calls_ended = Counter(
            "callbridge_calls_ended",
            "Calls that ended, by assistant and end reason",
            ["assistant", "reason"],
            registry=r,
        )
        self.transfers_requested = Counter(
            "callbridge_transfers_requested",
            "Transfers requested",
            ["source", "destination", "mode"],
            registry=r,
        )
        self.transfers = Counter(
            "callbridge_transfers",
            "Settled transfers by source, destination, mode and outcome",
            ["source", "destination", "mode", "outcome"],
            registry=r,
        )
        self.transfers_refused = Counter(
            "callbridge_transfers_refused",
            "Transfers the toll-fraud policy refused (transfer.refused), by source and rule:"
            " the toll-fraud alerting signal",
            ["source", "rule"],
            registry=r,
        )
        self.ring_seconds = Histogram(
            "callbridge_transfer_ring_seconds",
            "From placing the transfer leg to its answer or failure",
            ["destination"],
            buckets=_RING_BUCKETS,
            registry=r,
        )
        self.decided_to_bridged = Histogram(
            "callbridge_transfer_decided_to_bridged_seconds",
            "From the transfer decision (requested) to caller and destination bridged",
            ["destination"],
            buckets=_RING_BUCKETS,
            registry=r,
        )
        self.turn_latency = Histogram(
            "callbridge_turn_latency_seconds",
            "End of the caller's speech to the first frame of the assistant's reply audio sent"
            " to the caller",
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.stt_seconds = Histogram(
            "callbridge_stt_seconds",
            "End of the caller's speech to its transcript",
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.llm_seconds = Histogram(
            "callbridge_llm_seconds",
            "Transcript to the model's first token or tool call",
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.tts_seconds = Histogram(
            "callbridge_tts_seconds",
            "Synthesis time of one spoken sentence",
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "callbridge_assistant_tool_calls",
            "Tool calls made by the assistant",
            ["tool"],
            registry=r,
        )
        self.pbx_reconnects = Counter(
            "callbridge_pbx_reconnects",
            "PBX control connections re-established after a loss",
            ["pbx"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "callbridge_webhook_attempts",
            "Webhook delivery attempts by event and result (delivered, retry, gave_up)",
            ["event", "result"],
            registry=r,
        )
        self.api_requests = Counter(
            "callbridge_api_requests",
            "API requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        r.register(_Live(self))
        self.pbx_reconnects.labels(pbx_name)  # exported as 0 before the first reconnect

    # --- sources ----------------------------------------------------------------------------

    def pbx_connected(self) -> None:
        """The adapter's on_connected callback: every connect after the first is a reconnect."""
        self._connects += 1
        if self._connects > 1:
            self.pbx_reconnects.labels(self.pbx_name).inc()

    def webhook_attempt(self, event: str, result: str) -> None:
        self.webhook_attempts.labels(event, result).inc()

    def api_request(self, route: str, method: str, status: int) -> None:
        self.api_requests.labels(route, method, str(status)).inc()

    def tracked_calls(self) -> int:
        """Calls whose assistant label is held (for their `call.ended`)."""
        return len(self._assistant_of) + len(self._ending)

    def _track(self, call_id: str, assistant: str, *, replace: bool) -> None:
        if call_id in self._assistant_of and not replace:
            return
        self._assistant_of[call_id] = assistant
        self._assistant_of.move_to_end(call_id)
        while len(self._assistant_of) > self.max_tracked:
            self._assistant_of.popitem(last=False)

    def on_change(self, change: StoreChange) -> None:
        """`CallStore` after-commit subscriber."""
        call_id = change.call_id or ""
        call = change.call
        ended = call is not None and call.status is CallStatus.ENDED
        if call is not None and call.assistant_id and not ended:
            self._track(call_id, call.assistant_id, replace=False)
        for event in change.events:
            kind, data = event.kind, event.data
            if kind == "call.started":
                assistant = data.get("assistant_id") or "none"
                self._track(call_id, assistant, replace=True)
                self.calls_started.labels(assistant).inc()
            elif kind == "call.ended":
                assistant = (
                    self._assistant_of.pop(call_id, None)
                    or self._ending.pop(call_id, None)
                    or (call.assistant_id if call is not None else None)
                    or "none"
                )
                self.calls_ended.labels(assistant, end_reason_label(data.get("reason"))).inc()
            elif kind == "transfer.requested" and change.transfer is not None:
                t = change.transfer
                self.transfers_requested.labels(t.source, destination_label(t), t.mode).inc()
            elif kind == "transfer.refused":
                self.transfers_refused.labels(
                    source_label(data.get("source")), rule_label(data.get("rule"))
                ).inc()
            elif kind in _FINAL_KINDS and change.transfer is not None:
                self._settled(change.transfer)
            elif kind == "transcript":
                self._transcript(data)
            elif kind == "assistant.first_audio" and isinstance(data.get("turn_ms"), int | float):
                self.turn_latency.observe(data["turn_ms"] / 1000)
            elif kind == "assistant.said" and isinstance(data.get("tts_ms"), int | float):
                self.tts_seconds.observe(data["tts_ms"] / 1000)
        if ended:
            # A terminal status: the call's label leaves the map now; its call.ended, if it
            # comes in a later commit, finds it in the short `_ending` list.
            held = self._assistant_of.pop(call_id, None)
            if held is not None:
                self._ending[call_id] = held
                while len(self._ending) > self.max_ending:
                    self._ending.popitem(last=False)

    def _settled(self, t: Transfer) -> None:
        dest = destination_label(t)
        outcome = t.outcome.value if t.outcome is not None else t.state.value
        self.transfers.labels(t.source, dest, t.mode, outcome).inc()
        S = TransferState
        ring = _seconds_between(
            t.history, {S.DIALING}, {S.ANSWERED, S.FAILED, S.CANCELLED, S.BRIDGED}
        )
        if ring is not None:
            self.ring_seconds.labels(dest).observe(ring)
        if t.state is S.BRIDGED:
            bridged = _seconds_between(t.history, {S.ANNOUNCING}, {S.BRIDGED})
            if bridged is not None:
                self.decided_to_bridged.labels(dest).observe(bridged)

    def destination_test_refused(self, rule: str | None) -> None:
        """A `POST /destinations/test` the policy refused: no call records it, so the probe
        tells us directly (`source="test"`)."""
        self.transfers_refused.labels("test", rule_label(rule)).inc()

    def _transcript(self, data: dict[str, Any]) -> None:
        role = data.get("role")
        if role == "tool_call":
            self.tool_calls.labels(tool_label(data.get("tool"))).inc()
            return
        if role == "caller" and isinstance(data.get("stt_ms"), int | float):
            self.stt_seconds.observe(data["stt_ms"] / 1000)  # every heard turn has one
            return
        latency = data.get("latency_ms")
        if role != "assistant" or not isinstance(latency, dict):
            return
        # Marks are milliseconds from the end of the caller's speech (bridge.agent.voice); a
        # turn that only calls a tool has no spoken reply, hence no assistant entry. The turn
        # latency is not here: the text is recorded when the model has written it, before its
        # audio plays (`assistant.first_audio` has it).
        stt, llm = latency.get("stt"), latency.get("llm")
        if isinstance(stt, int | float) and isinstance(llm, int | float) and llm >= stt:
            self.llm_seconds.observe((llm - stt) / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# Label values outside the configured set: a Prometheus label must take a bounded number of
# values (every value is a time series, 15 for each histogram), and API transfers may name any
# number or SIP URI the policy allows, as the model may name any tool.
OTHER = "other"
_TOOLS = frozenset({TRANSFER_CALL, END_CALL})


def destination_label(t: Transfer) -> str:
    """The destination as operators name it: the description of an assistant's configured
    destination, else `other` (an API transfer's number or URI would be a label value per
    number dialled; /api/v1/analytics/transfers has them all)."""
    return t.label or OTHER


def tool_label(name: Any) -> str:
    return name if name in _TOOLS else OTHER


_SOURCES = frozenset({"api", "assistant", "test"})
_RULES = frozenset(
    {
        _policy.RULE_MAX_PER_CALL,
        _policy.RULE_GRAMMAR,
        _policy.RULE_URI_PARAMS,
        _policy.RULE_PREFIXES,
        _policy.RULE_DOMAINS,
        _policy.RULE_CONFIGURED,
        _policy.RULE_MAX_LEGS,
        _policy.RULE_INTERNAL_GRAMMAR,
    }
)
TRUNK_PREFIXES = "sip_trunks.allowed_prefixes"  # any trunk's own prefixes (trunk ids vary)


def source_label(source: Any) -> str:
    return source if source in _SOURCES else OTHER


def rule_label(rule: Any) -> str:
    """The policy rule that refused: one of the policy's rule names; a trunk's own prefixes
    (`sip_trunks.<id>.allowed_prefixes`) as one value, not one per trunk id."""
    if rule in _RULES:
        return str(rule)
    if (
        isinstance(rule, str)
        and rule.startswith("sip_trunks.")
        and rule.endswith(".allowed_prefixes")
    ):
        return TRUNK_PREFIXES
    return OTHER
