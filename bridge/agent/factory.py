"""One `VoiceAgent` per call from the shared providers: `CallService.conversation_factory`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.agent.providers import AgentProviders
from bridge.agent.voice import VoiceAgent
from bridge.config import AgentSettings

if TYPE_CHECKING:
    from bridge.calls.session import CallSession


class AgentFactory:
    def __init__(self, providers: AgentProviders, settings: AgentSettings) -> None:
        self.providers = providers
        self.settings = settings

    def __call__(self, session: CallSession) -> VoiceAgent | None:
        """A call without an assistant has nobody to talk to: no conversation (greet only)."""
        assistant = session.assistant
        if assistant is None:
            return None
        config = assistant.llm_config
        return VoiceAgent(
            session,
            llm=self.providers.llm_for(config.provider, config.model),
            stt=self.providers.stt,
            detector=self.providers.turn_detector(),
            settings=self.settings,
            load_events=lambda: session.service.store.events(session.call.id),
        )
