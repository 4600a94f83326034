"""The README's Python examples run as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2


# SDKs that requirements/test.txt installs on some Pythons only: a block using one runs there.
NEEDS = {"pydantic_ai": (3, 11), "genai_prices": (3, 11), "google": (3, 11)}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(
    index: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module, since in NEEDS.items():
        used = re.search(rf"^\s*(from|import) {module}\b", BLOCKS[index], re.M)
        if used and sys.version_info[:2] < since:
            pytest.skip(f"it imports {module}, installed on Python {since[0]}.{since[1]} and later")
    if "REDIS_URL" in BLOCKS[index]:  # the Redis examples run against the test server
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("redis_url"))
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})
