"""Keyway settings, configured only from the environment (see README for the variables)."""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from platform_site.env import env_bool, env_float, env_int, env_list, env_secret, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("KEYWAY_VAR_DIR", str(BASE_DIR / "var")))

# Off unless asked for: `make run` and `make test` ask for the development mode (DEBUG=1) explicitly.
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_secret("SECRET_KEY", debug=DEBUG, var_dir=VAR_DIR)
# The pepper keys the HMAC under which API key secrets are stored. Changing it invalidates every key.
KEYWAY_KEY_PEPPER = env_secret("KEYWAY_KEY_PEPPER", debug=DEBUG, var_dir=VAR_DIR)
# Fernet-style key material for upstream provider secrets encrypted at rest.
KEYWAY_ENCRYPTION_KEY = env_secret("KEYWAY_ENCRYPTION_KEY", debug=DEBUG, var_dir=VAR_DIR)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "platform_site",
    "apikeys",
    "billing",
    "conversations",
    "agents",
    "completions",
    "dashboard",
]

# The dashboard's middleware. The OpenAI-compatible API under /v1 and /api/v1 is served by a separate handler
# (platform_site.asgi) that runs none of these, because sessions, auth, messages and CSRF cost more than the
# whole proxy hop and mean nothing to a bearer-token API.
MIDDLEWARE = [
    "platform_site.middleware.RequestIdMiddleware",
    "platform_site.middleware.RejectNulBytesMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "platform_site.urls"
# Error reports (the DEBUG page) hide connection URLs too, not only what looks like a key.
DEFAULT_EXCEPTION_REPORTER_FILTER = "platform_site.reporting.KeywayExceptionReporterFilter"
ASGI_APPLICATION = "platform_site.asgi.application"
# Where WebSockets go (platform_site.asgi): the realtime surface's router.
WEBSOCKET_APPLICATION = "completions.realtime.routing.websocket_application"
# What the API path's lean handler (platform_site.api_handler) runs before it reads a request body: the key
# is checked from the headers first, so nobody without one can make this server read (or wait for) a body.
API_AUTHENTICATOR = "completions.api.http.authenticate_before_body"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.context.dashboard",
            ],
        },
    },
]

