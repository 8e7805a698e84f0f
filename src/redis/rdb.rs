//! Streaming RDB validation: the `REDIS<version>` magic at the start, the EOF
//! opcode, and the CRC-64 trailer at the end, checked as bytes go by so that
//! nothing needs to be buffered or re-read.

/// Why an RDB stream is not a valid snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdbError {
    /// The first bytes are not `REDIS` followed by a 4-digit version.
    #[error("not an RDB file: it starts with {0:?} instead of REDISnnnn")]
    BadMagic(String),
    /// The stream ended before a complete RDB.
    #[error("RDB is truncated: {0} bytes is too short to hold a header and trailer")]
    TooShort(u64),
    /// The byte before the checksum is not the EOF opcode.
    #[error("RDB is truncated or corrupt: no EOF opcode before the checksum")]
    NoEof,
    /// The CRC-64 trailer does not match the content.
    #[error("RDB checksum mismatch: trailer says {expected:016x}, content hashes to {actual:016x}")]
    Checksum {
        /// From the trailer.
        expected: u64,
        /// Computed.
        actual: u64,
    },
}

/// What a valid RDB stream told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdbSummary {
    /// RDB format version from the header.
    pub version: u32,
    /// Total bytes.
    pub size: u64,
    /// False when the server has `rdbchecksum no` (trailer is zero).
    pub checksummed: bool,
}

/// Reflected form of the Jones polynomial 0xad93d23594c935a9 that Redis uses.
const POLY: u64 = 0x95ac_9329_ac4b_c9b5;

/// Slicing-by-8 tables, built at compile time.
static TABLES: [[u64; 256]; 8] = build_tables();

