"""The shape of the package: files a reader can take in at once (import rules: `lint-imports`)."""

from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "bitplan"
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"
