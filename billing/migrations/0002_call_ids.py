"""Calls, not requests, are metered: every usage event gets its own call id (the idempotency key), keeps the
request id it belongs to (no longer unique), and may name a session (a WebSocket connection, an agent run).
Events written before this were one call per request, so their call id is their request id."""

from django.db import migrations, models


def call_id_from_request_id(apps, schema_editor):
    UsageEvent = apps.get_model("billing", "UsageEvent")
    UsageEvent.objects.update(call_id=models.F("request_id"))


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="usageevent",
            name="call_id",
            field=models.CharField(max_length=64, null=True),
        ),
        migrations.RunPython(call_id_from_request_id, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="usageevent",
            name="call_id",
            field=models.CharField(max_length=64, unique=True),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="request_id",
            field=models.CharField(db_index=True, max_length=64),
        ),
        migrations.AddField(
            model_name="usageevent",
            name="session_id",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
    ]
