//! The client's error type: broker refusals, local misuse and connection failures.

use hopper_proto::ErrorCode;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed while connecting.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    /// The broker refused a request with an error frame.
    #[error("{}: {message}", code.as_str_name())]
    Broker {
        /// The stable error code the broker sent.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },

    /// Another node of the broker's cluster serves this request (a consumer of a replicated
    /// queue, asked of a node that does not serve it). Its code is NOT_ALLOWED; `addr` is
    /// where clients reach the serving node. A [`crate::Recovering`] consumer follows it by
    /// itself.
    #[error("NOT_ALLOWED: {message}")]
    ServedElsewhere {
        /// The broker's explanation.
        message: String,
        /// The serving node's client address, HOST:PORT.
        addr: String,
    },

    /// The broker does not speak this client's protocol version.
    #[error(
        "handshake rejected: {message} (the broker supports protocol versions \
         {min_version} to {max_version})"
    )]
    HandshakeRejected {
        /// The broker's explanation.
        message: String,
        /// Oldest protocol version the broker accepts.
        min_version: u32,
        /// Newest protocol version the broker accepts.
        max_version: u32,
    },

    /// None of the brokers given to [`crate::Connection::connect_any`] could be reached; the
    /// text names each address and why.
    #[error("no broker could be reached: {0}")]
    Unreachable(String),

    /// The broker refused the user or password (or, with no credentials, requires them). The
    /// text says why and what to do.
    #[error("authentication failed: {0}")]
    Authentication(String),

    /// The connection is closed; the text says why (closed by the client, by the broker, lost,
    /// or the broker stopped answering heartbeats).
    #[error("connection closed: {0}")]
    Closed(String),

    /// The delivery was already acked, nacked or rejected, directly or by an earlier
    /// `ack_multiple`. Nothing was sent.
    #[error("delivery {delivery_tag} is already settled")]
    AlreadySettled {
        /// Tag of the delivery that was settled twice.
        delivery_tag: u64,
    },

    /// The delivery's ack deadline passed and the broker took the message back (to redeliver
    /// or dead-letter it); this delivery can no longer be settled or extended. Once the broker
    /// has reported the expiry, settles and extends fail with this without sending anything;
    /// a confirmed settle the broker refused because of the expiry fails with it too.
    #[error("delivery {delivery_tag} expired: its ack deadline passed and the broker took the message back")]
    DeliveryExpired {
        /// Tag of the expired delivery.
        delivery_tag: u64,
    },

    /// The consumer was cancelled (by the broker, e.g. because its queue was deleted, or by
    /// this client); its deliveries can no longer be settled.
    #[error("consumer cancelled: {0}")]
    ConsumerCancelled(String),

    /// A frame would exceed the max frame size negotiated with the broker. It was not sent.
    #[error("frame of {len} bytes exceeds the negotiated max frame size of {max} bytes; it was not sent")]
    FrameTooLarge {
        /// Encoded length of the frame.
        len: usize,
        /// The negotiated limit.
        max: u32,
    },

    /// The broker sent something the protocol does not allow at this point.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// An [`Events`](crate::Events) stream was not read fast enough: this many events were
    /// dropped at this point of the stream. The stream goes on.
    #[error("{0} broker events were dropped because the event stream was not read in time")]
    EventsMissed(u64),

    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Result type of the client, defaulting to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The protocol error code behind this error, if there is one: the broker's code for
    /// [`Error::Broker`], [`ErrorCode::FrameTooLarge`] for a frame refused locally,
    /// [`ErrorCode::UnsupportedVersion`] for a rejected handshake.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::ServedElsewhere { .. } => Some(ErrorCode::NotAllowed),
            Error::FrameTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            Error::HandshakeRejected { .. } => Some(ErrorCode::UnsupportedVersion),
            Error::Authentication(_) => Some(ErrorCode::Unauthenticated),
            _ => None,
        }
    }

    /// The error a broker `Error` frame stands for.
    pub(crate) fn from_frame(error: hopper_proto::pb::Error) -> Self {
        let code = hopper_proto::error_code(error.code);
        if code == ErrorCode::NotAllowed && !error.redirect.is_empty() {
            return Error::ServedElsewhere { message: error.message, addr: error.redirect };
        }
        Error::Broker { code, message: error.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_error_displays_code_name_and_message() {
        let err = Error::Broker { code: ErrorCode::NotFound, message: "no queue named 'x'".into() };
        assert_eq!(err.to_string(), "NOT_FOUND: no queue named 'x'");
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
    }

    #[test]
    fn unknown_wire_code_maps_to_unspecified() {
        let err = Error::from_frame(hopper_proto::pb::Error {
            code: 999,
            message: "odd".into(),
            ..Default::default()
        });
        assert_eq!(err.code(), Some(ErrorCode::Unspecified));
    }

    #[test]
    fn a_refusal_naming_another_node_is_a_redirect() {
        let err = Error::from_frame(hopper_proto::pb::Error {
            code: ErrorCode::NotAllowed as i32,
            message: "served by node 2".into(),
            redirect: "10.0.0.2:5680".into(),
        });
        assert!(matches!(&err, Error::ServedElsewhere { addr, .. } if addr == "10.0.0.2:5680"), "{err:?}");
        assert_eq!(err.code(), Some(ErrorCode::NotAllowed));
        assert_eq!(err.to_string(), "NOT_ALLOWED: served by node 2");
    }

    #[test]
    fn local_errors_have_codes_where_the_protocol_has_one() {
        assert_eq!(Error::FrameTooLarge { len: 10, max: 5 }.code(), Some(ErrorCode::FrameTooLarge));
        assert_eq!(Error::Closed("bye".into()).code(), None);
        assert_eq!(Error::AlreadySettled { delivery_tag: 3 }.code(), None);
        assert_eq!(Error::DeliveryExpired { delivery_tag: 3 }.code(), None);
        let rejected = Error::HandshakeRejected { message: "too new".into(), min_version: 1, max_version: 1 };
        assert_eq!(rejected.code(), Some(ErrorCode::UnsupportedVersion));
    }
}
