"""Routes of the OpenAI-compatible API, mounted at /v1/ and (seed 001's aliases) /api/v1/."""

from __future__ import annotations

from django.urls import path, re_path

from completions import views

app_name = "completions"

urlpatterns = [
    path("models", views.models_list, name="models-list"),
    path("models/<path:model_id>", views.model_retrieve, name="models-retrieve"),
    path("chat/models", views.models_list, name="chat-models-list"),
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("embeddings", views.embeddings, name="embeddings"),
    re_path(r"^(?P<rest>.*)$", views.unknown_route, name="unknown"),
]
