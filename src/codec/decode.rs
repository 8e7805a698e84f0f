//! The decode path on a blocking thread: age decryption, zstd decompression
//! and hash checks, and telling a wrong key, a truncated object and a
//! flipped byte apart.

use super::*;

/// Turns a stream error back into a [`CodecError`].
pub fn into_codec_error(e: io::Error, key: &str) -> CodecError {
    if CodecError::from_io(&e).is_some() {
        match e.into_inner().map(|b| b.downcast::<CodecError>()) {
            Some(Ok(ce)) => return *ce,
            Some(Err(other)) => return CodecError::Pipeline(other.to_string()),
            None => return CodecError::Pipeline("unknown".into()),
        }
    }
    CodecError::Input {
        key: key.to_string(),
        source: e,
    }
}

pub(super) enum DecodeFail {
    Age(age::DecryptError),
    Io(io::Error),
    Hash(String),
}

pub(super) fn decode_blocking(
    reader: &mut ChanReader,
    ids: &[age::x25519::Identity],
    expect: &Expect,
    out: &mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), DecodeFail> {
    let dec = age::Decryptor::new_buffered(reader).map_err(DecodeFail::Age)?;
    let plain_reader = dec
        .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
        .map_err(DecodeFail::Age)?;
    let mut z = zstd::stream::read::Decoder::new(plain_reader).map_err(DecodeFail::Io)?;
    let mut hasher = blake3::Hasher::new();
    let mut pieces = expect.pieces.clone().map(pieces::PieceChecker::new);
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            let n = z.read(&mut buf[filled..]).map_err(DecodeFail::Io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        if expect.plain_hash.is_some() {
            hasher.update(&buf);
        }
        if let Some(c) = pieces.as_mut() {
            c.update(&buf).map_err(DecodeFail::Hash)?;
        }
        total += filled as u64;
        if out.blocking_send(Ok(Bytes::from(buf))).is_err() {
            // The consumer went away; nothing more to do.
            return Ok(());
        }
    }
    // Drain: the age stream must end exactly here (authenticates the last chunk).
    let mut age_reader = z.finish();
    let mut rest = Vec::new();
    age_reader.read_to_end(&mut rest).map_err(DecodeFail::Io)?;
    if !rest.is_empty() {
        return Err(DecodeFail::Hash(
            "trailing data after the compressed stream".into(),
        ));
    }
    if let Some(sz) = expect.plain_size
        && sz != total
    {
        return Err(DecodeFail::Hash(format!(
            "plaintext is {total} bytes, manifest says {sz}"
        )));
    }
    if let Some(c) = pieces {
        c.finish().map_err(DecodeFail::Hash)?;
    }
    if let Some(h) = &expect.plain_hash {
        let got = hasher.finalize().to_hex().to_string();
        if &got != h {
            return Err(DecodeFail::Hash(format!(
                "content hash {got} != recorded {h}"
            )));
        }
    }
    Ok(())
}

/// The one-shot form of [`decode_blocking`], for objects whose plaintext
/// size (`size`) the manifest records.
pub(super) fn decode_whole(
    reader: &mut ChanReader,
    ids: &[age::x25519::Identity],
    expect: &Expect,
    size: u64,
) -> Result<Vec<u8>, DecodeFail> {
    let dec = age::Decryptor::new_buffered(reader).map_err(DecodeFail::Age)?;
    let mut plain_reader = dec
        .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
        .map_err(DecodeFail::Age)?;
    // Reading to the end authenticates every age chunk, the last included.
    let mut compressed = Vec::new();
    plain_reader
        .read_to_end(&mut compressed)
        .map_err(DecodeFail::Io)?;
    let capacity = usize::try_from(size)
        .map_err(|_| DecodeFail::Hash(format!("manifest size {size} does not fit in memory")))?;
    // A frame that decodes to more than the manifest says fails here, before
    // anything beyond `size` is allocated.
    let out = zstd::bulk::decompress(&compressed, capacity).map_err(|e| {
        DecodeFail::Hash(format!(
            "compressed stream does not decode to the {size} bytes the manifest records: {e}"
        ))
    })?;
    if out.len() as u64 != size {
        return Err(DecodeFail::Hash(format!(
            "plaintext is {} bytes, manifest says {size}",
            out.len()
        )));
    }
    if let Some(p) = &expect.pieces {
        let mut c = pieces::PieceChecker::new(p.clone());
        c.update(&out)
            .and_then(|()| c.finish())
            .map_err(DecodeFail::Hash)?;
    }
    if let Some(h) = &expect.plain_hash {
        let got = blake3::hash(&out).to_hex().to_string();
        if &got != h {
            return Err(DecodeFail::Hash(format!(
                "content hash {got} != recorded {h}"
            )));
        }
    }
    Ok(out)
}

/// Maps a low-level failure to what the user needs to know: wrong key, truncated,
/// corrupt, foreign, or an input (transport) problem.
pub(super) fn classify(
    f: DecodeFail,
    reader: &mut ChanReader,
    expect: &Expect,
    key: &str,
) -> CodecError {
    if let Some(e) = reader.input_error.take() {
        return CodecError::Input {
            key: key.to_string(),
            source: e,
        };
    }
    // Count what is left so truncation can be told from corruption.
    let mut sink = [0u8; 64 * 1024];
    while let Ok(n) = reader.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    let got = reader.read;
    let short = expect.stored_size.is_some_and(|s| got < s);
    let truncated = || CodecError::Truncated {
        key: key.to_string(),
        got,
        expected: expect.stored_size.unwrap_or(0),
    };
    let corrupt = |what: String| CodecError::Corrupt {
        key: key.to_string(),
        what,
    };
    match f {
        DecodeFail::Age(age::DecryptError::NoMatchingKeys) => CodecError::WrongKey {
            key: key.to_string(),
        },
        DecodeFail::Age(age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat) => {
            CodecError::Foreign {
                key: key.to_string(),
            }
        }
        _ if short => truncated(),
        DecodeFail::Age(age::DecryptError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            if got == 0 {
                corrupt("object is empty".into())
            } else {
                truncated()
            }
        }
        DecodeFail::Age(e) => corrupt(format!("age header: {e}")),
        DecodeFail::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => truncated(),
        DecodeFail::Io(e) => corrupt(format!("authentication failed: {e}")),
        DecodeFail::Hash(what) => corrupt(what),
    }
}
