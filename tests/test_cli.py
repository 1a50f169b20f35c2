"""The command line: which database it uses when none is configured."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from litellm_credits.cli import _embedded_note, main
from litellm_credits.settings import Settings


@pytest.fixture
def no_database_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDITS_DATABASE_URL", "CREDITS_DATA_DIR", "CREDITS_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def checkout(root: Path, *, data: bool = True) -> Path:
    """A directory like this repository after `make serve`: litellm_config.yaml and .credits-data/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "litellm_config.yaml").write_text("model_list: []\n")
    if data:
        (root / ".credits-data").mkdir()
    return root


@pytest.mark.usefixtures("no_database_settings")
def test_cli_in_the_checkout_uses_the_database_make_serve_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: run from the repository without CREDITS_DATA_DIR, the CLI started a second
    embedded database in the user data directory and answered "no credit account" for the
    accounts `make serve` had made (the Makefile sets CREDITS_DATA_DIR=$(CURDIR)/.credits-data)."""
    root = checkout(tmp_path / "repo")
    (root / "litellm_credits").mkdir()
    monkeypatch.chdir(root / "litellm_credits")  # anywhere below the checkout
    assert Settings.load().data_dir == root / ".credits-data"
    assert main(["stop-db"]) == 0
    assert capsys.readouterr().out.strip() == f"no embedded PostgreSQL running under {root / '.credits-data'}"


@pytest.mark.usefixtures("no_database_settings")
def test_elsewhere_the_user_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkout(tmp_path / "never-served", data=False))
    assert Settings.load().data_dir == platformdirs.user_data_path("litellm-credits")
    stray = tmp_path / "no-config"
    (stray / ".credits-data").mkdir(parents=True)
    monkeypatch.chdir(stray)
    assert Settings.load().data_dir == platformdirs.user_data_path("litellm-credits")


@pytest.mark.usefixtures("no_database_settings")
def test_credits_data_dir_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkout(tmp_path / "repo"))
    monkeypatch.setenv("CREDITS_DATA_DIR", str(tmp_path / "elsewhere"))
    assert Settings.load().data_dir == tmp_path / "elsewhere"


def test_every_command_says_which_embedded_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _embedded_note(Settings.load(database_url=None, data_dir=tmp_path / "data"))
    assert f"embedded PostgreSQL under {tmp_path / 'data'}" in capsys.readouterr().err
    _embedded_note(Settings.load(database_url="postgresql://db.example/credits", data_dir=tmp_path))
    assert capsys.readouterr().err == ""
