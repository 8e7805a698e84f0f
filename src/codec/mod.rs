//! Streaming codec: plaintext → BLAKE3 → zstd → age, and back.
//!
//! Encoding runs as a two-stage pipeline on blocking threads (hash + zstd in one,
//! age in the other) joined by bounded channels, so the async reactor never does
//! CPU work and memory stays bounded whatever the object size. A stream is only
//! finished cleanly when every stage finished cleanly: a failing input turns into
//! an error item on the output, so a store never commits a truncated object.

use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::store::{ByteStream, channel_stream};

mod decode;
mod journal;
mod pieces;
mod pipes;
#[cfg(test)]
mod tests;

pub use decode::into_codec_error;
use decode::*;
pub use journal::{JournalRead, JournalWriter, RECORD_OVERHEAD};
pub use pieces::{PieceHash, normalize as normalize_pieces, piece_hash};
use pipes::*;

/// Size of the chunks passed between pipeline stages.
const CHUNK: usize = 1 << 20;
/// Bounded depth of each inter-stage channel.
const DEPTH: usize = 4;
/// Objects at least this large (or of unknown size) may use multithreaded zstd.
const MT_THRESHOLD: u64 = 4 << 20;
/// Below this level, zstd's multithreaded mode costs more in job hand-off than
/// it gains (measured: level 3 single-threaded 0.38 s/GiB vs 0.60 s with two
/// workers), and the pipeline already keeps a second core busy with age.
const MT_MIN_LEVEL: i32 = 6;

/// What decoding an object can fail with. Each case says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// None of the configured identities can open the object.
    #[error(
        "{key}: none of the configured age identities can decrypt this object; it was \
         encrypted to other recipients (check identity_file, or the repository's recipients)"
    )]
    WrongKey {
        /// Object key.
        key: String,
    },
    /// The object is shorter than recorded.
    #[error(
        "{key}: object is truncated ({got} of {expected} bytes); read it from another region or run `dr repo sync`"
    )]
    Truncated {
        /// Object key.
        key: String,
        /// Bytes present.
        got: u64,
        /// Bytes expected ("unknown" shown as 0).
        expected: u64,
    },
    /// The object fails authentication or its content hash.
    #[error("{key}: object is corrupt ({what}); read it from another region or run `dr repo sync`")]
    Corrupt {
        /// Object key.
        key: String,
        /// Which check failed.
        what: String,
    },
    /// The object is not an age-encrypted `dr` object at all.
    #[error("{key}: not a dr repository object (no age header); was something else written here?")]
    Foreign {
        /// Object key.
        key: String,
    },
    /// Decryption is needed but no identity is configured.
    #[error(
        "no identity configured: set [repository] identity_file (restores need the private key)"
    )]
    NoIdentity,
    /// Decryption is needed but the configured identity cannot be used.
    #[error("{0}")]
    IdentityUnusable(String),
    /// The input stream failed (e.g. the store connection dropped).
    #[error("{key}: reading failed: {source}")]
    Input {
        /// Object key.
        key: String,
        /// Cause.
        source: io::Error,
    },
    /// Internal failure in the pipeline (a thread died).
    #[error("codec pipeline failed: {0}")]
    Pipeline(String),
}

impl CodecError {
    /// Extracts a codec error carried inside an `io::Error` on a stream.
    pub fn from_io(e: &io::Error) -> Option<&CodecError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<CodecError>())
    }
}

/// Result of encoding one object, recorded in manifests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Encoded {
    /// Plaintext bytes.
    pub plain_size: u64,
    /// BLAKE3 of the plaintext, hex.
    pub plain_hash: String,
    /// Bytes stored (ciphertext).
    pub stored_size: u64,
}

/// What a reader expects of an object; every known field is checked.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Object key (for messages).
    pub key: String,
    /// Stored size, to tell truncation from corruption.
    pub stored_size: Option<u64>,
    /// Plaintext BLAKE3, hex.
    pub plain_hash: Option<String>,
    /// Plaintext size.
    pub plain_size: Option<u64>,
    /// Hashed ranges of the plaintext, sorted and non-overlapping (see
    /// [`normalize_pieces`]): for objects recorded without a whole-object
    /// hash, every range the reader uses is checked instead.
    pub pieces: Option<Arc<[PieceHash]>>,
}

impl Expect {
    /// Expectations from a manifest entry.
    pub fn from_encoded(key: &str, e: &Encoded) -> Expect {
        Expect {
            key: key.to_string(),
            stored_size: Some(e.stored_size),
            plain_hash: Some(e.plain_hash.clone()),
            plain_size: Some(e.plain_size),
            pieces: None,
        }
    }
}

