//! A push parser for the ustar archives `BASE_BACKUP` streams. Headers and
//! file bodies arrive split across messages at arbitrary points, so the
//! parser keeps its place between calls and never buffers a file body.

use super::super::PgError;

const BLOCK: usize = 512;

/// An archive member, announced before its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEntry {
    /// A directory.
    Dir {
        /// Path inside the archive, without a trailing `/`.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file; its bytes follow through [`TarSink::data`].
    File {
        /// Path inside the archive.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Bytes that follow.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the archive.
        path: String,
        /// Where it points.
        target: String,
    },
}

/// Receives what the parser finds, in archive order.
pub(crate) trait TarSink {
    /// A new member; for a file, its bytes follow, then [`TarSink::file_end`].
    fn entry(&mut self, e: TarEntry) -> Result<(), PgError>;
    /// The next bytes of the current file.
    fn data(&mut self, data: &[u8]) -> Result<(), PgError>;
    /// The current file is complete.
    fn file_end(&mut self) -> Result<(), PgError>;
}

enum State {
    Header,
    Body {
        left: u64,
        pad: usize,
    },
    /// A GNU long-name or pax extended header body being collected.
    Meta {
        kind: u8,
        buf: Vec<u8>,
        left: usize,
        pad: usize,
    },
    Pad(usize),
    /// The end-of-archive zero block was seen.
    End,
}

/// Parser state for one archive.
pub(crate) struct TarParser {
    name: String,
    header: Vec<u8>,
    state: State,
    long_name: Option<String>,
    long_link: Option<String>,
}

