"""The documentation's API examples are consistent and correct: one base URL and one key
variable in README.md and docs/API.md, every `curl` on a route that exists, and every body
valid for that route (a newcomer copies these first)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from bridge.api.routes import ROUTES, Route
from bridge.directory.service import merge_patch, validate
from bridge.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "API.md"]
EXPORTS = [
    "export CB=http://127.0.0.1:8080",
    "export YOUR_API_KEY=$(callbridge --config /etc/callbridge/callbridge.toml api-key create"
    " --name ops)",
]


def _curls(doc: Path) -> list[str]:
    """Every curl command of the doc's shell blocks, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", doc.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for match in re.finditer(r"^curl .*?(?=^curl |^#|\Z)", text, flags=re.S | re.M):
            commands.append(" ".join(match.group(0).split("\n")).strip())
    return commands


def _parse(command: str) -> tuple[str, str, dict[str, str], str | None]:
    words = shlex.split(command)
    method, url, headers, body = "GET", "", {}, None
    i = 1
    while i < len(words):
        word = words[i]
        if word == "-X":
            method, i = words[i + 1], i + 2
        elif word == "-H":
            name, _, value = words[i + 1].partition(":")
            headers[name.strip().lower()] = value.strip()
            i += 2
        elif word == "-d":
            body, i = words[i + 1], i + 2
        else:
            url, i = word, i + 1
    return method, url, headers, body


def _route(method: str, path: str) -> Route:
    for route in ROUTES:
        pattern = "^" + re.sub(r"\{\w+\}", "[A-Z_]+", re.escape(route.full_path).replace(
            r"\{", "{").replace(r"\}", "}")) + "$"  # fmt: skip
        if route.method == method and re.match(pattern, path):
            return route
    raise AssertionError(f"no route for {method} {path}")


CURLS = [(doc.name, c) for doc in DOCS for c in _curls(doc)]


def test_docs_have_examples() -> None:
    assert {name for name, _ in CURLS} == {"README.md", "API.md"}
    assert len(CURLS) >= 12


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_docs_define_the_same_variables(doc: Path) -> None:
    text = doc.read_text()
    for line in EXPORTS:
        assert line in text, f"{doc.name} lacks: {line}"
    assert "$KEY" not in text and "CB=http://127.0.0.1:8080/api/v1" not in text


@pytest.mark.parametrize(("doc", "command"), CURLS, ids=[f"{d}:{c[:60]}" for d, c in CURLS])
def test_every_curl_uses_an_existing_route_with_a_valid_body(doc: str, command: str) -> None:
    method, url, headers, body = _parse(command)
    assert url.startswith("$CB/api/v1/"), url
    route = _route(method, url.removeprefix("$CB"))
    if not route.public:
        assert headers.get("authorization") == "Bearer $YOUR_API_KEY", command
    if route.request is None:
        assert body is None
        return
    assert headers.get("content-type") == "application/json"
    assert body is not None
    data: Any = json.loads(body)
    if method == "PATCH":
        # A merge patch: valid once merged into a minimal stored object.
        base = {"/assistants": {"name": "a"}, "/numbers": {"number": "+31201234567"},
                "/sip-trunks": {"name": "t", "host": "pbx.example.com"}}  # fmt: skip
        collection = "/" + route.path.split("/")[1]
        model = {r.path: r.request for r in ROUTES if r.method == "POST"}[collection]
        assert model is not None
        data = merge_patch(base[collection], data)
    else:
        model = route.request
    try:
        validate(model, data)
    except InvalidInput as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"{doc}: {command[:80]}…: {exc.message}") from None
