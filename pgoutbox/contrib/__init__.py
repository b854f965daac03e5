"""Integrations with frameworks, each an optional extra (``pgoutbox[django]``)."""
