//! Redis Cluster hash slots.
//!
//! A cluster splits keys (and sharded pub/sub topics) over 16384 slots by
//! CRC16 (XMODEM) of the key's hash tag — the part between the first `{` and
//! the next `}`, when non-empty — modulo 16384. Every key and topic of one
//! market carries the tag `{m:<id>}` (see [`crate::keys`]), so a market's
//! state, subscriber set and update topic share a slot: the reducer's update
//! script stays single-slot, and a publisher knows which node delivers a
//! topic without asking.

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, init 0), as Redis Cluster uses it.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of a key or topic name.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_redis_cluster_reference_values() {
        // The CRC16 check value from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT` answers of a real Redis.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(slot(b"{}x"), crc16(b"{}x") % SLOTS);
        assert_eq!(slot(b"a{b"), crc16(b"a{b") % SLOTS);
    }

    #[test]
    fn a_markets_keys_and_topic_share_a_slot() {
        let k = crate::Keys::new("odds");
        let s = slot(k.market_state("M1").as_bytes());
        assert_eq!(slot(k.market_topic("M1").as_bytes()), s);
        assert_eq!(slot(k.market_channels("M1").as_bytes()), s);
        assert_eq!(
            slot(k.channel_topic("c").as_bytes()),
            slot(k.channel_registry("c").as_bytes())
        );
    }
}
