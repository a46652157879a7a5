//! The one check of a backend's vectors, where they enter the process.
//!
//! Every [`crate::Embedder`] that produces vectors (the Ollama and
//! OpenAI-compatible clients as they decode an answer, the builtin model as
//! it pools) passes them through [`check_vectors`] before returning them.
//! Nothing above a backend checks them again: the router, the caches and
//! the pipeline take a returned vector as usable.
//!
//! A vector that fails is the backend's fault, never the input's, so the
//! error is [`EmbedError::Protocol`] (or [`EmbedError::DimensionMismatch`]),
//! never [`EmbedError::Rejected`] (which would store the chunk as failed
//! for an input that did nothing wrong): that backend's circuit breaker
//! counts it, the router sends the texts to another backend and retries
//! until `embedding.max_wait_ms`, and if no backend answers well the chunks
//! are stored `pending` for the backfill.

use crate::EmbedError;

/// Checks the vectors a backend returned for `inputs` texts: one per
/// input, all of one non-zero length, that length `dimensions` when given,
/// every component finite, and a length (norm) cosine can divide by.
///
/// `dimensions` is `None` only while probing: a probe measures the
/// dimension, and the health check then refuses a backend whose dimension
/// is not `embedding.dimensions` (so a wrong model is reported as such,
/// not as a failing backend).
pub fn check_vectors(
    backend: &str,
    inputs: usize,
    dimensions: Option<usize>,
    vectors: &[Vec<f32>],
) -> Result<(), EmbedError> {
    if vectors.len() != inputs {
        return Err(EmbedError::Protocol(format!(
            "backend `{backend}` returned {} vectors for {inputs} inputs",
            vectors.len()
        )));
    }
    let Some(first) = vectors.first() else {
        return Ok(());
    };
    let length = first.len();
    if length == 0 {
        return Err(EmbedError::Protocol(format!(
            "backend `{backend}` returned an empty vector"
        )));
    }
    if let Some((i, v)) = vectors.iter().enumerate().find(|(_, v)| v.len() != length) {
        return Err(EmbedError::Protocol(format!(
            "backend `{backend}` returned vectors of different lengths ({length} and {} at input {i})",
            v.len()
        )));
    }
    if let Some(expected) = dimensions
        && length != expected
    {
        return Err(EmbedError::DimensionMismatch {
            expected,
            got: length,
        });
    }
    for (i, v) in vectors.iter().enumerate() {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(EmbedError::Protocol(format!(
                "backend `{backend}` returned a vector with NaN or infinite values (input {i})"
            )));
        }
        // Summed in f32, as pgvector sums it for `<=>`: a vector whose
        // squared length is 0 there (all zeros, or components so small
        // their squares vanish) or overflows has a NaN cosine distance to
        // everything, so it could never be found, and being stored as
        // embedded it would never be embedded again either.
        let squared_length: f32 = v.iter().map(|x| x * x).sum();
        if squared_length == 0.0 {
            return Err(EmbedError::Protocol(format!(
                "backend `{backend}` returned a zero vector (input {i}): its cosine distance to anything is undefined"
            )));
        }
        if !squared_length.is_finite() {
            return Err(EmbedError::Protocol(format!(
                "backend `{backend}` returned a vector too long to compare (input {i}): its squared length overflows f32"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(vectors: &[Vec<f32>], inputs: usize, dimensions: Option<usize>) -> String {
        match check_vectors("b", inputs, dimensions, vectors) {
            Ok(()) => "ok".into(),
            Err(EmbedError::Protocol(m)) => format!("protocol: {m}"),
            Err(EmbedError::DimensionMismatch { expected, got }) => {
                format!("dimension: {expected} {got}")
            }
            Err(other) => format!("other: {other}"),
        }
    }

    #[test]
    fn usable_vectors_pass() {
        assert_eq!(check(&[vec![1.0, 0.0], vec![0.6, -0.8]], 2, Some(2)), "ok");
        assert_eq!(check(&[vec![3.0, 4.0, 0.0]], 1, None), "ok");
        assert_eq!(check(&[], 0, Some(2)), "ok");
        // Not unit length is fine: cosine does not care, and some servers
        // (TEI with normalize=false, legacy endpoints) do not normalise.
        assert_eq!(check(&[vec![1e-3, 0.0]], 1, Some(2)), "ok");
    }

    #[test]
    fn count_and_lengths() {
        assert!(check(&[vec![1.0, 0.0]], 2, Some(2)).starts_with("protocol: "));
        assert!(check(&[vec![], vec![]], 2, None).contains("empty vector"));
        assert!(check(&[vec![1.0, 0.0], vec![1.0]], 2, None).contains("different lengths"));
        assert_eq!(check(&[vec![1.0]], 1, Some(2)), "dimension: 2 1");
    }

    #[test]
    fn zero_vectors_are_a_backend_error() {
        let zero = vec![0.0f32; 768];
        let result = check(&[vec![1.0; 768], zero.clone()], 2, Some(768));
        assert!(result.starts_with("protocol: "), "{result}");
        assert!(result.contains("zero vector (input 1)"), "{result}");
        assert!(check(&[vec![-0.0, 0.0]], 1, None).contains("zero vector"));
        // Squares below f32's smallest subnormal vanish: zero for pgvector.
        assert!(check(&[vec![1e-30, 1e-30]], 1, None).contains("zero vector"));
        assert!(check(&[vec![3e19, 3e19]], 1, None).contains("overflows"));
    }

    #[test]
    fn non_finite_vectors_are_a_backend_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let result = check(&[vec![0.6, 0.8], vec![0.6, bad]], 2, Some(2));
            assert!(result.starts_with("protocol: "), "{bad}: {result}");
            assert!(
                result.contains("NaN or infinite values (input 1)"),
                "{result}"
            );
        }
    }
}
