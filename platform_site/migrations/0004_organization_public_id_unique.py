import platform_site.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('platform_site', '0003_tenancy_data'),
    ]

    operations = [
        migrations.AlterField(
            model_name='organization',
            name='public_id',
            field=models.CharField(default=platform_site.models.new_organization_id, max_length=40, unique=True),
        ),
    ]
