"""Schemathesis against a live Keyway: the three OpenAPI documents (/v1, the management API, the billing API)
fuzzed operation by operation, with the same checks in CI (tests/e2e/test_fuzz.py, a few cases per operation)
and by hand (bench/fuzz_bench.py, a thousand and more).

Each operation gets the request examples its document gives, then `cases` requests generated from it, half
valid (positive) and half not (negative), from a fixed seed. Every response must pass:

- `not_a_server_error`: no 5xx;
- `response_schema_conformance`: the body matches what the document says for its status (for a 2xx, the
  official schema; for an event stream, every event);
- `content_type_conformance` and `response_headers_conformance`: the documented media type and headers;
- `openai_error_object`: every 4xx and 5xx is `{"error": {"message", "type", "param", "code"}}` and nothing
  else.

Generated ids name nothing, so every request on an id would be a 404. To reach the objects themselves, a
case takes, half of the time, the id of an object that exists (seeded before the run, and collected from
every 2xx answer since) and, on the model endpoints, a model the stack serves: the fake upstream's `ok`
(chat) and `fake-embed` (embeddings), so the 2xx answers are checked too; the key is limited to those two,
so nothing waits for the embedded models (which the examples name) on this machine's CPU.
The runs are ordered so that no target can lock the next one out: the management API (which may lower the
demo project's limits) goes last, and the keys the run uses are never offered as ids to revoke or rotate.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from tests.e2e import server

SEED = 20_250_913
# The fake upstream's chat model and an embeddings model it also answers (registered by `fuzz_stack`).
CHAT_MODEL = "ok"
EMBEDDINGS_MODEL = "fake-embed"
# Keys the run uses are named so; their ids are never offered to a case (a revoked fuzzing key would end
# the run's coverage, not find a bug).
KEY_PREFIX = "fuzz-"
# The billing API allows 120 requests a minute per key: enough keys for a run to stay under it.
BILLING_REQUESTS_PER_KEY = 100
# The management API allows 300 a minute per caller (dashboard.admin_api.base); it has about 55 operations.
MANAGEMENT_REQUESTS_PER_KEY = 250
MANAGEMENT_OPERATIONS = 60
REQUEST_TIMEOUT = 30.0


# The checks ------------------------------------------------------------------------------------------------


def openai_error_object(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx and 5xx answer is OpenAI's error object, in JSON, and nothing else."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), (
        f"A {response.status_code} answered with Content-Type {content_type!r}, not an OpenAI error object."
    )
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"A {response.status_code} answered with a body that is not JSON.") from None
    assert isinstance(body, dict) and set(body) == {"error"}, (
        f"A {response.status_code} answered with {sorted(body) if isinstance(body, dict) else type(body).__name__}, "
        'not {"error": {…}}.'
    )
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, (
        f"The error object of a {response.status_code} has the fields {sorted(error)}, not message, type, param, code."
    )
    assert isinstance(error["message"], str) and error["message"], "The error has no message."
    assert isinstance(error["type"], str) and error["type"], "The error has no type."
    for name in ("param", "code"):
        assert error[name] is None or isinstance(error[name], str), f"The error's {name} is neither null nor a string."
    return None


CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
    openai_error_object,
]


# Ids of objects that exist --------------------------------------------------------------------------------

# An object's `object` field → the path parameter that names such an object.
_PARAMETER_OF = {
    "response": "response_id",
    "conversation": "conversation_id",
    "organization.project": "project_id",
    "organization.project.api_key": "key_id",
    "organization.admin_api_key": "key_id",
    "organization.user": "user_id",
    "organization.invite": "invite_id",
    "project.rate_limit": "rate_limit_id",
    "organization.project.connector": "connector_id",
    "organization.project.agent": "agent_id",
    "organization.project.hook": "hook_id",
    "chat.session": "session_id",
}


@dataclass
class Pool:
    """Ids of objects that exist, by the path parameter that takes them."""

    ids: dict[str, list[str]] = field(default_factory=dict)
    # The objects seeded before the run: never offered to a DELETE, so every operation can still reach one.
    protected: set[str] = field(default_factory=set)

    def add(self, parameter: str, value: Any) -> None:
        if isinstance(value, str) and value:
            known = self.ids.setdefault(parameter, [])
            if value not in known:
                known.append(value)

    def discard(self, parameter: str, value: Any) -> None:
        with contextlib.suppress(ValueError):
            self.ids.get(parameter, []).remove(value)

    def harvest(self, body: Any) -> None:
        """Collect the ids an answer names: its own, its list's, and its output items'."""
        if not isinstance(body, dict):
            return
        for entry in (body, *_dicts(body.get("data")), *_dicts(body.get("output"))):
            name = str(entry.get("name") or "")
            if name.startswith(KEY_PREFIX):
                continue
            kind = entry.get("object")
            if kind in _PARAMETER_OF:
                self.add(_PARAMETER_OF[kind], entry.get("id"))
            elif kind is None and "type" in entry:
                # A Responses item (a message, a function call…): what conversations' items are named by.
                self.add("item_id", entry.get("id"))


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


# Running ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One document and how to call what it describes."""

    name: str
    document: dict[str, Any]
    base_url: str
    keys: list[str]
    calls: int = 0

    def headers(self) -> dict[str, str]:
        # Round robin: the billing and management APIs' per-key rate limits are not what is being fuzzed.
        self.calls += 1
        return {"Authorization": f"Bearer {self.keys[self.calls % len(self.keys)]}"}


