//! An encoder for PostgreSQL's binary `COPY ... FROM STDIN (FORMAT BINARY)`.
//!
//! Binary COPY is the cheapest way to move many rows into PostgreSQL (no SQL
//! parsing, no text conversion of floats), but sqlx only carries the raw
//! bytes (`copy_in_raw`): the rows have to be encoded here. The format
//! (<https://www.postgresql.org/docs/current/sql-copy.html>, "Binary Format"):
//!
//! - header: the 11-byte signature `PGCOPY\n\xff\r\n\0`, a 32-bit flags
//!   field (0) and a 32-bit header-extension length (0);
//! - per row: a 16-bit field count, then per field a 32-bit byte length
//!   (-1 for NULL) followed by the value in the type's binary send format;
//! - trailer: a 16-bit -1.
//!
//! All integers are big-endian. Values encoded here: `uuid` (16 bytes),
//! `int4`, `text` (UTF-8 bytes), `bytea` (raw bytes), `timestamptz`
//! (microseconds since 2000-01-01 00:00 UTC as i64) and pgvector's `vector`
//! (u16 dimension count, u16 unused = 0, then f32 values).
//!
//! The encoder checks that every row gets exactly the fields it announced:
//! a short row would otherwise make PostgreSQL read the next row's bytes as
//! this row's fields.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The 11-byte signature every binary COPY stream starts with.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// pgvector's limit on a `vector`'s dimensions.
pub const VECTOR_MAX_DIMENSIONS: usize = 16_000;

/// A value the binary format (or the target type) cannot carry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CopyEncodeError {
    #[error("field of {0} bytes exceeds the 1 GiB a PostgreSQL field can hold")]
    FieldTooLarge(usize),
    #[error("a vector must have 1 to {VECTOR_MAX_DIMENSIONS} dimensions, this one has {0}")]
    VectorDimensions(usize),
    #[error("timestamp {0} is outside the range PostgreSQL can store")]
    TimestampOutOfRange(DateTime<Utc>),
    #[error("row announced {announced} fields but {written} were written")]
    FieldCount { announced: i16, written: i16 },
    #[error("a row cannot have {0} fields")]
    TooManyFields(usize),
}

/// Builds a binary COPY stream in memory, row by row.
///
/// `take` hands out what has been encoded so far, so a long stream can be
/// sent in pieces while later rows are still being encoded.
#[derive(Debug)]
pub struct CopyEncoder {
    buf: Vec<u8>,
    /// Fields the current row announced, and how many were written.
    announced: i16,
    written: i16,
}

