//! Streamed pieces of a WAL segment: `wal-stream` stores each flushed range
//! as its own write-once object (or, in synchronous mode on filesystem
//! regions, appends it to the segment's journal), and a fetch assembles the
//! longest run from the segment's start out of the fewest of them.

use bytes::Bytes;
use futures::StreamExt;

use super::{PgError, WAL_SEGMENT_SIZE};
use crate::codec::Expect;
use crate::repo::Repository;
use crate::repo::layout::WalSuffix;
use crate::store::ObjectInfo;

/// What one streamed object holds: a piece not yet fetched, or a
/// journal's bytes (read whole to learn where it ends).
enum Held {
    Piece { key: String, stored: u64 },
    Read(Bytes),
}

/// The streamed pieces and journals of the segment whose keys start with
/// `seg_prefix` (`…/<segment>`) in `listed`, that cover the segment from its
/// start, assembled and zero-padded to a whole segment, with the number of
/// bytes streamed; `None` when nothing starts at 0. A journal that cannot
/// be read fails the fetch: what it holds may reach further than the rest.
pub(crate) async fn streamed_segment(
    repo: &Repository,
    seg_prefix: &str,
    listed: &[ObjectInfo],
) -> Result<Option<(Vec<u8>, usize)>, PgError> {
    let mut held: Vec<(u32, u32, Held)> = Vec::new();
    for o in listed {
        let Some((suffix, hash)) = o
            .key
            .strip_prefix(seg_prefix)
            .and_then(|rest| rest.rsplit_once('-'))
        else {
            continue;
        };
        if hash.len() != 64 {
            continue;
        }
        match WalSuffix::parse(suffix) {
            Some(WalSuffix::Stream { start, end }) => {
                let piece = Held::Piece {
                    key: o.key.clone(),
                    stored: o.size,
                };
                held.push((start, end, piece));
            }
            Some(WalSuffix::Journal { .. }) => {
                let j = repo.read_journal(&o.key).await?;
                if !j.data.is_empty() {
                    held.push((j.start, j.end(), Held::Read(Bytes::from(j.data))));
                }
            }
            _ => {}
        }
    }
    let ranges: Vec<(u32, u32)> = held.iter().map(|p| (p.0, p.1)).collect();
    let needed = cover(&ranges);
    if needed.is_empty() {
        return Ok(None);
    }
    let mut chosen: Vec<Option<(u32, u32, Held)>> = held.into_iter().map(Some).collect();
    let chain: Vec<(u32, u32, Held)> = needed
        .into_iter()
        .filter_map(|i| chosen[i].take())
        .collect();
    let fetched: Vec<Result<(u32, u32, Bytes), PgError>> = futures::stream::iter(chain)
        .map(|(start, end, held)| async move {
            let (key, stored) = match held {
                Held::Read(data) => return Ok((start, end, data)),
                Held::Piece { key, stored } => (key, stored),
            };
            let expect = Expect {
                plain_hash: key.rsplit('-').next().map(str::to_string),
                key,
                stored_size: Some(stored),
                plain_size: Some(u64::from(end - start)),
                pieces: None,
            };
            let (_, data) = repo.get_verified(&expect.key.clone(), expect).await?;
            Ok((start, end, data))
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let pieces = fetched.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut data = assemble(pieces);
    let streamed = data.len();
    data.resize(WAL_SEGMENT_SIZE as usize, 0);
    Ok(Some((data, streamed)))
}

/// Assembles a segment from streamed pieces: the longest run from offset 0
/// that the pieces cover, each piece `(start, end, bytes)`. The caller pads
/// the rest with zeros, which recovery reads as the end of WAL.
pub fn assemble(pieces: Vec<(u32, u32, Bytes)>) -> Vec<u8> {
    let ranges: Vec<(u32, u32)> = pieces.iter().map(|p| (p.0, p.1)).collect();
    let mut out: Vec<u8> = Vec::new();
    for i in cover(&ranges) {
        let (s, _, data) = &pieces[i];
        let covered = out.len() as u32;
        out.extend_from_slice(&data[(covered - s) as usize..]);
    }
    out
}

/// The pieces (indices into `ranges`, `[start, end)` each) that cover the
/// longest run from offset 0, fewest first-to-last: a synchronous stream
/// stores many overlapping pieces per segment, and a fetch needs only these.
pub fn cover(ranges: &[(u32, u32)]) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut covered = 0u32;
    loop {
        // Of the pieces starting at or before the covered end, the one
        // reaching furthest.
        let best = ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| r.0 <= covered && r.1 > covered)
            .max_by_key(|(_, r)| r.1);
        let Some((i, r)) = best else {
            return chain;
        };
        chain.push(i);
        covered = r.1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_assemble_into_the_longest_prefix() {
        let seg: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let piece = |a: u32, b: u32| (a, b, Bytes::copy_from_slice(&seg[a as usize..b as usize]));
        // Overlapping pieces, as rebasing and reconnects produce them.
        let got = assemble(vec![
            piece(300, 700),
            piece(0, 100),
            piece(0, 250),
            piece(250, 400),
            piece(900, 1000),
        ]);
        assert_eq!(got, seg[..700]);
        // Only the pieces needed: 0..250, 250..400, 300..700.
        let ranges = [(300, 700), (0, 100), (0, 250), (250, 400), (900, 1000)];
        assert_eq!(cover(&ranges), vec![2, 3, 0]);
        // Nothing from offset 0: nothing usable.
        assert!(assemble(vec![piece(10, 20)]).is_empty());
    }
}
