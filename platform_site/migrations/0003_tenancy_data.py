# Data of the tenancy change, apart from its schema changes: PostgreSQL refuses to alter a table that has
# rows written in the same transaction with deferred constraints still pending.

import platform_site.models
from django.db import migrations

# Audit actions before projects, and the OpenAI audit event type each is called now.
RENAMED_ACTIONS = {
    "apikey.created": "api_key.created",
    "apikey.rotated": "api_key.updated",
    "apikey.revoked": "api_key.deleted",
    "membership.set": "user.updated",
}


def fill_tenancy(apps, schema_editor):
    # Every organization gets a public id and its default project; every member a profile with a public id;
    # old audit rows the event names the management API serves.
    Organization = apps.get_model("platform_site", "Organization")
    Project = apps.get_model("platform_site", "Project")
    Membership = apps.get_model("platform_site", "Membership")
    Profile = apps.get_model("platform_site", "Profile")
    AuditLog = apps.get_model("platform_site", "AuditLog")
    for organization in Organization.objects.all():
        organization.public_id = platform_site.models.new_organization_id()
        organization.save(update_fields=["public_id"])
        if not Project.objects.filter(organization=organization, is_default=True).exists():
            Project.objects.create(
                organization=organization,
                public_id=platform_site.models.new_project_id(),
                name="Default project",
                is_default=True,
            )
    for user_id in Membership.objects.values_list("user_id", flat=True).distinct():
        if not Profile.objects.filter(user_id=user_id).exists():
            Profile.objects.create(user_id=user_id, public_id=platform_site.models.new_user_id())
    for old, new in RENAMED_ACTIONS.items():
        AuditLog.objects.filter(action=old).update(action=new)


class Migration(migrations.Migration):

    dependencies = [
        ('platform_site', '0002_tenancy_projects'),
    ]

    operations = [
        migrations.RunPython(fill_tenancy, migrations.RunPython.noop),
    ]
