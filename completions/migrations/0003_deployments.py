from django.db import migrations, models
import django.db.models.deletion


def copy_to_deployments(apps, schema_editor):
    Model = apps.get_model("completions", "Model")
    Deployment = apps.get_model("completions", "Deployment")
    for model in Model.objects.all():
        Deployment.objects.create(model=model, provider_id=model.provider_id, upstream_model=model.upstream_model)


def copy_back(apps, schema_editor):
    Model = apps.get_model("completions", "Model")
    for model in Model.objects.all():
        deployment = model.deployments.order_by("priority", "id").first()
        if deployment is not None:
            model.provider_id = deployment.provider_id
            model.upstream_model = deployment.upstream_model
            model.save(update_fields=["provider", "upstream_model"])


class Migration(migrations.Migration):
    dependencies = [("completions", "0002_provider_kind_onnx_embeddings")]

    operations = [
        migrations.CreateModel(
            name="Deployment",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("upstream_model", models.CharField(max_length=500)),
                ("weight", models.PositiveIntegerField(default=1, help_text="Share of traffic among deployments of equal priority.")),
                ("priority", models.IntegerField(default=0, help_text="Lower is tried first.")),
                ("timeout_seconds", models.FloatField(blank=True, null=True)),
                ("enabled", models.BooleanField(default=True)),
                ("model", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="deployments", to="completions.model")),
                ("provider", models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name="deployments", to="completions.provider")),
            ],
            options={"ordering": ["model", "priority", "-weight", "id"]},
        ),
        migrations.RunPython(copy_to_deployments, copy_back),
        migrations.RemoveField(model_name="model", name="provider"),
        migrations.RemoveField(model_name="model", name="upstream_model"),
    ]
