//! The builtin model on OpenVINO: bf16 matrix units (AMX, AVX512-BF16)
//! where the CPU has them, f32 elsewhere; 10–25× candle per core on this
//! kind of machine (docs/BUILTIN.md has the figures).
//!
//! The encoder is an ONNX graph generated from the model's own files
//! ([`graph`]), compiled once for the CPU with one stream per inference
//! slot and one thread per stream: on 2 cores two one-thread inferences
//! beat one two-thread inference, and the scheduler keeps every slot fed.

pub mod graph;
pub mod onnx;
pub mod runtime;

use std::path::Path;

use openvino::{
    CompiledModel, Core, DeviceType, ElementType, InferRequest, PropertyKey, RwPropertyKey, Shape,
    Tensor,
};

use super::files::ModelFiles;
use super::tokenize::Encoded;
use crate::engine::{Precision, l2_normalize};

/// A compiled encoder; inference happens on [`OpenVinoSlot`]s made from it.
pub struct OpenVinoEngine {
    compiled: std::sync::Mutex<CompiledModel>,
    /// Kept for as long as the compiled model: the plugin belongs to it.
    _core: std::sync::Mutex<Core>,
    precision: Precision,
    version: String,
    hidden: usize,
    /// The position table's length: no batch is padded past it.
    max_width: usize,
    pad_id: i64,
}

impl std::fmt::Debug for OpenVinoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenVinoEngine")
            .field("precision", &self.precision)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// One inference request: an input and output buffer of its own, used by
/// one thread at a time.
pub struct OpenVinoSlot {
    request: InferRequest,
}