/// Encoder/decoder configured with the repository's keys.
#[derive(Clone)]
pub struct Codec {
    recipients: Arc<Vec<age::x25519::Recipient>>,
    identities: Option<Arc<Vec<age::x25519::Identity>>>,
    /// Why a configured identity is not loaded (e.g. its file is too open):
    /// reported only when decryption is needed, so WAL archiving and backups,
    /// which encrypt to public keys, keep running.
    unusable: Option<Arc<str>>,
    level: i32,
    workers: u32,
}

/// Resolves to the encoding result once the output stream has ended.
pub type EncodeResult = oneshot::Receiver<Result<Encoded, CodecError>>;

enum Stage {
    Data(Vec<u8>),
    End { plain_size: u64, plain_hash: String },
}

impl Codec {
    /// A codec that encrypts to `recipients` and, if given, decrypts with `identities`.
    pub fn new(
        recipients: Vec<age::x25519::Recipient>,
        identities: Option<Vec<age::x25519::Identity>>,
        level: i32,
    ) -> Codec {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        Codec {
            recipients: Arc::new(recipients),
            identities: identities.map(Arc::new),
            unusable: None,
            level,
            workers,
        }
    }

    /// The same codec, unable to decrypt because of `why` (a configured
    /// identity that could not be loaded).
    pub fn with_unusable_identity(self, why: String) -> Codec {
        Codec {
            identities: None,
            unusable: Some(why.into()),
            ..self
        }
    }

    /// Why this codec cannot decrypt, worded for the user (with the fix).
    pub fn cannot_decrypt_because(&self) -> String {
        self.no_identity_error().to_string()
    }

    fn no_identity_error(&self) -> CodecError {
        match &self.unusable {
            Some(why) => CodecError::IdentityUnusable(why.to_string()),
            None => CodecError::NoIdentity,
        }
    }

    /// The same keys with another compression level.
    pub fn with_level(&self, level: i32) -> Codec {
        Codec {
            level,
            ..self.clone()
        }
    }

    /// True when this codec can decrypt.
    pub fn can_decrypt(&self) -> bool {
        self.identities.is_some()
    }

