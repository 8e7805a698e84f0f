//! What `dr list pg` shows, read from summaries where they exist: backups
//! from their summaries (sizes included; a manifest only for a backup whose
//! summary is older or missing), WAL from the prefix summaries, and in full
//! only the prefixes without one. The result is the whole catalog's: where a
//! listing contradicts a summary, or only the whole catalog can say (several
//! system ids, many backups without a summary, an unreadable history), the
//! whole catalog is loaded instead.

use futures::StreamExt;

use super::scoped::Tree;
use super::*;
use crate::repo::layout::{BackupSizes, MAX_SEG, TimelineId, WalPrefixSummary};

/// The catalog of one cluster with each backup's sizes, as listed.
pub struct Listed {
    /// Backups (stand-ins where a summary said all), WAL, windows, timelines.
    pub catalog: Catalog,
    /// Each backup's sizes, by id.
    pub sizes: BTreeMap<String, BackupSizes>,
    /// Whether summaries stood in for part of the history.
    pub scoped: bool,
}

/// Prefixes listed at once.
const PARALLEL_LISTINGS: usize = 16;

impl Listed {
    /// The listing, from summaries where they exist: on S3 a handful of
    /// requests however long the history.
    pub async fn load(repo: &Repository, cluster: &str) -> Result<Listed, PgError> {
        match Self::from_summaries(repo, cluster).await? {
            Some(l) => Ok(l),
            None => Self::whole(repo, cluster).await,
        }
    }

    /// The listing from every key and manifest ([`Catalog::load`]).
    pub async fn whole(repo: &Repository, cluster: &str) -> Result<Listed, PgError> {
        let catalog = Catalog::load(repo, cluster).await?;
        let sizes = catalog.backups.iter().map(|m| (m.id.clone(), sizes_of(m)));
        Ok(Listed {
            sizes: sizes.collect(),
            catalog,
            scoped: false,
        })
    }

    /// What `dr list pg --json` says of the catalog.
    pub fn to_json(&self) -> serde_json::Value {
        let cat = &self.catalog;
        let backups: Vec<_> = cat
            .backups
            .iter()
            .map(|b| {
                let z = self.sizes.get(&b.id).copied().unwrap_or(BackupSizes {
                    size: b.size,
                    stored_size: b.stored_size,
                    files: b.files.len() as u64,
                });
                serde_json::json!({
                    "id": b.id, "start_time": b.start_time, "stop_time": b.stop_time,
                    "start_lsn": b.start_lsn, "stop_lsn": b.stop_lsn, "timeline": b.timeline,
                    "size": z.size, "stored_size": z.stored_size, "files": z.files,
                })
            })
            .collect();
        serde_json::json!({
            "backups": backups,
            "wal_segments": cat.wal.len(), "windows": cat.windows,
            "timelines": cat.timelines.values().collect::<Vec<_>>(),
            "unreadable": cat.unreadable,
        })
    }

    async fn from_summaries(repo: &Repository, cluster: &str) -> Result<Option<Listed>, PgError> {
        let top = repo.regions.list_dirs(&format!("pg/{cluster}/")).await?;
        let [root] = top.dirs.as_slice() else {
            return Ok(None); // no backup at all, or several system ids
        };
        let Some((mut cat, tree)) = Catalog::index(repo, cluster, root).await? else {
            return Ok(None);
        };
        let mut sizes = tree.sizes.clone();
        if !cat.read_unsized(repo, &tree, &mut sizes).await {
            return Ok(None);
        }
        let mut listings = Vec::new();
        for (&tli, logs) in &tree.logs {
            for &log in logs {
                match tree.complete.get(&(tli, log)) {
                    Some(s) => cat.hint(&tree, tli, s),
                    None => listings.push(tree.log_prefix(tli, log)),
                }
            }
        }
        let listed: Vec<_> = futures::stream::iter(listings)
            .map(|p| async move { repo.regions.list(&p).await })
            .buffer_unordered(PARALLEL_LISTINGS)
            .collect()
            .await;
        for r in listed {
            let (_, objects) = r?;
            cat.absorb_all(&objects);
        }
        // A walk leaves an ancestor just before its switch segment, and
        // reads that segment's archive time: not a boundary of its prefix.
        let leaves: Vec<(u32, u32)> = cat
            .timelines
            .values()
            .flat_map(|t| t.path())
            .filter_map(|(t, leave)| Some((t, (leave?.0 >> 32) as u32)))
            .collect();
        for (t, log) in leaves {
            cat.materialise(repo, t, log).await;
        }
        cat.settle();
        cat.end_windows_at_last_commit(repo).await;
        if cat.hint_broken {
            tracing::warn!(%cluster, "a WAL prefix summary disagrees with its prefix's listing; listing the whole catalog");
            return Ok(None);
        }
        for b in &cat.backups {
            sizes.entry(b.id.clone()).or_insert_with(|| sizes_of(b));
        }
        Ok(Some(Listed {
            catalog: cat,
            sizes,
            scoped: true,
        }))
    }
}

