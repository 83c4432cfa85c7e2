"""The `openai` Python package against `cli serve` (run by tests/serve.rs).

Usage: python3 openai_client.py BASE_URL EXPECTED_JSON
EXPECTED_JSON maps each prompt to the greedy text `cli generate` gives for it.
Checks completions and chat, streamed and not, stop strings, usage and the
errors the client raises; prints "ok" at the end.
"""
import json
import sys

import openai

base, expected = sys.argv[1], json.loads(sys.argv[2])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)

assert [m.id for m in client.models.list().data] == ["demo"]

for prompt, want in expected.items():
    # Completions, whole and streamed.
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == want, (prompt, r.choices[0].text, want)
    assert r.usage.completion_tokens == 20 or r.choices[0].finish_reason == "stop", r.usage
    parts = []
    for chunk in client.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
    assert "".join(parts) == want, (prompt, parts)

    # Chat (the test checkpoint's template is BOS + the messages' text), streamed with usage.
    c = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0
    )
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == want, (prompt, c.choices[0].message.content)
    text, usage = [], None
    for chunk in client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text) == want, (prompt, text)
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # A stop string from the middle of the text ends it just before.
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    if stop.strip():
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
        assert r.choices[0].text == want[: want.index(stop)], (stop, r.choices[0].text)
        assert r.choices[0].finish_reason == "stop"
        parts = []
        for chunk in client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=20,
            temperature=0,
            stop=stop,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        assert "".join(parts) == want[: want.index(stop)], (stop, parts)

# Errors come back as the client's exceptions, with the server's message.
try:
    client.completions.create(model="demo", prompt="a", temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
try:
    client.completions.create(model="nope", prompt="a")
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "nope" in str(e), e
print("ok")
