//! The on-disk record format and the scanner that reads it back.
//!
//! A segment file is a 16-byte header followed by records:
//!
//! ```text
//! header:  "CONVSTORE-JRNL" 0x00 0x01                 (16 bytes)
//! record:  magic  FF C5 4A 01                          (4 bytes)
//!          len    payload length, u32 little-endian    (4 bytes)
//!          crc    crc32c(len bytes ++ payload), u32 LE (4 bytes)
//!          payload                                     (len bytes)
//! ```
//!
//! Why each part is there:
//! - the length prefix lets a reader step from record to record;
//! - the checksum covers the length too, so a torn or flipped length is
//!   caught like a torn payload;
//! - the magic starts with 0xFF, a byte that never occurs in UTF-8, so it
//!   cannot appear inside a JSON payload: after damage the scanner looks for
//!   the next magic and tries the record there ("resynchronises"), so one bad
//!   record never hides the good ones after it.
//!
//! [`scan`] never fails: it returns the records it could verify and a
//! description of every damaged byte range.

/// First bytes of every segment file; the last two are the format version.
pub const SEGMENT_HEADER: [u8; 16] = *b"CONVSTORE-JRNL\x00\x01";
/// Marks the start of a record. 0xFF is not valid UTF-8 anywhere.
pub const RECORD_MAGIC: [u8; 4] = [0xFF, 0xC5, 0x4A, 0x01];
/// magic + len + crc.
pub const RECORD_HEADER_BYTES: usize = 12;
/// No record is larger: a longer length field is damage, not data. Far
/// above any conversation `server.max_body_bytes` can admit.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Appends one record with `payload` to `out`.
///
/// Panics never; a payload over [`MAX_PAYLOAD_BYTES`] is the caller's bug
/// and is refused by [`encoded_len`] checks before this is reached.
pub fn encode_into(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let len_bytes = len.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
    out.reserve(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// One record with `payload`, ready to write.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(payload.len()));
    encode_into(payload, &mut out);
    out
}

/// Bytes a record with a payload of `payload_len` bytes takes on disk.
pub const fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len
}

/// A record that passed its checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Where the record (its magic) starts in the segment.
    pub offset: u64,
    pub payload: &'a [u8],
}

/// What is wrong with a damaged byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// The segment does not start with [`SEGMENT_HEADER`].
    BadHeader,
    /// Bytes that are not a record: no magic, a checksum mismatch or an
    /// impossible length, with a good record after them.
    Corrupt,
    /// Damage that runs to the end of the segment: a record cut short by a
    /// crash mid-write (expected once, at the end of the newest segment), or
    /// garbage up to the end.
    TornTail,
}

impl DamageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHeader => "bad_header",
            Self::Corrupt => "corrupt",
            Self::TornTail => "torn_tail",
        }
    }
}

/// A damaged byte range of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    pub kind: DamageKind,
}

/// Everything [`scan`] found in one segment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan<'a> {
    pub records: Vec<Record<'a>>,
    pub damage: Vec<Damage>,
}

impl Scan<'_> {
    pub fn damaged_bytes(&self) -> u64 {
        self.damage.iter().map(|d| d.len).sum()
    }
}

/// Reads every verifiable record of a segment's bytes.
pub fn scan(bytes: &[u8]) -> Scan<'_> {
    let mut out = Scan::default();
    // A crash right after the file was created leaves it empty or with
    // part of its header: nothing was ever written to it.
    // A whole header and nothing else is a clean, empty segment.
    if bytes.len() <= SEGMENT_HEADER.len() && SEGMENT_HEADER.starts_with(bytes) {
        if bytes.len() < SEGMENT_HEADER.len() {
            push_damage(&mut out, 0, bytes.len(), DamageKind::TornTail);
        }
        return out;
    }
    let mut pos = if bytes.starts_with(&SEGMENT_HEADER) {
        SEGMENT_HEADER.len()
    } else {
        // Not even a header: look for records anyway (the header may be
        // the only damaged part).
        let next = find_magic(bytes, 0).unwrap_or(bytes.len());
        push_damage(&mut out, 0, next, DamageKind::BadHeader);
        next
    };
    // Start of a damaged range not yet reported.
    let mut damage_from: Option<usize> = None;
    while pos < bytes.len() {
        match record_at(bytes, pos) {
            Some(payload) => {
                if let Some(start) = damage_from.take() {
                    push_damage(&mut out, start, pos, DamageKind::Corrupt);
                }
                out.records.push(Record {
                    offset: pos as u64,
                    payload,
                });
                pos += encoded_len(payload.len());
            }
            None => {
                damage_from.get_or_insert(pos);
                pos = find_magic(bytes, pos + 1).unwrap_or(bytes.len());
            }
        }
    }
    if let Some(start) = damage_from {
        push_damage(&mut out, start, bytes.len(), DamageKind::TornTail);
    }
    out
}

