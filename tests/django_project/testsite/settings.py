"""The example shop's settings, plus this test site's commands and, on Django 6+, its tasks
enqueued through pgoutbox's django.tasks backend."""

import django
from shop.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "testsite"]  # noqa: F405
if django.VERSION >= (6, 0):
    TASKS = {"default": {"BACKEND": "pgoutbox.contrib.django.tasks.PgoutboxTaskBackend"}}
