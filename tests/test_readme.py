"""Keep the README honest: its engine map names every engine file, and its commands exist."""

import re
from pathlib import Path

import adapters

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_engine_map_lists_every_engine_file_and_only_real_ones():
    mapped = set(re.findall(r"^\| `((?:surgery|adapters)/[\w/]+\.py)` \|", README, flags=re.M))
    engine = {p.relative_to(ROOT).as_posix() for p in (ROOT / "surgery").rglob("*.py")} - {"surgery/__init__.py"}
    assert engine <= mapped, f"engine files missing from the README map: {sorted(engine - mapped)}"
    assert all((ROOT / p).is_file() for p in mapped), "the README map names a file that does not exist"


def test_every_registered_variant_is_in_the_readme_tables():
    for name in adapters.REGISTRY:
        assert f"| `{name}(" in README, f"{name} is missing from the variants table"
        assert re.search(rf"^\| {name} \|", README, flags=re.M), f"{name} has no measured row"


def test_the_two_commands_and_the_newcomer_reading_budget():
    assert "./dev demo" in README and "./dev test" in README
    dev = (ROOT / "dev").read_text()
    assert "demo)" in dev and "test)" in dev
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci, ".ci/run must run the README's test command"
    # a newcomer adding a variant reads the contract, the template and the test table
    lines = sum(len((ROOT / p).read_text().splitlines()) for p in ("surgery/variant.py", "adapters/lora.py", "tests/cases.py"))
    assert lines < 500, f"the files a newcomer reads to add a variant have grown to {lines} lines"
