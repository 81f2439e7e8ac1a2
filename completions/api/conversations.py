"""The Conversations API: `/v1/conversations` and their items, which a response created with `conversation`
reads and adds its input and output to. Stored in the conversations app; every lookup is the caller's
organization's, so another tenant's id is a 404 like an id that never existed."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponseBase

from apikeys.scopes import RESPONSES
from completions.api.http import ApiRequest, api_endpoint, json_body, json_response
from completions.api.items import invalid_type, new_id, parse_item
from completions.api.requests import validate_metadata
from completions.api.responses import conversation_not_found, item_list, list_params
from conversations import selectors, services
from conversations.models import Conversation
from platform_site.kernel.errors import ApiError
from platform_site.kernel.orm import orm

MAX_ITEMS_PER_CALL = 20


def _object(conversation: Conversation) -> dict[str, Any]:
    return {"id": conversation.id, "object": "conversation", "created_at": int(conversation.created_at.timestamp()),
            "metadata": orjson.loads(conversation.metadata_json)}


def _items(raw: Any, *, required: bool) -> list[dict[str, Any]]:
    if raw is None and not required:
        return []
    if raw is None:
        raise ApiError("Missing required parameter: 'items'.", param="items", code="missing_required_parameter")
    if not isinstance(raw, list):
        raise invalid_type("items", "an array", raw)
    if len(raw) > MAX_ITEMS_PER_CALL:
        raise ApiError(f"Invalid 'items': array too long. Expected an array with maximum length "
                       f"{MAX_ITEMS_PER_CALL}, but got an array with length {len(raw)} instead.", param="items",
                       code="array_above_max_length")
    return [parse_item(item, f"items[{index}]", references=False) for index, item in enumerate(raw)]


def _known(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in body:
        if name not in names:
            raise ApiError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def _metadata(raw: Any) -> dict[str, str]:
    validate_metadata(raw)
    return dict(raw or {})


async def _conversation(request: ApiRequest, conversation_id: str) -> Conversation:
    conversation = await orm(selectors.conversation_get, organization_id=request.api_key.organization_id,
                             conversation_id=conversation_id)
    if conversation is None:
        raise conversation_not_found(conversation_id, param="conversation_id")
    return conversation


@api_endpoint(methods=("POST",), scope=RESPONSES)
async def conversations_create(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    _known(body, ("metadata", "items"))
    metadata = _metadata(body.get("metadata"))
    items = _items(body.get("items"), required=False)
    key = request.api_key
    conversation = await orm(services.conversation_create, conversation_id=new_id("conv"),
                             organization_id=key.organization_id, project_id=key.project_id, metadata=metadata,
                             items=items)
    return json_response(_object(conversation))


@api_endpoint(methods=("GET", "POST", "DELETE"), scope=RESPONSES)
async def conversation_detail(request: ApiRequest, conversation_id: str) -> HttpResponseBase:
    conversation = await _conversation(request, conversation_id)
    if request.method == "DELETE":
        await orm(services.conversation_delete, conversation=conversation)
        return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})
    if request.method == "POST":
        body = json_body(request)
        _known(body, ("metadata",))
        if "metadata" not in body:
            raise ApiError("Missing required parameter: 'metadata'.", param="metadata",
                           code="missing_required_parameter")
        conversation = await orm(services.conversation_set_metadata, conversation=conversation,
                                 metadata=_metadata(body["metadata"]))
    return json_response(_object(conversation))


@api_endpoint(methods=("GET", "POST"), scope=RESPONSES)
async def conversation_items(request: ApiRequest, conversation_id: str) -> HttpResponseBase:
    conversation = await _conversation(request, conversation_id)
    if request.method == "POST":
        body = json_body(request)
        _known(body, ("items",))
        items = _items(body.get("items"), required=True)
        await orm(services.conversation_items_add, conversation=conversation, items=items)
        return json_response(item_list(items, has_more=False))
    limit, ascending, after = list_params(request)
    page = await orm(selectors.conversation_items_page, conversation=conversation, limit=limit, ascending=ascending,
                     after=after)
    if page is None:
        raise ApiError(f"Item with id '{(after or '')[:64]}' not found.", status=404, param="after", code="not_found")
    items, has_more = page
    return json_response(item_list(items, has_more=has_more))


@api_endpoint(methods=("GET", "DELETE"), scope=RESPONSES)
async def conversation_item(request: ApiRequest, conversation_id: str, item_id: str) -> HttpResponseBase:
    conversation = await _conversation(request, conversation_id)
    if request.method == "DELETE":
        if not await orm(services.conversation_item_delete, conversation=conversation, item_id=item_id):
            raise _item_not_found(item_id)
        return json_response(_object(conversation))
    item = await orm(selectors.conversation_item_get, conversation=conversation, item_id=item_id)
    if item is None:
        raise _item_not_found(item_id)
    return json_response(item)


def _item_not_found(item_id: str) -> ApiError:
    return ApiError(f"Item with id '{item_id[:64]}' not found.", status=404, param="item_id", code="not_found")
