//! The BERT encoder (candle, CPU, f32) and sentence-transformers' pooling:
//! the mean of the token vectors over the attention mask, then L2
//! normalisation, as `Pooling(mean)` + `Normalize` do for
//! all-MiniLM-L6-v2.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::BertModel;

use super::files::ModelFiles;
use super::tokenize::Encoded;
use convstore_embed::EmbedError;

/// A loaded model; immutable, shared by every inference thread.
pub struct SentenceModel {
    bert: BertModel,
    device: Device,
    pad_id: u32,
}

impl SentenceModel {
    /// Builds the encoder from the weights in `files`. The weights are
    /// copied into tensors, so `files.weights` can be dropped afterwards.
    pub fn load(files: &ModelFiles) -> Result<Self, EmbedError> {
        let device = Device::Cpu;
        let broken = |e: candle_core::Error| {
            EmbedError::ModelUnavailable(format!(
                "builtin model: cannot load {}: {e}",
                files.dir.join("model.safetensors").display()
            ))
        };
        let tensors =
            candle_core::safetensors::load_buffer(&files.weights, &device).map_err(broken)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let bert = BertModel::load(vb, &files.config).map_err(broken)?;
        Ok(Self {
            bert,
            device,
            pad_id: u32::try_from(files.config.pad_token_id).unwrap_or(0),
        })
    }

    /// One unit vector per input. The batch is padded to its longest input;
    /// padding is masked out of attention and out of the mean.
    pub fn embed(&self, batch: &[&Encoded]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = batch.len();
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        if rows == 0 || width == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        let mut ids = Vec::with_capacity(rows * width);
        let mut type_ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for encoded in batch {
            let pad = width - encoded.len();
            ids.extend_from_slice(&encoded.ids);
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            type_ids.extend_from_slice(&encoded.type_ids);
            type_ids.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1u32, encoded.len()));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
        let type_ids = Tensor::from_vec(type_ids, (rows, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;

        let hidden = self.bert.forward(&ids, &type_ids, Some(&mask))?; // (rows, width, dims)
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (rows, width, 1)
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // (rows, dims)
        // sentence-transformers clamps the count at 1e-9 and the norm at
        // 1e-12 (torch's F.normalize); with ≥ 2 real tokens neither bites.
        let counts = weights.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (rows, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}
