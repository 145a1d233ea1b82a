from django.urls import path

from . import views

urlpatterns = [
    path("federations", views.FederationListView.as_view(), name="federations"),
    path("federations/<str:federation_id>", views.FederationDetailView.as_view()),
    path("federations/<str:federation_id>/invite", views.FederationInviteView.as_view()),
    path("federations/<str:federation_id>/accept", views.FederationAcceptView.as_view()),
    path("federations/<str:federation_id>/decline", views.FederationDeclineView.as_view()),
    path("federations/<str:federation_id>/rounds", views.RoundListView.as_view()),
    path("federations/<str:federation_id>/rounds/<str:round_id>", views.RoundDetailView.as_view()),
]
