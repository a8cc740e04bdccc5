"""Configuration precedence and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from asympo.config import ConfigError, dump_settings, load_settings


def test_defaults_file_env_cli_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner:\n  lr: 0.01\n  groups_per_step: 3\ntask:\n  name: gsm8k\n")
    monkeypatch.setenv("ASYMPO_LEARNER__LR", "0.02")
    s = load_settings(cfg, ["task.name=jsonl"])
    assert s.learner.lr == 0.02  # env beats file
    assert s.learner.groups_per_step == 3  # file beats default
    assert s.task.name == "jsonl"  # CLI beats file
    assert s.learner.max_staleness == 2  # default


def test_list_override_and_string_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(None, ['sampling.stop=["#", "\\n"]', "streams.run_id=123"])
    assert s.sampling.stop == ["#", "\n"]
    assert s.streams.run_id == "123"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["learner.lr=-1"], "learner.lr"),
        (["learner.nope=1"], "learner.nope"),
        (["lr"], "section.key=value"),
        (["streams.run_id=a b"], "streams.run_id"),
        (["weights.transport=nccl"], "weights.transport"),
    ],
)
def test_bad_values_give_readable_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(None, overrides)


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_dump_masks_secrets() -> None:
    s = load_settings(None, ["weights.publish_token=hunter2"])
    assert s.weights.publish_token.get_secret_value() == "hunter2"
    assert "hunter2" not in dump_settings(s)


def test_configuration_reference_is_current() -> None:
    from pathlib import Path

    from asympo.config_doc import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "run: python -m asympo.config_doc > docs/configuration.md"
