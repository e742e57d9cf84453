from pathlib import Path

from shared.settings_doc import settings_rows

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_documents_every_setting_with_its_current_default() -> None:
    for env, default, _ in settings_rows():
        row = next((line for line in README.splitlines() if line.startswith(f"| `{env}` |")), None)
        assert row is not None, f"README's settings table misses {env} (python -m shared.settings_doc)"
        assert f"| {default} |" in row, f"README shows a stale default for {env}"


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README and "make test" in README
