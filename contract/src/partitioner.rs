//! Kafka's default (Java client) partitioner, reimplemented bit for bit.
//!
//! Market ids are the record key on both the data and the command topic, and
//! the two topics are co-partitioned: the reducer that owns a market's data
//! must also receive that market's commands. That only holds if everybody who
//! produces uses the same partitioner as the data producers, which in the
//! Kafka world means the Java client's murmur2 (librdkafka calls it
//! `murmur2_random`). The publisher uses it through librdkafka's setting; the
//! reducer uses this copy to check that a command arrived on the partition
//! its market belongs to.

/// Kafka's `Utils.murmur2`: 32-bit MurmurHash2 with Kafka's fixed seed.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for a keyed record:
/// `toPositive(murmur2(key)) % partitions`.
///
/// # Panics
/// Panics if `partitions` is zero, which no Kafka topic can have.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn matches_kafka_java_murmur2() {
        let cases: &[(&str, i32)] = &[
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), *expected, "murmur2({input:?})");
        }
    }

    #[test]
    fn partition_is_in_range_and_stable() {
        for i in 0..1000 {
            let key = format!("market-{i}");
            let p = partition_for(key.as_bytes(), 8);
            assert!(p < 8);
            assert_eq!(p, partition_for(key.as_bytes(), 8));
        }
    }

    #[test]
    fn spreads_keys_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for(format!("m{i}").as_bytes(), 8) as usize] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
