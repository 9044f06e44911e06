"""Operating callbridge (issue 10): Prometheus metrics, webhooks with an outbox, transfer
analytics and trunk state, all fed by the call store (bridge.calls.store)."""
