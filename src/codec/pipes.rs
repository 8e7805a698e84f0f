//! Channel-backed readers and writers that connect the blocking zstd/age
//! stages to the async side with bounded memory.

use super::*;

/// Writes chunks into the stage-2 channel.
pub(super) struct StageWriter {
    pub(super) tx: SyncSender<Stage>,
    pub(super) buf: Vec<u8>,
}

impl Write for StageWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx
                .send(Stage::Data(chunk))
                .map_err(|_| io::Error::other("encoder stage 2 stopped"))?;
        }
        Ok(())
    }
}

/// Writes chunks to the async output channel.
pub(super) struct OutWriter {
    pub(super) tx: mpsc::Sender<io::Result<Bytes>>,
    pub(super) buf: Vec<u8>,
    pub(super) written: u64,
}

impl Write for OutWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx
                .blocking_send(Ok(Bytes::from(chunk)))
                .map_err(|_| io::Error::other("output consumer stopped"))?;
        }
        Ok(())
    }
}

/// Blocking reader over the async input channel; remembers transport errors so
/// they are reported as such, not as corruption.
pub(super) struct ChanReader {
    pub(super) rx: mpsc::Receiver<io::Result<Bytes>>,
    pub(super) cur: Bytes,
    pub(super) read: u64,
    pub(super) input_error: Option<io::Error>,
}

impl ChanReader {
    /// A reader fed from `input` by a task on the runtime.
    pub(super) fn feed(mut input: ByteStream) -> ChanReader {
        let (in_tx, in_rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
        tokio::spawn(async move {
            while let Some(item) = input.next().await {
                if in_tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        ChanReader {
            rx: in_rx,
            cur: Bytes::new(),
            read: 0,
            input_error: None,
        }
    }
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.input_error.is_some() {
                return Err(io::Error::other("input failed"));
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    self.input_error = Some(e);
                    return Err(io::Error::other("input failed"));
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        self.read += n as u64;
        Ok(n)
    }
}

impl BufRead for ChanReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    self.input_error = Some(e);
                    return Err(io::Error::other("input failed"));
                }
                None => break,
            }
        }
        Ok(&self.cur)
    }
    fn consume(&mut self, n: usize) {
        let _ = self.cur.split_to(n);
        self.read += n as u64;
    }
}
