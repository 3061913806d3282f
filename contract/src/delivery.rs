//! The delivery log's record: what one publisher pod handed to its browser
//! connections (the trivago article's "business log" of the prices shown).
//!
//! One JSON object per Kafka record, keyed by the market id (so a market's
//! records stay in order on one partition of the log topic):
//! `{"market":"m1","version":7,"ts":1700000000000,"connections":3,
//!   "pod":"odds-publisher-6f9c-x2","at":1700000000012}`.
//! Consumers of the log (audit, analytics) decode it with [`decode_delivery`].

use serde::{Deserialize, Serialize};

use crate::message::ContractError;

/// One market update as one publisher pod delivered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Market id.
    pub market: String,
    /// The update's version.
    pub version: u64,
    /// The update's own timestamp (ms since the epoch), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// Browser connections of this pod the update was handed to (queued on
    /// their outboxes, or in place of an older version still waiting there;
    /// a slow connection may later conflate it with a newer one). A
    /// connection that already had this version is not counted.
    pub connections: u32,
    /// The pod (host name) that delivered it.
    pub pod: String,
    /// When the pod handed it over (ms since the epoch).
    pub at: i64,
}

/// Encodes a record as the log's JSON.
pub fn encode_delivery(r: &DeliveryRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("a delivery record serialises")
}

/// Decodes a record of the log.
pub fn decode_delivery(bytes: &[u8]) -> Result<DeliveryRecord, ContractError> {
    serde_json::from_slice(bytes).map_err(|e| ContractError::Json(format!("delivery record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_errors() {
        let r = DeliveryRecord {
            market: "m1".into(),
            version: 7,
            ts: Some(1_700_000_000_000),
            connections: 3,
            pod: "p-1".into(),
            at: 1_700_000_000_012,
        };
        let bytes = encode_delivery(&r);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"market":"m1","version":7,"ts":1700000000000,"connections":3,"pod":"p-1","at":1700000000012}"#
        );
        assert_eq!(decode_delivery(&bytes).unwrap(), r);
        let no_ts = DeliveryRecord { ts: None, ..r };
        assert_eq!(decode_delivery(&encode_delivery(&no_ts)).unwrap(), no_ts);
        assert!(decode_delivery(b"{\"market\":1}").is_err());
    }
}