@dataclass
class Outcome:
    """What one operation's cases found."""

    target: str
    operation: str
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    # The first example of each distinct failure (its title and the operation's status), with a curl to repeat it.
    failures: dict[str, str] = field(default_factory=dict)
    failed_cases: int = 0
    # Draws schemathesis gave up on (_GENERATOR_LIMIT): no request was made, the run went on from the next seed.
    generator_limits: int = 0

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def line(self) -> str:
        statuses = " ".join(f"{status}×{count}" for status, count in sorted(self.statuses.items()))
        counts = f"{self.cases['examples']}+{self.cases['positive']}+{self.cases['negative']}"
        limits = f"  (generator gave up {self.generator_limits}×)" if self.generator_limits else ""
        return (
            f"{self.target:<10} {self.operation:<70} cases {self.total:>5} ({counts:>13})  "
            f"failed {self.failed_cases:>4}  {statuses}{limits}"
        )


def _substitute(case: schemathesis.Case, pool: Pool, chance: random.Random) -> None:
    """Half of the time, an id of an object that exists for each path parameter, and a served model (or a
    response or conversation that exists) in a model call's body."""
    deleting = case.method.upper() == "DELETE"
    for name in list(case.path_parameters or {}):
        known = [value for value in pool.ids.get(name, ()) if not (deleting and value in pool.protected)]
        if known and chance.random() < 0.5:
            case.path_parameters[name] = chance.choice(known)
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body and chance.random() < 0.5:
        body["model"] = EMBEDDINGS_MODEL if case.operation.path == "/embeddings" else CHAT_MODEL
    for name, parameter in (("previous_response_id", "response_id"), ("conversation", "conversation_id")):
        known = pool.ids.get(parameter)
        if name in body and known and chance.random() < 0.5:
            body[name] = chance.choice(known)


def _failure_text(exc: BaseException) -> list[tuple[str, str]]:
    failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
    found = []
    for failure in failures:
        if isinstance(failure, Failure):
            found.append((failure.title, failure.message))
        else:
            found.append((type(failure).__name__, str(failure)))
    return found


