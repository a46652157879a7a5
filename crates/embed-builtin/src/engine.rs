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

/// The widths OpenVINO batches are padded to: each at most 1.5× the one
/// before and at most 32 tokens more, so little is padded (long chunks of
/// ~210 tokens pad to 224) and few shapes exist.
pub const WIDTH_BUCKETS: [usize; 18] = [
    8, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
];

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
    /// the returned note and candle is loaded instead (reading the model
    /// files again: OpenVINO's load frees them early to keep the peak low).
    pub fn load(
        files: ModelFiles,
        options: &EngineOptions,
        state_dir: &Path,
        slots: usize,
    ) -> Result<(Self, Option<String>), String> {
        let openvino = |files: ModelFiles| -> Result<Self, String> {
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
        let candle = |files: &ModelFiles| -> Result<Self, String> {
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
            EngineChoice::Openvino => openvino(files).map(|e| (e, None)),
            EngineChoice::Candle => candle(&files).map(|e| (e, None)),
            EngineChoice::Auto => {
                let dir = files.dir.clone();
                match openvino(files) {
                    Ok(engine) => Ok((engine, None)),
                    Err(why) => {
                        let files = ModelFiles::read(&dir).map_err(|e| e.to_string())?;
                        candle(&files).map(|e| (e, Some(why)))
                    }
                }
            }
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

    /// The token width a batch is padded to. candle: its longest input.
    /// OpenVINO keeps what it prepares for every input shape it has seen
    /// (~1 MiB each, measured): with any width and any row count, a day of
    /// traffic would hold thousands. Widths are rounded up to one of
    /// [`WIDTH_BUCKETS`] and rows to a power
    /// of two ([`Engine::batch_rows`]): under a hundred shapes in all.
    pub fn padded_width(&self, longest: usize) -> usize {
        match self {
            Self::Candle(_) => longest,
            Self::OpenVino(_) => bucketed_width(longest),
        }
    }

    /// How many of `available` inputs one batch takes: all for candle, the
    /// largest power of two for OpenVINO (see [`Engine::padded_width`]).
    pub fn batch_rows(&self, available: usize) -> usize {
        match self {
            Self::Candle(_) => available,
            Self::OpenVino(_) => bucketed_rows(available),
        }
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

/// The first of [`WIDTH_BUCKETS`] that holds `longest` (past the last,
/// `longest` itself).
pub fn bucketed_width(longest: usize) -> usize {
    WIDTH_BUCKETS
        .iter()
        .copied()
        .find(|&w| w >= longest)
        .unwrap_or(longest)
}

/// The largest power of two not above `available` (0 for 0).
pub fn bucketed_rows(available: usize) -> usize {
    if available == 0 {
        0
    } else {
        1 << available.ilog2()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_rows_fall_in_few_buckets() {
        let mut widths = std::collections::BTreeSet::new();
        for longest in 1..=256 {
            let width = bucketed_width(longest);
            assert!(width >= longest, "{longest} padded to {width}");
            assert!(
                width * 2 <= longest * 3 || width == 8,
                "{longest} padded to {width}"
            );
            assert!(width - longest < 32, "{longest} padded to {width}");
            widths.insert(width);
        }
        assert_eq!(widths.len(), WIDTH_BUCKETS.len());
        assert_eq!(bucketed_width(300), 300, "past the buckets: as it is");
        let rows: Vec<usize> = [0, 1, 2, 3, 5, 8, 100, 256].map(bucketed_rows).to_vec();
        assert_eq!(rows, vec![0, 1, 2, 2, 4, 8, 64, 256]);
    }
}
