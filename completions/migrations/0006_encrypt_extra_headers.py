import json

from django.db import migrations, models


def encrypt_headers(apps, schema_editor):
    # Imported here: the running code's encryption, with the deployment's KEYWAY_ENCRYPTION_KEY.
    from platform_site.crypto import encrypt_secret

    Provider = apps.get_model("completions", "Provider")
    for provider in Provider.objects.exclude(extra_headers={}):
        provider.extra_headers_encrypted = encrypt_secret(json.dumps(provider.extra_headers, sort_keys=True))
        provider.save(update_fields=["extra_headers_encrypted"])


def decrypt_headers(apps, schema_editor):
    from platform_site.crypto import decrypt_secret

    Provider = apps.get_model("completions", "Provider")
    for provider in Provider.objects.exclude(extra_headers_encrypted=""):
        provider.extra_headers = json.loads(decrypt_secret(provider.extra_headers_encrypted))
        provider.save(update_fields=["extra_headers"])


class Migration(migrations.Migration):
    dependencies = [
        ("completions", "0005_deployment_extra_fields"),
    ]

    operations = [
        migrations.AddField(
            model_name="provider",
            name="extra_headers_encrypted",
            field=models.TextField(blank=True, default=""),
        ),
        migrations.RunPython(encrypt_headers, decrypt_headers),
        migrations.RemoveField(
            model_name="provider",
            name="extra_headers",
        ),
    ]