# Under ASGI a request's ORM calls may run on a different thread each time, so Django's per-thread persistent
# connections would leak; PostgreSQL gets psycopg's connection pool instead (CONN_MAX_AGE must then be 0).
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'keyway.sqlite3'}"), conn_max_age=0, conn_health_checks=False
    )
}
# While PostgreSQL is unreachable, connecting fails at once for DATABASE_RETRY_AFTER seconds after each failure
# (platform_site.database); DATABASE_POOL_TIMEOUT bounds what the first failing request waits.
DATABASE_RETRY_AFTER = env_float("DATABASE_RETRY_AFTER", 1.0, minimum=0.0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["ENGINE"] = "platform_site.database"
    # With a pool, this is psycopg_pool's check: a connection that died with the server (a restart) is replaced
    # when taken from the pool, not used and failed.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"]["OPTIONS"] = {
        "pool": {
            "min_size": env_int("DATABASE_POOL_MIN", 2, minimum=0),
            "max_size": env_int("DATABASE_POOL_MAX", 20, minimum=1),
            "timeout": env_float("DATABASE_POOL_TIMEOUT", 3.0, minimum=0.1),
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the server read while a management command writes; the timeout rides out short write locks.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
# Namespaces every key Keyway puts in Redis (cache and rate-limit counters).
KEYWAY_CACHE_PREFIX = env_str("KEYWAY_CACHE_PREFIX", "kw")
# Connections per worker process for billing's asynchronous Redis clients (each: billing.counters' scripts,
# and redis-py's for the rest).
KEYWAY_REDIS_POOL_SIZE = env_int("KEYWAY_REDIS_POOL_SIZE", 64, minimum=1)
# How long a call to Redis may take (connecting, or waiting for an answer) before it counts as failed, and how
# long this process then fails fast without trying (platform_site.kernel.breaker). No request waits on a
# Redis that is down for longer than the first of these. Not much shorter: an asynchronous call's timeout
# also counts the time its worker's event loop was busy elsewhere (a burst), which is not Redis's fault.
KEYWAY_REDIS_TIMEOUT = env_float("KEYWAY_REDIS_TIMEOUT", 2.0, minimum=0.01)
KEYWAY_REDIS_RETRY_AFTER = env_float("KEYWAY_REDIS_RETRY_AFTER", 1.0, minimum=0.0)
# Rate limits while Redis is unreachable: "closed" refuses requests that need them (503
# rate_limits_unavailable), "open" serves them unlimited. Prepaid credit and spend caps always fail closed.
KEYWAY_RATE_LIMITS_WITHOUT_REDIS = env_str("KEYWAY_RATE_LIMITS_WITHOUT_REDIS", "closed")
if KEYWAY_RATE_LIMITS_WITHOUT_REDIS not in ("closed", "open"):
    raise ImproperlyConfigured("KEYWAY_RATE_LIMITS_WITHOUT_REDIS must be 'closed' or 'open'.")
if REDIS_URL:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    CACHES = {
        "default": {
            "BACKEND": "platform_site.cache.SharedClientRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": KEYWAY_CACHE_PREFIX,
            "OPTIONS": {
                "socket_connect_timeout": KEYWAY_REDIS_TIMEOUT,
                "socket_timeout": KEYWAY_REDIS_TIMEOUT,
                # One immediate retry replaces a connection Redis dropped; then the breaker counts the failure.
                "retry": Retry(NoBackoff(), 1),
            },
        }
    }
    # channels_redis waits for messages in 5 s blocking pops; redis-py 8's default 5 s socket timeout cut
    # those reads and tore every quiet WebSocket down (channels_redis#422), and made a closing socket wait
    # for the timeout. No socket timeout, as before redis-py 8; keepalive notices a dead connection.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "platform_site.channel_layer.ResilientRedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None, "socket_keepalive": True,
                                  "socket_connect_timeout": KEYWAY_REDIS_TIMEOUT}]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "keyway"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

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

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# WhiteNoise serves the dashboard's own CSS and JS from the app directories, so `make run` needs no
# collectstatic and no asset ever comes from another host.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Request bodies: the API maps a body over this size to a 413 OpenAI error.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("KEYWAY_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=1024)
# Seconds a client with a valid key has to send its whole request body on the API path (408 past it).
KEYWAY_BODY_READ_TIMEOUT = env_float("KEYWAY_BODY_READ_TIMEOUT", 60.0, minimum=0.1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PARSER_CLASSES": ["platform_site.kernel.jsonbody.BoundedJSONParser"],
    # No `?format=` override: the APIs answer JSON only, and an unknown format was DRF's own 404 body (not an
    # error object) on the OpenAPI documents.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Keyway management API",
    "DESCRIPTION": "Organizations, projects, members, invitations, API keys and audit logs, in the shape of "
    "OpenAI's Admin API. Authenticate with an admin key (`Authorization: Bearer sk-kw-…`, scope `admin`) or a "
    "dashboard session.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "OAS_VERSION": "3.1.0",
    "SCHEMA_PATH_PREFIX": "/v1/organization",
}

