"""The console's URLs, mounted at /console/ (namespace "console")."""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import batches, federations, views
from .access import csp
from .login import ThrottledLoginView

app_name = "console"

urlpatterns = [
    path(
        "login/",
        csp(
            ThrottledLoginView.as_view(
                template_name="console/login.html",
                redirect_authenticated_user=True,
                next_page="console:dashboard",
            )
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="console:login"), name="logout"),
    path("switch/", views.tenant_switch, name="switch"),
    path("", views.dashboard, name="dashboard"),
    path("files/", views.files, name="files"),
    path("files/<str:file_id>/", views.file_detail, name="file"),
    path("files/<str:file_id>/content", views.file_content, name="file-content"),
    path("files/<str:file_id>/delete/", views.file_delete, name="file-delete"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/new/", views.job_create, name="job-create"),
    path("jobs/<str:job_id>/", views.job_detail, name="job"),
    path("jobs/<str:job_id>/progress.json", views.job_progress, name="job-progress"),
    path(
        "jobs/<str:job_id>/<str:action>/",
        views.job_action,
        name="job-action",
    ),
    path("models/", views.models, name="models"),
    path("models/delete/", views.model_delete, name="model-delete"),
    path("playground/", views.playground, name="playground"),
    path("playground/stream", views.playground_stream, name="playground-stream"),
    path("batches/", batches.batches, name="batches"),
    path("batches/<str:batch_id>/", batches.batch_detail, name="batch"),
    path("batches/<str:batch_id>/cancel/", batches.batch_cancel, name="batch-cancel"),
    path("federations/", federations.federations, name="federations"),
    path("federations/<str:federation_id>/", federations.federation_detail, name="federation"),
    path(
        "federations/<str:federation_id>/rounds.json",
        federations.federation_rounds,
        name="federation-rounds",
    ),
    path(
        "federations/<str:federation_id>/invite/",
        federations.federation_invite,
        name="federation-invite",
    ),
    path(
        "federations/<str:federation_id>/accept/",
        federations.federation_accept,
        name="federation-accept",
    ),
    path(
        "federations/<str:federation_id>/decline/",
        federations.federation_decline,
        name="federation-decline",
    ),
    path(
        "federations/<str:federation_id>/schedule/",
        federations.federation_schedule,
        name="federation-schedule",
    ),
    path(
        "federations/<str:federation_id>/rounds/start/",
        federations.federation_round_start,
        name="federation-round-start",
    ),
    path("keys/", views.api_keys, name="api-keys"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke, name="api-key-revoke"),
    path("members/", views.members, name="members"),
    path("members/<int:membership_id>/remove/", views.member_remove, name="member-remove"),
    path("audit/", views.audit, name="audit"),
    path("audit.csv", views.audit_csv, name="audit-csv"),
]
