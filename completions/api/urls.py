"""Routes of the OpenAI-compatible API, mounted at /v1/ and (seed 001's aliases) /api/v1/."""

from __future__ import annotations

from django.urls import path, re_path

from completions.api import chat, conversations, embeddings, http, models, openapi, responses, sessions

app_name = "completions"

urlpatterns = [
    path("openapi.json", openapi.openapi_json, name="openapi"),
    path("models", models.models_list, name="models-list"),
    path("models/<path:model_id>", models.model_retrieve, name="models-retrieve"),
    path("chat/models", models.models_list, name="chat-models-list"),
    path("chat/completions", chat.chat_completions, name="chat-completions"),
    path("embeddings", embeddings.embeddings, name="embeddings"),
    path("responses", responses.responses_create, name="responses-create"),
    path("responses/<str:response_id>", responses.response_detail, name="responses-detail"),
    path("responses/<str:response_id>/cancel", responses.response_cancel, name="responses-cancel"),
    path("responses/<str:response_id>/input_items", responses.response_input_items, name="responses-input-items"),
    path("conversations", conversations.conversations_create, name="conversations-create"),
    path("conversations/<str:conversation_id>", conversations.conversation_detail, name="conversations-detail"),
    path("conversations/<str:conversation_id>/items", conversations.conversation_items, name="conversations-items"),
    path("conversations/<str:conversation_id>/items/<str:item_id>", conversations.conversation_item,
         name="conversations-item"),
    path("sessions", sessions.sessions_list, name="sessions-list"),
    path("sessions/<str:session_id>", sessions.session_detail, name="sessions-detail"),
    # [\s\S], not `.`: a path may hold a newline (%0A), which `.` does not match; then no route matched, and
    # the lean handler answered a 500 instead of this JSON 404. (An inline (?s) flag would break reverse().)
    re_path(r"^(?P<rest>[\s\S]*)$", http.unknown_route, name="unknown"),
]
