//! Error types of the library's public functions that fail with a finding
//! rather than a kind: a parse error, a gate that does not hold, a refused
//! drill. Each is its own type, so callers cannot confuse one with another,
//! and reads as the sentence that names the problem and the fix. Errors the
//! daemon decides retries on are enums with kinds (`PgError`, `RepoError`,
//! `RedisError`, `StoreError`), not these.

/// Declares a public error type carrying one message.
#[macro_export]
macro_rules! message_error {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}

        // The message is the whole error: it reads as a string.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(e: $name) -> String {
                e.0
            }
        }
    };
}
