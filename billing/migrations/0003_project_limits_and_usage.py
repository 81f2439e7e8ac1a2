"""Projects get per-model rate limits, and every usage event names its key's project. Events written before
this take the project their key belongs to now (keys never move between projects)."""

import django.db.models.deletion
from django.db import migrations, models


def project_from_key(apps, schema_editor):
    UsageEvent = apps.get_model("billing", "UsageEvent")
    ApiKey = apps.get_model("apikeys", "ApiKey")
    project = ApiKey.objects.filter(pk=models.OuterRef("api_key_id")).values("project_id")[:1]
    UsageEvent.objects.filter(api_key__isnull=False).update(project_id=models.Subquery(project))


class Migration(migrations.Migration):

    dependencies = [
        ('apikeys', '0004_tenancy_projects'),
        ('billing', '0002_call_ids'),
        ('platform_site', '0005_project_monthly_budget'),
    ]

    operations = [
        migrations.CreateModel(
            name='ProjectRateLimit',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('model', models.CharField(help_text='Public model id, as in /v1/models.', max_length=128)),
                ('max_requests_per_1_minute', models.PositiveIntegerField(blank=True, null=True)),
                ('max_tokens_per_1_minute', models.PositiveBigIntegerField(blank=True, null=True)),
                ('max_requests_per_1_day', models.PositiveIntegerField(blank=True, null=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
            options={
                'ordering': ['model'],
            },
        ),
        migrations.AddField(
            model_name='usageevent',
            name='project',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='platform_site.project'),
        ),
        migrations.RunPython(project_from_key, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name='usageevent',
            index=models.Index(fields=['project', 'created_at'], name='billing_usa_project_e3958c_idx'),
        ),
        migrations.AddField(
            model_name='projectratelimit',
            name='project',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='rate_limits', to='platform_site.project'),
        ),
        migrations.AddConstraint(
            model_name='projectratelimit',
            constraint=models.UniqueConstraint(fields=('project', 'model'), name='one_rate_limit_per_project_model'),
        ),
    ]
