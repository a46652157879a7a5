//! The sentence-transformers BERT encoder as an ONNX graph, generated in
//! process from `config.json` and the sha256-pinned `model.safetensors`:
//! no converted model to download, pin or keep in step with the weights.
//!
//! ```text
//! input_ids, attention_mask  (i64, [rows, width])
//!   ──► word + position + token-type-0 embeddings ──► LayerNorm
//!   ──► N × (self-attention ──► add & LayerNorm ──► GELU feed-forward ──► add & LayerNorm)
//!   ──► mean over the attention mask ──► sentence_embedding (f32, [rows, hidden])
//! ```
//!
//! The same arithmetic as candle's `BertModel` and Hugging Face's
//! `BertModel` + sentence-transformers' `Pooling(mean)`; the L2
//! normalisation is left to the caller, in f32. The weights go inline
//! (`raw_data`): OpenVINO and ONNX Runtime both refuse external data
//! reached through a symlink, and an in-memory graph needs no file at all.

use bytes::Bytes;
use candle_transformers::models::bert::{Config, HiddenAct};
use prost::Message;
use safetensors::{Dtype, SafeTensors};

use super::onnx::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto, attribute_type, data_type,
};

/// The graph's input and output names.
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const SENTENCE_EMBEDDING: &str = "sentence_embedding";

/// Opset 17: the first with `LayerNormalization`, which OpenVINO maps to
/// its fused MVN instead of a chain of reductions.
const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

/// What stops a graph from being built, said for the operator.
#[derive(Debug)]
pub struct GraphError(pub String);

impl std::fmt::Display for GraphError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The serialized ONNX model of the encoder whose `config` and
/// safetensors `weights` are given. Untransposed weights are slices of
/// `weights`, not copies, until the graph is serialized.
pub fn encoder_onnx(config: &Config, weights: &Bytes) -> Result<Vec<u8>, GraphError> {
    if !matches!(config.hidden_act, HiddenAct::Gelu) {
        return Err(GraphError(format!(
            "hidden_act {:?}: only `gelu` (erf) BERT models are generated for OpenVINO",
            config.hidden_act
        )));
    }
    if config.num_attention_heads == 0
        || !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
    {
        return Err(GraphError(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size, config.num_attention_heads
        )));
    }
    let tensors = SafeTensors::deserialize(weights)
        .map_err(|e| GraphError(format!("model.safetensors cannot be read: {e}")))?;
    let mut g = Builder::new(&tensors, weights, config);
    g.encoder()?;
    let graph = g.finish();
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "convstore".into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
    };
    Ok(model.encode_to_vec())
}

struct Builder<'a> {
    tensors: &'a SafeTensors<'a>,
    /// The buffer `tensors` was read from: views are sliced out of it.
    buffer: &'a Bytes,
    config: &'a Config,
    /// sentence-transformers saves BertModel's weights with or without the
    /// `bert.` prefix, depending on how the checkpoint was made.
    prefix: &'static str,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next: usize,
}

impl<'a> Builder<'a> {
    fn new(tensors: &'a SafeTensors<'a>, buffer: &'a Bytes, config: &'a Config) -> Self {
        let prefix = if tensors
            .tensor("bert.embeddings.word_embeddings.weight")
            .is_ok()
        {
            "bert."
        } else {
            ""
        };
        Self {
            tensors,
            buffer,
            config,
            prefix,
            nodes: Vec::new(),
            initializers: Vec::new(),
            next: 0,
        }
    }