const fn build_tables() -> [[u64; 256]; 8] {
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

/// Continues the Redis CRC-64 of `crc` over `data`.
pub fn crc64(mut crc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = crc ^ u64::from_le_bytes(w);
        crc = TABLES[7][(v & 0xff) as usize]
            ^ TABLES[6][((v >> 8) & 0xff) as usize]
            ^ TABLES[5][((v >> 16) & 0xff) as usize]
            ^ TABLES[4][((v >> 24) & 0xff) as usize]
            ^ TABLES[3][((v >> 32) & 0xff) as usize]
            ^ TABLES[2][((v >> 40) & 0xff) as usize]
            ^ TABLES[1][((v >> 48) & 0xff) as usize]
            ^ TABLES[0][(v >> 56) as usize];
    }
    for &b in chunks.remainder() {
        crc = TABLES[0][((crc ^ b as u64) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const HEADER: usize = 9;
const TRAILER: usize = 8;

/// Incremental checker: feed every byte in order, then call [`RdbCheck::finish`].
#[derive(Debug, Default)]
pub struct RdbCheck {
    crc: u64,
    size: u64,
    header: Vec<u8>,
    version: Option<u32>,
    /// The last bytes seen, not yet in the CRC (they may be the trailer).
    tail: Vec<u8>,
    /// The last byte that went into the CRC (the EOF opcode, at the end).
    last_hashed: Option<u8>,
}

impl RdbCheck {
    /// A checker at the start of a stream.
    pub fn new() -> RdbCheck {
        RdbCheck::default()
    }

    /// Feeds the next bytes; fails as soon as the header is known to be wrong.
    pub fn update(&mut self, data: &[u8]) -> Result<(), RdbError> {
        self.size += data.len() as u64;
        if self.version.is_none() {
            let need = HEADER - self.header.len();
            self.header.extend_from_slice(&data[..need.min(data.len())]);
            if self.header.len() == HEADER {
                self.version = Some(parse_magic(&self.header)?);
            }
        }
        // Everything except the newest 8 bytes is hashed.
        if data.len() >= TRAILER {
            let (body, new_tail) = data.split_at(data.len() - TRAILER);
            let tail = std::mem::take(&mut self.tail);
            self.hash(&tail);
            self.hash(body);
            self.tail.extend_from_slice(new_tail);
        } else {
            self.tail.extend_from_slice(data);
            if self.tail.len() > TRAILER {
                let spill = self.tail.len() - TRAILER;
                let out: Vec<u8> = self.tail.drain(..spill).collect();
                self.hash(&out);
            }
        }
        Ok(())
    }

    fn hash(&mut self, data: &[u8]) {
        if let Some(&b) = data.last() {
            self.crc = crc64(self.crc, data);
            self.last_hashed = Some(b);
        }
    }

    /// Checks the end of the stream.
    pub fn finish(self) -> Result<RdbSummary, RdbError> {
        if self.size < (HEADER + 1 + TRAILER) as u64 {
            if self.header.len() == HEADER || self.size >= 5 {
                parse_magic(&self.header)?;
            }
            return Err(RdbError::TooShort(self.size));
        }
        let version = parse_magic(&self.header)?;
        if self.last_hashed != Some(0xff) {
            return Err(RdbError::NoEof);
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.tail);
        let expected = u64::from_le_bytes(w);
        if expected != 0 && expected != self.crc {
            return Err(RdbError::Checksum {
                expected,
                actual: self.crc,
            });
        }
        Ok(RdbSummary {
            version,
            size: self.size,
            checksummed: expected != 0,
        })
    }
}

fn parse_magic(h: &[u8]) -> Result<u32, RdbError> {
    let bad = || RdbError::BadMagic(String::from_utf8_lossy(h).into_owned());
    if h.len() < 5 || &h[..5] != b"REDIS" {
        return Err(bad());
    }
    if h.len() < HEADER {
        return Err(bad());
    }
    std::str::from_utf8(&h[5..HEADER])
        .ok()
        .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc_bitwise(data: &[u8]) -> u64 {
        let mut crc = 0u64;
        for &b in data {
            crc ^= b as u64;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn crc_matches_redis_check_value() {
        // Redis's crc64 self-test: crc64(0, "123456789") == 0xe9c6d914c4b8d9ca.
        assert_eq!(crc64(0, b"123456789"), 0xe9c6_d914_c4b8_d9ca);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        assert_eq!(crc64(0, &data), crc_bitwise(&data));
        let (a, b) = data.split_at(4321);
        assert_eq!(crc64(crc64(0, a), b), crc_bitwise(&data));
    }

    fn rdb(body: &[u8]) -> Vec<u8> {
        let mut v = b"REDIS0011".to_vec();
        v.extend_from_slice(body);
        v.push(0xff);
        let c = crc64(0, &v);
        v.extend_from_slice(&c.to_le_bytes());
        v
    }

    fn check_in_pieces(data: &[u8], piece: usize) -> Result<RdbSummary, RdbError> {
        let mut c = RdbCheck::new();
        for p in data.chunks(piece) {
            c.update(p)?;
        }
        c.finish()
    }

    #[test]
    fn accepts_valid_streams_in_any_chunking() {
        let data = rdb(&[0xfe, 0, 0xfb, 1, 0, 0, 1, b'k', 1, b'v']);
        for piece in [1, 2, 3, 7, 8, 9, 64] {
            let s = check_in_pieces(&data, piece).expect("valid");
            assert_eq!(s.version, 11);
            assert_eq!(s.size, data.len() as u64);
            assert!(s.checksummed);
        }
    }

    #[test]
    fn rejects_bad_streams() {
        let data = rdb(b"some keys");
        let mut flipped = data.clone();
        flipped[12] ^= 1;
        assert!(matches!(
            check_in_pieces(&flipped, 5),
            Err(RdbError::Checksum { .. })
        ));
        assert_eq!(
            check_in_pieces(&data[..data.len() - 3], 4),
            Err(RdbError::NoEof)
        );
        assert!(matches!(
            check_in_pieces(b"HTTP/1.1 200 OK\r\n\r\nhello world", 4),
            Err(RdbError::BadMagic(_))
        ));
        assert_eq!(check_in_pieces(b"REDIS0011", 4), Err(RdbError::TooShort(9)));
        // rdbchecksum no: a zero trailer is accepted and reported.
        let mut unchecked = data[..data.len() - 8].to_vec();
        unchecked.extend_from_slice(&[0; 8]);
        assert!(!check_in_pieces(&unchecked, 3).expect("valid").checksummed);
    }
}

/// The checker against truncated and altered payloads, fed in any split.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn rdb(version: u32, body: &[u8]) -> Vec<u8> {
        let mut v = format!("REDIS{version:04}").into_bytes();
        v.extend_from_slice(body);
        v.push(0xff);
        let c = crc64(0, &v);
        v.extend_from_slice(&c.to_le_bytes());
        v
    }

    /// Checks `data` cut at `cuts` (positions taken modulo the length).
    fn check(data: &[u8], cuts: &[usize]) -> Result<RdbSummary, RdbError> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        let mut c = RdbCheck::new();
        for w in at.windows(2) {
            c.update(&data[w[0]..w[1]])?;
        }
        c.finish()
    }

    proptest! {
        #[test]
        fn valid_streams_pass_in_any_split(
            version in 1u32..13,
            body in prop::collection::vec(any::<u8>(), 0..4000),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let data = rdb(version, &body);
            let s = check(&data, &cuts).expect("valid RDB");
            prop_assert_eq!(s, RdbSummary { version, size: data.len() as u64, checksummed: true });
        }

        #[test]
        fn truncated_streams_are_rejected(
            body in prop::collection::vec(any::<u8>(), 0..4000),
            cut in any::<usize>(),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let data = rdb(11, &body);
            let len = cut % data.len();
            let short = &data[..len];
            // A zero trailer means `rdbchecksum no`; a cut that happens to end
            // in 0xff and eight zero bytes is indistinguishable from that.
            let unchecked = len >= 9 && short[len - 9] == 0xff && short[len - 8..].iter().all(|&b| b == 0);
            prop_assume!(!unchecked);
            prop_assert!(check(short, &cuts).is_err(), "{} of {} bytes accepted", len, data.len());
        }

        #[test]
        fn altered_streams_are_rejected(
            body in prop::collection::vec(any::<u8>(), 0..4000),
            at in any::<usize>(),
            x in 1u8..=255,
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut data = rdb(11, &body);
            let i = at % data.len();
            data[i] ^= x;
            let n = data.len();
            // Only a trailer altered to all zeros reads as `rdbchecksum no`.
            prop_assume!(data[n - 8..].iter().any(|&b| b != 0));
            prop_assert!(check(&data, &cuts).is_err(), "byte {} ^ {:#x} accepted", i, x);
        }
    }
}
