from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("email", models.CharField(max_length=200)),
                ("cents", models.IntegerField()),
                ("state", models.CharField(default="placed", max_length=20)),
                ("receipt_sent", models.BooleanField(default=False)),
            ],
        ),
    ]
