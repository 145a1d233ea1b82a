"""Settings for Enclave's control plane, read from the environment (django-environ).

Every value has an embedded default so `make demo` runs with nothing installed: SQLite
and the kombu filesystem transport under var/. Production and the test suite point
DATABASE_URL at PostgreSQL and CELERY_BROKER_URL at Redis. Nothing exists only in
production: the same module serves every topology.
"""

import secrets
from pathlib import Path

import environ

REPO_DIR = Path(__file__).resolve().parents[2]

env = environ.Env()
VAR_DIR = Path(env.str("ENCLAVE_VAR_DIR", default=str(REPO_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _embedded_secret_key() -> str:
    """A random key kept under var/, so the embedded default is never a known constant."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or _embedded_secret_key()
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_celery_beat",
    "controlplane.jobs",
    "controlplane.tenancy",
    "controlplane.vault",
    "controlplane.files",
    "controlplane.tuning",
    "controlplane.federation",
    "controlplane.serving",
    "controlplane.console",
    "controlplane.audit",
    "controlplane.rls",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "controlplane.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "controlplane.middleware.RequestIdMiddleware",
    "controlplane.middleware.AuditMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
ASGI_APPLICATION = "controlplane.asgi.application"
WSGI_APPLICATION = "controlplane.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'enclave.sqlite3'}"),
}
# Workers poll job rows between steps; keep connections but check them before use so a
# dropped PostgreSQL connection is replaced instead of failing the next query.
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's web process and worker share the file; wait for the lock, don't fail.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Console passwords: argon2 (memory-hard); PBKDF2 stays to read hashes made before it.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# ---- security defaults ------------------------------------------------------------------
# Cookies are Secure by default (browsers accept them on http://localhost too); a plain-HTTP
# deployment that is not on localhost must opt out with ENCLAVE_SECURE_COOKIES=false.
SESSION_COOKIE_SECURE = env.bool("ENCLAVE_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True  # the console reads the token from the form, not the cookie
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = env.int("ENCLAVE_SESSION_SECONDS", default=8 * 3600)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# HSTS is sent on HTTPS responses only (Django's SecurityMiddleware decides per request).
SECURE_HSTS_SECONDS = env.int("ENCLAVE_HSTS_SECONDS", default=31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if env.bool("ENCLAVE_BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
# Console logins: at most this many failures per user name and per address in 15 minutes.
ENCLAVE_LOGIN_FAILURES_ALLOWED = env.int("ENCLAVE_LOGIN_FAILURES_ALLOWED", default=5)
LOGIN_URL = "console:login"
LOGIN_REDIRECT_URL = "console:dashboard"
LOGOUT_REDIRECT_URL = "console:login"

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Serve app static files without collectstatic (make demo never runs it).
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": ["controlplane.api.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["controlplane.api.HasRole"],
    "DEFAULT_THROTTLE_CLASSES": ["controlplane.api.TenantRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "controlplane.api_errors.openai_exception_handler",
    "UNAUTHENTICATED_USER": None,
}

# Shared cache: rate-limit windows. Redis in production and tests; a file cache (shared by
# the demo's processes) on the embedded default.
CACHES = {"default": env.cache_url("CACHE_URL", default=f"filecache://{VAR_DIR / 'cache'}")}

# Uploads stay in memory (up to the limit) and go straight into the vault encrypted:
# Django's default would spool large uploads to a plaintext temporary file.
# The vault (controlplane/vault): encrypted blobs live here. The master key comes only from
# ENCLAVE_MASTER_KEY or ENCLAVE_MASTER_KEY_FILE, never from settings (see the vault package).
ENCLAVE_VAULT_DIR = env.str("ENCLAVE_VAULT_DIR", default="") or None  # None: VAR_DIR/vault
ENCLAVE_VAULT_CHUNK_BYTES = env.int("ENCLAVE_VAULT_CHUNK_BYTES", default=1024 * 1024)
# Federated rounds: "simulation" (Flower's simulation runtime, the embedded default) or
# "deployment" (a SuperLink with TLS and one authenticated SuperNode per hosted member).
ENCLAVE_FEDERATION_RUNTIME = env.str("ENCLAVE_FEDERATION_RUNTIME", default="simulation")
if ENCLAVE_FEDERATION_RUNTIME not in ("simulation", "deployment"):
    raise ValueError("ENCLAVE_FEDERATION_RUNTIME must be simulation or deployment")
# Base models: every directory under here with a config.json and safetensors weights.
ENCLAVE_MODELS_DIR = Path(env.str("ENCLAVE_MODELS_DIR", default=str(REPO_DIR / "models")))
# The serving engine hosted in each web process (inference.Engine), one per base model.
ENCLAVE_ENGINE_KV_CACHE_BYTES = env.int("ENCLAVE_ENGINE_KV_CACHE_BYTES", default=256 << 20)
ENCLAVE_ENGINE_MAX_BATCH_TOKENS = env.int("ENCLAVE_ENGINE_MAX_BATCH_TOKENS", default=512)
ENCLAVE_ENGINE_MAX_ACTIVE_ADAPTERS = env.int("ENCLAVE_ENGINE_MAX_ACTIVE_ADAPTERS", default=8)
ENCLAVE_CHAT_MAX_MESSAGES = env.int("ENCLAVE_CHAT_MAX_MESSAGES", default=1024)
ENCLAVE_FILE_MAX_BYTES = env.int("ENCLAVE_FILE_MAX_BYTES", default=64 * 1024 * 1024)
FILE_UPLOAD_HANDLERS = ["django.core.files.uploadhandler.MemoryFileUploadHandler"]
FILE_UPLOAD_MAX_MEMORY_SIZE = ENCLAVE_FILE_MAX_BYTES + 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = ENCLAVE_FILE_MAX_BYTES + 1024 * 1024
SPECTACULAR_SETTINGS = {
    "TITLE": "Enclave API",
    "DESCRIPTION": "OpenAI-compatible API for tenants' fine-tuning, serving and federations.",
    "VERSION": "0.1.0",
    # Every /v1 operation's error statuses and the OpenAI error envelope (controlplane.openapi).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "controlplane.openapi.add_error_responses",
    ],
    # /v1/chat/completions is a plain async Django view (not DRF), described here by hand.
    "APPEND_PATHS": {
        "/v1/chat/completions": {
            "post": {
                "operationId": "chat_completions_create",
                "summary": "Create a chat completion (OpenAI-compatible; stream with SSE)",
                "tags": ["v1"],
                "security": [{"ApiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model", "messages"],
                                "properties": {
                                    "model": {"type": "string"},
                                    "messages": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {
                                            "type": "object",
                                            "required": ["role", "content"],
                                            "properties": {
                                                "role": {
                                                    "type": "string",
                                                    "enum": [
                                                        "system",
                                                        "developer",
                                                        "user",
                                                        "assistant",
                                                    ],
                                                },
                                                "content": {"type": "string"},
                                            },
                                        },
                                    },
                                    "max_tokens": {"type": "integer", "minimum": 1},
                                    "max_completion_tokens": {"type": "integer", "minimum": 1},
                                    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                                    "top_p": {
                                        "type": "number",
                                        "minimum": 0,
                                        "exclusiveMinimum": True,
                                        "maximum": 1,
                                    },
                                    "n": {"type": "integer", "enum": [1]},
                                    "stop": {
                                        "oneOf": [
                                            {"type": "string"},
                                            {
                                                "type": "array",
                                                "maxItems": 4,
                                                "items": {"type": "string"},
                                            },
                                        ]
                                    },
                                    "seed": {"type": "integer"},
                                    "stream": {"type": "boolean"},
                                    "stream_options": {
                                        "type": "object",
                                        "properties": {"include_usage": {"type": "boolean"}},
                                    },
                                    "presence_penalty": {
                                        "type": "number",
                                        "minimum": -2,
                                        "maximum": 2,
                                    },
                                    "frequency_penalty": {
                                        "type": "number",
                                        "minimum": -2,
                                        "maximum": 2,
                                    },
                                    "logprobs": {"type": "boolean"},
                                    "top_logprobs": {
                                        "type": "integer",
                                        "minimum": 0,
                                        "maximum": 20,
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "A chat.completion object, or with stream=true a "
                        "text/event-stream of chat.completion.chunk objects ending in [DONE]",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": {"description": "Invalid request (OpenAI error envelope)"},
                    "401": {"description": "Missing or invalid API key"},
                    "403": {"description": "Role does not allow it"},
                    "404": {"description": "Unknown model"},
                    "429": {"description": "Rate limit; see Retry-After"},
                },
            }
        }
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    # Clients log every request at INFO; that is noise in a worker's or the demo's output.
    "loggers": {name: {"level": "WARNING"} for name in ("httpx", "httpx2", "httpcore", "openai")},
}

# --- Celery (see controlplane/celery.py) -------------------------------------------------
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://localhost/")
CELERY_BROKER_TRANSPORT_OPTIONS = {}
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A prefix on every broker key lets several deployments (or test runs) share a server.
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = env.str(
        "ENCLAVE_BROKER_KEY_PREFIX", default=""
    )
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
        "control_folder": str(BROKER_DIR / "control"),
    }
# A job's lease: a worker that stops renewing for this long is presumed dead and its job
# goes back to the queue.
ENCLAVE_JOB_LEASE_SECONDS = env.int("ENCLAVE_JOB_LEASE_SECONDS", default=60)
ENCLAVE_JOB_MAX_ATTEMPTS = env.int("ENCLAVE_JOB_MAX_ATTEMPTS", default=5)
ENCLAVE_REAPER_INTERVAL_SECONDS = env.float("ENCLAVE_REAPER_INTERVAL_SECONDS", default=30.0)
# A job still queued this long after its message was sent gets its message sent again.
ENCLAVE_REQUEUE_AFTER_SECONDS = env.int("ENCLAVE_REQUEUE_AFTER_SECONDS", default=300)
CELERY_BEAT_SCHEDULE = {
    "reap-expired-job-leases": {
        "task": "jobs.reap_expired_leases",
        "schedule": ENCLAVE_REAPER_INTERVAL_SECONDS,
        "options": {"queue": "default"},
    }
}
