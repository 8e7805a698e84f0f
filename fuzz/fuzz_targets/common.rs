//! Shared by the targets (included with `#[path]`): input splitting.

/// Splits fuzz input into a small header of `n` bytes and the rest.
#[allow(dead_code)]
pub fn split(data: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (data.len() >= n).then(|| data.split_at(n))
}

/// Cut positions for a push parser: every `step` bytes, shifted by
/// `offset`, so the same input is also fed in small uneven pieces.
#[allow(dead_code)]
pub fn cuts(len: usize, step: u8, offset: u8) -> Vec<usize> {
    let step = usize::from(step).max(1);
    (0..len / step + 1)
        .map(|i| i * step + usize::from(offset))
        .filter(|&c| c < len)
        .collect()
}
