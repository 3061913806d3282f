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

/// Slots between two [`SPREAD_TAGS`].
pub const SPREAD_STEP: u16 = 256;

/// Hash tags whose slots are spread evenly over the cluster: tag `i` hashes
/// to slot `i × SPREAD_STEP`, so keys carrying them land on every master
/// that owns at least [`SPREAD_STEP`] consecutive slots (a master of a
/// 3-master cluster holds ~21). Found by search, checked by a test.
pub const SPREAD_TAGS: [&str; (SLOTS / SPREAD_STEP) as usize] = [
    "e5404", "e1272", "e13433", "e6708", "e88430", "e61849", "e9471", "e8575", "e14584", "e15480",
    "e44392", "e17688", "e326", "e11818", "e45878", "e69069", "e13500", "e3149", "e5537", "e1341",
    "e9542", "e8446", "e38285", "e39381", "e2480", "e3584", "e22306", "e23202", "e6818", "e103881",
    "e215", "e58391", "e26806", "e27902", "e9617", "e8713", "e5662", "e1014", "e2318", "e12751",
    "e140", "e5841", "e12972", "e13876", "e11090", "e10194", "e8930", "e9834", "e9724", "e8620",
    "e26935", "e27831", "e7559", "e12662", "e5751", "e1127", "e12841", "e13945", "e4876", "e5972",
    "e7194", "e6090", "e22160", "e4298",
];

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
    fn spread_tags_hash_to_evenly_spaced_slots() {
        for (i, tag) in SPREAD_TAGS.iter().enumerate() {
            assert_eq!(slot(tag.as_bytes()), i as u16 * SPREAD_STEP, "tag {tag}");
            let key = format!("sp:x:epoch:{{{tag}}}");
            assert_eq!(slot(key.as_bytes()), i as u16 * SPREAD_STEP);
        }
    }

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
