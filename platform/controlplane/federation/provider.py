"""The data provider a hosted member's Flower client calls, inside that member's process.

`federated` names it by dotted path (`ParticipantSpec.data_provider`) and never imports
Django; this module does, to decrypt the member's own training file from the vault, in
memory. Options carry only ids, never data.
"""

import io
import os


def hosted_examples(options: dict) -> dict:
    """{"train": [chat example, ...], "val": []} for the member's file."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    import django

    django.setup()
    from controlplane.files.models import File
    from controlplane.tenancy.models import Tenant
    from controlplane.vault.selectors import blob_read_bytes
    from finetune.data import iter_examples

    tenant = Tenant.objects.get(pk=options["tenant_id"])
    file = File.objects.get(tenant=tenant, pk=options["file_id"])
    data = blob_read_bytes(tenant=tenant, blob_id=file.blob_id)
    return {"train": [{"messages": ex.messages} for ex in iter_examples(io.BytesIO(data))],
            "val": []}  # fmt: skip
