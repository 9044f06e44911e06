"""The conversation: caller audio → turn detection → STT → LLM → TTS → caller, per call.

`VoiceAgent` (voice.py) implements `bridge.calls.conversation.Conversation`; `AgentProviders`
(providers.py) builds the speech and LLM providers once per daemon; `AgentFactory`
(factory.py) makes one agent per call for `CallService.conversation_factory`. The text of
a conversation (prompt, knowledge, history, model, tools) is `Dialogue` (dialogue.py), shared
by the call's agent and the text test console `ChatConsole` (chat.py).
"""
