//! The synchronous streamer's append-only segment journal.
//!
//! A write-once object per synchronous flush costs a new file, two fsyncs
//! and an age header (an X25519 exchange) per commit group. A journal pays
//! those once per segment: its header wraps a random ChaCha20-Poly1305 key
//! with age to the repository's recipients (so a host holding only public
//! keys can write it and only identity holders can read it), and each flush
//! appends one record sealed with that key.
//!
//! ```text
//! "DRJOURNAL1\n"  u32 LE header length  age(key ‖ start u32 LE ‖ segment name)
//! records:        u32 LE sealed length  u32 LE segment offset  sealed bytes
//! end:            u32 zero (the file is pre-zeroed) or end of file
//! ```
//!
//! Record `i` is sealed with nonce `i` and its offset and length as
//! associated data, so records cannot be reordered, moved or spliced between
//! journals; the header names its segment, so a journal cannot pose as
//! another segment's. Records are contiguous: each starts where the one
//! before ended, and carries at most 1 MiB.
//!
//! A record that fails authentication is a torn write (a crash during the
//! append, so never acknowledged) only when nothing but zeros follows it;
//! otherwise the journal is corrupt and reading it fails.

use std::io::{Read, Write};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use super::{Codec, CodecError};

/// First bytes of every journal.
pub const JOURNAL_MAGIC: &[u8] = b"DRJOURNAL1\n";
/// Bytes a record adds to the WAL it carries (length, offset, tag).
pub const RECORD_OVERHEAD: usize = 8 + 16;
/// Records carry at most this much WAL, so a damaged length field cannot
/// hide more than this behind a record taken for a torn write.
const MAX_RECORD: usize = 1 << 20;
/// A header larger than this is not one `dr` wrote (age with a few
/// recipients is a few hundred bytes).
const MAX_HEADER: usize = 64 << 10;

/// Seals the records of one journal, in order.
pub struct JournalWriter {
    cipher: ChaCha20Poly1305,
    counter: u64,
    /// Segment offset the next record must start at.
    next: u32,
}

/// What a journal holds.
#[derive(Debug)]
pub struct JournalRead {
    /// Segment offset of the first byte.
    pub start: u32,
    /// The journaled bytes, `[start, start + data.len())` of the segment.
    pub data: Vec<u8>,
    /// The last record did not authenticate and nothing followed it: a write
    /// cut short by a crash, never acknowledged to the server.
    pub torn_tail: bool,
}

impl JournalRead {
    /// Segment offset after the last journaled byte.
    pub fn end(&self) -> u32 {
        self.start + self.data.len() as u32
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(n)
}

fn aad(offset: u32, sealed_len: u32) -> [u8; 8] {
    let mut a = [0u8; 8];
    a[..4].copy_from_slice(&sealed_len.to_le_bytes());
    a[4..].copy_from_slice(&offset.to_le_bytes());
    a
}

impl JournalWriter {
    /// Segment offset the next record starts at.
    pub fn next_offset(&self) -> u32 {
        self.next
    }

    /// The records carrying `plain`, which must start at
    /// [`Self::next_offset`]: one per MiB.
    pub fn seal(&mut self, offset: u32, plain: &[u8]) -> Result<Vec<u8>, CodecError> {
        if offset != self.next || plain.is_empty() {
            return Err(CodecError::Pipeline(format!(
                "journal record at {offset:#x} ({} bytes) does not follow {:#x}",
                plain.len(),
                self.next
            )));
        }
        let records = plain.len().div_ceil(MAX_RECORD);
        let mut out = Vec::with_capacity(plain.len() + records * RECORD_OVERHEAD);
        for part in plain.chunks(MAX_RECORD) {
            let sealed_len = (part.len() + 16) as u32;
            let sealed = self
                .cipher
                .encrypt(
                    &nonce(self.counter),
                    Payload {
                        msg: part,
                        aad: &aad(self.next, sealed_len),
                    },
                )
                .map_err(|_| CodecError::Pipeline("journal record sealing failed".into()))?;
            out.extend_from_slice(&sealed_len.to_le_bytes());
            out.extend_from_slice(&self.next.to_le_bytes());
            out.extend_from_slice(&sealed);
            self.counter += 1;
            self.next += part.len() as u32;
        }
        Ok(out)
    }
}

impl Codec {
    /// A new journal of `segment` from offset `start`: its header, to be
    /// written first, and the writer of its records.
    pub fn new_journal(
        &self,
        segment: &str,
        start: u32,
    ) -> Result<(Vec<u8>, JournalWriter), CodecError> {
        let fail = |e: &dyn std::fmt::Display| CodecError::Pipeline(e.to_string());
        let key: [u8; 32] = rand::random();
        let mut inner = Vec::with_capacity(36 + segment.len());
        inner.extend_from_slice(&key);
        inner.extend_from_slice(&start.to_le_bytes());
        inner.extend_from_slice(segment.as_bytes());
        let enc = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| fail(&e))?;
        let mut wrapped = Vec::new();
        let mut w = enc.wrap_output(&mut wrapped).map_err(|e| fail(&e))?;
        w.write_all(&inner).map_err(|e| fail(&e))?;
        w.finish().map_err(|e| fail(&e))?;
        let mut header = Vec::with_capacity(JOURNAL_MAGIC.len() + 4 + wrapped.len());
        header.extend_from_slice(JOURNAL_MAGIC);
        header.extend_from_slice(&(wrapped.len() as u32).to_le_bytes());
        header.extend_from_slice(&wrapped);
        let writer = JournalWriter {
            cipher: ChaCha20Poly1305::new(&Key::from(key)),
            counter: 0,
            next: start,
        };
        Ok((header, writer))
    }

