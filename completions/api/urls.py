"""Routes of the OpenAI-compatible API, mounted at /v1/ and (seed 001's aliases) /api/v1/."""

from __future__ import annotations

from django.urls import path, re_path

from completions.api import chat, embeddings, http, models

app_name = "completions"

urlpatterns = [
    path("models", models.models_list, name="models-list"),
    path("models/<path:model_id>", models.model_retrieve, name="models-retrieve"),
    path("chat/models", models.models_list, name="chat-models-list"),
    path("chat/completions", chat.chat_completions, name="chat-completions"),
    path("embeddings", embeddings.embeddings, name="embeddings"),
    re_path(r"^(?P<rest>.*)$", http.unknown_route, name="unknown"),
]
