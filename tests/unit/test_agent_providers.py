"""Provider selection per assistant, and one agent per call with an assistant."""

from __future__ import annotations

from bridge.agent.factory import AgentFactory
from bridge.agent.providers import AgentProviders
from bridge.agent.voice import VoiceAgent
from bridge.config import Settings
from bridge.llm.local import LocalRouter
from bridge.llm.openai_compat import OpenAICompatLlm
from bridge.speech.stt import OpenAiStt
from tests.support.agent import FakeSession


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "vad": {"engine": "webrtc"},
        "llm": {
            "base_url": "http://default.invalid/v1",
            "api_key": "k0",
            "endpoints": {"ollama": {"base_url": "http://ollama.invalid/v1"}},
        },
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


async def test_llm_per_assistant_provider() -> None:
    providers = AgentProviders(settings())
    try:
        assert isinstance(providers.llm_for("local", None), LocalRouter)
        default = providers.llm_for("openai", None)
        assert isinstance(default, OpenAICompatLlm)
        assert default.url == "http://default.invalid/v1/chat/completions"
        assert default.model == "gpt-4o-mini" and default.api_key == "k0"
        ollama = providers.llm_for("ollama", "llama3.2")
        assert isinstance(ollama, OpenAICompatLlm)
        assert ollama.url == "http://ollama.invalid/v1/chat/completions"
        assert ollama.model == "llama3.2" and ollama.api_key is None
        assert providers.llm_for("ollama", "llama3.2") is ollama  # built once
    finally:
        await providers.aclose()


async def test_cloud_stt_uses_its_own_or_the_llm_endpoint() -> None:
    providers = AgentProviders(settings(stt={"engine": "openai", "model": "whisper-large"}))
    try:
        stt = providers.stt
        assert isinstance(stt, OpenAiStt)
        assert stt.url == "http://default.invalid/v1/audio/transcriptions"
        assert stt.model == "whisper-large" and stt.api_key == "k0"
    finally:
        await providers.aclose()


async def test_factory_makes_an_agent_only_for_calls_with_an_assistant() -> None:
    s = settings()
    providers = AgentProviders(s)
    try:
        factory = AgentFactory(providers, s.agent)
        session = FakeSession()
        agent = factory(session)  # type: ignore[arg-type]
        assert isinstance(agent, VoiceAgent)
        assert isinstance(agent.llm, OpenAICompatLlm)
        assert agent.detector.vad.name == "webrtc"
        session.assistant = None  # type: ignore[assignment]
        assert factory(session) is None  # type: ignore[arg-type]
    finally:
        await providers.aclose()
