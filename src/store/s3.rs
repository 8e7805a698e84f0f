//! S3-compatible object storage through aws-sdk-s3.
//!
//! Large objects are sent as a multipart upload with a few parts in flight, so
//! memory stays bounded by `part_size × (in-flight + 1)`. An upload that fails or is
//! interrupted is aborted; S3 never shows an incomplete multipart upload as an
//! object, so a crash mid-put leaves nothing visible.

use std::io;
use std::ops::Range;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region as SdkRegion, retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkBody;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};

use super::{ByteStream, ObjectInfo, StoreError};
use crate::config::S3Region;

crate::message_error!(
    /// An S3 region that cannot be set up from its config (credentials, TLS, endpoint).
    S3SetupError
);

/// Requests sent by every S3 client of this process; see [`super::s3_requests`].
pub(super) static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts each request as it goes on the wire, retries included, so the
/// count is what the server saw rather than what the code meant to send.
#[derive(Debug)]
struct CountRequests;

impl aws_sdk_s3::config::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_before_transmit(
        &self,
        _: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Parts uploaded concurrently per object.
const PARTS_IN_FLIGHT: usize = 4;

/// One bucket + prefix.
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    label: String,
    object_lock: Option<crate::config::ObjectLock>,
}

impl S3Store {
    /// Builds a client. With credentials in the config, no AWS credential chain or
    /// instance-metadata endpoint is ever contacted.
    pub async fn connect(cfg: &S3Region) -> Result<S3Store, S3SetupError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build();
        let retry = RetryConfig::standard().with_max_attempts(4);
        let mut builder = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(k), Some(s)) => {
                let creds = Credentials::new(
                    k.resolve().map_err(String::from)?,
                    s.resolve().map_err(String::from)?,
                    None,
                    None,
                    "dr-config",
                );
                aws_sdk_s3::Config::builder()
                    .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                    .credentials_provider(creds)
            }
            _ => {
                let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(SdkRegion::new(cfg.s3_region.clone()))
                    .load()
                    .await;
                aws_sdk_s3::config::Builder::from(&shared)
            }
        };
        builder = builder
            .region(SdkRegion::new(cfg.s3_region.clone()))
            .force_path_style(cfg.path_style)
            .timeout_config(timeouts)
            .retry_config(retry)
            .interceptor(CountRequests);
        if let Some(ep) = &cfg.endpoint {
            builder = builder.endpoint_url(ep);
        }
        let label = format!(
            "s3:{}/{}{}",
            cfg.endpoint.as_deref().unwrap_or("aws"),
            cfg.bucket,
            if cfg.prefix.is_empty() {
                String::new()
            } else {
                format!("/{}", cfg.prefix)
            }
        );
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            part_size: cfg.part_size,
            label,
            object_lock: cfg.object_lock,
        })
    }

    pub(super) fn describe(&self) -> String {
        self.label.clone()
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    /// Puts are create-only (`If-None-Match: *`): a server that honours it
    /// answers 412 when the key exists, which is the fs store's
    /// [`StoreError::AlreadyExists`]. Servers that ignore the header
    /// overwrite, as before; dr never writes a key twice on purpose.
    fn put_err<E>(
        &self,
        key: &str,
        e: SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let precondition = e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
            || e.as_service_error()
                .and_then(|se| se.code())
                .is_some_and(|c| c == "PreconditionFailed");
        if precondition {
            return StoreError::AlreadyExists {
                store: self.describe(),
                key: key.to_string(),
            };
        }
        self.err("put", key, e)
    }

    fn err<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (transient, message) = match &e {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => (
                true,
                format!(
                    "endpoint unreachable ({}); check that the S3 server is up and the endpoint is right",
                    DisplayErrorContext(&e)
                ),
            ),
            SdkError::ResponseError(_) => (true, DisplayErrorContext(&e).to_string()),
            SdkError::ServiceError(se) => {
                // HEAD answers carry no body, hence no error code: say the
                // HTTP status instead of "unknown: ".
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or(match status {
                    403 => "AccessDenied",
                    404 => "NotFound",
                    301 | 307 => "WrongRegionOrEndpoint",
                    _ => "",
                });
                let msg = match se.err().message() {
                    Some(m) if !m.is_empty() => m.to_string(),
                    _ => format!("HTTP {status}"),
                };
                let hint = match code {
                    "WrongRegionOrEndpoint" => "; check `endpoint` and `s3_region` in the config",
                    "NoSuchBucket" => "; create the bucket or fix `bucket` in the config",
                    "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                        "; check the region's access key settings"
                    }
                    _ => "",
                };
                let transient = matches!(
                    code,
                    "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"
                );
                let what = if code.is_empty() {
                    msg
                } else {
                    format!("{code}: {msg}")
                };
                (transient, format!("{what}{hint}"))
            }
            _ => (false, DisplayErrorContext(&e).to_string()),
        };
        StoreError::Backend {
            store: self.describe(),
            op,
            key: key.to_string(),
            message,
            transient,
        }
    }

    pub(super) async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StoreError> {
        let full = self.full(key);
        let source_err = |source| StoreError::Source {
            store: self.describe(),
            key: key.to_string(),
            source,
        };
        let mut buf = BytesMut::with_capacity(self.part_size.min(1 << 20));
        // Fill the first part; a small object is a single PUT.
        let mut ended = false;
        while buf.len() < self.part_size {
            match body.next().await {
                Some(chunk) => buf.extend_from_slice(&chunk.map_err(source_err)?),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            let n = buf.len() as u64;
            let (mode, until) = self.retention();
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .if_none_match("*")
                .body(SdkBody::from(buf.freeze()))
                .set_object_lock_mode(mode)
                .set_object_lock_retain_until_date(until)
                .send()
                .await
                .map_err(|e| self.put_err(key, e))?;
            return Ok(n);
        }
        let (mode, until) = self.retention();
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .set_object_lock_mode(mode)
            .set_object_lock_retain_until_date(until)
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        let Some(upload_id) = upload.upload_id().map(str::to_string) else {
            return Err(StoreError::Backend {
                store: self.describe(),
                op: "put",
                key: key.to_string(),
                message: "server returned no multipart upload id".into(),
                transient: false,
            });
        };
        let result = self.put_parts(key, &full, &upload_id, buf, body).await;
        match result {
            Ok(n) => Ok(n),
            Err(e) => {
                // Best effort: an unaborted upload is invisible but costs storage.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn put_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        mut buf: BytesMut,
        mut body: ByteStream,
    ) -> Result<u64, StoreError> {
        let mut in_flight = FuturesUnordered::new();
        let mut done: Vec<CompletedPart> = Vec::new();
        let mut part_number = 0i32;
        let mut total = 0u64;
        let mut ended = false;
        loop {
            // Cut a full part (or the final remainder).
            while buf.len() < self.part_size && !ended {
                match body.next().await {
                    Some(chunk) => {
                        buf.extend_from_slice(&chunk.map_err(|source| StoreError::Source {
                            store: self.describe(),
                            key: key.to_string(),
                            source,
                        })?)
                    }
                    None => ended = true,
                }
            }
            if !buf.is_empty() {
                let take = buf.len().min(self.part_size);
                let part: Bytes = buf.split_to(take).freeze();
                part_number += 1;
                total += part.len() as u64;
                let n = part_number;
                in_flight.push(async move {
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .part_number(n)
                        .body(SdkBody::from(part))
                        .send()
                        .await
                        .map_err(|e| self.err("put", key, e))?;
                    Ok::<_, StoreError>(
                        CompletedPart::builder()
                            .part_number(n)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .build(),
                    )
                });
            }
            if in_flight.len() >= PARTS_IN_FLIGHT || (ended && buf.is_empty()) {
                match in_flight.try_next().await? {
                    Some(p) => done.push(p),
                    None if ended && buf.is_empty() => break,
                    None => {}
                }
            }
        }
        done.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .if_none_match("*")
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.put_err(key, e))?;
        // Not every server applies retention given at upload creation; set it
        // on the completed object as well (extending retention is always allowed).
        if let (Some(mode), Some(until)) = self.retention() {
            self.client
                .put_object_retention()
                .bucket(&self.bucket)
                .key(full)
                .retention(
                    aws_sdk_s3::types::ObjectLockRetention::builder()
                        .mode(aws_sdk_s3::types::ObjectLockRetentionMode::from(
                            mode.as_str(),
                        ))
                        .retain_until_date(until)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.err("put (object lock retention)", key, e))?;
        }
        Ok(total)
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key));
        if let Some(r) = &range {
            if r.end <= r.start {
                return Ok(Box::pin(futures::stream::empty()));
            }
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = req.send().await.map_err(|e| {
            if let SdkError::ServiceError(se) = &e
                && se.err().is_no_such_key()
            {
                return StoreError::NotFound {
                    store: self.describe(),
                    key: key.to_string(),
                };
            }
            self.err("get", key, e)
        })?;
        let body = out.body;
        Ok(Box::pin(futures::stream::unfold(
            body,
            |mut b| async move { b.next().await.map(|r| (r.map_err(io::Error::other), b)) },
        )))
    }

    pub(super) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(SdkError::ServiceError(se)) if se.err().is_not_found() => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let full_prefix = self.full(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list", prefix, e))?;
            for o in page.contents() {
                if let Some(k) = o.key()
                    && k.len() >= strip
                {
                    out.push(ObjectInfo {
                        key: k[strip..].to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().and_then(|t| {
                            chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
                        }),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub(super) async fn list_dirs(&self, prefix: &str) -> Result<super::Listing, StoreError> {
        let full_prefix = self.full(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = super::Listing::default();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list", prefix, e))?;
            for p in page.common_prefixes() {
                if let Some(k) = p.prefix()
                    && k.len() >= strip
                {
                    out.dirs.push(k[strip..].to_string());
                }
            }
            for o in page.contents() {
                if let Some(k) = o.key()
                    && k.len() >= strip
                {
                    out.objects.push(ObjectInfo {
                        key: k[strip..].to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().and_then(|t| {
                            chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
                        }),
                    });
                }
            }
        }
        out.dirs.sort();
        out.objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Object Lock settings for a new object.
    fn retention(
        &self,
    ) -> (
        Option<aws_sdk_s3::types::ObjectLockMode>,
        Option<aws_smithy_types::DateTime>,
    ) {
        use aws_sdk_s3::types::ObjectLockMode;
        match self.object_lock {
            None => (None, None),
            Some(l) => {
                let until = chrono::Utc::now() + chrono::Duration::days(i64::from(l.days));
                let mode = if l.compliance {
                    ObjectLockMode::Compliance
                } else {
                    ObjectLockMode::Governance
                };
                (
                    Some(mode),
                    Some(aws_smithy_types::DateTime::from_secs(until.timestamp())),
                )
            }
        }
    }

    /// A plain DELETE: the object is gone, or, in a versioned bucket, behind
    /// a delete marker with its versions kept.
    pub(super) async fn hide(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        Ok(())
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.object_lock.is_none() {
            return self.hide(key).await;
        }
        let full = self.full(key);
        // A locked bucket is versioned: a plain delete would only hide the
        // object behind a delete marker. Refuse while retention runs, then
        // delete every version for real.
        let head = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(h) => Some(h),
            Err(SdkError::ServiceError(se)) if se.err().is_not_found() => None,
            Err(e) => return Err(self.err("delete", key, e)),
        };
        if let Some(until) = head
            .as_ref()
            .and_then(|h| h.object_lock_retain_until_date())
            && until.secs() > chrono::Utc::now().timestamp()
        {
            let until = chrono::DateTime::from_timestamp(until.secs(), 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| until.to_string());
            return Err(StoreError::Locked {
                store: self.describe(),
                key: key.to_string(),
                until,
            });
        }
        let versions = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(&full)
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        let ids: Vec<String> = versions
            .versions()
            .iter()
            .filter(|v| v.key() == Some(full.as_str()))
            .filter_map(|v| v.version_id().map(str::to_string))
            .chain(
                versions
                    .delete_markers()
                    .iter()
                    .filter(|m| m.key() == Some(full.as_str()))
                    .filter_map(|m| m.version_id().map(str::to_string)),
            )
            .collect();
        for id in ids {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .version_id(id)
                .send()
                .await
                .map_err(|e| self.err("delete", key, e))?;
        }
        Ok(())
    }

    /// Fails unless the bucket has Object Lock enabled, when this region is
    /// configured to lock objects (checked by `dr repo init` and `dr check`).
    pub async fn check_object_lock(&self) -> Result<(), StoreError> {
        let Some(lock) = self.object_lock else {
            return Ok(());
        };
        if self.bucket_object_lock().await? {
            return Ok(());
        }
        Err(StoreError::Backend {
            store: self.describe(),
            op: "object lock check",
            key: self.bucket.clone(),
            message: format!(
                "object_lock_days = {} but bucket {} does not have Object Lock enabled; create the \
                 bucket with Object Lock enabled (it cannot be turned on later for existing buckets \
                 on most servers) or remove object_lock_days",
                lock.days, self.bucket
            ),
            transient: false,
        })
    }

    /// Whether this region writes objects with Object Lock retention.
    pub fn object_lock_configured(&self) -> bool {
        self.object_lock.is_some()
    }

    /// Whether the bucket has Object Lock enabled (false when it has no
    /// Object Lock configuration).
    pub async fn bucket_object_lock(&self) -> Result<bool, StoreError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled")),
            Err(SdkError::ServiceError(se))
                if se.err().code() == Some("ObjectLockConfigurationNotFoundError") =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("object lock check", &self.bucket, e)),
        }
    }

    /// Creates the bucket if it does not exist (for `dr repo init`).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => self.check_object_lock().await,
            Err(SdkError::ServiceError(se)) if se.err().is_not_found() => {
                self.client
                    .create_bucket()
                    .bucket(&self.bucket)
                    .set_object_lock_enabled_for_bucket(self.object_lock.map(|_| true))
                    .send()
                    .await
                    .map_err(|e| self.err("create bucket", &self.bucket, e))?;
                Ok(())
            }
            Err(e) => Err(self.err("head bucket", &self.bucket, e)),
        }
    }
}
