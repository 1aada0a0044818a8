"""The frozen configuration tree. Validated once at construction; errors name the bad values.

Values learned at run time (number of KV blocks that fit, etc.) live in separate objects, never here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from common.errors import ConfigError

# Literal types give the flags their choices (common/flags.py).
DType = Literal["float32", "bfloat16"]
KVBackend = Literal["tcp", "nixl"]
AttentionBackend = Literal["auto", "reference", "cpu_flash", "cuda"]   # common.attention.registry.BACKENDS
Policy = Literal["fcfs", "edf", "lars"]
Chunking = Literal["fixed", "adaptive"]
Role = Literal["decode", "prefill"]
DTYPES = get_args(DType)
KV_BACKENDS = get_args(KVBackend)
ATTENTION_BACKENDS = get_args(AttentionBackend)
PERF_MODELS = ("saved", "calibrate", "analytic")          # or the path of a profile JSON


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default" (none), "linear" or "llama3"."""
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope scaling type {self.kind!r} (default, linear, llama3)")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Builds from a Hugging Face config.json dict (Llama, Mistral, Qwen2)."""
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"unsupported model_type {arch!r} (llama, mistral, qwen2)")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rs = cfg.get("rope_scaling") or {}
        # transformers 5 folds rope settings into rope_parameters.
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        if not rs and rp.get("rope_type", "default") != "default":
            rs = rp
        kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
        scaling = RopeScaling(
            kind=kind,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` None means: size from `max_kv_tokens`."""
    block_size: int = 16               # tokens per KV block
    num_blocks: int | None = None      # KV blocks per KVP group (none: from max_kv_tokens)
    max_kv_tokens: int = 65536         # KV capacity per KVP group, tokens
    prefix_caching: bool = True        # reuse the KV of cached full-block prompt prefixes (exact)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"cache: block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"cache: num_blocks must be positive, got {self.num_blocks}")
        if self.max_kv_tokens <= 0:
            raise ConfigError(f"cache: max_kv_tokens must be positive, got {self.max_kv_tokens}")

    def total_blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return -(-self.max_kv_tokens // self.block_size)


@dataclass(frozen=True)
class ParallelConfig:
    """Grid of tp × spp × kvp workers. `kvp_tokens` (M) is how many tokens one KVP group holds."""
    tp: int = field(default=1, metadata={"help": "tensor-parallel ranks (split heads and MLP columns)",
                                         "metavar": "T"})
    spp: int = field(default=1, metadata={"help": "sequence-pipeline stages (split layers; chunks of one "
                                                  "prompt overlap)", "metavar": "S"})
    kvp: int = field(default=1, metadata={"help": "KV-cache-parallel groups (split the context by token "
                                                  "ranges)", "metavar": "K"})
    kvp_tokens: int | None = field(default=None, metadata={"help": "tokens each KVP group holds (needed "
                                                                   "when --kvp > 1)", "metavar": "M"})

    def __post_init__(self) -> None:
        for name in ("tp", "spp", "kvp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel: {name} must be >= 1, got {getattr(self, name)}")
        if self.kvp > 1 and (self.kvp_tokens is None or self.kvp_tokens <= 0):
            raise ConfigError(f"parallel: kvp={self.kvp} needs kvp_tokens > 0, got {self.kvp_tokens}")

    @property
    def world_size(self) -> int:
        return self.tp * self.spp * self.kvp


SCHED_POLICIES = get_args(Policy)
SCHED_CHUNKINGS = get_args(Chunking)
SCHED_ROLES = get_args(Role)
CHUNK_MULTIPLE = 32                    # adaptive chunks are multiples of this (paper: 32)


@dataclass(frozen=True)
class SchedulerConfig:
    """What one engine iteration may hold, and how prefills are ordered and cut into chunks.

    policy    fcfs | edf | lars: the order in which prefills get the iteration (common/scheduler/policy.py).
    chunking  fixed: `chunk_size` tokens per chunk; adaptive: the largest chunk (a multiple of 32 in
              [min_chunk, max_chunk]) whose predicted batch time fits the iteration budget. Adaptive
              chunking and LARS need a performance model (the engine loads or builds one).
    Iteration budget (`iteration_budget()`): `iteration_budget_s` when set, else by `role`:
      decode   `tbt_headroom` x `tbt_slo_s`: decodes share every iteration with the prefill chunks, so
               an iteration may last no longer than the time between tokens they are promised (a
               running request's own tighter TBT SLO lowers it for the iterations it decodes in); the
               headroom absorbs the chunker's +10% acceptance and the performance model's error.
      prefill  `preempt_interval_s` / pipeline depth: no decodes to protect; a newly arrived request
               waits at most for the iterations in flight (~preempt_interval_s) before it can take the
               server (preemption granularity), and equal-time chunks keep pipeline stages balanced.
    LARS: a prefill that has processed >= `long_threshold` tokens is long (at most one per batch) and
    fills only t * (1 - clip(rho, 0, rho_max)) of the budget. With `slack_stealing` a request that
    would miss its deadline in rho order moves ahead of requests that keep theirs, and a prefill
    already under way runs before requests with at least as much work left whenever that costs no
    deadline (policy.py).
    """
    chunk_size: int = 512              # fixed prefill chunk (tokens) when adaptive chunking is off
    max_batch_tokens: int = 8192       # tokens in one forward pass
    max_num_seqs: int = 64             # requests in one forward pass
    policy: Policy = "fcfs"            # order in which prefills get an iteration (lars: least slack per unit of
                                       # work first)
    chunking: Chunking = "fixed"       # fixed: --chunk-size tokens; adaptive: the largest chunk whose predicted
                                       # time fits the budget
    role: Role = "decode"              # which rule picks the iteration budget (decode: TBT SLO; prefill:
                                       # preemption interval)
    tbt_slo_s: float = 0.2             # default TBT SLO (mean gap between tokens); decode role: budget =
                                       # tbt_headroom x it
    tbt_headroom: float = 0.8          # decode role: share of the TBT SLO one iteration may take
    preempt_interval_s: float = 0.2    # prefill role: budget = this / pipeline depth
    iteration_budget_s: float | None = None   # explicit budget, overrides the role's rule
    min_chunk: int = 32                # adaptive chunking: smallest chunk (tokens, a multiple of 32)
    max_chunk: int = 8192              # adaptive chunking: largest chunk (tokens, a multiple of 32)
    long_threshold: int = 256 * 1024   # LARS: prompt tokens processed before a prefill counts as long
    rho_max: float = 0.4               # LARS: cap of the budget share a long prefill yields
    slack_stealing: bool = True        # LARS: a request that would miss its deadline moves ahead of ones with
                                       # slack, and a prefill under way runs before later ones with more work
                                       # left where no deadline is lost

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"scheduler: chunk_size must be positive, got {self.chunk_size}")
        if self.max_batch_tokens <= 0 or self.max_num_seqs <= 0:
            raise ConfigError("scheduler: max_batch_tokens and max_num_seqs must be positive")
        for name, allowed in (("policy", SCHED_POLICIES), ("chunking", SCHED_CHUNKINGS),
                              ("role", SCHED_ROLES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"scheduler: unknown {name} {getattr(self, name)!r}; "
                                  f"choose one of {', '.join(allowed)}")
        for name in ("tbt_slo_s", "preempt_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"scheduler: {name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.tbt_headroom <= 1.0:
            raise ConfigError(f"scheduler: tbt_headroom must be in (0, 1], got {self.tbt_headroom}")
        if self.iteration_budget_s is not None and not self.iteration_budget_s > 0:
            raise ConfigError(f"scheduler: iteration_budget_s must be positive (or unset), "
                              f"got {self.iteration_budget_s}")
        if self.min_chunk <= 0 or self.min_chunk % CHUNK_MULTIPLE or self.max_chunk % CHUNK_MULTIPLE:
            raise ConfigError(f"scheduler: min_chunk={self.min_chunk} and max_chunk={self.max_chunk} "
                              f"must be positive multiples of {CHUNK_MULTIPLE}")
        if self.max_chunk < self.min_chunk:
            raise ConfigError(f"scheduler: max_chunk={self.max_chunk} < min_chunk={self.min_chunk}")
        if self.long_threshold <= 0:
            raise ConfigError(f"scheduler: long_threshold must be positive, got {self.long_threshold}")
        if not 0.0 <= self.rho_max < 1.0:
            raise ConfigError(f"scheduler: rho_max must be in [0, 1), got {self.rho_max}")

    def iteration_budget(self, pipeline_depth: int = 1) -> float:
        """Seconds one iteration may take (the adaptive chunker's target), by the rule above."""
        if pipeline_depth < 1:
            raise ConfigError(f"scheduler: pipeline_depth must be >= 1, got {pipeline_depth}")
        if self.iteration_budget_s is not None:
            return self.iteration_budget_s
        if self.role == "prefill":
            return self.preempt_interval_s / pipeline_depth
        return self.tbt_headroom * self.tbt_slo_s

    def tbt_budget(self, tbt_slo_s: float) -> float:
        """The iteration budget a decode with this TBT SLO allows (decode role)."""
        return self.tbt_headroom * tbt_slo_s


@dataclass(frozen=True)
class EngineConfig:
    """The engine: model, numerics, KV cache, scheduler, parallel layout and KV transfer.

    perf_model: where the scheduler's performance model comes from (adaptive chunking, LARS):
      "saved"     the calibrated profile saved for this hardware/model/dtype/layout, else the
                  analytic roofline;
      "calibrate" the saved profile, else calibrate now through the engine and save it (the pools);
      "analytic"  the analytic roofline only;
      any other value: the path of a profile JSON, refused (ConfigError) when its key does not
      match the engine.
    """
    model: str | None = None           # Hugging Face directory or .gguf file (none: the built-in
                                       # SmolLM2-135M-Instruct)
    dtype: DType = "float32"           # weights, activations and KV cache type
    device: str = "cpu"                # torch device
    attention_backend: AttentionBackend = "auto"   # attention kernels
    max_model_len: int | None = None   # longest sequence (prompt + output); none: the model's max_position
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_backend: KVBackend = "tcp"      # KV transfer to/from other instances
    kv_host: str = "127.0.0.1"         # address this instance's KV receivers listen on
    cuda_graphs: bool = True           # CUDA: replay decode-only steps from captured graphs
    weight_cache: bool = field(default=False, metadata={
        "help": "CPU: save each model shard once as it serves (loaded, cast, packed) under the cache "
                "directory ($MNEMOSYNE_CACHE or ~/.cache/mnemosyne, packed/) and map it from there: a "
                "rebuilt or restarted engine and the grid's other ranks of the same shard start without "
                "loading and share its pages (the pools' default)"})
    perf_model: str = field(default="saved", metadata={
        "metavar": "saved|calibrate|analytic|FILE",
        "help": "performance model of the scheduler: saved (the saved profile, else the analytic "
                "roofline), calibrate (the saved profile, else calibrate now and save it), analytic, "
                "or the path of a profile JSON"})

    def __post_init__(self) -> None:
        if not self.perf_model:
            raise ConfigError(f"perf_model must be one of {', '.join(PERF_MODELS)} or a profile path, "
                              f"got {self.perf_model!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention_backend {self.attention_backend!r}; choose one of "
                              f"{', '.join(ATTENTION_BACKENDS)}")
        if self.kv_backend not in ("tcp", "nixl"):
            raise ConfigError(f"unknown kv_backend {self.kv_backend!r}; choose tcp or nixl")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class SLOConfig:
    """The default service-level objectives of a request (the router's; a request may set its own).

    TTFT per prompt class (common.metrics.PromptClasses: short, medium, long, xlong), in seconds from
    arrival. A request's default TTFT deadline is max(its class SLO, slo_factor x the predicted
    prefill time alone), so an idle deployment admits every prompt that fits max_model_len. The TBT
    SLO's home is the pools' SchedulerConfig.tbt_slo_s. `objective` is the fraction of requests
    that must meet them (the error budget is 1 - objective).
    """
    ttft_short_s: float = 2.0          # default TTFT SLO of short prompts
    ttft_medium_s: float = 20.0        # default TTFT SLO of medium prompts
    ttft_long_s: float = 120.0         # default TTFT SLO of long prompts
    ttft_xlong_s: float = 600.0        # default TTFT SLO of extra-long prompts
    objective: float = field(default=0.99, metadata={
        "flag": "slo-objective", "help": "fraction of requests that must meet their SLOs"})
    slo_factor: float = 3.0            # default TTFT deadline >= this x the predicted prefill time alone

    def __post_init__(self) -> None:
        for name, s in self.ttft_s:
            if not s > 0:
                raise ConfigError(f"slo: ttft_{name}_s must be positive, got {s}")
        if not 0.0 < self.objective < 1.0:
            raise ConfigError(f"slo: objective must be in (0, 1), got {self.objective}")
        if not self.slo_factor >= 1.0:
            raise ConfigError(f"slo: slo_factor must be >= 1, got {self.slo_factor}")

    @property
    def ttft_s(self) -> tuple[tuple[str, float], ...]:
        """((prompt class, TTFT SLO seconds), ...) in class order."""
        return (("short", self.ttft_short_s), ("medium", self.ttft_medium_s),
                ("long", self.ttft_long_s), ("xlong", self.ttft_xlong_s))

    def ttft_for(self, prompt_class: str) -> float:
        try:
            return dict(self.ttft_s)[prompt_class]
        except KeyError:
            raise ConfigError(f"slo: no TTFT SLO for prompt class {prompt_class!r}") from None


def engine_config_to_dict(cfg: EngineConfig) -> dict[str, Any]:
    """JSON-safe form of an EngineConfig (sent by a grid driver to remote workers)."""
    return dataclasses.asdict(cfg)


def engine_config_from_dict(d: dict[str, Any]) -> EngineConfig:
    d = dict(d)
    return EngineConfig(cache=CacheConfig(**d.pop("cache")), scheduler=SchedulerConfig(**d.pop("scheduler")),
                        parallel=ParallelConfig(**d.pop("parallel")), **d)


@dataclass(frozen=True)
class ObservabilityConfig:
    """How a service reports on itself beyond /metrics (every service's config holds one).

    `log_format`: text for people (`make up`'s default), json for log pipelines (one object per line:
    ts, level, logger, msg, service and the record's extra fields; common/logs.py). `otlp_endpoint`:
    where OpenTelemetry spans go over OTLP/gRPC (common/tracing.py); empty = the standard
    OTEL_EXPORTER_OTLP_ENDPOINT variable, and with neither, tracing is off (a no-op tracer).
    """
    log_format: Literal["text", "json"] = "text"   # log lines: text (people) or json (one object per line)
    otlp_endpoint: str = field(default="", metadata={"metavar": "URL"})   # OTLP/gRPC endpoint for traces,
                                                                          # e.g. http://collector:4317 (empty =
                                                                          # $OTEL_EXPORTER_OTLP_ENDPOINT, else none)

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"observability: log_format must be text or json, got {self.log_format!r}")
