//! Integrity by pieces. A PostgreSQL data object is a concatenation of
//! blocks, and the manifest already records each block's BLAKE3 (for
//! block-incremental backups). Checking an object against those instead of
//! a whole-object hash means a backup hashes each byte once, and a reader
//! still checks every byte it uses before trusting it.

use std::sync::Arc;

/// Hex of the first 16 bytes of `data`'s BLAKE3: the hash a manifest
/// records per block.
pub fn piece_hash(data: &[u8]) -> String {
    hex::encode(&blake3::hash(data).as_bytes()[..16])
}

/// One hashed range of an object's plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceHash {
    /// Offset in the plaintext.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// [`piece_hash`] of those bytes.
    pub hash: String,
}

/// Sorts `pieces` by offset, drops empty ones and duplicates (two files may
/// reference one block), and refuses overlaps: what a reader checks.
pub fn normalize(mut pieces: Vec<PieceHash>) -> Result<Arc<[PieceHash]>, String> {
    pieces.retain(|p| p.len > 0);
    pieces.sort_by_key(|p| (p.offset, p.len));
    pieces.dedup();
    for w in pieces.windows(2) {
        if w[0].offset + w[0].len > w[1].offset {
            return Err(format!(
                "pieces at {}+{} and {}+{} overlap",
                w[0].offset, w[0].len, w[1].offset, w[1].len
            ));
        }
    }
    Ok(pieces.into())
}

/// Checks plaintext fed in order against sorted, non-overlapping pieces.
pub(super) struct PieceChecker {
    pieces: Arc<[PieceHash]>,
    next: usize,
    pos: u64,
    hasher: blake3::Hasher,
}

impl PieceChecker {
    pub(super) fn new(pieces: Arc<[PieceHash]>) -> PieceChecker {
        PieceChecker {
            pieces,
            next: 0,
            pos: 0,
            hasher: blake3::Hasher::new(),
        }
    }

    /// Feeds the next bytes of the plaintext.
    pub(super) fn update(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            let Some(p) = self.pieces.get(self.next) else {
                self.pos += data.len() as u64;
                return Ok(());
            };
            if self.pos < p.offset {
                // Bytes before the next piece: not used by this reader.
                let skip = usize::try_from(p.offset - self.pos)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.pos += skip as u64;
                data = &data[skip..];
                continue;
            }
            let left = usize::try_from(p.offset + p.len - self.pos).unwrap_or(usize::MAX);
            let take = left.min(data.len());
            self.hasher.update(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if take == left {
                let got = hex::encode(&self.hasher.finalize().as_bytes()[..16]);
                if got != p.hash {
                    return Err(format!(
                        "bytes {}..{} hash to {got}, the manifest records {}",
                        p.offset,
                        p.offset + p.len,
                        p.hash
                    ));
                }
                self.hasher.reset();
                self.next += 1;
            }
        }
        Ok(())
    }

    /// Every piece must have been seen whole.
    pub(super) fn finish(self) -> Result<(), String> {
        match self.pieces.get(self.next) {
            None => Ok(()),
            Some(p) => Err(format!(
                "plaintext ends at {} bytes, before the piece at {}..{} the manifest records",
                self.pos,
                p.offset,
                p.offset + p.len
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(data: &[u8], cuts: &[(u64, u64)]) -> Arc<[PieceHash]> {
        normalize(
            cuts.iter()
                .map(|&(o, l)| PieceHash {
                    offset: o,
                    len: l,
                    hash: piece_hash(&data[o as usize..(o + l) as usize]),
                })
                .collect(),
        )
        .expect("valid pieces")
    }

    fn check(data: &[u8], p: &Arc<[PieceHash]>, step: usize) -> Result<(), String> {
        let mut c = PieceChecker::new(p.clone());
        for chunk in data.chunks(step) {
            c.update(chunk)?;
        }
        c.finish()
    }

    #[test]
    fn every_piece_is_checked_whatever_the_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let p = pieces(&data, &[(0, 4096), (4096, 5000), (9500, 500)]);
        for step in [1, 7, 4096, 10_000] {
            check(&data, &p, step).expect("intact");
            let mut bad = data.clone();
            bad[9600] ^= 1;
            assert!(
                check(&bad, &p, step).is_err(),
                "flip in a piece, step {step}"
            );
            let mut gap = data.clone();
            gap[9200] ^= 1; // in no piece: not this reader's bytes
            check(&gap, &p, step).expect("unused bytes are not checked");
            assert!(check(&data[..9999], &p, step).is_err(), "truncated");
        }
    }

    #[test]
    fn overlapping_pieces_are_refused() {
        let p = |o, l| PieceHash {
            offset: o,
            len: l,
            hash: String::new(),
        };
        assert!(normalize(vec![p(0, 10), p(5, 10)]).is_err());
        let ok = normalize(vec![p(10, 5), p(0, 10), p(0, 10), p(20, 0)]).expect("valid");
        assert_eq!(ok.len(), 2);
    }
}
