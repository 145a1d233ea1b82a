"""/v1/federations: our extension to the OpenAI API, in the OpenAPI schema. Thin views."""

from django.core.exceptions import PermissionDenied
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied as DRFPermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.api import unix_time
from controlplane.api_errors import error_body
from controlplane.tenancy.models import Role

from . import selectors, services
from .models import FederatedRound, Federation, Participant


def participant_json(p: Participant) -> dict:
    return {
        "object": "federation.participant",
        "tenant": p.tenant.slug,
        "status": p.status,
        "invited_at": unix_time(p.invited_at),
        "accepted_at": unix_time(p.accepted_at),
        "mode": "hosted" if p.training_file_id else ("on_premises" if p.node_name else None),
        "node_name": p.node_name or None,
    }


def federation_json(f: Federation, viewer) -> dict:
    seats = f.participants.select_related("tenant")
    latest = f.adapters.order_by("-round__number").first()
    return {
        "object": "federation",
        "id": f.id,
        "name": f.name,
        "owner": f.owner.slug,
        "base_model": f.base_model,
        "settings": f.settings,
        "schedule": f.schedule or None,
        "min_participants": f.min_participants,
        "status": f.status,
        "epsilon_spent": f.epsilon_spent,
        "created_at": unix_time(f.created_at),
        "participants": [participant_json(p) for p in seats],
        "global_model": latest.id if latest else None,
        "is_owner": f.owner_id == viewer.pk,
    }


def round_json(r: FederatedRound) -> dict:
    return {
        "object": "federation.round",
        "id": r.id,
        "federation_id": r.federation_id,
        "number": r.number,
        "status": r.status,
        "partial": r.partial,
        "members": r.members,
        "metrics": r.metrics,
        "epsilon": r.epsilon,
        "global_model": r.global_model or None,
        "error": r.error or None,
        "created_at": unix_time(r.created_at),
        "started_at": unix_time(r.started_at),
        "finished_at": unix_time(r.finished_at),
    }


def _conflict(exc) -> Response:
    return Response(error_body(str(exc), "invalid_request_error", code="conflict"), status=409)


class _FederationView(APIView):
    write_role = Role.ADMIN  # joining or steering a consortium is an admin's decision

    def handle_exception(self, exc):
        if isinstance(exc, PermissionDenied):
            exc = DRFPermissionDenied(str(exc))
        if isinstance(exc, services.Conflict):
            response = _conflict(exc)
            response["x-should-retry"] = "false"
            return response
        return super().handle_exception(exc)


class FederationCreateInput(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    base_model = serializers.CharField()
    settings = serializers.DictField(required=False)
    schedule = serializers.CharField(required=False, allow_blank=True, default="")
    min_participants = serializers.IntegerField(required=False, default=2, min_value=1)
    training_file = serializers.CharField(required=False, allow_null=True, default=None)


class FederationListView(_FederationView):
    @extend_schema(operation_id="v1_federations_list", responses=OpenApiTypes.OBJECT)
    def get(self, request):
        tenant = request.user.tenant
        items = selectors.federations_visible(tenant=tenant).select_related("owner")
        return Response({"object": "list", "data": [federation_json(f, tenant) for f in items]})

    @extend_schema(request=FederationCreateInput, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        payload = FederationCreateInput(data=request.data)
        payload.is_valid(raise_exception=True)
        federation = services.federation_create(
            owner=request.user.tenant, actor=request.user.actor, **payload.validated_data
        )
        request._request.audit_object = ("federation", federation.id)
        return Response(federation_json(federation, request.user.tenant))


class FederationUpdateInput(serializers.Serializer):
    schedule = serializers.CharField(required=False, allow_blank=True)
    status = serializers.CharField(required=False)


class FederationDetailView(_FederationView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, federation_id: str):
        tenant = request.user.tenant
        federation = selectors.federation_get(tenant=tenant, federation_id=federation_id)
        return Response(federation_json(federation, tenant))

    @extend_schema(request=FederationUpdateInput, responses=OpenApiTypes.OBJECT)
    def patch(self, request, federation_id: str):
        payload = FederationUpdateInput(data=request.data)
        payload.is_valid(raise_exception=True)
        federation = services.federation_update(
            tenant=request.user.tenant, federation_id=federation_id, **payload.validated_data
        )
        return Response(federation_json(federation, request.user.tenant))


class InviteInput(serializers.Serializer):
    tenant = serializers.CharField()


class FederationInviteView(_FederationView):
    @extend_schema(request=InviteInput, responses=OpenApiTypes.OBJECT)
    def post(self, request, federation_id: str):
        payload = InviteInput(data=request.data)
        payload.is_valid(raise_exception=True)
        seat = services.federation_invite(
            tenant=request.user.tenant,
            federation_id=federation_id,
            invitee_slug=payload.validated_data["tenant"],
        )
        return Response(participant_json(seat))


class AcceptInput(serializers.Serializer):
    training_file = serializers.CharField(required=False, allow_null=True, default=None)
    node_name = serializers.CharField(required=False, allow_blank=True, default="")


class FederationAcceptView(_FederationView):
    @extend_schema(request=AcceptInput, responses=OpenApiTypes.OBJECT)
    def post(self, request, federation_id: str):
        payload = AcceptInput(data=request.data)
        payload.is_valid(raise_exception=True)
        seat = services.participant_accept(
            tenant=request.user.tenant, federation_id=federation_id,
            actor=request.user.actor, **payload.validated_data,
        )  # fmt: skip
        return Response(participant_json(seat))


class FederationDeclineView(_FederationView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, federation_id: str):
        seat = services.participant_decline(tenant=request.user.tenant, federation_id=federation_id)
        return Response(participant_json(seat))


class RoundListView(_FederationView):
    write_role = Role.MEMBER

    @extend_schema(operation_id="v1_federation_rounds_list", responses=OpenApiTypes.OBJECT)
    def get(self, request, federation_id: str):
        rounds = selectors.rounds_list(tenant=request.user.tenant, federation_id=federation_id)
        return Response({"object": "list", "data": [round_json(r) for r in rounds]})

    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request, federation_id: str):
        """Start the next round now (the owner; the schedule does it otherwise)."""
        tenant = request.user.tenant
        federation = selectors.federation_get(tenant=tenant, federation_id=federation_id)
        if federation.owner_id != tenant.pk:
            raise DRFPermissionDenied("Only the federation's owner can start a round.")
        fed_round = services.round_start(federation=federation)
        request._request.audit_object = ("federation.round", fed_round.id)
        return Response(round_json(fed_round))


class RoundDetailView(_FederationView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, federation_id: str, round_id: str):
        return Response(
            round_json(
                selectors.round_get(
                    tenant=request.user.tenant, federation_id=federation_id, round_id=round_id
                )
            )
        )
