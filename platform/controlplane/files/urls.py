from django.urls import path

from . import views

urlpatterns = [
    path("files", views.FileListView.as_view(), name="files"),
    path("files/<str:file_id>", views.FileDetailView.as_view(), name="file"),
    path("files/<str:file_id>/content", views.FileContentView.as_view(), name="file-content"),
]