    fn encoder(&mut self) -> Result<(), GraphError> {
        let hidden = self.config.hidden_size;
        let eps = self.config.layer_norm_eps as f32;

        // Embeddings: words, positions 0..width, and token type 0 (a
        // single-segment input has only that type).
        let words = self.weight("embeddings.word_embeddings.weight", false)?;
        let words = self.op("Gather", &[&words, INPUT_IDS], &[]);
        let shape = self.op("Shape", &[INPUT_IDS], &[]);
        let one = self.const_i64_scalar(1);
        let width = self.op("Gather", &[&shape, &one], &[int("axis", 0)]);
        let zero = self.const_i64_scalar(0);
        let positions = self.op("Range", &[&zero, &width, &one], &[]);
        let position_table = self.weight("embeddings.position_embeddings.weight", false)?;
        let positions = self.op("Gather", &[&position_table, &positions], &[]);
        let token_type = self.weight_row("embeddings.token_type_embeddings.weight", 0, hidden)?;
        let sum = self.op("Add", &[&words, &positions], &[]);
        let sum = self.op("Add", &[&sum, &token_type], &[]);
        let mut x = self.layer_norm(&sum, "embeddings.LayerNorm", eps)?;

        // The mask as f32, and as the additive attention bias
        // (0 for tokens, -10000 for padding, as BERT has it).
        let mask = self.op(
            "Cast",
            &[ATTENTION_MASK],
            &[int("to", data_type::FLOAT.into())],
        );
        let one_f = self.const_f32(&[], &[1.0]);
        let inverted = self.op("Sub", &[&one_f, &mask], &[]);
        let big_negative = self.const_f32(&[], &[-10_000.0]);
        let bias = self.op("Mul", &[&inverted, &big_negative], &[]);
        let axes_1_2 = self.const_i64(&[2], &[1, 2]);
        let bias = self.op("Unsqueeze", &[&bias, &axes_1_2], &[]);

        for layer in 0..self.config.num_hidden_layers {
            x = self.layer(layer, &x, &bias, eps)?;
        }

        // Mean pooling over real tokens (sentence-transformers clamps the
        // count at 1e-9).
        let axis_2 = self.const_i64(&[1], &[2]);
        let mask3 = self.op("Unsqueeze", &[&mask, &axis_2], &[]);
        let masked = self.op("Mul", &[&x, &mask3], &[]);
        let axis_1 = self.const_i64(&[1], &[1]);
        let summed = self.op("ReduceSum", &[&masked, &axis_1], &[int("keepdims", 0)]);
        let counts = self.op("ReduceSum", &[&mask3, &axis_1], &[int("keepdims", 0)]);
        let floor = self.const_f32(&[], &[1e-9]);
        let counts = self.op("Max", &[&counts, &floor], &[]);
        self.nodes
            .push(node("Div", &[&summed, &counts], SENTENCE_EMBEDDING, &[]));
        Ok(())
    }

    fn layer(&mut self, layer: usize, x: &str, bias: &str, eps: f32) -> Result<String, GraphError> {
        let heads = self.config.num_attention_heads as i64;
        let hidden = self.config.hidden_size as i64;
        let head_size = hidden / heads;
        let at = |name: &str| format!("encoder.layer.{layer}.{name}");

        let split = self.const_i64(&[4], &[0, 0, heads, head_size]);
        let q = self.linear(x, &at("attention.self.query"))?;
        let q = self.op("Reshape", &[&q, &split], &[]);
        let q = self.op("Transpose", &[&q], &[ints("perm", &[0, 2, 1, 3])]);
        let k = self.linear(x, &at("attention.self.key"))?;
        let k = self.op("Reshape", &[&k, &split], &[]);
        let k = self.op("Transpose", &[&k], &[ints("perm", &[0, 2, 3, 1])]);
        let v = self.linear(x, &at("attention.self.value"))?;
        let v = self.op("Reshape", &[&v, &split], &[]);
        let v = self.op("Transpose", &[&v], &[ints("perm", &[0, 2, 1, 3])]);

        let scores = self.op("MatMul", &[&q, &k], &[]);
        let scale = self.const_f32(&[], &[1.0 / (head_size as f32).sqrt()]);
        let scores = self.op("Mul", &[&scores, &scale], &[]);
        let scores = self.op("Add", &[&scores, bias], &[]);
        let probs = self.op("Softmax", &[&scores], &[int("axis", -1)]);
        let context = self.op("MatMul", &[&probs, &v], &[]);
        let context = self.op("Transpose", &[&context], &[ints("perm", &[0, 2, 1, 3])]);
        let merge = self.const_i64(&[3], &[0, 0, hidden]);
        let context = self.op("Reshape", &[&context, &merge], &[]);

        let attended = self.linear(&context, &at("attention.output.dense"))?;
        let residual = self.op("Add", &[&attended, x], &[]);
        let x1 = self.layer_norm(&residual, &at("attention.output.LayerNorm"), eps)?;

        let inner = self.linear(&x1, &at("intermediate.dense"))?;
        let inner = self.gelu(&inner);
        let out = self.linear(&inner, &at("output.dense"))?;
        let residual = self.op("Add", &[&out, &x1], &[]);
        self.layer_norm(&residual, &at("output.LayerNorm"), eps)
    }

    /// `x · Wᵀ + b` for a torch `Linear` (weight stored `[out, in]`).
    fn linear(&mut self, x: &str, name: &str) -> Result<String, GraphError> {
        let weight = self.weight(&format!("{name}.weight"), true)?;
        let bias = self.weight(&format!("{name}.bias"), false)?;
        let product = self.op("MatMul", &[x, &weight], &[]);
        Ok(self.op("Add", &[&product, &bias], &[]))
    }

    fn layer_norm(&mut self, x: &str, name: &str, eps: f32) -> Result<String, GraphError> {
        let gamma = self.weight(&format!("{name}.weight"), false)?;
        let beta = self.weight(&format!("{name}.bias"), false)?;
        Ok(self.op(
            "LayerNormalization",
            &[x, &gamma, &beta],
            &[int("axis", -1), float("epsilon", eps)],
        ))
    }

