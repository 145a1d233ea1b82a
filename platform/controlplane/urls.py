from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("console/", include("controlplane.console.urls")),
    path("v1/", include("controlplane.files.urls")),
    path("v1/", include("controlplane.tuning.urls")),
    path("v1/", include("controlplane.serving.urls")),
    path("v1/", include("controlplane.federation.urls")),
    path("v1/", include("controlplane.tenancy.urls")),
]

handler404 = "controlplane.api_errors.envelope_404"
handler500 = "controlplane.api_errors.envelope_500"
