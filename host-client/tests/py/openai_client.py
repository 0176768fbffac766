"""Drives `veil-client serve` with the real `openai` client: prints one JSON object with what a
streamed chat completion, a plain one, a completion and the model list returned, and how a bad
request was refused. Usage: openai_client.py BASE_URL MESSAGES_JSON SEED TEMPERATURE MAX_TOKENS"""
import json
import sys

import openai

base, messages, seed, temperature, max_tokens = sys.argv[1:6]
messages = json.loads(messages)
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
model = client.models.list().data[0].id
args = dict(model=model, messages=messages, seed=int(seed), temperature=float(temperature),
            max_tokens=int(max_tokens))
streamed, finish = [], None
for chunk in client.chat.completions.create(stream=True, **args):
    choice = chunk.choices[0]
    if choice.delta.content:
        streamed.append(choice.delta.content)
    if choice.finish_reason:
        finish = choice.finish_reason
whole = client.chat.completions.create(**args)
completion = client.completions.create(model=model, prompt="The history of", max_tokens=5,
                                       temperature=0)
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=3)
    refused = None
except openai.BadRequestError as e:
    refused = e.status_code
print(json.dumps({
    "model": model,
    "streamed": "".join(streamed),
    "pieces": len(streamed),
    "finish": finish,
    "whole": whole.choices[0].message.content,
    "usage": whole.usage.completion_tokens,
    "completion": completion.choices[0].text,
    "refused": refused,
}))
