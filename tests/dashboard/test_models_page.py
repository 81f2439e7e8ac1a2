"""The models page: what each role sees, the prices at the organization's terms, the examples per model and
endpoint, the narrowing by key, and that nothing of another organization (its plan, its pinned model, its keys)
ever shows."""

from __future__ import annotations

import html
import json
import re
import shlex
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apikeys.services import apikey_create
from billing.models import Plan, Price
from billing.services import billing_plan_set
from completions.models import Model
from completions.services import provider_upsert_openai_compatible
from dashboard.snippets import model_examples
from dashboard.views.models import price_per_million
from platform_site.models import Organization, Role
from platform_site.services import membership_set, organization_create
from tests.dashboard.test_pages import _client, _user

pytestmark = pytest.mark.django_db




def _cards(page: str) -> dict[str, str]:
    """Each model card's HTML by model id."""
    cards = re.findall(r'<section class="card model-card".*?</section>', page, flags=re.S)
    return {re.search(r'class="mono">([^<]+)</h2>', card).group(1): card for card in cards}  # type: ignore[union-attr]


@pytest.fixture
def alice() -> User:
    return _user("alice@acme.test")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


@pytest.fixture
def catalog() -> None:
    """Two chat models (one priced, one free), an embeddings model, and two that nobody may call: one disabled
    and one that nothing serves."""
    provider_upsert_openai_compatible(
        name="upstream", base_url="http://127.0.0.1:9/v1", models=["chat-pro"],
        capabilities=["chat", "tools", "vision"], context_length=128_000,
    )
    provider_upsert_openai_compatible(name="upstream", base_url="http://127.0.0.1:9/v1", models=["free-chat"])
    provider_upsert_openai_compatible(
        name="upstream", base_url="http://127.0.0.1:9/v1", models=["embed-small", "switched-off"],
        capabilities=["embeddings", "dimensions"], context_length=8192,
    )
    Model.objects.filter(public_id="switched-off").update(enabled=False)
    Model.objects.create(public_id="unserved", capabilities=["chat"])
    Price.objects.create(
        model="chat-pro", input_per_million_micros=2_500_000, cached_input_per_million_micros=1_250_000,
        output_per_million_micros=10_000_000,
    )
    Price.objects.create(model="embed-small", input_per_million_micros=20_000)


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.MEMBER, Role.READER])
def test_every_role_sees_the_callable_models_with_capabilities_context_and_prices(
    role: str, acme: Organization, catalog: None
) -> None:
    user = _user(f"{role}@acme.test")
    membership_set(organization=acme, user=user, role=role, actor_label="test")
    response = _client(user).get("/models")
    assert response.status_code == 200
    page = response.content.decode()
    cards = _cards(page)
    assert sorted(cards) == ["chat-pro", "embed-small", "free-chat"]
    pro = cards["chat-pro"]
    for text in (">Chat<", ">Responses<", ">Realtime<", ">tools<", ">vision<", "128000 tokens",
                 "<dd>$2.50</dd>", "<dd>$1.25</dd>", "<dd>$10.00</dd>"):
        assert text in pro, text
    embed = cards["embed-small"]
    assert ">Embeddings<" in embed and ">dimensions<" in embed and ">Chat<" not in embed
    assert "<dd>$0.02</dd>" in embed and embed.count("<dd>free</dd>") == 2
    assert cards["free-chat"].count("<dd>free</dd>") == 3
    # Readers may look, but the playground (which spends money) is not offered to them.
    assert ("Try one in the playground" in page) == (role != Role.READER)


def test_each_example_calls_its_models_endpoint_at_this_servers_base_url_and_holds_no_secret(
    alice: User, acme: Organization, catalog: None
) -> None:
    apikey_create(organization=acme, name="backend", created_by=alice)
    cards = _cards(_client(alice).get("/models").content.decode())
    pro, embed = html.unescape(cards["chat-pro"]), html.unescape(cards["embed-small"])
    assert "http://testserver/v1/chat/completions" in pro and "/embeddings" not in pro
    assert "http://testserver/v1/embeddings" in embed and "chat/completions" not in embed
    for card in (pro, embed):
        assert 'base_url="http://testserver/v1"' in card and 'baseURL: "http://testserver/v1"' in card
        assert 'os.environ["KEYWAY_API_KEY"]' in card and "process.env.KEYWAY_API_KEY" in card
        assert "$KEYWAY_API_KEY" in card and "sk-kw-" not in card
        # Every example has a copy button naming the field that holds it.
        for target in re.findall(r'data-copy="([^"]+)"', card):
            assert f'<textarea id="{target}"' in card
        assert len(re.findall(r'data-copy="', card)) == 3
    assert "client.chat.completions.create(" in pro and "client.embeddings.create(" in embed


