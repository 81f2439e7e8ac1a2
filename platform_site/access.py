"""Who is acting in an organization, and what their role lets them do.

Every state change of the dashboard and of the management API is made on behalf of an `Actor`: a member
signed in to the dashboard, or an admin API key (which acts with the admin role and no user). The services
check the actor's rights themselves, so the dashboard and the API cannot disagree about who may do what.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib.auth.models import User

from platform_site.exceptions import NotPermitted
from platform_site.models import Organization, Role

# Roles that manage the organization: members, invitations, projects, limits, admin keys, every API key.
MANAGERS = frozenset({Role.OWNER, Role.ADMIN})
# Roles that may create API keys (members manage only the keys they created).
KEY_MAKERS = frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER})


@dataclass(frozen=True)
class Actor:
    organization: Organization
    role: str
    user: User | None = None
    # Who acts when no user does: the masked admin key, or "cli", "bootstrap", "system".
    via: str = ""
    # The public id of the admin API key that acts, else "".
    api_key_public_id: str = ""
    ip_address: str | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user.email or self.user.get_username()
        return self.via or "system"

    @property
    def is_manager(self) -> bool:
        return self.role in MANAGERS

    def require_manager(self, what: str) -> None:
        if not self.is_manager:
            raise NotPermitted(f"Only owners and admins can {what}; your role is {self.role}.")

    def require_owner(self, what: str) -> None:
        if self.role != Role.OWNER:
            raise NotPermitted(f"Only owners can {what}; your role is {self.role}.")

    def require_key_maker(self) -> None:
        if self.role not in KEY_MAKERS:
            raise NotPermitted(f"Readers cannot create or change API keys; your role is {self.role}.")

    def may_manage_key_of(self, created_by_id: int | None) -> bool:
        """Owners and admins manage every key; members the keys they created; readers none."""
        if self.is_manager:
            return True
        return self.role == Role.MEMBER and self.user is not None and created_by_id == self.user.pk


def system_actor(organization: Organization, label: str = "system") -> Actor:
    """The actor of the shell and of set-up code: acts as an owner, with no user."""
    return Actor(organization=organization, role=Role.OWNER, via=label)