fn push_damage(out: &mut Scan<'_>, start: usize, end: usize, kind: DamageKind) {
    if end > start {
        out.damage.push(Damage {
            offset: start as u64,
            len: (end - start) as u64,
            kind,
        });
    }
}

/// The payload of the record starting at `pos`, if it verifies.
fn record_at(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let header = bytes.get(pos..pos.checked_add(RECORD_HEADER_BYTES)?)?;
    if header[..4] != RECORD_MAGIC {
        return None;
    }
    let len_bytes: [u8; 4] = header[4..8].try_into().ok()?;
    let crc_bytes: [u8; 4] = header[8..12].try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_PAYLOAD_BYTES {
        return None;
    }
    let start = pos + RECORD_HEADER_BYTES;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
    (crc == u32::from_le_bytes(crc_bytes)).then_some(payload)
}

/// The next position at or after `from` where [`RECORD_MAGIC`] starts.
fn find_magic(bytes: &[u8], from: usize) -> Option<usize> {
    let rest = bytes.get(from..)?;
    rest.windows(RECORD_MAGIC.len())
        .position(|w| w == RECORD_MAGIC)
        .map(|p| from + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = SEGMENT_HEADER.to_vec();
        for p in payloads {
            encode_into(p, &mut out);
        }
        out
    }

    fn payloads<'a>(scan: &Scan<'a>) -> Vec<&'a [u8]> {
        scan.records.iter().map(|r| r.payload).collect()
    }

    #[test]
    fn empty_segment_is_clean() {
        let bytes = SEGMENT_HEADER.to_vec();
        let scan = scan(&bytes);
        assert!(scan.records.is_empty());
        assert!(scan.damage.is_empty());
    }

    #[test]
    fn records_read_back_in_order() {
        let bytes = segment(&[b"one", b"", b"three"]);
        let scan = scan(&bytes);
        assert_eq!(payloads(&scan), vec![&b"one"[..], b"", b"three"]);
        assert!(scan.damage.is_empty());
        assert_eq!(scan.records[0].offset, 16);
    }

    #[test]
    fn torn_tail_is_reported_and_earlier_records_kept() {
        let bytes = segment(&[b"first", b"second"]);
        let cut = &bytes[..bytes.len() - 3];
        let scan = scan(cut);
        assert_eq!(payloads(&scan), vec![&b"first"[..]]);
        assert_eq!(scan.damage.len(), 1);
        assert_eq!(scan.damage[0].kind, DamageKind::TornTail);
        assert_eq!(scan.damage[0].offset + scan.damage[0].len, cut.len() as u64);
    }

    #[test]
    fn flipped_byte_in_the_middle_skips_one_record_only() {
        let mut bytes = segment(&[b"alpha", b"bravo", b"charlie"]);
        let second = 16 + encoded_len(5);
        bytes[second + RECORD_HEADER_BYTES + 1] ^= 0x40;
        let scan = scan(&bytes);
        assert_eq!(payloads(&scan), vec![&b"alpha"[..], b"charlie"]);
        assert_eq!(
            scan.damage,
            vec![Damage {
                offset: second as u64,
                len: encoded_len(5) as u64,
                kind: DamageKind::Corrupt
            }]
        );
    }

    #[test]
    fn corrupt_length_does_not_hide_later_records() {
        let mut bytes = segment(&[b"alpha", b"bravo", b"charlie"]);
        let second = 16 + encoded_len(5);
        // A huge length: the reader must not trust it.
        bytes[second + 7] = 0x7F;
        let scan = scan(&bytes);
        assert_eq!(payloads(&scan), vec![&b"alpha"[..], b"charlie"]);
        assert_eq!(scan.damage[0].kind, DamageKind::Corrupt);
    }

    #[test]
    fn empty_or_half_created_segment_is_not_damage_worth_keeping() {
        assert_eq!(scan(b""), Scan::default());
        let half = scan(&SEGMENT_HEADER[..7]);
        assert!(half.records.is_empty());
        assert_eq!(half.damage[0].kind, DamageKind::TornTail);
    }

    #[test]
    fn missing_header_is_reported_but_records_are_read() {
        let mut bytes = segment(&[b"x", b"y"]);
        bytes[0] = b'X';
        let scan = scan(&bytes);
        assert_eq!(payloads(&scan), vec![&b"x"[..], b"y"]);
        assert_eq!(scan.damage[0].kind, DamageKind::BadHeader);
    }

    #[test]
    fn zero_filled_tail_is_a_torn_tail() {
        // What a file system can leave after a crash: the size grew, the
        // data did not make it.
        let mut bytes = segment(&[b"kept"]);
        bytes.extend_from_slice(&[0u8; 100]);
        let scan = scan(&bytes);
        assert_eq!(payloads(&scan), vec![&b"kept"[..]]);
        assert_eq!(scan.damage[0].kind, DamageKind::TornTail);
        assert_eq!(scan.damage[0].len, 100);
    }

    proptest! {
        /// Whatever is written reads back, byte for byte, with no damage.
        #[test]
        fn round_trip(items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40)) {
            let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            let bytes = segment(&refs);
            let scan = scan(&bytes);
            prop_assert!(scan.damage.is_empty());
            prop_assert_eq!(payloads(&scan), refs);
        }

        /// A segment cut at any point yields exactly the records that were
        /// complete before the cut, and reports the rest as a torn tail.
        #[test]
        fn any_truncation_keeps_the_complete_prefix(
            items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..20),
            cut_frac in 0.0f64..1.0,
        ) {
            let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            let bytes = segment(&refs);
            let cut = 16 + ((bytes.len() - 16) as f64 * cut_frac) as usize;
            let scan = scan(&bytes[..cut]);
            let mut end = 16;
            let mut complete = Vec::new();
            for p in &refs {
                end += encoded_len(p.len());
                if end <= cut { complete.push(*p); }
            }
            prop_assert_eq!(payloads(&scan), complete.clone());
            let consumed: usize = 16 + complete.iter().map(|p| encoded_len(p.len())).sum::<usize>();
            if consumed < cut {
                prop_assert_eq!(scan.damage.len(), 1);
                prop_assert_eq!(scan.damage[0].kind, DamageKind::TornTail);
            } else {
                prop_assert!(scan.damage.is_empty());
            }
        }

        /// Flipping any byte after the header loses at most the one record
        /// it hits; every other record still reads back, in order. (JSON
        /// payloads, like the journal's, never contain the magic's 0xFF.)
        #[test]
        fn one_flipped_byte_costs_at_most_one_record(
            items in proptest::collection::vec("[ -~]{0,80}", 1..15),
            pos_frac in 0.0f64..1.0,
            bit in 0u8..8,
        ) {
            let refs: Vec<&[u8]> = items.iter().map(|s| s.as_bytes()).collect();
            let mut bytes = segment(&refs);
            let pos = 16 + ((bytes.len() - 16) as f64 * pos_frac) as usize;
            let pos = pos.min(bytes.len() - 1);
            bytes[pos] ^= 1 << bit;
            let scan = scan(&bytes);
            // Which record did the flip land in?
            let mut start = 16;
            let mut hit = None;
            for (i, p) in refs.iter().enumerate() {
                let end = start + encoded_len(p.len());
                if pos >= start && pos < end { hit = Some(i); }
                start = end;
            }
            let expected: Vec<&[u8]> = refs.iter().enumerate()
                .filter(|(i, _)| Some(*i) != hit)
                .map(|(_, p)| *p)
                .collect();
            prop_assert_eq!(payloads(&scan), expected);
            prop_assert!(scan.damage.len() <= 1);
        }

        /// Arbitrary bytes never panic the scanner, and every record it
        /// reports lies inside the input.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let scan = scan(&bytes);
            for r in &scan.records {
                prop_assert!(r.offset as usize + encoded_len(r.payload.len()) <= bytes.len());
            }
        }
    }
}
