//! Task prefixes: what some embedding models want written before a text,
//! depending on whether the text is a search query or a stored document.
//!
//! Retrieval models trained with asymmetric prompts (nomic-embed-text,
//! mxbai-embed-large, e5, …) rank noticeably worse when queries and
//! documents are embedded the same way: nomic's model card asks for
//! `search_query: ` in front of a question and `search_document: ` in front
//! of a passage. Models trained symmetrically (all-MiniLM, the builtin
//! default) take no prefix. This table is the one place that knows which is
//! which; both sides must agree, so the pipeline calls [`document`] on every
//! chunk it sends to a backend and search calls [`query`] on the query.
//!
//! The prefix is added only on the way to the model. The stored chunk
//! `content`, its `content_hash` and the cache keys are the text without
//! the prefix: the prefix is a function of the model, and the model is part
//! of every cache key.

use std::borrow::Cow;

/// The prefixes of one model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixes {
    /// Before a search query.
    pub query: &'static str,
    /// Before a stored document (a chunk).
    pub document: &'static str,
}

const NONE: Prefixes = Prefixes {
    query: "",
    document: "",
};

/// The instruction BERT-style retrieval models from mixedbread, BAAI and
/// Snowflake were trained with on the query side only.
const REPRESENT_FOR_RETRIEVAL: &str = "Represent this sentence for searching relevant passages: ";

/// Model families by the start of their base name (lower case, without an
/// Ollama tag such as `:latest` and without a Hugging Face owner such as
/// `nomic-ai/`). First match wins.
const TABLE: &[(&str, Prefixes)] = &[
    (
        "nomic-embed-text",
        Prefixes {
            query: "search_query: ",
            document: "search_document: ",
        },
    ),
    (
        "mxbai-embed-large",
        Prefixes {
            query: REPRESENT_FOR_RETRIEVAL,
            document: "",
        },
    ),
    (
        "snowflake-arctic-embed",
        Prefixes {
            query: REPRESENT_FOR_RETRIEVAL,
            document: "",
        },
    ),
    (
        "bge-large-en",
        Prefixes {
            query: REPRESENT_FOR_RETRIEVAL,
            document: "",
        },
    ),
    (
        "bge-base-en",
        Prefixes {
            query: REPRESENT_FOR_RETRIEVAL,
            document: "",
        },
    ),
    (
        "bge-small-en",
        Prefixes {
            query: REPRESENT_FOR_RETRIEVAL,
            document: "",
        },
    ),
    (
        "multilingual-e5",
        Prefixes {
            query: "query: ",
            document: "passage: ",
        },
    ),
    (
        "e5-",
        Prefixes {
            query: "query: ",
            document: "passage: ",
        },
    ),
    // Symmetric models, listed so that the table documents them.
    ("all-minilm", NONE),
    ("all-mpnet", NONE),
    ("bge-m3", NONE),
];

/// The base name a model is matched on: `nomic-ai/nomic-embed-text-v1.5`
/// and `nomic-embed-text:latest` are both `nomic-embed-text…`.
fn base_name(model: &str) -> String {
    let without_owner = model.rsplit('/').next().unwrap_or(model);
    let without_tag = without_owner.split(':').next().unwrap_or(without_owner);
    without_tag.trim().to_ascii_lowercase()
}

/// The prefixes `model` wants; none for a model the table does not know.
pub fn prefixes(model: &str) -> Prefixes {
    let base = base_name(model);
    TABLE
        .iter()
        .find(|(family, _)| base.starts_with(family))
        .map_or(NONE, |(_, p)| *p)
}

/// `text` as the model should see it when it is a search query.
pub fn query<'a>(model: &str, text: &'a str) -> Cow<'a, str> {
    with_prefix(prefixes(model).query, text)
}

/// `text` as the model should see it when it is a stored document (a
/// chunk). The pipeline calls this for every text it sends to a backend.
pub fn document<'a>(model: &str, text: &'a str) -> Cow<'a, str> {
    with_prefix(prefixes(model).document, text)
}

fn with_prefix<'a>(prefix: &str, text: &'a str) -> Cow<'a, str> {
    if prefix.is_empty() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(format!("{prefix}{text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomic_gets_both_prefixes_whatever_the_tag_or_owner() {
        for model in [
            "nomic-embed-text",
            "nomic-embed-text:latest",
            "nomic-embed-text:v1.5",
            "nomic-ai/nomic-embed-text-v1.5",
            "Nomic-Embed-Text",
        ] {
            assert_eq!(
                query(model, "flights to Seattle"),
                "search_query: flights to Seattle",
                "{model}"
            );
            assert_eq!(
                document(model, "user: hi"),
                "search_document: user: hi",
                "{model}"
            );
        }
    }

    #[test]
    fn symmetric_and_unknown_models_get_the_text_unchanged() {
        for model in ["all-minilm", "all-minilm:l6-v2", "some-new-model", ""] {
            assert!(matches!(query(model, "x"), Cow::Borrowed("x")), "{model}");
            assert!(
                matches!(document(model, "x"), Cow::Borrowed("x")),
                "{model}"
            );
        }
    }

    #[test]
    fn query_only_models_leave_documents_alone() {
        let q = query("mxbai-embed-large", "what did I book");
        assert!(q.starts_with("Represent this sentence"), "{q}");
        assert_eq!(document("mxbai-embed-large", "a chunk"), "a chunk");
        assert_eq!(query("multilingual-e5-large", "x"), "query: x");
        assert_eq!(document("e5-large-v2", "x"), "passage: x");
    }
}
