"""The code a person copies to make a first call: the official SDKs and curl, with base URL, key and model."""

from __future__ import annotations

import json

PYTHON = '''from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="{key}")
reply = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Say hello in three words."}}],
    max_tokens=24,
)
print(reply.choices[0].message.content)'''

NODE = '''import OpenAI from "openai";

const client = new OpenAI({{ baseURL: "{base_url}", apiKey: "{key}" }});
const reply = await client.chat.completions.create({{
  model: "{model}",
  messages: [{{ role: "user", content: "Say hello in three words." }}],
  max_tokens: 24,
}});
console.log(reply.choices[0].message.content);'''

CURL = '''curl {base_url}/chat/completions \\
  -H "Authorization: Bearer {key}" \\
  -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "max_tokens": 24, "messages": [{{"role": "user", "content": "Say hello"}}]}}\''''


def first_call(*, base_url: str, key: str, model: str | None) -> dict[str, str]:
    values = {"base_url": base_url, "key": key, "model": model or "your-model"}
    return {"Python": PYTHON.format(**values), "Node.js": NODE.format(**values), "curl": CURL.format(**values)}


# The models page's examples, one per model and endpoint. The key is read from the environment, so a copied
# example never carries a secret and works as it is once KEYWAY_API_KEY is set.
_CHAT_EXAMPLES = {
    "curl": '''curl {base_url}/chat/completions \\
  -H "Authorization: Bearer $KEYWAY_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{"model": {model_shell}, "max_tokens": 24, "messages": [{{"role": "user", "content": "Say hello"}}]}}\'''',
    "Python": '''import os

from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key=os.environ["KEYWAY_API_KEY"])
reply = client.chat.completions.create(
    model={model},
    messages=[{{"role": "user", "content": "Say hello in three words."}}],
    max_tokens=24,
)
print(reply.choices[0].message.content)''',
    "JavaScript": '''import OpenAI from "openai";

const client = new OpenAI({{ baseURL: "{base_url}", apiKey: process.env.KEYWAY_API_KEY }});
const reply = await client.chat.completions.create({{
  model: {model},
  messages: [{{ role: "user", content: "Say hello in three words." }}],
  max_tokens: 24,
}});
console.log(reply.choices[0].message.content);''',
}

_EMBEDDINGS_EXAMPLES = {
    "curl": '''curl {base_url}/embeddings \\
  -H "Authorization: Bearer $KEYWAY_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{"model": {model_shell}, "input": "The food was delicious."}}\'''',
    "Python": '''import os

from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key=os.environ["KEYWAY_API_KEY"])
result = client.embeddings.create(model={model}, input="The food was delicious.")
print(len(result.data[0].embedding))''',
    "JavaScript": '''import OpenAI from "openai";

const client = new OpenAI({{ baseURL: "{base_url}", apiKey: process.env.KEYWAY_API_KEY }});
const result = await client.embeddings.create({{ model: {model}, input: "The food was delicious." }});
console.log(result.data[0].embedding.length);''',
}

EXAMPLE_ENDPOINTS = {"chat": _CHAT_EXAMPLES, "embeddings": _EMBEDDINGS_EXAMPLES}


def model_examples(*, base_url: str, model: str, endpoint: str) -> dict[str, str]:
    """curl, Python and JavaScript calling `model` at `endpoint` (chat or embeddings). The model id is written
    as a JSON string, which Python and JavaScript read alike; in curl's single-quoted body a quote is closed,
    escaped and reopened, so any id the catalog holds makes a snippet that runs."""
    quoted = json.dumps(model)
    values = {"base_url": base_url, "model": quoted, "model_shell": quoted.replace("'", "'\\''")}
    return {language: example.format(**values) for language, example in EXAMPLE_ENDPOINTS[endpoint].items()}