    /// Encodes a plaintext stream. Returns the stored-form stream (hand it to a
    /// store) and a receiver for the sizes and hash, ready once the stream ends.
    /// `size_hint` selects single- or multi-threaded compression; it need not be
    /// exact (files being backed up can change size while they are read).
    pub fn encode(
        &self,
        mut input: ByteStream,
        size_hint: Option<u64>,
    ) -> (ByteStream, EncodeResult) {
        let (in_tx, mut in_rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
        let (mid_tx, mid_rx) = sync_channel::<Stage>(DEPTH);
        let (out_tx, out_rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
        let (done_tx, done_rx) = oneshot::channel();

        tokio::spawn(async move {
            while let Some(item) = input.next().await {
                if in_tx.send(item).await.is_err() {
                    break;
                }
            }
        });

        let level = self.level;
        let workers = match size_hint {
            Some(n) if n < MT_THRESHOLD => 0,
            _ if level < MT_MIN_LEVEL => 0,
            _ => self.workers,
        };
        let out_err = out_tx.clone();
        // Stage 1: hash + compress.
        tokio::task::spawn_blocking(move || {
            let res = (|| -> io::Result<()> {
                let mut hasher = blake3::Hasher::new();
                let mut plain = 0u64;
                let sink = StageWriter {
                    tx: mid_tx.clone(),
                    buf: Vec::with_capacity(CHUNK),
                };
                let mut enc = zstd::stream::write::Encoder::new(sink, level)?;
                if workers > 1 {
                    enc.multithread(workers)?;
                }
                while let Some(item) = in_rx.blocking_recv() {
                    let chunk = item?;
                    hasher.update(&chunk);
                    plain += chunk.len() as u64;
                    enc.write_all(&chunk)?;
                }
                let mut sink = enc.finish()?;
                sink.flush()?;
                mid_tx
                    .send(Stage::End {
                        plain_size: plain,
                        plain_hash: hasher.finalize().to_hex().to_string(),
                    })
                    .map_err(|_| io::Error::other("encoder stage 2 stopped"))?;
                Ok(())
            })();
            if let Err(e) = res {
                // Stage 2 sees the channel close without End and fails the output.
                let _ = out_err.blocking_send(Err(e));
            }
        });

        // Stage 2: encrypt.
        let recipients = self.recipients.clone();
        tokio::task::spawn_blocking(move || {
            let res = (|| -> Result<Encoded, io::Error> {
                let enc = age::Encryptor::with_recipients(
                    recipients.iter().map(|r| r as &dyn age::Recipient),
                )
                .map_err(|e| io::Error::other(format!("age: {e}")))?;
                let sink = OutWriter {
                    tx: out_tx.clone(),
                    buf: Vec::with_capacity(CHUNK),
                    written: 0,
                };
                let mut w = enc.wrap_output(sink)?;
                loop {
                    match mid_rx.recv() {
                        Ok(Stage::Data(d)) => w.write_all(&d)?,
                        Ok(Stage::End {
                            plain_size,
                            plain_hash,
                        }) => {
                            let mut sink = w.finish()?;
                            sink.flush()?;
                            return Ok(Encoded {
                                plain_size,
                                plain_hash,
                                stored_size: sink.written,
                            });
                        }
                        Err(_) => {
                            return Err(io::Error::other("input ended without completing"));
                        }
                    }
                }
            })();
            match res {
                Ok(enc) => {
                    drop(out_tx);
                    let _ = done_tx.send(Ok(enc));
                }
                Err(e) => {
                    let msg = e.to_string();
                    let _ = out_tx.blocking_send(Err(e));
                    let _ = done_tx.send(Err(CodecError::Pipeline(msg)));
                }
            }
        });
        (channel_stream(out_rx), done_rx)
    }

    /// Encodes an in-memory buffer (packs, WAL segments, manifests) in one
    /// blocking task: one-shot zstd over the whole buffer avoids the streaming
    /// encoder's window copies, and there are no channel hand-offs.
    /// `known_hash` is the plaintext BLAKE3 when the caller already computed it,
    /// or a marker when the manifest checks the object by other hashes.
    pub async fn encode_bytes(
        &self,
        data: Bytes,
        known_hash: Option<String>,
    ) -> Result<(Bytes, Encoded), CodecError> {
        let level = self.level;
        let recipients = self.recipients.clone();
        tokio::task::spawn_blocking(move || -> Result<(Bytes, Encoded), CodecError> {
            let fail = |e: &dyn std::fmt::Display| CodecError::Pipeline(e.to_string());
            let plain_hash = known_hash.unwrap_or_else(|| blake3::hash(&data).to_hex().to_string());
            let compressed = zstd::bulk::compress(&data, level).map_err(|e| fail(&e))?;
            let enc = age::Encryptor::with_recipients(
                recipients.iter().map(|r| r as &dyn age::Recipient),
            )
            .map_err(|e| fail(&e))?;
            let mut out = Vec::with_capacity(compressed.len() + 1024);
            let mut w = enc.wrap_output(&mut out).map_err(|e| fail(&e))?;
            w.write_all(&compressed).map_err(|e| fail(&e))?;
            w.finish().map_err(|e| fail(&e))?;
            let stored_size = out.len() as u64;
            Ok((
                Bytes::from(out),
                Encoded {
                    plain_size: data.len() as u64,
                    plain_hash,
                    stored_size,
                },
            ))
        })
        .await
        .map_err(|e| CodecError::Pipeline(e.to_string()))?
    }

    /// Decodes a stored-form stream into plaintext, checking every expectation.
    /// Errors arrive as an `io::Error` item wrapping a [`CodecError`].
    pub fn decode(&self, input: ByteStream, expect: Expect) -> ByteStream {
        let (out_tx, out_rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
        let Some(ids) = self.identities.clone() else {
            let e = self.no_identity_error();
            return Box::pin(futures::stream::once(async { Err(io::Error::other(e)) }));
        };
        let mut reader = ChanReader::feed(input);
        let key = expect.key.clone();
        tokio::task::spawn_blocking(move || {
            let res = decode_blocking(&mut reader, &ids, &expect, &out_tx);
            if let Err(e) = res {
                let e = classify(e, &mut reader, &expect, &key);
                let _ = out_tx.blocking_send(Err(io::Error::other(e)));
            }
        });
        channel_stream(out_rx)
    }

    /// Decodes a whole (small) object into memory. With the plaintext size
    /// known, the object is decrypted whole and decompressed in one shot into
    /// a buffer of that size: no zeroed chunks, no reassembly copy.
    pub async fn decode_bytes(
        &self,
        input: ByteStream,
        expect: Expect,
    ) -> Result<Bytes, CodecError> {
        let key = expect.key.clone();
        let (Some(ids), Some(size)) = (self.identities.clone(), expect.plain_size) else {
            return crate::store::collect(self.decode(input, expect))
                .await
                .map_err(|e| into_codec_error(e, &key));
        };
        let mut reader = ChanReader::feed(input);
        tokio::task::spawn_blocking(move || {
            decode_whole(&mut reader, &ids, &expect, size)
                .map(Bytes::from)
                .map_err(|e| classify(e, &mut reader, &expect, &key))
        })
        .await
        .map_err(|e| CodecError::Pipeline(e.to_string()))?
    }
}
