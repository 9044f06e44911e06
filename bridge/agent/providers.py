"""The speech and LLM providers, built once per daemon and shared by every call.

Models are loaded once per process (whisper, silero, MiniLM); what is per call (the VAD's
recurrent state, the turn detector, the chat history) lives in each `VoiceAgent`. Remote
providers share one aiohttp session (one connection pool, kept alive between turns).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from bridge.config import Settings
from bridge.llm.base import LlmProvider
from bridge.llm.local import LocalRouter
from bridge.llm.openai_compat import OpenAICompatLlm
from bridge.log import get_logger
from bridge.speech.stt import OpenAiStt, QueuedStt, SttError, SttProvider
from bridge.speech.vad import TurnConfig, TurnDetector, make_vad
from bridge.speech.whisper import WhisperStt, default_workers

log = get_logger(__name__)

LOCAL = "local"


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class LlmProviders:
    """The LLM providers alone (what the chat console needs): `llm_for(provider, model)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = LocalRouter()
        self._http: aiohttp.ClientSession | None = None
        self._llms: dict[tuple[str, str], OpenAICompatLlm] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    def llm_for(self, provider: str, model: str | None) -> LlmProvider:
        """ "local" → the deterministic router (not an LLM); any other name → the
        OpenAI-compatible endpoint configured under that name, else the default one."""
        if provider == LOCAL:
            return self.router
        s = self.settings.llm
        model = model or s.default_model
        key = (provider, model)
        llm = self._llms.get(key)
        if llm is None:
            endpoint = s.endpoints.get(provider)
            base_url = endpoint.base_url if endpoint else s.base_url
            api_key = _secret(endpoint.api_key if endpoint else s.api_key)
            api_version = endpoint.api_version if endpoint else s.api_version
            llm = OpenAICompatLlm(
                base_url=base_url,
                model=model,
                api_key=api_key,
                api_version=api_version,
                first_token_timeout=s.first_token_timeout,
                total_timeout=s.total_timeout,
                temperature=s.temperature,
                max_tokens=s.max_tokens,
                session=self._session(),
            )
            self._llms[key] = llm
        return llm

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._llms.clear()


class AgentProviders(LlmProviders):
    """Builds providers from the settings; `llm_for(provider, model)` per assistant."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stt: SttProvider = self._build_stt()

    def _build_stt(self) -> SttProvider:
        s = self.settings.stt
        if s.engine == "whisper":
            workers = s.workers or default_workers()
            whisper = WhisperStt(
                compute_type=s.compute_type,
                cpu_threads=s.cpu_threads,
                workers=workers,
                nice=s.nice,
                short_window_s=s.short_window_s,
            )
            return QueuedStt(whisper, workers, max_wait_s=s.max_wait_s)
        base_url = s.base_url or self.settings.llm.base_url
        api_key = _secret(s.api_key) or _secret(self.settings.llm.api_key)
        # The aiohttp session is made lazily by the provider (no event loop needed here).
        return OpenAiStt(
            base_url=base_url,
            api_key=api_key,
            model=s.model,
            language=s.language,
            timeout=s.timeout,
        )

    def turn_detector(self) -> TurnDetector:
        """A fresh detector (its own VAD state) for one call."""
        v = self.settings.vad
        config = TurnConfig(
            threshold=v.threshold,
            neg_threshold=max(0.05, v.threshold - 0.15),
            min_speech_ms=v.min_speech_ms,
            silence_ms=v.silence_ms,
            max_turn_ms=v.max_turn_ms,
        )
        return TurnDetector(make_vad(v.engine, 8000), config)

    async def warm_up(self) -> None:
        """Load every local model now, so the first call does not wait ~1.5 s for them."""
        try:
            self.turn_detector()
        except Exception as exc:  # a missing model must not stop the daemon
            log.warning("agent.vad_warm_up_failed", error=str(exc))
        if isinstance(self.stt, QueuedStt) and isinstance(self.stt.inner, WhisperStt):
            try:
                await self.stt.warm_up()
            except (SttError, ImportError, OSError) as exc:
                log.warning("agent.stt_warm_up_failed", error=str(exc))
        await self.router.warm_up()
        log.info("agent.models_ready", stt=self.stt.name, vad=self.settings.vad.engine)

    async def aclose(self) -> None:
        if isinstance(self.stt, OpenAiStt):
            await self.stt.aclose()
        await super().aclose()
