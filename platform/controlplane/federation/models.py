import secrets

from django.db import models

from controlplane.jobs.models import LeasedJob


def new_federation_id() -> str:
    return f"fed-{secrets.token_hex(8)}"


def new_round_id() -> str:
    return f"fedround-{secrets.token_hex(8)}"


class Federation(models.Model):
    """A consortium training one adapter on a base model, owned by the tenant that made it.

    `settings` holds the FederationConfig fields the owner chose (aggregation, LoRA,
    secure aggregation, DP, fault tolerance); `schedule` is a cron line run by celery beat.
    """

    class Status(models.TextChoices):
        ACTIVE = "active"
        PAUSED = "paused"  # no scheduled rounds start

    id = models.CharField(primary_key=True, max_length=40, default=new_federation_id)
    owner = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=200)
    base_model = models.CharField(max_length=200)
    settings = models.JSONField(default=dict)
    schedule = models.CharField(max_length=100, blank=True, default="")  # cron, "" = manual
    min_participants = models.PositiveIntegerField(default=2)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.ACTIVE)
    epsilon_spent = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.name})"


class Participant(models.Model):
    """A tenant's membership of a federation. Accepting is the recorded consent."""

    class Status(models.TextChoices):
        INVITED = "invited"
        ACCEPTED = "accepted"
        DECLINED = "declined"
        LEFT = "left"

    federation = models.ForeignKey(
        Federation, on_delete=models.CASCADE, related_name="participants"
    )
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.INVITED)
    invited_at = models.DateTimeField(auto_now_add=True)
    #: the consent: when, by whom (actor), under which settings
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.CharField(max_length=200, blank=True, default="")
    consent = models.JSONField(null=True, blank=True)
    #: hosted: the member's training file (decrypted only inside its client process)
    training_file = models.ForeignKey(
        "files.File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: on premises: the name its SuperNode registers with (it brings its own data)
    node_name = models.CharField(max_length=100, blank=True, default="")
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["federation", "tenant"], name="one_seat_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} in {self.federation_id} ({self.status})"


class FederatedRound(LeasedJob):
    """One round of a federation, run as a job on the `train` queue."""

    run_task = "federation.run_round"
    run_queue = "train"

    id = models.CharField(primary_key=True, max_length=40, default=new_round_id, editable=False)
    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    #: aggregate and per-member metrics, bytes, seconds, epsilon (from federated's callbacks)
    metrics = models.JSONField(null=True, blank=True)
    epsilon = models.FloatField(null=True, blank=True)
    partial = models.BooleanField(default=False)
    members = models.JSONField(default=list)  # tenant slugs that took part
    global_model = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["federation", "number"], name="one_round_number")
        ]

    def __str__(self) -> str:
        return f"{self.federation_id} round {self.number} ({self.status})"


class GlobalAdapter(models.Model):
    """A round's global adapter: a model every accepted member can chat with.

    `id` is the model name `fed:<base>:<federation id>:r<round>`. The blob is kept under
    the owner tenant's keys.
    """

    id = models.CharField(primary_key=True, max_length=300)
    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="adapters")
    round = models.OneToOneField(FederatedRound, on_delete=models.CASCADE, related_name="+")
    blob = models.ForeignKey("vault.Blob", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.id
