"""The example shop's settings, plus this test site's command."""

from shop.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "testsite"]  # noqa: F405
