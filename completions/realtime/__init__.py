"""The realtime surface: /v1/realtime over WebSocket (protocol, session state, responses, the consumer and
its routing). Each response is one engine call, metered and limited like chat."""
