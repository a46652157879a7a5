//! Which engine runs the builtin model, at which precision.
//!
//! | engine | when | precision |
//! |---|---|---|
//! | OpenVINO | its runtime is installed (`scripts/setup.sh` on x86_64) | bf16 on AMX / AVX512-BF16, else f32 |
//! | candle | always built in: the fallback | f32 |
//!
//! Both compute the same vectors (cosine ≥ 0.999 to sentence-transformers'
//! for every engine × precision, `tests/builtin.rs`), so a daemon can move
//! from one to the other without re-embedding anything.

use std::path::Path;

use super::files::ModelFiles;
use super::model::SentenceModel;
use super::openvino::{OpenVinoEngine, OpenVinoSlot};
use super::tokenize::Encoded;

pub use convstore_embed::settings::{
    BuiltinEngine as EngineChoice, BuiltinPrecision as PrecisionChoice,
};

/// The precision an engine computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    F32,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }

    pub(crate) fn openvino_name(self) -> &'static str {
        self.as_str()
    }

    pub(crate) fn from_openvino_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "bf16" => Some(Self::Bf16),
            "f32" => Some(Self::F32),
            _ => None,
        }
    }

    /// bf16 where the CPU has AMX-BF16 or AVX512-BF16 (Linux's
    /// `/proc/cpuinfo` flags), else f32: elsewhere bf16 is emulated and
    /// slower than f32.
    pub fn best_for_this_cpu() -> Self {
        if cpu_has_bf16() {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// Whether this CPU computes bf16 natively (AMX or AVX512-BF16).
pub fn cpu_has_bf16() -> bool {
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|flags| {
            flags
                .split_whitespace()
                .any(|f| f == "amx_bf16" || f == "avx512_bf16")
        })
}

/// How to load the engine.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub engine: EngineChoice,
    pub precision: PrecisionChoice,
    /// Where OpenVINO's libraries are; empty = the default places
    /// ([`super::openvino::runtime::default_runtime_dirs`]).
    pub openvino_dir: String,
    /// OpenVINO: threads one inference uses (0 = 1). On 2 cores two
    /// one-thread inferences at once beat one two-thread inference
    /// (docs/BUILTIN.md); `benches/builtin_embed.rs` measures both.
    pub threads_per_inference: usize,
}

/// A loaded engine, shared by every inference thread.
pub enum Engine {
    Candle(SentenceModel),
    OpenVino(OpenVinoEngine),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.name(), self.precision().as_str())
    }
}

/// What an inference thread holds between batches: OpenVINO's request
/// buffers; nothing for candle.
pub enum Slot {
    Candle,
    OpenVino(OpenVinoSlot),
}

impl Engine {
    /// Loads the engine `options` ask for, with `slots` inferences able to
    /// run at once. With `engine = "auto"`, a failure to load OpenVINO is
    /// the returned note and candle is loaded instead.
    pub fn load(
        files: &ModelFiles,
        options: &EngineOptions,
        state_dir: &Path,
        slots: usize,
    ) -> Result<(Self, Option<String>), String> {
        let openvino = || -> Result<Self, String> {
            let library = super::openvino::runtime::locate(&options.openvino_dir, state_dir)?;
            let precision = match options.precision {
                PrecisionChoice::Auto => None,
                PrecisionChoice::Bf16 => Some(Precision::Bf16),
                PrecisionChoice::F32 => Some(Precision::F32),
            };
            OpenVinoEngine::load(
                &library,
                files,
                precision,
                slots,
                options.threads_per_inference.max(1),
            )
            .map(Self::OpenVino)
        };
        let candle = || -> Result<Self, String> {
            if options.precision == PrecisionChoice::Bf16 {
                return Err(
                    "engine candle computes in f32 only; set precision = \"auto\" or \"f32\""
                        .into(),
                );
            }
            SentenceModel::load(files)
                .map(Self::Candle)
                .map_err(|e| e.to_string())
        };
        match options.engine {
            EngineChoice::Openvino => openvino().map(|e| (e, None)),
            EngineChoice::Candle => candle().map(|e| (e, None)),
            EngineChoice::Auto => match openvino() {
                Ok(engine) => Ok((engine, None)),
                Err(why) => candle().map(|e| (e, Some(why))),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Candle(_) => "candle",
            Self::OpenVino(_) => "openvino",
        }
    }

    pub fn precision(&self) -> Precision {
        match self {
            Self::Candle(_) => Precision::F32,
            Self::OpenVino(engine) => engine.precision(),
        }
    }

    /// The token width a batch is padded to: its longest input. OpenVINO
    /// prepares kernels per input shape, but measured here a width seen
    /// for the first time costs ~5 % more than a repeat, less than the
    /// padding that rounding widths up would add to short texts.
    pub fn padded_width(&self, longest: usize) -> usize {
        longest
    }

    /// A new slot for one inference thread.
    pub fn slot(&self) -> Result<Slot, String> {
        match self {
            Self::Candle(_) => Ok(Slot::Candle),
            Self::OpenVino(engine) => engine.slot().map(Slot::OpenVino),
        }
    }

    /// One unit vector per input of `batch`.
    pub fn embed(&self, slot: &mut Slot, batch: &[&Encoded]) -> Result<Vec<Vec<f32>>, String> {
        let longest = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        match (self, slot) {
            (Self::Candle(model), _) => model.embed(batch).map_err(|e| e.to_string()),
            (Self::OpenVino(engine), Slot::OpenVino(slot)) => {
                engine.embed(slot, batch, self.padded_width(longest))
            }
            (Self::OpenVino(_), Slot::Candle) => {
                Err("an OpenVINO inference was given a candle slot".into())
            }
        }
    }
}

/// `v / ‖v‖` (sentence-transformers' `Normalize`, its norm clamped at
/// 1e-12 as torch's `F.normalize` does).
pub fn l2_normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in &mut v {
        *x /= norm;
    }
    v
}
