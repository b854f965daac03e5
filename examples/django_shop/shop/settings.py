"""A small Django shop using pgoutbox: placing an order (shop/views.py) publishes its charge and
its receipt in the same atomic() block as the order row; ``manage.py pgoutbox_worker`` runs
shop/handlers.py's def handlers. The database comes from the SHOP_DSN environment variable (a
postgresql:// URL). tests/django_project drives this project through its management commands."""

import os

from pgoutbox.settings import parse_dsn

_db = parse_dsn(os.environ["SHOP_DSN"])

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "shop.urls"
INSTALLED_APPS = ["pgoutbox.contrib.django", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("database", "postgres"),
        "USER": _db.get("user", "postgres"),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": str(_db.get("port", "")),
    }
}
PGOUTBOX = {
    "ROUTER": "shop.handlers:router",
    "WORKFLOW_SYSTEM": {"channel": "shop", "n_workers": 2, "poll_interval_seconds": 0.5},
}