fn sizes_of(m: &PgManifest) -> BackupSizes {
    BackupSizes {
        size: m.size,
        stored_size: m.stored_size,
        files: m.files.len() as u64,
    }
}

impl Catalog {
    /// Replaces the stand-ins whose summary carries no sizes (written before
    /// sizes were) by their manifests, one GET each. False when one cannot
    /// be read: missing (a summary left behind) or damaged, only the whole
    /// catalog says which, as it says it.
    async fn read_unsized(
        &mut self,
        repo: &Repository,
        tree: &Tree,
        sizes: &mut BTreeMap<String, BackupSizes>,
    ) -> bool {
        let without: Vec<String> = self
            .backups
            .iter()
            .filter(|b| tree.stand_ins.contains(&b.id) && !sizes.contains_key(&b.id))
            .map(|b| format!("{}backups/{}/manifest", tree.root, b.id))
            .collect();
        let read: Vec<(String, Result<PgManifest, PgError>)> = futures::stream::iter(without)
            .map(|key| async move {
                let m = read_manifest_sized(repo, &key, None).await;
                (key, m)
            })
            .buffered(8)
            .collect()
            .await;
        for (key, r) in read {
            let id = key
                .trim_end_matches("/manifest")
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            self.backups.retain(|b| b.id != id);
            match r {
                Ok(m) => {
                    sizes.insert(id, sizes_of(&m));
                    self.backups.push(m);
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "manifest unreadable; listing the whole catalog");
                    return false;
                }
            }
        }
        true
    }

    /// Files every listed WAL object.
    fn absorb_all(&mut self, objects: &[crate::store::ObjectInfo]) {
        for o in objects {
            if let Ok(ObjectKey::Wal {
                segment, suffix, ..
            }) = o.key.parse::<ObjectKey>()
            {
                self.absorb_wal(o, segment, suffix);
            }
        }
    }

    /// Files the 256 segments a prefix summary vouches for: the boundary
    /// ones with their keys and archive times, the others as placeholders
    /// (an empty key) that [`Catalog::materialise`] replaces when read.
    fn hint(&mut self, tree: &Tree, tli: u32, s: &WalPrefixSummary) {
        let dir = tree.log_prefix(tli, s.log);
        self.root.clone_from(&tree.root);
        for seg in 0..=MAX_SEG {
            let name = WalSegmentName {
                timeline: TimelineId(tli),
                log: s.log,
                seg,
            };
            let (key, archived) = match seg {
                0 => (format!("{dir}{name}-{}", s.first_hash), Some(s.first_time)),
                MAX_SEG => (format!("{dir}{name}-{}", s.last_hash), Some(s.last_time)),
                _ => (String::new(), None),
            };
            self.wal.insert(name, WalEntry { key, archived });
        }
        self.hinted.insert((tli, s.log));
    }

    /// Lists a summarised prefix and files what the listing says in place
    /// of the summary's placeholders. A listing that does not say what the
    /// summary did marks the catalog broken (its reader then loads the
    /// whole catalog), and so does a failed listing.
    pub(super) async fn materialise(&mut self, repo: &Repository, tli: u32, log: u32) {
        if !self.hinted.remove(&(tli, log)) {
            return;
        }
        let said: Vec<(WalSegmentName, WalEntry)> = self
            .wal
            .iter()
            .filter(|(s, _)| s.timeline.0 == tli && s.log == log)
            .map(|(s, e)| (*s, e.clone()))
            .collect();
        for (s, _) in &said {
            self.wal.remove(s);
        }
        let prefix = format!("{}wal/{}/{log:08X}/", self.root, TimelineId(tli));
        let objects = match repo.regions.list(&prefix).await {
            Ok((_, objects)) => objects,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list a summarised WAL prefix");
                self.hint_broken = true;
                return;
            }
        };
        self.absorb_all(&objects);
        let agrees = said.iter().all(|(s, e)| {
            self.wal.get(s).is_some_and(|got| {
                e.key.is_empty() || (got.key == e.key && got.archived == e.archived)
            })
        }) && self
            .wal
            .keys()
            .filter(|s| s.timeline.0 == tli && s.log == log)
            .count()
            == said.len();
        if !agrees {
            self.hint_broken = true;
        }
    }
}
