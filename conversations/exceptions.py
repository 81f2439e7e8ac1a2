from __future__ import annotations

from platform_site.kernel.errors import ApiError


class ConversationFull(ApiError):
    code = "conversation_full"


class DuplicateItemId(ApiError):
    code = "duplicate_item_id"