impl Default for CopyEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyEncoder {
    /// A stream that starts with the header.
    pub fn new() -> Self {
        Self::with_capacity(64 * 1024)
    }

    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(19));
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self {
            buf,
            announced: 0,
            written: 0,
        }
    }

    /// Starts a row of `fields` fields; the previous row must be complete.
    pub fn begin_row(&mut self, fields: usize) -> Result<(), CopyEncodeError> {
        self.check_row_complete()?;
        let n = i16::try_from(fields).map_err(|_| CopyEncodeError::TooManyFields(fields))?;
        self.buf.extend_from_slice(&n.to_be_bytes());
        self.announced = n;
        self.written = 0;
        Ok(())
    }

    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self.written = self.written.saturating_add(1);
    }

    pub fn uuid(&mut self, value: &Uuid) {
        self.field_header(16);
        self.buf.extend_from_slice(value.as_bytes());
    }

    pub fn int4(&mut self, value: i32) {
        self.field_header(4);
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    pub fn text(&mut self, value: &str) -> Result<(), CopyEncodeError> {
        self.bytea(value.as_bytes())
    }

    pub fn bytea(&mut self, value: &[u8]) -> Result<(), CopyEncodeError> {
        let len = field_len(value.len())?;
        self.field_header(len);
        self.buf.extend_from_slice(value);
        Ok(())
    }

    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> Result<(), CopyEncodeError> {
        let micros = value
            .timestamp_micros()
            .checked_sub(PG_EPOCH_UNIX_MICROS)
            .ok_or(CopyEncodeError::TimestampOutOfRange(value))?;
        self.field_header(8);
        self.buf.extend_from_slice(&micros.to_be_bytes());
        Ok(())
    }

    /// pgvector's binary `vector`: u16 dimensions, u16 zero, f32 values.
    pub fn vector(&mut self, values: &[f32]) -> Result<(), CopyEncodeError> {
        if values.is_empty() || values.len() > VECTOR_MAX_DIMENSIONS {
            return Err(CopyEncodeError::VectorDimensions(values.len()));
        }
        let dims = u16::try_from(values.len())
            .map_err(|_| CopyEncodeError::VectorDimensions(values.len()))?;
        // 4 + 4 * 16,000 always fits an i32.
        let len = field_len(4 + 4 * values.len())?;
        self.field_header(len);
        self.buf.reserve(4 + 4 * values.len());
        self.buf.extend_from_slice(&dims.to_be_bytes());
        self.buf.extend_from_slice(&0u16.to_be_bytes());
        for v in values {
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
        Ok(())
    }

    /// Bytes encoded so far (including the header on the first call).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Hands out the bytes encoded so far and continues with an empty buffer
    /// of the same capacity; a row may be split across two takes (COPY data
    /// messages need not align with rows).
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    /// Appends the trailer and returns the rest of the stream.
    pub fn finish(mut self) -> Result<Vec<u8>, CopyEncodeError> {
        self.check_row_complete()?;
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        Ok(self.buf)
    }

    fn field_header(&mut self, len: i32) {
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.written = self.written.saturating_add(1);
    }

    fn check_row_complete(&self) -> Result<(), CopyEncodeError> {
        if self.written != self.announced {
            return Err(CopyEncodeError::FieldCount {
                announced: self.announced,
                written: self.written,
            });
        }
        Ok(())
    }
}

/// A field's length as the format's i32 (PostgreSQL caps a field at 1 GiB).
fn field_len(len: usize) -> Result<i32, CopyEncodeError> {
    const MAX_FIELD: usize = (1 << 30) - 1;
    if len > MAX_FIELD {
        return Err(CopyEncodeError::FieldTooLarge(len));
    }
    i32::try_from(len).map_err(|_| CopyEncodeError::FieldTooLarge(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const HEADER: [u8; 19] = [
        b'P', b'G', b'C', b'O', b'P', b'Y', b'\n', 0xff, b'\r', b'\n', 0, // signature
        0, 0, 0, 0, // flags
        0, 0, 0, 0, // extension length
    ];

    #[test]
    fn empty_stream_is_header_and_trailer() {
        let bytes = CopyEncoder::new().finish().expect("complete");
        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn one_row_of_every_type_byte_for_byte() {
        let mut enc = CopyEncoder::new();
        enc.begin_row(7).expect("row");
        let id = Uuid::from_bytes([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ]);
        enc.uuid(&id);
        enc.int4(-2);
        enc.text("hé").expect("text");
        enc.bytea(&[0xde, 0xad]).expect("bytea");
        // 2000-01-01T00:00:01.000002Z → 1_000_002 µs after PostgreSQL's epoch.
        let ts = Utc
            .with_ymd_and_hms(2000, 1, 1, 0, 0, 1)
            .single()
            .expect("valid")
            + chrono::Duration::microseconds(2);
        enc.timestamptz(ts).expect("ts");
        enc.vector(&[1.0, -0.5]).expect("vector");
        enc.null();
        let bytes = enc.finish().expect("complete");

        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&[0, 7]); // field count
        expected.extend_from_slice(&[0, 0, 0, 16]);
        expected.extend_from_slice(id.as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0, 0, 0, 3, b'h', 0xc3, 0xa9]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0xde, 0xad]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0x0f, 0x42, 0x42]);
        expected.extend_from_slice(&[0, 0, 0, 12]); // 2 + 2 + 2 * 4
        expected.extend_from_slice(&[0, 2, 0, 0]); // dims, unused
        expected.extend_from_slice(&[0x3f, 0x80, 0, 0]); // 1.0
        expected.extend_from_slice(&[0xbf, 0, 0, 0]); // -0.5
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
        expected.extend_from_slice(&[0xff, 0xff]); // trailer
        assert_eq!(bytes, expected);
    }

    #[test]
    fn timestamps_before_2000_are_negative() {
        let mut enc = CopyEncoder::new();
        enc.begin_row(1).expect("row");
        let ts = Utc
            .with_ymd_and_hms(1999, 12, 31, 23, 59, 59)
            .single()
            .expect("valid");
        enc.timestamptz(ts).expect("ts");
        let bytes = enc.finish().expect("complete");
        let field = &bytes[19 + 2 + 4..19 + 2 + 4 + 8];
        assert_eq!(field, &(-1_000_000i64).to_be_bytes());
    }

    #[test]
    fn short_row_is_refused() {
        let mut enc = CopyEncoder::new();
        enc.begin_row(2).expect("row");
        enc.int4(1);
        assert_eq!(
            enc.begin_row(1),
            Err(CopyEncodeError::FieldCount {
                announced: 2,
                written: 1
            })
        );
        assert!(enc.finish().is_err());
    }

    #[test]
    fn bad_vectors_are_refused() {
        let mut enc = CopyEncoder::new();
        enc.begin_row(1).expect("row");
        assert_eq!(enc.vector(&[]), Err(CopyEncodeError::VectorDimensions(0)));
        let long = vec![0.0f32; VECTOR_MAX_DIMENSIONS + 1];
        assert_eq!(
            enc.vector(&long),
            Err(CopyEncodeError::VectorDimensions(VECTOR_MAX_DIMENSIONS + 1))
        );
    }

    #[test]
    fn take_splits_the_stream_without_losing_bytes() {
        let mut whole = CopyEncoder::new();
        let mut split = CopyEncoder::new();
        let mut pieces = Vec::new();
        for i in 0..3 {
            for enc in [&mut whole, &mut split] {
                enc.begin_row(2).expect("row");
                enc.int4(i);
                enc.text("row").expect("text");
            }
            pieces.extend(split.take());
        }
        pieces.extend(split.finish().expect("complete"));
        assert_eq!(pieces, whole.finish().expect("complete"));
    }
}
