from django.db import models


class Tenant(models.Model):
    """An organisation on the platform: a bank, a broker, a hospital."""

    class Vertical(models.TextChoices):
        FINANCE = "finance"
        MEDICAL = "medical"
        OTHER = "other"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    vertical = models.CharField(max_length=16, choices=Vertical.choices, default=Vertical.OTHER)
    #: where the tenant's data must stay (e.g. "eu-west"); recorded, enforced by deployment
    data_region = models.CharField(max_length=64, default="local")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug
