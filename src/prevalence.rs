//! The running class prevalences: an exponential moving average of label frequencies, kept in
//! double precision with each class either unseen or a number, and its portable byte form.
//!
//! The update rule is the reference's (SEMANTICS.md, "Update from a target tensor"): a class
//! seen for the first time starts at 1/C, then every seen class moves towards its frequency in
//! the batch. Updates are pure functions of the counts, so summed counts from several ranks give
//! exactly the state that one update over the concatenated batches gives.

use crate::error::{Error, Result};

/// The running state: one entry per class, `None` while the class has never been seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Prevalences {
    values: Vec<Option<f64>>,
}

impl Prevalences {
    /// Every class unseen.
    pub fn unseen(num_classes: usize) -> Self {
        Prevalences { values: vec![None; num_classes] }
    }

    /// A state from explicit values; each must be unseen or a finite number in `[0, 1]`.
    pub fn from_values(values: Vec<Option<f64>>) -> Result<Self> {
        if let Some((class, value)) = values
            .iter()
            .enumerate()
            .find_map(|(class, v)| v.filter(|p| !(0.0..=1.0).contains(p)).map(|p| (class, p)))
        {
            return Err(Error::InvalidState(format!(
                "prevalence of class {class} is {value} but must be in [0, 1]"
            )));
        }
        Ok(Prevalences { values })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.values.len()
    }

    /// The double-precision values, `None` for unseen classes.
    pub fn values(&self) -> &[Option<f64>] {
        &self.values
    }

    /// The state after one update from per-class label counts with decay `ema_decay`.
    ///
    /// Counts of labels that were dropped (ignored or out of range) must not be included.
    pub fn updated(&self, counts: &[u64], ema_decay: f64) -> Prevalences {
        debug_assert_eq!(counts.len(), self.values.len());
        let total: u64 = counts.iter().sum();
        let first_seen = 1.0 / self.values.len() as f64;
        let keep = 1.0 - ema_decay;
        let values = self
            .values
            .iter()
            .zip(counts)
            .map(|(&value, &count)| {
                let start = match value {
                    Some(p) => p,
                    None if count > 0 => first_seen,
                    None => return None,
                };
                let batch = if total > 0 { count as f64 / total as f64 } else { 0.0 };
                Some(start * ema_decay + batch * keep)
            })
            .collect();
        Prevalences { values }
    }

    /// The prevalences as the reference reports them: float32, NaN for unseen classes.
    pub fn reported(&self) -> Vec<f32> {
        self.values.iter().map(|v| v.map_or(f32::NAN, |p| p as f32)).collect()
    }

    /// Number of bytes of [`Prevalences::to_bytes`] for `num_classes` classes.
    pub fn encoded_len(num_classes: usize) -> usize {
        HEADER_LEN + 8 * num_classes + CHECKSUM_LEN
    }

    /// The state as a self-describing little-endian blob, for checkpoints.
    ///
    /// Layout: magic `CBCESTAT`, format version (u32), reserved zero (u32), num_classes (u64),
    /// one f64 per class (NaN marks an unseen class), FNV-1a 64 checksum of all earlier bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::encoded_len(self.values.len()));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(self.values.len() as u64).to_le_bytes());
        for value in &self.values {
            bytes.extend_from_slice(&value.unwrap_or(f64::NAN).to_le_bytes());
        }
        let checksum = fnv1a64(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// Reads a blob written by [`Prevalences::to_bytes`] for a loss of `num_classes` classes.
    pub fn from_bytes(bytes: &[u8], num_classes: usize) -> Result<Prevalences> {
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(Error::InvalidState(format!(
                "state blob is {} bytes, shorter than its {}-byte frame",
                bytes.len(),
                HEADER_LEN + CHECKSUM_LEN
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(Error::InvalidState("state blob does not start with CBCESTAT".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(Error::InvalidState(format!(
                "state blob has format version {version}; this library reads {FORMAT_VERSION}"
            )));
        }
        let stored_classes = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if stored_classes != num_classes as u64 {
            return Err(Error::InvalidState(format!(
                "state blob is for {stored_classes} classes but the loss has {num_classes}"
            )));
        }
        let expected_len = Self::encoded_len(num_classes);
        if bytes.len() != expected_len {
            return Err(Error::InvalidState(format!(
                "state blob is {} bytes but {expected_len} are needed for {num_classes} classes",
                bytes.len()
            )));
        }
        let (body, tail) = bytes.split_at(expected_len - CHECKSUM_LEN);
        let stored_checksum = u64::from_le_bytes(tail.try_into().expect("8 bytes"));
        let checksum = fnv1a64(body);
        if stored_checksum != checksum {
            return Err(Error::InvalidState(format!(
                "state blob checksum is {stored_checksum:#018x} but its bytes give {checksum:#018x}"
            )));
        }
        let values = body[HEADER_LEN..]
            .chunks_exact(8)
            .map(|chunk| {
                let p = f64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                (!p.is_nan()).then_some(p)
            })
            .collect();
        Prevalences::from_values(values)
    }
}

const MAGIC: &[u8; 8] = b"CBCESTAT";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const CHECKSUM_LEN: usize = 8;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_update_starts_seen_classes_at_one_over_c() {
        // C = 4, d = 0.5, counts [2, 0, 2, 0]: classes 0 and 2 start at 0.25, then
        // 0.25 * 0.5 + 0.5 * 0.5 = 0.375; classes 1 and 3 stay unseen.
        let state = Prevalences::unseen(4).updated(&[2, 0, 2, 0], 0.5);
        assert_eq!(state.values(), &[Some(0.375), None, Some(0.375), None]);
    }

    #[test]
    fn seen_class_absent_from_batch_decays() {
        // From [0.375, -, 0.375, -] with counts [0, 0, 4, 0]: class 0 becomes
        // 0.375 * 0.5 + 0 = 0.1875, class 2 becomes 0.375 * 0.5 + 1 * 0.5 = 0.6875.
        let state = Prevalences::unseen(4).updated(&[2, 0, 2, 0], 0.5).updated(&[0, 0, 4, 0], 0.5);
        assert_eq!(state.values(), &[Some(0.1875), None, Some(0.6875), None]);
    }

    #[test]
    fn empty_batch_decays_every_seen_class() {
        let state = Prevalences::unseen(2).updated(&[1, 0], 0.5).updated(&[0, 0], 0.5);
        // 0.5 * 0.5 + 1 * 0.5 = 0.75, then 0.75 * 0.5 = 0.375.
        assert_eq!(state.values(), &[Some(0.375), None]);
    }

    #[test]
    fn reported_marks_unseen_as_nan() {
        let reported = Prevalences::unseen(2).updated(&[3, 0], 0.0).reported();
        assert_eq!(reported[0], 1.0);
        assert!(reported[1].is_nan());
    }

    #[test]
    fn bytes_round_trip_and_reject_damage() {
        let state = Prevalences::unseen(3).updated(&[1, 0, 7], 0.9);
        let bytes = state.to_bytes();
        assert_eq!(bytes.len(), Prevalences::encoded_len(3));
        assert_eq!(Prevalences::from_bytes(&bytes, 3).unwrap(), state);

        assert!(Prevalences::from_bytes(&bytes[..bytes.len() - 1], 3).is_err());
        assert!(Prevalences::from_bytes(&bytes, 4).is_err());
        let mut flipped = bytes.clone();
        flipped[30] ^= 0x10;
        let err = Prevalences::from_bytes(&flipped, 3).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn values_outside_unit_interval_are_rejected() {
        assert!(Prevalences::from_values(vec![Some(1.5)]).is_err());
        assert!(Prevalences::from_values(vec![Some(f64::INFINITY)]).is_err());
        assert!(Prevalences::from_values(vec![Some(0.0), None, Some(1.0)]).is_ok());
    }
}
