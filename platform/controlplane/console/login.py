"""Console login, rate-limited: after too many failures for a user name (or many more
from one address) within 15 minutes, further attempts get 429 until the window passes."""

import hashlib

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.http import HttpResponse

WINDOW_SECONDS = 15 * 60


#: an address may fail this many times more than one user name (offices share addresses)
ADDRESS_FACTOR = 5


def _limits(request) -> list[tuple[str, int]]:
    """(cache key, failures allowed) for the user name and for the address."""
    limit = settings.ENCLAVE_LOGIN_FAILURES_ALLOWED
    name = request.POST.get("username", "").strip().lower()
    address = request.META.get("REMOTE_ADDR", "")
    return [
        (f"login-fail:user:{hashlib.sha256(name.encode()).hexdigest()[:16]}", limit),
        (f"login-fail:addr:{address}", limit * ADDRESS_FACTOR),
    ]


class ThrottledLoginView(auth_views.LoginView):
    def post(self, request, *args, **kwargs):
        limits = _limits(request)
        if any((cache.get(key) or 0) >= allowed for key, allowed in limits):
            response = HttpResponse(
                "Too many failed sign-ins. Try again in a few minutes.", status=429,
                content_type="text/plain",
            )  # fmt: skip
            response["Retry-After"] = str(WINDOW_SECONDS)
            return response
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200:  # the form came back: the credentials were wrong
            for key, _allowed in limits:
                cache.add(key, 0, timeout=WINDOW_SECONDS)
                cache.incr(key)
        return response