# --- Accounts (django-allauth) --------------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "dashboard:home"
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_VERIFICATION = env_str("KEYWAY_EMAIL_VERIFICATION", "mandatory")
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_LOGOUT_REDIRECT_URL = "dashboard:home"
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "http" if DEBUG else "https"
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Keyway] "
ACCOUNT_SESSION_REMEMBER = None
# Login throttling: failed sign-ins per address and per account, sign-ups and e-mails per address. allauth
# keeps the counters in the cache, which is Redis in production and so holds across workers.
ACCOUNT_RATE_LIMITS = {
    "login_failed": env_str("KEYWAY_LOGIN_FAILED_RATE", "10/m/ip,5/5m/key"),
    "login": "30/m/ip",
    "signup": "20/m/ip",
    "confirm_email": "1/3m/key",
    "reset_password": "20/m/ip,5/m/key",
    "reset_password_from_key": "20/m/ip",
    "change_password": "5/m/user",
}
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = "Keyway"
SOCIALACCOUNT_EMAIL_AUTHENTICATION = False
SOCIALACCOUNT_PROVIDERS: dict[str, dict[str, object]] = {}
# Single sign-on with any OpenID Connect provider (Okta, Entra ID, Google Workspace, Keycloak…), off unless
# its client is configured here.
if env_str("KEYWAY_OIDC_CLIENT_ID", ""):
    SOCIALACCOUNT_PROVIDERS["openid_connect"] = {
        "OAUTH_PKCE_ENABLED": True,
        "APPS": [
            {
                "provider_id": env_str("KEYWAY_OIDC_PROVIDER_ID", "sso"),
                "name": env_str("KEYWAY_OIDC_NAME", "Single sign-on"),
                "client_id": env_str("KEYWAY_OIDC_CLIENT_ID"),
                "secret": env_str("KEYWAY_OIDC_CLIENT_SECRET", ""),
                "settings": {"server_url": env_str("KEYWAY_OIDC_SERVER_URL")},
            }
        ],
    }

# E-mail: printed to the console on the embedded default; SMTP when EMAIL_HOST is set; written to files
# under KEYWAY_EMAIL_FILE_PATH when that is set (the browser tests read their verification links there).
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Keyway <no-reply@keyway.localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# The dashboard's address as people reach it, for links in e-mails sent outside a request (spend alerts);
# empty: such e-mails name the page instead of linking to it.
KEYWAY_DASHBOARD_URL = env_str("KEYWAY_DASHBOARD_URL", "http://127.0.0.1:8000" if DEBUG else "").rstrip("/")
if KEYWAY_DASHBOARD_URL and not KEYWAY_DASHBOARD_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured("KEYWAY_DASHBOARD_URL must start with http:// or https://.")
EMAIL_HOST = env_str("EMAIL_HOST", "")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
    EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
    EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10, minimum=1)
elif env_str("KEYWAY_EMAIL_FILE_PATH", ""):
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = env_str("KEYWAY_EMAIL_FILE_PATH")
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"

# --- Browser security ------------------------------------------------------------------------------------------
# The dashboard loads nothing from another host and runs no inline script, so the policy can be strict. The
# data: images are the TOTP set-up QR code, which allauth renders inline.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
if env_bool("KEYWAY_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Logs: one JSON object per line (time, level, logger, message, request_id) unless LOG_FORMAT=plain; plain
# text by default in DEBUG. Messages never carry a key, a secret or prompt text (tests/e2e/conftest.py).
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "platform_site.kernel.logs.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler",
                             "formatter": "json" if LOG_FORMAT == "json" else "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # WeasyPrint logs every step of every statement PDF at INFO.
        "weasyprint": {"level": "WARNING"},
        # The MCP client and its HTTP library log every URL they call (a tenant's MCP URL may carry a token)
        # and session ids at INFO: nothing secret in the logs.
        "httpx2": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "mcp": {"level": "WARNING"},
    },
}

