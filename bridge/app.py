"""Composition root: builds and wires every part of the daemon. Nothing imports this module."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiohttp import web

from bridge.agent.chat import ChatConsole, first_number_of
from bridge.agent.factory import AgentFactory
from bridge.agent.providers import AgentProviders
from bridge.api.ops import OpsContext
from bridge.api.server import create_api_app
from bridge.calls.admission import Admission, LoopLagMonitor
from bridge.calls.service import CallService
from bridge.calls.store import CallStore
from bridge.config import Settings
from bridge.directory.service import DirectoryService
from bridge.eventloop import running_loop_name
from bridge.log import configure_logging, get_logger
from bridge.ops.metrics import Metrics
from bridge.ops.trunks import trunk_states
from bridge.ops.webhooks import WebhookService, WebhookWorker, outbox_statements
from bridge.pbx.asterisk.adapter import AsteriskAdapter
from bridge.pbx.asterisk.ari import AriClient
from bridge.pbx.freeswitch.factory import build_freeswitch_adapter
from bridge.pbx.ports import PbxAdapter, TrunkSpec
from bridge.sip import configure_uri_params
from bridge.speech.tts import CachedTts, TtsProvider, assistant_phrases, make_tts
from bridge.store.db import Database
from bridge.trunks.reconciler import TrunkReconciler
from bridge.trunks.spec import trunk_spec

log = get_logger(__name__)


class Daemon:
    """Everything `callbridge run` starts, in one object so tests can run it in-process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.calls: CallService | None = None
        self.directory: DirectoryService | None = None
        self.providers: AgentProviders | None = None
        self.loop_lag: LoopLagMonitor | None = None
        self._runner: web.AppRunner | None = None
        self.api_port: int | None = None
        self.trunks: TrunkReconciler | None = None
        self.metrics: Metrics | None = None
        self.webhooks: WebhookWorker | None = None
        self.tts_cache: CachedTts | None = None  # speed: TTS cache
        self._priming: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        s = self.settings
        self.db = await Database.open(s.database)
        pbx = self._build_pbx()
        trunks = self.trunks
        assert trunks is not None
        self.directory = DirectoryService(
            self.db,
            on_trunk_saved=lambda t: trunks.push(trunk_spec(t)),
            on_trunk_deleted=trunks.drop,
        )
        # speed: what assistants say word for word is synthesised once (TTS cache), when
        # the daemon starts and when an assistant is saved.
        tts = self.tts_cache = CachedTts(self._build_tts())
        self.directory.on_assistant_saved = self._prime_assistant
        store = CallStore(self.db)
        self.calls = CallService(
            settings=s,
            pbx=pbx,
            pbx_name=s.pbx,
            store=store,
            directory=self.directory,
            tts=tts,
        )
        ops = self._start_ops(store)
        # The toll-fraud policy in force, logged once (allow_any loudly); the URI parameters it
        # allows also hold for API input and stored destinations.
        configure_uri_params(s.transfer.allowed_uri_params)
        self.calls.policy.log_start()
        if s.agent.enabled:
            # Speech and LLM providers: built once, models loaded before the first call.
            self.providers = AgentProviders(s)
            if s.agent.warm_up:
                await self.providers.warm_up()
                warm_tts = getattr(tts, "warm_up", None)  # piper loads a voice model
                if warm_tts is not None:
                    await warm_tts()
            self.calls.conversation_factory = AgentFactory(self.providers, s.agent)
        self._start_admission()
        self._prime_all()
        await self.calls.start()
        chat = (
            ChatConsole(
                self.directory.get_assistant,
                self.providers.llm_for,
                s.agent,
                policy=self.calls.policy,  # the console's transfers pass the toll-fraud policy
                number_of=first_number_of(self.directory),
            )
            if self.providers is not None
            else None
        )
        app = create_api_app(
            self.directory, self.calls, self.db, health=self._health, chat=chat, ops=ops
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.api.host, s.api.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.api_port = sockets[0].getsockname()[1] if sockets else s.api.port
        log.info(
            "callbridge.started",
            api=f"http://{s.api.host}:{self.api_port}",
            pbx=s.pbx,
            database=str(s.database),
            event_loop=running_loop_name(),  # `callbridge run` runs `event_loop` (uvloop)
            gil_switch_interval_ms=round(sys.getswitchinterval() * 1000, 2),
        )

    def _start_ops(self, store: CallStore) -> OpsContext:
        """Issue 10: metrics and webhooks, both fed by the call store's commits."""
        assert self.db is not None
        s = self.settings
        calls = self.calls
        if s.metrics.enabled:

            def active() -> dict[str, int]:
                counts: dict[str, int] = {}
                for session in calls.sessions() if calls is not None else []:
                    key = session.call.assistant_id or "none"
                    counts[key] = counts.get(key, 0) + 1
                return counts

            self.metrics = Metrics(
                s.pbx, active=active, connected=lambda: bool(calls and calls.connected)
            )
            store.subscribe(self.metrics.on_change)
            if calls is not None:  # destination tests have no call to record a refusal
                calls.probe.on_refused = self.metrics.destination_test_refused
        service = None
        if s.webhooks.enabled:
            attempts = self.metrics.webhook_attempt if self.metrics is not None else None
            self.webhooks = WebhookWorker(self.db, s.webhooks, on_attempt=attempts)
            store.subscribe(self.webhooks.on_change, in_transaction=outbox_statements)
            self.webhooks.start()  # sends what a previous run left in the outbox
            service = WebhookService(self.db, on_change=self.webhooks.kick)
        token = s.metrics.token.get_secret_value() if s.metrics.token else None
        directory = self.directory

        async def trunks() -> dict[str, Any]:
            assert calls is not None and directory is not None
            listed = await directory.list_trunks()
            return await trunk_states(listed, calls.connected, calls.pbx.provisioned_trunks)

        return OpsContext(
            self.metrics,
            service,
            metrics_token=token,
            metrics_allow_loopback=s.metrics.allow_loopback,
            trunk_states=trunks,
        )

    def _start_admission(self) -> None:
        """The event-loop lag monitor, and admission control for arriving calls."""
        assert self.calls is not None
        s = self.settings.calls
        self.loop_lag = LoopLagMonitor(window=s.lag_window_s, warn_ms=s.max_loop_lag_ms)
        self.loop_lag.start()
        calls = self.calls
        stt = self.providers.stt if self.providers is not None else None
        backlog = getattr(stt, "backlog", None)
        admission = Admission(
            s,
            active=lambda: calls.active_calls,
            lag=self.loop_lag,
            stt_backlog=(lambda: int(getattr(stt, "backlog", 0))) if backlog is not None else None,
            stt_workers=int(getattr(stt, "workers", 1)),
        )
        calls.admission = admission
        log.info("admission.policy", **admission.describe())

    def _build_pbx(self) -> PbxAdapter:
        adapter = self._build_adapter()
        # The directory's trunks, brought to the PBX on every connect (and retried there).
        self.trunks = TrunkReconciler(
            adapter,
            self._desired_trunks,
            connected=lambda: self.calls is not None and self.calls.connected,
        )
        return adapter

    def _build_adapter(self) -> PbxAdapter:
        s = self.settings
        if s.pbx == "freeswitch":
            return build_freeswitch_adapter(
                s.freeswitch,
                on_connected=self._pbx_connected,
                blind_context=s.transfer.blind_context,
                fallback_context=s.calls.fallback_context,
            )
        client = AriClient(
            s.ari.url,
            s.ari.username,
            s.ari.password.get_secret_value(),
            s.ari.app,
            request_timeout=s.ari.request_timeout,
            reconnect_initial_delay=s.ari.reconnect_initial_delay,
            reconnect_max_delay=s.ari.reconnect_max_delay,
        )
        return AsteriskAdapter(
            client, blind_context=s.transfer.blind_context, on_connected=self._pbx_connected
        )

    def _pbx_connected(self) -> None:
        if self.metrics is not None:
            self.metrics.pbx_connected()
        if self.trunks is not None:
            self.trunks.kick()

    # --- speed: TTS cache priming ---
    def _prime_assistant(self, assistant: Any) -> None:
        self._prime(assistant_phrases(assistant))

    def _prime_all(self) -> None:
        async def every() -> None:
            assert self.directory is not None
            a = self.settings.agent
            texts = [a.stt_hold_message, a.stt_failure_message, a.llm_failure_message]
            texts += [a.goodbye_message, self.settings.calls.default_greeting]
            for assistant in await self.directory.list_assistants():
                texts += assistant_phrases(assistant)
            if self.tts_cache is not None:
                await self.tts_cache.prime(texts)

        self._spawn_prime(every())

    def _prime(self, texts: list[str]) -> None:
        if self.tts_cache is not None:
            self._spawn_prime(self.tts_cache.prime(texts))

    def _spawn_prime(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._priming.add(task)
        task.add_done_callback(self._primed)

    def _primed(self, task: asyncio.Task[Any]) -> None:
        self._priming.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("tts.prime_failed", error=str(task.exception()))

    # --- end speed ---

    def _build_tts(self) -> TtsProvider:
        t = self.settings.tts
        cloud: dict[str, Any] = {}
        if t.engine == "openai":
            key = t.api_key.get_secret_value() if t.api_key else None
            cloud = {"base_url": t.base_url, "api_key": key, "model": t.model}
        return make_tts(t.engine, t.voice, sample_rate=8000, timeout=t.timeout, **cloud)

    async def _desired_trunks(self) -> list[TrunkSpec]:
        assert self.directory is not None
        return [trunk_spec(t) for t in await self.directory.list_trunks()]

    def _health(self) -> dict[str, Any]:
        connected = bool(self.calls and self.calls.connected)
        health: dict[str, Any] = {"pbx": self.settings.pbx, "pbx_connected": connected}
        if self.loop_lag is not None:
            # The event-loop lag metric (worst of the admission window) and what admission
            # control refused so far, by rule.
            health["loop_lag_ms"] = round(self.loop_lag.lag_ms(), 1)
            admission = self.calls.admission if self.calls is not None else None
            if admission is not None:
                health["calls_refused"] = dict(admission.refused)
        backlog = getattr(self.providers.stt if self.providers else None, "backlog", None)
        if backlog is not None:
            health["stt_backlog"] = backlog
        return health

    async def stop(self) -> None:
        for task in list(self._priming):  # speed: TTS cache priming
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.trunks is not None:
            await self.trunks.close()
        if self.calls is not None:
            await self.calls.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()  # undelivered rows stay in the outbox for the next run
        if self.loop_lag is not None:
            await self.loop_lag.stop()
            admission = self.calls.admission if self.calls is not None else None
            refused = dict(admission.refused) if admission is not None else {}
            log.info("loop.lag_stats", refused=refused, **self.loop_lag.stats())
            if self.db is not None:  # load2: what the database thread did
                log.info("db.stats", **self.db.stats.summary())
        if self.providers is not None:
            stt_stats = getattr(self.providers.stt, "stats", None)  # speed: STT throughput
            if stt_stats is not None:
                log.info("stt.stats", **stt_stats())
            await self.providers.aclose()
        if self.db is not None:
            await self.db.close()
        log.info("callbridge.stopped")


async def run_daemon(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    daemon = Daemon(settings)
    try:
        await daemon.start()
    except BaseException:
        # e.g. the API port is in use: close what did start (the database's thread would keep
        # the process alive), then let `callbridge run` report it in one line.
        await daemon.stop()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await daemon.stop()