def fuzz_operation(
    target: Target,
    operation: Any,
    *,
    cases: int,
    pool: Pool,
    session: requests.Session,
    log: Callable[[str], None],
    seed_value: int = SEED,
) -> Outcome:
    """The document's examples of one operation, then `cases` generated requests, half valid and half not,
    each checked; what they found."""
    outcome = Outcome(target=target.name, operation=operation.label)
    for case in _example_cases(target, operation, pool):
        _call_and_check(target, case, outcome, kind="examples", pool=pool, session=session)
    for mode, count in ((GenerationMode.POSITIVE, (cases + 1) // 2), (GenerationMode.NEGATIVE, cases // 2)):
        if count > 0:
            _fuzz_mode(
                target, operation, outcome, mode=mode, count=count, pool=pool, session=session, seed_value=seed_value
            )
    log(outcome.line())
    return outcome


def _example_cases(target: Target, operation: Any, pool: Pool) -> list[schemathesis.Case]:
    """A case per request example the document gives (aimed at objects that exist, and at served models)."""
    definition = target.document["paths"][operation.path][operation.method.lower()]
    content = ((definition.get("requestBody") or {}).get("content") or {}).get("application/json") or {}
    names = [parameter["name"] for parameter in definition.get("parameters", ()) if parameter.get("in") == "path"]
    if any(not pool.ids.get(name) for name in names):
        return []
    found = []
    for example in (content.get("examples") or {}).values():
        body = json.loads(json.dumps(example["value"]))
        if "model" in body:
            body["model"] = EMBEDDINGS_MODEL if operation.path == "/embeddings" else CHAT_MODEL
        for name in ("models",):
            if name in body:
                body[name] = [CHAT_MODEL]
        found.append(
            operation.Case(
                body=body, media_type="application/json", path_parameters={name: pool.ids[name][-1] for name in names}
            )
        )
    return found


def _call_and_check(
    target: Target, case: schemathesis.Case, outcome: Outcome, *, kind: str, pool: Pool, session: requests.Session
) -> None:
    headers = target.headers()
    outcome.cases[kind] += 1
    try:
        response = case.call(base_url=target.base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        outcome.failed_cases += 1
        outcome.failures.setdefault(f"No answer: {type(exc).__name__}", f"{exc}\n{case.as_curl_command()}")
        return
    outcome.statuses[response.status_code] += 1
    if 200 <= response.status_code < 300:
        with contextlib.suppress(ValueError):
            pool.harvest(json.loads(response.content))
        if case.method.upper() == "DELETE":
            for name, value in (case.path_parameters or {}).items():
                if name != "project_id":
                    pool.discard(name, value)
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (Failure, FailureGroup) as exc:
        found = _failure_text(exc)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run (a schema it cannot read) is a finding
        found = [(f"Check error: {type(exc).__name__}", str(exc)[:2000])]
    else:
        return
    outcome.failed_cases += 1
    for title, message in found:
        key = f"{title} [{response.status_code}]"
        if key not in outcome.failures:
            curl = case.as_curl_command(headers={"Authorization": "Bearer $KEY"})
            outcome.failures[key] = f"{message}\n{curl}"


def _fuzz_mode(
    target: Target,
    operation: Any,
    outcome: Outcome,
    *,
    mode: GenerationMode,
    count: int,
    pool: Pool,
    session: requests.Session,
    seed_value: int,
) -> None:
    # The choices among existing ids are not Hypothesis's draws: the pool changes as the run goes, and
    # Hypothesis refuses a strategy whose choices change under it (FlakyStrategyDefinition).
    chance = random.Random(f"{seed_value} {operation.label} {mode.value}")  # noqa: S311 - not for security
    done = outcome.cases[mode.value]
    for attempt in range(_GENERATOR_RETRIES + 1):
        left = count - (outcome.cases[mode.value] - done)
        if left <= 0:
            return

        @seed(seed_value + attempt)
        @settings(
            max_examples=left,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            _substitute(case, pool, chance)
            _call_and_check(target, case, outcome, kind=mode.value, pool=pool, session=session)

        try:
            run()
        except Unsatisfiable:
            return  # nothing in this operation's requests can be made invalid (GET /openapi.json takes nothing)
        except InvalidSchema as exc:
            if not str(exc).startswith(_GENERATOR_LIMIT) or attempt == _GENERATOR_RETRIES:
                _generation_failed(outcome, mode, exc)
                return
            # schemathesis could not lay out one drawn array (its own limit, raised while drawing: no request
            # was made); the cases go on from the next seed, and the run says so.
            outcome.generator_limits += 1
        except Exception as exc:  # noqa: BLE001 - a case that cannot even be generated is a finding too
            _generation_failed(outcome, mode, exc)
            return
        else:
            return


# schemathesis 4.32's array layout gives up on some drawn arrays ("Cannot generate an array with 1 demanded
# elements", seen in POST /responses's negative cases); a run resumes from the next seed at most this often.
_GENERATOR_LIMIT = "Cannot generate an array with"
_GENERATOR_RETRIES = 3


def _generation_failed(outcome: Outcome, mode: GenerationMode, exc: Exception) -> None:
    outcome.failed_cases += 1
    outcome.failures.setdefault(f"Generation failed ({mode.value}): {type(exc).__name__}", str(exc)[:2000])


def fuzz(
    targets: list[Target],
    *,
    cases: int,
    pool: Pool,
    log: Callable[[str], None] = print,
    only: Callable[[str], bool] = lambda label: True,
    seed_value: int = SEED,
) -> list[Outcome]:
    outcomes = []
    with requests.Session() as session:
        for target in targets:
            schema = schemathesis.openapi.from_dict(target.document)
            for result in schema.get_all_operations():
                operation = result.ok()
                if only(operation.label):
                    outcomes.append(
                        fuzz_operation(
                            target, operation, cases=cases, pool=pool, session=session, log=log, seed_value=seed_value
                        )
                    )
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    """The failures, each once per operation with an example, for an assertion message or a bench's output."""
    lines = []
    for outcome in outcomes:
        for title, example in outcome.failures.items():
            lines.append(f"{outcome.target} {outcome.operation}: {title}\n    " + example.replace("\n", "\n    "))
    return "\n".join(lines)


# The stack ---------------------------------------------------------------------------------------------------

_SETUP = """
import json, os
from apikeys.services import apikey_create
from completions.services import provider_upsert_openai_compatible
from platform_site.models import Organization
provider_upsert_openai_compatible(name="fake", base_url=os.environ["KEYWAY_UPSTREAM_BASE_URL"],
                                  models=["{embeddings}"], capabilities=["embeddings"])
demo = Organization.objects.get(slug="demo")
def key(name, **options):
    return apikey_create(organization=demo, name="{prefix}" + name, actor_label="fuzz", **options)[1]
print(json.dumps({{
    "model": key("model", rpm_limit=10**7, tpm_limit=10**12, allowed_models=["{chat}", "{embeddings}"]),
    "admin": [key(f"admin-{{index}}", scopes=["admin"]) for index in range({admin_keys})],
    "usage": [key(f"usage-{{index}}", scopes=["usage:read"]) for index in range({usage_keys})],
}}))
"""


@contextlib.contextmanager
def fuzz_stack(var_dir: Path, *, cases: int) -> Iterator[dict[str, Any]]:
    """The fake upstream (chat model `ok`, embeddings model `fake-embed`), Keyway on uvicorn, and the keys
    of the run: one for the model endpoints (every model scope, limits out of reach, and only those two
    models: a request for the embedded ones, which the documents' examples name, is refused rather than
    run on this machine's CPU), admin keys for the management API and keys for the billing API, enough for
    `cases` per operation to stay under those APIs' per-key rate limits. Yields the url, the
    keys and the environment."""
    env, database = server.make_environment(var_dir)
    process = upstream = None
    try:
        upstream, upstream_url = server.start_fake_upstream(var_dir / "upstream.log")
        # Negative cases leave the key out on purpose; the throttle of addresses that keep failing to
        # authenticate would then refuse the run's own address for a minute.
        env.update(
            KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1",
            KEYWAY_UPSTREAM_MODELS=CHAT_MODEL,
            KEYWAY_UPSTREAM_NAME="fake",
            KEYWAY_AUTH_FAILURES_PER_MINUTE="1000000000",
        )
        server.manage(env, "bootstrap")
        code = _SETUP.format(chat=CHAT_MODEL, embeddings=EMBEDDINGS_MODEL, prefix=KEY_PREFIX,
                             usage_keys=usage_keys_for(cases),
                             admin_keys=keys_for(cases, MANAGEMENT_OPERATIONS, MANAGEMENT_REQUESTS_PER_KEY))
        keys = json.loads(server.django_shell(env, code).strip().splitlines()[-1])
        process, url = server.start_keyway(env, var_dir / "server.log", uvicorn=True)
        yield {"url": url, "keys": keys, "env": env, "log": var_dir / "server.log"}
    finally:
        for running in (process, upstream):
            if running is not None:
                server.stop(running)
        server.drop_database(database)


def usage_keys_for(cases: int, operations: int = 5) -> int:
    """Keys enough for the billing API's cases to stay under its rate limit, even all in one minute."""
    return keys_for(cases, operations, BILLING_REQUESTS_PER_KEY)


def keys_for(cases: int, operations: int, per_key: int) -> int:
    """Keys enough for `cases` requests to each of `operations` to stay under `per_key` a minute, even all in
    one minute (the rate limits are per key, and not what is fuzzed)."""
    return max(2, -(-cases * operations // per_key))


def billing_document(env: dict[str, str]) -> dict[str, Any]:
    """The billing API's document (drf-spectacular's, described by billing.schema), made by the stack."""
    document: dict[str, Any] = json.loads(
        server.manage(
            env,
            "spectacular",
            "--urlconf",
            "billing.schema_urls",
            "--custom-settings",
            "billing.schema.SETTINGS",
            "--format",
            "openapi-json",
            "--validate",
            "--fail-on-warn",
        )
    )
    return document


def targets(url: str, keys: dict[str, Any], env: dict[str, str]) -> list[Target]:
    """The three documents, in the order they are fuzzed: /v1's and the management API's as the server
    serves them, the billing API's as drf-spectacular makes it."""
    v1 = requests.get(f"{url}/v1/openapi.json", timeout=30)
    v1.raise_for_status()
    management = requests.get(f"{url}/v1/organization/openapi.json", timeout=30)
    management.raise_for_status()
    return [
        Target("v1", v1.json(), f"{url}/v1", [keys["model"]]),
        Target("billing", billing_document(env), url, keys["usage"]),
        Target("management", management.json(), url, keys["admin"]),
    ]


def seed_pool(url: str, keys: dict[str, Any]) -> Pool:
    """Objects to aim at from the start, made through the APIs: a stored response and a background one,
    a conversation with an item, a project with a spend limit, a project key, an invitation; and what the
    management API lists. They are protected from the DELETE operations."""
    pool = Pool()
    model = {"Authorization": f"Bearer {keys['model']}"}
    admin = {"Authorization": f"Bearer {keys['admin'][0]}"}
    with requests.Session() as session:

        def call(method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
            response = session.request(method, f"{url}{path}", headers=headers, json=body, timeout=30)
            assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text[:500]}"
            pool.harvest(response.json())
            return response.json()

        response = call("POST", "/v1/responses", model, {"model": CHAT_MODEL, "input": "hello"})
        call("POST", "/v1/responses", model, {"model": CHAT_MODEL, "input": "hello", "background": True})
        call("GET", f"/v1/responses/{response['id']}/input_items", model)
        conversation = call(
            "POST", "/v1/conversations", model, {"items": [{"type": "message", "role": "user", "content": "hello"}]}
        )
        call("GET", f"/v1/conversations/{conversation['id']}/items", model)
        organization = "/v1/organization"
        project = call("POST", f"{organization}/projects", admin, {"name": "seed"})
        call(
            "POST",
            f"{organization}/projects/{project['id']}/spend_limit",
            admin,
            {"threshold_amount": 10**6, "currency": "USD", "interval": "month"},
        )
        call("POST", f"{organization}/projects/{project['id']}/api_keys", admin, {"name": "seed"})
        call("POST", f"{organization}/invites", admin, {"email": "seed@example.com", "role": "reader"})
        for listed in call("GET", f"{organization}/projects", admin)["data"]:
            call("GET", f"{organization}/projects/{listed['id']}/api_keys", admin)
            call("GET", f"{organization}/projects/{listed['id']}/rate_limits", admin)
        for path in ("users", "invites", "admin_api_keys"):
            call("GET", f"{organization}/{path}", admin)
    for model_id in (CHAT_MODEL, EMBEDDINGS_MODEL):
        pool.add("model", model_id)
    today = datetime.datetime.now(tz=datetime.UTC).date()
    pool.add("month", today.strftime("%Y-%m"))
    pool.add("month", "2025-01")
    pool.protected = {value for values in pool.ids.values() for value in values}
    return pool
