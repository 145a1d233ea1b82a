"""Reads for federations. A federation is visible to its owner and to the tenants it
invited; anything else answers "not found"."""

from django.db.models import Q, QuerySet
from django.http import Http404

from .models import FederatedRound, Federation, GlobalAdapter, Participant

S = Participant.Status


def federations_visible(*, tenant) -> QuerySet[Federation]:
    seats = Participant.objects.filter(tenant=tenant).exclude(status=S.DECLINED)
    return Federation.objects.filter(Q(owner=tenant) | Q(id__in=seats.values("federation_id")))


def federation_get(*, tenant, federation_id: str) -> Federation:
    federation = federations_visible(tenant=tenant).filter(pk=federation_id).first()
    if federation is None:
        raise Http404(f"No such federation: {federation_id}")
    return federation


def participant_get(*, tenant, federation: Federation) -> Participant | None:
    return Participant.objects.filter(federation=federation, tenant=tenant).first()


def seats_of(*, tenant, federations) -> dict[str, Participant]:
    """The tenant's own seat in each of `federations`, by federation id."""
    seats = Participant.objects.filter(tenant=tenant, federation__in=federations)
    return {p.federation_id: p for p in seats}


def participants_accepted(*, federation: Federation) -> QuerySet[Participant]:
    return federation.participants.filter(status=S.ACCEPTED).select_related("tenant")


def rounds_list(*, tenant, federation_id: str) -> QuerySet[FederatedRound]:
    return federation_get(tenant=tenant, federation_id=federation_id).rounds.all()


def round_get(*, tenant, federation_id: str, round_id: str) -> FederatedRound:
    found = rounds_list(tenant=tenant, federation_id=federation_id).filter(pk=round_id).first()
    if found is None:
        raise Http404(f"No such round: {round_id}")
    return found


def global_adapters_for(*, tenant) -> QuerySet[GlobalAdapter]:
    """Global adapters of the federations the tenant owns or has accepted."""
    accepted = Participant.objects.filter(tenant=tenant, status=S.ACCEPTED)
    return GlobalAdapter.objects.filter(
        Q(federation__owner=tenant) | Q(federation_id__in=accepted.values("federation_id"))
    ).select_related("federation")


def global_adapter_get(*, tenant, model_id: str) -> GlobalAdapter:
    adapter = global_adapters_for(tenant=tenant).filter(pk=model_id).first()
    if adapter is None:
        raise Http404(f"The model '{model_id}' does not exist")
    return adapter