    /// Reads the journal stored as `key`, which must be of `segment` from
    /// offset `start` (both from its name). A record that fails to
    /// authenticate with a valid record after it is corruption, not a torn
    /// write, and fails the read.
    pub fn read_journal(
        &self,
        key: &str,
        bytes: &[u8],
        segment: &str,
        start: u32,
    ) -> Result<JournalRead, CodecError> {
        let corrupt = |what: String| CodecError::Corrupt {
            key: key.to_string(),
            what,
        };
        let Some(rest) = bytes.strip_prefix(JOURNAL_MAGIC) else {
            return Err(CodecError::Foreign {
                key: key.to_string(),
            });
        };
        let hlen = u32_at(rest, 0).map(|n| n as usize);
        let Some(wrapped) = hlen
            .filter(|n| *n <= MAX_HEADER)
            .and_then(|n| rest.get(4..4 + n))
        else {
            return Err(corrupt("journal header truncated".into()));
        };
        let inner = self.unwrap_journal_key(key, wrapped)?;
        if inner.len() < 36
            || inner[32..36] != start.to_le_bytes()
            || &inner[36..] != segment.as_bytes()
        {
            return Err(corrupt(format!(
                "journal header is not of segment {segment} from offset {start:#x}"
            )));
        }
        let mut key_bytes = [0u8; 32];
        key_bytes.copy_from_slice(&inner[..32]);
        let cipher = ChaCha20Poly1305::new(&Key::from(key_bytes));
        let records = &rest[4 + wrapped.len()..];
        let mut out = JournalRead {
            start,
            data: Vec::new(),
            torn_tail: false,
        };
        let mut pos = 0usize;
        let mut counter = 0u64;
        while let (Some(len), Some(offset)) = (u32_at(records, pos), u32_at(records, pos + 4)) {
            if len == 0 {
                break;
            }
            let sealed = records.get(pos + 8..pos + 8 + len as usize);
            let opened = sealed.and_then(|s| {
                cipher
                    .decrypt(
                        &nonce(counter),
                        Payload {
                            msg: s,
                            aad: &aad(offset, len),
                        },
                    )
                    .ok()
            });
            match opened {
                Some(plain) if offset == out.end() => out.data.extend_from_slice(&plain),
                Some(_) => {
                    return Err(corrupt(format!(
                        "journal record {counter} starts at {offset:#x}, not {:#x}",
                        out.end()
                    )));
                }
                None if nothing_after(records, pos) => {
                    out.torn_tail = true;
                    break;
                }
                None => {
                    return Err(corrupt(format!(
                        "journal record {counter} fails authentication"
                    )));
                }
            }
            pos += 8 + len as usize;
            counter += 1;
        }
        Ok(out)
    }

    fn unwrap_journal_key(&self, key: &str, wrapped: &[u8]) -> Result<Vec<u8>, CodecError> {
        let Some(ids) = self.identities.clone() else {
            return Err(self.no_identity_error());
        };
        let dec = age::Decryptor::new_buffered(wrapped).map_err(|_| CodecError::Corrupt {
            key: key.to_string(),
            what: "journal header is not age-encrypted".into(),
        })?;
        let mut reader = dec
            .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => CodecError::WrongKey {
                    key: key.to_string(),
                },
                e => CodecError::Corrupt {
                    key: key.to_string(),
                    what: format!("journal header: {e}"),
                },
            })?;
        let mut inner = Vec::new();
        reader
            .read_to_end(&mut inner)
            .map_err(|e| CodecError::Corrupt {
                key: key.to_string(),
                what: format!("journal header: {e}"),
            })?;
        Ok(inner)
    }
}

