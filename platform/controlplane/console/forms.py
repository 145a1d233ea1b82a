"""Console forms: labels and help text for people; the services do the real checking."""

from django import forms
from django.contrib.auth import get_user_model
from django.utils import timezone

from controlplane.files.models import File
from controlplane.tenancy.models import Role
from controlplane.tuning.models import FineTuningJob
from controlplane.tuning.selectors import base_models


class FileUploadForm(forms.Form):
    file = forms.FileField(label="File (JSONL)")
    purpose = forms.ChoiceField(
        label="Purpose", choices=[(p, p) for p in File.UPLOADABLE], initial="fine-tune"
    )


class JobCreateForm(forms.Form):
    model = forms.ChoiceField(label="Base model")
    training_file = forms.ChoiceField(label="Training file")
    validation_file = forms.ChoiceField(label="Validation file", required=False)
    method = forms.ChoiceField(
        label="Method", choices=FineTuningJob.Method.choices, initial="supervised"
    )
    n_epochs = forms.IntegerField(label="Epochs", min_value=1, max_value=100, initial=1)
    batch_size = forms.IntegerField(label="Batch size", min_value=1, max_value=256, initial=4)
    learning_rate_multiplier = forms.FloatField(
        label="Learning-rate multiplier", min_value=1e-4, max_value=100, initial=1.0
    )
    lora_r = forms.IntegerField(label="LoRA rank", min_value=1, max_value=256, initial=8)
    lora_alpha = forms.IntegerField(label="LoRA alpha", min_value=1, max_value=1024, initial=16)
    max_steps = forms.IntegerField(
        label="Max steps", min_value=1, required=False, help_text="Empty: run every epoch."
    )
    max_seq_len = forms.IntegerField(
        label="Max sequence length", min_value=16, max_value=32768, initial=512
    )
    checkpoint_every = forms.IntegerField(
        label="Checkpoint every (steps)", min_value=0, initial=10, help_text="0: no checkpoints."
    )
    suffix = forms.CharField(label="Model name suffix", max_length=40, required=False)
    seed = forms.IntegerField(label="Seed", required=False)

    HYPERPARAMETERS = (
        "n_epochs", "batch_size", "learning_rate_multiplier", "lora_r", "lora_alpha",
        "max_steps", "max_seq_len", "checkpoint_every",
    )  # fmt: skip

    def __init__(self, *args, files_qs=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.name, m.name) for m in base_models()]
        usable = [(f.id, f"{f.filename} ({f.id})") for f in files_qs]
        self.fields["training_file"].choices = usable
        self.fields["validation_file"].choices = [("", "None")] + usable

    def hyperparameters(self) -> dict:
        data = self.cleaned_data
        return {k: data[k] for k in self.HYPERPARAMETERS if data.get(k) is not None}


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(label="Name", max_length=100, required=False)
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.MEMBER)
    expires_at = forms.DateTimeField(
        label="Expires at (UTC)",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
    )

    def clean_expires_at(self):
        value = self.cleaned_data["expires_at"]
        if value is not None and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value


class MembershipForm(forms.Form):
    username = forms.CharField(label="Username", max_length=150)
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.MEMBER)

    def clean_username(self):
        username = self.cleaned_data["username"]
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise forms.ValidationError(f"No user named {username!r}.")
        self.user = user
        return username


class AuditFilterForm(forms.Form):
    actor = forms.CharField(label="Actor", required=False)
    action = forms.CharField(label="Action", required=False)
    object_type = forms.CharField(label="Object type", required=False)
    object_id = forms.CharField(label="Object id", required=False)
    since = forms.DateField(
        label="From", required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        label="To", required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