fn bad(archive: &str, what: impl std::fmt::Display) -> PgError {
    PgError::Other(format!("BASE_BACKUP archive {archive}: {what}"))
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// A NUL-terminated (or full-width) text field.
fn field(h: &[u8]) -> String {
    let end = h.iter().position(|&b| b == 0).unwrap_or(h.len());
    String::from_utf8_lossy(&h[..end]).into_owned()
}

/// A numeric field: octal text, or base-256 when the high bit is set (how
/// PostgreSQL writes sizes of 8 GiB and more).
fn number(h: &[u8]) -> Option<u64> {
    if h.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(h[0] & 0x7f);
        for &b in &h[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s = field(h);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn clean_path(p: &str) -> String {
    let p = p.strip_prefix("./").unwrap_or(p);
    p.trim_end_matches('/').to_string()
}

impl TarParser {
    /// A parser for the archive called `name` (used in errors).
    pub(crate) fn new(name: &str) -> TarParser {
        TarParser {
            name: name.to_string(),
            header: Vec::with_capacity(BLOCK),
            state: State::Header,
            long_name: None,
            long_link: None,
        }
    }

    /// Feeds the next bytes of the archive.
    pub(crate) fn feed(&mut self, mut data: &[u8], sink: &mut impl TarSink) -> Result<(), PgError> {
        while !data.is_empty() {
            match &mut self.state {
                State::End => {
                    // Zero blocks after the end marker; anything else is junk.
                    if data.iter().any(|&b| b != 0) {
                        return Err(bad(&self.name, "data after the end of the archive"));
                    }
                    return Ok(());
                }
                State::Pad(n) => {
                    let take = (*n).min(data.len());
                    *n -= take;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Body { left, pad } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    sink.data(&data[..take])?;
                    *left -= take as u64;
                    data = &data[take..];
                    if *left == 0 {
                        let pad = *pad;
                        sink.file_end()?;
                        self.state = if pad > 0 {
                            State::Pad(pad)
                        } else {
                            State::Header
                        };
                    }
                }
                State::Meta {
                    kind,
                    buf,
                    left,
                    pad,
                } => {
                    let take = (*left).min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    *left -= take;
                    data = &data[take..];
                    if *left == 0 {
                        let (kind, buf, pad) = (*kind, std::mem::take(buf), *pad);
                        self.meta_done(kind, &buf);
                        self.state = if pad > 0 {
                            State::Pad(pad)
                        } else {
                            State::Header
                        };
                    }
                }
                State::Header => {
                    let take = (BLOCK - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.header.len() == BLOCK {
                        let h = std::mem::replace(&mut self.header, Vec::with_capacity(BLOCK));
                        self.header(&h, sink)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that the archive ended between members (PostgreSQL omits the
    /// two zero blocks that end a standard tar file).
    pub(crate) fn finish(&self) -> Result<(), PgError> {
        match self.state {
            State::End => Ok(()),
            State::Header if self.header.is_empty() => Ok(()),
            _ => Err(bad(
                &self.name,
                "the archive ended inside a member (truncated stream)",
            )),
        }
    }

    fn meta_done(&mut self, kind: u8, buf: &[u8]) {
        match kind {
            b'L' => self.long_name = Some(field(buf)),
            b'K' => self.long_link = Some(field(buf)),
            b'x' => {
                // pax records: "<len> <key>=<value>\n".
                let mut rest = buf;
                while let Some(sp) = rest.iter().position(|&b| b == b' ') {
                    let Some(len) = std::str::from_utf8(&rest[..sp])
                        .ok()
                        .and_then(|l| l.parse::<usize>().ok())
                        .filter(|&l| l > sp + 1 && l <= rest.len())
                    else {
                        break;
                    };
                    let rec = &rest[sp + 1..len];
                    let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
                    if let Some(eq) = rec.iter().position(|&b| b == b'=') {
                        let value = String::from_utf8_lossy(&rec[eq + 1..]).into_owned();
                        match &rec[..eq] {
                            b"path" => self.long_name = Some(value),
                            b"linkpath" => self.long_link = Some(value),
                            _ => {}
                        }
                    }
                    rest = &rest[len..];
                }
            }
            _ => {}
        }
    }

    fn header(&mut self, h: &[u8], sink: &mut impl TarSink) -> Result<(), PgError> {
        if h.iter().all(|&b| b == 0) {
            self.state = State::End;
            return Ok(());
        }
        let stored =
            number(&h[148..156]).ok_or_else(|| bad(&self.name, "bad header checksum field"))?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(bad(&self.name, "header checksum mismatch (corrupt stream)"));
        }
        let mut name = field(&h[0..100]);
        // The prefix field is POSIX ustar's ("ustar\0", as PostgreSQL
        // writes); old GNU headers ("ustar  \0") keep times there.
        if &h[257..263] == b"ustar\0" {
            let prefix = field(&h[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let mode =
            number(&h[100..108]).ok_or_else(|| bad(&self.name, "bad mode field"))? as u32 & 0o7777;
        let size = number(&h[124..136]).ok_or_else(|| bad(&self.name, "bad size field"))?;
        let kind = h[156];
        // A long name and a long link arrive as two extended headers in a
        // row: the second must not consume what the first announced.
        let (path, link) = if matches!(kind, b'L' | b'K' | b'x' | b'g') {
            (String::new(), String::new())
        } else {
            (
                clean_path(&self.long_name.take().unwrap_or(name)),
                self.long_link.take().unwrap_or_else(|| field(&h[157..257])),
            )
        };
        match kind {
            b'0' | 0 | b'7' => {
                sink.entry(TarEntry::File { path, mode, size })?;
                if size == 0 {
                    sink.file_end()?;
                    self.state = State::Header;
                } else {
                    self.state = State::Body {
                        left: size,
                        pad: padding(size),
                    };
                }
            }
            b'5' => {
                sink.entry(TarEntry::Dir { path, mode })?;
                self.state = State::Header;
            }
            b'2' => {
                sink.entry(TarEntry::Symlink { path, target: link })?;
                self.state = State::Header;
            }
            b'L' | b'K' | b'x' | b'g' => {
                let left = usize::try_from(size)
                    .ok()
                    .filter(|&s| s <= 1 << 20)
                    .ok_or_else(|| bad(&self.name, "extended header too large"))?;
                self.state = if left == 0 {
                    State::Header
                } else {
                    State::Meta {
                        kind,
                        buf: Vec::with_capacity(left),
                        left,
                        pad: padding(size),
                    }
                };
            }
            other => {
                return Err(bad(
                    &self.name,
                    format!("unsupported member type {:?} for {path}", other as char),
                ));
            }
        }
        Ok(())
    }
}

/// What a sink saw, in order: an entry and, for a file, its bytes; it
/// panics if the parser breaks its contract with the sink.
#[derive(Default)]
struct Seen {
    members: Vec<(TarEntry, Vec<u8>)>,
    open: bool,
}
impl TarSink for Seen {
    fn entry(&mut self, e: TarEntry) -> Result<(), PgError> {
        assert!(!self.open, "entry inside a file");
        self.open = matches!(e, TarEntry::File { .. });
        self.members.push((e, Vec::new()));
        Ok(())
    }
    fn data(&mut self, data: &[u8]) -> Result<(), PgError> {
        assert!(self.open, "data outside a file");
        if let Some((_, body)) = self.members.last_mut() {
            body.extend_from_slice(data);
        }
        Ok(())
    }
    fn file_end(&mut self) -> Result<(), PgError> {
        assert!(self.open, "file end outside a file");
        self.open = false;
        Ok(())
    }
}

/// Parses a whole archive fed in pieces cut at `cuts` (positions taken
/// modulo the length, in any order), as `BASE_BACKUP` messages would bring
/// it: every member with its body, or the parser's error. The entry point of
/// the `tar` fuzz target and of the property tests. Panics if the parser
/// breaks its own contract with the sink (data outside a file, an entry
/// inside one, a file left open after a successful finish).
pub fn read_archive(data: &[u8], cuts: &[usize]) -> Result<Vec<(TarEntry, Vec<u8>)>, PgError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    let mut p = TarParser::new("input");
    let mut seen = Seen::default();
    for w in at.windows(2) {
        p.feed(&data[w[0]..w[1]], &mut seen)?;
    }
    p.finish()?;
    assert!(!seen.open, "finish accepted an archive with a file open");
    Ok(seen.members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        entries: Vec<TarEntry>,
        files: Vec<Vec<u8>>,
        open: bool,
    }

    impl TarSink for Collect {
        fn entry(&mut self, e: TarEntry) -> Result<(), PgError> {
            assert!(!self.open);
            if matches!(e, TarEntry::File { .. }) {
                self.files.push(Vec::new());
                self.open = true;
            }
            self.entries.push(e);
            Ok(())
        }
        fn data(&mut self, data: &[u8]) -> Result<(), PgError> {
            assert!(self.open);
            if let Some(f) = self.files.last_mut() {
                f.extend_from_slice(data);
            }
            Ok(())
        }
        fn file_end(&mut self) -> Result<(), PgError> {
            assert!(self.open);
            self.open = false;
            Ok(())
        }
    }

    fn header(name: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn member(out: &mut Vec<u8>, name: &str, kind: u8, body: &[u8], link: &str) {
        out.extend(header(name, kind, body.len() as u64, link));
        out.extend_from_slice(body);
        out.extend(std::iter::repeat_n(0u8, padding(body.len() as u64)));
    }

    fn sample() -> Vec<u8> {
        let mut a = Vec::new();
        member(
            &mut a,
            "backup_label",
            b'0',
            b"START WAL LOCATION: 0/2000028\n",
            "",
        );
        member(&mut a, "base", b'5', b"", "");
        member(&mut a, "base/1/", b'5', b"", "");
        member(&mut a, "base/1/1259", b'0', &vec![7u8; 8192 * 3 + 5], "");
        member(&mut a, "empty", b'0', b"", "");
        member(&mut a, "pg_tblspc/16384", b'2', b"", "/srv/ts");
        let long = format!("{}/{}", "d".repeat(90), "f".repeat(40));
        member(
            &mut a,
            "././@LongLink",
            b'L',
            format!("{long}\0").as_bytes(),
            "",
        );
        member(&mut a, "ignored", b'0', b"xyz", "");
        let rec = format!(" path=p/{}\n", "q".repeat(80));
        let pax = format!("{}{rec}", rec.len() + 2);
        member(&mut a, "pax", b'x', pax.as_bytes(), "");
        member(&mut a, "short", b'0', b"pax!", "");
        a
    }

    fn check(c: &Collect) {
        let long = format!("{}/{}", "d".repeat(90), "f".repeat(40));
        let paths: Vec<String> = c
            .entries
            .iter()
            .map(|e| match e {
                TarEntry::Dir { path, .. } => format!("d {path}"),
                TarEntry::File { path, size, .. } => format!("f {path} {size}"),
                TarEntry::Symlink { path, target } => format!("l {path} {target}"),
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                "f backup_label 30".to_string(),
                "d base".into(),
                "d base/1".into(),
                format!("f base/1/1259 {}", 8192 * 3 + 5),
                "f empty 0".into(),
                "l pg_tblspc/16384 /srv/ts".into(),
                format!("f {long} 3"),
                format!("f p/{} 4", "q".repeat(80)),
            ]
        );
        assert_eq!(c.files[1], vec![7u8; 8192 * 3 + 5]);
        assert_eq!(c.files[3], b"xyz");
        assert_eq!(c.files[4], b"pax!");
    }

    #[test]
    fn parses_whatever_the_split() {
        let a = sample();
        for chunk in [1, 7, 511, 512, 513, 4096, a.len()] {
            let mut p = TarParser::new("base.tar");
            let mut c = Collect::default();
            for piece in a.chunks(chunk) {
                p.feed(piece, &mut c).expect("feed");
            }
            p.finish().expect("finish");
            check(&c);
        }
        // With the standard end-of-archive blocks too.
        let mut b = a.clone();
        b.extend(vec![0u8; 1024]);
        let mut p = TarParser::new("base.tar");
        let mut c = Collect::default();
        p.feed(&b, &mut c).expect("feed");
        p.finish().expect("finish");
        check(&c);
    }

    #[test]
    fn truncation_and_corruption_are_errors() {
        let a = sample();
        let mut p = TarParser::new("base.tar");
        let mut c = Collect::default();
        p.feed(&a[..BLOCK + 10], &mut c).expect("feed");
        assert!(p.finish().is_err());

        let mut b = a.clone();
        b[5] ^= 0x20;
        let mut p = TarParser::new("base.tar");
        let e = p.feed(&b, &mut Collect::default()).expect_err("corrupt");
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_gnu_header_has_no_prefix_field() {
        // GNU headers keep atime and ctime where ustar has the prefix: not
        // part of the name (the tar crate reads it so too).
        let mut h = header("name", b'0', 0, "");
        h[257..265].copy_from_slice(b"ustar  \0");
        h[345..357].copy_from_slice(b"14712345670\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut p = TarParser::new("base.tar");
        let mut c = Collect::default();
        p.feed(&h, &mut c).expect("feed");
        assert_eq!(
            c.entries,
            vec![TarEntry::File {
                path: "name".into(),
                mode: 0o600,
                size: 0
            }]
        );
    }

    #[test]
    fn base256_sizes() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 2; // 2 << 32
        assert_eq!(number(&f), Some(2 << 32));
        assert_eq!(number(b"00000001750\0"), Some(0o1750));
    }
}

/// The parser against the `tar` crate as oracle, on archives built by that
/// crate (GNU long names and links included), fed in arbitrary splits.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Member {
        Dir(String),
        File(String, u32, Vec<u8>),
        Link(String, String),
    }

    fn name() -> impl Strategy<Value = String> {
        // Up to 3 components of up to 60 characters: some paths need the
        // GNU long-name extension, most do not.
        prop::collection::vec("[a-z0-9_]{1,60}", 1..4).prop_map(|v| v.join("/"))
    }

    fn member() -> impl Strategy<Value = Member> {
        prop_oneof![
            name().prop_map(Member::Dir),
            (
                name(),
                prop::sample::select(vec![0o600u32, 0o640, 0o700, 0o755]),
                prop::collection::vec(any::<u8>(), 0..3000)
            )
                .prop_map(|(n, m, b)| Member::File(n, m, b)),
            (name(), name()).prop_map(|(n, t)| Member::Link(n, t)),
        ]
    }

    fn build(members: &[Member]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for m in members {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            match m {
                Member::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o700);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{n}/"), std::io::empty())
                        .expect("dir");
                }
                Member::File(n, mode, body) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(body.len() as u64);
                    b.append_data(&mut h, n, body.as_slice()).expect("file");
                }
                Member::Link(n, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, n, t).expect("link");
                }
            }
        }
        b.into_inner().expect("archive")
    }

    /// What the `tar` crate reads from the archive, in our terms.
    fn oracle(archive: &[u8]) -> Vec<(TarEntry, Vec<u8>)> {
        use std::io::Read;
        let mut a = tar::Archive::new(archive);
        let mut out = Vec::new();
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = clean_path(&String::from_utf8_lossy(&e.path_bytes()));
            let mode = e.header().mode().expect("mode") & 0o7777;
            let entry = match e.header().entry_type() {
                tar::EntryType::Directory => TarEntry::Dir { path, mode },
                tar::EntryType::Symlink => TarEntry::Symlink {
                    path,
                    target: String::from_utf8_lossy(&e.link_name_bytes().expect("link"))
                        .into_owned(),
                },
                _ => TarEntry::File {
                    path,
                    mode,
                    size: e.size(),
                },
            };
            let mut body = Vec::new();
            e.read_to_end(&mut body).expect("body");
            out.push((entry, body));
        }
        out
    }

    /// Feeds `data` cut at `cuts` (positions taken modulo the length).
    fn parse(data: &[u8], cuts: &[usize]) -> Result<Seen, PgError> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        let mut p = TarParser::new("test");
        let mut seen = Seen::default();
        for w in at.windows(2) {
            p.feed(&data[w[0]..w[1]], &mut seen)?;
        }
        p.finish()?;
        Ok(seen)
    }

    /// Found by the property below: the long-link header consumed the long
    /// name announced just before it, so the symlink lost its long path.
    #[test]
    fn a_long_name_and_a_long_link_both_arrive() {
        let (n, t) = ("n".repeat(100), "t".repeat(101));
        let archive = build(&[Member::Link(n.clone(), t.clone())]);
        let seen = parse(&archive, &[]).expect("valid archive");
        assert_eq!(
            seen.members,
            vec![(TarEntry::Symlink { path: n, target: t }, Vec::new())]
        );
    }

    proptest! {
        #[test]
        fn any_split_reads_what_the_tar_crate_reads(
            members in prop::collection::vec(member(), 0..8),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            end_blocks in any::<bool>(),
        ) {
            let mut archive = build(&members);
            let want = oracle(&archive);
            prop_assert_eq!(want.len(), members.len());
            if !end_blocks {
                // PostgreSQL leaves out the two zero blocks that end a tar file.
                archive.truncate(archive.len() - 2 * BLOCK);
                while archive.len() >= BLOCK && archive[archive.len() - BLOCK..].iter().all(|&b| b == 0) {
                    archive.truncate(archive.len() - BLOCK);
                }
            }
            let seen = parse(&archive, &cuts).expect("valid archive");
            prop_assert!(!seen.open);
            prop_assert_eq!(seen.members, want);
        }

        #[test]
        fn damage_never_panics_and_a_cut_inside_a_block_is_an_error(
            members in prop::collection::vec(member(), 1..6),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            flips in prop::collection::vec((any::<usize>(), 1u8..=255), 0..4),
            cut in any::<usize>(),
        ) {
            let archive = build(&members);
            let mut damaged = archive.clone();
            for (at, x) in &flips {
                let i = at % damaged.len();
                damaged[i] ^= x;
            }
            let _ = parse(&damaged, &cuts);
            // Members and their padding fill whole blocks, so a stream that
            // stops inside a block before the end blocks stopped inside a
            // member.
            let len = cut % (archive.len() - 2 * BLOCK);
            if !len.is_multiple_of(BLOCK) {
                prop_assert!(parse(&archive[..len], &cuts).is_err(), "cut at {} accepted", len);
            }
        }
    }
}
