#!/usr/bin/env python
"""The example shop's manage.py: ``SHOP_DSN=postgresql://... python manage.py migrate``, then
``pgoutbox_upgrade``, ``runserver`` and, beside it, ``pgoutbox_worker`` (docs/django.md)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
