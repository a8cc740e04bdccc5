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
        (["learner.kl_coef=0.1", "learner.strategy=fsdp"], "learner.kl_coef"),
        (["learner.entropy_coef=-1"], "learner.entropy_coef"),
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


def test_a_loss_is_one_record_chosen_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asympo.rl.loss_settings import AsympoLoss, GrpoLoss, TisLoss

    assert load_settings().learner.loss == AsympoLoss()
    assert load_settings(None, ["learner.loss=grpo"]).learner.loss == GrpoLoss()
    both = load_settings(None, ["learner.loss=grpo", "learner.loss.clip_eps=0.1"])
    assert both.learner.loss == GrpoLoss(clip_eps=0.1)
    # A parameter alone belongs to the default loss (the old learner.nll_eps).
    assert load_settings(None, ["learner.loss.nll_eps=0.1"]).learner.loss == AsympoLoss(nll_eps=0.1)
    # The file names the loss, the command line sets one of its parameters.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner:\n  loss: grpo\n")
    s = load_settings(cfg, ["learner.loss.clip_ratio_c=0"])
    assert s.learner.loss == GrpoLoss(clip_ratio_c=0.0)
    monkeypatch.setenv("ASYMPO_LEARNER__LOSS", "tis")
    assert load_settings(cfg).learner.loss == TisLoss()  # env beats file


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["learner.loss=ppo"], "learner.loss"),  # unknown loss, at load time
        (["learner.loss=asympo", "learner.loss.clip_eps=0.1"], "clip_eps"),  # not asympo's
        (["learner.loss=dapo", "learner.loss.aggregation=seq-mean"], "aggregation"),
        (["learner.loss=grpo", "learner.loss.clip_ratio_c=1"], "clip_ratio_c"),
        (["learner.grad_clip=-0.5"], "learner.grad_clip"),
    ],
)
def test_bad_loss_settings_fail_at_load(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(None, overrides)


def test_grad_clip_zero_turns_clipping_off_everywhere() -> None:
    from asympo.rl.training import StepConfig
    from services.learner.learner import step_config

    assert step_config(load_settings(None, ["learner.grad_clip=0"])).grad_clip == 0.0
    with pytest.raises(ValueError, match="grad_clip"):
        StepConfig(grad_clip=-1.0)


def test_dumped_settings_load_back(tmp_path: Path) -> None:
    s = load_settings(None, ["learner.loss=gspo", "learner.loss.clip_eps=0.3"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_settings(s))
    assert load_settings(dumped).learner.loss == s.learner.loss

def test_redis_credentials_go_into_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "password"
    secret.write_text("p/w d\n")  # a trailing newline, as `echo > file` leaves
    monkeypatch.setenv("ASYMPO_REDIS__URL", "redis://redis:6379/0")
    monkeypatch.setenv("ASYMPO_REDIS__USERNAME", "rollout")
    monkeypatch.setenv("ASYMPO_REDIS__PASSWORD_FILE", str(secret))
    settings = load_settings()
    assert settings.redis_url() == "redis://rollout:p%2Fw%20d@redis:6379/0"
    assert "p/w" not in dump_settings(settings)
    # A URL with credentials of its own (a launcher's, for its children) wins.
    own = "redis://learner:x@redis:6379/0"
    assert load_settings(overrides=[f"redis.url={own}"]).redis_url() == own
    # Without a URL the embedded server is used, which has no users.
    assert load_settings(overrides=["redis.url="]).redis_url() == ""


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        (None, [], "cannot read redis.password_file"),
        ("", [], "is empty"),
        ("pw", ["redis.password=other"], "not both"),
    ],
)
def test_redis_password_file_mistakes_fail_at_load(
    tmp_path: Path, content: str | None, extra: list[str], needle: str
) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_settings(overrides=[f"redis.password_file={secret}", *extra])
