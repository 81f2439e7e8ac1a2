from __future__ import annotations

from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from agents import connectors
        from platform_site.kernel import process

        # MCP servers' tool lists are cached per process: tests start each from nothing.
        process.resettable(connectors.reset)
