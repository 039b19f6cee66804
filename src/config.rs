//! The configuration a loss is made from, and where it computes.
//!
//! `num_classes` and `ema_decay` are the reference's own settings; `min_prevalence` is this
//! library's extension (0 keeps the reference's behaviour exactly).

use crate::error::{Error, Result};
use std::fmt;

/// The largest `num_classes` accepted: large enough for any vocabulary, small enough that
/// per-class buffers and the state blob's size can never overflow.
pub const MAX_CLASSES: usize = 1 << 24;

/// Where a loss computes. Tensors handed to it must live there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed with Rayon.
    #[default]
    Cpu,
    /// A CUDA device by ordinal, using its primary context.
    Cuda(i32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "the cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda device {ordinal}"),
        }
    }
}

/// How a loss is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Number of classes C; labels are in `[0, C)`.
    pub num_classes: usize,
    /// Decay d of the exponential moving average, in `[0, 1]`; the reference's default is 0.99.
    pub ema_decay: f64,
    /// Floor applied to each seen class's prevalence before inversion, in `[0, 1)`.
    pub min_prevalence: f64,
    /// Where the loss computes.
    pub device: Device,
}

impl Config {
    /// The reference's defaults for `num_classes` classes: decay 0.99, no floor, on the CPU.
    pub fn new(num_classes: usize) -> Self {
        Config { num_classes, ema_decay: 0.99, min_prevalence: 0.0, device: Device::Cpu }
    }

    /// Sets the decay of the moving average.
    pub fn with_ema_decay(mut self, ema_decay: f64) -> Self {
        self.ema_decay = ema_decay;
        self
    }

    /// Sets the prevalence floor.
    pub fn with_min_prevalence(mut self, min_prevalence: f64) -> Self {
        self.min_prevalence = min_prevalence;
        self
    }

    /// Sets the device.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Checks every field; the error names the first one that is out of its domain.
    pub fn validate(&self) -> Result<()> {
        if self.num_classes == 0 || self.num_classes > MAX_CLASSES {
            return Err(Error::InvalidConfig(format!(
                "num_classes is {} but must be in [1, {MAX_CLASSES}]",
                self.num_classes
            )));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return Err(Error::InvalidConfig(format!(
                "ema_decay is {} but must be in [0, 1]",
                self.ema_decay
            )));
        }
        if !(0.0..1.0).contains(&self.min_prevalence) {
            return Err(Error::InvalidConfig(format!(
                "min_prevalence is {} but must be in [0, 1)",
                self.min_prevalence
            )));
        }
        if let Device::Cuda(ordinal) = self.device {
            if ordinal < 0 {
                return Err(Error::InvalidConfig(format!(
                    "cuda device ordinal is {ordinal} but must be >= 0"
                )));
            }
        }
        Ok(())
    }
}
