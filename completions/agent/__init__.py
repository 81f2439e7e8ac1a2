"""The agent loop: a turn of a server-side session, and of an agent (model → tool calls → the platform runs
them → results fed back → … → an answer), each model step one metered engine call. Surfaces (the chat
completions endpoint, webhook ingress) parse and respond; this package runs the turn."""
