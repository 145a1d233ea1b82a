from django.urls import path

from . import batch_views, views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("batches", batch_views.BatchListView.as_view(), name="batches"),
    path("batches/<str:batch_id>", batch_views.BatchDetailView.as_view(), name="batch"),
    path("batches/<str:batch_id>/cancel", batch_views.BatchCancelView.as_view()),
]
