from __future__ import annotations

import atexit

from django.apps import AppConfig


class CompletionsConfig(AppConfig):
    name = "completions"
    verbose_name = "Models and providers"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        from completions.api import responses
        from completions.engine import routing, tokenizers
        from completions.providers import llamacpp, openai_compatible, registry
        from platform_site.kernel import process

        process.register_loaded_models_reporter(registry.loaded_models)
        process.resettable(routing.reset_breakers)
        # Background responses end (stored as failed, their calls settled) before usage is written down.
        process.register_shutdown_hook(responses.cancel_all_background, first=True)
        # Servers without lifespan (daphne) end without closing pools; and llama.cpp objects must be freed
        # while the interpreter is still whole (llama-cpp-python's own finalizer fails during teardown).
        atexit.register(openai_compatible.abandon_pools)
        atexit.register(llamacpp.close_models)
        atexit.register(tokenizers.close_tokenizers)