impl OpenVinoEngine {
    /// Loads the runtime `library`, generates the encoder of `files` and
    /// compiles it for the CPU with `streams` inference streams of
    /// `threads_per_stream` threads each, at `precision` (`None` = bf16
    /// where the CPU has it). Blocking, a second or two.
    pub fn load(
        library: &Path,
        files: ModelFiles,
        precision: Option<Precision>,
        streams: usize,
        threads_per_stream: usize,
    ) -> Result<Self, String> {
        runtime::load(library).map_err(|e| {
            format!(
                "cannot load the OpenVINO runtime {}: {e}",
                library.display()
            )
        })?;
        // The crate panics (on its own `expect`s) when the library lacks a
        // symbol it calls: an OpenVINO older than 2025.1 is refused here,
        // not by a crash.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::compile(files, precision, streams, threads_per_stream)
        }))
        .unwrap_or_else(|_| {
            Err(format!(
                "{} is not a usable OpenVINO C API (2025.1 or later is needed)",
                library.display()
            ))
        })
    }

    /// Takes the model files by value so that the weights file is freed as
    /// soon as the graph is serialized: at its peak the load holds the
    /// file, the transposed matrices and the graph, never those and
    /// OpenVINO's own copy as well.
    fn compile(
        files: ModelFiles,
        precision: Option<Precision>,
        streams: usize,
        threads_per_stream: usize,
    ) -> Result<Self, String> {
        let ov = |what: &str| {
            let what = what.to_string();
            move |e: openvino::InferenceError| format!("OpenVINO: {what}: {e}")
        };
        let mut core = Core::new().map_err(|e| format!("OpenVINO: cannot create a core: {e}"))?;
        let version = core
            .versions("CPU")
            .map_err(ov("no CPU plugin"))?
            .into_iter()
            .next()
            .map(|(_, v)| format!("{} {}", v.description, v.build_number))
            .unwrap_or_default();
        let precision = precision.unwrap_or_else(Precision::best_for_this_cpu);
        let streams = streams.max(1);
        let threads = (streams * threads_per_stream.max(1)).to_string();
        let streams = streams.to_string();
        let cpu = DeviceType::CPU;
        // A daemon shares its cores: no pinning of OpenVINO's threads.
        core.set_property(&cpu, &RwPropertyKey::HintEnableCpuPinning, "NO")
            .map_err(ov("ENABLE_CPU_PINNING"))?;
        core.set_property(&cpu, &RwPropertyKey::NumStreams, &streams)
            .map_err(ov("NUM_STREAMS"))?;
        core.set_property(&cpu, &RwPropertyKey::InferenceNumThreads, &threads)
            .map_err(ov("INFERENCE_NUM_THREADS"))?;
        if let Ok(capacity) = std::env::var("OV_CACHE_EXPERIMENT") {
            core.set_property(
                &cpu,
                &RwPropertyKey::Other("CPU_RUNTIME_CACHE_CAPACITY".into()),
                &capacity,
            )
            .map_err(ov("CPU_RUNTIME_CACHE_CAPACITY"))?;
        }
        core.set_property(
            &cpu,
            &RwPropertyKey::HintInferencePrecision,
            precision.as_str(),
        )
        .map_err(ov("INFERENCE_PRECISION_HINT"))?;

        let onnx = graph::encoder_onnx(&files.config, &files.weights).map_err(|e| e.to_string())?;
        let (hidden, max_width, pad_id) = (
            files.config.hidden_size,
            files.config.max_position_embeddings,
            i64::try_from(files.config.pad_token_id).unwrap_or(0),
        );
        drop(files);
        let model = core
            .read_model_from_buffer(&onnx, None)
            .map_err(ov("cannot read the generated encoder"))?;
        drop(onnx);
        let compiled = core
            .compile_model(&model, cpu)
            .map_err(ov("cannot compile the encoder for the CPU"))?;
        drop(model);
        // What the plugin chose, not what was asked: a bf16 request on a
        // CPU without bf16 units must not be reported as bf16.
        let chosen = compiled
            .get_property(&PropertyKey::Rw(RwPropertyKey::HintInferencePrecision))
            .map_err(ov("INFERENCE_PRECISION_HINT of the compiled encoder"))?
            .to_string();
        let actual = Precision::from_openvino_name(&chosen).ok_or_else(|| {
            format!("OpenVINO compiled the encoder at precision `{chosen}`, not bf16 or f32")
        })?;
        if actual != precision {
            return Err(format!(
                "OpenVINO compiled the encoder at {} where {} was asked for",
                actual.as_str(),
                precision.as_str()
            ));
        }
        Ok(Self {
            compiled: std::sync::Mutex::new(compiled),
            _core: std::sync::Mutex::new(core),
            precision: actual,
            version,
            hidden,
            max_width,
            pad_id,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The runtime's description and build, for the log.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A new inference request on the compiled encoder.
    pub fn slot(&self) -> Result<OpenVinoSlot, String> {
        let mut compiled = self
            .compiled
            .lock()
            .map_err(|_| "OpenVINO: the compiled encoder's lock is poisoned".to_string())?;
        let request = compiled
            .create_infer_request()
            .map_err(|e| format!("OpenVINO: cannot create an inference request: {e}"))?;
        Ok(OpenVinoSlot { request })
    }

    /// One unit vector per input of `batch`, padded to `width` tokens
    /// (at least the longest input; a few shapes compile once each, so the
    /// caller rounds widths up).
    pub fn embed(
        &self,
        slot: &mut OpenVinoSlot,
        batch: &[&Encoded],
        width: usize,
    ) -> Result<Vec<Vec<f32>>, String> {
        let rows = batch.len();
        let longest = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        let width = width.min(self.max_width).max(longest);
        if rows == 0 || width == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        let ov = |what: &'static str| {
            move |e: openvino::InferenceError| format!("OpenVINO: {what}: {e}")
        };
        let shape = Shape::new(&[rows as i64, width as i64]).map_err(ov("input shape"))?;
        let mut ids = Tensor::new(ElementType::I64, &shape).map_err(ov("input tensor"))?;
        let mut mask = Tensor::new(ElementType::I64, &shape).map_err(ov("mask tensor"))?;
        {
            let ids = ids.get_data_mut::<i64>().map_err(ov("input buffer"))?;
            let mask = mask.get_data_mut::<i64>().map_err(ov("mask buffer"))?;
            for (row, encoded) in batch.iter().enumerate() {
                let at = row * width;
                for col in 0..width {
                    let token = encoded.ids.get(col);
                    ids[at + col] = token.map_or(self.pad_id, |&t| i64::from(t));
                    mask[at + col] = i64::from(token.is_some());
                }
            }
        }
        let request = &mut slot.request;
        request
            .set_tensor(graph::INPUT_IDS, &ids)
            .map_err(ov("set input_ids"))?;
        request
            .set_tensor(graph::ATTENTION_MASK, &mask)
            .map_err(ov("set attention_mask"))?;
        request.infer().map_err(ov("inference"))?;
        let output = request
            .get_tensor(graph::SENTENCE_EMBEDDING)
            .map_err(ov("output"))?;
        let means = output.get_data::<f32>().map_err(ov("output buffer"))?;
        if means.len() != rows * self.hidden {
            return Err(format!(
                "OpenVINO: {} output values for {rows} inputs of {} dimensions",
                means.len(),
                self.hidden
            ));
        }
        Ok(means
            .chunks_exact(self.hidden)
            .map(|mean| l2_normalize(mean.to_vec()))
            .collect())
    }
}