    /// The exact GELU, `x · ½ · (1 + erf(x / √2))`; OpenVINO fuses the
    /// pattern into its Gelu.
    fn gelu(&mut self, x: &str) -> String {
        let sqrt2 = self.const_f32(&[], &[std::f32::consts::SQRT_2]);
        let scaled = self.op("Div", &[x, &sqrt2], &[]);
        let erf = self.op("Erf", &[&scaled], &[]);
        let one = self.const_f32(&[], &[1.0]);
        let shifted = self.op("Add", &[&erf, &one], &[]);
        let half = self.const_f32(&[], &[0.5]);
        let halved = self.op("Mul", &[x, &half], &[]);
        self.op("Mul", &[&halved, &shifted], &[])
    }

    /// The f32 weight `name` as an initializer; `transpose` turns a 2-D
    /// `[out, in]` matrix into `[in, out]`.
    fn weight(&mut self, name: &str, transpose: bool) -> Result<String, GraphError> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .tensors
            .tensor(&full)
            .map_err(|e| GraphError(format!("model.safetensors has no usable `{full}`: {e}")))?;
        if view.dtype() != Dtype::F32 {
            return Err(GraphError(format!(
                "`{full}` is {:?}; only f32 weights are read",
                view.dtype()
            )));
        }
        let shape: Vec<usize> = view.shape().to_vec();
        let data = view.data();
        let (dims, raw) = match (transpose, shape.as_slice()) {
            (true, &[rows, cols]) => (vec![cols, rows], Bytes::from(transposed(data, rows, cols))),
            (true, _) => {
                return Err(GraphError(format!(
                    "`{full}` has shape {shape:?}, a matrix was expected"
                )));
            }
            (false, _) => (shape, self.buffer.slice_ref(data)),
        };
        Ok(self.initializer(data_type::FLOAT, &dims, raw))
    }

    /// Row `row` of the `[rows, width]` f32 matrix `name`, as a `[width]`
    /// initializer.
    fn weight_row(&mut self, name: &str, row: usize, width: usize) -> Result<String, GraphError> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .tensors
            .tensor(&full)
            .map_err(|e| GraphError(format!("model.safetensors has no usable `{full}`: {e}")))?;
        let bytes = width * 4;
        let data = view.data();
        let raw = data
            .get(row * bytes..(row + 1) * bytes)
            .filter(|_| view.dtype() == Dtype::F32 && view.shape().last() == Some(&width))
            .ok_or_else(|| {
                GraphError(format!(
                    "`{full}` is not an f32 matrix {width} wide with row {row}"
                ))
            })?;
        Ok(self.initializer(data_type::FLOAT, &[width], self.buffer.slice_ref(raw)))
    }

    fn const_f32(&mut self, dims: &[usize], values: &[f32]) -> String {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(data_type::FLOAT, dims, raw.into())
    }

    fn const_i64(&mut self, dims: &[usize], values: &[i64]) -> String {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(data_type::INT64, dims, raw.into())
    }

    fn const_i64_scalar(&mut self, value: i64) -> String {
        self.const_i64(&[], &[value])
    }

    fn initializer(&mut self, data_type: i32, dims: &[usize], raw_data: Bytes) -> String {
        let name = self.fresh("w");
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data,
        });
        name
    }

    /// Appends `op_type(inputs)` and returns its output's name.
    fn op(&mut self, op_type: &str, inputs: &[&str], attributes: &[AttributeProto]) -> String {
        let output = self.fresh("t");
        self.nodes.push(node(op_type, inputs, &output, attributes));
        output
    }

    fn fresh(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("{kind}{}", self.next)
    }

    fn finish(self) -> GraphProto {
        let ids = |name: &str| tensor_value(name, data_type::INT64, &["rows", "width"]);
        GraphProto {
            node: self.nodes,
            name: "sentence_encoder".into(),
            initializer: self.initializers,
            input: vec![ids(INPUT_IDS), ids(ATTENTION_MASK)],
            output: vec![tensor_value(
                SENTENCE_EMBEDDING,
                data_type::FLOAT,
                &["rows", "hidden"],
            )],
        }
    }
}

fn node(op_type: &str, inputs: &[&str], output: &str, attributes: &[AttributeProto]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("{op_type}_{output}"),
        op_type: op_type.to_string(),
        attribute: attributes.to_vec(),
    }
}

fn tensor_value(name: &str, elem_type: i32, dims: &[&str]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            dim_param: d.to_string(),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` f32 matrix,
/// as little-endian bytes.
fn transposed(data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * 4;
            let to = (c * rows + r) * 4;
            out[to..to + 4].copy_from_slice(&data[from..from + 4]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transpose_moves_every_element() {
        let m: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = transposed(&m, 2, 3);
        let back: Vec<f32> = t
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(back, vec![1., 4., 2., 5., 3., 6.]);
    }
}
