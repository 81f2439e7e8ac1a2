"""The usage ledger partitioned by calendar month on PostgreSQL (billing.partitions); nothing on SQLite."""

from django.db import migrations


def partition(apps, schema_editor):
    from billing.partitions import rebuild

    rebuild(schema_editor.connection, partitioned=True)


def unpartition(apps, schema_editor):
    from billing.partitions import rebuild

    rebuild(schema_editor.connection, partitioned=False)


class Migration(migrations.Migration):

    dependencies = [
        ("billing", "0007_rollup_indexes"),
    ]

    operations = [
        migrations.RunPython(partition, unpartition, elidable=False),
    ]
