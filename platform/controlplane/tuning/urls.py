from django.urls import path

from . import views

urlpatterns = [
    path("fine_tuning/jobs", views.JobListView.as_view(), name="fine-tuning-jobs"),
    path("fine_tuning/jobs/<str:job_id>", views.JobDetailView.as_view(), name="fine-tuning-job"),
    path("fine_tuning/jobs/<str:job_id>/cancel", views.JobCancelView.as_view()),
    path("fine_tuning/jobs/<str:job_id>/pause", views.JobPauseView.as_view()),
    path("fine_tuning/jobs/<str:job_id>/resume", views.JobResumeView.as_view()),
    path("fine_tuning/jobs/<str:job_id>/events", views.JobEventsView.as_view()),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", views.JobCheckpointsView.as_view()),
    path("models", views.ModelListView.as_view(), name="models"),
    path("models/<path:model_id>", views.ModelDetailView.as_view(), name="model"),
]