# --- Keyway -------------------------------------------------------------------------------------------------
# Prometheus metrics (platform_site.kernel.metrics): where the worker processes write them, and the bearer
# token a scraper sends to GET /metrics (staff may read it logged in; without a token, nobody else may).
KEYWAY_METRICS_DIR = Path(env_str("KEYWAY_METRICS_DIR", str(VAR_DIR / "metrics")))
KEYWAY_METRICS_TOKEN = env_str("KEYWAY_METRICS_TOKEN", "")
# How long a worker trusts its in-process copy of an API key before re-checking the shared cache. Revocation
# deletes the shared entry, so this bounds how long a revoked key may still pass on another worker.
KEYWAY_KEY_LOCAL_TTL = env_float("KEYWAY_KEY_LOCAL_TTL", 0.5, minimum=0.0)
# Failed authentications one client address may make in a minute (per worker) before it is refused unseen.
KEYWAY_AUTH_FAILURES_PER_MINUTE = env_int("KEYWAY_AUTH_FAILURES_PER_MINUTE", 60, minimum=1)
KEYWAY_KEY_CACHE_TTL = env_int("KEYWAY_KEY_CACHE_TTL", 300, minimum=1)
KEYWAY_ROTATION_GRACE_SECONDS = env_int("KEYWAY_ROTATION_GRACE_SECONDS", 24 * 3600, minimum=0)
# The dashboard playground's keys (apikeys.services.playground_key_create): seconds each lives, at most a day so
# a forgotten tab's key cannot outlive the working day, and how many one user may have made in an hour.
KEYWAY_PLAYGROUND_KEY_TTL = env_int("KEYWAY_PLAYGROUND_KEY_TTL", 30 * 60, minimum=60)
if KEYWAY_PLAYGROUND_KEY_TTL > 24 * 3600:
    raise ImproperlyConfigured("KEYWAY_PLAYGROUND_KEY_TTL must be at most 86400 seconds (a day).")
KEYWAY_PLAYGROUND_KEYS_PER_HOUR = env_int("KEYWAY_PLAYGROUND_KEYS_PER_HOUR", 30, minimum=1)
KEYWAY_CATALOG_LOCAL_TTL = env_float("KEYWAY_CATALOG_LOCAL_TTL", 1.0, minimum=0.0)

# Upstream HTTP providers.
KEYWAY_UPSTREAM_TIMEOUT = env_float("KEYWAY_UPSTREAM_TIMEOUT", 180.0, minimum=0.1)
KEYWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("KEYWAY_UPSTREAM_CONNECT_TIMEOUT", 10.0, minimum=0.1)
# Upstream calls and streams in flight per worker process; past it a call waits up to POOL_WAIT seconds for
# a place, then gets 503. One key may hold MAX_PER_KEY of them (429 past it).
KEYWAY_UPSTREAM_POOL_SIZE = env_int("KEYWAY_UPSTREAM_POOL_SIZE", 1024, minimum=1)
KEYWAY_UPSTREAM_POOL_WAIT = env_float("KEYWAY_UPSTREAM_POOL_WAIT", 5.0, minimum=0.0)
KEYWAY_UPSTREAM_MAX_PER_KEY = env_int("KEYWAY_UPSTREAM_MAX_PER_KEY", 768, minimum=1)

# The Responses and Conversations APIs (completions/api/responses.py, conversations/). Stored responses are
# kept this many days (then invisible, and removed by `manage.py purge_responses`); a response reads at most
# this many predecessors and this many bytes of earlier items; a conversation holds at most this many items.
KEYWAY_RESPONSES_RETENTION_DAYS = env_int("KEYWAY_RESPONSES_RETENTION_DAYS", 30, minimum=1)
KEYWAY_RESPONSES_MAX_CHAIN = env_int("KEYWAY_RESPONSES_MAX_CHAIN", 1000, minimum=1)
KEYWAY_RESPONSES_MAX_CONTEXT_BYTES = env_int("KEYWAY_RESPONSES_MAX_CONTEXT_BYTES", 16 * 1024 * 1024, minimum=1024)
KEYWAY_CONVERSATION_MAX_ITEMS = env_int("KEYWAY_CONVERSATION_MAX_ITEMS", 10_000, minimum=1)
# Background responses one organization may have running in one worker process; more get 429.
KEYWAY_RESPONSES_BACKGROUND_PER_ORG = env_int("KEYWAY_RESPONSES_BACKGROUND_PER_ORG", 16, minimum=1)
# A background response whose runner has not written for this long is taken for lost (its worker died) and
# is failed when next read.
KEYWAY_RESPONSES_STALE_SECONDS = env_float("KEYWAY_RESPONSES_STALE_SECONDS", 60.0, minimum=5.0)

