"""Where `docutray-bridge demo` writes its logs: never a traceback on a read-only root."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import demo


def test_demo_dir_falls_back_to_tmpdir_when_the_working_directory_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "cwd"
    blocker.mkdir()
    (blocker / ".stack").write_text("a file where the demo wants a directory")
    monkeypatch.chdir(blocker)
    monkeypatch.delenv("DEMO_DIR", raising=False)
    monkeypatch.setattr(demo, "_tmp_demo_dir", lambda: tmp_path / "tmp" / "docutray-demo")
    assert demo._workdir() == tmp_path / "tmp" / "docutray-demo"
    assert (tmp_path / "tmp" / "docutray-demo").is_dir()


def test_an_unusable_demo_dir_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DEMO_DIR", str(tmp_path / "file" / "demo"))
    with pytest.raises(demo.DemoError, match="cannot create the demo's directory"):
        demo._workdir()
