"""`manage.py openapi_subset`: vendor the part of OpenAI's OpenAPI document that Keyway serves on /v1.

GET /v1/openapi.json is built from OpenAI's own schemas (completions/api/openapi.py), but an installed server
has no copy of OpenAI's 3 MB document. This command copies from it the operations Keyway serves
(`completions.api.openapi.SERVED`) and every component they reference, directly or not, into the committed
`completions/api/openai_openapi_subset.json`. Run it again when that document or SERVED changes; `--check`
says whether the committed file is current (a test runs it where the document is present).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from completions.api.openapi import SERVED, SUBSET_PATH

DEFAULT_SOURCE = Path(settings.BASE_DIR).parent / "shared" / "openai-openapi.yaml"
_COMPONENT_REF = "#/components/"
# The reference site's code samples and navigation: not part of any schema, and most of the bytes.
_DROPPED_KEYS = frozenset({"x-oaiMeta"})


def load_yaml(text: str) -> Any:
    """The document as JSON values. YAML would turn an unquoted date (in examples) into a date object;
    here every scalar that is not a number, boolean or null stays a string, as JSON has it."""
    try:
        import yaml
    except ImportError:
        raise CommandError("PyYAML is needed to read the document: pip install pyyaml (in the test extra).") from None
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class JsonLoader(base):  # type: ignore[misc,valid-type]
        pass

    JsonLoader.yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    return yaml.load(text, Loader=JsonLoader)  # noqa: S506 - a safe loader, less the timestamp rule


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _strip(value) for key, value in node.items() if key not in _DROPPED_KEYS}
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


def _references(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            ref = current.get("$ref")
            if isinstance(ref, str) and ref.startswith(_COMPONENT_REF):
                found.add(ref)
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return found


def _component(document: dict[str, Any], ref: str) -> tuple[str, str]:
    section, _, name = ref.removeprefix(_COMPONENT_REF).partition("/")
    if "/" in name or name not in document.get("components", {}).get(section, {}):
        raise CommandError(f"The document has no component {ref}.")
    return section, name


def openai_subset(document: dict[str, Any], *, sha256: str, source_name: str) -> dict[str, Any]:
    """The served operations of `document` and the components they reach, in the document's own order."""
    paths: dict[str, Any] = {}
    for path, methods in SERVED.items():
        item = document["paths"].get(path)
        if item is None:
            raise CommandError(f"The document has no path {path}.")
        missing = [method for method in methods if method not in item]
        if missing:
            raise CommandError(f"The document has no {', '.join(missing)} on {path}.")
        # Path-level fields (shared parameters, a summary) come along; other methods do not.
        paths[path] = {
            key: _strip(value)
            for key, value in item.items()
            if key in methods or key not in ("get", "put", "post", "delete", "options", "head", "patch", "trace")
        }
    wanted: set[tuple[str, str]] = set()
    pending = sorted(_references(paths))
    while pending:
        key = _component(document, pending.pop())
        if key in wanted:
            continue
        wanted.add(key)
        pending.extend(_references(document["components"][key[0]][key[1]]))
    components = {
        section: {name: _strip(value) for name, value in entries.items() if (section, name) in wanted}
        for section, entries in document["components"].items()
    }
    tags = {
        tag
        for item in paths.values()
        for operation in item.values()
        if isinstance(operation, dict)
        for tag in operation.get("tags", ())
    }
    info = document.get("info", {})
    return {
        "x-source": {
            "document": f"OpenAI's OpenAPI document ({info.get('title')} {info.get('version')}), "
            "https://github.com/openai/openai-openapi",
            "license": f"{info.get('license', {}).get('name', 'MIT')}, as the document's info.license states",
            "file": source_name,
            "sha256": sha256,
            "contents": "The operations Keyway serves on /v1 (completions.api.openapi.SERVED) and every component "
            "they reference; x-oaiMeta (the reference site's code samples) left out. Generated by "
            "`manage.py openapi_subset`: do not edit by hand.",
        },
        "openapi": document["openapi"],
        "info": info,
        "tags": [tag for tag in document.get("tags", []) if tag.get("name") in tags],
        "paths": paths,
        "components": {section: entries for section, entries in components.items() if entries},
    }


def render(subset: dict[str, Any]) -> str:
    return json.dumps(subset, indent=1, ensure_ascii=False) + "\n"


def subset_text(source: Path) -> str:
    raw = source.read_bytes()
    document = load_yaml(raw.decode("utf-8"))
    return render(openai_subset(document, sha256=hashlib.sha256(raw).hexdigest(), source_name=source.name))


class Command(BaseCommand):
    help = "Copy the operations Keyway serves, and the components they use, from OpenAI's OpenAPI document."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="OpenAI's openapi.yaml.")
        parser.add_argument("--output", type=Path, default=SUBSET_PATH)
        parser.add_argument("--check", action="store_true", help="Only say whether the output file is current.")

    def handle(self, *args: Any, **options: Any) -> None:
        source: Path = options["source"]
        output: Path = options["output"]
        if not source.exists():
            raise CommandError(f"{source} does not exist.")
        text = subset_text(source)
        current = output.read_text(encoding="utf-8") if output.exists() else None
        if options["check"]:
            if current != text:
                raise CommandError(f"{output} is not what {source} gives: run `manage.py openapi_subset`.")
            self.stdout.write(f"{output} is current.")
            return
        if current == text:
            self.stdout.write(f"{output} is already current.")
            return
        output.write_text(text, encoding="utf-8")
        self.stdout.write(f"Wrote {output} ({len(text.encode()):,} bytes, {len(text.splitlines()):,} lines).")
