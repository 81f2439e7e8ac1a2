"""The code a person copies to make a first call: the official SDKs and curl, with base URL, key and model."""

from __future__ import annotations

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
