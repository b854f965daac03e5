#!/usr/bin/env python
"""The test site's manage.py: examples/django_shop's project with the test's own app
(testsite: a command that places orders through the view, as a browser would)."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "django_shop"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
