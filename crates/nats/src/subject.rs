//! One subject per conversation: `<prefix>.<first 16 bytes of sha256(key), hex>`.
//!
//! A conversation's changes share a subject, so the stream can say which
//! of them are still waiting (the oldest by subject) without reading the
//! others; the key is hashed because a client id may hold any character,
//! and a subject may not (dots, spaces, wildcards).

use sha2::{Digest, Sha256};

/// The subject `key`'s changes are published on.
pub fn subject_for(prefix: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let head = digest.get(..16).unwrap_or(&digest[..]);
    format!("{prefix}.{}", hex::encode(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_key_gives_one_valid_token_and_keys_do_not_collide() {
        let a = subject_for("convstore.conversations", "a.b *>");
        let b = subject_for("convstore.conversations", "a.b *> ");
        assert_ne!(a, b);
        let token = a.strip_prefix("convstore.conversations.").unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, subject_for("convstore.conversations", "a.b *>"));
    }
}