/// Whether nothing was written after the failed record at `pos`: a torn
/// write is the last thing in the journal, followed by the pre-zeroed rest
/// of the file. A length too large to be a record's is not trusted to say
/// where the record ends.
fn nothing_after(records: &[u8], pos: usize) -> bool {
    let len = u32_at(records, pos).map_or(0, |l| l as usize);
    let end = pos + 8 + len.min(MAX_RECORD + 16);
    records
        .get(end..)
        .is_none_or(|rest| rest.iter().all(|b| *b == 0))
}

fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    let s = b.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        let id = age::x25519::Identity::generate();
        Codec::new(vec![id.to_public()], Some(vec![id]), 1)
    }

    fn journal(c: &Codec, parts: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let (mut file, mut w) = c.new_journal("000000010000000000000003", 0x100).unwrap();
        let mut ends = Vec::new();
        for p in parts {
            file.extend(w.seal(w.next_offset(), p).unwrap());
            ends.push(file.len());
        }
        // Pre-zeroed space after the records.
        file.extend(std::iter::repeat_n(0u8, 64));
        (file, ends)
    }

    #[test]
    fn records_read_back_in_order() {
        let c = codec();
        let (file, _) = journal(&c, &[b"abc", b"defgh", b"i"]);
        let r = c
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap();
        assert_eq!(r.data, b"abcdefghi");
        assert_eq!((r.start, r.end(), r.torn_tail), (0x100, 0x109, false));
        // Without the zeros: end of file ends it too.
        let r = c
            .read_journal(
                "k",
                &file[..file.len() - 64],
                "000000010000000000000003",
                0x100,
            )
            .unwrap();
        assert_eq!(r.data, b"abcdefghi");
    }

    #[test]
    fn a_torn_last_record_ends_the_journal_and_says_so() {
        let c = codec();
        let (mut file, ends) = journal(&c, &[b"abc", b"defgh", b"ijkl"]);
        // The last record's bytes only half written.
        for b in &mut file[ends[1] + 12..ends[2]] {
            *b = 0;
        }
        let r = c
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap();
        assert_eq!((r.data.as_slice(), r.torn_tail), (&b"abcdefgh"[..], true));
        // Cut off inside the last record.
        let r = c
            .read_journal(
                "k",
                &file[..ends[1] + 10],
                "000000010000000000000003",
                0x100,
            )
            .unwrap();
        assert_eq!((r.data.as_slice(), r.torn_tail), (&b"abcdefgh"[..], true));
    }

    #[test]
    fn corruption_before_a_valid_record_fails_loudly() {
        let c = codec();
        let (mut file, ends) = journal(&c, &[b"abc", b"defgh", b"ijkl"]);
        file[ends[0] + 9] ^= 1;
        let e = c
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap_err();
        assert!(matches!(e, CodecError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn a_journal_cannot_pose_as_another_segment_or_be_read_without_the_key() {
        let c = codec();
        let (file, _) = journal(&c, &[b"abc"]);
        for (seg, start) in [
            ("000000010000000000000004", 0x100),
            ("000000010000000000000003", 0),
        ] {
            let e = c.read_journal("k", &file, seg, start).unwrap_err();
            assert!(matches!(e, CodecError::Corrupt { .. }), "{e}");
        }
        let e = codec()
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap_err();
        assert!(matches!(e, CodecError::WrongKey { .. }), "{e}");
        let e = c
            .read_journal("k", b"not a journal", "000000010000000000000003", 0x100)
            .unwrap_err();
        assert!(matches!(e, CodecError::Foreign { .. }), "{e}");
    }

    #[test]
    fn a_damaged_length_cannot_hide_what_follows() {
        let c = codec();
        let big = vec![7u8; (1 << 20) + 5];
        let (mut file, ends) = journal(&c, &[b"abc", &big, b"tail"]);
        // Three records: the big one was split in two.
        assert_eq!(ends.len(), 3);
        let r = c
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap();
        assert_eq!(r.data.len(), 3 + big.len() + 4);
        // The first record's length made huge: what follows is not zeros.
        file[ends[0]..ends[0] + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = c
            .read_journal("k", &file, "000000010000000000000003", 0x100)
            .unwrap_err();
        assert!(matches!(e, CodecError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn records_must_follow_each_other() {
        let c = codec();
        let (_, mut w) = c.new_journal("000000010000000000000003", 0).unwrap();
        assert!(w.seal(0, b"ab").is_ok());
        assert!(w.seal(3, b"cd").is_err());
        assert!(w.seal(2, b"").is_err());
    }
}
