"""Participant.last_seen_at: written when a member's node replies in a round.

The end-to-end check (a real round through Flower's runtime, seen in the console) is
tests/console/test_browser.py::test_federation_created_joined_and_a_real_round_charted;
this checks the mapping from the names in a round's replies to the seats they update.
"""

import datetime as dt

import pytest
from django.utils import timezone

from controlplane.federation import services
from controlplane.federation.models import Federation, Participant

pytestmark = pytest.mark.django_db


def _federation(owner, name: str) -> Federation:
    return Federation.objects.create(owner=owner, name=name, base_model="enclave-test")


def test_replies_mark_the_members_seen_by_tenant_slug_or_node_name(make_tenant):
    anne, _ = make_tenant("st-anne")
    bart, _ = make_tenant("st-bart")
    clare, _ = make_tenant("st-clare")
    dora, _ = make_tenant("st-dora")
    fed = _federation(anne, "sepsis")
    other = _federation(bart, "other")
    seats = {
        "anne": Participant.objects.create(federation=fed, tenant=anne, status="accepted"),
        "bart": Participant.objects.create(
            federation=fed, tenant=bart, status="accepted", node_name="bart-node-1"
        ),
        "clare": Participant.objects.create(federation=fed, tenant=clare, status="accepted"),
        # invited, not accepted: a reply in its name records nothing
        "dora": Participant.objects.create(federation=fed, tenant=dora, status="invited"),
        # the same tenant in another federation is not touched
        "anne-other": Participant.objects.create(federation=other, tenant=anne, status="accepted"),
    }
    at = timezone.now() - dt.timedelta(seconds=5)
    names = ["st-anne", "bart-node-1", "st-dora", "node-12345", "", "st-nobody"]
    assert services.participants_seen(federation=fed, names=names, at=at) == 2
    seen = {k: Participant.objects.get(pk=p.pk).last_seen_at for k, p in seats.items()}
    assert seen == {"anne": at, "bart": at, "clare": None, "dora": None, "anne-other": None}
    assert services.participants_seen(federation=fed, names=[]) == 0
