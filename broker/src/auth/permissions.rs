//! Permissions as RabbitMQ has them: three patterns per user, each a regular expression that
//! must match a queue's or exchange's whole name. Compiled once, when set or loaded, so a check
//! is a match, not a compile.

use regex::Regex;

use super::SavedPermissions;
use crate::error::BrokerError;

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Declare, delete, purge, set alarms.
    Configure,
    /// Publish to it; bind to it as the destination.
    Write,
    /// Consume, get, peek, move out of; bind from it.
    Read,
}

impl Access {
    /// The permission's name, as `hopper permissions` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// What an operation is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A queue, by name.
    Queue(&'a str),
    /// An exchange, by name.
    Exchange(&'a str),
}

impl Resource<'_> {
    fn name(&self) -> &str {
        match self {
            Resource::Queue(name) | Resource::Exchange(name) => name,
        }
    }
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Queue(name) => write!(f, "queue '{name}'"),
            Resource::Exchange("") => write!(f, "the default exchange"),
            Resource::Exchange(name) => write!(f, "exchange '{name}'"),
        }
    }
}

/// A user's three patterns, compiled.
#[derive(Debug, Clone)]
pub struct Permissions {
    patterns: SavedPermissions,
    configure: Option<Regex>,
    write: Option<Regex>,
    read: Option<Regex>,
}

impl Permissions {
    /// Compiles the patterns; an empty one matches nothing.
    pub fn compile(patterns: SavedPermissions) -> Result<Permissions, BrokerError> {
        let compile = |what: &str, pattern: &str| -> Result<Option<Regex>, BrokerError> {
            if pattern.is_empty() {
                return Ok(None);
            }
            if pattern.len() > 4096 {
                return Err(BrokerError::InvalidArgument(format!(
                    "the {what} pattern is longer than 4096 bytes"
                )));
            }
            regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                // `.` is any character, so `.*` is every name whatever it holds.
                .dot_matches_new_line(true)
                .size_limit(1 << 20)
                .build()
                .map(Some)
                .map_err(|e| {
                    BrokerError::InvalidArgument(format!(
                        "the {what} pattern '{pattern}' is not a valid regular expression: {e}"
                    ))
                })
        };
        Ok(Permissions {
            configure: compile("configure", &patterns.configure)?,
            write: compile("write", &patterns.write)?,
            read: compile("read", &patterns.read)?,
            patterns,
        })
    }

    /// Everything on every name.
    pub fn all() -> Permissions {
        let all = SavedPermissions { configure: ".*".into(), write: ".*".into(), read: ".*".into() };
        Permissions::compile(all).expect("the match-all pattern compiles")
    }

    /// Nothing at all: what a new user has until permissions are set.
    pub fn none() -> Permissions {
        Permissions::compile(SavedPermissions::default()).expect("empty patterns compile")
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &SavedPermissions {
        &self.patterns
    }

    /// True when `access` to `resource` is granted.
    pub fn allows(&self, access: Access, resource: Resource<'_>) -> bool {
        let pattern = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        pattern.as_ref().is_some_and(|p| p.is_match(resource.name()))
    }
}

/// The refusal of `operation` on `resource` for `user`, who lacks `access` to it.
pub fn refused(user: &str, operation: &str, access: Access, resource: Resource<'_>) -> BrokerError {
    BrokerError::AccessRefused(format!(
        "user '{user}' may not {operation} {resource}: no {} permission on it",
        access.as_str()
    ))
}