def test_an_example_is_valid_even_for_a_model_id_with_quotes() -> None:
    examples = model_examples(base_url="http://x/v1", model="it's \"odd\"", endpoint="chat")
    body = shlex.split(examples["curl"].replace("\\\n", " "))[-1]
    assert json.loads(body)["model"] == "it's \"odd\""
    assert 'model="it\'s \\"odd\\"",' in examples["Python"] and 'model: "it\'s \\"odd\\"",' in examples["JavaScript"]


def test_prices_follow_the_organizations_plan_and_another_organization_keeps_list_prices(
    alice: User, acme: Organization, catalog: None
) -> None:
    plan = Plan.objects.create(name="premium", price_multiplier=Decimal("1.2"))
    billing_plan_set(organization=acme, plan=plan, actor_label="test")
    page = _client(alice).get("/models").content.decode()
    pro = _cards(page)["chat-pro"]
    assert "<dd>$3.00</dd>" in pro and "<dd>$1.50</dd>" in pro and "<dd>$12.00</dd>" in pro
    assert "×1.2 the list price" in page
    bob = _user("bob@globex.test")
    organization_create(name="Globex", owner=bob)
    other = _client(bob).get("/models").content.decode()
    assert "<dd>$2.50</dd>" in _cards(other)["chat-pro"] and "list price" not in other


def test_prices_below_a_cent_keep_their_digits() -> None:
    assert price_per_million(Decimal(0)) == "free"
    assert price_per_million(Decimal(150_000)) == "$0.15"
    assert price_per_million(Decimal("187500.0")) == "$0.1875"
    assert price_per_million(Decimal("0.5")) == "$0.0000005"


def test_an_organization_pinned_to_a_model_is_offered_it_alone_for_chat(
    alice: User, acme: Organization, catalog: None
) -> None:
    acme.pinned_model = "free-chat"
    acme.save(update_fields=["pinned_model"])
    page = _client(alice).get("/models").content.decode()
    assert sorted(_cards(page)) == ["embed-small", "free-chat"]
    assert "is answered by <strong" in page and "free-chat" in page


def test_picking_a_key_narrows_the_list_to_its_models_and_scopes(
    alice: User, acme: Organization, catalog: None
) -> None:
    chat_only, _ = apikey_create(organization=acme, name="chat-only", scopes=["chat"], allowed_models=["chat-pro"])
    embedder, _ = apikey_create(organization=acme, name="embedder", scopes=["embeddings", "models:read"])
    client = _client(alice)
    chat_page = client.get("/models", {"key": chat_only.public_id}).content.decode()
    cards = _cards(chat_page)
    # The key may call chat-pro only, and through chat completions only (no responses or realtime scope).
    assert sorted(cards) == ["chat-pro"]
    assert ">Chat<" in cards["chat-pro"] and ">Responses<" not in cards["chat-pro"]
    assert sorted(_cards(client.get("/models", {"key": embedder.public_id}).content.decode())) == ["embed-small"]
    reader_key, _ = apikey_create(organization=acme, name="reads", scopes=["models:read"])
    page = client.get("/models", {"key": reader_key.public_id}).content.decode()
    assert "may call none of the enabled models" in page


def test_no_enabled_model_shows_an_empty_state(alice: User, acme: Organization) -> None:
    page = _client(alice).get("/models").content.decode()
    assert "No model is enabled yet." in page and "model-card" not in page


def test_signed_out_visitors_are_sent_to_sign_in() -> None:
    response = Client().get("/models")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_another_organizations_plan_pin_and_keys_never_show(alice: User, acme: Organization, catalog: None) -> None:
    mallory = _user("mallory@globex.test")
    globex = organization_create(name="Globex", owner=mallory)
    globex.pinned_model = "chat-pro"
    globex.save(update_fields=["pinned_model"])
    billing_plan_set(organization=globex, plan=Plan.objects.create(name="globex-deal", price_multiplier=Decimal(10)),
                     actor_label="test")
    globex_key, _ = apikey_create(organization=globex, name="globex-secret-key", allowed_models=["chat-pro"])
    client = _client(alice)
    page = client.get("/models").content.decode()
    assert sorted(_cards(page)) == ["chat-pro", "embed-small", "free-chat"]
    assert "<dd>$2.50</dd>" in page and "<dd>$25.00</dd>" not in page and "list price" not in page
    for secret in ("globex", "Globex", globex_key.public_id, "is answered by"):
        assert secret not in page, secret
    # Naming the other organization's key is answered like an unknown key: 404, and nothing of it.
    response = client.get("/models", {"key": globex_key.public_id})
    assert response.status_code == 404 and b"globex" not in response.content.lower()
    # And the other way round: Globex sees its own terms and pin.
    theirs = _client(mallory).get("/models").content.decode()
    assert sorted(_cards(theirs)) == ["chat-pro", "embed-small"] and "<dd>$25.00</dd>" in theirs
    assert "×10 the list price" in theirs
