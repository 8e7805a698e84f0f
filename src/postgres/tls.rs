//! TLS to PostgreSQL. libpq-style `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` in the conninfo are honoured; whenever TLS is used the server certificate is verified (chain
//! and host name) — against `sslrootcert` if given, else the system roots.

use std::path::PathBuf;

use super::PgError;

/// A conninfo with the TLS settings tokio-postgres does not parse taken out.
#[derive(Debug)]
pub struct SplitConninfo {
    /// What tokio-postgres parses.
    pub conninfo: String,
    /// libpq's `sslmode` as given (disable, allow, prefer, require, verify-ca, verify-full).
    pub sslmode: String,
    /// CA bundle to verify the server with.
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) for certificate authentication.
    pub sslcert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    pub sslkey: Option<PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` out of a key=value or URL conninfo.
pub fn split(conninfo: &str) -> Result<SplitConninfo, PgError> {
    let mut sslmode = "prefer".to_string();
    let mut root = None;
    let mut cert = None;
    let mut key = None;
    let mut handle = |k: &str, v: &str| -> Result<bool, PgError> {
        match k {
            "sslmode" => {
                sslmode = v.to_string();
                Ok(true)
            }
            "sslrootcert" => {
                root = Some(PathBuf::from(v));
                Ok(true)
            }
            "sslcert" => {
                cert = Some(PathBuf::from(v));
                Ok(true)
            }
            "sslkey" => {
                key = Some(PathBuf::from(v));
                Ok(true)
            }
            "sslcrl" | "sslpassword" => Err(PgError::Other(format!(
                "conninfo option {k} is not supported; use an unencrypted key file (mode 0600) \
                 and no CRL"
            ))),
            _ => Ok(false),
        }
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        match conninfo.split_once('?') {
            None => conninfo.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&') {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !handle(k, v)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for tok in conninfo.split_whitespace() {
            let (k, v) = tok.split_once('=').unwrap_or((tok, ""));
            let v = v.trim_matches('\'');
            if !handle(k, v)? {
                kept.push(tok);
            }
        }
        kept.join(" ")
    };
    let mode_for_tokio = match sslmode.as_str() {
        "disable" => "disable",
        "allow" | "prefer" => "prefer",
        "require" | "verify-ca" | "verify-full" => "require",
        other => {
            return Err(PgError::Other(format!(
                "sslmode={other} is not a libpq sslmode (disable, allow, prefer, require, verify-ca, verify-full)"
            )));
        }
    };
    let sep = if rest.starts_with("postgres") {
        if rest.contains('?') { "&" } else { "?" }
    } else {
        " "
    };
    if cert.is_some() != key.is_some() {
        return Err(PgError::Other(
            "sslcert and sslkey go together: give both (client certificate and its key)".into(),
        ));
    }
    if cert.is_some() && sslmode == "disable" {
        return Err(PgError::Other(
            "sslcert is set but sslmode=disable; use sslmode=verify-full".into(),
        ));
    }
    Ok(SplitConninfo {
        conninfo: format!("{rest}{sep}sslmode={mode_for_tokio}"),
        sslmode,
        sslrootcert: root,
        sslcert: cert,
        sslkey: key,
    })
}

/// A TLS connector that verifies the server against `sslrootcert` or the
/// system roots, presenting `sslcert`/`sslkey` when given.
pub fn connector(
    split: &SplitConninfo,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    let client = split.sslcert.as_deref().zip(split.sslkey.as_deref());
    let config = crate::tls::client_config(split.sslrootcert.as_deref(), client)
        .map_err(|e| PgError::Other(format!("TLS settings in conninfo: {e}")))?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_split_out() {
        let s = split("host=db port=5432 sslmode=verify-full sslrootcert=/etc/ca.pem user=x")
            .expect("split");
        assert_eq!(s.conninfo, "host=db port=5432 user=x sslmode=require");
        assert_eq!(s.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        let s =
            split("postgresql://u@db/app?sslmode=require&sslrootcert=/ca.pem&application_name=dr")
                .expect("split");
        assert_eq!(
            s.conninfo,
            "postgresql://u@db/app?application_name=dr&sslmode=require"
        );
        let s = split("host=db").expect("split");
        assert_eq!(s.conninfo, "host=db sslmode=prefer");
        assert!(split("host=db sslmode=bogus").is_err());
        assert!(split("host=db sslcert=/c.pem").is_err());
    }
}
