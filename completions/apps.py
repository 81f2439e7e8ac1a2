from __future__ import annotations

import atexit

from django.apps import AppConfig


class CompletionsConfig(AppConfig):
    name = "completions"
    verbose_name = "Models and providers"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        from completions.engine import routing, tokenizers
        from completions.providers import llamacpp, openai_compatible, registry
        from platform_site.kernel import process

        process.register_loaded_models_reporter(registry.loaded_models)
        process.resettable(routing.reset_breakers)
        # Servers without lifespan (daphne) end without closing pools; and llama.cpp objects must be freed
        # while the interpreter is still whole (llama-cpp-python's own finalizer fails during teardown).
        atexit.register(openai_compatible.abandon_pools)
        atexit.register(llamacpp.close_models)
        atexit.register(tokenizers.close_tokenizers)
