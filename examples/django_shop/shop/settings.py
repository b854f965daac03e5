"""A small shop: orders placed in a view publish operations in the same atomic() block; a
pgoutbox worker (`manage.py pgoutbox_worker`) charges and receipts them. The database comes
from the SHOP_DSN environment variable (a postgresql:// URL)."""

import os

from pgoutbox.settings import parse_dsn

_db = parse_dsn(os.environ["SHOP_DSN"])

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
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
