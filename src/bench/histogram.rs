//! Latency histograms as text: HdrHistogram's V2 serialization, deflate-compressed, in
//! base64 (what HdrHistogram's own interval logs hold), so that reports from several load
//! generators can be merged by adding histograms instead of averaging percentiles.

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// The histogram every latency is recorded in: 1 ns to an hour, 3 significant digits.
pub fn new_latency() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// `hist`, serialized, compressed and base64-encoded.
pub fn encode(hist: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(hist, &mut bytes)
        .expect("serializing into memory cannot fail");
    STANDARD.encode(bytes)
}

/// The histogram [`encode`] wrote.
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = STANDARD
        .decode(text.trim())
        .context("the histogram is not valid base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("the histogram does not deserialize: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut hist = new_latency();
        for v in [1_000, 20_000, 20_000, 3_000_000] {
            hist.record(v).unwrap();
        }
        let back = decode(&encode(&hist)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.value_at_quantile(0.5), hist.value_at_quantile(0.5));
        assert_eq!(back.max(), hist.max());
        assert!(decode("not base64!").is_err());
    }
}
