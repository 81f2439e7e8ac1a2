"""Keys that held every model scope ("All") before the sessions API existed get its scope, so that "All"
still means every model endpoint."""

from __future__ import annotations

from typing import Any

from django.db import migrations

_OLD_ALL = {"models:read", "chat", "embeddings", "responses", "realtime"}


def add_sessions(apps: Any, schema_editor: Any) -> None:
    ApiKey = apps.get_model("apikeys", "ApiKey")
    for key in ApiKey.objects.filter(revoked_at__isnull=True).only("id", "scopes").iterator():
        scopes = list(key.scopes or [])
        if _OLD_ALL <= set(scopes) and "sessions" not in scopes:
            ApiKey.objects.filter(pk=key.pk).update(scopes=[*scopes, "sessions"])


class Migration(migrations.Migration):
    dependencies = [("apikeys", "0005_tpm_limit_big")]

    operations = [migrations.RunPython(add_sessions, migrations.RunPython.noop)]
