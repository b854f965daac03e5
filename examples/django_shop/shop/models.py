from django.db import models


class Order(models.Model):
    email = models.CharField(max_length=200)
    cents = models.IntegerField()
    state = models.CharField(max_length=20, default="placed")
    receipt_sent = models.BooleanField(default=False)
