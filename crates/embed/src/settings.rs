//! Settings this crate owns; the daemon's `Settings` composes them
//! (key names are a contract, DESIGN.md) and validates across sections.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use convstore_core::nonzero::{nz_u32, nz_u64, nz_usize};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingSettings {
    pub model: String,
    /// Checked against every backend at start-up; fixes the vector column.
    pub dimensions: NonZeroUsize,
    pub strategy: Strategy,
    /// Most texts sent in one backend request.
    pub max_batch_inputs: NonZeroUsize,
    /// First retry delay after a retryable backend failure; doubles each time.
    pub retry_initial_ms: NonZeroU64,
    /// Ceiling of the retry delay.
    pub retry_max_ms: NonZeroU64,
    pub backends: Vec<BackendSettings>,

    // --- Routing across backends (issue 4; docs/ROUTING.md) ---
    /// Longest a batch waits for vectors (retries and fail-over included)
    /// before its chunks are stored as `pending` for the backfill.
    pub max_wait_ms: NonZeroU64,
    /// Period of the per-backend health check (version, model, dimension).
    pub health_interval_ms: NonZeroU64,
    /// Consecutive failed calls that open a backend's circuit breaker.
    pub breaker_failures: NonZeroU32,
    /// How long an open breaker first refuses calls before one trial call;
    /// doubles after each failed trial.
    pub breaker_open_ms: NonZeroU64,
    /// Ceiling of the open period.
    pub breaker_max_open_ms: NonZeroU64,
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            // Zero set-up: the builtin all-MiniLM-L6-v2 needs no other
            // service (scripts/setup.sh installs it). The systemd config
            // ships Ollama as the production default.
            model: "all-minilm".into(),
            dimensions: const { nz_usize(384) },
            strategy: Strategy::LeastOutstanding,
            max_batch_inputs: const { nz_usize(32) },
            retry_initial_ms: const { nz_u64(100) },
            retry_max_ms: const { nz_u64(5_000) },
            backends: vec![BackendSettings {
                name: "builtin".into(),
                kind: BackendKind::Builtin,
                url: String::new(),
                // A call waits for the local inference threads too: two calls
                // of 32 texts × 256 tokens are ~16k tokens, ~14 s at the
                // ~1,200 tokens/s two cores manage (benches/builtin_embed).
                timeout_ms: const { nz_u64(120_000) },
                ..BackendSettings::default()
            }],
            max_wait_ms: const { nz_u64(60_000) },
            health_interval_ms: const { nz_u64(10_000) },
            breaker_failures: const { nz_u32(5) },
            breaker_open_ms: const { nz_u64(1_000) },
            breaker_max_open_ms: const { nz_u64(30_000) },
        }
    }
}

impl EmbeddingSettings {
    /// The model a backend serves: its own `model`, else `embedding.model`.
    pub fn model_for<'a>(&'a self, backend: &'a BackendSettings) -> &'a str {
        if backend.model.is_empty() {
            &self.model
        } else {
            &backend.model
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    LeastOutstanding,
    RoundRobin,
    Weighted,
    Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendSettings {
    pub name: String,
    pub kind: BackendKind,
    pub url: String,
    /// Empty = `embedding.model`.
    pub model: String,
    pub weight: NonZeroU32,
    pub max_in_flight: NonZeroUsize,
    pub timeout_ms: NonZeroU64,
    /// Name of the environment variable holding the bearer key (openai).
    pub api_key_env: String,
    /// builtin: the sentence-transformers model directory (absolute). Empty
    /// = `state_dir/models/<model>`, then where `scripts/setup.sh` installs
    /// models (`/usr/local/lib/convstore/models/<model>`, then
    /// `~/.local/lib/convstore/models/<model>`); `all-minilm` is installed
    /// as `all-MiniLM-L6-v2`.
    pub model_dir: String,
    /// builtin: the engine the model runs on (docs/BUILTIN.md).
    pub engine: BuiltinEngine,
    /// builtin: the precision it computes in.
    pub precision: BuiltinPrecision,
    /// builtin: the directory of OpenVINO's libraries (absolute). Empty =
    /// `state_dir/openvino`, then where `scripts/setup.sh` installs it
    /// (`/usr/local/lib/convstore/openvino`, then
    /// `~/.local/lib/convstore/openvino`).
    pub openvino_dir: String,
    /// openai: the `encoding_format` asked for; either answer is decoded.
    pub encoding_format: EncodingFormat,
    /// ollama, openai: the most of one answer read into memory; a longer
    /// answer is a failure of this backend (`crate::response`).
    pub max_response_bytes: NonZeroU64,
    /// ollama, openai: the model's `tokenizer.json` (absolute path). Empty
    /// = none: chunks are cut by the estimate, and a chunk the backend
    /// refuses as too long is split (`crate::tokenizer`).
    pub tokenizer: String,
    /// Most tokens (all inputs summed) in one request; 0 = no limit
    /// (`router::pack`).
    pub max_batch_tokens: usize,
    /// Requests per minute this backend may be sent; 0 = no limit
    /// (`router::pace`).
    pub requests_per_minute: u32,
    /// Tokens per minute this backend may be sent; 0 = no limit.
    pub tokens_per_minute: u64,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            name: "local-ollama".into(),
            kind: BackendKind::Ollama,
            url: "http://127.0.0.1:11434".into(),
            model: String::new(),
            weight: NonZeroU32::MIN,
            max_in_flight: const { nz_usize(2) },
            timeout_ms: const { nz_u64(30_000) },
            api_key_env: String::new(),
            model_dir: String::new(),
            engine: BuiltinEngine::Auto,
            precision: BuiltinPrecision::Auto,
            openvino_dir: String::new(),
            encoding_format: EncodingFormat::Base64,
            max_response_bytes: const { nz_u64(crate::response::DEFAULT_MAX_RESPONSE_BYTES) },
            tokenizer: String::new(),
            max_batch_tokens: 0,
            requests_per_minute: 0,
            tokens_per_minute: 0,
        }
    }
}

/// `engine` on a builtin backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinEngine {
    /// OpenVINO when its runtime loads, else candle (the log says why).
    #[default]
    Auto,
    /// OpenVINO, or a start-up error saying why not.
    Openvino,
    /// candle, even where OpenVINO is installed.
    Candle,
}

/// `precision` on a builtin backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinPrecision {
    /// bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16), else f32.
    #[default]
    Auto,
    Bf16,
    F32,
}

/// How an OpenAI-compatible backend sends vectors (issue 4).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// Little-endian f32 bytes in base64: a third of the JSON floats' size.
    Base64,
    /// JSON numbers, for servers that refuse `base64`.
    Float,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Ollama,
    Openai,
    Builtin,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Entries in the in-memory LRU (L1).
    pub max_entries: NonZeroUsize,
    /// L2: the `embedding_cache` table shared by every instance.
    pub shared: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_entries: const { nz_usize(50_000) },
            shared: true,
        }
    }
}
