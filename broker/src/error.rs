//! Errors the broker reports to clients, each mapped to a stable wire error code.

use hopper_proto::ErrorCode;

/// A request failed; the message is sent to the client with the matching code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum BrokerError {
    /// The queue, consumer or delivery does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with existing state.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The frames break the protocol.
    #[error("{0}")]
    ProtocolViolation(String),
    /// Understood, but not permitted.
    #[error("{0}")]
    NotAllowed(String),
    /// A broker limit was reached.
    #[error("{0}")]
    ResourceLimit(String),
    /// The broker failed.
    #[error("{0}")]
    Internal(String),
    /// A mandatory message that no queue takes; it was returned, not stored.
    #[error("{0}")]
    NoRoute(String),
    /// The user may not do this; nothing was changed.
    #[error("{0}")]
    AccessRefused(String),
    /// Authentication failed, or was needed and missing.
    #[error("{0}")]
    Unauthenticated(String),
    /// Another node of the cluster serves this (a replicated queue's consumers); sent with
    /// NOT_ALLOWED and the address clients reach that node at.
    #[error("{message}")]
    ServedElsewhere {
        /// What to do, for a reader.
        message: String,
        /// The serving node's client address.
        addr: String,
    },
}

impl BrokerError {
    /// The same error, its message prefixed with the queue it came from.
    pub fn named(&self, queue: &str) -> BrokerError {
        let prefix = |m: &String| format!("queue '{queue}': {m}");
        match self {
            BrokerError::NotFound(m) => BrokerError::NotFound(prefix(m)),
            BrokerError::PreconditionFailed(m) => BrokerError::PreconditionFailed(prefix(m)),
            BrokerError::InvalidArgument(m) => BrokerError::InvalidArgument(prefix(m)),
            BrokerError::ProtocolViolation(m) => BrokerError::ProtocolViolation(prefix(m)),
            BrokerError::NotAllowed(m) => BrokerError::NotAllowed(prefix(m)),
            BrokerError::ResourceLimit(m) => BrokerError::ResourceLimit(prefix(m)),
            BrokerError::Internal(m) => BrokerError::Internal(prefix(m)),
            BrokerError::NoRoute(m) => BrokerError::NoRoute(m.clone()),
            BrokerError::AccessRefused(m) => BrokerError::AccessRefused(m.clone()),
            BrokerError::Unauthenticated(m) => BrokerError::Unauthenticated(m.clone()),
            BrokerError::ServedElsewhere { message, addr } => {
                BrokerError::ServedElsewhere { message: prefix(message), addr: addr.clone() }
            }
        }
    }

    /// NOT_FOUND for a queue name.
    pub fn queue_not_found(name: &str) -> Self {
        BrokerError::NotFound(format!("no queue named '{name}'"))
    }

    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::NotFound(_) => ErrorCode::NotFound,
            BrokerError::PreconditionFailed(_) => ErrorCode::PreconditionFailed,
            BrokerError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            BrokerError::ProtocolViolation(_) => ErrorCode::ProtocolViolation,
            BrokerError::NotAllowed(_) => ErrorCode::NotAllowed,
            BrokerError::ResourceLimit(_) => ErrorCode::ResourceLimit,
            BrokerError::Internal(_) => ErrorCode::Internal,
            BrokerError::NoRoute(_) => ErrorCode::NoRoute,
            BrokerError::AccessRefused(_) => ErrorCode::AccessRefused,
            BrokerError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            BrokerError::ServedElsewhere { .. } => ErrorCode::NotAllowed,
        }
    }

    /// The error frame answering request `request_id` with this error.
    pub fn frame(&self, request_id: u64) -> hopper_proto::Frame {
        match self {
            BrokerError::ServedElsewhere { addr, .. } => {
                hopper_proto::Frame::redirect(request_id, self.code(), self.to_string(), addr.clone())
            }
            _ => hopper_proto::Frame::error(request_id, self.code(), self.to_string()),
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The data directory is unusable.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}
