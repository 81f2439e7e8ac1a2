"""Provider secrets at rest: the API key and the extra headers are stored encrypted, written through the admin
without ever being shown back, and sent to the upstream as configured."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from completions.engine.catalog import _provider_config
from completions.models import Provider

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "tenant-4711-secret-header-value"


def _raw_row(provider: Provider) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM completions_provider WHERE id = %s", [provider.pk])
        return repr(cursor.fetchone())


def test_extra_headers_are_encrypted_at_rest_and_reach_the_provider_config() -> None:
    provider = Provider(name="up", kind=Provider.Kind.OPENAI_COMPATIBLE, base_url="http://127.0.0.1:9/v1")
    provider.set_extra_headers({"X-Upstream-Token": SECRET})
    provider.save()
    assert SECRET not in _raw_row(provider)
    assert Provider.objects.get(pk=provider.pk).extra_headers == {"X-Upstream-Token": SECRET}
    assert ("X-Upstream-Token", SECRET) in _provider_config(provider).extra_headers


def test_the_admin_writes_headers_without_ever_showing_them() -> None:
    staff = get_user_model().objects.create_superuser("root", "root@example.com", "x" * 16)
    client = Client()
    client.force_login(staff)
    form = {"name": "up", "kind": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "enabled": "on",
            "extra_headers": f'{{"X-Upstream-Token": "{SECRET}"}}', "api_key": "", "timeout_seconds": ""}
    assert client.post("/admin/completions/provider/add/", form).status_code == 302
    provider = Provider.objects.get(name="up")
    assert provider.extra_headers == {"X-Upstream-Token": SECRET}
    page = client.get(f"/admin/completions/provider/{provider.pk}/change/").content.decode()
    assert SECRET not in page and "X-Upstream-Token" in page
    # Saving the form again with the field empty keeps the headers.
    assert client.post(f"/admin/completions/provider/{provider.pk}/change/",
                       {**form, "extra_headers": ""}).status_code == 302
    assert Provider.objects.get(pk=provider.pk).extra_headers == {"X-Upstream-Token": SECRET}
    assert SECRET not in client.get("/admin/completions/provider/").content.decode()


def test_the_migration_encrypts_headers_stored_in_the_clear() -> None:
    executor = MigrationExecutor(connection)
    before, after = [("completions", "0005_deployment_extra_fields")], [("completions", "0006_encrypt_extra_headers")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("completions", "Provider")
    old.objects.create(name="legacy", kind="openai_compatible", extra_headers={"X-Upstream-Token": SECRET})
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(after)
    provider = Provider.objects.get(name="legacy")
    assert provider.extra_headers == {"X-Upstream-Token": SECRET} and SECRET not in _raw_row(provider)