# Agents (agents/, completions/agent/). Chat sessions are kept this many days after their last turn (then
# invisible, and removed by `manage.py purge_sessions`) and hold at most this many bytes; an agent run makes
# at most 50 model steps whatever is asked, and runs this many of one organization's agent turns at once per
# worker. Webhook callbacks are attempted this many times, backing off from 2 s.
KEYWAY_SESSIONS_RETENTION_DAYS = env_int("KEYWAY_SESSIONS_RETENTION_DAYS", 30, minimum=1)
KEYWAY_SESSION_MAX_BYTES = env_int("KEYWAY_SESSION_MAX_BYTES", 4 * 1024 * 1024, minimum=1024)
KEYWAY_AGENT_RUNS_PER_ORG = env_int("KEYWAY_AGENT_RUNS_PER_ORG", 32, minimum=1)
KEYWAY_HOOK_CALLBACK_ATTEMPTS = env_int("KEYWAY_HOOK_CALLBACK_ATTEMPTS", 6, minimum=1)
KEYWAY_HOOK_CALLBACK_BACKOFF = env_float("KEYWAY_HOOK_CALLBACK_BACKOFF", 2.0, minimum=0.01)
# The output limit of each model step of a webhook's turn (its sender cannot set one).
KEYWAY_HOOK_MAX_TOKENS = env_int("KEYWAY_HOOK_MAX_TOKENS", 1024, minimum=1)

