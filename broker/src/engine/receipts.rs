//! Receipts of deliveries pulled by callers without a connection (HTTP): unforgeable and
//! valid only for the pull that issued them.
//!
//! A receipt is `CONSUMER-TAG-MAC`, where MAC is an HMAC-SHA256 over the consumer id and the
//! delivery tag under a key drawn at random when the broker starts, cut to 128 bits. Guessing
//! a receipt means guessing the MAC; and since only consumers without a connection are ever
//! given receipts, none can name another connection's delivery.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::BrokerError;

/// Bytes of the MAC kept in a receipt.
const MAC_BYTES: usize = 16;

/// Issues and checks receipts.
pub(super) struct Receipts {
    key: [u8; 32],
}

impl Receipts {
    /// Receipts under a fresh random key.
    pub(super) fn new() -> Self {
        Receipts { key: rand::random() }
    }

    /// The receipt of delivery `tag` of consumer `consumer_id`.
    pub(super) fn issue(&self, consumer_id: u64, tag: u64) -> String {
        let mac = self.mac(consumer_id, tag).finalize().into_bytes();
        let hex: String = mac[..MAC_BYTES].iter().map(|b| format!("{b:02x}")).collect();
        format!("{consumer_id}-{tag}-{hex}")
    }

    /// The (consumer, tag) a receipt names, if it is genuine. Text that is not shaped like a
    /// receipt is an invalid argument; a receipt whose MAC does not match is not found.
    pub(super) fn open(&self, receipt: &str) -> Result<(u64, u64), BrokerError> {
        let malformed = || BrokerError::InvalidArgument(format!("'{receipt}' is not a receipt"));
        let mut parts = receipt.splitn(3, '-');
        let consumer_id: u64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(malformed)?;
        let tag: u64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(malformed)?;
        let mac = parts.next().and_then(decode_hex).filter(|m| m.len() == MAC_BYTES);
        let genuine = mac.is_some_and(|mac| self.mac(consumer_id, tag).verify_truncated_left(&mac).is_ok());
        if !genuine {
            return Err(BrokerError::NotFound(format!("unknown or already settled receipt '{receipt}'")));
        }
        Ok((consumer_id, tag))
    }

    fn mac(&self, consumer_id: u64, tag: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(&consumer_id.to_le_bytes());
        mac.update(&tag.to_le_bytes());
        mac
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_open_only_when_genuine() {
        let receipts = Receipts::new();
        let receipt = receipts.issue(12, 7);
        assert_eq!(receipts.open(&receipt).unwrap(), (12, 7));

        let (head, mac) = receipt.rsplit_once('-').unwrap();
        let mut forged = mac.as_bytes().to_vec();
        forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
        let forged = format!("{head}-{}", String::from_utf8(forged).unwrap());
        assert!(matches!(receipts.open(&forged), Err(BrokerError::NotFound(_))));
        assert!(
            matches!(receipts.open(&format!("12-8-{mac}")), Err(BrokerError::NotFound(_))),
            "another tag"
        );
        assert!(matches!(receipts.open("12-7"), Err(BrokerError::NotFound(_))), "no MAC");
        assert!(matches!(receipts.open("12-7-zz"), Err(BrokerError::NotFound(_))));
        for malformed in ["", "x", "not-a-receipt", "-1-2", "1"] {
            assert!(matches!(receipts.open(malformed), Err(BrokerError::InvalidArgument(_))), "{malformed}");
        }
        assert!(
            matches!(Receipts::new().open(&receipt), Err(BrokerError::NotFound(_))),
            "another broker's key"
        );
    }
}
