"""pgoutbox for Django (``pip install 'pgoutbox[django]'``; docs/django.md).

Add ``"pgoutbox.contrib.django"`` to ``INSTALLED_APPS``, then:

- publish inside ``transaction.atomic()`` on Django's own connection, so the operation commits
  or rolls back with your model writes::

      from django.db import connection, transaction
      from pgoutbox import publish_operation

      with transaction.atomic():
          order.save()
          publish_operation(connection, "billing.charge", {"order": order.pk}, "shop")

- ``python manage.py pgoutbox_upgrade`` creates or upgrades pgoutbox's schema (Alembic runs
  underneath; Django's migrations are not involved);
- ``python manage.py pgoutbox_worker`` runs a worker for ``PGOUTBOX["ROUTER"]``.

Settings come from ``DATABASES`` and an optional ``PGOUTBOX`` dict (:func:`pgoutbox_settings`).
"""

from pgoutbox.contrib.django.conf import pgoutbox_settings

__all__ = ["pgoutbox_settings"]