# The realtime WebSocket (/v1/realtime). Every socket is bounded: open sessions per key (counted across
# workers where there is Redis), the size of one client message, the conversation it may hold, how long it
# may sit idle and how long it may last (OpenAI ends its sessions after 60 minutes).
KEYWAY_REALTIME_SESSIONS_PER_KEY = env_int("KEYWAY_REALTIME_SESSIONS_PER_KEY", 32, minimum=1)
KEYWAY_REALTIME_MAX_MESSAGE_BYTES = env_int("KEYWAY_REALTIME_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024)
KEYWAY_REALTIME_MAX_ITEMS = env_int("KEYWAY_REALTIME_MAX_ITEMS", 1000, minimum=1)
KEYWAY_REALTIME_MAX_CONVERSATION_BYTES = env_int(
    "KEYWAY_REALTIME_MAX_CONVERSATION_BYTES", 4 * 1024 * 1024, minimum=1024
)
KEYWAY_REALTIME_IDLE_TIMEOUT = env_float("KEYWAY_REALTIME_IDLE_TIMEOUT", 300.0, minimum=1.0)
KEYWAY_REALTIME_MAX_LIFETIME = env_float("KEYWAY_REALTIME_MAX_LIFETIME", 3600.0, minimum=1.0)
# The largest frame an upstream realtime provider may send through the relay (audio deltas are large).
KEYWAY_REALTIME_MAX_UPSTREAM_BYTES = env_int("KEYWAY_REALTIME_MAX_UPSTREAM_BYTES", 16 * 1024 * 1024, minimum=1024)
# How often an open socket checks that its key is still valid (revocation is also pushed to it at once).
KEYWAY_REALTIME_KEY_RECHECK = env_float("KEYWAY_REALTIME_KEY_RECHECK", 5.0, minimum=0.1)

# Multimodal content parts: size limits (bytes) and how image URLs are fetched server-side.
KEYWAY_MAX_IMAGE_BYTES = env_int("KEYWAY_MAX_IMAGE_BYTES", 20 * 1024 * 1024, minimum=1024)
KEYWAY_MAX_AUDIO_BYTES = env_int("KEYWAY_MAX_AUDIO_BYTES", 25 * 1024 * 1024, minimum=1024)
KEYWAY_MAX_FILE_BYTES = env_int("KEYWAY_MAX_FILE_BYTES", 32 * 1024 * 1024, minimum=1024)
KEYWAY_FETCH_TIMEOUT = env_float("KEYWAY_FETCH_TIMEOUT", 10.0, minimum=0.1)
# Connections of the image fetcher's own pool (per worker), apart from the upstream pool.
KEYWAY_FETCH_POOL_SIZE = env_int("KEYWAY_FETCH_POOL_SIZE", 16, minimum=1)
# PDFs are read in a process of their own (completions/api/pdf_worker.py), within these bounds.
KEYWAY_PDF_TIMEOUT = env_float("KEYWAY_PDF_TIMEOUT", 10.0, minimum=0.1)
KEYWAY_PDF_MAX_PAGES = env_int("KEYWAY_PDF_MAX_PAGES", 200, minimum=1)
KEYWAY_PDF_MAX_TEXT_CHARS = env_int("KEYWAY_PDF_MAX_TEXT_CHARS", 1_000_000, minimum=1000)
KEYWAY_PDF_MEMORY_MB = env_int("KEYWAY_PDF_MEMORY_MB", 512, minimum=128)
# Remote images one request may have fetched, and their bytes together.
KEYWAY_FETCH_MAX_IMAGES = env_int("KEYWAY_FETCH_MAX_IMAGES", 8, minimum=0)
KEYWAY_FETCH_MAX_TOTAL_BYTES = env_int("KEYWAY_FETCH_MAX_TOTAL_BYTES", 50 * 1024 * 1024, minimum=1024)
# Off by default: fetching URLs that resolve to private addresses would let callers probe the network.
KEYWAY_FETCH_ALLOW_PRIVATE = env_bool("KEYWAY_FETCH_ALLOW_PRIVATE", False)
# Seconds an MCP connector's list of tools is kept in each worker: an agent run asks for it at every step,
# and connectors follow the outbound-address rule above (agents/connectors.py).
KEYWAY_MCP_TOOLS_TTL = env_int("KEYWAY_MCP_TOOLS_TTL", 60, minimum=0)

# Rate limits per key when the key sets none (requests and tokens per minute). KEYWAY_RATE_LIMITS=0 turns
# limiting off altogether (for benchmarks that compare the hot path with and without it).
KEYWAY_RATE_LIMITS = env_bool("KEYWAY_RATE_LIMITS", True)
KEYWAY_DEFAULT_RPM = env_int("KEYWAY_DEFAULT_RPM", 600, minimum=1)
KEYWAY_DEFAULT_TPM = env_int("KEYWAY_DEFAULT_TPM", 2_000_000, minimum=1)
# Each project's ceiling per model, shared by all of its keys, where the project sets none (OpenAI's project
# rate limits; changed per project in the dashboard or at /v1/organization/projects/{id}/rate_limits).
KEYWAY_PROJECT_RPM = env_int("KEYWAY_PROJECT_RPM", 100_000, minimum=1)
KEYWAY_PROJECT_TPM = env_int("KEYWAY_PROJECT_TPM", 100_000_000, minimum=1)

# Routing: a deployment that fails this many times in a row sits out the cool-down (seconds).
KEYWAY_BREAKER_FAILURES = env_int("KEYWAY_BREAKER_FAILURES", 3, minimum=1)
KEYWAY_BREAKER_COOLDOWN = env_float("KEYWAY_BREAKER_COOLDOWN", 30.0, minimum=0.0)

# The embedded llama.cpp provider.
KEYWAY_LLAMA_THREADS = env_int("KEYWAY_LLAMA_THREADS", 2, minimum=1)
KEYWAY_LLAMA_CONTEXT = env_int("KEYWAY_LLAMA_CONTEXT", 4096, minimum=256)
# Sharing an embedded model (completions/providers/slots.py), per worker process: generations that run at
# once (instances sharing the weights), how many of them one key and one organization may hold, how many may
# wait (in all, and per key) and for how long; the output of one request; the time to compile a grammar.
KEYWAY_LLAMA_SLOTS = env_int("KEYWAY_LLAMA_SLOTS", 4, minimum=1)
KEYWAY_LLAMA_MAX_PER_KEY = env_int("KEYWAY_LLAMA_MAX_PER_KEY", 3, minimum=1)
KEYWAY_LLAMA_MAX_PER_ORG = env_int("KEYWAY_LLAMA_MAX_PER_ORG", 3, minimum=1)
KEYWAY_LLAMA_QUEUE = env_int("KEYWAY_LLAMA_QUEUE", 32, minimum=0)
KEYWAY_LLAMA_QUEUE_PER_KEY = env_int("KEYWAY_LLAMA_QUEUE_PER_KEY", 8, minimum=0)
KEYWAY_LLAMA_QUEUE_WAIT = env_float("KEYWAY_LLAMA_QUEUE_WAIT", 30.0, minimum=0.1)
KEYWAY_LLAMA_MAX_OUTPUT_TOKENS = env_int("KEYWAY_LLAMA_MAX_OUTPUT_TOKENS", 4096, minimum=1)
KEYWAY_LLAMA_GRAMMAR_TIMEOUT = env_float("KEYWAY_LLAMA_GRAMMAR_TIMEOUT", 2.0, minimum=0.1)
KEYWAY_EMBEDDING_THREADS = env_int("KEYWAY_EMBEDDING_THREADS", 2, minimum=1)
KEYWAY_MODEL_DIR = Path(env_str("KEYWAY_MODEL_DIR", str(VAR_DIR / "models")))
# The default catalog entries `make run` creates (public ids); empty disables one.
KEYWAY_DEFAULT_MODEL = env_str("KEYWAY_DEFAULT_MODEL", "gemma-3-270m")
KEYWAY_DEFAULT_EMBEDDING_MODEL = env_str("KEYWAY_DEFAULT_EMBEDDING_MODEL", "all-minilm-l6-v2")

# Metering (billing). KEYWAY_METERING=0 turns reservations and the usage ledger off (for benchmarks that
# compare the hot path with and without it; never in production).
KEYWAY_METERING = env_bool("KEYWAY_METERING", True)
# An organization without a plan is billed this way: "postpaid" (no balance check) or "prepaid".
KEYWAY_DEFAULT_BILLING_MODE = env_str("KEYWAY_DEFAULT_BILLING_MODE", "postpaid")
if KEYWAY_DEFAULT_BILLING_MODE not in ("prepaid", "postpaid"):
    raise ImproperlyConfigured("KEYWAY_DEFAULT_BILLING_MODE must be 'prepaid' or 'postpaid'.")
# How long a worker trusts its copy of prices and an organization's billing terms (seconds).
KEYWAY_BILLING_LOCAL_TTL = env_float("KEYWAY_BILLING_LOCAL_TTL", 1.0, minimum=0.0)
# Settled requests are appended to a journal file here before anything else, then written to the usage
# ledger in batches; a worker that dies leaves its journal for the next one to replay. Must be on storage
# that outlives the worker process.
KEYWAY_USAGE_JOURNAL_DIR = Path(env_str("KEYWAY_USAGE_JOURNAL_DIR", str(VAR_DIR / "usage-journal")))
KEYWAY_USAGE_FLUSH_INTERVAL = env_float("KEYWAY_USAGE_FLUSH_INTERVAL", 0.25, minimum=0.001)
KEYWAY_USAGE_FLUSH_BATCH = env_int("KEYWAY_USAGE_FLUSH_BATCH", 1000, minimum=1)
# How long to wait before writing again after the database refused a batch (it is down): the batch waits in
# the journal meanwhile.
KEYWAY_USAGE_RETRY_INTERVAL = env_float("KEYWAY_USAGE_RETRY_INTERVAL", 1.0, minimum=0.01)
# With Redis: how long usage events a worker read from the shared stream may stay unwritten before another
# worker takes them over (the first was lost with its host, or is stuck); longer than a batch's write takes.
KEYWAY_USAGE_CLAIM_IDLE = env_float("KEYWAY_USAGE_CLAIM_IDLE", 30.0, minimum=0.1)
# With Redis: whether this process's workers write the shared usage stream to the ledger (every
# KEYWAY_USAGE_FLUSH_INTERVAL seconds). Off where another process does: `manage.py usage_writer` on other hosts
# (README, Several hosts), or the test suite, which drains it itself.
KEYWAY_USAGE_STREAM_WRITER = env_bool("KEYWAY_USAGE_STREAM_WRITER", True)
# With Redis: each host keeps a copy of the events it sent to the usage stream and, this many seconds later,
# writes those the ledger does not have (Redis lost them: restarted empty, flushed, failed over).
KEYWAY_USAGE_VERIFY_AFTER = env_float("KEYWAY_USAGE_VERIFY_AFTER", 10.0, minimum=0.0)
# With Redis: how often each worker says it is alive. A worker silent for three intervals is taken for dead
# and the holds of the calls it was serving are given back (billing.counters).
KEYWAY_WORKER_HEARTBEAT_INTERVAL = env_float("KEYWAY_WORKER_HEARTBEAT_INTERVAL", 10.0, minimum=0.2)
# With Redis: where billing's keys live (billing.connections), if not on REDIS_URL, and whether that is a Redis
# Cluster (the URL names any of its nodes).
KEYWAY_BILLING_REDIS_URL = env_str("KEYWAY_BILLING_REDIS_URL", "")
KEYWAY_BILLING_REDIS_CLUSTER = env_bool("KEYWAY_BILLING_REDIS_CLUSTER", False)
if KEYWAY_BILLING_REDIS_CLUSTER and not (KEYWAY_BILLING_REDIS_URL or REDIS_URL):
    raise ImproperlyConfigured("KEYWAY_BILLING_REDIS_CLUSTER needs KEYWAY_BILLING_REDIS_URL (or REDIS_URL).")
# With Redis: how many shards (hash tags) the billing keys are spread over (billing.keys). 1 on a single
# Redis; on a Redis Cluster, a multiple of its primaries. Change it only with every worker stopped.
KEYWAY_REDIS_SHARDS = env_int("KEYWAY_REDIS_SHARDS", 1, minimum=1)
if KEYWAY_REDIS_SHARDS > 1024:
    raise ImproperlyConfigured("KEYWAY_REDIS_SHARDS must be at most 1024.")
# With Redis: leased admission (billing.slices). An admission that goes to Redis may also take a slice of the
# room left under every limit it counts against, for up to this many more requests like it, which the worker
# then admits without a round trip; 0 sends every admission to Redis. Slices shrink as the room does (none
# near a limit) and are given back within KEYWAY_ADMISSION_SLICE_SECONDS.
KEYWAY_ADMISSION_SLICE = env_int("KEYWAY_ADMISSION_SLICE", 32, minimum=0)
if KEYWAY_ADMISSION_SLICE > 1000:
    raise ImproperlyConfigured("KEYWAY_ADMISSION_SLICE must be at most 1000.")
KEYWAY_ADMISSION_SLICE_SECONDS = env_float("KEYWAY_ADMISSION_SLICE_SECONDS", 0.1, minimum=0.005)
if KEYWAY_ADMISSION_SLICE_SECONDS > 5:
    raise ImproperlyConfigured("KEYWAY_ADMISSION_SLICE_SECONDS must be at most 5.")
# How often the shared billing counters are checked against the ledger and corrected (billing.reconcile), by
# one worker at a time; 0 turns the periodic pass off (`manage.py reconcile_counters` still runs it).
KEYWAY_RECONCILE_INTERVAL = env_float("KEYWAY_RECONCILE_INTERVAL", 300.0, minimum=0.0)
